"""Hardening of `multispin train`: booleans in --env-kwargs, options checked up front (exit 2,
no traceback, the message names the fix), help for every flag, --resume restores the run's env
and rate price, and the rate reward is refused with off-policy algorithms."""

import json
import re

import gymnasium as gym
import numpy as np
import pytest

from multispin_env.cli import main as cli_main
from multispin_train.hyperparams import parse_cli_kwargs
from multispin_train.train import build_parser, parse_args, read_run_meta
from multispin_train.train import main as train_main


def test_env_kwargs_parse_booleans_none_and_non_finite():
    got = parse_cli_kwargs(
        ["observe_true_alpha:false", "rayleigh_fading:False", "a:TRUE", "b:none", "c:inf"]
    )
    assert got["observe_true_alpha"] is False and got["rayleigh_fading"] is False
    assert got["a"] is True and got["b"] is None and got["c"] == float("inf")
    assert parse_cli_kwargs(["action_mode:lengths", "n:8", "r:{'tokens': 1.0}"]) == {
        "action_mode": "lengths",
        "n": 8,
        "r": {"tokens": 1.0},
    }


def test_false_flags_from_the_cli_really_switch_things_off():
    cfg = parse_args(["--env-kwargs", "observe_true_alpha:false", "rayleigh_fading:false"])
    assert cfg.env_kwargs["observe_true_alpha"] is False
    assert cfg.env_kwargs["rayleigh_fading"] is False
    env = gym.make(cfg.env_id, **cfg.env_kwargs).unwrapped
    assert not any("alpha_true" in name for name in env.feature_names)  # hidden acceptance
    env.reset(seed=0)
    first = env.simulator.spectral_eff.copy()
    env.step(np.zeros(env.action_space.shape, np.float32))
    np.testing.assert_array_equal(env.simulator.spectral_eff, first)  # no fading redraw


BAD_CLI = [
    (["--env-kwargs", "observe_true_alpha:maybe"], "observe_true_alpha='maybe' must be a bool"),
    (["--env-kwargs", "horizon_s:inf"], "horizon_s=inf must be a finite number > 0"),
    (
        ["--env-kwargs", "reward_weights:{'tokens': 1e999}"],
        r"reward_weights\['tokens'\] must be finite, got inf",
    ),  # fmt: skip
    (["--env-kwargs", "bandwith_hz:5e6"], "did you mean 'bandwidth_hz'"),
    (["--env-kwargs", "num_users"], "expected key:value"),
    (["--env", "multispin/Nope-v0"], "unknown env id"),
    (["--no-reference"], "--no-reference needs --horizon-reward"),
    (["--algo", "sac", "--rate-reward"], "replay buffer would mix rewards"),
    (["--eval-freq", "-5"], "eval_freq=-5 must be >= 0"),
]


@pytest.mark.parametrize("argv, message", BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_bad_options_exit_2_with_the_fix_and_no_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "multispin train: error:" in err and "Traceback" not in err
    assert re.search(message, err), err


def test_no_reference_alone_fails_up_front_through_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--no-reference", "--no-progress"])
    assert exit_info.value.code == 2
    assert "add --horizon-reward" in capsys.readouterr().err.lower()


def test_every_flag_has_help_text():
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 18
    missing = [a.option_strings[0] for a in flags if not (a.help and a.help.strip())]
    assert not missing, f"flags without help: {missing}"


def test_off_policy_algorithms_default_to_the_horizon_reward():
    assert parse_args(["--algo", "sac"]).rate_reward is False
    assert parse_args(["--algo", "td3", "--horizon-reward"]).rate_reward is False
    assert parse_args(["--algo", "a2c"]).rate_reward is True
    assert parse_args([]).rate_reward is True and parse_args([]).algo == "ppo"


def test_rate_price_callback_refuses_an_off_policy_model():
    from stable_baselines3 import SAC

    from multispin_env.vector_env import make_sb3_vec_env
    from multispin_train.callbacks import RatePriceCallback

    venv = make_sb3_vec_env("multispin/PaperLlama2-v0", num_envs=1, num_users=2)
    model = SAC("MlpPolicy", venv, buffer_size=100, learning_starts=10, device="cpu")
    with pytest.raises(ValueError, match="replay buffer would mix rewards"):
        model.learn(20, callback=RatePriceCallback(initial_rate=100.0, num_users=2))


TINY = [
    "--n-envs",
    "2",
    "--eval-freq",
    "0",
    "--eval-episodes",
    "2",
    "--no-progress",
    "--params",
    "n_steps:64",
    "batch_size:64",
    "n_epochs:1",
]


def test_resume_restores_env_kwargs_and_rate_price(tmp_path, capsys):
    run = tmp_path / "run"
    kwargs = ["num_users:3", "action_mode:lengths", "horizon_s:2.0", "csi_error_std:0.2"]
    train_main(
        TINY
        + ["--timesteps", "256", "--checkpoint-freq", "256", "--run-dir", str(run)]
        + ["--env-kwargs", *kwargs]
    )
    config = json.loads((run / "config.json").read_text())
    ckpt = run / "checkpoints" / "rl_model_256_steps.zip"
    meta = read_run_meta(ckpt)
    assert meta["env_id"] == "multispin/PaperLlama2-v0" and meta["algo"] == "ppo"
    assert (
        meta["env_kwargs"]
        == config["env_kwargs"]
        == {
            "num_users": 3,
            "action_mode": "lengths",
            "horizon_s": 2.0,
            "csi_error_std": 0.2,
        }
    )
    rho = meta["rate_price_tokens_per_s"]  # one rollout in: rho has moved off the reference
    assert np.isfinite(rho) and rho > 0 and rho != config["reference_hete_goodput"]
    assert read_run_meta(run / "model.zip")["rate_price_tokens_per_s"] > 0

    # resume without repeating the env kwargs: the checkpoint's are used, rho continues
    resumed = tmp_path / "resumed"
    train_main(
        TINY + ["--timesteps", "128", "--checkpoint-freq", "0", "--run-dir", str(resumed)]
        + ["--resume", str(ckpt), "--no-reference"]
    )  # fmt: skip
    again = json.loads((resumed / "config.json").read_text())
    assert again["env_kwargs"] == meta["env_kwargs"] and again["algo"] == "ppo"
    assert again["rate_reward"] is True
    assert again["initial_rate_price_tokens_per_s"] == rho
    capsys.readouterr()

    # explicit values that repeat the checkpoint's are fine; conflicting ones are refused
    ok = parse_args(["--resume", str(ckpt), "--env-kwargs", "num_users:3"])
    assert ok.env_kwargs == meta["env_kwargs"]
    for argv, what in (
        (["--env-kwargs", "num_users:4"], "--env-kwargs num_users:4 (checkpoint: 3)"),
        (["--env-kwargs", "observe_true_alpha:true"], "observe_true_alpha:True (checkpoint: not"),
        (["--env", "multispin/PaperQwen35-v0"], "--env multispin/PaperQwen35-v0 (checkpoint:"),
        (["--algo", "a2c"], "--algo a2c (checkpoint: ppo)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--resume", str(ckpt), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert what in err and "conflict" in err and "Traceback" not in err
