"""Train an SB3 agent (PPO, A2C, SAC, TD3) on any registered multispin env.

    multispin train --env multispin/PaperLlama2-v0 --algo ppo --timesteps 200000 \\
        --env-kwargs action_mode:'lengths' --seed 0 --run-dir runs/paper-ppo
    multispin train --resume runs/paper-ppo/checkpoints/rl_model_100000_steps.zip ...

A run directory holds ``config.json`` (everything needed to rebuild the run), ``model.zip``,
``vecnormalize.pkl`` (observation statistics, needed at deployment), ``best_model.zip``
(EvalCallback), ``checkpoints/`` and ``tb/`` (TensorBoard: ``goodput/``, ``policy/``,
``rollout/``, ``train/``, ``eval/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class TrainConfig:
    """One training run. Every field can be set on the command line."""

    env_id: str = "multispin/PaperLlama2-v0"
    """Registered env id (see multispin_env.registration.ENV_IDS)."""
    algo: str = "ppo"
    """ppo, a2c, sac or td3."""
    timesteps: int | None = None
    """Environment steps to train for (default: the hyperparameter file's n_timesteps)."""
    seed: int = 0
    """Seeds the policy, the training envs (seed..seed+n_envs-1) and SB3."""
    n_envs: int | None = None
    """Parallel envs, stepped natively batched (default: the hyperparameter file's n_envs)."""
    env_kwargs: dict = field(default_factory=dict)
    """Env options / scenario overrides, e.g. {"action_mode": "lengths"}."""
    hyperparams_file: str | None = None
    """rl-zoo3-format YAML (default: multispin_train/hyperparams/<algo>.yml)."""
    hyperparams: dict = field(default_factory=dict)
    """Overrides of individual hyperparameters, e.g. {"learning_rate": 1e-4}."""
    run_dir: str | None = None
    """Output folder (default: runs/<env>_<algo>_s<seed>_<time>)."""
    eval_freq: int = 20_000
    """Evaluate every this many env steps (EvalCallback; 0 disables)."""
    eval_episodes: int = 8
    """Episodes per evaluation, on seeds disjoint from training."""
    checkpoint_freq: int = 100_000
    """Save a checkpoint (model + VecNormalize) every this many env steps (0 disables)."""
    resume: str | None = None
    """Checkpoint .zip to continue from (its VecNormalize file is picked up beside it)."""
    torch_threads: int = 1
    """torch.set_num_threads; 1 is ~10x faster for small MLPs on 2 cores."""
    progress_bar: bool = True
    """Show SB3's progress bar."""
    reference: bool = True
    """Measure the paper controller (Hete-Multi-SPIN) on the eval seeds and log the share."""
    name: str | None = None
    """Label used in evaluation tables."""
    rate_reward: bool = True
    """Train on tokens - rho * time with rho tracking the achieved goodput (average-reward,
    Dinkelbach); evaluation always uses the plain goodput-aligned horizon return."""


EVAL_SEED_OFFSET = 1_000_000  # evaluation seeds never overlap training seeds


def _algo_class(name: str):
    from stable_baselines3 import A2C, PPO, SAC, TD3

    return {"ppo": PPO, "a2c": A2C, "sac": SAC, "td3": TD3}[name]


def _library_versions() -> dict[str, str]:
    import gymnasium
    import stable_baselines3
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "stable_baselines3": stable_baselines3.__version__,
    }


def build_vec_env(cfg: TrainConfig, n_envs: int, seed: int, normalize, training: bool):
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    from multispin_env.vector_env import make_sb3_vec_env

    env_kwargs = dict(cfg.env_kwargs)
    if not training:  # evaluate on the goodput-aligned return, whatever the training reward
        env_kwargs.pop("reward_weights", None)
    venv = VecMonitor(make_sb3_vec_env(cfg.env_id, num_envs=n_envs, seed=seed, **env_kwargs))
    if normalize:
        kwargs = normalize if isinstance(normalize, dict) else {}
        if not training:
            kwargs = {**kwargs, "norm_reward": False}
        venv = VecNormalize(venv, training=training, **kwargs)
    return venv


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the run directory."""
    import torch
    from stable_baselines3.common.callbacks import (
        CallbackList,
        CheckpointCallback,
        EvalCallback,
    )
    from stable_baselines3.common.noise import NormalActionNoise
    from stable_baselines3.common.vec_env import VecNormalize

    from multispin_agents.policies import SolverPolicy
    from multispin_env.episodes import EnvOptions
    from multispin_eval.harness import SolverController, run_episodes, scenario_for
    from multispin_train.callbacks import EvalProgressLogger, GoodputCallback, RatePriceCallback
    from multispin_train.hyperparams import load_hyperparams, split_hyperparams

    torch.set_num_threads(cfg.torch_threads)
    raw = load_hyperparams(cfg.algo, cfg.env_id, cfg.hyperparams_file, cfg.hyperparams)
    zoo, algo_kwargs = split_hyperparams(raw)
    n_envs = int(cfg.n_envs or zoo.get("n_envs", 8))
    timesteps = int(cfg.timesteps or zoo.get("n_timesteps", 1e6))
    normalize = zoo.get("normalize", False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(
        cfg.run_dir or f"runs/{cfg.env_id.split('/')[-1]}_{cfg.algo}_s{cfg.seed}_{stamp}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)

    venv = build_vec_env(cfg, n_envs, cfg.seed, normalize, training=True)
    eval_seeds = list(
        range(cfg.seed + EVAL_SEED_OFFSET, cfg.seed + EVAL_SEED_OFFSET + cfg.eval_episodes)
    )
    algo_cls = _algo_class(cfg.algo)
    if cfg.algo in ("td3", "sac") and zoo.get("noise_type") == "normal":
        dim = venv.action_space.shape[0]
        algo_kwargs["action_noise"] = NormalActionNoise(
            np.zeros(dim), zoo["noise_std"] * np.ones(dim)
        )
    if cfg.resume:
        resume = Path(cfg.resume)
        if not resume.is_file():
            raise ValueError(f"--resume {resume} does not exist")
        stats = resume.with_name(
            resume.name.replace("rl_model_", "rl_model_vecnormalize_")
        ).with_suffix(".pkl")
        if normalize:
            if not stats.is_file():
                raise ValueError(f"VecNormalize statistics {stats} missing beside {resume}")
            venv = VecNormalize.load(str(stats), venv.venv)
        model = algo_cls.load(resume, env=venv, device="cpu", tensorboard_log=str(run_dir / "tb"))
    else:
        model = algo_cls(
            zoo.get("policy", "MlpPolicy"),
            venv,
            seed=cfg.seed,
            verbose=0,
            device="cpu",
            tensorboard_log=str(run_dir / "tb"),
            **algo_kwargs,
        )

    reference = None
    if cfg.reference:
        ref = run_episodes(
            SolverController(SolverPolicy("hete")),
            cfg.env_id,
            eval_seeds,
            env_kwargs=cfg.env_kwargs,
        )
        reference = float(ref.goodput.mean())
    callbacks = [GoodputCallback(reference_goodput=reference)]
    scenario, env_options = scenario_for(cfg.env_id, cfg.env_kwargs)
    num_users = scenario.num_users
    # eval return (tokens per user inside the horizon) -> goodput in tokens/s
    scale = num_users / EnvOptions.build(scenario, **env_options).horizon_s
    if cfg.rate_reward:
        if reference is None:
            raise ValueError("rate_reward needs the reference controller (drop --no-reference)")
        callbacks.append(RatePriceCallback(initial_rate=reference, num_users=num_users))
    if cfg.eval_freq > 0:
        eval_env = build_vec_env(cfg, cfg.eval_episodes, eval_seeds[0], normalize, training=False)
        callbacks.append(
            EvalCallback(
                eval_env,
                eval_freq=max(cfg.eval_freq // n_envs, 1),
                n_eval_episodes=cfg.eval_episodes,
                best_model_save_path=str(run_dir),
                log_path=str(run_dir / "eval"),
                deterministic=True,
                verbose=0,
                callback_after_eval=EvalProgressLogger(run_dir / "eval_progress.csv", scale),
            )
        )
    if cfg.checkpoint_freq > 0:
        callbacks.append(
            CheckpointCallback(
                save_freq=max(cfg.checkpoint_freq // n_envs, 1),
                save_path=str(run_dir / "checkpoints"),
                save_vecnormalize=True,
            )
        )

    config_out = asdict(cfg) | {
        "n_envs": n_envs,
        "timesteps": timesteps,
        "hyperparams_resolved": raw,
        "reference_hete_goodput": reference,
        "eval_seeds": eval_seeds,
        "versions": _library_versions(),
        "name": cfg.name or run_dir.name,
    }
    (run_dir / "config.json").write_text(json.dumps(config_out, indent=2, default=str))
    start = time.perf_counter()
    model.learn(
        total_timesteps=timesteps,
        callback=CallbackList(callbacks),
        progress_bar=cfg.progress_bar,
        reset_num_timesteps=not cfg.resume,
        tb_log_name="run",
    )
    train_s = time.perf_counter() - start
    model.save(run_dir / "model.zip")
    if isinstance(venv, VecNormalize):
        venv.save(str(run_dir / "vecnormalize.pkl"))
    config_out["train_time_s"] = round(train_s, 1)
    (run_dir / "config.json").write_text(json.dumps(config_out, indent=2, default=str))
    return run_dir


def parse_args(argv=None) -> TrainConfig:
    from multispin_train.hyperparams import parse_cli_kwargs

    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="multispin train", description=__doc__.split("\n")[0])
    p.add_argument("--env", dest="env_id", default=defaults.env_id)
    p.add_argument("--algo", default=defaults.algo, choices=["ppo", "a2c", "sac", "td3"])
    p.add_argument("--timesteps", type=int)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--n-envs", type=int)
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE")
    p.add_argument("--hyperparams-file")
    p.add_argument(
        "--params",
        nargs="*",
        default=[],
        metavar="KEY:VALUE",
        help="override hyperparameters, e.g. learning_rate:1e-4",
    )
    p.add_argument("--run-dir")
    p.add_argument("--eval-freq", type=int, default=defaults.eval_freq)
    p.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes)
    p.add_argument("--checkpoint-freq", type=int, default=defaults.checkpoint_freq)
    p.add_argument("--resume")
    p.add_argument("--torch-threads", type=int, default=defaults.torch_threads)
    p.add_argument("--no-progress", dest="progress_bar", action="store_false")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--name")
    p.add_argument(
        "--horizon-reward",
        dest="rate_reward",
        action="store_false",
        help="train on the plain horizon return instead of tokens - rho * time",
    )
    values = vars(p.parse_args(argv))
    values["env_kwargs"] = parse_cli_kwargs(values["env_kwargs"])
    values["hyperparams"] = parse_cli_kwargs(values.pop("params"))
    return TrainConfig(**values)


def main(argv=None) -> Any:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = parse_args(argv)
    run_dir = train(cfg)
    saved = json.loads((run_dir / "config.json").read_text())
    print(
        f"trained {cfg.algo} on {cfg.env_id} for {saved['timesteps']} steps in "
        f"{saved['train_time_s']} s -> {run_dir}"
    )
    return run_dir


if __name__ == "__main__":
    main()
