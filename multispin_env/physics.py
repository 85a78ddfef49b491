"""Closed-form pieces of the Multi-SPIN system model (paper §II), vectorised over users.

Every function works on numpy arrays whose last axis is the user axis, so the same code
serves one instance, the scalar env and the batched env.
"""

from __future__ import annotations

import math

import numpy as np


def payload_bits_per_token(kept_vocab: int, prob_bits: int, vocab_size: int) -> int:
    """Q_tok of Eq. (9): |V_kept| * (Q_B + ceil(log2 V)) bits per drafted token.

    Each drafted token carries the kept probabilities (``prob_bits`` each) and their
    vocabulary indices (``ceil(log2 vocab_size)`` bits each).
    """
    if kept_vocab < 1 or kept_vocab > vocab_size:
        raise ValueError(f"kept_vocab={kept_vocab} must be in [1, vocab_size={vocab_size}]")
    if prob_bits < 1:
        raise ValueError(f"prob_bits={prob_bits} must be >= 1")
    index_bits = math.ceil(math.log2(vocab_size)) if vocab_size > 1 else 1
    return int(kept_vocab * (prob_bits + index_bits))


def spectral_efficiency(tx_power_w, channel_gain, noise_power_w) -> np.ndarray:
    """r_k = log2(1 + p_k H_k / N0) in bit/s/Hz (Eq. 8; N0 is a power, not a density)."""
    snr = np.asarray(tx_power_w) * np.asarray(channel_gain) / noise_power_w
    return np.log2(1.0 + snr)


def expected_tokens(alpha, draft_lengths) -> np.ndarray:
    """E[N_k | L_k] of Eq. (12): sum_{l=0}^{L} alpha^l = (1 - alpha^(L+1)) / (1 - alpha).

    Counts the accepted prefix plus the corrected/bonus token. L = 0 (idle user) gives 1 by
    the formula; callers mask idle users. alpha = 1 gives L + 1.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    lengths = np.asarray(draft_lengths, dtype=np.float64)
    one_minus = 1.0 - alpha
    safe = np.where(one_minus > 1e-12, one_minus, 1.0)
    geometric = (1.0 - alpha ** (lengths + 1.0)) / safe
    return np.where(one_minus > 1e-12, geometric, lengths + 1.0)


def per_token_upload_s(payload_bits: float, bandwidth_hz, spectral_eff) -> np.ndarray:
    """Upload time of one drafted token, Q_tok / (B_k r_k); inf where B_k r_k = 0."""
    rate_bps = np.asarray(bandwidth_hz, dtype=np.float64) * np.asarray(spectral_eff)
    with np.errstate(divide="ignore"):
        return np.where(rate_bps > 0, payload_bits / np.where(rate_bps > 0, rate_bps, 1.0), np.inf)


def multi_access_latency_s(draft_lengths, t_draft_s, payload_bits, bandwidth_hz, spectral_eff):
    """T^ma of Eq. (26): max_k L_k (T^S_k + Q_tok / (B_k r_k)) over users with L_k > 0.

    Returns (T^ma, per-user draft+upload time). Idle users (L_k = 0) take no time.
    """
    lengths = np.asarray(draft_lengths, dtype=np.float64)
    per_token = np.asarray(t_draft_s) + per_token_upload_s(payload_bits, bandwidth_hz, spectral_eff)
    per_user = np.where(lengths > 0, lengths * np.where(lengths > 0, per_token, 0.0), 0.0)
    return per_user.max(axis=-1), per_user


def goodput_tokens_per_s(
    alpha, draft_lengths, t_draft_s, payload_bits, bandwidth_hz, spectral_eff, t_ver_s
) -> np.ndarray:
    """Sum token goodput of Eq. (13)/(27): sum_k E[N_k|L_k] / (T^ma + T^ver)."""
    lengths = np.asarray(draft_lengths)
    t_ma, _ = multi_access_latency_s(lengths, t_draft_s, payload_bits, bandwidth_hz, spectral_eff)
    tokens = np.where(lengths > 0, expected_tokens(alpha, lengths), 0.0).sum(axis=-1)
    return tokens / (t_ma + t_ver_s)
