"""The round simulator: timing, acceptance statistics, fading, requests, seeding, parity."""

import numpy as np
import pytest

from multispin_env import MultiSpinSimulator, load_preset
from multispin_env.physics import expected_tokens, spectral_efficiency
from multispin_env.rng import new_keys, uniforms


def _equal_split(sim, length=4):
    cfg = sim.config
    shape = (sim.num_envs, sim.num_users)
    return np.full(shape, length), np.full(shape, cfg.bandwidth_hz / cfg.num_users)


def test_uniforms_are_uniform_and_keyed():
    keys = np.array([1, 2], dtype=np.uint64)
    u = uniforms(keys, np.array([0, 0]), 0, 50_000)
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.02  # different keys: independent streams
    assert not np.allclose(u, uniforms(keys, np.array([0, 0]), 1, 50_000))  # streams differ
    np.testing.assert_array_equal(u, uniforms(keys, np.array([0, 0]), 0, 50_000))


def test_round_time_is_straggler_plus_verification():
    cfg = load_preset("paper-llama2")
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(3))
    lengths = np.arange(1, 21)[None, :] % 7 + 1
    bandwidth = np.full((1, 20), cfg.bandwidth_hz / 20)
    r = spectral_efficiency(cfg.tx_power_w, sim.gain, cfg.noise_power_w)
    per_user = lengths * (sim.t_draft_s + cfg.payload_bits / (bandwidth * r))
    res = sim.step(lengths, bandwidth)
    t_ver = 0.02268 + 20 * 0.01272
    assert res.round_time_s[0] == pytest.approx(per_user.max() + t_ver)
    assert res.straggler[0] == per_user.argmax()
    np.testing.assert_allclose(res.t_draft_s + res.t_upload_s, per_user)
    assert res.t_verify_s[0] == pytest.approx(t_ver)
    np.testing.assert_allclose(res.expected_tokens, expected_tokens(sim.alpha, lengths))
    assert np.all(res.committed == res.accepted + 1)
    assert np.all(res.accepted <= lengths)


def test_acceptance_follows_truncated_geometric():
    cfg = load_preset("paper-llama2", num_users=50)
    sim = MultiSpinSimulator(cfg, num_envs=40)
    sim.reset(rng=np.random.default_rng(0))
    lengths, bw = _equal_split(sim, length=6)
    committed, expected, full = [], [], []
    for _ in range(50):
        res = sim.step(lengths, bw)
        committed.append(res.committed)
        expected.append(res.expected_tokens)
        full.append(res.accepted == 6)
    committed, expected = np.array(committed), np.array(expected)
    # E[accepted + 1] = Eq. (12); 100k samples, tolerance ~5 standard errors
    se = committed.std() / np.sqrt(committed.size)
    assert abs(committed.mean() - expected.mean()) < 5 * se
    # P(all L accepted) = alpha^L
    p_full = (sim.alpha[None] ** 6).mean()
    assert abs(np.mean(full) - p_full) < 0.01


def test_rayleigh_block_fading_has_exponential_power():
    cfg = load_preset("paper-llama2", num_users=100)
    sim = MultiSpinSimulator(cfg, num_envs=20)
    sim.reset(rng=np.random.default_rng(1))
    ratios = []
    lengths, bw = _equal_split(sim, 1)
    for _ in range(30):
        ratios.append(sim.gain / sim.mean_gain)
        sim.step(lengths, bw)
    ratios = np.array(ratios)
    assert abs(ratios.mean() - 1.0) < 0.02 and abs(ratios.var() - 1.0) < 0.06  # Exp(1)
    assert abs(np.corrcoef(ratios[:-1].ravel(), ratios[1:].ravel())[0, 1]) < 0.02  # iid rounds
    assert np.all((sim.mean_gain >= 0.2) & (sim.mean_gain <= 0.5))
    spread = sim.t_draft_s / cfg.t_draft_mean_s
    assert spread.min() >= 0.85 and spread.max() <= 1.15


def test_csi_error_biases_estimate_as_expected():
    cfg = load_preset("paper-llama2", num_users=200, csi_error_std=0.5)
    sim = MultiSpinSimulator(cfg, num_envs=50)
    sim.reset(rng=np.random.default_rng(2))
    # |h + e|^2 with e ~ CN(0, s^2 H_bar): E = H_bar (1 + s^2)
    assert (sim.gain_estimate / sim.mean_gain).mean() == pytest.approx(1.25, rel=0.03)
    assert np.corrcoef(sim.gain.ravel(), sim.gain_estimate.ravel())[0, 1] > 0.7
    exact = MultiSpinSimulator(load_preset("paper-llama2"))
    exact.reset(rng=np.random.default_rng(2))
    np.testing.assert_array_equal(exact.gain, exact.gain_estimate)


def test_same_key_same_trajectory_and_batch_parity():
    cfg = load_preset("realistic-llama2")
    keys = new_keys(np.random.default_rng(7), 3)
    batched = MultiSpinSimulator(cfg, num_envs=3)
    batched.reset(keys)
    singles = [MultiSpinSimulator(cfg) for _ in range(3)]
    for sim, key in zip(singles, keys, strict=True):
        sim.reset(key[None])
    rng = np.random.default_rng(0)
    for _ in range(40):
        lengths = rng.integers(1, 9, size=(3, 20))
        bw = rng.dirichlet(np.ones(20), size=3) * cfg.bandwidth_hz
        res = batched.step(lengths, bw)
        for i, sim in enumerate(singles):
            one = sim.step(lengths[i : i + 1], bw[i : i + 1])
            np.testing.assert_array_equal(one.committed[0], res.committed[i])
            np.testing.assert_array_equal(one.round_time_s[0], res.round_time_s[i])
            np.testing.assert_array_equal(sim.alpha[0], batched.alpha[i])
            np.testing.assert_array_equal(sim.gain_estimate[0], batched.gain_estimate[i])
    other = MultiSpinSimulator(cfg)
    other.reset(new_keys(np.random.default_rng(8), 1))
    assert not np.allclose(other.t_draft_s, singles[0].t_draft_s)


def test_requests_end_and_restart_without_losing_tokens():
    cfg = load_preset("realistic-llama2", request_length_tokens=20)
    sim = MultiSpinSimulator(cfg, num_envs=4)
    sim.reset(rng=np.random.default_rng(5))
    lengths, bw = _equal_split(sim, 8)
    current_len = sim.remaining_tokens.copy()  # full length of each user's open request
    served = np.zeros_like(current_len)
    finished_len = np.zeros_like(current_len)
    n_done = 0
    for _ in range(200):
        before = sim.remaining_tokens.copy()
        res = sim.step(lengths, bw)
        assert np.all(res.committed <= before)  # never past the end of a request
        served += res.committed
        finished_len += np.where(res.request_done, current_len, 0)
        current_len = np.where(res.request_done, sim.remaining_tokens, current_len)
        n_done += res.request_done.sum()
    assert n_done > 100
    # every committed token belongs to exactly one request: finished ones in full, plus the
    # served part of the open one
    np.testing.assert_array_equal(served, finished_len + current_len - sim.remaining_tokens)


def test_per_request_acceptance_matches_task_moments():
    cfg = load_preset("realistic-llama2", request_length_tokens=1, num_users=100)
    sim = MultiSpinSimulator(cfg, num_envs=20)
    sim.reset(rng=np.random.default_rng(11))
    lengths, bw = _equal_split(sim, 1)
    draws = {i: [] for i in range(4)}
    for _ in range(30):
        for i in range(4):
            draws[i].append(sim.alpha[sim.task == i])
        sim.step(lengths, bw)
    for i, task in enumerate(cfg.tasks):
        a = np.concatenate(draws[i])
        assert a.mean() == pytest.approx(task.alpha_mean, abs=0.02)
        assert a.std() == pytest.approx(task.alpha_std, abs=0.02)


def test_energy_is_draft_plus_transmission():
    cfg = load_preset("realistic-llama2")
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(0))
    lengths, bw = _equal_split(sim, 3)
    res = sim.step(lengths, bw)
    np.testing.assert_allclose(res.energy_j, 3 * 0.05 + cfg.tx_power_w * res.t_upload_s)


@pytest.mark.parametrize(
    "lengths, bandwidth, message",
    [
        (np.full((1, 20), 26), np.full((1, 20), 5e5), "max_draft_length"),
        (np.full((1, 20), 4), np.full((1, 20), 6e5), "above the budget"),
        (np.full((1, 20), 4), np.r_[np.zeros(1), np.full(19, 5e5)][None], "needs bandwidth"),
        (np.zeros((1, 20), dtype=int), np.full((1, 20), 5e5), "at least one user"),
        (np.full((1, 19), 4), np.full((1, 19), 5e5), "shape"),
        (np.full((1, 20), 2.5), np.full((1, 20), 5e5), "whole numbers"),
    ],
)
def test_bad_allocations_are_rejected_with_a_reason(lengths, bandwidth, message):
    sim = MultiSpinSimulator(load_preset("paper-llama2"))
    sim.reset(rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        sim.step(lengths, bandwidth)
    sim.step(np.full((1, 20), 4), np.full((1, 20), 5e5))  # state intact after a rejection
    assert sim.round_index[0] == 1


def test_step_before_reset_is_an_error():
    with pytest.raises(RuntimeError, match="reset"):
        MultiSpinSimulator(load_preset("paper-llama2")).step(np.ones(20), np.full(20, 5e5))
