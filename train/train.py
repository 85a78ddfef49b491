"""Train an SB3 agent (PPO, A2C, SAC, TD3) on any registered multispin env.

    multispin train --env multispin/PaperLlama2-v0 --algo ppo --timesteps 200000 \\
        --env-kwargs action_mode:'lengths' --seed 0 --run-dir runs/paper-ppo
    multispin train --resume runs/paper-ppo/checkpoints/rl_model_100000_steps.zip \\
        --run-dir runs/paper-ppo-more --timesteps 100000

Every model .zip (checkpoints, ``model.zip``, ``best_model.zip``) records the run's env id,
env kwargs, algorithm and current rate price rho (the ``multispin_run`` attribute), so
``--resume`` continues the same scenario with rho where it was; explicit options that
contradict the checkpoint are refused. Options are checked before any work starts: a bad
one exits with status 2 and a message naming it.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class TrainConfig:
    """One training run. Every field can be set on the command line."""

    env_id: str | None = None
    """Registered env id (see multispin_env.registration.ENV_IDS); default
    multispin/PaperLlama2-v0, or the checkpoint's with ``resume``."""
    algo: str | None = None
    """ppo, a2c, sac or td3; default ppo, or the checkpoint's with ``resume``."""
    timesteps: int | None = None
    """Environment steps to train for (default: 100,000 for residual actions, else the
    hyperparameter file's n_timesteps)."""
    seed: int = 0
    """Seeds the policy, the training envs (seed..seed+n_envs-1) and SB3."""
    n_envs: int | None = None
    """Parallel envs, stepped natively batched (default: the hyperparameter file's n_envs)."""
    env_kwargs: dict = field(default_factory=dict)
    """Env options / scenario overrides, e.g. {"action_mode": "lengths"}. With ``resume``,
    the checkpoint's are used; these may only repeat them. Without ``action_mode`` and
    ``base_policy``: residual actions over the scenario's tuned heuristic (or Hete)."""
    hyperparams_file: str | None = None
    """rl-zoo3-format YAML (default: multispin_train/hyperparams/<algo>.yml)."""
    hyperparams: dict = field(default_factory=dict)
    """Overrides of individual hyperparameters, e.g. {"learning_rate": 1e-4}."""
    run_dir: str | None = None
    """Output folder (default: runs/<env>_<algo>_s<seed>_<time>)."""
    eval_freq: int = 20_000
    """Evaluate every this many env steps (EvalCallback; 0 disables)."""
    eval_episodes: int = 16
    """Episodes per evaluation, on seeds disjoint from training."""
    checkpoint_freq: int = 100_000
    """Save a checkpoint (model + VecNormalize) every this many env steps (0 disables)."""
    resume: str | None = None
    """Checkpoint .zip to continue from (its VecNormalize file is picked up beside it). The
    run's env id, env kwargs, algorithm and rate price rho come from the checkpoint."""
    torch_threads: int = 1
    """torch.set_num_threads; 1 is ~10x faster for small MLPs on 2 cores."""
    progress_bar: bool = True
    """Show SB3's progress bar."""
    reference: bool = True
    """Measure the paper controller (Hete-Multi-SPIN) on the eval seeds and log the share."""
    name: str | None = None
    """Label used in evaluation tables."""
    rate_reward: bool | None = None
    """Train on tokens - rho * time with rho tracking the achieved goodput (average-reward,
    Dinkelbach); evaluation always uses the plain goodput-aligned horizon return. None: on
    for PPO/A2C, off (horizon return) for SAC/TD3, whose replay buffer would mix rewards
    priced at different rho (True with those is refused)."""


EVAL_SEED_OFFSET = 1_000_000  # evaluation seeds never overlap training seeds
RESIDUAL_LOG_STD_INIT = -2.0  # std 0.14: about one token of exploration around the base
RESIDUAL_LEARNING_RATE = 1e-3
RESIDUAL_TIMESTEPS = 100_000  # default budget of residual runs: fine-tuning, not learning
DEFAULT_ENV_ID = "multispin/PaperLlama2-v0"
ON_POLICY = ("ppo", "a2c")


def read_run_meta(checkpoint: str | Path) -> dict | None:
    """What a checkpoint (or model.zip) records about its run: ``env_id``, ``env_kwargs``,
    ``algo`` and, with the rate reward, ``rate_price_tokens_per_s``. Older checkpoints
    without it fall back to the run's ``config.json`` (no rate price then); None if neither
    exists."""
    import zipfile

    from multispin_train.callbacks import RUN_META_ATTR

    path = Path(checkpoint)
    try:
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read("data"))
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise ValueError(f"--resume {path} is not an SB3 model .zip ({err})") from err
    meta = data.get(RUN_META_ATTR)
    if isinstance(meta, dict) and "env_id" in meta:
        return dict(meta)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        return {k: saved.get(k) for k in ("env_id", "env_kwargs", "algo")}
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal once both are JSON values (tuples vs lists, numpy scalars)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy with every default settled and checked before any work starts: env id, algo,
    env kwargs (from the checkpoint on ``resume``; conflicting explicit values are refused),
    the reward (``rate_reward``), the env itself (built once, so a bad override fails here
    naming the field) and the hyperparameter file. Raises ValueError/TypeError."""
    from multispin_env.env import build_episodes
    from multispin_env.registration import resolve_env_id
    from multispin_train.hyperparams import ALGOS, load_hyperparams, split_hyperparams

    cfg = replace(cfg, env_kwargs=dict(cfg.env_kwargs), hyperparams=dict(cfg.hyperparams))
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.is_file():
            raise ValueError(f"--resume {path} does not exist")
        meta = read_run_meta(path)
        if meta is None:
            raise ValueError(
                f"--resume {path}: the checkpoint does not record its env id and env kwargs and "
                f"no config.json of its run was found (looked in "
                f"{path.parent.parent if path.parent.name == 'checkpoints' else path.parent}); "
                "resume a checkpoint inside its run directory"
            )
        saved_kwargs = dict(meta.get("env_kwargs") or {})
        conflicts = []
        if cfg.env_id is not None and cfg.env_id != meta["env_id"]:
            conflicts.append(f"--env {cfg.env_id} (checkpoint: {meta['env_id']})")
        if cfg.algo is not None and meta.get("algo") and cfg.algo != meta["algo"]:
            conflicts.append(f"--algo {cfg.algo} (checkpoint: {meta['algo']})")
        for key, value in cfg.env_kwargs.items():
            if key not in saved_kwargs:
                conflicts.append(f"--env-kwargs {key}:{value!r} (checkpoint: not set)")
            elif not _same(value, saved_kwargs[key]):
                conflicts.append(
                    f"--env-kwargs {key}:{value!r} (checkpoint: {saved_kwargs[key]!r})"
                )
        if conflicts:
            raise ValueError(
                f"--resume {path} continues a run on env {meta['env_id']} with env kwargs "
                f"{saved_kwargs}; these options conflict with it: {'; '.join(conflicts)}. "
                "Drop them (the checkpoint's are used), or start a new run without --resume"
            )
        cfg.env_id, cfg.env_kwargs = meta["env_id"], saved_kwargs
        cfg.algo = cfg.algo or meta.get("algo")
    cfg.env_id = cfg.env_id or DEFAULT_ENV_ID
    cfg.algo = cfg.algo or "ppo"
    if not cfg.resume and not {"action_mode", "base_policy"} & set(cfg.env_kwargs):
        # the default: learn corrections to the best heuristic there is, never from scratch
        cfg.env_kwargs["action_mode"] = "residual"
        cfg.env_kwargs["base_policy"] = default_base_policy(cfg.env_id)
    if cfg.timesteps is None and cfg.env_kwargs.get("action_mode") == "residual":
        cfg.timesteps = RESIDUAL_TIMESTEPS
    if cfg.algo not in ALGOS:
        raise ValueError(f"algo={cfg.algo!r}; choose one of {ALGOS}")
    if cfg.rate_reward is None:
        cfg.rate_reward = cfg.algo in ON_POLICY
    elif cfg.rate_reward and cfg.algo not in ON_POLICY:
        raise ValueError(
            f"the rate reward (tokens - rho * time) cannot train {cfg.algo}: rho moves after "
            f"every rollout ({cfg.algo} ends one every train_freq steps), so its replay buffer "
            "would mix rewards priced at different rho. Use --horizon-reward (the default "
            f"for {cfg.algo}), or --algo ppo/a2c"
        )
    if cfg.rate_reward and not cfg.reference and _saved_rate(cfg) is None:
        raise ValueError(
            "--no-reference needs --horizon-reward: the rate reward starts its price rho at "
            "the reference controller's goodput. Add --horizon-reward, or drop --no-reference"
        )
    for name in ("eval_freq", "checkpoint_freq"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 0 (0 disables)")
    for name in ("eval_episodes", "torch_threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("timesteps", "n_envs"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    scenario, kwargs = resolve_env_id(cfg.env_id)
    build_episodes(scenario, {**kwargs, **cfg.env_kwargs}, num_envs=1)
    split_hyperparams(load_hyperparams(cfg.algo, cfg.env_id, cfg.hyperparams_file, cfg.hyperparams))
    return cfg


def default_base_policy(env_id: str) -> str:
    """The base a default run corrects: the scenario's tuned heuristic where ``multispin tune``
    has made one (``results/tuned/<env>.json``; its knobs, not the path, go into the run's
    config), else the paper's Hete with the fast solver."""
    from multispin_agents.tuned import default_tuned_path, load_tuned

    path = default_tuned_path(env_id)
    return load_tuned(path).with_fast().name if path.is_file() else "tuned[hete,fast]"


def _saved_rate(cfg: TrainConfig) -> float | None:
    """The rate price rho recorded in the ``resume`` checkpoint, if any."""
    if not cfg.resume:
        return None
    meta = read_run_meta(cfg.resume) or {}
    rate = meta.get("rate_price_tokens_per_s")
    return float(rate) if isinstance(rate, (int, float)) and rate > 0 else None


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
    )
    from stable_baselines3.common.noise import NormalActionNoise
    from stable_baselines3.common.vec_env import VecNormalize

    from multispin_agents.policies import SolverPolicy
    from multispin_env.episodes import EnvOptions
    from multispin_eval.harness import SolverController, run_episodes, scenario_for
    from multispin_train.callbacks import (
        RUN_META_ATTR,
        EvalProgressLogger,
        GoodputCallback,
        RatePriceCallback,
        eval_from_start_callback_class,
    )
    from multispin_train.hyperparams import linear_schedule, load_hyperparams, split_hyperparams

    cfg = resolve_config(cfg)
    torch.set_num_threads(cfg.torch_threads)
    raw = load_hyperparams(cfg.algo, cfg.env_id, cfg.hyperparams_file, cfg.hyperparams)
    zoo, algo_kwargs = split_hyperparams(raw)
    if cfg.env_kwargs.get("action_mode") == "residual" and "PerUser" in str(zoo.get("policy")):
        # fine-tuning, not learning from scratch: start exactly at the base heuristic (zero
        # mean correction), explore about one token around it, and take smaller steps
        given = set(cfg.hyperparams)
        algo_kwargs["policy_kwargs"] = {
            **algo_kwargs.get("policy_kwargs", {}),
            "zero_init": True,
            "action_bias": 0.0,
        }
        if "policy_kwargs" not in given:
            algo_kwargs["policy_kwargs"]["log_std_init"] = RESIDUAL_LOG_STD_INIT
        if "learning_rate" not in given:
            algo_kwargs["learning_rate"] = linear_schedule(RESIDUAL_LEARNING_RATE)
    if "PerUser" in str(zoo.get("policy")):
        from multispin_agents.per_user_policy import env_layout
        from multispin_env.env import build_episodes
        from multispin_env.registration import resolve_env_id

        scenario, id_kwargs = resolve_env_id(cfg.env_id)
        probe, _ = build_episodes(scenario, {**id_kwargs, **cfg.env_kwargs}, num_envs=1)
        if probe.levers.any:  # explicit layout: lever outputs and protocol features
            algo_kwargs["policy_kwargs"] = {
                **algo_kwargs.get("policy_kwargs", {}),
                "layout": env_layout(probe),
            }
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

    setattr(
        model,
        RUN_META_ATTR,
        {"env_id": cfg.env_id, "env_kwargs": dict(cfg.env_kwargs), "algo": cfg.algo},
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
    base_reference = None
    scenario, env_options = scenario_for(cfg.env_id, cfg.env_kwargs)
    base_policy = EnvOptions.build(scenario, **env_options).base_policy
    if base_policy is not None:  # the heuristic a residual policy starts from
        from multispin_agents.tuned import TunedHeuristic

        base_seeds = range(cfg.seed + EVAL_SEED_OFFSET, cfg.seed + EVAL_SEED_OFFSET + 32)
        base = run_episodes(  # 32 episodes: rho is priced from this
            SolverController(TunedHeuristic.parse(base_policy)),
            cfg.env_id,
            base_seeds,
            env_kwargs=cfg.env_kwargs,
        )
        base_reference = float(base.goodput.mean())
    callbacks = [GoodputCallback(reference_goodput=reference)]
    num_users = scenario.num_users
    # eval return (tokens per user inside the horizon) -> goodput in tokens/s
    scale = num_users / EnvOptions.build(scenario, **env_options).horizon_s
    initial_rate = None
    if cfg.rate_reward:
        # rho resumes from the checkpoint, else starts at the goodput the policy starts from:
        # the base heuristic's for residual actions (a lower rho would reward long rounds)
        initial_rate = _saved_rate(cfg) or base_reference or reference
        callbacks.append(
            RatePriceCallback(
                initial_rate=initial_rate,
                num_users=num_users,
                track=base_reference is None,  # residual: one Dinkelbach step from the base
            )
        )
    if cfg.eval_freq > 0:
        eval_env = build_vec_env(cfg, cfg.eval_episodes, eval_seeds[0], normalize, training=False)
        callbacks.append(
            eval_from_start_callback_class()(
                eval_env,
                eval_freq=max(cfg.eval_freq // n_envs, 1),
                n_eval_episodes=cfg.eval_episodes,
                best_model_save_path=str(run_dir),
                log_path=str(run_dir / "eval"),
                deterministic=True,
                verbose=0,
                callback_after_eval=EvalProgressLogger(run_dir / "eval_progress.csv", scale),
                eval_seed=eval_seeds[0],
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
        "reference_base_goodput": base_reference,
        "initial_rate_price_tokens_per_s": initial_rate,
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
    model.save(run_dir / "model.zip")  # with RUN_META_ATTR (env, kwargs, algo, final rho)
    if isinstance(venv, VecNormalize):
        venv.save(str(run_dir / "vecnormalize.pkl"))
    config_out["train_time_s"] = round(train_s, 1)
    if cfg.rate_reward:
        config_out["final_rate_price_tokens_per_s"] = getattr(model, RUN_META_ATTR).get(
            "rate_price_tokens_per_s"
        )
    (run_dir / "config.json").write_text(json.dumps(config_out, indent=2, default=str))
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="multispin train",
        description=__doc__.split("\n")[0],
    )
    p.add_argument(
        "--env",
        dest="env_id",
        default=None,
        help=f"registered env id (default {DEFAULT_ENV_ID}; with --resume, the checkpoint's)",
    )
    p.add_argument(
        "--algo",
        default=None,
        choices=["ppo", "a2c", "sac", "td3"],
        help="SB3 algorithm (default ppo; with --resume, the checkpoint's)",
    )
    p.add_argument(
        "--timesteps",
        type=int,
        help="env steps to train for (default: 100000 with residual actions, else the "
        "hyperparameter file's n_timesteps)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seeds the policy, the training envs (seed..seed+n_envs-1) and SB3 "
        "(default %(default)s)",
    )
    p.add_argument(
        "--n-envs",
        type=int,
        help="parallel envs, natively batched (default: the hyperparameter file's n_envs)",
    )
    p.add_argument(
        "--env-kwargs",
        nargs="*",
        default=[],
        metavar="KEY:VALUE",
        help="env options and scenario overrides, e.g. action_mode:lengths num_users:8 "
        "observe_true_alpha:false (values are Python literals; true/false are booleans). "
        "Without action_mode and base_policy: action_mode:residual over the scenario's tuned "
        "heuristic (results/tuned/<env>.json) or Hete",
    )
    p.add_argument(
        "--hyperparams-file",
        help="rl-zoo3-format YAML (default: multispin_train/hyperparams/<algo>.yml)",
    )
    p.add_argument(
        "--params",
        nargs="*",
        default=[],
        metavar="KEY:VALUE",
        help="override hyperparameters, e.g. learning_rate:1e-4",
    )
    p.add_argument("--run-dir", help="output folder (default: runs/<env>_<algo>_s<seed>_<time>)")
    p.add_argument(
        "--eval-freq",
        type=int,
        default=d.eval_freq,
        help="evaluate every this many env steps on held-out seeds (0 disables; "
        "default %(default)s)",
    )
    p.add_argument(
        "--eval-episodes",
        type=int,
        default=d.eval_episodes,
        help="episodes (seeds) per evaluation and for the reference controller "
        "(default %(default)s)",
    )
    p.add_argument(
        "--checkpoint-freq",
        type=int,
        default=d.checkpoint_freq,
        help="save model + VecNormalize every this many env steps (0 disables; "
        "default %(default)s)",
    )
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT.zip",
        help="continue a checkpoint; its env id, env kwargs, algo and rate price rho are "
        "restored (explicit options that conflict with them are refused)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=d.torch_threads,
        help="torch.set_num_threads (default %(default)s, fastest for small MLPs)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress_bar",
        action="store_false",
        help="hide SB3's progress bar",
    )
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip measuring the paper controller (Hete) on the eval seeds; needs "
        "--horizon-reward (the rate reward starts rho there) unless resuming",
    )
    p.add_argument("--name", help="label used in evaluation tables (default: the run folder)")
    reward = p.add_mutually_exclusive_group()
    reward.add_argument(
        "--horizon-reward",
        dest="rate_reward",
        action="store_false",
        default=None,
        help="train on the plain horizon return instead of tokens - rho * time "
        "(the default for sac/td3)",
    )
    reward.add_argument(
        "--rate-reward",
        dest="rate_reward",
        action="store_true",
        default=None,
        help="train on tokens - rho * time with rho tracking the achieved goodput "
        "(the default for ppo/a2c; refused for sac/td3)",
    )
    return p


def parse_args(argv=None) -> TrainConfig:
    """Parsed and fully checked (:func:`resolve_config`); a bad option exits with status 2
    and a message naming it, without a traceback."""
    from multispin_train.hyperparams import parse_cli_kwargs

    p = build_parser()
    values = vars(p.parse_args(argv))
    try:
        values["env_kwargs"] = parse_cli_kwargs(values["env_kwargs"])
        values["hyperparams"] = parse_cli_kwargs(values.pop("params"))
        return resolve_config(TrainConfig(**values))
    except (ValueError, TypeError) as err:
        p.error(str(err))


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
