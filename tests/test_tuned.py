"""Tuned heuristics and residual actions: the family contains the paper's schemes exactly,
its knobs do what they say, and a zero residual action plays the base heuristic exactly."""

import json

import numpy as np
import pytest

from multispin_agents.policies import SolverPolicy
from multispin_agents.tuned import TunedHeuristic, load_tuned
from multispin_env.episodes import BatchedEpisodes, EnvOptions
from multispin_eval.harness import SolverController, run_episodes, scenario_for, seed_keys

SEEDS = list(range(10, 16))
SMALL = {"num_users": 5, "horizon_s": 4.0}


@pytest.mark.parametrize("env_id", ["multispin/PaperLlama2-v0", "multispin/RealisticLlama2-v0"])
@pytest.mark.parametrize("scheme", ["homo", "hete"])
def test_untuned_knobs_are_the_paper_scheme_exactly(env_id, scheme):
    plain = run_episodes(SolverController(SolverPolicy(scheme)), env_id, SEEDS, env_kwargs=SMALL)
    tuned = run_episodes(
        SolverController(TunedHeuristic(scheme, length_cap=25)), env_id, SEEDS, env_kwargs=SMALL
    )
    np.testing.assert_array_equal(plain.goodput, tuned.goodput)


def test_knobs_cap_lengths_and_hedge_bandwidth():
    cfg, options = scenario_for("multispin/RealisticLlama2-v0", {"num_users": 6})
    episodes = BatchedEpisodes(cfg, EnvOptions.build(cfg, **options), 8)
    episodes.reset(seed_keys(range(8)), np.arange(8))
    view = episodes.server_view()
    lengths, bandwidth = TunedHeuristic("hete", length_cap=3, equal_mix=0.5).act(view)
    assert lengths.max() <= 3
    assert bandwidth.min() >= 0.5 * cfg.bandwidth_hz / 6 - 1e-6
    np.testing.assert_allclose(bandwidth.sum(axis=1), cfg.bandwidth_hz)
    # a pessimistic channel makes uploads look slower: drafts get no longer
    short, _ = TunedHeuristic("homo", csi_margin=0.3).act(view)
    full, _ = TunedHeuristic("homo").act(view)
    assert np.all(short <= full) and short.sum() < full.sum()


def test_names_are_specs_and_parse_back():
    h = TunedHeuristic("hete", "history", length_cap=7, csi_margin=0.83, equal_mix=0.1, fast=True)
    assert TunedHeuristic.parse(h.name) == h
    assert TunedHeuristic.parse("hete", max_draft_length=25) == TunedHeuristic("hete")
    assert TunedHeuristic.parse("tuned[homo,mix=0.2]", 9).length_cap == 9
    for bad in ("tuned[hete,cap=0]", "tuned[bogus]", "tuned[hete,margin=1.5]", "heat"):
        with pytest.raises(ValueError):
            TunedHeuristic.parse(bad)


def test_tune_finds_at_least_the_paper_schemes_and_writes_a_loadable_result(tmp_path):
    from multispin_train.tune import main as tune_main

    out = tmp_path / "t.json"
    result = tune_main(
        ["--env", "multispin/RealisticLlama2-v0", "--trials", "6", "--seeds", "3",
         "--env-kwargs", "num_users:5", "horizon_s:4.0", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["best"] == result["best"] and len(saved["trials"]) == 6
    # the untuned schemes were enqueued first: the best is at least plain Hete
    assert saved["tuning_goodput"] >= saved["hete_goodput"] - 1e-9
    assert load_tuned(out) == TunedHeuristic(**saved["best"])


@pytest.mark.parametrize("base", ["hete", "tuned[homo,history,cap=6,margin=0.7,mix=0.2]"])
def test_zero_residual_action_plays_the_base_heuristic_exactly(base):
    env_id = "multispin/RealisticLlama2-v0"
    cfg, options = scenario_for(env_id, SMALL | {"action_mode": "residual", "base_policy": base})
    opts = EnvOptions.build(cfg, **options)
    episodes = BatchedEpisodes(cfg, opts, len(SEEDS))
    episodes.reset(seed_keys(SEEDS), np.arange(len(SEEDS)))
    done = np.zeros(len(SEEDS), dtype=bool)
    goodput = np.zeros(len(SEEDS))
    zero = np.zeros((len(SEEDS),) + episodes.codec.space.shape, dtype=np.float32)
    while not done.all():
        obs = episodes.observe()
        base_lengths, base_bw = episodes.base_allocation()
        k = cfg.num_users
        f = len(episodes.spec.user_features)
        users = obs[:, : opts.max_users * f].reshape(len(SEEDS), -1, f)[:, :k]
        np.testing.assert_allclose(users[..., -2], base_lengths / cfg.max_draft_length, 1e-6)
        _, truncated, s = episodes.step(zero)
        np.testing.assert_array_equal(s["draft_lengths"], base_lengths)
        np.testing.assert_allclose(s["bandwidth_hz"], base_bw, rtol=1e-12)
        goodput[truncated & ~done] = s["episode_goodput_tokens_per_s"][truncated & ~done]
        done |= truncated
    heuristic = TunedHeuristic.parse(opts.base_policy)
    expected = run_episodes(SolverController(heuristic), env_id, SEEDS, env_kwargs=SMALL)
    np.testing.assert_allclose(goodput, expected.goodput, rtol=1e-12)


def test_residual_corrections_move_lengths_and_rebalance_bandwidth():
    from multispin_env.action_codec import ActionCodec, DecisionContext, residual_range

    codec = ActionCodec("residual", max_users=4, max_draft_length=25)
    step = residual_range(25)
    base_len = np.array([[5, 1, 25, 10], [3, 3, 3, 3]])
    base_bw = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]) * 1e6
    calls = []

    def rule(lengths):  # stands for the base's bandwidth rule: proportional to L
        calls.append(lengths.copy())
        return lengths / lengths.sum(axis=1, keepdims=True) * 10e6

    ctx = DecisionContext(np.ones((2, 4)), np.ones((2, 4)), 1.0, 10e6, base_len, base_bw, rule)
    action = np.array([[1.0, -1.0, 1.0, 0.5], [0.01, -0.02, 0.0, 0.0]], dtype=np.float32)
    lengths, bandwidth = codec.decode(action, ctx)
    np.testing.assert_array_equal(lengths[0], [5 + step, 1, 25, 10 + round(0.5 * step)])
    np.testing.assert_array_equal(lengths[1], base_len[1])  # corrections below half a step
    np.testing.assert_allclose(bandwidth[0], rule(lengths)[0])  # the base's rule, new lengths
    np.testing.assert_array_equal(bandwidth[1], base_bw[1])  # unchanged row: the base exactly
    with pytest.raises(ValueError, match="base_policy"):
        codec.decode(action, DecisionContext(np.ones((2, 4)), np.ones((2, 4)), 1.0, 10e6))


def test_the_base_bandwidth_rule_reproduces_its_own_allocation():
    cfg, options = scenario_for("multispin/RealisticLlama2-v0", {"num_users": 6})
    episodes = BatchedEpisodes(cfg, EnvOptions.build(cfg, **options), 8)
    episodes.reset(seed_keys(range(8)), np.arange(8))
    view = episodes.server_view()
    for h in (TunedHeuristic("hete", csi_margin=0.6, equal_mix=0.3), TunedHeuristic("uni_bw")):
        lengths, bandwidth = h.act(view)
        np.testing.assert_allclose(h.bandwidth_for(view, lengths), bandwidth, rtol=1e-6)


def test_residual_mode_needs_a_base_policy():
    cfg, _ = scenario_for("multispin/PaperLlama2-v0")
    with pytest.raises(ValueError, match="set base_policy"):
        EnvOptions.build(cfg, action_mode="residual")
    with pytest.raises(ValueError, match="base_policy='heat'"):
        EnvOptions.build(cfg, action_mode="residual", base_policy="heat")


def test_zero_initialised_per_user_policy_starts_at_the_base():
    import gymnasium as gym
    import torch

    import multispin_env  # noqa: F401
    from multispin_agents.per_user_policy import PerUserActorCriticPolicy

    env = gym.make(
        "multispin/PaperLlama2-v0", num_users=4, action_mode="residual", base_policy="homo"
    )
    policy = PerUserActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, zero_init=True
    )
    obs, _ = env.reset(seed=0)
    with torch.no_grad():
        action, _ = policy.predict(obs, deterministic=True)
    np.testing.assert_array_equal(action, np.zeros_like(action))


def test_untrained_residual_policy_scores_as_its_base_in_every_evaluation(tmp_path):
    """Default training (residual over a base): with a zero learning rate the policy stays the
    base, and every evaluation sees the same episodes, so every score equals the base's own
    goodput on those seeds (SB3's EvalCallback alone would draw new episodes each time)."""
    import csv

    from multispin_train.train import EVAL_SEED_OFFSET
    from multispin_train.train import main as train_main

    run = tmp_path / "run"
    train_main(
        ["--env", "multispin/PaperLlama2-v0", "--env-kwargs", "num_users:4", "horizon_s:3.0",
         "base_policy:tuned[homo,cap=6]", "action_mode:residual", "--timesteps", "256",
         "--n-envs", "2", "--eval-freq", "64", "--eval-episodes", "3", "--checkpoint-freq",
         "0", "--no-progress", "--params", "n_steps:64", "batch_size:64", "n_epochs:1",
         "learning_rate:0.0", "--run-dir", str(run)]
    )  # fmt: skip
    with (run / "eval_progress.csv").open() as f:
        scores = [float(r["eval_goodput_tokens_per_s"]) for r in csv.DictReader(f)]
    assert len(scores) >= 3 and int(
        next(csv.reader(open(run / "eval_progress.csv")))[0] == "timesteps"
    )
    base = run_episodes(
        SolverController(TunedHeuristic.parse("tuned[homo,cap=6]", 25)),
        "multispin/PaperLlama2-v0",
        range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 3),
        env_kwargs={"num_users": 4, "horizon_s": 3.0},
    )
    np.testing.assert_allclose(scores, base.goodput.mean(), rtol=1e-3)


@pytest.mark.parametrize("name", ["paper", "realistic"])
def test_shipped_bundles_load_and_play_as_well_as_the_tuned_heuristic(name):
    """The committed headline policies load on a fresh clone and, on episodes that are neither
    the README's nor used in training or the gate, play within a few percent of the tuned
    heuristic they were trained from; a seed whose gate deployed the base plays exactly as
    the tuned heuristic, episode by episode."""
    from pathlib import Path

    from multispin_eval.compare import compare_with_scores

    root = Path(__file__).parents[1] / "results" / "experiments" / name
    summary = json.loads((root / "summary.json").read_text())
    seeds = summary["train_seeds"]
    bundles = [f"s{s}={root / f'bundle_s{s}'}" for s in seeds]
    _, scores = compare_with_scores(
        summary["env_id"],
        [f"tuned={TunedHeuristic(**summary['tuned_heuristic']).name}", *bundles],
        list(range(2_200_000, 2_200_004)),
        progress=False,
    )
    for s in seeds:
        ratio = scores[f"s{s}"] / scores["tuned"]
        if summary["gate"][str(s)]["deployed"] == "base":
            np.testing.assert_array_equal(ratio, 1.0)
        else:
            assert ratio.mean() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize(
    "env_id, knobs",
    [
        ("multispin/RealisticLlama2EarlyStop-v0", {"stop_threshold", "cap_scale"}),
        ("multispin/RealisticLlama2Deadline-v0", {"deadline_scale", "cap_scale"}),
        ("multispin/PaperLlama2Pipeline-v0", {"cap_scale"}),
    ],
)
def test_tune_searches_the_protocol_knobs_and_starts_from_the_synchronous_best(
    tmp_path, env_id, knobs
):
    from multispin_train.tune import tune

    sync_best = {"scheme": "hete", "alpha_source": "history", "length_cap": 7,
                 "csi_margin": 0.6, "equal_mix": 0.2}  # fmt: skip
    result = tune(
        env_id, trials=5, num_seeds=2, env_kwargs={"num_users": 4, "horizon_s": 3.0},
        progress=False, warm_start=[sync_best],
    )  # fmt: skip
    searched = {k for t in result["trials"] for k in t} - {"number", "goodput"}
    assert knobs <= searched
    assert not ({"stop_threshold", "deadline_scale"} - knobs) & searched
    warm = [t for t in result["trials"] if t["length_cap"] == 7 and t["csi_margin"] == 0.6]
    assert warm, "the synchronous best was not tried"
    assert result["tuning_goodput"] == max(t["goodput"] for t in result["trials"])
    best = TunedHeuristic(**result["best"])
    assert TunedHeuristic.parse(best.name) == best


def test_synchronous_id_of_an_extended_id():
    from multispin_env.registration import synchronous_id

    assert synchronous_id("multispin/RealisticLlama2Pipeline-v0") == "multispin/RealisticLlama2-v0"
    assert synchronous_id("multispin/PaperLlama2EarlyStop-v0") == "multispin/PaperLlama2-v0"
    assert synchronous_id("multispin/PaperLlama2-v0") is None
    assert synchronous_id("multispin/NoSuchPipeline-v0") is None


def test_stable_groups_are_the_slots_every_cycle_and_round_trip():
    from multispin_env.env import build_episodes

    spec = "tuned[hete,history,cap=8,margin=1.0,mix=0.0,stable,fast]"
    tuned = TunedHeuristic.parse(spec)
    assert tuned.stable_groups and tuned.name == spec
    assert tuned.protocol_knobs() == {"stable": True}
    episodes, _ = build_episodes("paper-llama2", {"pipeline_groups": 3, "num_users": 7}, 2)
    episodes.reset(np.array([1, 2], dtype=np.uint64), np.arange(2))
    for _ in range(3):
        decision = tuned.decide(episodes.server_view())
        np.testing.assert_array_equal(decision.group, np.tile(np.arange(7) % 3, (2, 1)))
        for g in range(3):  # each group shares the whole band
            total = np.where(decision.group == g, decision.bandwidth_hz, 0).sum(axis=1)
            np.testing.assert_allclose(total, episodes.config.bandwidth_hz)
        episodes.step_decision(decision)


@pytest.mark.parametrize(
    "env_id", ["multispin/RealisticLlama2-v0", "multispin/RealisticLlama2Deadline-v0"]
)
def test_oracle_knob_plans_with_the_hidden_truth_and_refuses_a_view_without_it(env_id):
    """``oracle`` is the same heuristic fed the truth: on a view whose estimates are replaced
    by the true acceptance and channel it decides exactly as the plain heuristic there; and
    a view without the truth (live) is refused, naming the knob."""
    import dataclasses

    cfg, options = scenario_for(env_id, {"num_users": 6})
    episodes = BatchedEpisodes(cfg, EnvOptions.build(cfg, **options), 8)
    episodes.reset(seed_keys(range(8)), np.arange(8))
    view = episodes.server_view()
    plain = TunedHeuristic("hete", "history", length_cap=9, csi_margin=0.7, deadline_scale=0.6)
    oracle = dataclasses.replace(plain, oracle=True)
    assert TunedHeuristic.parse(oracle.name) == oracle and oracle.name.endswith(",oracle]")
    truth = dataclasses.replace(
        view, alpha_hat=view.oracle_alpha, spectral_eff_est=view.oracle_spectral_eff
    )
    assert not np.allclose(view.alpha_hat, view.oracle_alpha)  # the estimates are not the truth
    got, want = oracle.decide(view), plain.decide(truth)
    np.testing.assert_array_equal(got.draft_lengths, want.draft_lengths)
    np.testing.assert_allclose(got.bandwidth_hz, want.bandwidth_hz)
    if cfg.streaming_deadline:
        np.testing.assert_allclose(got.deadline_s, want.deadline_s)
    assert not np.array_equal(plain.decide(view).draft_lengths, got.draft_lengths)
    live = dataclasses.replace(view, oracle_alpha=None, oracle_spectral_eff=None)
    with pytest.raises(ValueError, match="oracle"):
        oracle.decide(live)


def test_tune_oracle_writes_its_own_file_and_never_the_baseline(tmp_path, monkeypatch):
    from multispin_train.tune import main as tune_main

    monkeypatch.chdir(tmp_path)  # the default output paths are relative
    result = tune_main(
        ["--env", "multispin/RealisticLlama2-v0", "--oracle", "--trials", "3", "--seeds", "2",
         "--env-kwargs", "num_users:4", "horizon_s:3.0", "--no-progress"]
    )  # fmt: skip
    assert result["best"]["oracle"] is True and result["name"].endswith(",oracle]")
    assert (tmp_path / "results/tuned/realisticllama2-v0.oracle.json").is_file()
    assert not (tmp_path / "results/tuned/realisticllama2-v0.json").exists()
