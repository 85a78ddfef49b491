"""Native batched environments: one kernel pass over N envs per step, no per-env Python loop.

- :class:`MultiSpinVectorEnv` is a ``gymnasium.vector.VectorEnv`` (the registered
  ``vector_entry_point``) with same-step autoreset: a finished env is reset inside the
  ``step`` that ended it; the returned observation is the new episode's first one, and the
  last observation/info are in ``info["final_obs"]`` / ``info["final_info"]`` (masked by
  ``info["_final_obs"]``), as Gymnasium's ``AutoresetMode.SAME_STEP`` specifies.
  Gymnasium's own ``sync``/``async`` vectorisation defaults to ``NEXT_STEP`` instead; see
  the class docstring for how to match them.
- :func:`make_sb3_vec_env` adapts it to stable-baselines3's ``VecEnv`` API
  (``terminal_observation`` in the finished env's info dict).

Seeding matches the scalar env: env i seeded with ``seed + i`` draws the same keys, so
its trajectory equals ``MultiSpinEnv`` reset with ``seed + i`` under the same actions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from multispin_env import rng as crng
from multispin_env.env import MultiSpinEnv, build_episodes
from multispin_env.episodes import BatchedEpisodes


class MultiSpinVectorEnv(VectorEnv):
    """N independent Multi-SPIN envs stepped together by the same kernels as the scalar env.

    Same arguments as :class:`~multispin_env.env.MultiSpinEnv`, plus ``num_envs``.
    Info values are arrays over envs (per-user ones ``(N, K)``). ``step`` takes actions of
    shape ``(num_envs,) + single_action_space.shape``.

    Autoreset: this env uses ``AutoresetMode.SAME_STEP`` (the step that ends an episode
    returns the next episode's first observation; the last one is in
    ``info["final_obs"]``). It is what ``gym.make_vec(id, num_envs)`` gives for the
    multispin ids (``vectorization_mode="vector_entry_point"``, the default) and what
    :func:`make_sb3_vec_env` wraps. ``gym.make_vec(..., vectorization_mode="sync")`` or
    ``"async"`` instead wraps the scalar env in Gymnasium's ``SyncVectorEnv`` /
    ``AsyncVectorEnv``, whose default is ``NEXT_STEP``: the step that ends an episode
    returns its last observation, and the *next* step ignores its action and returns the
    reset observation, so trajectories shift by one step per episode. Pass
    ``vector_kwargs={"autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP}`` to
    make them equal to this env's, bit for bit (``tests/test_hardening_env.py``).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 8, scenario="paper-llama2", **kwargs: Any) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} must be an integer >= 1")
        self._episodes, self.single_observation_space = build_episodes(scenario, kwargs, num_envs)
        self.config, self.options = self._episodes.config, self._episodes.options
        self.num_envs = num_envs
        self.single_action_space = self._episodes.codec.space
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.feature_names = self._episodes.spec.feature_names
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._all = np.arange(num_envs)
        self._needs_reset = True

    @property
    def episodes(self) -> BatchedEpisodes:
        return self._episodes

    def set_reward_weights(self, weights: dict[str, float]) -> None:
        """Change reward component weights mid-training (e.g. an adaptive time price)."""
        self._episodes.weights = weights  # validated: names, numbers, finite

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
        for i, s in enumerate(seeds):
            if s is not None:
                self._rngs[i] = seeding.np_random(s)[0]
        keys = crng.keys_from(self._rngs)
        self._episodes.reset(keys, self._all)
        self._needs_reset = False
        return self._episodes.observe(), {}

    def step(self, actions):
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        rewards, truncated, summary = self._episodes.step(actions)
        obs = self._episodes.observe()
        terminated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {k: v for k, v in summary.items()}
        if truncated.any():
            done = np.flatnonzero(truncated)
            infos["final_obs"] = np.where(truncated[:, None], obs, 0.0)
            infos["_final_obs"] = truncated.copy()
            infos["final_info"] = {
                "episode_goodput_tokens_per_s": summary["episode_goodput_tokens_per_s"].copy(),
                "_episode_goodput_tokens_per_s": truncated.copy(),
            }
            keys = crng.keys_from(self._rngs[i] for i in done)
            self._episodes.reset(keys, done)
            obs[done] = self._episodes.observe(done)
        return obs, rewards, terminated, truncated, infos


def make_vector_env(num_envs: int = 8, **kwargs) -> MultiSpinVectorEnv:
    """Registered ``vector_entry_point``."""
    return MultiSpinVectorEnv(num_envs=num_envs, **kwargs)


def make_sb3_vec_env(
    env_id_or_scenario: str = "paper-llama2", num_envs: int = 8, seed: int | None = None, **kwargs
):
    """An SB3 ``VecEnv`` running ``num_envs`` envs natively batched.

    ``env_id_or_scenario`` is a registered id (``multispin/PaperLlama2-v0``) or a preset
    name; kwargs as for the env.
    """
    from stable_baselines3.common.vec_env.base_vec_env import VecEnv

    from multispin_env.registration import resolve_env_id

    scenario, base_kwargs = resolve_env_id(env_id_or_scenario)
    base_kwargs.update(kwargs)

    class _Adapter(VecEnv):
        def __init__(self) -> None:
            self.venv = MultiSpinVectorEnv(num_envs=num_envs, scenario=scenario, **base_kwargs)
            super().__init__(
                num_envs, self.venv.single_observation_space, self.venv.single_action_space
            )
            self._seed = seed
            self._actions = None
            self.render_mode = None

        def reset(self):
            obs, _ = self.venv.reset(seed=self._seed)
            self._seed = None  # later resets continue each env's own stream
            self.reset_infos = [{} for _ in range(self.num_envs)]
            return obs

        def step_async(self, actions):
            self._actions = actions

        def step_wait(self):
            obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
            dones = terminated | truncated
            share = info["bandwidth_hz"] / self.venv.config.bandwidth_hz
            infos = [
                {
                    "goodput_tokens_per_s": float(info["goodput_tokens_per_s"][i]),
                    "episode_goodput_tokens_per_s": float(info["episode_goodput_tokens_per_s"][i]),
                    "tokens": float(info["tokens"][i]),
                    "round_time_s": float(info["round_time_s"][i]),
                    "draft_lengths": info["draft_lengths"][i],
                    "bandwidth_share": share[i],
                    "TimeLimit.truncated": bool(truncated[i] and not terminated[i]),
                }
                for i in range(self.num_envs)
            ]
            for i in np.flatnonzero(dones):
                infos[i]["terminal_observation"] = info["final_obs"][i]
            return obs, rewards.astype(np.float32), dones, infos

        def seed(self, seed=None):
            self._seed = seed
            return [None if seed is None else seed + i for i in range(self.num_envs)]

        def close(self):
            pass

        def get_attr(self, attr_name, indices=None):
            return [getattr(self.venv, attr_name) for _ in self._indices(indices)]

        def set_attr(self, attr_name, value, indices=None):
            setattr(self.venv, attr_name, value)

        def env_method(self, method_name, *args, indices=None, **kw):
            return [getattr(self.venv, method_name)(*args, **kw) for _ in self._indices(indices)]

        def env_is_wrapped(self, wrapper_class, indices=None):
            return [False for _ in self._indices(indices)]

        def _indices(self, indices):
            if indices is None:
                return range(self.num_envs)
            return [indices] if isinstance(indices, int) else indices

        def get_images(self):
            return [None] * self.num_envs

    return _Adapter()


__all__ = ["MultiSpinEnv", "MultiSpinVectorEnv", "make_sb3_vec_env", "make_vector_env"]
