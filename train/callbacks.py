"""TensorBoard logging of what matters here: goodput, and what the policy allocates.

Keys are namespaced as in CleanRL: ``goodput/`` (episode goodput and its share of the paper
controller's), ``policy/`` (mean draft length and bandwidth share per user slot), and SB3's
own ``rollout/``, ``train/``, ``eval/``.
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback


class GoodputCallback(BaseCallback):
    """Aggregates per-step infos of the multispin SB3 VecEnv and logs them per rollout.

    Args:
        reference_goodput: goodput (tokens/s) of the paper's controller on the same
            scenario, used for ``goodput/share_of_reference``; None to skip.
        log_users: number of user slots whose draft length / share are logged.
    """

    def __init__(self, reference_goodput: float | None = None, log_users: int = 4) -> None:
        super().__init__()
        self.reference_goodput = reference_goodput
        self.log_users = log_users
        self._episodes: list[float] = []
        self._lengths: list[np.ndarray] = []
        self._shares: list[np.ndarray] = []
        self._round_goodput: list[float] = []

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            self._round_goodput.append(info["goodput_tokens_per_s"])
            self._lengths.append(info["draft_lengths"])
            self._shares.append(info["bandwidth_share"])
            if "terminal_observation" in info:
                self._episodes.append(info["episode_goodput_tokens_per_s"])
        return True

    def _on_rollout_end(self) -> None:
        if self._round_goodput:
            self.logger.record("goodput/round_tokens_per_s", float(np.mean(self._round_goodput)))
        if self._episodes:
            mean = float(np.mean(self._episodes))
            self.logger.record("goodput/episode_tokens_per_s", mean)
            if self.reference_goodput:
                self.logger.record("goodput/share_of_reference", mean / self.reference_goodput)
        if self._lengths:
            lengths = np.asarray(self._lengths, dtype=np.float64)
            shares = np.asarray(self._shares)
            self.logger.record("policy/draft_length_mean", float(lengths.mean()))
            self.logger.record("policy/draft_length_spread", float(lengths.std(axis=1).mean()))
            for k in range(min(self.log_users, lengths.shape[1])):
                self.logger.record(f"policy/draft_length_user{k}", float(lengths[:, k].mean()))
                self.logger.record(f"policy/bandwidth_share_user{k}", float(shares[:, k].mean()))
        self._episodes.clear()
        self._lengths.clear()
        self._shares.clear()
        self._round_goodput.clear()


class EvalProgressLogger(BaseCallback):
    """Run after each EvalCallback evaluation: append (env steps, wall seconds, goodput) to a
    CSV, so the time to reach a goodput level can be read off afterwards.

    Args:
        path: CSV file to write.
        tokens_scale: eval return -> goodput factor (K / horizon_s for the tokens reward).
    """

    def __init__(self, path, tokens_scale: float) -> None:
        super().__init__()
        self.path, self.tokens_scale = path, tokens_scale
        self._start = None

    def _on_training_start(self) -> None:
        import time

        self._start = time.perf_counter()
        with open(self.path, "w") as f:
            f.write("timesteps,wall_s,eval_goodput_tokens_per_s\n")

    def _on_step(self) -> bool:
        import time

        if self._start is None:  # called from EvalCallback before training start hooks ran
            self._on_training_start()
        goodput = self.parent.last_mean_reward * self.tokens_scale
        with open(self.path, "a") as f:
            f.write(f"{self.num_timesteps},{time.perf_counter() - self._start:.1f},{goodput:.3f}\n")
        return True


RUN_META_ATTR = "multispin_run"
"""Model attribute holding what a checkpoint needs to resume: env id, env kwargs, algo and the
current rate price. SB3 saves every plain model attribute into the .zip's ``data``."""


class RatePriceCallback(BaseCallback):
    """Average-reward training for a semi-Markov problem: reward = tokens - rho * time.

    A round's value is the tokens it commits minus the time it takes, priced at rho tokens/s.
    When rho equals the best achievable goodput, maximising this per round is exactly
    goodput-optimal (Dinkelbach's method for ratio objectives), and the signal is immediate,
    so a short discount suffices. rho starts at ``initial_rate`` (the paper controller's
    goodput, or the checkpoint's rho on resume) and follows the long-run goodput the policy
    achieves (total tokens / total time of each rollout), smoothed by ``smoothing``.

    For on-policy algorithms only (PPO, A2C): each rollout is priced at one rho and used
    once. An off-policy replay buffer would mix rewards priced at different rho values
    (SAC/TD3 end a "rollout" every ``train_freq`` steps), so ``multispin train`` refuses that
    combination. The current rho is kept in the model's ``multispin_run`` attribute, so
    every checkpoint carries it.

    With ``track=False`` rho stays at ``initial_rate``: one Dinkelbach step from a known
    policy's goodput (any policy that scores above zero on tokens - rho * time beats it). That
    is what residual training over a base heuristic uses: tracking the noisy goodput of the
    exploring policy pushed rho around and the deterministic policy with it.
    """

    def __init__(
        self, initial_rate: float, num_users: int, smoothing: float = 0.2, track: bool = True
    ) -> None:
        super().__init__()
        if not (np.isfinite(initial_rate) and initial_rate > 0):
            raise ValueError(f"initial_rate={initial_rate!r} must be a finite number > 0")
        self.rate, self.num_users, self.smoothing = float(initial_rate), num_users, smoothing
        self.track = track
        self._tokens = 0.0
        self._time = 0.0

    def _init_callback(self) -> None:
        from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

        if isinstance(self.model, OffPolicyAlgorithm):
            raise ValueError(
                f"RatePriceCallback with {type(self.model).__name__}: the replay buffer would "
                "mix rewards priced at different rho; use the horizon reward "
                "(--horizon-reward) with off-policy algorithms"
            )

    def _apply(self) -> None:
        weights = {"tokens": 1.0, "time": self.rate / self.num_users}
        self.training_env.env_method("set_reward_weights", weights, indices=0)
        meta = getattr(self.model, RUN_META_ATTR, None)
        if isinstance(meta, dict):
            meta["rate_price_tokens_per_s"] = self.rate

    def _on_training_start(self) -> None:
        self._apply()

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            self._tokens += info["tokens"]
            self._time += info["round_time_s"]
        return True

    def _on_rollout_end(self) -> None:
        if self._time > 0 and self.track:
            measured = self._tokens / self._time
            self.rate = (1 - self.smoothing) * self.rate + self.smoothing * measured
            self.logger.record("goodput/rate_price_tokens_per_s", self.rate)
            self._apply()
        self._tokens = self._time = 0.0


def eval_from_start_callback_class():
    """EvalCallback that evaluates every policy on the *same* episodes, including the policy
    before any training step.

    SB3's EvalCallback continues the eval env's random stream, so each evaluation sees new
    episodes; in a scenario whose episodes differ a lot (hidden acceptance, churn, fading) the
    best score then mostly picks the luckiest draw. Here the eval env is re-seeded with
    ``eval_seed`` before each evaluation (common random numbers), and model selection
    (``best_model.zip``) includes the initial policy: with ``residual`` actions and a
    zero-initialised actor that is the base heuristic itself, so the selected policy is never
    worse than the heuristic it started from on the evaluation episodes.
    """
    from stable_baselines3.common.callbacks import EvalCallback

    class EvalFromStartCallback(EvalCallback):
        def __init__(self, *args, eval_seed: int | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.eval_seed = eval_seed

        def _on_step(self) -> bool:
            if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
                if self.eval_seed is not None:
                    self.eval_env.seed(self.eval_seed)  # the same episodes every time
            return super()._on_step()

        def _on_training_start(self) -> None:
            super()._on_training_start()
            if self.eval_freq > 0 and self.num_timesteps == 0:
                self._on_step()  # n_calls is 0, so this evaluates now

    return EvalFromStartCallback
