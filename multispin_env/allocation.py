"""Latency-equalising bandwidth (paper Lemma 1 and Lemma 3), shared by solvers and codecs.

Given draft lengths, the bandwidth split that minimises the straggler latency gives every
user the same draft+upload time phi. It lives in the core because the env's action codecs
("lengths", "homogeneous") and the paper's solvers both need it.
"""

from __future__ import annotations

import numpy as np

from multispin_env._jit import kernel


def _rows(x, shape) -> np.ndarray:
    """``x`` broadcast to ``shape`` as a C-contiguous float64 ``(rows, K)`` array."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(x, dtype=np.float64), shape)).reshape(
        -1, shape[-1]
    )


@kernel
def _equalising_kernel(a, c, bandwidth_hz, max_iter, phi):
    for n in range(a.shape[0]):
        # start left of the root, where one term alone already reaches B
        x = -np.inf
        for k in range(a.shape[1]):
            x = max(x, c[n, k] + a[n, k] / bandwidth_hz)
        for _ in range(max_iter):
            f, df = -bandwidth_hz, 0.0
            for k in range(a.shape[1]):
                gap = x - c[n, k]
                f += a[n, k] / gap
                df -= a[n, k] / gap**2
            step = f / df
            x = x - step
            if abs(step) <= 1e-13 * x:
                break
        phi[n] = x


def equalising_latency(
    a: np.ndarray, c: np.ndarray, bandwidth_hz: float, max_iter: int = 100
) -> np.ndarray:
    """Root phi > max_k c_k of sum_k a_k / (phi - c_k) = B, vectorised over leading axes.

    This is the latency-equalising condition of Lemma 1 (a_k = Q/r_k, c_k = T^S_k) and of
    Lemma 3 (a_k = Q L_k / r_k, c_k = L_k T^S_k). The left side is convex and decreasing
    on (max c, inf), so Newton's method started left of the root (at max_k c_k + a_k/B,
    where one term alone already reaches B) increases monotonically to it.
    """
    shape = np.broadcast_shapes(np.shape(a), np.shape(c))
    phi = np.empty(int(np.prod(shape[:-1], dtype=np.int64)))
    _equalising_kernel(_rows(a, shape), _rows(c, shape), float(bandwidth_hz), int(max_iter), phi)
    return phi.reshape(shape[:-1]) if len(shape) > 1 else phi[0]


@kernel
def _equalising_bandwidth_kernel(
    lengths, t_draft_s, spectral_eff, payload_bits, bandwidth_hz, out, phi
):
    a = np.empty_like(lengths)
    c = np.empty_like(lengths)
    for n in range(lengths.shape[0]):
        for k in range(lengths.shape[1]):
            a[n, k] = payload_bits * lengths[n, k] / spectral_eff[n, k]
            c[n, k] = lengths[n, k] * t_draft_s[n, k]
    _equalising_kernel(a, c, bandwidth_hz, 100, phi)
    for n in range(lengths.shape[0]):
        total = 0.0
        for k in range(lengths.shape[1]):
            out[n, k] = a[n, k] / (phi[n] - c[n, k])
            total += out[n, k]
        scale = bandwidth_hz / total  # removes rounding drift: the shares sum to B
        for k in range(lengths.shape[1]):
            out[n, k] *= scale


def latency_equalising_bandwidth(
    draft_lengths, t_draft_s, spectral_eff, payload_bits, bandwidth_hz
):
    """Lemma 3 (Eq. 31-32): B_k = Q L_k / (r_k (phi - L_k T^S_k)) with sum B_k = B.

    Returns (bandwidth per user in Hz, phi = the common draft+upload time in s). With
    L_k = 1 for all users this is Lemma 1 (per-token latency theta*).
    """
    shape = np.broadcast_shapes(
        np.shape(draft_lengths), np.shape(t_draft_s), np.shape(spectral_eff)
    )
    lengths = _rows(draft_lengths, shape)
    out = np.empty_like(lengths)
    phi = np.empty(lengths.shape[0])
    _equalising_bandwidth_kernel(
        lengths,
        _rows(t_draft_s, shape),
        _rows(spectral_eff, shape),
        float(payload_bits),
        float(bandwidth_hz),
        out,
        phi,
    )
    if len(shape) == 1:
        return out[0], phi[0]
    return out.reshape(shape), phi.reshape(shape[:-1])


def groupwise_equalising_bandwidth(
    draft_lengths, t_draft_s, spectral_eff, payload_bits, bandwidth_hz, group=None
) -> np.ndarray:
    """Lemma 3's split within each pipeline group: the users of a group (``group`` ``(N, K)``)
    upload in turn with the whole band B, so each group's shares sum to B. Without groups it
    is :func:`latency_equalising_bandwidth`'s bandwidth."""
    lengths = np.asarray(draft_lengths)
    if group is None:
        return latency_equalising_bandwidth(
            lengths, t_draft_s, spectral_eff, payload_bits, bandwidth_hz
        )[0]
    bandwidth = np.zeros(lengths.shape)
    for g in np.unique(group):
        mask = group == g
        part, _ = latency_equalising_bandwidth(
            np.where(mask, lengths, 0), t_draft_s, spectral_eff, payload_bits, bandwidth_hz
        )
        bandwidth = np.where(mask, part, bandwidth)
    return bandwidth
