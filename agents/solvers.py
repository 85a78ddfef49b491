"""The Multi-SPIN paper's draft-control algorithms, as plain functions on per-user arrays.

Every solver takes the same instance description

    alpha            (K,) per-token acceptance rate the solver believes
    t_draft_s        (K,) per-token drafting latency T^S_k
    spectral_eff     (K,) r_k = log2(1 + p_k H_k / N0) in bit/s/Hz
    payload_bits     Q_tok, bits uploaded per drafted token
    bandwidth_hz     total uplink bandwidth B
    t_ver_s          batched verification latency T^ver of a K-user batch
    max_draft_length L_max

and returns an :class:`~multispin_env.types.Allocation` (integer draft lengths, bandwidth in
Hz, and the goodput its model predicts, Eq. 13). Section and equation numbers are the paper's
(arXiv 2606.04581); see docs/paper-model.md.
"""

from __future__ import annotations

import itertools

import numpy as np

from multispin_agents.lambertw import lambertw0_from_log, lambertw_minus1
from multispin_env.allocation import equalising_latency, latency_equalising_bandwidth
from multispin_env.physics import expected_tokens
from multispin_env.types import Allocation


def _as_instance(alpha, t_draft_s, spectral_eff):
    alpha = np.asarray(alpha, dtype=np.float64)
    t_draft = np.asarray(t_draft_s, dtype=np.float64)
    r = np.asarray(spectral_eff, dtype=np.float64)
    if not (alpha.shape == t_draft.shape == r.shape) or alpha.ndim != 1:
        raise ValueError(
            f"alpha, t_draft_s and spectral_eff must be 1-D arrays of equal length; got "
            f"{alpha.shape}, {t_draft.shape}, {r.shape}"
        )
    if np.any((alpha <= 0) | (alpha >= 1)):
        raise ValueError("alpha must lie in (0, 1) for every user")
    if np.any(t_draft < 0) or np.any(r <= 0):
        raise ValueError("t_draft_s must be >= 0 and spectral_eff > 0 for every user")
    return alpha, t_draft, r


def _goodput_equalised(alpha, t_draft, r, payload_bits, bandwidth_hz, t_ver_s, lengths):
    """Goodput (Eq. 33) of draft-length vectors ``lengths`` (..., K) with Lemma 3 bandwidth."""
    lengths = np.asarray(lengths, dtype=np.float64)
    phi = equalising_latency(payload_bits * lengths / r, lengths * t_draft, bandwidth_hz)
    return expected_tokens(alpha, lengths).sum(axis=-1) / (phi + t_ver_s)


def _allocation(lengths, bandwidth, goodput) -> Allocation:
    return Allocation(
        np.asarray(lengths, dtype=np.int64), np.asarray(bandwidth, dtype=np.float64), float(goodput)
    )


def evaluate_goodput(
    alpha, t_draft_s, spectral_eff, payload_bits, draft_lengths, bandwidth_hz, t_ver_s
) -> float:
    """Eq. (27): model goodput of a given (L, B) decision."""
    lengths = np.asarray(draft_lengths, dtype=np.float64)
    per_token = np.asarray(t_draft_s) + payload_bits / (np.asarray(bandwidth_hz) * spectral_eff)
    t_ma = float((lengths * per_token).max())
    return float(expected_tokens(alpha, lengths).sum() / (t_ma + t_ver_s))


# ---------------------------------------------------------------------------- baselines
def fixed_bw_and_length(
    alpha,
    t_draft_s,
    spectral_eff,
    payload_bits,
    bandwidth_hz,
    t_ver_s,
    max_draft_length,
    draft_length: int = 8,
) -> Allocation:
    """Fixed BW&L (§VI-A-4): L_k = 8 and B_k = B/K for every user."""
    alpha, t_draft, r = _as_instance(alpha, t_draft_s, spectral_eff)
    k = alpha.size
    lengths = np.full(k, min(draft_length, max_draft_length), dtype=np.int64)
    bandwidth = np.full(k, bandwidth_hz / k)
    goodput = evaluate_goodput(alpha, t_draft, r, payload_bits, lengths, bandwidth, t_ver_s)
    return _allocation(lengths, bandwidth, goodput)


def uni_bw_multispin(
    alpha, t_draft_s, spectral_eff, payload_bits, bandwidth_hz, t_ver_s, max_draft_length
) -> Allocation:
    """Uni-BW Multi-SPIN: per-user draft lengths with equal bandwidth B/K.

    The paper solves (P2.1a) by relaxation and rounding; we solve it exactly. With equal
    bandwidth each user's per-token time c_k = T^S_k + Q K / (B r_k) is fixed, so for any
    straggler latency phi the best lengths are L_k = min(L_max, floor(phi / c_k)) (E[N|L]
    grows with L). The optimum is at one of the K * L_max values phi = L c_k; all are scored.
    """
    alpha, t_draft, r = _as_instance(alpha, t_draft_s, spectral_eff)
    k = alpha.size
    per_token = t_draft + payload_bits * k / (bandwidth_hz * r)
    candidates = (np.arange(1, max_draft_length + 1)[:, None] * per_token[None, :]).ravel()
    candidates = candidates[candidates >= per_token.max() * (1 - 1e-12)]
    lengths = np.minimum(
        np.floor(candidates[:, None] / per_token[None, :] + 1e-9), max_draft_length
    )
    t_ma = (lengths * per_token).max(axis=1)
    goodput = expected_tokens(alpha, lengths).sum(axis=1) / (t_ma + t_ver_s)
    best = int(np.argmax(goodput))
    return _allocation(lengths[best], np.full(k, bandwidth_hz / k), goodput[best])


def homo_optimal_length(
    alpha: float, theta_s: float, t_ver_s: float, max_draft_length: int
) -> tuple[float, int]:
    """Theorem 1: relaxed optimum L~* (Eq. 23, Lambert W_-1) and the integer L* (Eq. 24).

    For a common acceptance rate alpha, per-token multi-access latency theta* and
    verification latency T^ver. Returns (L~*, L*); L~* = 1 when the optimum is at the
    boundary (T^ver / theta* <= (1 - alpha) / (alpha |ln alpha|)).
    """
    t = t_ver_s / theta_s
    ln_a = np.log(alpha)
    if t > (1.0 - alpha) / (alpha * abs(ln_a)):
        w = lambertw_minus1(-(alpha ** (t - 1.0)) / np.e)
        relaxed = -np.log(-w) / ln_a - 1.0
    else:
        relaxed = 1.0
    options = np.unique(np.clip([np.floor(relaxed), np.ceil(relaxed)], 1, max_draft_length))
    tau = (1 - alpha ** (options + 1)) / ((options * theta_s + t_ver_s) * (1 - alpha))
    return float(relaxed), int(options[int(np.argmax(tau))])


def homo_multispin(
    alpha, t_draft_s, spectral_eff, payload_bits, bandwidth_hz, t_ver_s, max_draft_length
) -> Allocation:
    """Homo-Multi-SPIN (§IV): common L by exhaustive search, bandwidth from Lemma 1.

    Lemma 1 equalises the per-token draft+upload latency theta* = T^S_k + Q/(B_k r_k); the
    common L then maximises sum_k E[N_k|L] / (L theta* + T^ver). With a common alpha this L
    equals Theorem 1's closed form (see :func:`homo_optimal_length`).
    """
    alpha, t_draft, r = _as_instance(alpha, t_draft_s, spectral_eff)
    bandwidth, theta = latency_equalising_bandwidth(
        np.ones_like(alpha), t_draft, r, payload_bits, bandwidth_hz
    )
    lengths = np.arange(1, max_draft_length + 1, dtype=np.float64)
    tokens = expected_tokens(alpha[None, :], lengths[:, None]).sum(axis=1)
    goodput = tokens / (lengths * theta + t_ver_s)
    best = int(np.argmax(goodput))
    return _allocation(np.full(alpha.size, best + 1), bandwidth, goodput[best])


def hete_multispin(
    alpha,
    t_draft_s,
    spectral_eff,
    payload_bits,
    bandwidth_hz,
    t_ver_s,
    max_draft_length,
    grid_phi: int = 24,
    grid_lambda: int = 24,
    polish: bool = True,
) -> Allocation:
    """Hete-Multi-SPIN (§V): Algorithm 1's (phi, lambda) grid search over Proposition 1.

    For each grid pair, Eq. (37) gives continuous lengths through Lambert W0, rounded and
    clipped to [1, L_max]; Lemma 3's root phi^ prices them (Eq. 33) and the best is kept;
    bandwidth follows from Eq. (39). Search ranges follow Appendix G (phi between the
    one-token and L_max-token straggler latencies; lambda log-spaced up to the value that
    drives every user to L = 1).

    ``polish`` (our addition) then runs an exact integer local search: +-1 on any user's
    length, repriced with Lemma 3, until no move helps. It removes the rounding loss of
    Eq. (37); ``eval.bench_solvers`` reports both variants against brute force.
    """
    alpha, t_draft, r = _as_instance(alpha, t_draft_s, spectral_eff)
    k = alpha.size
    q = float(payload_bits)
    phi_lo = float(np.max(t_draft + q / (bandwidth_hz * r)))
    phi_hi = float(np.max(max_draft_length * (t_draft + k * q / (bandwidth_hz * r))))
    phis = np.geomspace(phi_lo, max(phi_hi, phi_lo * 1.0001), grid_phi)[:, None, None]
    ln_a = np.log(alpha)
    # lambda at which a user's KKT condition (Prop. 1) holds at L = 1: the grid's top.
    lam_top = (
        r * np.maximum(phis - t_draft, 1e-12) ** 2 / (q * phis) * (-ln_a) / (1 - alpha) * alpha**2
    ).max(axis=-1, keepdims=True)
    lam = lam_top * np.geomspace(1e-5, 1.0, grid_lambda)[None, :, None]
    log_z = (
        (-phis / (2 * t_draft)) * ln_a
        - np.log(2 * t_draft)
        + 0.5
        * (
            np.log(lam)
            + np.log(q)
            + np.log(phis)
            + np.log(-ln_a)
            + np.log1p(-alpha)
            - np.log(r)
            - np.log(alpha)
        )
    )
    relaxed = phis / t_draft + 2.0 / ln_a * lambertw0_from_log(log_z)
    lengths = np.clip(np.rint(relaxed), 1, max_draft_length).reshape(-1, k)
    lengths = np.unique(lengths, axis=0)
    goodput = _goodput_equalised(alpha, t_draft, r, q, bandwidth_hz, t_ver_s, lengths)
    best = int(np.argmax(goodput))
    best_lengths, best_goodput = lengths[best], float(goodput[best])
    if polish:
        best_lengths, best_goodput = _integer_polish(
            alpha,
            t_draft,
            r,
            q,
            bandwidth_hz,
            t_ver_s,
            max_draft_length,
            best_lengths,
            best_goodput,
        )
    bandwidth, _ = latency_equalising_bandwidth(best_lengths, t_draft, r, q, bandwidth_hz)
    return _allocation(best_lengths, bandwidth, best_goodput)


def _integer_polish(
    alpha, t_draft, r, q, bandwidth_hz, t_ver_s, l_max, lengths, goodput, max_sweeps: int = 200
):
    """Best-improvement local search over +-1 moves of single users' draft lengths."""
    k = lengths.size
    moves = np.concatenate([np.eye(k), -np.eye(k)])
    for _ in range(max_sweeps):
        cand = np.clip(lengths[None, :] + moves, 1, l_max)
        vals = _goodput_equalised(alpha, t_draft, r, q, bandwidth_hz, t_ver_s, cand)
        i = int(np.argmax(vals))
        if vals[i] <= goodput * (1 + 1e-12):
            break
        lengths, goodput = cand[i], float(vals[i])
    return lengths, goodput


def brute_force_oracle(
    alpha,
    t_draft_s,
    spectral_eff,
    payload_bits,
    bandwidth_hz,
    t_ver_s,
    max_draft_length,
    max_combinations: int = 2_000_000,
) -> Allocation:
    """Exact optimum of (P2) by enumerating every L in {1..L_max}^K (small K only).

    For fixed L the optimal bandwidth is Lemma 3's (Lemma 2: the decomposition is lossless),
    so enumerating L and solving the inner root exactly gives the global optimum.
    """
    alpha, t_draft, r = _as_instance(alpha, t_draft_s, spectral_eff)
    k = alpha.size
    total = max_draft_length**k
    if total > max_combinations:
        raise ValueError(
            f"brute force over L_max^K = {max_draft_length}^{k} = {total} combinations exceeds "
            f"max_combinations={max_combinations}; use fewer users or a smaller max_draft_length"
        )
    grid = np.array(list(itertools.product(range(1, max_draft_length + 1), repeat=k)), dtype=float)
    best_goodput, best_lengths = -np.inf, None
    for chunk in np.array_split(grid, max(1, len(grid) // 50_000)):
        vals = _goodput_equalised(alpha, t_draft, r, payload_bits, bandwidth_hz, t_ver_s, chunk)
        i = int(np.argmax(vals))
        if vals[i] > best_goodput:
            best_goodput, best_lengths = float(vals[i]), chunk[i]
    bandwidth, _ = latency_equalising_bandwidth(
        best_lengths, t_draft, r, payload_bits, bandwidth_hz
    )
    return _allocation(best_lengths, bandwidth, best_goodput)


# ---------------------------------------------------------------------------- protocols
def p2p_spin(
    alpha, t_draft_s, spectral_eff, payload_bits, bandwidth_hz, t_ver_single_s, max_draft_length
) -> tuple[float, np.ndarray]:
    """P2P-SPIN (§VI-A-4): one device at a time gets the whole bandwidth B.

    Devices are served round-robin, one speculative round each, with a batch of one
    (T^ver(1)); each device's L is chosen by exhaustive search. Returns (sum goodput =
    total expected tokens / total time over a round-robin cycle, per-user L).
    """
    alpha, t_draft, r = _as_instance(alpha, t_draft_s, spectral_eff)
    lengths = np.arange(1, max_draft_length + 1, dtype=np.float64)[:, None]
    per_token = t_draft + payload_bits / (bandwidth_hz * r)
    tokens = expected_tokens(alpha[None, :], lengths)
    times = lengths * per_token[None, :] + t_ver_single_s
    best = np.argmax(tokens / times, axis=0)
    cols = np.arange(alpha.size)
    return float(tokens[best, cols].sum() / times[best, cols].sum()), best + 1


def cen_spin(alpha, server_t_draft_s, t_ver_single_s, max_draft_length) -> tuple[float, np.ndarray]:
    """Cen-SPIN (§VI-A-4): drafter and verifier both on the server, no uplink.

    The paper does not spell out its timing model; we serve users round-robin on the
    server (drafting L tokens at ``server_t_draft_s`` each, then a one-request verification),
    with L per user by exhaustive search. ``server_t_draft_s`` in the presets is back-solved
    from Fig. 6's Multi-SPIN / Cen-SPIN ratio.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    lengths = np.arange(1, max_draft_length + 1, dtype=np.float64)[:, None]
    tokens = expected_tokens(alpha[None, :], lengths)
    times = np.broadcast_to(lengths * server_t_draft_s + t_ver_single_s, tokens.shape)
    best = np.argmax(tokens / times, axis=0)
    cols = np.arange(alpha.size)
    return float(tokens[best, cols].sum() / times[best, cols].sum()), best + 1


SOLVERS = {
    "fixed": fixed_bw_and_length,
    "uni_bw": uni_bw_multispin,
    "homo": homo_multispin,
    "hete": hete_multispin,
}
"""Multi-SPIN allocation schemes by name, all with the common signature."""
