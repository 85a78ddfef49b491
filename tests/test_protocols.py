"""Extended protocols (multispin_env.protocols): early stop, streamed prefixes verified at a
deadline, pipelined groups with proactive drafting.

Every expectation below is computed by hand (or by a few lines of numpy written from the
module docstring of :mod:`multispin_env.protocols`), never by calling the kernel under test.
The random draws are not part of that spec, so the replay tests take them from the same
sources (the accept stream of multispin_env.rng, ``protocols._token_draw``) and re-implement
every rule applied to them.
The tiny scenarios use dyadic numbers so that times are exact in binary: spectral efficiency
r = log2(1 + p H / N0) = log2(2) = 1 bit/s/Hz, Q_tok = 2 bits, so u_k = 2 / B_k seconds, and
per-token drafting times are multiples of 1/32 s.
"""

import hashlib
import math

import numpy as np
import pytest
from scipy import integrate

import multispin_env.simulator as simulator_module
from multispin_env import MultiSpinSimulator, load_preset
from multispin_env import rng as crng
from multispin_env.config import ScenarioConfig, TaskSpec
from multispin_env.protocols import _token_draw, logit_mean_for
from multispin_env.rng import new_keys

S = 1.0 / 32.0  # time unit of the tiny scenarios
T_FIX, T_USER, T_TOKEN = 4 * S, 0.5 * S, 0.25 * S


def tiny(num_users=3, alpha=0.75, verification=None, **overrides) -> ScenarioConfig:
    """A deterministic scenario: r = 1 bit/s/Hz for everyone, Q_tok = 2 bits, d = 1/32 s."""
    fields = dict(
        name="tiny",
        num_users=num_users,
        bandwidth_hz=128.0,
        noise_power_w=1.0,
        tx_power_w=1.0,
        mean_gain_low=1.0,
        mean_gain_high=1.0,
        rayleigh_fading=False,
        t_draft_mean_s=S,
        t_draft_spread=0.0,
        vocab_size=2,  # 1 index bit
        kept_vocab=1,
        prob_bits=1,  # Q_tok = 1 * (1 + 1) = 2 bits
        max_draft_length=8,
        verification=verification
        or {"kind": "token_aware", "t_fix_s": T_FIX, "t_user_s": T_USER, "t_token_s": T_TOKEN},
        tasks=(TaskSpec("t", alpha),),
        token_logit_std=1.5,  # explicit: the defaults are fitted values that may change
        confidence_noise_std=1.0,
    )
    fields.update(overrides)
    return ScenarioConfig(**fields)


def padded_v(lengths, t_fix=T_FIX, t_user=T_USER, t_token=T_TOKEN) -> float:
    """V(n): t_fix + n t_user + t_token n (max len + 1) over the n users with length > 0."""
    lengths = np.asarray(lengths)
    n = int(np.count_nonzero(lengths))
    if n == 0:
        return 0.0
    return t_fix + n * t_user + t_token * n * (int(lengths.max()) + 1)


def untruncated_geometric(sim) -> np.ndarray:
    """The acceptance draw of the coming round without the stop rule: P(G >= j) = alpha^j,
    by inverse CDF from the accept stream (as the synchronous round draws it)."""
    u = crng.uniforms(
        sim.keys, sim.round_index.astype(np.uint64), crng.STREAM_ACCEPT, sim.num_users
    )
    return np.floor(np.log(u) / np.log(sim.alpha))


def arrival(d, u, i):
    """t_{k,i} = d + u + (i - 1) max(d, u): token i of a streamed draft reaches the server."""
    return d + u + (i - 1) * max(d, u)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- 1. sync path

# Digest of 40 synchronous rounds produced by the simulator as it was *before* the extended
# protocols were added (commit 2ad5396, run from `git archive`), see _sync_digest. They
# change only if the sync round or these two presets change.
_PRE_PROTOCOL_DIGEST = {
    "paper-llama2": (
        "9299de887f8fe758",
        [696.6915581834922, 2.276825345545832e-05, 6688.862152744155, 1818.8799999999994],
    ),
    "realistic-llama2": (
        "e278c5b7576b7266",
        [699.0562519834922, 488.2500227682534, 8353.833755151907, 1833.5433702821117],
    ),
}


def _sync_digest(name):
    cfg = load_preset(name)
    sim = MultiSpinSimulator(cfg, num_envs=3)
    sim.reset(rng=np.random.default_rng(123))
    rng = np.random.default_rng(9)
    digest = hashlib.sha256()
    sums = np.zeros(4)
    results = []
    for _ in range(40):
        lengths = rng.integers(0, 9, size=(3, cfg.num_users))
        lengths[:, 0] = 3
        bw = rng.dirichlet(np.ones(cfg.num_users), size=3) * cfg.bandwidth_hz * 0.999
        res = sim.step(lengths, bw)
        results.append(res)
        for a in (res.committed, res.accepted, res.straggler, res.request_done, sim.task):
            digest.update(np.ascontiguousarray(a).astype(np.int64).tobytes())
        sums += [
            res.round_time_s.sum(),
            res.energy_j.sum(),
            res.expected_tokens.sum(),
            sim.alpha.sum(),
        ]
    return digest.hexdigest()[:16], sums, results, sim


@pytest.mark.parametrize("name", ["paper-llama2", "realistic-llama2"])
def test_sync_round_is_unchanged_and_never_calls_the_protocol_kernel(name, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the synchronous round called multispin_env.protocols")

    monkeypatch.setattr(simulator_module, "play_extended_round", boom)
    monkeypatch.setattr(simulator_module, "logit_mean_for", boom)
    cfg = load_preset(name)
    assert not cfg.extended_protocol and cfg.protocol_name == "sync"
    digest, sums, results, sim = _sync_digest(name)
    want_digest, want_sums = _PRE_PROTOCOL_DIGEST[name]
    assert digest == want_digest  # integer outputs: bit for bit
    np.testing.assert_allclose(sums, want_sums, rtol=1e-12, atol=0)
    for res in results:
        assert res.verified is None and res.wasted is None
        np.testing.assert_array_equal(res.verified_tokens, res.drafted)
        np.testing.assert_array_equal(res.wasted_tokens, res.drafted - res.accepted)
    assert not sim.predrafted.any() and not sim.token_logit_mean.any()


def test_sync_round_matches_hand_timing_and_acceptance():
    cfg = tiny(num_users=3)
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(4))
    sim.t_draft_s[:] = [[S, 4 * S, 2 * S]]
    lengths, bw = np.array([4, 3, 5]), np.array([32.0, 64.0, 16.0])
    geo = untruncated_geometric(sim)[0]
    res = sim.step(lengths, bw)
    # L (d + u) = 4 * 3/32, 3 * 5/32, 5 * 6/32 -> straggler user 2 at 30/32
    assert res.round_time_s[0] == 30 * S + padded_v(lengths)
    assert res.straggler[0] == 2
    np.testing.assert_array_equal(res.accepted[0], np.minimum(geo, lengths))
    np.testing.assert_array_equal(res.committed[0], np.minimum(geo, lengths) + 1)


@pytest.mark.parametrize("field", ["stop_threshold", "deadline_s", "group"])
def test_sync_scenario_refuses_protocol_decisions(field):
    sim = MultiSpinSimulator(tiny())
    sim.reset(rng=np.random.default_rng(0))
    value = {"stop_threshold": np.zeros((1, 3)), "deadline_s": 1.0, "group": np.zeros((1, 3))}
    with pytest.raises(ValueError, match=field):
        sim.step(np.array([1, 1, 1]), np.full(3, 10.0), **{field: value[field]})
    assert sim.round_index[0] == 0


@pytest.mark.parametrize(
    "switch, field, value",
    [
        ({"early_stop": True}, "deadline_s", 1.0),
        ({"early_stop": True}, "group", np.zeros((1, 3), dtype=int)),
        ({"streaming_deadline": True}, "stop_threshold", np.zeros((1, 3))),
        ({"pipeline_groups": 2}, "deadline_s", 1.0),
        ({"pipeline_groups": 2}, "stop_threshold", np.zeros((1, 3))),
    ],
)
def test_extended_scenario_refuses_decisions_of_switched_off_protocols(switch, field, value):
    sim = MultiSpinSimulator(tiny(**switch))
    sim.reset(rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=field):
        sim.step(np.array([1, 1, 1]), np.full(3, 10.0), **{field: value})


@pytest.mark.parametrize(
    "switch, field, value, message",
    [
        ({"early_stop": True}, "stop_threshold", np.full((1, 3), 1.0), "stop_threshold"),
        ({"early_stop": True}, "stop_threshold", np.full((1, 3), -0.1), "stop_threshold"),
        ({"streaming_deadline": True}, "deadline_s", 0.0, "deadline_s"),
        ({"streaming_deadline": True}, "deadline_s", -1.0, "deadline_s"),
        ({"streaming_deadline": True}, "deadline_s", float("nan"), "deadline_s"),
        ({"pipeline_groups": 2}, "group", np.array([[0, 1, 2]]), "group"),
        ({"pipeline_groups": 2}, "group", np.array([[0, -1, 1]]), "group"),
        ({"pipeline_groups": 2}, "group", np.array([[0.0, 1.0, 1.0]]), "group"),
        ({"pipeline_groups": 2}, "group", np.array([[0, 1]]), "group"),
    ],
)
def test_bad_protocol_decisions_are_rejected(switch, field, value, message):
    sim = MultiSpinSimulator(tiny(**switch))
    sim.reset(rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        sim.step(np.array([1, 1, 1]), np.full(3, 10.0), **{field: value})
    assert sim.round_index[0] == 0


# --------------------------------------------------------------------------- 2. deadline

# d = 1/32, 4/32, 2/32 and B = 32, 64, 16 Hz (u = 2/32, 1/32, 4/32), caps 4, 3, 5:
#   user 0 arrivals 3, 5, 7, 9             (/32; u > d, step u)
#   user 1 arrivals 5, 9, 13               (d > u, step d)
#   user 2 arrivals 6, 10, 14, 18, 22      (u > d, step u)
STREAM_D = np.array([S, 4 * S, 2 * S])
STREAM_B = np.array([32.0, 64.0, 16.0])
STREAM_L = np.array([4, 3, 5])


@pytest.mark.parametrize(
    "deadline, want_prefix",
    [
        (9 * S, [4, 2, 1]),  # exactly at the arrival of user 0's 4th and user 1's 2nd token
        (np.nextafter(9 * S, 0.0), [3, 1, 1]),  # a hair before: those two are in flight
        (10 * S, [4, 2, 2]),
        (4 * S, [1, 0, 0]),  # users 1 and 2 have nothing yet: out of the batch
        (5.5 * S, [2, 1, 0]),
        (S, [0, 0, 0]),  # nothing has arrived at all
        (21.9 * S, [4, 3, 4]),
        (22 * S, [4, 3, 5]),
        (40 * S, [4, 3, 5]),  # after the last arrival: verify at once, at 22/32
        (np.inf, [4, 3, 5]),
    ],
)
def test_deadline_verifies_the_received_prefix(deadline, want_prefix):
    cfg = tiny(streaming_deadline=True, draft_energy_j_per_token=0.5)
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(1))
    sim.t_draft_s[:] = STREAM_D
    u = cfg.payload_bits / STREAM_B
    np.testing.assert_array_equal(u, [2 * S, S, 4 * S])
    # the docstring's prefix, from the arrival times
    t = [[arrival(STREAM_D[k], u[k], i) for i in range(1, STREAM_L[k] + 1)] for k in range(3)]
    t_stop = min(deadline, max(times[-1] for times in t))
    prefix = np.array([sum(ti <= t_stop for ti in times) for times in t])
    np.testing.assert_array_equal(prefix, want_prefix)  # the hand table above
    geo = untruncated_geometric(sim)[0]
    res = sim.step(STREAM_L, STREAM_B, deadline_s=deadline)
    np.testing.assert_array_equal(res.verified[0], want_prefix)
    np.testing.assert_array_equal(res.drafted[0], STREAM_L)
    assert res.t_verify_s[0] == padded_v(prefix)
    assert res.round_time_s[0] == t_stop + padded_v(prefix)
    accepted = np.minimum(geo, prefix)
    np.testing.assert_array_equal(res.accepted[0], accepted)
    np.testing.assert_array_equal(res.committed[0], accepted + (prefix > 0))
    alpha = sim.alpha[0]
    want_expected = np.where(prefix > 0, (1 - alpha ** (prefix + 1)) / (1 - alpha), 0.0)
    np.testing.assert_allclose(res.expected_tokens[0], want_expected, rtol=1e-12)
    # devices stop at T: token i is drafted at i d; in-flight and rejected tokens are wasted
    made = np.minimum(STREAM_L, np.floor(t_stop / STREAM_D))
    np.testing.assert_array_equal(res.wasted[0], made - accepted)
    np.testing.assert_allclose(res.energy_j[0], made * 0.5 + cfg.tx_power_w * prefix * u)


def test_deadline_exactly_at_an_arrival_counts_that_token_with_real_numbers():
    """Non-dyadic times (realistic preset, Rayleigh fading): a deadline equal to t_{k,i}
    (the docstring's expression) verifies exactly i tokens of user k."""
    cfg = load_preset("realistic-llama2", num_users=5, streaming_deadline=True)
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(12))
    rng = np.random.default_rng(13)
    checked = 0
    for _ in range(30):
        lengths = rng.integers(1, 9, size=5)
        bw = rng.dirichlet(np.ones(5)) * cfg.bandwidth_hz * 0.999
        d = sim.t_draft_s[0].copy()
        u = cfg.payload_bits / (bw * sim.spectral_eff[0])
        k = int(rng.integers(0, 5))
        i = int(rng.integers(1, lengths[k] + 1))
        deadline = arrival(d[k], u[k], i)
        last = max(arrival(d[j], u[j], lengths[j]) for j in range(5))
        t_stop = min(deadline, last)
        prefix = [
            sum(arrival(d[j], u[j], q) <= t_stop for q in range(1, lengths[j] + 1))
            for j in range(5)
        ]
        res = sim.step(lengths, bw, deadline_s=deadline)
        assert res.verified[0, k] == i
        np.testing.assert_array_equal(res.verified[0], prefix)
        assert res.round_time_s[0] == pytest.approx(t_stop + res.t_verify_s[0], rel=1e-15)
        checked += 1
    assert checked == 30


def test_deadline_round_time_numbers_by_hand():
    sim = MultiSpinSimulator(tiny(streaming_deadline=True))
    sim.reset(rng=np.random.default_rng(1))
    sim.t_draft_s[:] = STREAM_D
    res = sim.step(STREAM_L, STREAM_B, deadline_s=9 * S)
    # T = 9/32; V = 4 + 3 (0.5 + 0.25 * (4 + 1)) = 9.25 (/32)
    assert res.round_time_s[0] == 18.25 * S and res.t_verify_s[0] == 9.25 * S
    res = sim.step(STREAM_L, STREAM_B, deadline_s=S)
    assert res.round_time_s[0] == S and res.t_verify_s[0] == 0.0
    assert not res.committed.any() and not res.verified.any()
    res = sim.step(STREAM_L, STREAM_B)  # default deadline: inf
    # T = 22/32, V = 4 + 3 (0.5 + 0.25 * 6) = 10 (/32)
    assert res.round_time_s[0] == 32 * S
    np.testing.assert_array_equal(res.verified[0], STREAM_L)


def test_infinite_deadline_commits_like_sync_in_less_time():
    """D = inf verifies every token; with L > 1 everywhere the round is strictly shorter
    than the synchronous one, and acceptance uses the same draws (same commits)."""
    base = load_preset("realistic-llama2", num_users=6, draft_energy_j_per_token=0.0)
    sync = MultiSpinSimulator(base, num_envs=2)
    stream = MultiSpinSimulator(base.with_overrides(streaming_deadline=True), num_envs=2)
    keys = new_keys(np.random.default_rng(3), 2)
    sync.reset(keys)
    stream.reset(keys)
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(2, 9, size=(2, 6))
        bw = rng.dirichlet(np.ones(6), size=2) * base.bandwidth_hz * 0.999
        d = stream.t_draft_s.copy()
        u = base.payload_bits / (bw * stream.spectral_eff)
        a = sync.step(lengths, bw)
        b = stream.step(lengths, bw, deadline_s=np.inf)
        np.testing.assert_array_equal(b.verified, lengths)
        np.testing.assert_array_equal(b.committed, a.committed)
        np.testing.assert_array_equal(b.accepted, a.accepted)
        np.testing.assert_allclose(b.t_verify_s, a.t_verify_s, rtol=1e-12)
        finish = d + u + (lengths - 1) * np.maximum(d, u)
        np.testing.assert_allclose(b.round_time_s, finish.max(axis=1) + a.t_verify_s, rtol=1e-12)
        assert np.all(b.round_time_s < a.round_time_s)


# --------------------------------------------------------------------------- 3. groups

# groups 0 = {0, 3}, 1 = {1, 2}; d = 1, 2, 1, 4 (/32); u = 2/32 for all (B = 32 Hz each)
# caps 1, 4, 5, 1: l (d + u) = 3, 16, 15, 6 -> DU_0 = 6, DU_1 = 16 (/32)
PIPE_D = np.array([S, 2 * S, S, 4 * S])
PIPE_GROUP = np.array([0, 1, 1, 0])
PIPE_L = np.array([1, 4, 5, 1])


@pytest.mark.parametrize(
    "t_fix, want_cycle",
    [
        # V_0 = 4 + 2 (0.5 + 0.25 * 2) = 6, V_1 = 4 + 2 (0.5 + 0.25 * 6) = 8:
        # max(DU_0, V_1) + max(DU_1, V_0) = 8 + 16 = 24 (the other pairing would give 22)
        (T_FIX, 24 * S),
        # V_0 = 18, V_1 = 20: verification bound, max(6, 20) + max(16, 18) = 38
        (16 * S, 38 * S),
    ],
)
def test_pipeline_cycle_time(t_fix, want_cycle):
    verification = {"kind": "token_aware", "t_fix_s": t_fix, "t_user_s": T_USER}
    verification["t_token_s"] = T_TOKEN
    cfg = tiny(
        num_users=4,
        bandwidth_hz=64.0,
        pipeline_groups=2,
        proactive_drafting=False,
        verification=verification,
        draft_energy_j_per_token=0.25,
    )
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(2))
    bw = np.full(4, 32.0)  # each group uses the whole 64 Hz band
    u = cfg.payload_bits / bw
    for _ in range(3):  # without proactive drafting every cycle is the same
        sim.t_draft_s[:] = PIPE_D
        geo = untruncated_geometric(sim)[0]
        res = sim.step(PIPE_L, bw, group=PIPE_GROUP)
        du = PIPE_L * (PIPE_D + u)
        du_g = [du[PIPE_GROUP == g].max() for g in (0, 1)]
        v_g = [padded_v(PIPE_L[PIPE_GROUP == g], t_fix=t_fix) for g in (0, 1)]
        assert res.round_time_s[0] == max(du_g[0], v_g[1]) + max(du_g[1], v_g[0]) == want_cycle
        assert res.t_verify_s[0] == v_g[0] + v_g[1]
        assert res.straggler[0] == 1
        np.testing.assert_array_equal(res.t_draft_s[0], PIPE_L * PIPE_D)
        np.testing.assert_array_equal(res.t_upload_s[0], PIPE_L * u)
        np.testing.assert_array_equal(res.verified[0], PIPE_L)
        accepted = np.minimum(geo, PIPE_L)
        np.testing.assert_array_equal(res.accepted[0], accepted)
        np.testing.assert_array_equal(res.committed[0], accepted + 1)
        np.testing.assert_array_equal(res.wasted[0], PIPE_L - accepted)
        np.testing.assert_allclose(res.energy_j[0], PIPE_L * 0.25 + PIPE_L * u)
        assert not sim.predrafted.any()


def test_pipeline_groups_default_to_user_index_mod_g():
    cfg = tiny(num_users=4, bandwidth_hz=64.0, pipeline_groups=2, proactive_drafting=False)
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(2))
    sim.t_draft_s[:] = PIPE_D
    bw = np.full(4, 32.0)  # groups {0, 2} and {1, 3}: 64 Hz each
    res = sim.step(PIPE_L, bw)
    # l (d + u) = 3, 16, 15, 6 -> DU_0 = max(3, 15) = 15, DU_1 = max(16, 6) = 16
    # V_0 = 4 + 2 (0.5 + 0.25 * 6) = 8, V_1 = 4 + 2 (0.5 + 0.25 * 5) = 7.5
    assert res.round_time_s[0] == max(15, 7.5) * S + max(16, 8) * S
    assert res.t_verify_s[0] == 15.5 * S


def test_pipeline_with_an_empty_group_times_like_one_synchronous_round():
    cfg = tiny(num_users=4, bandwidth_hz=64.0, pipeline_groups=2, proactive_drafting=False)
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(2))
    sim.t_draft_s[:] = PIPE_D
    lengths = np.array([1, 0, 0, 1])  # group 1 = {1, 2} drafts nothing
    res = sim.step(lengths, np.array([32.0, 0.0, 0.0, 32.0]), group=PIPE_GROUP)
    # DU_0 = max(3, 6) = 6, V_0 = 4 + 2 (0.5 + 0.25 * 2) = 6, DU_1 = V_1 = 0:
    # max(6, 0) + max(0, 6) = 12 = DU + V of the synchronous round
    assert res.round_time_s[0] == 12 * S and res.t_verify_s[0] == 6 * S
    np.testing.assert_array_equal(res.verified[0], lengths)
    np.testing.assert_array_equal(res.committed[0] > 0, lengths > 0)


def test_pipeline_bandwidth_is_checked_per_group():
    cfg = tiny(num_users=4, bandwidth_hz=64.0, pipeline_groups=2, proactive_drafting=False)
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(2))
    sim.step(PIPE_L, np.array([40.0, 60.0, 4.0, 24.0]), group=PIPE_GROUP)  # 64 + 64: fine
    with pytest.raises(ValueError, match="pipeline group"):
        sim.step(PIPE_L, np.array([40.0, 60.0, 5.0, 24.0]), group=PIPE_GROUP)  # group 1: 65
    with pytest.raises(ValueError, match="pipeline group"):
        sim.step(PIPE_L, np.array([41.0, 10.0, 4.0, 24.0]), group=PIPE_GROUP)  # group 0: 65
    with pytest.raises(ValueError, match="group"):
        sim.step(PIPE_L, np.full(4, 16.0), group=np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="group"):
        sim.step(PIPE_L, np.full(4, 16.0), group=np.array([0, 1, -1, 0]))
    assert sim.round_index[0] == 1
    # the same allocation in a synchronous scenario is over the band
    sync = MultiSpinSimulator(tiny(num_users=4, bandwidth_hz=64.0))
    sync.reset(rng=np.random.default_rng(2))
    with pytest.raises(ValueError, match="above the budget"):
        sync.step(PIPE_L, np.array([40.0, 60.0, 4.0, 24.0]))


def test_pipeline_commits_like_sync():
    base = load_preset("realistic-llama2", num_users=6)
    keys = new_keys(np.random.default_rng(5), 2)
    sync = MultiSpinSimulator(base, num_envs=2)
    pipe = MultiSpinSimulator(
        base.with_overrides(pipeline_groups=3, proactive_drafting=False), num_envs=2
    )
    sync.reset(keys)
    pipe.reset(keys)
    rng = np.random.default_rng(1)
    for _ in range(15):
        lengths = rng.integers(1, 9, size=(2, 6))
        bw = np.full((2, 6), base.bandwidth_hz / 6)
        a, b = sync.step(lengths, bw), pipe.step(lengths, bw)
        np.testing.assert_array_equal(a.committed, b.committed)
        np.testing.assert_array_equal(a.request_done, b.request_done)
        np.testing.assert_array_equal(b.wasted, lengths - b.accepted)


# --------------------------------------------------------------------------- 4. proactive

# two users, groups {0} and {1}, d = u = 1/32 (B = 64 Hz each = the whole band), caps 3, 2,
# t_fix = 1/32: DU = 6, 4; V_0 = 1 + 0.5 + 0.25 * 4 = 2.5, V_1 = 1 + 0.5 + 0.25 * 3 = 2.25.
# Phase 0 = max(DU_0, V_1) = 6, phase 1 = max(DU_1, V_0) = 4, cycle 10 (/32).
# User 0 waits during phase 1 (W = 4), user 1 during phase 0 (W = 6):
#   guess held -> p = floor(W / d) = 4, 6; guess failed -> floor((W - V_g) / d) = 1, 3.
PRO_T_FIX = S
PRO_L = np.array([3, 2])


def _proactive_sim(alpha, max_draft_length=8, seed=0):
    verification = {"kind": "token_aware", "t_fix_s": PRO_T_FIX, "t_user_s": T_USER}
    verification["t_token_s"] = T_TOKEN
    cfg = tiny(
        num_users=2,
        alpha=alpha,
        bandwidth_hz=64.0,
        pipeline_groups=2,
        proactive_drafting=True,
        max_draft_length=max_draft_length,
        verification=verification,
        draft_energy_j_per_token=1.0,
    )
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(seed))
    return sim


def _proactive_expectation(lengths, pre, guess_held, l_max):
    """Hand model of one cycle from the docstring (d = u = 1/32, groups {0}, {1})."""
    d = u = S
    used = np.minimum(pre, lengths)
    du = (lengths - used) * d + lengths * u
    v = np.array([padded_v(lengths[[0]], t_fix=PRO_T_FIX), padded_v(lengths[[1]], PRO_T_FIX)])
    phase = np.array([max(du[0], v[1]), max(du[1], v[0])])
    window = phase[[1, 0]]  # group 0 waits during phase 1, group 1 during phase 0
    carry = np.where(guess_held, np.floor(window / d), np.floor((window - v) / d))
    vain = np.where(guess_held, 0.0, np.floor(v / d))
    return dict(
        cycle=phase.sum(),
        t_draft=(lengths - used) * d,
        carry=np.minimum(carry, l_max),
        vain=vain,
        used=used,
        leftover=np.maximum(pre - used, 0),
        u=u,
    )


@pytest.mark.parametrize(
    "alpha, want_first_carry",
    [(0.999, [4, 6]), (0.01, [1, 3])],  # the guess holds / fails (checked on the draws)
)
def test_proactive_drafting_carries_tokens_into_the_next_cycle(alpha, want_first_carry):
    sim = _proactive_sim(alpha)
    pre = np.zeros(2)
    for cycle in range(4):
        geo = untruncated_geometric(sim)[0]
        held = geo >= PRO_L + 1  # whole draft and the bonus position accepted
        if cycle == 0:
            assert held.all() if alpha > 0.5 else not held.any()  # the forced guess
        want = _proactive_expectation(PRO_L, pre, held, 8)
        if cycle == 0:
            np.testing.assert_array_equal(want["carry"], want_first_carry)
        res = sim.step(PRO_L, np.full(2, 64.0), group=np.array([0, 1]))
        assert res.round_time_s[0] == want["cycle"]
        np.testing.assert_array_equal(res.t_draft_s[0], want["t_draft"])
        np.testing.assert_array_equal(res.t_upload_s[0], PRO_L * want["u"])
        np.testing.assert_array_equal(sim.predrafted[0], want["carry"])
        accepted = np.minimum(geo, PRO_L)
        np.testing.assert_array_equal(res.accepted[0], accepted)
        np.testing.assert_array_equal(res.committed[0], accepted + 1)
        wasted = PRO_L - accepted + want["vain"] + want["leftover"]
        np.testing.assert_array_equal(res.wasted[0], wasted)
        made = PRO_L - want["used"] + want["carry"] + want["vain"]
        np.testing.assert_allclose(res.energy_j[0], made * 1.0 + PRO_L * want["u"])
        pre = want["carry"]


def test_proactive_numbers_by_hand():
    sim = _proactive_sim(0.999)
    assert (untruncated_geometric(sim)[0] >= PRO_L + 1).all()
    res = sim.step(PRO_L, np.full(2, 64.0), group=np.array([0, 1]))
    assert res.round_time_s[0] == 10 * S
    np.testing.assert_array_equal(sim.predrafted[0], [4, 6])
    assert (untruncated_geometric(sim)[0] >= PRO_L + 1).all()
    res = sim.step(PRO_L, np.full(2, 64.0), group=np.array([0, 1]))
    # both start with their whole draft made: t_draft = 0, DU = l u = 3, 2;
    # cycle = max(3, 2.25) + max(2, 2.5) = 5.5; windows 2.5 and 3 -> carry 2, 3
    np.testing.assert_array_equal(res.t_draft_s[0], [0.0, 0.0])
    assert res.round_time_s[0] == 5.5 * S
    np.testing.assert_array_equal(sim.predrafted[0], [2, 3])
    np.testing.assert_array_equal(res.wasted[0], [1, 4])  # made ahead beyond the cap: 4-3, 6-2


def test_an_idle_user_loses_its_predrafted_tokens():
    sim = _proactive_sim(0.999)
    assert (untruncated_geometric(sim)[0] >= PRO_L + 1).all()
    sim.step(PRO_L, np.full(2, 64.0), group=np.array([0, 1]))
    np.testing.assert_array_equal(sim.predrafted[0], [4, 6])
    held = untruncated_geometric(sim)[0] >= PRO_L + 1
    assert held[0]
    res = sim.step(np.array([3, 0]), np.array([64.0, 0.0]), group=np.array([0, 1]))
    # group 1 is empty: phase 0 = max(3 u, 0) = 3, phase 1 = max(0, V_0 = 2.5) = 2.5;
    # user 0 waits 2.5 -> floor(2.5) = 2 tokens ahead; user 1 (cap 0) wastes its 6
    assert res.round_time_s[0] == 5.5 * S
    np.testing.assert_array_equal(sim.predrafted[0], [2, 0])
    assert res.wasted[0, 1] == 6 and res.committed[0, 1] == 0 and res.drafted[0, 1] == 0
    assert res.wasted[0, 0] == 3 - res.accepted[0, 0] + 1  # 4 made ahead, 3 used
    assert res.energy_j[0, 1] == 0.0


def test_proactive_carry_is_capped_at_max_draft_length():
    sim = _proactive_sim(0.999, max_draft_length=3)
    assert (untruncated_geometric(sim)[0] >= PRO_L + 1).all()
    sim.step(PRO_L, np.full(2, 64.0), group=np.array([0, 1]))
    np.testing.assert_array_equal(sim.predrafted[0], [3, 3])  # floor(W/d) = 4, 6 capped


def test_reset_clears_predrafted_tokens():
    sim = _proactive_sim(0.999)
    sim.step(PRO_L, np.full(2, 64.0), group=np.array([0, 1]))
    assert sim.predrafted.any()
    sim.reset(rng=np.random.default_rng(0))
    assert not sim.predrafted.any()


def test_proactive_window_is_the_wait_until_the_next_phase_with_three_groups():
    verification = {"kind": "token_aware", "t_fix_s": S, "t_user_s": T_USER}
    verification["t_token_s"] = T_TOKEN
    cfg = tiny(
        num_users=3,
        alpha=0.999,
        bandwidth_hz=64.0,
        pipeline_groups=3,
        proactive_drafting=True,
        verification=verification,
    )
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(0))
    lengths = np.array([3, 2, 1])
    assert (untruncated_geometric(sim)[0] >= lengths + 1).all()
    res = sim.step(lengths, np.full(3, 64.0), group=np.array([0, 1, 2]))
    # DU = 6, 4, 2; V = 2.5, 2.25, 2; phases max(DU_g, V_{g-1}) = 6, 4, 2.25 (/32)
    assert res.round_time_s[0] == 12.25 * S
    # group g drafts ahead from the end of its phase to the start of its next one:
    # W = cycle - own phase = 6.25, 8.25, 10, capped at L_max = 8
    np.testing.assert_array_equal(sim.predrafted[0], [6, 8, 8])


# --------------------------------------------------------------------------- 5. early stop


def _early_sim(num_users=50, num_envs=20, seed=0, **overrides):
    cfg = tiny(num_users=num_users, bandwidth_hz=1e6, early_stop=True, **overrides)
    sim = MultiSpinSimulator(cfg, num_envs=num_envs)
    sim.reset(rng=np.random.default_rng(seed))
    return sim


def test_early_stop_lengths_stay_within_one_and_the_cap():
    sim = _early_sim(num_users=20, num_envs=10)
    rng = np.random.default_rng(0)
    shape = (10, 20)
    for _ in range(20):
        caps = rng.integers(0, 9, size=shape)
        caps[:, 0] = np.maximum(caps[:, 0], 1)
        res = sim.step(caps, np.full(shape, 1e6 / 20), stop_threshold=rng.uniform(0, 0.99, shape))
        on = caps > 0
        assert np.all(res.drafted[on] >= 1) and np.all(res.drafted <= caps)
        assert not res.drafted[~on].any() and not res.committed[~on].any()
        assert np.all(res.accepted <= res.drafted)
        np.testing.assert_array_equal(res.verified, res.drafted)
        d = sim.config.t_draft_mean_s
        np.testing.assert_allclose(res.t_draft_s, res.drafted * d)


def test_threshold_zero_drafts_the_cap_and_near_one_drafts_one():
    sim = _early_sim(num_users=20, num_envs=10)
    shape = (10, 20)
    caps = np.full(shape, 6)
    for _ in range(10):
        res = sim.step(caps, np.full(shape, 1e6 / 20), stop_threshold=np.zeros(shape))
        np.testing.assert_array_equal(res.drafted, caps)
        res = sim.step(caps, np.full(shape, 1e6 / 20))  # default threshold 0
        np.testing.assert_array_equal(res.drafted, caps)
        res = sim.step(caps, np.full(shape, 1e6 / 20), stop_threshold=1.0 - 1e-9)
        np.testing.assert_array_equal(res.drafted, np.ones(shape))


def test_early_stop_rule_replayed_from_the_token_draws():
    """Token 1 is always drafted; token i + 1 only while c_{i+1} >= lambda; the accepted
    prefix is the run of accepted positions (accept w.p. a_i) within the draft."""
    cfg = tiny(num_users=5, bandwidth_hz=100.0, early_stop=True, draft_energy_j_per_token=0.1)
    sim = MultiSpinSimulator(cfg, num_envs=2)
    sim.reset(rng=np.random.default_rng(8))
    s, sigma = cfg.token_logit_std, cfg.confidence_noise_std
    np.testing.assert_allclose(sim.token_logit_mean, logit_mean_for(sim.alpha, s))
    rng = np.random.default_rng(1)
    stopped_early = 0
    for _ in range(15):
        caps = rng.integers(1, 9, size=(2, 5))
        lam = rng.uniform(0.0, 0.9, size=(2, 5))
        bw = np.full((2, 5), 20.0)
        want_len, want_acc = np.zeros_like(caps), np.zeros_like(caps)
        for n in range(2):
            for k in range(5):
                draws = [
                    _token_draw(
                        sim.keys[n], sim.round_index[n], i, k, sim.token_logit_mean[n, k], s, sigma
                    )
                    for i in range(caps[n, k])
                ]
                length = caps[n, k]
                for i in range(1, caps[n, k]):  # 0-based position i is token i + 1
                    if _sigmoid(draws[i][1]) < lam[n, k]:
                        length = i
                        break
                run = 0
                while run < length and draws[run][2]:
                    run += 1
                want_len[n, k], want_acc[n, k] = length, run
        u = cfg.payload_bits / (bw * sim.spectral_eff)
        res = sim.step(caps, bw, stop_threshold=lam)
        np.testing.assert_array_equal(res.drafted, want_len)
        np.testing.assert_array_equal(res.accepted, want_acc)
        np.testing.assert_array_equal(res.committed, want_acc + 1)
        np.testing.assert_array_equal(res.wasted, want_len - want_acc)
        np.testing.assert_allclose(res.energy_j, want_len * 0.1 + want_len * u, rtol=1e-12)
        finish = want_len * (cfg.t_draft_mean_s + u)
        v = np.array([padded_v(row) for row in want_len])
        np.testing.assert_allclose(res.round_time_s, finish.max(axis=1) + v, rtol=1e-12)
        stopped_early += int((want_len < caps).sum())
    assert stopped_early > 20  # the rule did act


def _replay_early_stop(sim, caps, lam):
    """(drafted, accepted, guess held) of the coming round from the per-token draws: the
    guess holds when the whole draft is accepted and so is the bonus position."""
    cfg = sim.config
    s, sigma = cfg.token_logit_std, cfg.confidence_noise_std
    n_envs, k_users = caps.shape
    length, run = np.zeros_like(caps), np.zeros_like(caps)
    held = np.zeros(caps.shape, dtype=bool)
    for n in range(n_envs):
        for k in range(k_users):
            if caps[n, k] == 0:
                continue
            m = sim.token_logit_mean[n, k]
            draws = [
                _token_draw(sim.keys[n], sim.round_index[n], i, k, m, s, sigma)
                for i in range(caps[n, k] + 1)
            ]
            ell = caps[n, k]
            for i in range(1, caps[n, k]):
                if _sigmoid(draws[i][1]) < lam[n, k]:
                    ell = i
                    break
            r = 0
            while r < ell and draws[r][2]:
                r += 1
            length[n, k], run[n, k] = ell, r
            held[n, k] = r == ell and draws[ell][2]
    return length, run, held


def test_early_stop_with_a_deadline_verifies_the_received_prefix_of_the_shortened_draft():
    cfg = tiny(num_users=3, early_stop=True, streaming_deadline=True, alpha=0.85)
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(3))
    rng = np.random.default_rng(4)
    u = cfg.payload_bits / STREAM_B
    for _ in range(30):
        sim.t_draft_s[:] = STREAM_D
        caps = rng.integers(1, 9, size=(1, 3))
        lam = rng.uniform(0, 0.8, size=(1, 3))
        deadline = rng.choice([6 * S, 9 * S, 13 * S, np.inf])
        length, run, _ = _replay_early_stop(sim, caps, lam)
        res = sim.step(caps[0], STREAM_B, stop_threshold=lam, deadline_s=deadline)
        np.testing.assert_array_equal(res.drafted, length)
        last = [arrival(STREAM_D[k], u[k], length[0, k]) for k in range(3)]
        t_stop = min(deadline, max(last))
        prefix = np.array(
            [
                sum(arrival(STREAM_D[k], u[k], i) <= t_stop for i in range(1, length[0, k] + 1))
                for k in range(3)
            ]
        )
        np.testing.assert_array_equal(res.verified[0], prefix)
        assert res.round_time_s[0] == t_stop + padded_v(prefix)
        np.testing.assert_array_equal(res.accepted[0], np.minimum(run[0], prefix))


def test_early_stop_with_proactive_groups_guesses_on_the_bonus_position():
    verification = {"kind": "token_aware", "t_fix_s": PRO_T_FIX, "t_user_s": T_USER}
    verification["t_token_s"] = T_TOKEN
    cfg = tiny(
        num_users=4,
        alpha=0.9,
        bandwidth_hz=64.0,
        early_stop=True,
        pipeline_groups=2,
        proactive_drafting=True,
        verification=verification,
    )
    sim = MultiSpinSimulator(cfg)
    sim.reset(rng=np.random.default_rng(5))
    group = np.array([0, 1, 0, 1])
    bw = np.full(4, 32.0)  # u = 2/32 for all, d = 1/32
    d, u = S, 2 * S
    rng = np.random.default_rng(6)
    pre = np.zeros(4)
    outcomes = set()
    for _ in range(40):
        caps = rng.integers(1, 7, size=(1, 4))
        lam = rng.uniform(0, 0.7, size=(1, 4))
        length, run, held = _replay_early_stop(sim, caps, lam)
        ell, held = length[0], held[0]
        used = np.minimum(pre, ell)
        du = (ell - used) * d + ell * u
        du_g = [du[group == g].max() for g in (0, 1)]
        v_g = [padded_v(ell[group == g], t_fix=PRO_T_FIX) for g in (0, 1)]
        phase = [max(du_g[0], v_g[1]), max(du_g[1], v_g[0])]
        window = np.array([phase[1 - g] for g in group])  # the other phase
        v_own = np.array([v_g[g] for g in group])
        carry = np.where(held, np.floor(window / d), np.floor((window - v_own) / d))
        carry = np.minimum(carry, cfg.max_draft_length)
        res = sim.step(caps[0], bw, stop_threshold=lam, group=group)
        np.testing.assert_array_equal(res.drafted[0], ell)
        np.testing.assert_array_equal(res.accepted[0], run[0])
        assert res.round_time_s[0] == phase[0] + phase[1]
        np.testing.assert_array_equal(res.t_draft_s[0], (ell - used) * d)
        np.testing.assert_array_equal(sim.predrafted[0], carry)
        vain = np.where(held, 0.0, np.floor(v_own / d))
        np.testing.assert_array_equal(res.wasted[0], ell - run[0] + vain + (pre - used))
        outcomes.update(held.tolist())
        pre = carry
    assert outcomes == {True, False}


@pytest.mark.parametrize("logit_std", [0.5, 1.5, 4.0])
def test_token_level_acceptance_keeps_the_geometric_law(logit_std):
    alpha, cap = 0.7, 5
    sim = _early_sim(alpha=alpha, token_logit_std=logit_std)
    shape = (20, 50)
    committed, accepted = [], []
    for _ in range(40):
        res = sim.step(np.full(shape, cap), np.full(shape, 1e6 / 50))
        committed.append(res.committed)
        accepted.append(res.accepted)
    committed, accepted = np.array(committed), np.array(accepted)  # 40k samples
    want = (1 - alpha ** (cap + 1)) / (1 - alpha)  # E[N | L], Eq. (12)
    se = committed.std() / math.sqrt(committed.size)
    assert abs(committed.mean() - want) < 5 * se
    for j in range(1, cap + 1):  # P(first j accepted) = alpha^j
        p = alpha**j
        assert abs((accepted >= j).mean() - p) < 5 * math.sqrt(p * (1 - p) / accepted.size)


def _acceptance_of_drafted_tokens(res):
    """Per-token acceptance of drafted tokens 2, 3, ...: among tokens j >= 2 that were
    drafted and reached (tokens 1..j-1 accepted), the fraction accepted. (The accepted prefix
    over drafted tokens would favour short drafts; this hazard does not.)"""
    reached = accepted = 0
    for j in range(2, int(res.drafted.max()) + 1):
        at_j = (res.drafted >= j) & (res.accepted >= j - 1)
        reached += at_j.sum()
        accepted += (at_j & (res.accepted >= j)).sum()
    return reached, accepted


def test_informative_confidence_raises_the_acceptance_of_drafted_tokens():
    """lambda = 0.6: with sigma = 0 a drafted token j >= 2 has a_j >= 0.6, so it is accepted
    more often than alpha; with sigma = 100 the confidence is noise and the stop rule picks
    tokens blindly (acceptance alpha)."""
    alpha, rates = 0.75, {}
    for noise in (0.0, 100.0):
        sim = _early_sim(alpha=alpha, confidence_noise_std=noise, num_envs=10)
        shape = (10, 50)
        reached = accepted = 0
        for _ in range(20):
            res = sim.step(np.full(shape, 8), np.full(shape, 1e6 / 50), stop_threshold=0.6)
            r, a = _acceptance_of_drafted_tokens(res)
            reached, accepted = reached + r, accepted + a
        rates[noise] = accepted / reached
        assert reached > 5000
    assert rates[100.0] == pytest.approx(alpha, abs=0.025)
    assert rates[0.0] > rates[100.0] + 0.05


@pytest.mark.parametrize("logit_std", [0.3, 1.5, 4.0])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.75, 0.97])
def test_logit_mean_for_solves_the_mean_acceptance(alpha, logit_std):
    m = float(logit_mean_for(np.array([alpha]), logit_std)[0])
    z = np.random.default_rng(0).standard_normal(400_000)
    a = _sigmoid(m + logit_std * z)
    assert abs(a.mean() - alpha) < 5 * a.std() / math.sqrt(z.size)  # Monte Carlo
    exact, _ = integrate.quad(
        lambda x: _sigmoid(m + logit_std * x) * math.exp(-x * x / 2) / math.sqrt(2 * math.pi),
        -12,
        12,
        epsabs=1e-12,
    )
    assert exact == pytest.approx(alpha, abs=1e-5)


@pytest.mark.parametrize(
    "logit_std, alpha", [(20.0, 0.95), (20.0, 0.01), (12.0, 0.999), (20.0, 0.9)]
)
def test_logit_mean_for_over_the_whole_config_range(logit_std, alpha):
    m = float(logit_mean_for(np.array([alpha]), logit_std)[0])
    exact, _ = integrate.quad(
        lambda x: _sigmoid(m + logit_std * x) * math.exp(-x * x / 2) / math.sqrt(2 * math.pi),
        -12,
        12,
        points=[-m / logit_std],
        epsabs=1e-13,
    )
    assert exact == pytest.approx(alpha, abs=1e-3)


def test_geometric_law_holds_at_the_largest_allowed_logit_std():
    alpha = 0.95
    sim = _early_sim(alpha=alpha, token_logit_std=20.0)
    shape = (20, 50)
    accepted = np.array(
        [sim.step(np.full(shape, 2), np.full(shape, 1e6 / 50)).accepted for _ in range(20)]
    )  # 20k samples, se ~ 0.0015
    assert (accepted >= 1).mean() == pytest.approx(alpha, abs=0.008)


# --------------------------------------------------------------------------- 6. determinism

PROTOCOLS = [
    {"early_stop": True},
    {"streaming_deadline": True},
    {"early_stop": True, "streaming_deadline": True},
    {"pipeline_groups": 2},
    {"pipeline_groups": 3, "proactive_drafting": False},
    {"early_stop": True, "pipeline_groups": 2},
]


def _decisions(cfg, rng, n):
    k = cfg.num_users
    lengths = rng.integers(0, 9, size=(n, k))
    lengths[:, 0] = np.maximum(lengths[:, 0], 1)
    kw = {}
    if cfg.early_stop:
        kw["stop_threshold"] = rng.uniform(0, 0.9, size=(n, k))
    if cfg.streaming_deadline:
        kw["deadline_s"] = rng.uniform(0.05, 0.4, size=n)
    if cfg.pipeline_groups > 1:
        kw["group"] = rng.integers(0, cfg.pipeline_groups, size=(n, k))
    return lengths, np.full((n, k), cfg.bandwidth_hz / k), kw


_FIELDS = (
    "drafted",
    "verified",
    "accepted",
    "committed",
    "wasted",
    "expected_tokens",
    "t_draft_s",
    "t_upload_s",
    "t_verify_s",
    "round_time_s",
    "straggler",
    "energy_j",
    "request_done",
)


@pytest.mark.parametrize("switches", PROTOCOLS, ids=lambda s: "+".join(s))
def test_protocols_are_deterministic_and_batch_equals_singles(switches):
    cfg = load_preset("realistic-llama2", num_users=6, request_length_tokens=12, **switches)
    keys = new_keys(np.random.default_rng(11), 4)
    batched, again = MultiSpinSimulator(cfg, num_envs=4), MultiSpinSimulator(cfg, num_envs=4)
    batched.reset(keys=keys)
    again.reset(keys=keys)
    singles = [MultiSpinSimulator(cfg) for _ in range(4)]
    for sim, key in zip(singles, keys, strict=True):
        sim.reset(keys=key[None])
    rng = np.random.default_rng(0)
    for _ in range(25):
        lengths, bw, kw = _decisions(cfg, rng, 4)
        res, res2 = batched.step(lengths, bw, **kw), again.step(lengths, bw, **kw)
        for name in _FIELDS:
            np.testing.assert_array_equal(getattr(res, name), getattr(res2, name), err_msg=name)
        for i, sim in enumerate(singles):
            one = sim.step(
                lengths[i : i + 1],
                bw[i : i + 1],
                **{key: value[i : i + 1] if np.ndim(value) else value for key, value in kw.items()},
            )
            for name in _FIELDS:
                np.testing.assert_array_equal(
                    getattr(one, name)[0], getattr(res, name)[i], err_msg=name
                )
            np.testing.assert_array_equal(sim.predrafted[0], batched.predrafted[i])
            np.testing.assert_array_equal(sim.alpha[0], batched.alpha[i])
            np.testing.assert_array_equal(sim.remaining_tokens[0], batched.remaining_tokens[i])
    # another key, another trajectory
    first, other = MultiSpinSimulator(cfg, num_envs=4), MultiSpinSimulator(cfg, num_envs=4)
    first.reset(keys=keys)
    other.reset(keys=keys + np.uint64(1))
    lengths, bw, kw = _decisions(cfg, np.random.default_rng(0), 4)
    a, b = first.step(lengths, bw, **kw), other.step(lengths, bw, **kw)
    assert not np.array_equal(a.round_time_s, b.round_time_s)


# --------------------------------------------------------------------------- 7. energy


@pytest.mark.parametrize(
    "switches",
    [{"early_stop": True}, {"pipeline_groups": 2, "proactive_drafting": False}],
    ids=["early_stop", "groups2"],
)
def test_energy_and_waste_without_proactive_or_deadline(switches):
    cfg = load_preset("realistic-llama2", num_users=8, draft_energy_j_per_token=0.05, **switches)
    sim = MultiSpinSimulator(cfg, num_envs=3)
    sim.reset(rng=np.random.default_rng(6))
    rng = np.random.default_rng(2)
    for _ in range(15):
        lengths, bw, kw = _decisions(cfg, rng, 3)
        u = cfg.payload_bits / (bw * sim.spectral_eff)
        res = sim.step(lengths, bw, **kw)
        np.testing.assert_array_equal(res.wasted, res.drafted - res.accepted)
        np.testing.assert_array_equal(res.verified, res.drafted)
        want = res.drafted * 0.05 + cfg.tx_power_w * res.verified * u
        np.testing.assert_allclose(res.energy_j, want, rtol=1e-12)
        np.testing.assert_allclose(res.t_upload_s, res.drafted * u, rtol=1e-12)


# --------------------------------------------------------------------------- 8. config


def test_protocol_switches_in_the_config():
    assert not tiny().extended_protocol and tiny().protocol_name == "sync"
    assert tiny(early_stop=True).protocol_name == "early_stop"
    assert tiny(early_stop=True, streaming_deadline=True).protocol_name == "early_stop+deadline"
    assert tiny(pipeline_groups=3).protocol_name == "groups3"
    assert tiny(pipeline_groups=2, early_stop=True).protocol_name == "early_stop+groups2"
    for switches in ({"early_stop": True}, {"streaming_deadline": True}, {"pipeline_groups": 2}):
        assert tiny(**switches).extended_protocol
    # the model parameters alone switch nothing on
    assert not tiny(token_logit_std=3.0, confidence_noise_std=0.0).extended_protocol
    assert not tiny(proactive_drafting=False).extended_protocol
    cfg = load_preset("paper-llama2", early_stop=True, pipeline_groups=4)
    assert ScenarioConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"pipeline_groups": 2, "streaming_deadline": True}, "streaming_deadline"),
        ({"pipeline_groups": 0}, "pipeline_groups"),
        ({"pipeline_groups": 9}, "pipeline_groups"),
        ({"token_logit_std": -1.0}, "token_logit_std"),
        ({"token_logit_std": 0.0}, "token_logit_std"),
        ({"token_logit_std": float("nan")}, "token_logit_std"),
        ({"confidence_noise_std": -0.5}, "confidence_noise_std"),
        ({"confidence_noise_std": float("inf")}, "confidence_noise_std"),
    ],
)
def test_bad_protocol_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ScenarioConfig.{field}"):
        load_preset("paper-llama2", **overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"pipeline_groups": 2.0}, "pipeline_groups"),
        ({"early_stop": "yes"}, "early_stop"),
        ({"proactive_drafting": 1}, "proactive_drafting"),
    ],
)
def test_protocol_fields_are_typed(overrides, field):
    with pytest.raises(TypeError, match=field):
        load_preset("paper-llama2", **overrides)


def test_resolve_levers_defaults_broadcasts_and_names_the_bad_lever():
    """One check for the simulator and the live server (live used to refuse an infinite
    deadline that the simulator accepts)."""
    from multispin_env.protocols import resolve_levers

    stop, deadline, group = resolve_levers((2, 3), 2)
    assert (stop == 0).all() and np.isinf(deadline).all() and group.tolist() == [[0, 1, 0]] * 2
    stop, deadline, group = resolve_levers((1, 3), 3, 0.4, [np.inf], [2, 0, 1])
    assert stop.shape == (1, 3) and np.isinf(deadline[0]) and group.tolist() == [[2, 0, 1]]
    assert group.dtype == np.int64 and group.flags.c_contiguous
    for kwargs, name in (
        ({"stop_threshold": 1.0}, "stop_threshold"),
        ({"stop_threshold": [0.1, 0.2]}, "stop_threshold"),
        ({"deadline_s": 0.0}, "deadline_s"),
        ({"deadline_s": [np.nan]}, "deadline_s"),
        ({"group": [0, 1, 2]}, "group"),
        ({"group": [0.0, 1.0, 0.0]}, "group"),
    ):
        with pytest.raises(ValueError, match=name):
            resolve_levers((1, 3), 2, **kwargs)
