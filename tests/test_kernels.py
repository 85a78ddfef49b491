"""The fused numba kernels against straightforward numpy references of the same formulas.

The references below are written independently of the kernels (whole-array numpy, as the
maths reads); the kernels must agree to float rounding, and exactly where the result is an
integer or a bit pattern.
"""

import numpy as np
import pytest

from multispin_env import rng as crng
from multispin_env.action_codec import SHARE_TEMPERATURE, ActionCodec, DecisionContext
from multispin_env.config import load_preset
from multispin_env.observation import ObservationSpec, UserHistory, build_observation
from multispin_env.simulator import MultiSpinSimulator

MASK64 = (1 << 64) - 1


def _splitmix64_uniform(key: int, counter: int, stream: int, k: int) -> float:
    """Pure-Python splitmix64 (arbitrary-precision ints masked to 64 bits)."""
    index = (counter * crng.NUM_STREAMS + stream) * 4096 + k + 1
    z = (key + 0x9E3779B97F4A7C15 * index) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z = z ^ (z >> 31)
    return ((z >> 11) + 0.5) / 2.0**53


def test_uniforms_are_bit_exact_splitmix64():
    keys = np.array([0, 1, 2**63 + 12345, MASK64], dtype=np.uint64)
    counters = np.array([0, 7, 2**40, 123456789], dtype=np.int64)
    for stream in (0, 2, 7):
        got = crng.uniforms(keys, counters, stream, 5)
        want = [
            [_splitmix64_uniform(int(key), int(c), stream, k) for k in range(5)]
            for key, c in zip(keys, counters, strict=True)
        ]
        np.testing.assert_array_equal(got, np.array(want))


def test_round_uniform_blocks_equal_direct_draws_across_refills():
    keys = crng.new_keys(np.random.default_rng(3), 4)
    cache = crng.RoundUniforms(4, 6, (crng.STREAM_ACCEPT, crng.STREAM_FADING_MAG), block=8)
    cache.rekey(keys, np.arange(4))
    for counters in ([0, 1, 2, 3], [7, 8, 9, 30], [31, 2, 100, 3]):
        c = np.array(counters)
        for stream in (crng.STREAM_ACCEPT, crng.STREAM_FADING_MAG):
            np.testing.assert_array_equal(cache.get(stream, c), crng.uniforms(keys, c, stream, 6))
    rows = np.array([2, 0])
    np.testing.assert_array_equal(
        cache.get(crng.STREAM_ACCEPT, np.array([5, 64]), rows),
        crng.uniforms(keys[rows], np.array([5, 64]), crng.STREAM_ACCEPT, 6),
    )


def _reference_observation(spec, hist, r_hat, t_draft, prior, horizon_frac, alpha_true):
    n, k = r_hat.shape
    f = len(spec.user_features)
    out = np.zeros((n, spec.size))
    user = out[:, : spec.max_users * f].reshape(n, spec.max_users, f)[:, :k]
    user[..., 0] = 1
    user[..., 1] = np.minimum(r_hat / 10, 4)
    user[..., 2] = np.minimum(hist.spectral_eff_avg / 10, 4)
    user[..., 3] = np.minimum(t_draft / spec.t_ref_s, 4)
    upload = spec.payload_bits * k / (spec.bandwidth_hz * np.maximum(r_hat, 1e-9))
    user[..., 4] = np.minimum(upload / spec.t_ref_s, 10)
    user[..., 5] = prior
    user[..., 6] = hist.successes / np.maximum(hist.trials, 1e-12)
    user[..., 7] = hist.accept_frac
    user[..., 8] = hist.last_drafted / spec.max_draft_length
    user[..., 9] = hist.last_accepted / spec.max_draft_length
    user[..., 10] = np.minimum(hist.prev_share * k, 10)
    if spec.observe_true_alpha:
        user[..., 11] = alpha_true
    glob = out[:, spec.max_users * f :]
    glob[:, 0] = k / spec.max_users
    glob[:, 1] = np.minimum(hist.last_round_time_s / (spec.max_draft_length * spec.t_ref_s), 10)
    glob[:, 2] = np.minimum(horizon_frac, 1)
    return out.astype(np.float32)


def _random_history(rng, n, k):
    hist = UserHistory(n, k, decay=0.7)
    hist.reset(rng.uniform(0.5, 0.9, (n, k)), spectral_eff_est=rng.uniform(0, 30, (n, k)))
    for _ in range(3):
        drafted = rng.integers(0, 6, (n, k)).astype(float)
        accepted = np.floor(drafted * rng.uniform(0, 1, (n, k)))
        hist.update(drafted, accepted, rng.dirichlet(np.ones(k), n), rng.uniform(0.1, 0.5, n))
    return hist


@pytest.mark.parametrize("observe_true_alpha", [False, True])
def test_observation_kernel_matches_numpy_reference(observe_true_alpha):
    rng = np.random.default_rng(0)
    n, k = 5, 3
    spec = ObservationSpec(
        max_users=4,
        max_draft_length=6,
        t_ref_s=0.03,
        payload_bits=28672.0,
        bandwidth_hz=1e7,
        observe_true_alpha=observe_true_alpha,
    )
    hist = _random_history(rng, n, k)
    args = (
        spec,
        hist,
        rng.uniform(0, 50, (n, k)),  # some clipped at 4
        rng.uniform(0.01, 0.2, (n, k)),
        rng.uniform(0.5, 0.9, (n, k)),
        rng.uniform(0, 1.5, n),
        rng.uniform(0.5, 0.9, (n, k)),
    )
    np.testing.assert_array_equal(build_observation(*args), _reference_observation(*args))


def test_history_kernel_matches_numpy_reference():
    rng = np.random.default_rng(1)
    n, k, d, w = 4, 5, 0.7, 2.0
    hist = _random_history(rng, n, k)
    before = {name: getattr(hist, name).copy() for name in ("successes", "trials", "accept_frac")}
    avg = hist.spectral_eff_avg.copy()
    drafted = rng.integers(0, 5, (n, k)).astype(float)  # zeros: idle users keep history
    accepted = np.floor(drafted * rng.uniform(0, 1, (n, k)))
    new = rng.uniform(size=(n, k)) < 0.3
    prior, est = rng.uniform(0.5, 0.9, (n, k)), rng.uniform(0, 30, (n, k))
    share, round_time = rng.dirichlet(np.ones(k), n), rng.uniform(0.1, 0.5, n)
    hist.update(drafted, accepted, share, round_time, new, prior, est)

    drafting = drafted > 0
    succ = np.where(drafting, d * before["successes"] + accepted, before["successes"])
    trials = d * before["trials"] + accepted + (accepted < drafted)
    trials = np.where(drafting, trials, before["trials"])
    frac = d * before["accept_frac"] + (1 - d) * accepted / np.maximum(drafted, 1)
    frac = np.where(drafting, frac, before["accept_frac"])
    np.testing.assert_allclose(hist.successes, np.where(new, prior * w, succ), rtol=1e-15)
    np.testing.assert_allclose(hist.trials, np.where(new, w, trials), rtol=1e-15)
    np.testing.assert_allclose(hist.accept_frac, np.where(new, prior, frac), rtol=1e-15)
    np.testing.assert_allclose(hist.spectral_eff_avg, 0.9 * avg + 0.1 * est, rtol=1e-15)
    np.testing.assert_array_equal(hist.last_drafted, drafted)
    np.testing.assert_array_equal(hist.prev_share, share)
    np.testing.assert_array_equal(hist.last_round_time_s, round_time)


def test_full_decode_kernel_matches_numpy_softmax():
    rng = np.random.default_rng(2)
    codec = ActionCodec("full", max_users=6, max_draft_length=8)
    n, k = 7, 4
    action = rng.uniform(-1.3, 1.3, (n, 12)).astype(np.float32)  # out-of-box entries clip
    ctx = DecisionContext(np.ones((n, k)), np.ones((n, k)), 1.0, 1e7)
    lengths, bandwidth = codec.decode(action, ctx)
    a = action.astype(np.float64)
    want_lengths = 1 + np.clip(np.floor((a[:, :k] + 1) * 4), 0, 7)
    logits = SHARE_TEMPERATURE * np.clip(a[:, 6 : 6 + k], -1, 1)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_array_equal(lengths, want_lengths)
    np.testing.assert_allclose(bandwidth, 1e7 * weights / weights.sum(1, keepdims=True), rtol=1e-14)


@pytest.mark.parametrize("preset", ["paper-llama2", "realistic-llama2"])
def test_round_kernel_matches_numpy_reference(preset):
    """One round from the simulator's state before it, recomputed in numpy."""
    cfg = load_preset(preset)
    n, k = 6, cfg.num_users
    sim = MultiSpinSimulator(cfg, n)
    sim.reset(rng=np.random.default_rng(4))
    rng = np.random.default_rng(5)
    for _ in range(3):
        lengths = rng.integers(0, cfg.max_draft_length + 1, (n, k))
        lengths[:, 0] = np.maximum(lengths[:, 0], 1)  # at least one active user per env
        bandwidth = cfg.bandwidth_hz * rng.dirichlet(np.ones(k), n)
        alpha, r, t_s = sim.alpha.copy(), sim.spectral_eff.copy(), sim.t_draft_s.copy()
        remaining = sim.remaining_tokens.copy()
        u = crng.uniforms(sim.keys, sim.round_index, crng.STREAM_ACCEPT, k)
        res = sim.step(lengths, bandwidth)

        lf = lengths.astype(float)
        active = lengths > 0
        t_up = np.where(active, lf * cfg.payload_bits / (bandwidth * r), 0.0)
        finish = lf * t_s + t_up
        batch = active.sum(1)
        t_ver = cfg.verification_model.latency_for_batch_s  # per env below
        want_ver = np.array([t_ver(b, m) for b, m in zip(batch, lengths.max(1), strict=True)])
        accepted = np.minimum(np.floor(np.log(u) / np.log(alpha)), lf)
        committed = np.minimum(accepted + active, remaining)
        np.testing.assert_allclose(res.t_upload_s, t_up, rtol=1e-14)
        np.testing.assert_allclose(res.round_time_s, finish.max(1) + want_ver, rtol=1e-14)
        np.testing.assert_array_equal(res.straggler, finish.argmax(1))
        np.testing.assert_array_equal(res.accepted, accepted)
        np.testing.assert_array_equal(res.committed, committed)
        # alpha near 1 loses digits in the reference's 1 - alpha^(L+1), not in the kernel's
        # expm1 form
        np.testing.assert_allclose(
            res.expected_tokens, active * (1 - alpha ** (lf + 1)) / (1 - alpha), rtol=1e-9
        )
        np.testing.assert_allclose(
            res.energy_j,
            lf * cfg.draft_energy_j_per_token + cfg.tx_power_w * t_up,
            rtol=1e-14,
        )
