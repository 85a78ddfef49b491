"""Formulas of paper §II against hand-computed values."""

import math

import numpy as np
import pytest

from multispin_env.physics import (
    expected_tokens,
    goodput_tokens_per_s,
    multi_access_latency_s,
    payload_bits_per_token,
    spectral_efficiency,
)
from multispin_env.verification import (
    AffineVerification,
    TokenAwareVerification,
    build_verification,
)


def test_payload_bits_llama2_and_edge_cases():
    # 1024 kept probabilities x (16 bits + ceil(log2 32000) = 15 index bits)
    assert payload_bits_per_token(1024, 16, 32000) == 1024 * 31 == 31744
    assert payload_bits_per_token(1024, 16, 32768) == 1024 * 31  # exact power of two
    assert payload_bits_per_token(1024, 16, 32769) == 1024 * 32
    with pytest.raises(ValueError, match="kept_vocab"):
        payload_bits_per_token(0, 16, 100)


def test_spectral_efficiency_hand_values():
    assert spectral_efficiency(1.0, 1.0, 1.0) == pytest.approx(1.0)  # log2(2)
    assert spectral_efficiency(2.4e-8, 0.35, 1e-10) == pytest.approx(math.log2(1 + 84.0))


def test_expected_tokens_eq12():
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.8, 0) == pytest.approx(1.0)
    alpha, length = 0.739, 5
    assert expected_tokens(alpha, length) == pytest.approx(sum(alpha**i for i in range(6)))
    assert expected_tokens(1.0, 7) == pytest.approx(8.0)  # limit alpha -> 1


def test_multi_access_latency_and_goodput_two_users():
    # user 0: L=2, T=10 ms, upload 1000 bits at 1 MHz x 2 b/s/Hz = 0.5 ms/token -> 21 ms
    # user 1: L=4, T=5 ms, upload at 0.5 MHz x 1 b/s/Hz = 2 ms/token -> 28 ms (straggler)
    lengths = np.array([2, 4])
    t_ma, per_user = multi_access_latency_s(
        lengths, np.array([0.01, 0.005]), 1000.0, np.array([1e6, 0.5e6]), np.array([2.0, 1.0])
    )
    np.testing.assert_allclose(per_user, [0.021, 0.028])
    assert t_ma == pytest.approx(0.028)
    alpha = np.array([0.5, 0.9])
    tokens = (1 + 0.5 + 0.25) + sum(0.9**i for i in range(5))
    got = goodput_tokens_per_s(
        alpha,
        lengths,
        np.array([0.01, 0.005]),
        1000.0,
        np.array([1e6, 0.5e6]),
        np.array([2.0, 1.0]),
        0.1,
    )
    assert got == pytest.approx(tokens / 0.128)


def test_idle_users_take_no_time_and_add_no_tokens():
    got = goodput_tokens_per_s(
        np.array([0.5, 0.9]),
        np.array([2, 0]),
        np.array([0.01, 0.01]),
        1000.0,
        np.array([1e6, 0.0]),
        np.array([2.0, 1.0]),
        0.1,
    )
    assert got == pytest.approx(1.75 / (0.021 + 0.1))


def test_affine_verification_eq7():
    model = AffineVerification(0.02268, 0.01272)
    assert model.latency_s(np.array([3, 0, 5])) == pytest.approx(0.02268 + 2 * 0.01272)
    assert model.latency_for_batch_s(20, 8) == pytest.approx(0.02268 + 20 * 0.01272)
    assert model.latency_s(np.zeros(3, dtype=int)) == 0.0


def test_token_aware_verification_pads_to_longest_draft():
    model = TokenAwareVerification(0.01, 0.002, 0.001)
    # 2 users in the batch, padded to max L + 1 = 6 positions each
    assert model.latency_s(np.array([5, 1, 0])) == pytest.approx(0.01 + 2 * 0.002 + 0.001 * 2 * 6)
    batched = model.latency_s(np.array([[5, 1, 0], [1, 1, 1]]))
    np.testing.assert_allclose(batched, [0.026, 0.01 + 3 * 0.002 + 0.001 * 3 * 2])


def test_build_verification_errors_name_the_field():
    with pytest.raises(ValueError, match="kind"):
        build_verification({"kind": "quadratic"})
    with pytest.raises(ValueError, match="t_lin_s"):
        build_verification({"kind": "affine", "t_fix_s": 0.01})
    with pytest.raises(ValueError, match="t_fix_s"):
        build_verification({"kind": "affine", "t_fix_s": -1, "t_lin_s": 0.0})
