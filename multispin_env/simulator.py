"""One synchronous Multi-SPIN round, vectorised over N independent deployments.

The simulator is RL-agnostic: it knows users, channels, drafting, uploading, batched
verification and acceptance, and nothing about observations or rewards. State lives in
``(N, K)`` numpy arrays (N deployments x K users); N = 1 is one deployment.

Round t, for every deployment (paper §III-A):
  1. the server sees each user's channel estimate for round t (``gain_estimate``);
  2. a policy picks (L_k, B_k) -> :meth:`MultiSpinSimulator.step`;
  3. users draft (L_k T^S_k) and upload (L_k Q_tok / (B_k r_k)) with the *true* channel;
  4. the server waits for the straggler, verifies the batch (verification model);
  5. user k keeps min(Geom, L_k) accepted tokens + 1 corrected/bonus token;
  6. finished requests are replaced, fading and CSI for round t+1 are drawn.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaincinv

from multispin_env import rng as crng
from multispin_env._jit import kernel
from multispin_env.config import ScenarioConfig
from multispin_env.protocols import logit_mean_for, play_extended_round, resolve_levers
from multispin_env.types import RoundResult
from multispin_env.verification import padded_batch_latency_s

_EPISODE_COUNTER = np.uint64(1 << 40)  # counter slot for per-episode draws, above any round
_ALPHA_CLIP = (1e-3, 1.0 - 1e-6)
_ROUND_STREAMS = np.array(
    [
        crng.STREAM_FADING_MAG,
        crng.STREAM_FADING_PHASE,
        crng.STREAM_ACCEPT,
        crng.STREAM_CSI_MAG,
        crng.STREAM_CSI_PHASE,
        crng.STREAM_REQUEST_LEN,
        crng.STREAM_REQUEST_ALPHA,
        crng.STREAM_REQUEST_TASK,
    ]
)


class MultiSpinSimulator:
    """Vectorised Multi-SPIN system model.

    Args:
        config: a validated :class:`ScenarioConfig`.
        num_envs: number of independent deployments N simulated side by side.

    Public state after :meth:`reset` (all ``(N, K)`` unless noted):
        mean_gain: H_bar_k. t_draft_s: T^S_k. task: task index per user.
        alpha: the current request's true acceptance rate (hidden from a realistic policy).
        task_alpha_mean: the offline task-mean estimate a server could know.
        gain, gain_estimate: true channel gain of the coming round and the server's estimate.
        spectral_eff, spectral_eff_estimate: the matching r_k = log2(1 + p H / N0).
        remaining_tokens: tokens left in each user's request (inf for endless requests).
        round_index: ``(N,)`` rounds played since reset.
    """

    def __init__(self, config: ScenarioConfig, num_envs: int = 1) -> None:
        if not isinstance(config, ScenarioConfig):
            raise TypeError(f"config must be a ScenarioConfig, got {type(config).__name__}")
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} must be an integer >= 1")
        self.config = config
        self.num_envs = int(num_envs)
        self.num_users = config.num_users
        self.payload_bits = float(config.payload_bits)
        self.verification = config.verification_model
        tasks = config.tasks
        self._task_alpha = np.array([t.alpha_mean for t in tasks])
        weights = np.array([t.weight for t in tasks], dtype=np.float64)
        self._task_cdf = np.cumsum(weights / weights.sum())
        self._task_cdf[-1] = 1.0
        if config.per_request_acceptance:
            ab = np.array([t.beta_params for t in tasks])
            self._task_beta_a, self._task_beta_b = ab[:, 0], ab[:, 1]
        shape = (self.num_envs, self.num_users)
        self.keys = np.zeros(self.num_envs, dtype=np.uint64)
        self.round_index = np.zeros(self.num_envs, dtype=np.int64)
        self.mean_gain = np.zeros(shape)
        self.t_draft_s = np.zeros(shape)
        self.task = np.zeros(shape, dtype=np.int64)
        self.alpha = np.zeros(shape)
        self._log_alpha = np.zeros(shape)
        # the position-dependent acceptance model (empty: i.i.d., the kernel's closed form)
        self._log_position_factors = np.log(
            np.asarray(config.acceptance_position_factors, dtype=np.float64)
        )
        self._finite_requests = config.request_length_tokens > 0
        self.task_alpha_mean = np.zeros(shape)
        self.gain = np.zeros(shape)
        self.gain_estimate = np.zeros(shape)
        self.spectral_eff = np.zeros(shape)
        self.spectral_eff_estimate = np.zeros(shape)
        self.remaining_tokens = np.full(shape, np.inf)
        # extended protocols (multispin_env.protocols); unused by the synchronous round
        self.token_logit_mean = np.zeros(shape)
        self.predrafted = np.zeros(shape)
        round_streams = (crng.STREAM_ACCEPT, crng.STREAM_FADING_MAG)
        if config.csi_error_std > 0:
            round_streams += (crng.STREAM_FADING_PHASE, crng.STREAM_CSI_MAG, crng.STREAM_CSI_PHASE)
        self._round_uniforms = crng.RoundUniforms(self.num_envs, self.num_users, round_streams)
        self._all_rows = np.arange(self.num_envs)
        self._verification_coefficients = tuple(float(c) for c in self.verification.coefficients)
        # constant kernel arguments, looked up once instead of every round
        ru = self._round_uniforms
        self._accept_slot = ru.slot(crng.STREAM_ACCEPT)
        self._channel_params = (
            ru.slot(crng.STREAM_FADING_MAG),
            ru.slot(crng.STREAM_FADING_PHASE),
            ru.slot(crng.STREAM_CSI_MAG),
            ru.slot(crng.STREAM_CSI_PHASE),
            bool(config.rayleigh_fading),
            float(config.csi_error_std),
            float(config.tx_power_w),
            float(config.noise_power_w),
        )
        self._has_reset = False

    # ------------------------------------------------------------------ reset
    def reset(
        self,
        keys: np.ndarray | None = None,
        *,
        rng: np.random.Generator | None = None,
        env_ids: np.ndarray | None = None,
    ) -> None:
        """Draw a new realization (devices, tasks, first channel) for some or all envs.

        Give either ``keys`` (uint64, one per reset env) or ``rng`` (keys are drawn from it).
        ``env_ids`` selects which envs to reset (default: all).
        """
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64)
        if keys is None:
            if rng is None:
                raise ValueError("reset needs keys or a numpy.random.Generator (rng=...)")
            keys = crng.new_keys(rng, len(ids))
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        if keys.shape != ids.shape:
            raise ValueError(f"reset got {keys.size} keys for {ids.size} environments")
        cfg, k = self.config, self.num_users
        self.keys[ids] = keys
        self.round_index[ids] = 0
        self.predrafted[ids] = 0.0
        self._round_uniforms.rekey(keys, ids)
        epi = np.full(len(ids), _EPISODE_COUNTER, dtype=np.uint64)
        u_gain = crng.uniforms(keys, epi, 0, k)
        u_draft = crng.uniforms(keys, epi, 1, k)
        self.mean_gain[ids] = cfg.mean_gain_low + (cfg.mean_gain_high - cfg.mean_gain_low) * u_gain
        self.t_draft_s[ids] = cfg.t_draft_mean_s * (
            1.0 - cfg.t_draft_spread + 2.0 * cfg.t_draft_spread * u_draft
        )
        all_users = np.ones((len(ids), k), dtype=bool)
        self._start_requests(ids, epi, all_users)
        self._draw_channels(ids)
        self._has_reset = True

    def _start_requests(self, ids: np.ndarray, counters: np.ndarray, mask: np.ndarray) -> None:
        """New requests for users in ``mask`` (rows = ``ids``): task, alpha, length."""
        cfg, k = self.config, self.num_users
        if not mask.any():
            return
        keys = self.keys[ids]

        def draws(stream):  # only the users starting a request (Beta quantiles are costly)
            return crng.uniforms(keys, counters, stream, k)[mask]

        task = np.searchsorted(self._task_cdf, draws(crng.STREAM_REQUEST_TASK), side="right")
        task = task.clip(0, len(self._task_cdf) - 1)
        alpha_mean = self._task_alpha[task]
        if cfg.per_request_acceptance:
            u_alpha = draws(crng.STREAM_REQUEST_ALPHA)
            alpha = betaincinv(self._task_beta_a[task], self._task_beta_b[task], u_alpha)
            alpha = np.clip(alpha, *_ALPHA_CLIP)
        else:
            alpha = alpha_mean
        if cfg.request_length_tokens > 0:
            length = _geometric_length(draws(crng.STREAM_REQUEST_LEN), cfg.request_length_tokens)
        else:
            length = np.inf
        sel_r = np.broadcast_to(ids[:, None], mask.shape)[mask]
        sel_c = np.broadcast_to(np.arange(k), mask.shape)[mask]
        self.task[sel_r, sel_c] = task
        self.task_alpha_mean[sel_r, sel_c] = alpha_mean
        self.alpha[sel_r, sel_c] = alpha
        self._log_alpha[sel_r, sel_c] = np.log(alpha)
        if cfg.early_stop:
            self.token_logit_mean[sel_r, sel_c] = logit_mean_for(alpha, cfg.token_logit_std)
        self.remaining_tokens[sel_r, sel_c] = length

    def _draw_channels(self, ids: np.ndarray | None = None) -> None:
        """True gain and server estimate for the coming round of envs ``ids`` (None = all)."""
        ru = self._round_uniforms
        rows = self._all_rows if ids is None else np.asarray(ids, dtype=np.int64)
        offsets = ru.offsets(self.round_index[rows], None if ids is None else rows)
        _draw_channels_kernel(
            rows,
            ru.values,
            offsets,
            *self._channel_params,
            self.mean_gain,
            self.gain,
            self.gain_estimate,
            self.spectral_eff,
            self.spectral_eff_estimate,
        )

    # ------------------------------------------------------------------ step
    def validate_allocation(
        self, draft_lengths: np.ndarray, bandwidth_hz: np.ndarray, group: np.ndarray | None = None
    ) -> None:
        """Raise ValueError naming the problem if an allocation is infeasible. With pipelined
        groups (``group`` given) each group's bandwidth sums to at most the budget."""
        shape = (self.num_envs, self.num_users)
        if draft_lengths.shape != shape or bandwidth_hz.shape != shape:
            raise ValueError(
                f"allocation arrays must have shape (num_envs, num_users)={shape}; got "
                f"draft_lengths {draft_lengths.shape}, bandwidth_hz {bandwidth_hz.shape}"
            )
        l_max = self.config.max_draft_length
        if draft_lengths.min() < 0 or draft_lengths.max() > l_max:
            raise ValueError(f"draft_lengths must be integers in [0, max_draft_length={l_max}]")
        if not np.all(np.isfinite(bandwidth_hz)) or bandwidth_hz.min() < 0:
            raise ValueError("bandwidth_hz must be finite and >= 0")
        if group is None:
            total = bandwidth_hz.sum(axis=-1)
        else:
            groups = self.config.pipeline_groups
            total = np.stack(
                [np.where(group == g, bandwidth_hz, 0.0).sum(axis=-1) for g in range(groups)]
            )
        if np.any(total > self.config.bandwidth_hz * (1 + 1e-6)):
            worst = float(total.max())
            raise ValueError(
                f"bandwidth_hz sums to {worst:.6g} Hz"
                + ("" if group is None else " in a pipeline group")
                + ", above the budget "
                f"bandwidth_hz={self.config.bandwidth_hz:.6g} Hz"
            )
        if np.any((draft_lengths > 0) & (bandwidth_hz <= 0)):
            raise ValueError("a user with draft length > 0 needs bandwidth_hz > 0 to upload")
        if np.any((draft_lengths > 0).sum(axis=-1) == 0):
            raise ValueError("every environment needs at least one user with draft length >= 1")

    def step(
        self,
        draft_lengths,
        bandwidth_hz,
        validate: bool = True,
        *,
        stop_threshold=None,
        deadline_s=None,
        group=None,
    ) -> RoundResult:
        """Play one round in every env. Arrays are ``(N, K)`` (or ``(K,)`` when N = 1).

        The extended protocols take their extra decisions here (only when the scenario
        switches them on; see :mod:`multispin_env.protocols`): ``stop_threshold`` ``(N, K)``
        confidence thresholds in [0, 1) (early stop; default 0, never stop early; the
        lengths are then caps), ``deadline_s`` ``(N,)`` seconds after the round starts
        (deadline verification; default inf, wait for every draft), ``group`` ``(N, K)``
        integers in [0, G) (pipelined groups; default user index mod G).
        """
        if not self._has_reset:
            raise RuntimeError("call reset() before step()")
        if self.config.extended_protocol:
            return self._step_extended(
                draft_lengths, bandwidth_hz, validate, stop_threshold, deadline_s, group
            )
        for name, value in (
            ("stop_threshold", stop_threshold),
            ("deadline_s", deadline_s),
            ("group", group),
        ):
            if value is not None:
                raise ValueError(
                    f"{name} is a decision of an extended protocol, but scenario "
                    f"{self.config.name!r} plays the synchronous round; set "
                    f"{_SWITCH_OF[name]} in its config"
                )
        n, k = self.num_envs, self.num_users
        lengths, bw = self._batched(draft_lengths, bandwidth_hz)
        if validate:
            self.validate_allocation(lengths, bw)
        cfg = self.config
        shape = (n, k)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        bw = np.ascontiguousarray(bw)
        accepted = np.empty(shape, dtype=np.int64)
        committed = np.empty(shape, dtype=np.int64)
        exp_tokens, t_draft, t_upload, energy = (np.empty(shape) for _ in range(4))
        t_ver, round_time = np.empty(n), np.empty(n)
        straggler = np.empty(n, dtype=np.int64)
        done = np.zeros(shape, dtype=bool)
        ru = self._round_uniforms
        any_done = _play_round_kernel(
            lengths,
            bw,
            self.t_draft_s,
            self.spectral_eff,
            self.payload_bits,
            *self._verification_coefficients,
            ru.values,
            ru.offsets(self.round_index),
            self._accept_slot,
            self._log_alpha,
            self.alpha,
            self._log_position_factors,
            self.remaining_tokens,
            self._finite_requests,
            float(cfg.draft_energy_j_per_token),
            float(cfg.tx_power_w),
            accepted,
            committed,
            exp_tokens,
            t_draft,
            t_upload,
            energy,
            t_ver,
            round_time,
            straggler,
            done,
        )
        result = RoundResult(
            drafted=lengths,
            accepted=accepted,
            committed=committed,
            expected_tokens=exp_tokens,
            t_draft_s=t_draft,
            t_upload_s=t_upload,
            t_verify_s=t_ver,
            round_time_s=round_time,
            straggler=straggler,
            energy_j=energy,
            request_done=done,
        )
        self._advance(done, any_done)
        return result

    def _batched(self, draft_lengths, bandwidth_hz) -> tuple[np.ndarray, np.ndarray]:
        """Lengths and bandwidth as ``(N, K)`` arrays (a ``(K,)`` pair when N = 1), lengths
        integer (whole-number floats accepted)."""
        lengths = np.asarray(draft_lengths)
        bw = np.asarray(bandwidth_hz, dtype=np.float64)
        if lengths.ndim == 1 and self.num_envs == 1:
            lengths, bw = lengths[None, :], bw[None, :]
        if not np.issubdtype(lengths.dtype, np.integer):
            rounded = np.round(lengths)
            if np.any(rounded != lengths):
                raise ValueError("draft_lengths must be whole numbers of tokens")
            lengths = rounded.astype(np.int64)
        return lengths, bw

    def _advance(self, done: np.ndarray, any_done: bool) -> None:
        """After a round: the round counter, new requests where one ended, next channels."""
        self.round_index += 1
        if any_done:
            rows = np.flatnonzero(done.any(axis=-1))
            self._start_requests(rows, self.round_index[rows].astype(np.uint64), done[rows])
        self._draw_channels()

    # ------------------------------------------------------------------ extended protocols
    def _step_extended(
        self, draft_lengths, bandwidth_hz, validate, stop_threshold, deadline_s, group
    ):
        cfg = self.config
        n, k = self.num_envs, self.num_users
        shape = (n, k)
        lengths, bw = self._batched(draft_lengths, bandwidth_hz)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        groups = cfg.pipeline_groups
        for name, value, on in (
            ("stop_threshold", stop_threshold, cfg.early_stop),
            ("deadline_s", deadline_s, cfg.streaming_deadline),
            ("group", group, groups > 1),
        ):
            if value is not None and not on:
                raise ValueError(
                    f"{name} is given, but scenario {cfg.name!r} has that protocol switched "
                    f"off (protocol: {cfg.protocol_name}); set {_SWITCH_OF[name]} in its config "
                    f"or leave {name} out"
                )
        threshold, deadline, grp = resolve_levers(shape, groups, stop_threshold, deadline_s, group)
        with np.errstate(divide="ignore"):
            stop_logit = np.ascontiguousarray(np.log(threshold) - np.log1p(-threshold))
        if validate:
            self.validate_allocation(lengths, bw, grp if groups > 1 else None)
        bw = np.ascontiguousarray(bw)
        drafted, verified, accepted, committed, wasted = (
            np.empty(shape, dtype=np.int64) for _ in range(5)
        )
        exp_tokens, t_draft, t_upload, energy = (np.empty(shape) for _ in range(4))
        t_ver, round_time = np.empty(n), np.empty(n)
        straggler = np.empty(n, dtype=np.int64)
        done = np.zeros(shape, dtype=bool)
        ru = self._round_uniforms
        any_done = play_extended_round(
            lengths,
            bw,
            stop_logit,
            deadline,
            grp,
            groups,
            bool(cfg.proactive_drafting),
            bool(cfg.early_stop),
            bool(cfg.streaming_deadline),
            self.keys,
            self.round_index,
            self.t_draft_s,
            self.spectral_eff,
            self.payload_bits,
            *self._verification_coefficients,
            ru.values,
            ru.offsets(self.round_index),
            self._accept_slot,
            self._log_alpha,
            self.alpha,
            self.token_logit_mean,
            float(cfg.token_logit_std),
            float(cfg.confidence_noise_std),
            int(cfg.max_draft_length),
            self.predrafted,
            self.remaining_tokens,
            self._finite_requests,
            float(cfg.draft_energy_j_per_token),
            float(cfg.tx_power_w),
            drafted,
            verified,
            accepted,
            committed,
            wasted,
            exp_tokens,
            t_draft,
            t_upload,
            energy,
            t_ver,
            round_time,
            straggler,
            done,
        )
        result = RoundResult(
            drafted=drafted,
            accepted=accepted,
            committed=committed,
            expected_tokens=exp_tokens,
            t_draft_s=t_draft,
            t_upload_s=t_upload,
            t_verify_s=t_ver,
            round_time_s=round_time,
            straggler=straggler,
            energy_j=energy,
            request_done=done,
            verified=verified,
            wasted=wasted,
        )
        self._advance(done, any_done)
        return result


_SWITCH_OF = {
    "stop_threshold": "early_stop=True",
    "deadline_s": "streaming_deadline=True",
    "group": "pipeline_groups=2 (or more)",
}


def _geometric_length(u: np.ndarray, mean_tokens: float) -> np.ndarray:
    """Request length >= 1 with the given mean (geometric on {1, 2, ...})."""
    if mean_tokens <= 1.0:
        return np.ones_like(u)
    p_stop = 1.0 / mean_tokens
    return 1.0 + np.floor(np.log(u) / np.log1p(-p_stop))


@kernel
def _draw_channels_kernel(
    rows,
    values,
    offsets,
    slot_mag,
    slot_phase,
    slot_err_mag,
    slot_err_phase,
    rayleigh,
    csi_error_std,
    tx_power_w,
    noise_power_w,
    mean_gain,
    gain,
    gain_estimate,
    spectral_eff,
    spectral_eff_estimate,
):
    """Fading and CSI of the coming round for envs ``rows`` (written in place).

    |h|^2 / H_bar ~ Exp(1) (Rayleigh) by inverse CDF; the estimate is |h + e|^2 with
    e ~ CN(0, csi_error_std^2 H_bar); r = log2(1 + p H / N0) (Eq. 8) for both.
    """
    for i in range(rows.shape[0]):
        n, o = rows[i], offsets[i]
        for k in range(mean_gain.shape[1]):
            h_bar = mean_gain[n, k]
            power = -np.log(values[n, o, slot_mag, k]) if rayleigh else 1.0
            g = h_bar * power
            estimate = g
            if csi_error_std > 0:
                # |h + e|^2 = |h|^2 + |e|^2 + 2 |h| |e| cos(phase_h - phase_e): one cosine
                # instead of two complex exponentials
                e2 = csi_error_std**2 * (-h_bar * np.log(values[n, o, slot_err_mag, k]))
                dphase = values[n, o, slot_phase, k] - values[n, o, slot_err_phase, k]
                cross = 2.0 * np.sqrt(g * e2) * np.cos(2.0 * np.pi * dphase)
                estimate = max(g + e2 + cross, 0.0)
            gain[n, k] = g
            gain_estimate[n, k] = estimate
            r = np.log2(1.0 + tx_power_w * g / noise_power_w)
            spectral_eff[n, k] = r
            if csi_error_std > 0:
                r = np.log2(1.0 + tx_power_w * estimate / noise_power_w)
            spectral_eff_estimate[n, k] = r


_LOG_MAX_ACCEPT = float(np.log(0.999))  # a conditional acceptance probability stays below 1


@kernel
def _play_round_kernel(
    lengths,
    bandwidth_hz,
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
    log_factors,
    remaining_tokens,
    finite_requests,
    draft_energy_j_per_token,
    tx_power_w,
    accepted,
    committed,
    expected_tokens,
    t_draft_s,
    t_upload_s,
    energy_j,
    t_verify_s,
    round_time_s,
    straggler,
    done,
):
    """One round in every env; see the module docstring for the steps. Outputs in place;
    returns whether any request finished."""
    any_done = False
    padded_batch_latency_s(lengths, t_fix_s, t_user_s, t_token_s, t_verify_s)
    for n in range(lengths.shape[0]):
        o = offsets[n]
        slowest, who = 0.0, -1
        for k in range(lengths.shape[1]):
            lf = np.float64(lengths[n, k])
            active = lengths[n, k] > 0
            t_d = lf * t_draft_per_token_s[n, k]
            # idle users have L = 0 and so no upload time; validated active users have B_k > 0
            t_u = lf * (payload_bits / max(bandwidth_hz[n, k] * spectral_eff[n, k], 1e-300))
            finish = t_d + t_u
            if active and (who < 0 or finish > slowest):
                slowest, who = finish, k
            if log_factors.shape[0] == 0:
                # P(accepted >= j) = alpha^j: a truncated geometric via inverse CDF
                acc = np.floor(np.log(values[n, o, slot_accept, k]) / log_alpha[n, k])
                acc_tokens = np.int64(min(acc, lf))
            else:
                # P(accepted >= j) = prod_{i <= j} a_i, a_i = min(alpha c_i, 0.999): the same
                # uniform by inverse CDF (count the j whose survival is above it)
                log_u = np.log(values[n, o, slot_accept, k])
                survival, acc_tokens, expected = 0.0, np.int64(0), 1.0
                for j in range(lengths[n, k]):
                    c = log_factors[min(j, log_factors.shape[0] - 1)]
                    survival += min(log_alpha[n, k] + c, _LOG_MAX_ACCEPT)
                    expected += np.exp(survival)
                    if log_u < survival:
                        acc_tokens += 1
            kept = acc_tokens + (1 if active else 0)
            if finite_requests:
                kept = np.int64(min(np.float64(kept), remaining_tokens[n, k]))
                remaining_tokens[n, k] -= kept
                done[n, k] = remaining_tokens[n, k] <= 0
                any_done = any_done or done[n, k]
            # Eq. (12) with 1 - alpha^(L+1) = -expm1((L+1) ln alpha): ln alpha is cached, and
            # expm1 keeps precision for alpha near 1 (alpha < 1 always: task means are
            # validated, Beta draws clipped)
            if log_factors.shape[0] == 0:
                expected_tokens[n, k] = (
                    -np.expm1((lf + 1.0) * log_alpha[n, k]) / (1.0 - alpha[n, k]) if active else 0.0
                )
            else:
                expected_tokens[n, k] = expected if active else 0.0
            accepted[n, k] = acc_tokens
            committed[n, k] = kept
            t_draft_s[n, k] = t_d
            t_upload_s[n, k] = t_u
            energy_j[n, k] = lf * draft_energy_j_per_token + tx_power_w * t_u
        straggler[n] = who
        round_time_s[n] = slowest + t_verify_s[n]
    return any_done
