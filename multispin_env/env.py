"""Gymnasium environment over the Multi-SPIN system model."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from multispin_env import rng as crng
from multispin_env.config import ScenarioConfig, load_preset
from multispin_env.episodes import BatchedEpisodes, EnvOptions, split_kwargs


def resolve_scenario(scenario: str | ScenarioConfig, overrides: dict) -> ScenarioConfig:
    if isinstance(scenario, ScenarioConfig):
        return scenario.with_overrides(**overrides) if overrides else scenario
    if isinstance(scenario, str):
        return load_preset(scenario, **overrides)
    raise TypeError("scenario must be a preset name or a ScenarioConfig")


def build_episodes(scenario, kwargs: dict, num_envs: int) -> tuple[BatchedEpisodes, spaces.Box]:
    """The shared construction of the scalar and batched envs: validated scenario and
    options, the episode runner, and the single-env observation space."""
    kwargs = dict(kwargs)
    if kwargs.pop("max_episode_steps", None) is not None:
        raise ValueError(
            "max_episode_steps is not supported here: episodes end after horizon_s simulated "
            "seconds (so every episode weighs the same time); set horizon_s instead"
        )
    env_kwargs, scenario_kwargs = split_kwargs(kwargs)
    config = resolve_scenario(scenario, scenario_kwargs)
    episodes = BatchedEpisodes(config, EnvOptions.build(config, **env_kwargs), num_envs)
    low, high = episodes.spec.bounds()
    return episodes, spaces.Box(low, high, dtype=np.float32)


class MultiSpinEnv(gym.Env[np.ndarray, np.ndarray]):
    """Every round, choose each user's draft length and uplink bandwidth share.

    ## Description
    K devices draft tokens with a small LM and upload them (with truncated PMFs) over FDMA
    to an edge server that verifies all drafts in one batch (paper: Multi-SPIN, arXiv
    2606.04581). A step is one synchronous round: the agent allocates (L_k, B_k), devices
    draft and upload, the server waits for the straggler, verifies, and each user keeps
    its accepted prefix plus one corrected/bonus token.

    ## Action space
    Set by ``action_mode`` (see ``multispin_env.action_codec``); every mode is feasible by
    construction (L_k in [1, L_max], bandwidth summing to B):

    - ``full``: ``Box(-1, 1, (2 K_max,))``; first half = per-user length bins, second half =
      bandwidth logits, share = softmax(1.5 logit) over active users.
    - ``lengths`` / ``lengths_discrete``: per-user lengths as ``Box(-1, 1, (K_max,))`` or
      ``MultiDiscrete([L_max] * K_max)``; bandwidth by the paper's Lemma 3.
    - ``homogeneous`` / ``homogeneous_discrete``: one common length as ``Box(-1, 1, (1,))``
      or ``Discrete(L_max)``; bandwidth by Lemma 1.

    Box entries outside [-1, 1] are clipped; float16 and integer arrays are accepted (cast).
    Discrete actions must be integers (integral floats are accepted) in range. A wrong
    shape, NaN/inf, a non-integer or out-of-range discrete value raises ``ValueError``
    naming the expected shape or range.

    ## Observation space
    ``Box(0, high, (K_max * F + 3,), float32)`` with F = 11 per-user features (12 with
    ``observe_true_alpha``): active flag, channel estimate and its running average, drafting
    speed, equal-share
    upload time, task-prior acceptance, acceptance estimated from history, EWMA of
    accepted/drafted, last drafted, last accepted, last bandwidth share; plus 3 globals
    (active fraction, last round time, elapsed fraction of the horizon). Names and order:
    ``env.unwrapped.feature_names``; built by ``multispin_env.observation``. The true
    acceptance rate is hidden unless ``observe_true_alpha=True``.

    ## Rewards
    Committed tokens of the round per user, counted only inside the episode's simulated
    time horizon (the crossing round pro rata). The undiscounted return is episode goodput
    x horizon / K, so maximising it maximises long-run goodput (total tokens / total time).
    Optional components ``time`` and ``energy`` enter through ``reward_weights``; every
    component is reported in ``info["reward_components"]``.

    ## Starting state
    ``reset`` draws a new realization: device speeds, mean channel gains, each user's task
    (acceptance), and the first fading draw, all from the seed.
    ``render()`` before the first ``step`` of an episode shows no round.

    ## Episode end
    ``truncated`` once ``horizon_s`` simulated seconds have elapsed. ``terminated`` is
    always False: a serving system has no terminal state.

    ## Info
    ``goodput_tokens_per_s`` (this round), ``episode_goodput_tokens_per_s``, ``tokens``,
    ``round_time_s``, per-user ``t_draft_s``/``t_upload_s``, ``t_verify_s``, ``straggler``,
    ``draft_lengths``, ``bandwidth_hz``, ``committed``, ``energy_j``, ``reward_components``,
    ``inside_horizon`` (share of the round inside the episode's time horizon).

    ## Arguments
    ``scenario`` (preset name or ScenarioConfig), ``action_mode``, ``max_users``,
    ``horizon_s``, ``reward_weights`` (mapping), ``observe_true_alpha``,
    ``history_decay``, ``render_mode`` ("ansi" or "rgb_array"), and any ScenarioConfig
    field as an override (``num_users=10``, ``bandwidth_hz=5e6``); unknown names raise.
    Every value is checked against its field's type (numpy scalars are accepted; a bool is
    not a number, a string not a bool) and range (finite numbers only).

    ## Extended protocols
    Scenarios with ``early_stop``, ``streaming_deadline`` or ``pipeline_groups >= 2``
    (ids ``...EarlyStop-v0``, ``...Deadline-v0``, ``...Pipeline-v0``; timing in
    ``multispin_env.protocols``): a step is one round (one pipeline cycle with groups). Box
    actions append the levers: per-user stop thresholds, per-user groups, then one
    deadline (discrete modes refuse them). The observation adds ``predrafted`` per user with
    groups, and, with a base heuristic, its ``base_stop``/``base_group`` per user and a global
    ``base_deadline``; under a deadline ``last_drafted`` is the verified prefix. Info adds
    ``verified``, ``wasted`` (drafted, not committed), ``predrafted`` and the decision's
    ``stop_threshold``/``deadline_s``/``group``.

    ## Version history
    - v0: initial release; the extended protocols' ids added as their own v0 ids.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 2}

    def __init__(
        self,
        scenario: str | ScenarioConfig = "paper-llama2",
        render_mode: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._episodes, self.observation_space = build_episodes(scenario, kwargs, num_envs=1)
        self.config, self.options = self._episodes.config, self._episodes.options
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r}; choose one of {self.metadata['render_modes']}"
            )
        self.render_mode = render_mode
        self.action_space = self._episodes.codec.space
        self.feature_names = self._episodes.spec.feature_names
        self._ids = np.zeros(1, dtype=np.int64)
        self._needs_reset = True

    @property
    def codec(self):
        return self._episodes.codec

    @property
    def simulator(self):
        return self._episodes.sim

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._episodes.reset(crng.new_keys(self.np_random, 1), self._ids)
        self._needs_reset = False
        obs = self._episodes.observe()[0]
        return obs, {"scenario": self.config.name}

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (and after an episode ends)")
        reward, truncated, summary = self._episodes.step(action, single=True)
        obs = self._episodes.observe()[0]
        # every summary array is fresh per step (reset replaces, never overwrites, the
        # state they came from), so views are safe to hand out
        info = {k: v[0] for k, v in summary.items() if k != "reward_components"}
        info["reward_components"] = {
            c: float(x[0]) for c, x in summary["reward_components"].items()
        }
        done = bool(truncated[0])
        self._needs_reset = done
        return obs, float(reward[0]), False, done, info

    def render(self):
        if self.render_mode is None:
            return None
        from multispin_env import render

        if self.render_mode == "ansi":
            return render.ansi_table(self._episodes, 0)
        return render.rgb_array(self._episodes, 0)
