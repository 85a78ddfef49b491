"""Protocols beyond the synchronous round: early stop, streamed prefixes at a deadline,
pipelined groups. One fused kernel plays a round of any combination over ``(N, K)``.

The synchronous round of the paper stays in :mod:`multispin_env.simulator` untouched: with
every switch off the simulator never calls this module (bit-for-bit the same draws and
numbers). The switches live in :class:`~multispin_env.config.ScenarioConfig`; the extra
decisions are passed to :meth:`MultiSpinSimulator.step`. Notation: d_k = T^S_k (seconds per
drafted token), u_k = Q_tok / (B_k r_k) (seconds per uploaded token), V(.) the batched
verification law of the scenario (padded batch: t_fix + n t_user + t_token n (max len + 1)
over the n users in the batch).

Early stop (``early_stop``; AdaEDL, arXiv 2410.18351)
    The server gives user k a cap L_k and a confidence threshold lambda_k in [0, 1). The
    device drafts token 1, then keeps drafting token i + 1 only while its drafter's
    confidence c_{i+1} in that token is >= lambda_k (the confidence comes with the forward
    pass that produced token i, so a stop costs no extra time), up to L_k. Drafted length
    l_k in 1..L_k; drafting takes l_k d_k. lambda_k = 0 never stops early.
    Token-level acceptance (needed because the i.i.d. geometric law cannot express "stop
    when unsure"): position i of a request with mean acceptance alpha has a latent
    acceptance probability a_i = sigmoid(m + s z_i), z_i ~ N(0, 1) i.i.d., with m solved per
    request so that E[a_i] = alpha; the drafter's confidence is c_i = sigmoid(m + s z_i +
    sigma e_i), e_i ~ N(0, 1); the token is accepted with probability a_i. (Normals come
    from uniforms by the normal quantile; each position's draws are a function of the key,
    round, position and user.) Independence
    keeps P(first i accepted) = alpha^i, the paper's law, when no stop rule acts.
    s = ``token_logit_std``, sigma = ``confidence_noise_std`` (fitted on the built-in pair:
    ``python -m multispin_eval.fit_token_model``).

Streamed prefixes at a deadline (``streaming_deadline``)
    Each token is uploaded as soon as it is drafted, so token i reaches the server at
    t_{k,i} = d_k + u_k + (i - 1) max(d_k, u_k) (drafting of token i + 1 overlaps the upload
    of token i). The server gives each user a cap L_k and bandwidth B_k, and picks a
    deadline D: it verifies at T = min(D, max_k t_{k, l_k}) (at once when every draft is in)
    the prefix n_k = #{i <= l_k : t_{k,i} <= T} of every user. Users with n_k = 0 are not
    in the batch and commit nothing; tokens still in flight at T are wasted (the server
    tells devices to stop). Round time T + V(n). A slow drafter or a deep fade shortens that
    user's verified prefix instead of stretching everyone's round.

Pipelined groups (``pipeline_groups`` = G >= 2; SpecEdge, arXiv 2505.17052)
    Users are split into G groups (a decision per user each step). One step is one cycle
    in which every group drafts + uploads once and is verified once. In phase g group g
    drafts and uploads (DU_g = max over its users of (l_k - p_k) d_k + l_k u_k, FDMA over
    group g only: its bandwidth shares sum to B) while the server verifies group g - 1
    (V_{g-1}, cyclic). Steady state: cycle = sum_g max(DU_g, V_{g-1}) against DU + V of one
    synchronous round. With ``proactive_drafting`` a device keeps drafting while it waits
    for its next phase, W = cycle - max(DU_g, V_{g-1}) (the other groups' phases; its own
    verification V_g runs at the start of phase g + 1): for the first V_g seconds
    it drafts from the guess "whole draft accepted and the verifier's bonus token is my
    top token" (kept only if that holds: the bonus position is drawn like any other
    token), then, once the result is back, from the true context. It starts the next cycle
    with p_k = floor(W / d_k) tokens already drafted if the guess held, else
    floor((W - V_g) / d_k) (capped at L_max and at the next cap; the rest is wasted).

Combinations: early stop combines with either of the others. Deadline verification and
pipelined groups do not combine (a deadline per phase is its own protocol); the config
refuses it.

Device energy: drafted tokens (including proactive ones) times the energy per token, plus
transmit power times the upload time of the tokens that were uploaded.
"""

from __future__ import annotations

import functools

import numpy as np

from multispin_env import rng as crng
from multispin_env._jit import kernel
from multispin_env.verification import padded_latency_s


def resolve_levers(
    shape: tuple[int, int],
    groups: int,
    stop_threshold=None,
    deadline_s=None,
    group=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The protocol levers of a decision for ``shape = (N, K)``, checked, with their defaults:
    ``(threshold (N, K) in [0, 1), deadline (N,) > 0 seconds, group (N, K) int64 in
    [0, groups))``. Defaults: never stop early (0), no deadline (inf: wait for every draft),
    user k in group k mod G. The simulator and the live server both decide with this, so a
    lever one accepts the other accepts too. Raises ValueError naming the lever."""
    n, k = shape
    if stop_threshold is None:
        threshold = np.zeros(shape)
    else:
        threshold = np.asarray(stop_threshold, dtype=np.float64)
        if threshold.shape not in ((), shape[1:], shape):
            raise ValueError(
                f"stop_threshold must be one number, one per user (shape {shape[1:]}) or one "
                f"per user and environment (shape {shape}); got shape {threshold.shape}"
            )
        threshold = np.broadcast_to(threshold, shape)
        bad = ~((threshold >= 0) & (threshold < 1))
        if bad.any():
            raise ValueError(
                "stop_threshold must be confidences in [0, 1) (0: never stop); got "
                f"{threshold[bad].flat[0]!r}"
            )
    if deadline_s is None:
        deadline = np.full(n, np.inf)
    else:
        deadline = np.asarray(deadline_s, dtype=np.float64)
        if deadline.shape not in ((), (n,)):
            raise ValueError(
                f"deadline_s must be one number or one per environment, shape ({n},); got "
                f"shape {deadline.shape}"
            )
        deadline = np.broadcast_to(deadline, (n,))
        bad = np.isnan(deadline) | (deadline <= 0)
        if bad.any():
            raise ValueError(
                "deadline_s must be > 0 seconds (inf: wait for every draft); got "
                f"{deadline[bad][0]!r}"
            )
    if group is None:
        grp = np.broadcast_to(np.arange(k) % groups, shape)
    else:
        grp = np.asarray(group)
        if grp.ndim == 1 and n == 1:
            grp = grp[None, :]
        if grp.shape != shape or not np.issubdtype(grp.dtype, np.integer):
            raise ValueError(f"group must be integers of shape {shape}")
        if grp.min() < 0 or grp.max() >= groups:
            raise ValueError(f"group must be integers in [0, pipeline_groups={groups})")
    return (
        np.ascontiguousarray(threshold),
        np.ascontiguousarray(deadline),
        np.ascontiguousarray(grp, dtype=np.int64),
    )


TOKEN_COUNTER_BASE = np.uint64(1 << 45)  # counters of per-token draws: above round/episode ones
_POSITIONS_PER_ROUND = np.uint64(512)  # > L_max + 1 (L_max <= 256)


# Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9):
# no transcendental function in the central 95 %, where almost every draw falls
_A = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690,
      -30.66479806614716, 2.506628277459239)  # fmt: skip
_B = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
      -13.28068155288572)  # fmt: skip
_C = (-0.007784894002430293, -0.3223964580411365, -2.400758277161838, -2.549732539343734,
      4.374664141464968, 2.938163982698783)  # fmt: skip
_D = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416)


@kernel
def _normal_quantile(p):
    if p < 0.02425:
        q = np.sqrt(-2.0 * np.log(p))
        num = ((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]
        return num / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0)
    if p > 1.0 - 0.02425:
        q = np.sqrt(-2.0 * np.log1p(-p))
        num = ((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]
        return -num / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0)
    q = p - 0.5
    r = q * q
    num = (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]) * q
    return num / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0)


@kernel
def _token_uniform(key, round_index, position, user, draw):
    """Uniform ``draw`` (0: acceptance normal, 1: confidence noise, 2: accept) of a position."""
    counter = TOKEN_COUNTER_BASE + np.uint64(round_index) * _POSITIONS_PER_ROUND
    return crng.uniform_at(key, counter + np.uint64(position), draw, user)


@kernel
def _token_draw(key, round_index, position, user, logit_mean, logit_std, noise_std):
    """(acceptance logit, confidence logit, accepted?) of one drafted position.

    Two uniforms give the independent normals z (acceptance) and e (confidence noise) by the
    normal quantile; a third decides acceptance: u < sigmoid(l) <=> u (1 + exp(-l)) < 1.
    The round kernel draws the same numbers, but only those it needs."""
    logit = logit_mean + logit_std * _normal_quantile(
        _token_uniform(key, round_index, position, user, 0)
    )
    e = _normal_quantile(_token_uniform(key, round_index, position, user, 1))
    u = _token_uniform(key, round_index, position, user, 2)
    return logit, logit + noise_std * e, u * (1.0 + np.exp(-logit)) < 1.0


def logit_mean_for(alpha: np.ndarray, logit_std: float) -> np.ndarray:
    """m with E[sigmoid(m + s Z)] = alpha, Z ~ N(0, 1) (a cached table, inverted)."""
    grid, means = _mean_table(float(logit_std))
    return np.interp(np.asarray(alpha, dtype=np.float64), means, grid)


@functools.lru_cache(maxsize=8)
def _mean_table(logit_std: float) -> tuple[np.ndarray, np.ndarray]:
    """E[sigmoid(m + s Z)] on a grid of m wide enough for alpha in [1e-3, 1 - 1e-6], by the
    trapezoid rule on a fine z grid (Gauss-Hermite misses the steep sigmoid of a large s)."""
    z = np.linspace(-9.0, 9.0, 3601)
    weights = np.exp(-0.5 * z * z)
    weights /= weights.sum()
    half_width = 16.0 + 9.0 * logit_std
    grid = np.linspace(-half_width, half_width, 4001)
    means = np.empty_like(grid)
    for start in range(0, grid.size, 500):  # in blocks: a 4001 x 3601 matrix is 115 MB
        block = grid[start : start + 500, None] + logit_std * z[None, :]
        means[start : start + 500] = (0.5 * (1.0 + np.tanh(0.5 * block))) @ weights
    return grid, means


@kernel
def play_extended_round(
    caps,
    bandwidth_hz,
    stop_threshold,
    deadline_s,
    group,
    num_groups,
    proactive,
    early_stop,
    streaming,
    keys,
    round_index,
    t_draft_per_token_s,
    spectral_eff,
    payload_bits,
    t_fix_s,
    t_user_s,
    t_token_s,
    values,
    offsets,
    slot_accept,
    log_alpha,
    alpha,
    logit_mean,
    logit_std,
    noise_std,
    max_draft_length,
    predrafted,
    remaining_tokens,
    finite_requests,
    draft_energy_j_per_token,
    tx_power_w,
    drafted,
    verified,
    accepted,
    committed,
    wasted,
    expected_tokens,
    t_draft_s,
    t_upload_s,
    energy_j,
    t_verify_s,
    round_time_s,
    straggler,
    done,
):
    """One round (or pipeline cycle) of the extended protocols in every env; see the module
    docstring. ``predrafted`` is read (tokens each device starts with) and rewritten (tokens
    it will start the next cycle with). Outputs in place; returns whether a request ended."""
    any_done = False
    n_envs, n_users = caps.shape
    finish = np.zeros(n_users)
    match = np.zeros(n_users, dtype=np.bool_)
    used = np.zeros(n_users)
    per_token_u = np.zeros(n_users)
    du = np.zeros(num_groups)
    ver = np.zeros(num_groups)
    g_count = np.zeros(num_groups, dtype=np.int64)
    g_long = np.zeros(num_groups, dtype=np.int64)
    for n in range(n_envs):
        o = offsets[n]
        # ---- drafting and acceptance, per user
        for k in range(n_users):
            cap = caps[n, k]
            if cap <= 0:
                drafted[n, k] = 0
                accepted[n, k] = 0
                match[k] = False
                continue
            if early_stop:
                # the draws of _token_draw, each made only when it matters
                key, t, lam = keys[n], round_index[n], stop_threshold[n, k]
                length, run, ok = cap, 0, True
                match[k] = False
                for i in range(cap + 1):  # position cap is the bonus position (proactive guess)
                    logit = logit_mean[n, k] + logit_std * _normal_quantile(
                        _token_uniform(key, t, i, k, 0)
                    )
                    if 0 < i < cap and lam > -np.inf:
                        e = _normal_quantile(_token_uniform(key, t, i, k, 1))
                        if logit + noise_std * e < lam:
                            length = i  # unsure of token i + 1: stop with i drafted
                    if i >= length and not (ok and num_groups > 1):
                        break  # the guess is only needed for proactive drafting
                    if ok:
                        u = _token_uniform(key, t, i, k, 2)
                        hit = u * (1.0 + np.exp(-logit)) < 1.0
                        if i >= length:
                            match[k] = hit  # whole draft accepted, bonus = drafter's top
                            break
                        if hit:
                            run += 1
                        else:
                            ok = False
                drafted[n, k] = length
                accepted[n, k] = run
            else:
                # P(accepted >= j) = alpha^j: untruncated geometric by inverse CDF, as the
                # synchronous round draws it
                acc = np.floor(np.log(values[n, o, slot_accept, k]) / log_alpha[n, k])
                drafted[n, k] = cap
                accepted[n, k] = np.int64(min(acc, np.float64(cap)))
                match[k] = acc >= cap + 1
        # ---- timing
        slowest, who = 0.0, -1
        for k in range(n_users):
            length = drafted[n, k]
            if length == 0:
                finish[k], used[k] = 0.0, 0.0
                t_draft_s[n, k], t_upload_s[n, k] = 0.0, 0.0
                continue
            d = t_draft_per_token_s[n, k]
            u = payload_bits / max(bandwidth_hz[n, k] * spectral_eff[n, k], 1e-300)
            per_token_u[k] = u
            pre = min(predrafted[n, k], np.float64(length)) if num_groups > 1 else 0.0
            used[k] = pre
            t_draft_s[n, k] = (length - pre) * d
            t_upload_s[n, k] = length * u
            if streaming:
                finish[k] = d + u + (length - 1) * max(d, u)
            else:
                finish[k] = t_draft_s[n, k] + t_upload_s[n, k]
            if who < 0 or finish[k] > slowest:
                slowest, who = finish[k], k
        straggler[n] = who
        # ---- verification
        if num_groups > 1:
            for g in range(num_groups):
                du[g], g_count[g], g_long[g] = 0.0, 0, 0
            for k in range(n_users):
                if drafted[n, k] > 0:
                    g = group[n, k]
                    du[g] = max(du[g], finish[k])
                    g_count[g] += 1
                    g_long[g] = max(g_long[g], drafted[n, k])
            busy, cycle = 0.0, 0.0
            for g in range(num_groups):
                ver[g] = padded_latency_s(g_count[g], g_long[g], t_fix_s, t_user_s, t_token_s)
                busy += ver[g]
            for g in range(num_groups):
                cycle += max(du[g], ver[(g - 1) % num_groups])
            t_verify_s[n] = busy
            round_time_s[n] = cycle
            for k in range(n_users):
                verified[n, k] = drafted[n, k]
        else:
            t_stop = slowest
            if streaming:
                t_stop = min(deadline_s[n], slowest)
            count, longest = 0, 0
            for k in range(n_users):
                length = drafted[n, k]
                got = length
                if streaming and length > 0 and finish[k] > t_stop:
                    d = t_draft_per_token_s[n, k]
                    u = per_token_u[k]
                    got = 0
                    if t_stop >= d + u:
                        # the same float expression as t_{k,i}, so a token that arrives
                        # exactly at the deadline counts
                        got = 1 + np.int64(np.floor((t_stop - d - u) / max(d, u)))
                        while got < length and d + u + got * max(d, u) <= t_stop:
                            got += 1
                        while got > 0 and d + u + (got - 1) * max(d, u) > t_stop:
                            got -= 1
                    got = min(got, length)
                verified[n, k] = got
                if got > 0:
                    count += 1
                    longest = max(longest, got)
            t_verify_s[n] = padded_latency_s(count, longest, t_fix_s, t_user_s, t_token_s)
            round_time_s[n] = t_stop + t_verify_s[n]
        # ---- commit, proactive drafting, energy
        for k in range(n_users):
            length, got = drafted[n, k], verified[n, k]
            acc = min(accepted[n, k], got)
            kept = acc + (1 if got > 0 else 0)
            if finite_requests:
                kept = np.int64(min(np.float64(kept), remaining_tokens[n, k]))
                remaining_tokens[n, k] -= kept
                done[n, k] = remaining_tokens[n, k] <= 0
                any_done = any_done or done[n, k]
            accepted[n, k] = acc
            committed[n, k] = kept
            expected_tokens[n, k] = (
                -np.expm1((got + 1.0) * log_alpha[n, k]) / (1.0 - alpha[n, k]) if got > 0 else 0.0
            )
            d = t_draft_per_token_s[n, k]
            u = per_token_u[k] if length > 0 else 0.0
            made = np.float64(length) - used[k]
            if streaming and length > 0:  # drafting stops at the deadline too
                t_stop = round_time_s[n] - t_verify_s[n]
                made = max(min(made, np.floor(t_stop / d)), np.float64(got))
            waste = made + used[k] - acc
            carry = 0.0
            if num_groups > 1 and proactive and length > 0 and not done[n, k]:
                g = group[n, k]
                # waiting from the end of its own phase to the start of its next one
                window = round_time_s[n] - max(du[g], ver[(g - 1) % num_groups])
                if match[k]:
                    carry = np.floor(window / d)
                else:
                    carry = np.floor((window - ver[g]) / d)
                    waste += np.floor(ver[g] / d)  # the guess drafted these in vain
                    made += np.floor(ver[g] / d)
                carry = min(carry, np.float64(max_draft_length))
                made += carry
            if num_groups > 1:
                # tokens made ahead but beyond this cycle's draft are lost with it
                waste += max(predrafted[n, k] - used[k], 0.0)
            predrafted[n, k] = carry
            wasted[n, k] = np.int64(max(waste, 0.0))
            energy_j[n, k] = made * draft_energy_j_per_token + tx_power_w * got * u
    return any_done
