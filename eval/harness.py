"""Play any policy for one episode per seed and measure what a deployment would.

Every policy sees the same realizations for the same seeds (device speeds, gains, tasks,
fading and acceptance draws are a function of the seed's key; see multispin_env.rng), so
comparisons between policies use common random numbers.

Policies implement ``decide(episodes) -> (lengths, bandwidth_hz)`` on a
:class:`~multispin_env.episodes.BatchedEpisodes`, and name the env options they need
(``env_kwargs``, e.g. the action mode a learned policy was trained with).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gymnasium.utils import seeding

from multispin_agents.policies import SolverPolicy
from multispin_env.config import ScenarioConfig
from multispin_env.env import resolve_scenario
from multispin_env.episodes import BatchedEpisodes, EnvOptions, split_kwargs
from multispin_env.registration import resolve_env_id
from multispin_env.rng import new_keys
from multispin_env.types import Decision
from multispin_eval.stats import ci95_halfwidth


@dataclass
class EpisodeMetrics:
    """Per-seed results (arrays over seeds)."""

    goodput: np.ndarray
    jain: np.ndarray
    draft_frac: np.ndarray
    upload_frac: np.ndarray
    verify_frac: np.ndarray  # server busy fraction (verification time / elapsed)
    mean_round_s: np.ndarray
    mean_draft_length: np.ndarray
    energy_j_per_token: np.ndarray
    wasted_per_token: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Means over seeds; ``goodput_ci95`` is NaN for a single seed (no spread to use)."""
        return {
            "goodput": float(self.goodput.mean()),
            "goodput_ci95": ci95_halfwidth(self.goodput),
            "jain": float(self.jain.mean()),
            "draft_frac": float(self.draft_frac.mean()),
            "upload_frac": float(self.upload_frac.mean()),
            "verify_frac": float(self.verify_frac.mean()),
            "round_ms": float(1e3 * self.mean_round_s.mean()),
            "draft_length": float(self.mean_draft_length.mean()),
            "energy_j_per_token": float(self.energy_j_per_token.mean()),
            "wasted_per_token": float("nan")
            if self.wasted_per_token is None
            else float(self.wasted_per_token.mean()),
        }


class SolverController:
    """Harness adapter for :class:`multispin_agents.policies.SolverPolicy`."""

    env_kwargs: dict = {}

    def __init__(self, policy: SolverPolicy) -> None:
        self.policy = policy
        self.name = policy.name

    def decide(self, episodes: BatchedEpisodes):
        view = episodes.server_view()
        if hasattr(self.policy, "decide"):  # a tuned heuristic knows the protocol's levers
            return self.policy.decide(view)
        return self.policy.act(view)


def default_model_file(run_dir: str | Path) -> str:
    """The model a run stands for: what the gate deployed (``deployed_model.zip``) where
    ``python -m multispin_train.gate`` has run, else the final ``model.zip``."""
    return "deployed_model.zip" if (Path(run_dir) / "deployed_model.zip").is_file() else "model.zip"


class LearnedController:
    """A trained SB3 model (plus its VecNormalize statistics) from a run directory."""

    def __init__(self, run_dir: str | Path, model_file: str | None = None) -> None:
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{run_dir} is not a training run directory (no config.json)")
        self.config = json.loads(config_path.read_text())
        model_file = model_file or default_model_file(run_dir)
        model_path = run_dir / model_file
        if not model_path.is_file():
            present = sorted(f.name for f in run_dir.glob("*.zip")) or "none"
            raise ValueError(
                f"{model_path} does not exist; the run has {present} (deployed_model.zip: "
                "what the gate deployed; best_model.zip: the selected one; model.zip: the "
                "final one)"
            )
        from stable_baselines3 import A2C, PPO, SAC, TD3

        algo = {"ppo": PPO, "a2c": A2C, "sac": SAC, "td3": TD3}[self.config["algo"]]
        self.model = algo.load(model_path, device="cpu")
        self.obs_norm = None
        norm_path = run_dir / "vecnormalize.pkl"
        if norm_path.is_file():
            with norm_path.open("rb") as f:
                self.obs_norm = pickle.load(f)
        self.env_id = self.config["env_id"]
        self.env_kwargs = dict(self.config.get("env_kwargs", {}))
        self.name = self.config.get("name", run_dir.name)

    def decide(self, episodes: BatchedEpisodes):
        obs = episodes.observe()
        if self.obs_norm is not None:
            obs = self.obs_norm.normalize_obs(obs)
        actions, _ = self.model.predict(obs, deterministic=True)
        return episodes.codec.decode_decision(episodes.codec.check(actions), episodes.context())


class BundleController:
    """An exported policy bundle (ONNX) in the simulator: the same graph the live server runs."""

    def __init__(self, folder: str | Path) -> None:
        from multispin_agents.bundle import PolicyBundle

        self.bundle = PolicyBundle(folder)
        self.env_id = self.bundle.meta["env_id"]
        self.env_kwargs = dict(self.bundle.meta.get("env_kwargs", {}))
        self.name = f"bundle:{Path(folder).name}"
        self._checked = False

    def decide(self, episodes: BatchedEpisodes):
        if not self._checked:  # the env's observation layout must be the policy's
            self.bundle.check_features(episodes.spec.feature_names)
            self._checked = True
        actions = episodes.codec.check(self.bundle.act(episodes.observe()))
        return episodes.codec.decode_decision(actions, episodes.context())


def scenario_for(env_id: str, env_kwargs: dict | None = None) -> tuple[ScenarioConfig, dict]:
    """(scenario, env options) for a registered id or preset plus kwargs."""
    preset, base = resolve_env_id(env_id)
    base.update(env_kwargs or {})
    env_options, scenario_overrides = split_kwargs(base)
    return resolve_scenario(preset, scenario_overrides), env_options


def seed_keys(seeds) -> np.ndarray:
    """The per-env keys ``MultiSpinEnv.reset(seed=s)`` would draw for each seed."""
    return np.concatenate([new_keys(seeding.np_random(int(s))[0], 1) for s in seeds])


def run_episodes(
    controller, env_id: str, seeds, horizon_s: float | None = None, env_kwargs: dict | None = None
) -> EpisodeMetrics:
    """One episode per seed, all seeds side by side in one batched simulator."""
    kwargs = dict(getattr(controller, "env_kwargs", {}) or {})
    kwargs.update(env_kwargs or {})
    if horizon_s is not None:
        kwargs["horizon_s"] = horizon_s
    cfg, options = scenario_for(env_id, kwargs)
    seeds = list(seeds)
    n = len(seeds)
    episodes = BatchedEpisodes(cfg, EnvOptions.build(cfg, **options), n)
    episodes.reset(seed_keys(seeds), np.arange(n))
    k = cfg.num_users
    user_tokens = np.zeros((n, k))
    split = np.zeros((n, 3))
    time_s, rounds, lengths_sum, energy = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    wasted = np.zeros(n)
    done = np.zeros(n, dtype=bool)
    goodput = np.zeros(n)
    rows = np.arange(n)
    while not done.all():
        decision = controller.decide(episodes)
        if not isinstance(decision, Decision):
            decision = Decision(*decision)
        _, truncated, s = episodes.step_decision(decision, validate=True)
        live = ~done
        inside = s["inside_horizon"] * live
        user_tokens += inside[:, None] * s["committed"]
        strag = s["straggler"]
        split[:, 0] += inside * s["t_draft_s"][rows, strag]
        split[:, 1] += inside * s["t_upload_s"][rows, strag]
        split[:, 2] += inside * s["t_verify_s"]
        time_s += inside * s["round_time_s"]
        rounds += live
        lengths_sum += live * s["draft_lengths"].mean(axis=1)
        energy += inside * s["energy_j"]
        wasted += inside * s["wasted"].sum(axis=1)
        newly = truncated & ~done
        goodput[newly] = s["episode_goodput_tokens_per_s"][newly]
        done |= truncated
    tokens = user_tokens.sum(axis=1)
    jain = tokens**2 / (k * (user_tokens**2).sum(axis=1))
    return EpisodeMetrics(
        goodput=goodput,
        jain=jain,
        draft_frac=split[:, 0] / time_s,
        upload_frac=split[:, 1] / time_s,
        verify_frac=split[:, 2] / time_s,
        mean_round_s=time_s / rounds,
        mean_draft_length=lengths_sum / rounds,
        energy_j_per_token=energy / np.maximum(tokens, 1),
        wasted_per_token=wasted / np.maximum(tokens, 1),
    )
