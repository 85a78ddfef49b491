"""Episode logic shared by the scalar env and the native batched env.

:class:`BatchedEpisodes` runs N episodes side by side on one vectorised simulator: it decodes
actions with the shared codec, plays the round, scores the reward, updates the server-side
history and builds the next observation with the shared builder. The scalar env is this
class with N = 1, so both envs run the very same maths.

Reward (why this one): an episode lasts a fixed amount of *simulated time* ``horizon_s``,
and the reward of a round is the tokens it commits within that time (the round that crosses
the horizon counts pro rata). The undiscounted return is then the goodput over the episode
times the horizon: maximising it maximises long-run goodput (total tokens / total time),
not the mean of per-round ratios, which over-weights short rounds. Optional named
components (time, energy) are combined by weights and reported separately.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

import numpy as np

from multispin_env._jit import kernel
from multispin_env.action_codec import MODES, ActionCodec, DecisionContext, ProtocolLevers
from multispin_env.config import MAX_USERS, ScenarioConfig, check_type
from multispin_env.observation import ObservationSpec, UserHistory, build_observation
from multispin_env.simulator import MultiSpinSimulator
from multispin_env.types import Decision

REWARD_COMPONENTS = ("tokens", "time", "energy")
_SORTED_COMPONENTS = tuple(sorted(REWARD_COMPONENTS))  # energy, time, tokens


@dataclass(frozen=True)
class ServerView:
    """Per-env ``(N, K)`` inputs a controller may use. ``oracle_*`` fields are the hidden
    truth: only oracle baselines read them, never a deployable policy."""

    spectral_eff_est: np.ndarray
    t_draft_s: np.ndarray
    alpha_prior: np.ndarray
    alpha_hat: np.ndarray
    payload_bits: float
    bandwidth_hz: float
    max_draft_length: int
    verification: object
    oracle_alpha: np.ndarray | None  # None where the truth is unknown (live)
    oracle_spectral_eff: np.ndarray | None
    early_stop: bool = False  # the protocol switches (multispin_env.protocols)
    streaming_deadline: bool = False
    pipeline_groups: int = 1


@dataclass(frozen=True)
class EnvOptions:
    """Env-level options (scenario physics live in ScenarioConfig).

    Attributes:
        action_mode: one of multispin_env.action_codec.MODES.
        max_users: user slots K_max in observation and action (>= num_users).
        horizon_s: simulated seconds per episode (truncation).
        reward_weights: weights of the reward components: ``tokens`` (committed tokens per
            user), ``time`` (minus round seconds), ``energy`` (minus device joules).
        observe_true_alpha: give the policy the hidden per-request acceptance rate.
        history_decay: EWMA decay of the acceptance history per round.
        base_policy: a heuristic whose allocation the policy sees every round and, with
            ``action_mode="residual"``, corrects: a paper scheme (``hete``), a tuned one
            (``tuned[hete,prior,cap=6,margin=0.8,mix=0.1]``) or ``tuned:PATH``
            (``multispin tune``'s result). Stored in canonical form, so a policy's contract
            names its base exactly.
    """

    action_mode: str = "full"
    max_users: int | None = None
    horizon_s: float = 30.0
    reward_weights: tuple[tuple[str, float], ...] = (("tokens", 1.0),)
    observe_true_alpha: bool = False
    history_decay: float = 0.8
    base_policy: str | None = None

    @staticmethod
    def build(config: ScenarioConfig, **kwargs) -> EnvOptions:
        """Validated options for ``config``: each value is checked against its field's type
        (a bool is never a number, a string never a bool) and range; errors name the field."""
        unknown = sorted(set(kwargs) - set(EnvOptions.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown env option(s) {unknown}; options are {_OPTION_NAMES}")
        opts = EnvOptions()
        values = {f.name: kwargs.get(f.name, getattr(opts, f.name)) for f in _OPTION_FIELDS}
        values["reward_weights"] = _check_weights(kwargs.get("reward_weights"))
        for f in _OPTION_FIELDS:
            if f.name != "reward_weights":
                values[f.name] = check_type(f.name, values[f.name], f.type)
        if values["action_mode"] not in MODES:
            raise ValueError(
                f"action_mode={values['action_mode']!r}: the action mode must be one of {MODES}"
            )
        max_users = config.num_users if values["max_users"] is None else values["max_users"]
        if not config.num_users <= max_users <= MAX_USERS:
            raise ValueError(
                f"max_users={values['max_users']!r} must be an integer in "
                f"[num_users={config.num_users}, {MAX_USERS}]"
            )
        values["max_users"] = max_users
        horizon = values["horizon_s"]
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon_s={horizon!r} must be a finite number > 0 seconds")
        if not 0.0 < values["history_decay"] < 1.0:
            raise ValueError(f"history_decay={values['history_decay']!r} must be in (0, 1)")
        if values["base_policy"] is not None:
            from multispin_agents.tuned import TunedHeuristic

            try:
                base = TunedHeuristic.parse(values["base_policy"], config.max_draft_length)
            except (ValueError, TypeError) as err:
                raise ValueError(f"base_policy={values['base_policy']!r}: {err}") from None
            values["base_policy"] = base.name
        elif values["action_mode"] == "residual":
            raise ValueError(
                "action_mode='residual' corrects a base heuristic: set base_policy too, e.g. "
                "base_policy='hete' or base_policy='tuned:results/tuned/<env>.json'"
            )
        return EnvOptions(**values)


_OPTION_FIELDS = dataclasses.fields(EnvOptions)
_OPTION_NAMES = [f.name for f in _OPTION_FIELDS]


def _check_weights(weights) -> tuple[tuple[str, float], ...]:
    """reward_weights as sorted (name, weight) pairs; None means tokens only."""
    if weights is None:
        return EnvOptions.reward_weights
    if isinstance(weights, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 for p in weights
    ):  # the stored form, e.g. from options.reward_weights
        weights = dict(weights)
    if not isinstance(weights, dict):
        raise TypeError(
            f"reward_weights={weights!r} must be a mapping like {{'tokens': 1.0, 'time': 0.5}}"
        )
    unknown = sorted(set(weights) - set(REWARD_COMPONENTS), key=str)
    if unknown:
        raise ValueError(
            f"reward_weights has unknown component(s) {unknown}; choose from {REWARD_COMPONENTS}"
        )
    out = []
    for name, value in weights.items():
        value = check_type(f"reward_weights[{name!r}]", value, "float")
        if not math.isfinite(value):
            raise ValueError(f"reward_weights[{name!r}] must be finite, got {value!r}")
        out.append((name, value))
    return tuple(sorted(out))


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """Separate env options from scenario overrides; unknown names are an error."""
    env_keys = set(EnvOptions.__dataclass_fields__)
    scenario_keys = {f.name for f in dataclasses.fields(ScenarioConfig)}
    unknown = sorted(set(kwargs) - env_keys - scenario_keys)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, env_keys | scenario_keys, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown env argument(s) {', '.join(hints)}; env options are {sorted(env_keys)}, "
            f"scenario overrides are {sorted(scenario_keys)}"
        )
    env_kwargs = {k: v for k, v in kwargs.items() if k in env_keys}
    scenario_kwargs = {k: v for k, v in kwargs.items() if k not in env_keys}
    return env_kwargs, scenario_kwargs


class BatchedEpisodes:
    """N synchronous episodes over one vectorised simulator."""

    def __init__(self, config: ScenarioConfig, options: EnvOptions, num_envs: int) -> None:
        self.config, self.options, self.num_envs = config, options, num_envs
        self.sim = MultiSpinSimulator(config, num_envs)
        self.levers = ProtocolLevers.of(config)
        self.codec = ActionCodec(
            options.action_mode, options.max_users, config.max_draft_length, self.levers
        )
        self.spec = ObservationSpec(
            max_users=options.max_users,
            max_draft_length=config.max_draft_length,
            t_ref_s=config.t_draft_mean_s,
            payload_bits=float(config.payload_bits),
            bandwidth_hz=config.bandwidth_hz,
            observe_true_alpha=options.observe_true_alpha,
            observe_base=options.base_policy is not None,
            levers=self.levers,
        )
        self.base = None
        if options.base_policy is not None:
            from multispin_agents.tuned import TunedHeuristic

            self.base = TunedHeuristic.parse(options.base_policy)
        self._base_allocation = None  # the base's decision for the current state, cached
        self.history = UserHistory(num_envs, config.num_users, decay=options.history_decay)
        self.weights = dict(options.reward_weights)
        self.elapsed_s = np.zeros(num_envs)
        self.episode_tokens = np.zeros(num_envs)
        self.episode_rounds = np.zeros(num_envs, dtype=np.int64)
        self.last_lengths = np.zeros((num_envs, config.num_users), dtype=np.int64)
        self.last_bandwidth = np.zeros((num_envs, config.num_users))
        self.last_result = None

    @property
    def weights(self) -> dict[str, float]:
        """Reward component weights (a copy); assign a mapping to change them."""
        return dict(self._weights)

    @weights.setter
    def weights(self, weights: dict[str, float]) -> None:
        self._weights = dict(_check_weights(weights))
        # fixed order (sorted names: energy, time, tokens) so the kernel sums like sorted()
        self._weight_vector = np.array([self._weights.get(c, 0.0) for c in _SORTED_COMPONENTS])
        self._weight_used = np.array([c in self._weights for c in _SORTED_COMPONENTS])

    def base_allocation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The base heuristic's (lengths, bandwidth) for the current state of every env."""
        decision = self.base_decision()
        return None if decision is None else (decision.draft_lengths, decision.bandwidth_hz)

    def base_decision(self) -> Decision | None:
        """The base heuristic's decision (with the protocol's levers) for the current state."""
        if self.base is None:
            return None
        if self._base_allocation is None:
            self._base_allocation = self.base.decide(self.server_view())
        return self._base_allocation

    def reset(self, keys: np.ndarray, env_ids: np.ndarray) -> None:
        self._base_allocation = None
        self.sim.reset(keys, env_ids=env_ids)
        self.history.reset(
            self.sim.task_alpha_mean[env_ids],
            rows=env_ids,
            spectral_eff_est=self.sim.spectral_eff_estimate[env_ids],
        )
        self.elapsed_s[env_ids] = 0.0
        self.episode_tokens[env_ids] = 0.0
        self.episode_rounds[env_ids] = 0
        # fresh arrays, not in-place writes: the last step's info still holds the old ones
        self.last_lengths = self.last_lengths.copy()
        self.last_bandwidth = self.last_bandwidth.copy()
        self.last_lengths[env_ids] = 0
        self.last_bandwidth[env_ids] = 0.0

    def context(self) -> DecisionContext:
        if self.options.action_mode != "residual":
            return DecisionContext(
                self.sim.spectral_eff_estimate,
                self.sim.t_draft_s,
                float(self.config.payload_bits),
                self.config.bandwidth_hz,
            )
        return DecisionContext.of(self.server_view(), self.base_decision(), self.base)

    def observe(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Observations of all envs, or of ``rows`` only (e.g. envs just reset)."""
        sim, hist = self.sim, self.history
        base = self.base_decision()
        pick = (lambda x: x) if rows is None else (lambda x: None if x is None else x[rows])
        protocol = None
        if self.levers.any:
            protocol = {"predrafted": pick(sim.predrafted)}
            if base is not None:
                protocol["base_stop"] = pick(base.stop_threshold)
                protocol["base_group"] = pick(base.group)
                protocol["base_deadline"] = pick(base.deadline_s)
        return build_observation(
            self.spec,
            hist if rows is None else hist.rows(rows),
            pick(sim.spectral_eff_estimate),
            pick(sim.t_draft_s),
            pick(sim.task_alpha_mean),
            pick(self.elapsed_s) / self.options.horizon_s,
            alpha_true=pick(sim.alpha) if self.options.observe_true_alpha else None,
            base_lengths=None if base is None else pick(base.draft_lengths),
            base_bandwidth_hz=None if base is None else pick(base.bandwidth_hz),
            protocol=protocol,
        )

    def server_view(self) -> ServerView:
        """What the edge server knows before deciding (plus the hidden truth, for oracles)."""
        sim = self.sim
        return ServerView(
            spectral_eff_est=sim.spectral_eff_estimate,
            t_draft_s=sim.t_draft_s,
            alpha_prior=sim.task_alpha_mean,
            alpha_hat=self.history.alpha_hat,
            payload_bits=float(self.config.payload_bits),
            bandwidth_hz=self.config.bandwidth_hz,
            max_draft_length=self.config.max_draft_length,
            verification=self.config.verification_model,
            oracle_alpha=sim.alpha,
            oracle_spectral_eff=sim.spectral_eff,
            early_stop=self.config.early_stop,
            streaming_deadline=self.config.streaming_deadline,
            pipeline_groups=self.config.pipeline_groups,
        )

    def step(self, actions, single: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
        """Play one round everywhere. Returns (reward, truncated, per-env round summary).

        ``actions`` is a batch ``(num_envs,) + action shape``; with ``single=True`` (only
        when ``num_envs`` is 1) one env's action, unbatched. Bad actions raise with the
        expected shape or range in those terms.
        """
        checked = self.codec.check(actions, None if single else self.num_envs, single=single)
        if not self.levers.any:
            lengths, bandwidth = self.codec.decode_checked(checked, self.context())
            return self.step_allocation(lengths, bandwidth, validate=False)
        decision = self.codec.decode_decision(checked, self.context())
        return self.step_decision(decision, validate=False)

    def step_decision(self, decision: Decision, validate: bool = True):
        """Play one round with a :class:`Decision` (allocation plus protocol levers)."""
        return self.step_allocation(
            decision.draft_lengths, decision.bandwidth_hz, validate, **decision.levers()
        )

    def step_allocation(self, lengths, bandwidth, validate: bool = True, **levers):
        """Play one round with an allocation given directly (baselines, live replays);
        ``levers``: the extended protocol's ``stop_threshold``/``deadline_s``/``group``."""
        r_decided = self.sim.spectral_eff_estimate  # replaced by the next round's in step()
        if levers:
            levers = {key: value for key, value in levers.items() if value is not None}
        res = self.sim.step(lengths, bandwidth, validate=validate, **levers)
        self._base_allocation = None  # a new state: the base decides afresh
        horizon = self.options.horizon_s
        n = self.num_envs
        inside, energy, reward, goodput, episode_goodput = (np.empty(n) for _ in range(5))
        components = np.empty((3, n))  # rows in _SORTED_COMPONENTS order
        tokens = np.empty(n, dtype=np.int64)
        truncated = np.empty(n, dtype=bool)
        _score_round_kernel(
            res.committed,
            res.energy_j,
            res.round_time_s,
            float(horizon),
            float(self.config.num_users),
            self._weight_vector,
            self._weight_used,
            self.elapsed_s,
            self.episode_tokens,
            self.episode_rounds,
            inside,
            tokens,
            energy,
            components,
            reward,
            truncated,
            goodput,
            episode_goodput,
        )
        self.history.update(
            res.verified_tokens,  # the server sees only what reached it
            res.accepted,
            bandwidth / self.config.bandwidth_hz,
            res.round_time_s,
            new_request=res.request_done,
            alpha_prior=self.sim.task_alpha_mean,
            spectral_eff_est=r_decided,
        )
        self.last_lengths, self.last_bandwidth, self.last_result = lengths, bandwidth, res
        summary = {
            "reward_components": dict(zip(_SORTED_COMPONENTS, components, strict=True)),
            "inside_horizon": inside,
            "tokens": tokens,
            "round_time_s": res.round_time_s,
            "goodput_tokens_per_s": goodput,
            "episode_goodput_tokens_per_s": episode_goodput,
            "t_draft_s": res.t_draft_s,
            "t_upload_s": res.t_upload_s,
            "t_verify_s": res.t_verify_s,
            "straggler": res.straggler,
            "draft_lengths": lengths,
            "bandwidth_hz": bandwidth,
            "committed": res.committed,
            "energy_j": energy,
        }
        summary["wasted"] = res.wasted_tokens
        if self.levers.any:
            summary["verified"] = res.verified_tokens
            summary["predrafted"] = self.sim.predrafted.copy()
            for key, value in levers.items():
                summary[key] = value
        return reward, truncated, summary


@kernel
def _score_round_kernel(
    committed,
    energy_j,
    round_time_s,
    horizon_s,
    num_users,
    weights,
    weight_used,
    elapsed_s,
    episode_tokens,
    episode_rounds,
    inside,
    tokens,
    energy,
    components,
    reward,
    truncated,
    goodput,
    episode_goodput,
):
    """Reward components, reward and episode clocks of one round (see module docstring).

    ``components`` rows are energy, time, tokens; the reward adds the weighted components
    in that order. ``elapsed_s``, ``episode_tokens`` and ``episode_rounds`` advance in place.
    """
    for n in range(committed.shape[0]):
        # share of the round inside the horizon (elapsed < horizon before every step)
        share = min((horizon_s - elapsed_s[n]) / round_time_s[n], 1.0)
        total, joules = 0, 0.0
        for k in range(committed.shape[1]):
            total += committed[n, k]
            joules += energy_j[n, k]
        components[0, n] = -share * joules
        components[1, n] = -share * round_time_s[n]
        components[2, n] = share * total / num_users
        r = 0.0
        for c in range(3):
            if weight_used[c]:
                r += weights[c] * components[c, n]
        reward[n] = r
        inside[n], tokens[n], energy[n] = share, total, joules
        elapsed_s[n] += round_time_s[n]
        episode_tokens[n] += share * total
        episode_rounds[n] += 1
        truncated[n] = elapsed_s[n] >= horizon_s
        goodput[n] = total / round_time_s[n]
        episode_goodput[n] = episode_tokens[n] / min(elapsed_s[n], horizon_s)
