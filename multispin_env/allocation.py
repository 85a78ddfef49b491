"""Latency-equalising bandwidth (paper Lemma 1 and Lemma 3), shared by solvers and codecs.

Given draft lengths, the bandwidth split that minimises the straggler latency gives every
user the same draft+upload time phi. It lives in the core because the env's action codecs
("lengths", "homogeneous") and the paper's solvers both need it.
"""

from __future__ import annotations

import numpy as np


def equalising_latency(
    a: np.ndarray, c: np.ndarray, bandwidth_hz: float, max_iter: int = 100
) -> np.ndarray:
    """Root phi > max_k c_k of sum_k a_k / (phi - c_k) = B, vectorised over leading axes.

    This is the latency-equalising condition of Lemma 1 (a_k = Q/r_k, c_k = T^S_k) and of
    Lemma 3 (a_k = Q L_k / r_k, c_k = L_k T^S_k). The left side is convex and decreasing
    on (max c, inf), so Newton's method started left of the root (at max_k c_k + a_k/B,
    where one term alone already reaches B) increases monotonically to it.
    """
    a = np.asarray(a, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    phi = (c + a / bandwidth_hz).max(axis=-1)
    for _ in range(max_iter):
        gap = phi[..., None] - c
        f = (a / gap).sum(axis=-1) - bandwidth_hz
        df = -(a / gap**2).sum(axis=-1)
        step = f / df
        phi = phi - step
        if np.all(np.abs(step) <= 1e-13 * phi):
            break
    return phi


def latency_equalising_bandwidth(
    draft_lengths, t_draft_s, spectral_eff, payload_bits, bandwidth_hz
):
    """Lemma 3 (Eq. 31-32): B_k = Q L_k / (r_k (phi - L_k T^S_k)) with sum B_k = B.

    Returns (bandwidth per user in Hz, phi = the common draft+upload time in s). With
    L_k = 1 for all users this is Lemma 1 (per-token latency theta*).
    """
    lengths = np.asarray(draft_lengths, dtype=np.float64)
    a = payload_bits * lengths / np.asarray(spectral_eff)
    c = lengths * np.asarray(t_draft_s)
    phi = equalising_latency(a, c, bandwidth_hz)
    bandwidth = a / (phi[..., None] - c)
    bandwidth *= bandwidth_hz / bandwidth.sum(axis=-1, keepdims=True)  # remove rounding drift
    return bandwidth, phi
