"""The safety test that decides whether a learned residual policy or its base is deployed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multispin_agents.tuned import TunedHeuristic
from multispin_eval.harness import LearnedController, SolverController, run_episodes
from multispin_train.gate import (
    DEPLOYED_MODEL,
    GATE_FILE,
    GATE_SEED_START,
    gate_decision,
    gate_run,
    zero_residual,
)
from multispin_train.gate import main as gate_main

ENV = "multispin/PaperLlama2-v0"
SCENARIO = {"num_users": 4, "horizon_s": 3.0}
BASE = "tuned[homo,cap=6]"


def test_decision_deploys_a_candidate_only_when_its_whole_ci_is_above_one():
    rng = np.random.default_rng(0)
    base = rng.uniform(100, 140, 64)
    noise = rng.normal(0, 0.01, 64)
    better = gate_decision(base * (1.02 + noise), base)
    assert better["deployed"] == "candidate" and better["ci95"][0] > 1.0
    same = gate_decision(base * (1.0 + noise), base)  # mean ~1: the CI straddles it
    assert same["ci95"][0] < 1.0 < same["ci95"][1] and same["deployed"] == "base"
    worse = gate_decision(base * (0.98 + noise), base)
    assert worse["deployed"] == "base"
    # a required margin: a 2 % gain does not clear a 5 % bar
    assert gate_decision(base * (1.02 + noise), base, min_gain=0.05)["deployed"] == "base"
    # the CI is Student's t on the paired per-episode ratios
    ratio = (base * (1.02 + noise)) / base
    half = better["ci95"][1] - better["mean"]
    from scipy.stats import t

    assert half == pytest.approx(t.ppf(0.975, 63) * ratio.std(ddof=1) / 8)


@pytest.mark.parametrize(
    "candidate, base", [(np.ones(3), np.ones(4)), (np.ones(1), np.ones(1)), (np.ones((2, 2)),) * 2]
)
def test_decision_refuses_unpaired_or_too_few_episodes(candidate, base):
    with pytest.raises(ValueError, match="paired episodes"):
        gate_decision(candidate, base)


@pytest.fixture(scope="module")
def residual_run(tmp_path_factory):
    """A residual run whose candidate is a random correction (the heads are perturbed after a
    zero-learning-rate run), so it decides differently from its base."""
    from multispin_train.train import main as train_main

    run = tmp_path_factory.mktemp("gate") / "run"
    train_main(
        ["--env", ENV, "--env-kwargs", "num_users:4", "horizon_s:3.0", f"base_policy:{BASE}",
         "action_mode:residual", "--timesteps", "128", "--n-envs", "2", "--eval-freq", "64",
         "--eval-episodes", "2", "--checkpoint-freq", "0", "--no-progress", "--params",
         "n_steps:64", "batch_size:64", "n_epochs:1", "learning_rate:0.0", "--run-dir",
         str(run)]
    )  # fmt: skip
    ctrl = LearnedController(run, "best_model.zip")
    ctrl.model.save(run / "unchanged.zip")  # zero learning rate: exactly its base
    head = ctrl.model.policy.mlp_extractor.actor_head[-1]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(0.5 * torch.randn(head.weight.shape, generator=gen))
        head.bias.fill_(0.6)  # about +3 tokens on every length: a clearly worse policy
    ctrl.model.save(run / "best_model.zip")
    return run


def _base_goodput(seeds):
    ctrl = SolverController(TunedHeuristic.parse(BASE, 25))
    return run_episodes(ctrl, ENV, seeds, env_kwargs=SCENARIO).goodput


def test_zeroed_residual_plays_exactly_as_its_base(residual_run):
    seeds = list(range(10, 16))
    ctrl = LearnedController(residual_run, "best_model.zip")
    candidate = run_episodes(ctrl, ENV, seeds).goodput
    base = _base_goodput(seeds)
    assert not np.allclose(candidate, base)  # the perturbed policy really decides otherwise
    zero_residual(ctrl.model)
    np.testing.assert_array_equal(run_episodes(ctrl, ENV, seeds).goodput, base)


def test_gate_falls_back_to_the_base_and_records_the_test(residual_run):
    record = gate_run(residual_run, episodes=6)
    assert record["deployed"] == "base" and record["mean"] < 1.0
    assert record["seeds"] == [GATE_SEED_START, GATE_SEED_START + 5]
    assert json.loads((residual_run / GATE_FILE).read_text()) == record
    seeds = list(range(20, 24))
    deployed = LearnedController(residual_run, DEPLOYED_MODEL)
    np.testing.assert_array_equal(run_episodes(deployed, ENV, seeds).goodput, _base_goodput(seeds))


def test_gate_plays_the_base_with_the_runs_own_env_kwargs(residual_run):
    """The run set num_users (a scenario override) and horizon_s (an env option): the base
    must play the same episodes, so an unchanged policy scores exactly 1 on every episode."""
    record = gate_run(residual_run, episodes=5, model_file="unchanged.zip")
    assert record["mean"] == 1.0 and record["ci95"] == [1.0, 1.0]
    assert record["deployed"] == "base"  # no gain shown: nothing to deploy


@pytest.mark.parametrize("min_gain", [-0.5, float("nan"), float("inf")])
def test_gate_refuses_a_min_gain_that_would_deploy_anything_or_nothing(residual_run, min_gain):
    with pytest.raises(ValueError, match="min-gain"):
        gate_run(residual_run, episodes=3, min_gain=min_gain)


def test_gate_deploys_a_candidate_that_beats_its_base(residual_run):
    """Gate the perturbed policy against itself made worse: with the per-episode ratios all
    above one the candidate itself is deployed, unchanged."""
    seeds = list(range(GATE_SEED_START, GATE_SEED_START + 6))
    candidate = run_episodes(LearnedController(residual_run, "best_model.zip"), ENV, seeds).goodput
    record = gate_run(residual_run, episodes=6, base_scores=candidate * 0.9)
    assert record["deployed"] == "candidate" and record["mean"] == pytest.approx(1 / 0.9)
    deployed = LearnedController(residual_run, DEPLOYED_MODEL)
    np.testing.assert_array_equal(run_episodes(deployed, ENV, seeds).goodput, candidate)


def test_gate_cli_reports_a_bad_run_in_one_line(residual_run, tmp_path, capsys):
    import shutil

    plain = tmp_path / "plain"
    plain.mkdir()
    config = json.loads((residual_run / "config.json").read_text())
    config["env_kwargs"] = dict(SCENARIO)  # trained without a base heuristic
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        gate_main([str(plain), "--episodes", "4"])
    assert e.value.code == 2 and "best_model.zip does not exist" in capsys.readouterr().err
    shutil.copy(residual_run / "best_model.zip", plain / "best_model.zip")
    with pytest.raises(SystemExit) as e:
        gate_main([str(plain), "--episodes", "4"])
    assert e.value.code == 2 and "action_mode=residual" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gate_main([str(residual_run), "--episodes", "1"])


def test_experiment_gates_every_seed_and_exports_what_it_deployed(tmp_path):
    """The headline-experiment command end to end with a tiny budget: each seed is gated,
    the table's learned rows and the bundles are the deployed policies, and the summary keeps
    the selected policies' statistics from before the gate."""
    import csv

    from multispin_train.experiments import run_experiment

    summary = run_experiment(
        "paper", timesteps=64, seeds=[0, 1], eval_seeds=3, out_root=str(tmp_path / "out"),
        run_root=str(tmp_path / "runs"), jobs=2, progress=False, gate_episodes=4,
    )  # fmt: skip
    assert set(summary["gate"]) == {0, 1} and summary["gate_episodes"] == 4
    out = tmp_path / "out" / "paper"
    for seed in (0, 1):
        run = tmp_path / "runs" / "paper" / f"s{seed}"
        assert (run / DEPLOYED_MODEL).is_file()
        sidecar = json.loads((out / f"bundle_s{seed}" / "policy.json").read_text())
        assert sidecar["source_model"].endswith(DEPLOYED_MODEL)
    with (out / "seeds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["deployed"] for r in rows] == [summary["gate"][s]["deployed"] for s in (0, 1)]
    # a seed that fell back plays as the tuned heuristic (its base) on the held-out episodes
    for r in rows:
        if r["deployed"] == "base":
            assert float(r["vs_tuned"]) == pytest.approx(1.0, abs=1e-9)
    assert "selected_vs_tuned_before_gate" in summary


def test_export_and_evaluate_take_the_deployed_model_of_a_gated_run(residual_run, tmp_path, capsys):
    """After the gate, a run stands for what it deployed: `multispin export RUN` and a run
    folder in `multispin evaluate` use deployed_model.zip unless told otherwise; a wrong
    model name lists what the run has, as one line."""
    from multispin_eval.harness import default_model_file
    from multispin_train.export import main as export_main

    gate_run(residual_run, episodes=3)
    assert default_model_file(residual_run) == DEPLOYED_MODEL
    assert LearnedController(residual_run).model is not None
    out = export_main([str(residual_run), "--out", str(tmp_path / "bundle")])
    sidecar = json.loads((out / "policy.json").read_text())
    assert sidecar["source_model"].endswith(DEPLOYED_MODEL)
    with pytest.raises(ValueError, match="deployed_model.zip.*best_model.zip"):
        LearnedController(residual_run, "deployed.zip")
    with pytest.raises(SystemExit) as e:
        export_main([str(residual_run), "--model", "deployed.zip", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("multispin export: error:") and "model.zip" in err


@pytest.mark.parametrize("module", ["multispin_train.experiments", "multispin_train.end_to_end"])
@pytest.mark.parametrize("bad", ["1", "-3", "many"])
def test_gate_episodes_flag_is_checked_before_any_work(module, bad, capsys):
    """Both commands that gate take the same flag, checked by one argparse type, and refuse a
    count no paired interval can come from before minutes of tuning and training."""
    import importlib

    main = importlib.import_module(module).main
    args = (["paper"] if module.endswith("experiments") else []) + ["--gate-episodes", bad]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "--gate-episodes" in capsys.readouterr().err
