"""Live schedulers: decide (L_k, B_k) every round from what the server has observed.

Schedulers receive the same :class:`~multispin_env.episodes.ServerView` the simulator gives
controllers (channel estimates, drafting speeds, task-prior and history-estimated acceptance),
built from the server's own :class:`~multispin_env.observation.UserHistory`, so a policy is
deployed unchanged. The paper's heuristics run with acceptance estimated online
(``alpha_source="history"``); the verification latency they assume is fitted online from
the measured batches (:class:`OnlineVerificationModel`).
"""

from __future__ import annotations

import numpy as np

from multispin_agents.policies import SolverPolicy

SCHEDULERS = ("fixed", "uni_bw", "homo", "hete")


class OnlineVerificationModel:
    """T^ver(K, L) = a + b * K * (L + 1), fitted by least squares on measured batches.

    Starts from a prior (the CPU measurement in docs/live-notes.md: 7.8 ms + 0.144 ms per
    padded token) and refits after every round.
    """

    def __init__(
        self, t_fix_s: float = 7.8e-3, t_token_s: float = 1.44e-4, prior_weight: float = 3.0
    ) -> None:
        self.t_fix_s, self.t_token_s = t_fix_s, t_token_s
        self._x: list[float] = []
        self._y: list[float] = []
        self._prior = (t_fix_s, t_token_s, prior_weight)

    def observe(self, num_users: int, max_draft_length: int, seconds: float) -> None:
        self._x.append(num_users * (max_draft_length + 1))
        self._y.append(seconds)
        a0, b0, w = self._prior
        x = np.array(self._x[-200:])
        y = np.array(self._y[-200:])
        # ridge towards the prior: pseudo-observations at two batch sizes
        xs = np.r_[x, 8.0, 64.0]
        ys = np.r_[y, a0 + b0 * 8.0, a0 + b0 * 64.0]
        weights = np.r_[np.ones(len(x)), w, w]
        design = np.stack([np.ones_like(xs), xs], axis=1) * np.sqrt(weights)[:, None]
        coef, *_ = np.linalg.lstsq(design, ys * np.sqrt(weights), rcond=None)
        self.t_fix_s, self.t_token_s = float(max(coef[0], 0.0)), float(max(coef[1], 0.0))

    def latency_for_batch_s(self, num_users: int, max_draft_length: int) -> float:
        return self.t_fix_s + self.t_token_s * num_users * (max_draft_length + 1)


class BundleScheduler:
    """An exported policy as a live scheduler: it reads the env's observation vector (built
    by the server with the env's builder) and its action is decoded by the env's codec,
    extended-protocol levers included (the server must play the protocol it was trained
    for: :attr:`levers`)."""

    uses_observation = True

    def __init__(self, folder: str) -> None:
        from multispin_agents.bundle import PolicyBundle
        from multispin_env.action_codec import ActionCodec, ProtocolLevers

        self.bundle = PolicyBundle(folder)
        levers = self.bundle.meta.get("protocol_levers") or {}
        self.levers = ProtocolLevers(**levers) if levers else ProtocolLevers()
        self.codec = ActionCodec(
            self.bundle.action_mode,
            self.bundle.max_users,
            self.bundle.max_draft_length,
            self.levers,
        )
        self.name = f"bundle:{folder}"
        self._checked = False
        # a policy trained on residual actions (or observing a base) names its base heuristic
        base = self.bundle.meta.get("env_kwargs", {}).get("base_policy")
        self.base = None
        if base is not None:
            from multispin_agents.tuned import TunedHeuristic

            self.base = TunedHeuristic.parse(base)

    def check_protocol(self, early_stop: bool, streaming_deadline: bool, groups: int) -> None:
        """Refuse a server protocol other than the one the policy was trained for."""
        played = (bool(early_stop), bool(streaming_deadline), int(groups))
        trained = (self.levers.stop, self.levers.deadline, self.levers.groups)
        if played != trained:
            raise ValueError(
                f"bundle {self.name[7:]} was trained on {self.bundle.meta['env_id']} "
                f"(early stop {trained[0]}, deadline {trained[1]}, groups {trained[2]}); the "
                f"server plays early stop {played[0]}, deadline {played[1]}, groups "
                f"{played[2]}: pass the policy's --protocol"
            )

    def base_decision(self, view):
        """The base heuristic's decision on the server's view (None without a base)."""
        return None if self.base is None else self.base.decide(view)

    def decide(self, view, obs: np.ndarray, feature_names=None, base=None):
        """The decision (a :class:`~multispin_env.types.Decision`) for the observation."""
        from multispin_env.action_codec import DecisionContext

        if feature_names is not None and not self._checked:
            # the server's observation layout must be the one the policy was trained on
            self.bundle.check_features(feature_names)
            self._checked = True
        action = self.bundle.act(obs)
        if self.base is not None and base is None:
            base = self.base_decision(view)
        ctx = DecisionContext.of(view, base, self.base)
        return self.codec.decode_decision(self.codec.check(action), ctx)


def make_scheduler(name: str):
    """A scheduler by name: a paper heuristic (acceptance estimated from the round history)
    or ``bundle:FOLDER`` for an exported policy."""
    if name.startswith("bundle:"):
        return BundleScheduler(name[len("bundle:") :])
    if name.startswith(("tuned[", "tuned:")):  # a tuned heuristic (multispin tune)
        from multispin_agents.tuned import TunedHeuristic

        return TunedHeuristic.parse(name)
    if name not in SCHEDULERS:
        raise ValueError(
            f"scheduler {name!r}; choose one of {SCHEDULERS}, tuned[...], tuned:PATH or "
            "bundle:FOLDER"
        )
    return SolverPolicy(name, alpha_source="history" if name != "fixed" else "prior")
