"""Extended protocols around the simulator: codec levers, tuned heuristics, observation
features, env parity, the per-user policy's layout, the harness and bundles.

Written as an independent check of the documented behaviour (module docstrings of
multispin_env.action_codec, multispin_env.observation, multispin_agents.tuned and
multispin_agents.per_user_policy): expected values are recomputed here by hand from the
formulas those docstrings state, not taken from the code under test.
"""

from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import multispin_env  # noqa: F401  (registers the ids)
from multispin_agents.bundle import BundleError, lever_action_size, validate_sidecar
from multispin_agents.per_user_policy import (
    PerUserActorCriticPolicy,
    env_layout,
    permute_users,
)
from multispin_agents.policies import SolverPolicy
from multispin_agents.solvers import hete_multispin
from multispin_agents.tuned import (
    TunedHeuristic,
    balanced_groups,
    predicted_streaming_finish_s,
)
from multispin_env.action_codec import ActionCodec, ProtocolLevers
from multispin_env.config import load_preset
from multispin_env.env import build_episodes
from multispin_env.episodes import ServerView
from multispin_env.observation import BASE_FEATURES, GLOBAL_FEATURES, USER_FEATURES
from multispin_env.registration import ENV_IDS, resolve_env_id, synchronous_id
from multispin_eval.harness import SolverController, run_episodes, seed_keys

SCENARIOS = ("PaperLlama2", "RealisticLlama2")
PROTOCOLS = ("EarlyStop", "Deadline", "Pipeline")
EXTENDED_IDS = [f"multispin/{s}{p}-v0" for s in SCENARIOS for p in PROTOCOLS]
BOX_MODES = ("full", "lengths", "homogeneous", "residual")
DECISION_FIELDS = ("draft_lengths", "bandwidth_hz", "stop_threshold", "deadline_s", "group")


def _episodes(env_id: str, num_envs: int = 3, seeds=None, **kwargs):
    """A BatchedEpisodes of a registered id (plus kwargs), reset on ``seeds``."""
    preset, id_kwargs = resolve_env_id(env_id)
    episodes, space = build_episodes(preset, {**id_kwargs, **kwargs}, num_envs=num_envs)
    seeds = list(range(num_envs)) if seeds is None else list(seeds)
    episodes.reset(seed_keys(seeds), np.arange(num_envs))
    return episodes, space


def _mode_kwargs(mode: str) -> dict:
    return {"action_mode": mode, **({"base_policy": "hete"} if mode == "residual" else {})}


def _decode(episodes, action):
    return episodes.codec.decode_decision(episodes.codec.check(action), episodes.context())


def _assert_feasible(decision, episodes):
    cfg = episodes.config
    b, l_max, groups = cfg.bandwidth_hz, cfg.max_draft_length, cfg.pipeline_groups
    lengths = decision.draft_lengths
    assert np.issubdtype(lengths.dtype, np.integer)
    assert lengths.min() >= 1 and lengths.max() <= l_max
    assert np.all(decision.bandwidth_hz > 0)
    if cfg.early_stop:
        stop = decision.stop_threshold
        assert stop is not None and stop.shape == lengths.shape
        assert stop.min() >= 0.0 and stop.max() <= 0.95
    else:
        assert decision.stop_threshold is None
    if cfg.streaming_deadline:
        deadline = decision.deadline_s
        assert deadline is not None and deadline.shape == (episodes.num_envs,)
        assert np.all(np.isfinite(deadline)) and np.all(deadline > 0)
    else:
        assert decision.deadline_s is None
    if groups > 1:
        group = decision.group
        assert group is not None and group.shape == lengths.shape
        assert np.issubdtype(group.dtype, np.integer)
        assert group.min() >= 0 and group.max() < groups
        for g in range(groups):
            members = group == g
            total = np.where(members, decision.bandwidth_hz, 0.0).sum(axis=1)
            rows = members.any(axis=1)
            np.testing.assert_allclose(total[rows], b, rtol=1e-6)
    else:
        assert decision.group is None
        np.testing.assert_allclose(decision.bandwidth_hz.sum(axis=1), b, rtol=1e-6)


# ---------------------------------------------------------------------------- registration


def test_extended_ids_are_registered_with_their_switches_and_synchronous_ids():
    for scenario in SCENARIOS:
        sync = f"multispin/{scenario}-v0"
        assert sync in ENV_IDS and synchronous_id(sync) is None
        for protocol in PROTOCOLS:
            env_id = f"multispin/{scenario}{protocol}-v0"
            assert env_id in gym.registry
            assert synchronous_id(env_id) == sync
            cfg = gym.make(env_id).unwrapped.config
            assert cfg.early_stop == (protocol == "EarlyStop")
            assert cfg.streaming_deadline == (protocol == "Deadline")
            assert cfg.pipeline_groups == (2 if protocol == "Pipeline" else 1)
    assert synchronous_id("multispin/NotThereDeadline-v0") is None
    assert synchronous_id("multispin/PaperLlama2Dynamic-v0") is None


# ---------------------------------------------------------------------------- 1. codec


@pytest.mark.parametrize("env_id", EXTENDED_IDS)
@pytest.mark.parametrize("mode", BOX_MODES)
def test_random_and_extreme_actions_decode_to_feasible_decisions(env_id, mode):
    episodes, _ = _episodes(env_id, num_envs=6, **_mode_kwargs(mode))
    codec = episodes.codec
    width = codec.space.shape[0]
    assert width == codec.base_width + ProtocolLevers.of(episodes.config).width(codec.max_users)
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64, np.float32):
        action = rng.uniform(-3.0, 3.0, (6, width))
        action[0], action[1], action[2] = 1.0, -1.0, 0.0  # the edges and the middle
        action[3] = 1e9 * np.where(rng.random(width) < 0.5, -1.0, 1.0)  # far outside the box
        action[4] = np.nextafter(dtype(1.0), dtype(2.0))  # just above the box
        decision = _decode(episodes, action.astype(dtype))
        _assert_feasible(decision, episodes)
        episodes.step_decision(decision, validate=True)
    env = gym.make(env_id, **_mode_kwargs(mode))
    env.reset(seed=3)
    for _ in range(3):
        action = rng.uniform(-5.0, 5.0, width).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        assert np.isfinite(reward) and env.observation_space.contains(obs)
        assert info["draft_lengths"].min() >= 1


@pytest.mark.parametrize("env_id", EXTENDED_IDS)
@pytest.mark.parametrize("mode", ["lengths_discrete", "homogeneous_discrete"])
def test_discrete_modes_refuse_the_levers(env_id, mode):
    with pytest.raises(ValueError, match="extended protocol's levers"):
        gym.make(env_id, action_mode=mode)
    levers = ProtocolLevers.of(gym.make(env_id).unwrapped.config)
    with pytest.raises(ValueError, match="levers"):
        ActionCodec(mode, 20, 25, levers)


def test_absolute_lever_entries_decode_by_the_documented_formulas():
    # stop: 0.475 (a + 1); group: floor((a + 1) G / 2) in [0, G); full: per-group softmax
    episodes, _ = _episodes("multispin/PaperLlama2EarlyStop-v0", 2, action_mode="full")
    k, kmax = 20, episodes.codec.max_users
    rng = np.random.default_rng(1)
    action = rng.uniform(-1, 1, (2, 3 * kmax)).astype(np.float32)
    decision = _decode(episodes, action)
    np.testing.assert_allclose(
        decision.stop_threshold, 0.475 * (action[:, 2 * kmax : 2 * kmax + k] + 1.0), rtol=1e-6
    )

    for groups in (2, 3):
        episodes, _ = _episodes(
            "multispin/PaperLlama2Pipeline-v0", 2, action_mode="full", pipeline_groups=groups
        )
        action = rng.uniform(-1, 1, (2, 3 * kmax)).astype(np.float32)
        action[0, 2 * kmax] = 1.0  # the top edge is the last group
        action[0, 2 * kmax + 1] = -1.0
        decision = _decode(episodes, action)
        raw = action[:, 2 * kmax : 2 * kmax + k].astype(np.float64)
        want_group = np.minimum(np.floor((raw + 1.0) * groups / 2), groups - 1)
        np.testing.assert_array_equal(decision.group, want_group)
        assert decision.group[0, 0] == groups - 1 and decision.group[0, 1] == 0
        logits = 1.5 * action[:, kmax : kmax + k].astype(np.float64)
        for n in range(2):
            for g in range(groups):
                m = decision.group[n] == g
                if m.any():
                    e = np.exp(logits[n, m] - logits[n, m].max())
                    np.testing.assert_allclose(
                        decision.bandwidth_hz[n, m], e / e.sum() * episodes.config.bandwidth_hz,
                        rtol=1e-9,
                    )  # fmt: skip


@pytest.mark.parametrize("mode", ["full", "lengths", "homogeneous"])
def test_absolute_deadline_is_a_fraction_of_the_predicted_last_arrival(mode):
    # D = (0.2 + 0.4 (a + 1)) x max_k [d + u + (L - 1) max(d, u)] of the decoded allocation
    episodes, _ = _episodes("multispin/RealisticLlama2Deadline-v0", 3, action_mode=mode)
    cfg, sim = episodes.config, episodes.sim
    rng = np.random.default_rng(2)
    action = rng.uniform(-1, 1, (3,) + episodes.codec.space.shape).astype(np.float32)
    action[:, -1] = [-1.0, 0.0, 1.0]
    decision = _decode(episodes, action)
    d = sim.t_draft_s
    u = cfg.payload_bits / (decision.bandwidth_hz * sim.spectral_eff_estimate)
    last = (d + u + (decision.draft_lengths - 1) * np.maximum(d, u)).max(axis=1)
    np.testing.assert_allclose(decision.deadline_s, np.array([0.2, 0.6, 1.0]) * last, rtol=1e-9)


def test_codec_layout_counts_lever_entries_per_user_and_global():
    for stop, deadline, groups in [(True, False, 1), (False, True, 1), (False, False, 2),
                                   (True, True, 1), (True, False, 3)]:  # fmt: skip
        lev = ProtocolLevers(stop, deadline, groups)
        extra_user = int(stop) + int(groups > 1)
        for mode, base_per_user in (("full", 2), ("lengths", 1), ("residual", 1)):
            codec = ActionCodec(mode, 8, 25, lev)
            assert codec.layout() == (base_per_user + extra_user, int(deadline))
            per_user, glob = codec.layout()
            assert codec.space.shape == (8 * per_user + glob,)
        codec = ActionCodec("homogeneous", 8, 25, lev)
        assert codec.layout() == (0, codec.space.shape[0])
        assert codec.space.shape == (1 + 8 * extra_user + int(deadline),)


def test_combined_levers_are_read_in_the_documented_order():
    # early stop with a deadline, and early stop with groups: stop entries come first, then
    # group entries, then the deadline (last); slots beyond the K active users are ignored
    k, kmax = 5, 8
    rng = np.random.default_rng(9)
    for extra, per_user, glob in (
        ({"streaming_deadline": True}, 3, 1),
        ({"pipeline_groups": 2}, 4, 0),
    ):
        episodes, _ = _episodes(
            "multispin/PaperLlama2EarlyStop-v0", 2, action_mode="full", num_users=k,
            max_users=kmax, **extra,
        )  # fmt: skip
        assert episodes.codec.layout() == (per_user, glob)
        action = rng.uniform(-1, 1, (2, kmax * per_user + glob)).astype(np.float32)
        decision = _decode(episodes, action)
        stop = action[:, 2 * kmax : 2 * kmax + k].astype(np.float64)
        np.testing.assert_allclose(decision.stop_threshold, 0.475 * (stop + 1), rtol=1e-6)
        if "pipeline_groups" in extra:
            raw = action[:, 3 * kmax : 3 * kmax + k].astype(np.float64)
            np.testing.assert_array_equal(decision.group, np.minimum(np.floor(raw + 1), 1))
        _assert_feasible(decision, episodes)
        padded = action.copy()
        for block in range(per_user):
            padded[:, block * kmax + k : (block + 1) * kmax] = rng.uniform(-1, 1, (2, kmax - k))
        again = _decode(episodes, padded)
        for name in DECISION_FIELDS:
            if getattr(decision, name) is not None:
                np.testing.assert_array_equal(getattr(again, name), getattr(decision, name))
        episodes.step_decision(decision)


# ---------------------------------------------------------------------------- 2. residual


@pytest.mark.parametrize("env_id", EXTENDED_IDS)
@pytest.mark.parametrize(
    "base", ["hete", "tuned[hete,history,cap=8,margin=0.8,mix=0.1,stop=0.3,scale=1.5,deadline=0.7]"]
)
def test_residual_zero_action_is_the_base_decision_exactly(env_id, base):
    episodes, _ = _episodes(env_id, 3, action_mode="residual", base_policy=base)
    # stored in canonical form, protocol knobs included
    assert episodes.options.base_policy == TunedHeuristic.parse(base, 25).name
    for _ in range(2):
        want = episodes.base_decision()
        # the base decides on the server view, by its own rule
        again = TunedHeuristic.parse(episodes.options.base_policy).decide(episodes.server_view())
        got = _decode(episodes, np.zeros((3,) + episodes.codec.space.shape, np.float32))
        for name in DECISION_FIELDS:
            w, g, a = getattr(want, name), getattr(got, name), getattr(again, name)
            assert (w is None) == (g is None) == (a is None), name
            if w is not None:
                np.testing.assert_array_equal(g, w, err_msg=name)
                np.testing.assert_array_equal(a, w, err_msg=name)
        _assert_feasible(got, episodes)
        episodes.step_decision(got)


def test_residual_group_action_moves_users_and_resplits_the_band_by_the_base_rule():
    base = "tuned[hete,prior,cap=25,margin=0.8,mix=0.1]"
    episodes, _ = _episodes(
        "multispin/PaperLlama2Pipeline-v0", 2, action_mode="residual", base_policy=base
    )
    kmax, k = episodes.codec.max_users, 20
    want = episodes.base_decision()
    action = np.zeros((2, 2 * kmax), np.float32)
    action[:, kmax + 3] = 0.51  # user 3 moves on
    action[:, kmax + 7] = 0.5  # not > 0.5: stays
    action[:, kmax + 11] = 1.0
    got = _decode(episodes, action)
    moved = np.zeros((2, k), bool)
    moved[:, [3, 11]] = True
    np.testing.assert_array_equal(got.group, np.where(moved, (want.group + 1) % 2, want.group))
    np.testing.assert_array_equal(got.draft_lengths, want.draft_lengths)
    heuristic = TunedHeuristic.parse(base)
    view = episodes.server_view()
    np.testing.assert_allclose(
        got.bandwidth_hz, heuristic.bandwidth_for(view, want.draft_lengths, got.group), rtol=1e-12
    )
    _assert_feasible(got, episodes)
    # the base's rule by hand: latency-equalising within each group on r x margin, then
    # (1 - mix) B_k + mix B / K_g
    b, q = episodes.config.bandwidth_hz, episodes.config.payload_bits
    for n in range(2):
        for g in range(2):
            m = got.group[n] == g
            pure = (got.bandwidth_hz[n, m] - 0.1 * b / m.sum()) / 0.9
            lengths = want.draft_lengths[n, m]
            latency = lengths * (
                view.t_draft_s[n, m] + q / (pure * 0.8 * view.spectral_eff_est[n, m])
            )
            np.testing.assert_allclose(latency, latency[0], rtol=1e-7)


def test_residual_stop_and_deadline_corrections():
    base = "tuned[hete,prior,cap=25,margin=1.0,mix=0.0,stop=0.9,deadline=0.8]"
    episodes, _ = _episodes(
        "multispin/PaperLlama2Deadline-v0", 3, action_mode="residual", base_policy=base
    )
    want = episodes.base_decision()
    action = np.zeros((3, 21), np.float32)
    action[:, -1] = [1.0, -1.0, 7.0]  # 7 is clipped to 1
    got = _decode(episodes, action)
    np.testing.assert_allclose(
        got.deadline_s, want.deadline_s * np.exp(0.5 * np.array([1.0, -1.0, 1.0])), rtol=1e-12
    )
    np.testing.assert_array_equal(got.draft_lengths, want.draft_lengths)

    episodes, _ = _episodes(
        "multispin/PaperLlama2EarlyStop-v0", 2, action_mode="residual", base_policy=base
    )
    want = episodes.base_decision()
    np.testing.assert_array_equal(want.stop_threshold, np.full((2, 20), 0.9))
    action = np.zeros((2, 40), np.float32)
    action[:, 20] = 1.0  # 0.9 + 0.25 -> clipped to 0.95
    action[:, 21] = -1.0  # 0.65
    action[:, 22] = -0.4  # 0.8
    got = _decode(episodes, action)
    np.testing.assert_allclose(got.stop_threshold[:, :3], [[0.95, 0.65, 0.8]] * 2, atol=1e-7)
    np.testing.assert_array_equal(got.stop_threshold[:, 3:], want.stop_threshold[:, 3:])


def test_residual_length_correction_keeps_levers_and_uses_the_base_bandwidth_rule():
    base = "tuned[hete,prior,cap=25,margin=0.9,mix=0.0,stop=0.4]"
    episodes, _ = _episodes(
        "multispin/RealisticLlama2EarlyStop-v0", 2, action_mode="residual", base_policy=base
    )
    want = episodes.base_decision()
    action = np.zeros((2, 40), np.float32)
    action[:, 0] = 1.0  # + residual_range(25) = 7
    got = _decode(episodes, action)
    np.testing.assert_array_equal(
        got.draft_lengths[:, 0], np.minimum(want.draft_lengths[:, 0] + 7, 25)
    )
    np.testing.assert_array_equal(got.stop_threshold, want.stop_threshold)
    np.testing.assert_allclose(
        got.bandwidth_hz,
        TunedHeuristic.parse(base).bandwidth_for(episodes.server_view(), got.draft_lengths),
        rtol=1e-12,
    )


# ---------------------------------------------------------------------------- 3. tuned


def test_tuned_spec_round_trips_with_protocol_knobs_and_sync_names_stay_short():
    knobs = [
        TunedHeuristic(),
        TunedHeuristic("homo", "history", 6, 0.8, 0.1, True, 0.3, 1.7, 0.65),
        TunedHeuristic(stop_threshold=0.0),
        TunedHeuristic(cap_scale=0.25, deadline_scale=4.0),
        TunedHeuristic("uni_bw", stop_threshold=0.1 + 0.2, deadline_scale=1 / 3),
    ]
    for h in knobs:
        assert TunedHeuristic.parse(h.name) == h, h.name
    assert "stop=" not in TunedHeuristic().name
    assert "scale=" not in TunedHeuristic().name
    assert "deadline=" not in TunedHeuristic().name
    assert TunedHeuristic().name == "tuned[hete,prior,cap=25,margin=1.0,mix=0.0]"
    name = TunedHeuristic(stop_threshold=0.3).name
    assert "stop=0.3" in name and "scale=" not in name and "deadline=" not in name
    parsed = TunedHeuristic.parse("tuned[stop=0.2,scale=2,deadline=0.5,hete]")
    assert (parsed.stop_threshold, parsed.cap_scale, parsed.deadline_scale) == (0.2, 2.0, 0.5)
    for bad in ("tuned[stop=1.0]", "tuned[scale=5]", "tuned[deadline=0.01]"):
        with pytest.raises(ValueError):
            TunedHeuristic.parse(bad)


def _hand_view(t_draft, spectral_eff, bandwidth_hz=1e6, payload_bits=1000.0) -> ServerView:
    t_draft = np.asarray(t_draft, dtype=np.float64)
    spectral_eff = np.asarray(spectral_eff, dtype=np.float64)
    alpha = np.full(t_draft.shape, 0.7)
    return ServerView(
        spectral_eff_est=spectral_eff,
        t_draft_s=t_draft,
        alpha_prior=alpha,
        alpha_hat=alpha,
        payload_bits=payload_bits,
        bandwidth_hz=bandwidth_hz,
        max_draft_length=25,
        verification=load_preset("paper-llama2").verification_model,
        oracle_alpha=None,
        oracle_spectral_eff=None,
        pipeline_groups=2,
    )


def _snake(k: int, groups: int) -> np.ndarray:
    rank = np.arange(k)
    lap, seat = rank // groups, rank % groups
    return np.where(lap % 2 == 0, seat, groups - 1 - seat)


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("margin", [1.0, 0.1])
def test_balanced_groups_deal_users_sorted_by_per_token_time_in_snake_order(groups, margin):
    t_draft = [
        [0.030, 0.010, 0.050, 0.020, 0.060, 0.040],  # channels equal: drafting decides
        [0.020, 0.020, 0.020, 0.020, 0.020, 0.020],  # drafting equal: channels decide
        [0.050, 0.001, 0.030, 0.010, 0.002, 0.004],  # the margin reorders fast drafters
    ]
    spectral_eff = [
        [5.0] * 6,
        [1.0, 6.0, 2.0, 5.0, 3.0, 4.0],
        [50.0, 0.6, 40.0, 2.0, 1.0, 0.8],
    ]
    view = _hand_view(t_draft, spectral_eff)
    group = balanced_groups(view, groups, margin)
    assert group.shape == (3, 6)
    # per-token draft + upload at an equal share of the band: each group has the whole band
    share = 1e6 * groups / 6
    per_token = np.asarray(t_draft) + 1000.0 / (share * np.asarray(spectral_eff) * margin)
    for n in range(3):
        assert np.array_equal(np.bincount(group[n], minlength=groups), [6 // groups] * groups)
        # dealt in snake order along the sorted users (the docstring does not fix the
        # direction of the sort, so either is accepted)
        slow_first = group[n][np.argsort(-per_token[n], kind="stable")]
        fast_first = group[n][np.argsort(per_token[n], kind="stable")]
        snake = _snake(6, groups)
        assert np.array_equal(slow_first, snake) or np.array_equal(fast_first, snake), (
            n,
            group[n],
            per_token[n],
        )


def test_balanced_groups_margin_changes_the_order_when_uploads_matter():
    view = _hand_view([[0.050, 0.001, 0.030, 0.010]], [[50.0, 0.6, 40.0, 2.0]])
    assert not np.array_equal(balanced_groups(view, 2, 1.0), balanced_groups(view, 2, 0.05))


def test_tuned_decide_under_deadline_caps_and_deadline_by_hand():
    episodes, _ = _episodes("multispin/RealisticLlama2Deadline-v0", 3)
    view = episodes.server_view()
    h = TunedHeuristic(csi_margin=0.8, cap_scale=1.5, deadline_scale=0.7, fast=True)
    decision = h.decide(view)
    assert decision.stop_threshold is None and decision.group is None
    solver_lengths, _ = h.act(view)
    want_lengths = np.clip(np.rint(solver_lengths * 1.5), 1, 25)
    np.testing.assert_array_equal(decision.draft_lengths, want_lengths)
    assert (decision.draft_lengths > solver_lengths).any()
    b, q = episodes.config.bandwidth_hz, episodes.config.payload_bits
    bw = decision.bandwidth_hz
    np.testing.assert_allclose(bw.sum(axis=1), b, rtol=1e-9)
    # latency-equalising for the capped lengths on the margin-scaled channel
    r = view.spectral_eff_est * 0.8
    latency = decision.draft_lengths * (view.t_draft_s + q / (bw * r))
    np.testing.assert_allclose(latency, latency[:, :1] * np.ones_like(latency), rtol=1e-7)
    d, u = view.t_draft_s, q / (bw * r)
    finish = d + u + (decision.draft_lengths - 1) * np.maximum(d, u)
    np.testing.assert_allclose(decision.deadline_s, 0.7 * finish.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(
        predicted_streaming_finish_s(view, decision.draft_lengths, bw, 0.8), finish, rtol=1e-12
    )
    zero = predicted_streaming_finish_s(view, np.zeros_like(decision.draft_lengths), bw, 0.8)
    assert np.all(zero == 0.0)


def test_tuned_decide_under_early_stop_sets_every_threshold():
    episodes, _ = _episodes("multispin/PaperLlama2EarlyStop-v0", 2)
    view = episodes.server_view()
    h = TunedHeuristic(stop_threshold=0.35)
    decision = h.decide(view)
    np.testing.assert_array_equal(decision.stop_threshold, np.full((2, 20), 0.35))
    assert decision.deadline_s is None and decision.group is None
    lengths, bandwidth = h.act(view)  # cap_scale 1: the solver's allocation as it is
    np.testing.assert_array_equal(decision.draft_lengths, lengths)
    np.testing.assert_array_equal(decision.bandwidth_hz, bandwidth)
    # the synchronous round: a plain decision with no levers
    sync, _ = _episodes("multispin/PaperLlama2-v0", 2)
    plain = h.decide(sync.server_view())
    assert plain.stop_threshold is None and plain.deadline_s is None and plain.group is None


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tuned_decide_under_pipeline_solves_each_balanced_group_alone(scenario):
    episodes, _ = _episodes(f"multispin/{scenario}Pipeline-v0", 2)
    view = episodes.server_view()
    b, q, l_max = episodes.config.bandwidth_hz, episodes.config.payload_bits, 25
    h = TunedHeuristic(fast=False)
    decision = h.decide(view)
    np.testing.assert_array_equal(decision.group, balanced_groups(view, 2))
    _assert_feasible(decision, episodes)
    policy = SolverPolicy("hete", "prior")
    lengths, bandwidth = policy.act(view, decision.group)
    np.testing.assert_array_equal(decision.draft_lengths, lengths)
    np.testing.assert_allclose(decision.bandwidth_hz, bandwidth, rtol=1e-12)
    verification = episodes.config.verification_model
    token_aware = verification.coefficients[2] != 0
    for n in range(2):
        for g in range(2):
            m = decision.group[n] == g
            sub = dataclasses.replace(
                view,
                spectral_eff_est=view.spectral_eff_est[n : n + 1, m],
                t_draft_s=view.t_draft_s[n : n + 1, m],
                alpha_prior=view.alpha_prior[n : n + 1, m],
                alpha_hat=view.alpha_hat[n : n + 1, m],
                oracle_alpha=view.oracle_alpha[n : n + 1, m],
                oracle_spectral_eff=view.oracle_spectral_eff[n : n + 1, m],
            )
            alone_l, alone_b = policy.act(sub)
            np.testing.assert_array_equal(lengths[n, m], alone_l[0])
            np.testing.assert_allclose(bandwidth[n, m], alone_b[0], rtol=1e-12)
            if not token_aware:  # one solve of the paper's Hete on this group, whole band
                alloc = hete_multispin(
                    np.clip(view.alpha_prior[n, m], 1e-3, 1 - 1e-6),
                    view.t_draft_s[n, m],
                    view.spectral_eff_est[n, m],
                    q,
                    b,
                    verification.latency_for_batch_s(int(m.sum()), 1),
                    l_max,
                )
                np.testing.assert_array_equal(lengths[n, m], alloc.draft_lengths)
                np.testing.assert_allclose(bandwidth[n, m], alloc.bandwidth_hz, rtol=1e-12)


def test_tuned_equal_mix_keeps_each_group_band():
    episodes, _ = _episodes("multispin/RealisticLlama2Pipeline-v0", 2)
    h = TunedHeuristic(equal_mix=0.3, cap_scale=0.5, csi_margin=0.7, fast=True)
    decision = h.decide(episodes.server_view())
    _assert_feasible(decision, episodes)


def test_uni_bw_under_pipeline_splits_each_group_band_equally():
    episodes, _ = _episodes("multispin/PaperLlama2Pipeline-v0", 2, num_users=7)
    view = episodes.server_view()
    h = TunedHeuristic("uni_bw", cap_scale=2.0)
    decision = h.decide(view)
    _assert_feasible(decision, episodes)
    size = np.array([[np.sum(row == g) for g in row] for row in decision.group])
    np.testing.assert_allclose(decision.bandwidth_hz, episodes.config.bandwidth_hz / size)
    assert sorted(np.bincount(decision.group[0])) == [3, 4]


def test_combined_protocol_decisions_from_the_tuned_heuristic_replay_exactly():
    base = "tuned[hete,prior,cap=25,margin=0.9,mix=0.05,stop=0.3,scale=1.2,deadline=0.6]"
    for extra in ({"streaming_deadline": True}, {"pipeline_groups": 3}):
        episodes, _ = _episodes(
            "multispin/RealisticLlama2EarlyStop-v0", 2, action_mode="residual",
            base_policy=base, **extra,
        )  # fmt: skip
        want = episodes.base_decision()
        assert want.stop_threshold is not None
        assert (want.deadline_s is not None) == ("streaming_deadline" in extra)
        assert (want.group is not None) == ("pipeline_groups" in extra)
        got = _decode(episodes, np.zeros((2,) + episodes.codec.space.shape, np.float32))
        for name in DECISION_FIELDS:
            if getattr(want, name) is not None:
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        _assert_feasible(got, episodes)
        if "pipeline_groups" in extra:  # a > 0.5 moves the last group on to the first
            action = np.zeros((2,) + episodes.codec.space.shape, np.float32)
            action[:, 2 * 20 : 3 * 20] = 1.0
            moved = _decode(episodes, action)
            np.testing.assert_array_equal(moved.group, (want.group + 1) % 3)
            _assert_feasible(moved, episodes)
        episodes.step_decision(got)


# ---------------------------------------------------------------------------- 4. observation


def _expected_features(protocol: str, base: bool) -> tuple[tuple, tuple]:
    user = USER_FEATURES + (BASE_FEATURES if base else ())
    glob = GLOBAL_FEATURES
    if protocol == "EarlyStop" and base:
        user += ("base_stop",)
    if protocol == "Pipeline":
        user += ("predrafted",) + (("base_group",) if base else ())
    if protocol == "Deadline" and base:
        glob += ("base_deadline",)
    return user, glob


@pytest.mark.parametrize("env_id", EXTENDED_IDS)
@pytest.mark.parametrize("base", [False, True])
def test_observation_has_exactly_the_protocol_features(env_id, base):
    protocol = next(p for p in PROTOCOLS if p in env_id)
    kwargs = {"action_mode": "residual", "base_policy": "hete"} if base else {}
    env = gym.make(env_id, **kwargs)
    user, glob = _expected_features(protocol, base)
    names = env.unwrapped.feature_names
    assert names == [f"user{k}.{f}" for k in range(20) for f in user] + list(glob)
    assert env.observation_space.shape == (len(names),)
    episodes = env.unwrapped._episodes
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(0)
    cfg = env.unwrapped.config
    width = len(user)
    for step in range(6):
        assert env.observation_space.contains(obs), step
        users = obs[: 20 * width].reshape(20, width)
        if protocol == "Pipeline":
            want = np.clip(episodes.sim.predrafted[0] / cfg.max_draft_length, 0, 1)
            np.testing.assert_allclose(users[:, user.index("predrafted")], want, rtol=1e-6)
        if base:
            decision = episodes.base_decision()
            np.testing.assert_allclose(
                users[:, user.index("base_length")], decision.draft_lengths[0] / 25, rtol=1e-6
            )
            share = np.minimum(decision.bandwidth_hz[0] / cfg.bandwidth_hz * 20, 10.0)
            np.testing.assert_allclose(users[:, user.index("base_share")], share, rtol=1e-5)
            if protocol == "EarlyStop":
                np.testing.assert_allclose(
                    users[:, user.index("base_stop")], decision.stop_threshold[0], rtol=1e-6
                )
            if protocol == "Pipeline":
                np.testing.assert_allclose(
                    users[:, user.index("base_group")], decision.group[0] / (2 - 1), rtol=1e-6
                )
            if protocol == "Deadline":
                scale = cfg.max_draft_length * cfg.t_draft_mean_s
                want = np.clip(decision.deadline_s[0] / scale, 0.0, 10.0)
                assert obs[-1] == pytest.approx(want, rel=1e-6)
        action = rng.uniform(-1.5, 1.5, env.action_space.shape).astype(np.float32)
        obs, _, _, truncated, _ = env.step(action)
        if truncated:
            obs, _ = env.reset()


def test_pipeline_observation_sees_tokens_drafted_ahead():
    env = gym.make("multispin/PaperLlama2Pipeline-v0", action_mode="full")
    obs, _ = env.reset(seed=1)
    width = len(env.unwrapped._episodes.spec.user_features)
    column = env.unwrapped._episodes.spec.user_features.index("predrafted")
    assert np.all(obs[: 20 * width].reshape(20, width)[:, column] == 0)  # nothing yet
    seen = 0.0
    for _ in range(5):
        obs, _, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
        got = obs[: 20 * width].reshape(20, width)[:, column]
        np.testing.assert_allclose(got, np.clip(info["predrafted"] / 25, 0, 1), rtol=1e-6)
        seen += got.sum()
    assert seen > 0  # proactive drafting carries tokens (else the feature is untested)


def test_history_records_what_reached_the_server():
    # deadline: the verified prefix; early stop: the drafted (stopped) length, not the cap
    env = gym.make("multispin/PaperLlama2Deadline-v0", action_mode="lengths")
    env.reset(seed=2)
    spec = env.unwrapped._episodes.spec
    col = spec.user_features.index("last_drafted")
    action = np.ones(env.action_space.shape, np.float32)
    action[-1] = -1.0  # deadline at 0.2 of the last arrival: most prefixes are cut
    obs, _, _, _, info = env.step(action)
    users = obs[: 20 * len(spec.user_features)].reshape(20, -1)
    np.testing.assert_allclose(users[:, col], info["verified"] / 25, rtol=1e-6)
    assert (info["verified"] < info["draft_lengths"]).any()

    env = gym.make("multispin/PaperLlama2EarlyStop-v0", action_mode="lengths")
    env.reset(seed=2)
    action = np.ones(env.action_space.shape, np.float32)  # cap 25, threshold 0.95
    obs, _, _, _, info = env.step(action)
    users = obs[: 20 * len(spec.user_features)].reshape(20, -1)
    np.testing.assert_allclose(users[:, col], info["verified"] / 25, rtol=1e-6)
    assert (info["verified"] < info["draft_lengths"]).any()
    assert info["stop_threshold"] == pytest.approx(np.full(20, 0.95))


def test_observation_of_combined_protocols_and_clipped_deadline():
    env = gym.make(
        "multispin/PaperLlama2EarlyStop-v0", pipeline_groups=2, action_mode="residual",
        base_policy="hete",
    )  # fmt: skip
    user, _ = _expected_features("Pipeline", True)
    assert env.unwrapped._episodes.spec.user_features == user[:-2] + (
        "base_stop", "predrafted", "base_group",
    )  # fmt: skip
    # a slow uplink: the base's deadline is far beyond L_max t_ref, so the feature is clipped
    env = gym.make(
        "multispin/PaperLlama2Deadline-v0", action_mode="residual", bandwidth_hz=2e3,
        base_policy="tuned[hete,deadline=4.0]",
    )  # fmt: skip
    obs, _ = env.reset(seed=0)
    cfg = env.unwrapped.config
    deadline = env.unwrapped._episodes.base_decision().deadline_s[0]
    assert deadline / (cfg.max_draft_length * cfg.t_draft_mean_s) > 10
    assert obs[-1] == 10.0
    assert env.observation_space.contains(obs)


# ---------------------------------------------------------------------------- 5. parity


@pytest.mark.parametrize(
    ("env_id", "mode"),
    [
        ("multispin/PaperLlama2Pipeline-v0", "full"),
        ("multispin/RealisticLlama2Pipeline-v0", "residual"),
        ("multispin/PaperLlama2Deadline-v0", "lengths"),
        ("multispin/RealisticLlama2EarlyStop-v0", "residual"),
    ],
)
def test_scalar_and_batched_envs_play_the_same_trajectories(env_id, mode):
    n, seed, steps = 3, 11, 7
    kwargs = {**_mode_kwargs(mode), "horizon_s": 1.0}  # crosses an autoreset
    venv = gym.make_vec(env_id, num_envs=n, vectorization_mode="vector_entry_point", **kwargs)
    envs = [gym.make(env_id, **kwargs) for _ in range(n)]
    vobs, _ = venv.reset(seed=seed)
    for i, env in enumerate(envs):
        obs, _ = env.reset(seed=seed + i)
        np.testing.assert_array_equal(obs, vobs[i])
    rng = np.random.default_rng(3)
    resets = 0
    for _ in range(steps):
        actions = rng.uniform(-1.2, 1.2, (n,) + venv.single_action_space.shape)
        actions = actions.astype(np.float32)
        vobs, vrew, _, vtrunc, vinfo = venv.step(actions)
        for i, env in enumerate(envs):
            obs, rew, _, trunc, info = env.step(actions[i])
            assert rew == vrew[i] and trunc == vtrunc[i]
            for key in ("draft_lengths", "bandwidth_hz", "committed", "verified", "round_time_s"):
                np.testing.assert_array_equal(info[key], vinfo[key][i], err_msg=key)
            for key in ("stop_threshold", "deadline_s", "group", "predrafted"):
                assert (key in info) == (key in vinfo), key
                if key in info:
                    np.testing.assert_array_equal(info[key], vinfo[key][i], err_msg=key)
            if trunc:  # same-step autoreset: the last observation is in final_obs
                np.testing.assert_array_equal(obs, vinfo["final_obs"][i])
                obs, _ = env.reset()  # each env continues its own seeded stream
                resets += 1
            np.testing.assert_array_equal(obs, vobs[i])
    assert resets > 0


@pytest.mark.parametrize("env_id", EXTENDED_IDS)
def test_stepping_actions_equals_stepping_their_decoded_decision(env_id):
    one, _ = _episodes(env_id, 3, seeds=[21, 22, 23], **_mode_kwargs("residual"))
    two, _ = _episodes(env_id, 3, seeds=[21, 22, 23], **_mode_kwargs("residual"))
    rng = np.random.default_rng(4)
    for _ in range(4):
        action = rng.uniform(-1.5, 1.5, (3,) + one.codec.space.shape).astype(np.float32)
        r1, t1, s1 = one.step(action)
        r2, t2, s2 = two.step_decision(_decode(two, action))
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(t1, t2)
        assert s1.keys() == s2.keys()
        for key in ("tokens", "round_time_s", "committed", "verified", "draft_lengths"):
            np.testing.assert_array_equal(s1[key], s2[key], err_msg=key)
        np.testing.assert_array_equal(one.observe(), two.observe())


# ---------------------------------------------------------------------------- 6. policy


def _per_user_model(env_id: str, mode: str, zero_init: bool, seed: int = 0):
    from stable_baselines3 import PPO

    from multispin_env.vector_env import make_sb3_vec_env

    kwargs = {**_mode_kwargs(mode), "num_users": 5, "max_users": 6}
    venv = make_sb3_vec_env(env_id, num_envs=2, seed=seed, **kwargs)
    preset, id_kwargs = resolve_env_id(env_id)
    probe, _ = build_episodes(preset, {**id_kwargs, **kwargs}, num_envs=1)
    layout = env_layout(probe)
    torch.manual_seed(seed)
    model = PPO(
        PerUserActorCriticPolicy,
        venv,
        n_steps=8,
        batch_size=16,
        n_epochs=1,
        seed=seed,
        policy_kwargs={"hidden": 16, "zero_init": zero_init, "layout": layout},
    )
    return model, venv, probe, layout


@pytest.mark.parametrize("protocol", ["Deadline", "Pipeline", "EarlyStop"])
def test_zero_init_per_user_policy_starts_exactly_at_the_base(protocol):
    env_id = f"multispin/PaperLlama2{protocol}-v0"
    model, venv, probe, layout = _per_user_model(env_id, "residual", zero_init=True)
    per_user, global_outputs = probe.codec.layout()
    assert layout == (6, len(probe.spec.user_features), per_user, len(probe.spec.global_features),
                      global_outputs)  # fmt: skip
    assert 6 * per_user + global_outputs == venv.action_space.shape[0]
    assert global_outputs == (1 if protocol == "Deadline" else 0)
    assert model.action_space.shape == venv.action_space.shape
    obs = venv.reset()
    for _ in range(2):
        action, _ = model.predict(obs, deterministic=True)
        assert action.shape == (2,) + venv.action_space.shape
        assert np.all(action == 0.0)
        obs, _, _, _ = venv.step(action)
    # the zero action on the batched env is its base decision
    episodes = venv.venv.episodes
    got = _decode(episodes, np.zeros((2,) + venv.action_space.shape, np.float32))
    want = episodes.base_decision()
    for name in DECISION_FIELDS:
        if getattr(want, name) is not None:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_env_layout_refuses_homogeneous_actions():
    episodes, _ = _episodes("multispin/PaperLlama2Deadline-v0", 1, action_mode="homogeneous")
    with pytest.raises(ValueError, match="homogeneous"):
        env_layout(episodes)


@pytest.mark.parametrize(
    ("env_id", "mode"),
    [
        ("multispin/PaperLlama2Deadline-v0", "full"),  # 2 per user + a global deadline
        ("multispin/RealisticLlama2Deadline-v0", "residual"),
        ("multispin/PaperLlama2Pipeline-v0", "residual"),
        ("multispin/PaperLlama2EarlyStop-v0", "lengths"),
    ],
)
def test_per_user_outputs_are_equivariant_and_the_deadline_invariant(env_id, mode):
    model, venv, probe, layout = _per_user_model(env_id, mode, zero_init=False, seed=1)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # weights far from their near-zero init, so outputs differ
        for p in model.policy.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    kmax, features, per_user, _, global_outputs = layout
    obs = venv.reset()
    for _ in range(2):
        obs, _, _, _ = venv.step(np.zeros((2,) + venv.action_space.shape, np.float32))
    perm = np.r_[np.random.default_rng(0).permutation(5), 5]
    with torch.no_grad():
        a1 = model.policy.get_distribution(torch.as_tensor(obs)).distribution.mean.numpy()
        a2 = model.policy.get_distribution(
            torch.as_tensor(permute_users(obs, perm, features))
        ).distribution.mean.numpy()
    assert a1.shape == (2, kmax * per_user + global_outputs)
    for j in range(per_user):
        block = slice(j * kmax, (j + 1) * kmax)
        assert np.ptp(a1[:, block][:, :5]) > 1e-3  # users get different outputs
        np.testing.assert_allclose(a1[:, block][:, perm], a2[:, block], atol=1e-5)
    if global_outputs:
        np.testing.assert_allclose(a1[:, -global_outputs:], a2[:, -global_outputs:], atol=1e-5)
        assert np.all(np.abs(a1[:, -1]) > 0)


# ---------------------------------------------------------------------------- 7. harness


@pytest.mark.parametrize(
    ("env_id", "heuristic"),
    [
        ("multispin/PaperLlama2Deadline-v0", TunedHeuristic(fast=True, deadline_scale=0.8)),
        ("multispin/RealisticLlama2Pipeline-v0", TunedHeuristic(fast=True, cap_scale=1.3)),
        ("multispin/PaperLlama2EarlyStop-v0", TunedHeuristic(fast=True, stop_threshold=0.4)),
    ],
)
def test_run_episodes_with_a_tuned_decision_matches_stepping_by_hand(env_id, heuristic):
    seeds, horizon = [0, 4], 1.0
    metrics = run_episodes(SolverController(heuristic), env_id, seeds, horizon_s=horizon)
    for i, seed in enumerate(seeds):
        env = gym.make(env_id, horizon_s=horizon)
        env.reset(seed=seed)
        episodes = env.unwrapped._episodes
        tokens, elapsed = 0.0, 0.0
        while elapsed < horizon:
            decision = heuristic.decide(episodes.server_view())
            _, _, s = episodes.step_decision(decision)
            round_s = float(s["round_time_s"][0])
            tokens += min(1.0, (horizon - elapsed) / round_s) * float(s["tokens"][0])
            elapsed += round_s
        assert metrics.goodput[i] == pytest.approx(tokens / horizon, rel=1e-9)
        assert metrics.goodput[i] > 0


# ---------------------------------------------------------------------------- 8. bundles


def _sidecar(env_id: str, mode: str) -> dict:
    episodes, _ = _episodes(env_id, 1, **_mode_kwargs(mode))
    lev = episodes.levers
    return {
        "format": 2,
        "env_id": env_id,
        "env_kwargs": _mode_kwargs(mode),
        "algo": "ppo",
        "source_model": "model.zip",
        "action_mode": mode,
        "max_users": 20,
        "max_draft_length": 25,
        "observation_size": episodes.spec.size,
        "action_size": int(episodes.codec.space.shape[0]),
        "feature_names": list(episodes.spec.feature_names),
        "config_sha256": "0" * 64,
        "versions": {},
        "protocol_levers": {"stop": lev.stop, "deadline": lev.deadline, "groups": lev.groups},
        "onnx_sha256": "0" * 64,
        "integrity_sha256": "0" * 64,
    }


@pytest.mark.parametrize("env_id", EXTENDED_IDS)
@pytest.mark.parametrize("mode", BOX_MODES)
def test_sidecar_action_size_agrees_with_the_codec(env_id, mode):
    meta = _sidecar(env_id, mode)
    assert validate_sidecar(meta) is meta
    assert lever_action_size(meta["protocol_levers"], 20) == ProtocolLevers(
        **meta["protocol_levers"]
    ).width(20)
    for wrong in (meta["action_size"] - 1, meta["action_size"] + 1):
        with pytest.raises(BundleError, match="action_size"):
            validate_sidecar({**meta, "action_size": wrong})
    no_levers = {k: v for k, v in meta.items() if k != "protocol_levers"}
    with pytest.raises(BundleError, match="action_size"):
        validate_sidecar(no_levers)
    with pytest.raises(BundleError, match="protocol_levers"):
        validate_sidecar({**meta, "protocol_levers": {"stop": 1, "deadline": False, "groups": 1}})


def test_exported_extended_bundle_records_levers_and_live_checks_the_protocol(tmp_path):
    from conftest import TINY_TRAIN_ARGS

    from multispin_agents.bundle import PolicyBundle
    from multispin_env.live.scheduler import BundleScheduler
    from multispin_train.export import export_run
    from multispin_train.train import main as train_main

    env_id = "multispin/PaperLlama2Deadline-v0"
    run = tmp_path / "run"
    train_main(
        TINY_TRAIN_ARGS
        + ["--env", env_id, "--run-dir", str(run), "--eval-episodes", "1", "--no-reference"]
        + ["--horizon-reward", "--env-kwargs", "action_mode:full", "num_users:4"]
    )
    out = export_run(run, tmp_path / "bundle", parity_samples=8)
    meta = json.loads((out / "policy.json").read_text())
    assert meta["protocol_levers"] == {"stop": False, "deadline": True, "groups": 1}
    env = gym.make(env_id, action_mode="full", num_users=4)
    assert meta["action_size"] == env.action_space.shape[0] == 2 * 4 + 1
    assert meta["feature_names"] == env.unwrapped.feature_names
    assert meta["parity_max_abs_diff"] <= 1e-5
    PolicyBundle(out)  # loads
    from multispin_eval.harness import BundleController, LearnedController

    metrics = run_episodes(BundleController(out), env_id, [0, 1], horizon_s=0.5)
    learned = run_episodes(LearnedController(run), env_id, [0, 1], horizon_s=0.5)
    np.testing.assert_allclose(metrics.goodput, learned.goodput, rtol=1e-6)
    assert np.all(metrics.goodput > 0)
    scheduler = BundleScheduler(str(out))  # live mode plays the policy's protocol
    assert scheduler.levers == ProtocolLevers(deadline=True)
    scheduler.check_protocol(False, True, 1)
    with pytest.raises(ValueError, match="--protocol") as err:
        scheduler.check_protocol(False, False, 1)  # a server playing the synchronous round
    assert env_id in str(err.value)


def test_lever_log_std_widens_exploration_of_the_levers_only():
    from stable_baselines3 import PPO

    from multispin_env.vector_env import make_sb3_vec_env

    env_id = "multispin/PaperLlama2Pipeline-v0"
    kwargs = {**_mode_kwargs("residual"), "num_users": 5, "max_users": 6}
    venv = make_sb3_vec_env(env_id, num_envs=2, seed=0, **kwargs)
    preset, id_kwargs = resolve_env_id(env_id)
    probe, _ = build_episodes(preset, {**id_kwargs, **kwargs}, num_envs=1)
    policy_kwargs = {"hidden": 16, "zero_init": True, "layout": env_layout(probe),
                     "log_std_init": -2.0, "lever_log_std": -1.0}  # fmt: skip
    model = PPO(
        PerUserActorCriticPolicy, venv, n_steps=8, batch_size=16, policy_kwargs=policy_kwargs
    )
    log_std = model.policy.log_std.detach().numpy()
    np.testing.assert_array_equal(log_std[:6], -2.0)  # the lengths block
    np.testing.assert_array_equal(log_std[6:], -1.0)  # the group block
    action, _ = model.predict(venv.reset(), deterministic=True)
    assert np.all(action == 0.0)  # still starts exactly at the base
