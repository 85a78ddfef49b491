"""Training and evaluation CLIs with tiny budgets, hyperparameter parsing, the harness."""

import json

import numpy as np
import pytest

from multispin_agents.policies import SolverPolicy
from multispin_eval.compare import main as evaluate_main
from multispin_eval.harness import SolverController, run_episodes, seed_keys
from multispin_train.hyperparams import (
    load_hyperparams,
    parse_cli_kwargs,
    parse_policy_kwargs,
    split_hyperparams,
)
from multispin_train.train import main as train_main


def test_zoo_hyperparams_parse():
    from multispin_agents.per_user_policy import PerUserActorCriticPolicy

    path = "train/hyperparams/ppo_mlp.yml"
    zoo, kwargs = split_hyperparams(load_hyperparams("ppo", "multispin/PaperLlama2-v0", path))
    assert zoo["n_envs"] == 16 and zoo["policy"] == "MlpPolicy"
    assert zoo["normalize"] == {"norm_obs": True, "norm_reward": True, "gamma": 0.99}
    assert kwargs["learning_rate"](1.0) == pytest.approx(3e-4)
    assert kwargs["learning_rate"](0.5) == pytest.approx(1.5e-4)
    assert kwargs["policy_kwargs"]["net_arch"] == {"pi": [256, 256], "vf": [256, 256]}
    zoo, kwargs = split_hyperparams(load_hyperparams("ppo", "multispin/PaperLlama2-v0"))
    assert zoo["policy"] is PerUserActorCriticPolicy  # dotted class path resolved
    assert zoo["normalize"]["norm_obs"] is False
    for algo in ("a2c", "sac", "td3"):
        split_hyperparams(load_hyperparams(algo, "multispin/RealisticLlama2-v0"))
    with pytest.raises(ValueError, match="no entry"):
        load_hyperparams("ppo", "CartPole-v1")
    with pytest.raises(ValueError, match="only use"):
        parse_policy_kwargs("dict(x=__import__('os'))")
    assert parse_cli_kwargs(["action_mode:lengths", "num_users:8", "x:1e-3"]) == {
        "action_mode": "lengths",
        "num_users": 8,
        "x": 1e-3,
    }


def test_harness_uses_env_seeding_and_common_random_numbers():
    import gymnasium as gym

    env = gym.make("multispin/PaperLlama2-v0").unwrapped
    env.reset(seed=7)
    np.testing.assert_array_equal(env.simulator.keys, seed_keys([7]))
    hete = run_episodes(
        SolverController(SolverPolicy("hete")), "multispin/PaperLlama2-v0", [1, 2, 3], horizon_s=5.0
    )
    again = run_episodes(
        SolverController(SolverPolicy("hete")), "multispin/PaperLlama2-v0", [1, 2, 3], horizon_s=5.0
    )
    np.testing.assert_array_equal(hete.goodput, again.goodput)
    fixed = run_episodes(
        SolverController(SolverPolicy("fixed")),
        "multispin/PaperLlama2-v0",
        [1, 2, 3],
        horizon_s=5.0,
    )
    assert np.all(hete.goodput > fixed.goodput)
    s = hete.summary()
    assert s["draft_frac"] + s["upload_frac"] + s["verify_frac"] == pytest.approx(1.0)
    assert 0 < s["jain"] <= 1


def test_train_checkpoint_resume_and_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    train_main(
        [
            "--env",
            "multispin/PaperLlama2-v0",
            "--timesteps",
            "512",
            "--n-envs",
            "4",
            "--env-kwargs",
            "action_mode:lengths",
            "num_users:6",
            "--run-dir",
            str(run),
            "--eval-freq",
            "256",
            "--eval-episodes",
            "2",
            "--checkpoint-freq",
            "256",
            "--no-progress",
            "--params",
            "n_steps:64",
            "batch_size:64",
            "n_epochs:1",
        ]
    )
    for name in ("model.zip", "vecnormalize.pkl", "best_model.zip", "config.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["env_kwargs"] == {"action_mode": "lengths", "num_users": 6}
    assert config["reference_hete_goodput"] > 0 and config["train_time_s"] > 0
    assert list((run / "tb").rglob("events.out.tfevents*"))
    progress = (run / "eval_progress.csv").read_text().splitlines()
    assert progress[0] == "timesteps,wall_s,eval_goodput_tokens_per_s" and len(progress) >= 3
    ckpt = run / "checkpoints" / "rl_model_256_steps.zip"
    assert ckpt.is_file()
    resumed = tmp_path / "resumed"
    train_main(
        [
            "--env",
            "multispin/PaperLlama2-v0",
            "--timesteps",
            "256",
            "--n-envs",
            "4",
            "--env-kwargs",
            "action_mode:lengths",
            "num_users:6",
            "--run-dir",
            str(resumed),
            "--resume",
            str(ckpt),
            "--eval-freq",
            "0",
            "--no-progress",
            "--no-reference",
            "--horizon-reward",
        ]
    )
    assert (resumed / "model.zip").is_file()
    out = tmp_path / "cmp"
    rows = evaluate_main(
        [
            "--env",
            "multispin/PaperLlama2-v0",
            "--env-kwargs",
            "num_users:6",
            "--policies",
            "fixed",
            "hete[history]",
            f"learned={run}",
            "--seeds",
            "3",
            "--horizon-s",
            "5",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    names = [r["policy"] for r in rows]
    assert names == ["hete", "fixed", "hete[history]", "learned"]
    assert rows[0]["vs_hete"] == 1.0
    for f in ("compare.csv", "compare.md", "compare.png"):
        assert (out / f).stat().st_size > 100
    assert "learned" in capsys.readouterr().out


def test_evaluate_refuses_a_policy_trained_on_another_scenario(tmp_path, capsys):
    run = tmp_path / "run"
    from conftest import TINY_TRAIN_ARGS

    train_main(TINY_TRAIN_ARGS + ["--env-kwargs", "num_users:3", "--run-dir", str(run)])
    with pytest.raises(SystemExit) as e:  # one line, no traceback
        evaluate_main(["--policies", str(run), "--seeds", "1", "--out", str(tmp_path)])
    assert e.value.code == 2 and "same deployment" in capsys.readouterr().err


def test_sweep_runs_trials_on_rdb_storage(tmp_path):
    import optuna

    from multispin_train.sweep import main as sweep_main

    storage = f"sqlite:///{tmp_path / 'sweeps.db'}"
    args = [
        "--study",
        "smoke",
        "--storage",
        storage,
        "--trials",
        "2",
        "--timesteps",
        "128",
        "--eval-episodes",
        "2",
        "--env-kwargs",
        "action_mode:lengths",
        "num_users:3",
        "--out",
        str(tmp_path / "runs"),
        "--sampler-seed",
        "0",
    ]
    sweep_main(args)
    sweep_main(args[:5] + ["1"] + args[6:])  # a second worker joins the same study
    study = optuna.load_study(study_name="smoke", storage=storage)
    assert len(study.trials) == 3
    assert all(0.0 < t.value < 2.0 for t in study.trials)


def test_seed_statistics_report_iqm_worst_seed_and_improvement():
    import numpy as np

    from multispin_train.experiments import seed_statistics

    ratios = np.array([[1.0, 1.1], [0.9, 0.9], [1.2, 1.0], [1.05, 1.05], [1.0, 1.0]])
    stats = seed_statistics(ratios)
    assert stats["worst_seed_mean"] == pytest.approx(0.9)
    assert stats["per_seed_mean"] == pytest.approx([1.05, 0.9, 1.1, 1.05, 1.0])
    assert stats["iqm_ci95"][0] <= stats["iqm"] <= stats["iqm_ci95"][1]
    # 4 of 10 entries above 1 and 4 ties: (4 + 0.5 * 4) / 10
    assert stats["probability_of_improvement"] == pytest.approx(0.6)


def test_evaluate_rejects_unknown_policy(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--policies", "greedy", "--seeds", "1", "--out", str(tmp_path)])
    assert e.value.code == 2 and "neither a scheme" in capsys.readouterr().err
