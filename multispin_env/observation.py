"""Observation features a real edge server has, built the same way in simulation and live.

The env and the live scheduler both keep a :class:`UserHistory` (what the server has seen
of each user) and call :func:`build_observation`; nothing here reads the simulator's hidden
state, so a policy trained in simulation sees the same features when deployed.

Layout (float32, all finite, ``K_max`` user slots; empty slots are all zeros):

per user slot k (``USER_FEATURES``, in this order)
    active            1 if a user occupies the slot
    spectral_eff      server's channel estimate r^_k / 10 bit/s/Hz, clipped to [0, 4]
    spectral_eff_avg  EWMA of past estimates (the user's typical channel) / 10, in [0, 4]:
                      next to the current estimate it tells a deep fade, where a noisy
                      estimate is least reliable, from a weak user
    t_draft           drafting latency per token T^S_k / t_ref_s, clipped to [0, 4]
    upload_equal      per-token upload time at an equal bandwidth share / t_ref_s, in [0, 10]
    alpha_prior       offline acceptance estimate of the user's task category
    alpha_hat         acceptance estimate from history: EWMA successes / EWMA trials
    accept_frac       EWMA of accepted / drafted
    last_drafted      last round's draft length / L_max
    last_accepted     last round's accepted tokens / L_max
    prev_share        last round's bandwidth share x K (1 = equal share), clipped to [0, 10]
    [alpha_true]      only with ``observe_true_alpha``: the hidden true acceptance rate
    [base_length]     only with a base heuristic (``residual`` actions): its draft length
                      for this round / L_max
    [base_share]      ... and its bandwidth share x K, clipped to [0, 10]
    [base_stop]       early stop with a base: the base's confidence threshold
    [predrafted]      pipelined groups: tokens the device has drafted ahead / L_max
    [base_group]      pipelined groups with a base: the base's group / (G - 1)
global (``GLOBAL_FEATURES``)
    active_frac       active users / K_max
    last_round_time   last round time / (L_max t_ref_s), clipped to [0, 10]
    horizon_frac      elapsed / episode horizon, capped at 1
    [base_deadline]   deadline verification with a base: its deadline / (L_max t_ref_s),
                      clipped to [0, 10]

Under the extended protocols the history records what reached the server: under deadline
verification ``last_drafted`` is the verified prefix, under early stop the drafted length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multispin_env._jit import as_array, kernel

USER_FEATURES = (
    "active",
    "spectral_eff",
    "spectral_eff_avg",
    "t_draft",
    "upload_equal",
    "alpha_prior",
    "alpha_hat",
    "accept_frac",
    "last_drafted",
    "last_accepted",
    "prev_share",
)
GLOBAL_FEATURES = ("active_frac", "last_round_time", "horizon_frac")
BASE_FEATURES = ("base_length", "base_share")
_UPPER = {
    "spectral_eff": 4.0,
    "spectral_eff_avg": 4.0,
    "t_draft": 4.0,
    "upload_equal": 10.0,
    "prev_share": 10.0,
    "base_share": 10.0,
}
_R_REF = 10.0  # bit/s/Hz
# placeholders for kernel inputs a flag says are not read (same dtype and rank, no copies)
_UNUSED = np.zeros((1, 1))
_UNUSED_BOOL = np.zeros((1, 1), dtype=bool)


@dataclass(frozen=True)
class ObservationSpec:
    """Shape and normalisation of the observation (part of a policy's contract).

    Attributes:
        max_users: number of user slots K_max.
        max_draft_length: L_max used to normalise lengths.
        t_ref_s: reference time scale (the scenario's mean drafting latency).
        payload_bits: Q_tok, bits per drafted token.
        bandwidth_hz: total uplink bandwidth B.
        observe_true_alpha: append the hidden true acceptance rate per user.
        observe_base: append a base heuristic's allocation for this round per user.
    """

    max_users: int
    max_draft_length: int
    t_ref_s: float
    payload_bits: float
    bandwidth_hz: float
    observe_true_alpha: bool = False
    observe_base: bool = False
    levers: object = None  # action_codec.ProtocolLevers of an extended protocol

    @property
    def protocol_user_features(self) -> tuple[str, ...]:
        lev = self.levers
        if lev is None:
            return ()
        out = ("base_stop",) if lev.stop and self.observe_base else ()
        if lev.groups > 1:
            out += ("predrafted",) + (("base_group",) if self.observe_base else ())
        return out

    @property
    def global_features(self) -> tuple[str, ...]:
        lev = self.levers
        extra = ("base_deadline",) if lev is not None and lev.deadline and self.observe_base else ()
        return GLOBAL_FEATURES + extra

    @property
    def user_features(self) -> tuple[str, ...]:
        return (
            USER_FEATURES
            + (("alpha_true",) if self.observe_true_alpha else ())
            + (BASE_FEATURES if self.observe_base else ())
            + self.protocol_user_features
        )

    @property
    def size(self) -> int:
        return self.max_users * len(self.user_features) + len(self.global_features)

    @property
    def feature_names(self) -> list[str]:
        names = [f"user{k}.{f}" for k in range(self.max_users) for f in self.user_features]
        return names + list(self.global_features)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        high_user = np.array([_UPPER.get(f, 1.0) for f in self.user_features], dtype=np.float32)
        high_global = np.array(
            [
                {"last_round_time": 10.0, "base_deadline": 10.0}.get(f, 1.0)
                for f in self.global_features
            ],
            dtype=np.float32,
        )
        high = np.concatenate([np.tile(high_user, self.max_users), high_global])
        return np.zeros_like(high), high


class UserHistory:
    """What the server remembers about each user, vectorised over ``(N, K)``.

    Acceptance is tracked as exponentially weighted counts of Bernoulli trials: a round with
    ``a`` accepted of ``L`` drafted tokens contributes ``a`` successes and ``a + 1`` trials
    if a token was rejected (``a`` if all were accepted), the maximum-likelihood estimator
    of a truncated geometric. New requests restart from the task prior.
    """

    def __init__(
        self, num_envs: int, num_users: int, decay: float = 0.8, prior_weight: float = 2.0
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} must be in (0, 1)")
        if prior_weight <= 0:
            raise ValueError(f"prior_weight={prior_weight} must be > 0")
        self.decay, self.prior_weight = decay, prior_weight
        shape = (num_envs, num_users)
        self.successes = np.zeros(shape)
        self.trials = np.zeros(shape)
        self.accept_frac = np.zeros(shape)
        self.last_drafted = np.zeros(shape)
        self.last_accepted = np.zeros(shape)
        self.prev_share = np.zeros(shape)
        self.spectral_eff_avg = np.zeros(shape)
        self.last_round_time_s = np.zeros(num_envs)

    def reset(
        self,
        alpha_prior: np.ndarray,
        rows: np.ndarray | None = None,
        spectral_eff_est: np.ndarray | None = None,
    ) -> None:
        """Forget everything for the given rows (default all) and start from the prior."""
        rows = slice(None) if rows is None else rows
        self._start_from_prior(rows, alpha_prior, spectral_eff_est)
        self.last_round_time_s[rows] = 0.0

    def reset_users(self, cols, alpha_prior) -> None:
        """Forget what was seen of user slots ``cols`` in every env (live: a new user took
        the slot) and start them from the prior."""
        self._start_from_prior((slice(None), cols), alpha_prior, None)

    def _start_from_prior(self, idx, alpha_prior, spectral_eff_est) -> None:
        self.spectral_eff_avg[idx] = 0.0 if spectral_eff_est is None else spectral_eff_est
        self.successes[idx] = alpha_prior * self.prior_weight
        self.trials[idx] = self.prior_weight
        self.accept_frac[idx] = alpha_prior
        for arr in (self.last_drafted, self.last_accepted, self.prev_share):
            arr[idx] = 0.0

    def update(
        self,
        drafted,
        accepted,
        bandwidth_share,
        round_time_s,
        new_request=None,
        alpha_prior=None,
        spectral_eff_est=None,
    ) -> None:
        """Record one round. ``new_request`` marks users whose request just ended;
        ``spectral_eff_est`` is the channel estimate the round was decided on."""
        shape = self.successes.shape
        has_new = new_request is not None and bool(np.any(new_request))
        _update_history_kernel(
            as_array(drafted, shape),
            as_array(accepted, shape),
            as_array(bandwidth_share, shape),
            as_array(round_time_s, shape[:1]),
            as_array(new_request, shape, np.bool_) if has_new else _UNUSED_BOOL,
            as_array(alpha_prior, shape) if has_new else _UNUSED,
            _UNUSED if spectral_eff_est is None else as_array(spectral_eff_est, shape),
            has_new,
            spectral_eff_est is not None,
            float(self.decay),
            float(self.prior_weight),
            self.successes,
            self.trials,
            self.accept_frac,
            self.last_drafted,
            self.last_accepted,
            self.prev_share,
            self.spectral_eff_avg,
            self.last_round_time_s,
        )

    def rows(self, rows: np.ndarray) -> UserHistory:
        """A copy holding only the given environments (for partial observations)."""
        return self._select(lambda a: a[rows])

    def columns(self, cols) -> UserHistory:
        """A copy holding only the given user slots, in that order (live: connected users)."""
        return self._select(lambda a: a[:, cols] if a.ndim == 2 else a)

    def _select(self, pick) -> UserHistory:
        view = UserHistory.__new__(UserHistory)
        view.decay, view.prior_weight = self.decay, self.prior_weight
        for name in (
            "successes",
            "trials",
            "accept_frac",
            "last_drafted",
            "last_accepted",
            "prev_share",
            "spectral_eff_avg",
            "last_round_time_s",
        ):
            setattr(view, name, pick(getattr(self, name)))
        return view

    @property
    def alpha_hat(self) -> np.ndarray:
        return self.successes / np.maximum(self.trials, 1e-12)


def build_observation(
    spec: ObservationSpec,
    history: UserHistory,
    spectral_eff_est,
    t_draft_s,
    alpha_prior,
    horizon_frac,
    alpha_true=None,
    base_lengths=None,
    base_bandwidth_hz=None,
    protocol: dict | None = None,
) -> np.ndarray:
    """Observation array ``(N, spec.size)`` from server-side quantities ``(N, K)``.

    K (active users) may be below ``spec.max_users``; the remaining slots are zero.
    ``base_*`` (with ``spec.observe_base``) are a base heuristic's allocation this round.
    ``protocol``: the extended protocol's inputs by feature name (``base_stop``,
    ``predrafted`` in tokens, ``base_group``, ``base_deadline`` in seconds).
    """
    r_hat = np.ascontiguousarray(spectral_eff_est, dtype=np.float64)
    n, k = r_hat.shape
    if k > spec.max_users:
        raise ValueError(f"{k} users do not fit the observation's max_users={spec.max_users}")
    if spec.observe_true_alpha and alpha_true is None:
        raise ValueError("observe_true_alpha is set but alpha_true was not given")
    if spec.observe_base and (base_lengths is None or base_bandwidth_hz is None):
        raise ValueError("observe_base is set but the base allocation was not given")

    shape = (n, k)

    out = np.zeros((n, spec.size), dtype=np.float32)
    _observation_kernel(
        r_hat,
        as_array(history.spectral_eff_avg, shape),
        as_array(t_draft_s, shape),
        as_array(alpha_prior, shape),
        as_array(history.successes, shape),
        as_array(history.trials, shape),
        as_array(history.accept_frac, shape),
        as_array(history.last_drafted, shape),
        as_array(history.last_accepted, shape),
        as_array(history.prev_share, shape),
        as_array(history.last_round_time_s, (n,)),
        as_array(horizon_frac, (n,)),
        as_array(alpha_true, shape) if spec.observe_true_alpha else _UNUSED,
        bool(spec.observe_true_alpha),
        as_array(base_lengths, shape) if spec.observe_base else _UNUSED,
        as_array(base_bandwidth_hz, shape) if spec.observe_base else _UNUSED,
        bool(spec.observe_base),
        int(spec.max_users),
        len(spec.user_features),
        float(spec.t_ref_s),
        float(spec.payload_bits),
        float(spec.bandwidth_hz),
        float(spec.max_draft_length),
        out,
    )
    if spec.levers is not None and spec.levers.any:
        _protocol_features(spec, protocol or {}, out, n, k)
    return out


def _protocol_features(spec: ObservationSpec, values: dict, out, n: int, k: int) -> None:
    """Write the extended protocol's features (layout in the module docstring)."""
    names = spec.user_features
    width = len(names)
    users = out[:, : spec.max_users * width].reshape(n, spec.max_users, width)
    scale = {
        "base_stop": 1.0,
        "predrafted": 1.0 / spec.max_draft_length,
        "base_group": 1.0 / max(getattr(spec.levers, "groups", 2) - 1, 1),
    }
    for name in spec.protocol_user_features:
        if name not in values:
            raise ValueError(f"the observation needs {name!r} for this protocol")
        users[:, :k, names.index(name)] = np.clip(np.asarray(values[name]) * scale[name], 0, 1)
    if "base_deadline" in spec.global_features:
        if "base_deadline" not in values:
            raise ValueError("the observation needs 'base_deadline' for this protocol")
        t_scale = spec.max_draft_length * spec.t_ref_s
        out[:, -1] = np.clip(np.asarray(values["base_deadline"]) / t_scale, 0.0, 10.0)


@kernel
def _update_history_kernel(
    drafted,
    accepted,
    bandwidth_share,
    round_time_s,
    new_request,
    alpha_prior,
    spectral_eff_est,
    has_new,
    has_estimate,
    decay,
    prior_weight,
    successes,
    trials,
    accept_frac,
    last_drafted,
    last_accepted,
    prev_share,
    spectral_eff_avg,
    last_round_time_s,
):
    """One round of :meth:`UserHistory.update`, in place. Users that did not draft keep
    their acceptance history; users whose request ended restart from the task prior."""
    d = decay
    for n in range(drafted.shape[0]):
        last_round_time_s[n] = round_time_s[n]
        for k in range(drafted.shape[1]):
            if has_estimate:
                spectral_eff_avg[n, k] = 0.9 * spectral_eff_avg[n, k] + 0.1 * spectral_eff_est[n, k]
            dr, ac = drafted[n, k], accepted[n, k]
            if dr > 0:
                successes[n, k] = d * successes[n, k] + ac
                trials[n, k] = d * trials[n, k] + ac + (1.0 if ac < dr else 0.0)
                accept_frac[n, k] = d * accept_frac[n, k] + (1 - d) * ac / max(dr, 1.0)
            last_drafted[n, k] = dr
            last_accepted[n, k] = ac
            prev_share[n, k] = bandwidth_share[n, k]
            if has_new and new_request[n, k]:
                successes[n, k] = alpha_prior[n, k] * prior_weight
                trials[n, k] = prior_weight
                accept_frac[n, k] = alpha_prior[n, k]


@kernel
def _observation_kernel(
    r_hat,
    r_avg,
    t_draft_s,
    alpha_prior,
    successes,
    trials,
    accept_frac,
    last_drafted,
    last_accepted,
    prev_share,
    last_round_time_s,
    horizon_frac,
    alpha_true,
    has_true,
    base_lengths,
    base_bandwidth,
    has_base,
    max_users,
    n_feat,
    t_ref,
    payload_bits,
    bandwidth_hz,
    l_max,
    out,
):
    """Fill ``out`` (zeros on entry) with the layout in the module docstring."""
    k_active = r_hat.shape[1]
    glob = max_users * n_feat
    for n in range(r_hat.shape[0]):
        for k in range(k_active):
            j = k * n_feat
            out[n, j] = 1.0
            out[n, j + 1] = min(r_hat[n, k] / _R_REF, 4.0)
            out[n, j + 2] = min(r_avg[n, k] / _R_REF, 4.0)
            out[n, j + 3] = min(t_draft_s[n, k] / t_ref, 4.0)
            upload_equal = payload_bits * k_active / (bandwidth_hz * max(r_hat[n, k], 1e-9)) / t_ref
            out[n, j + 4] = min(upload_equal, 10.0)
            out[n, j + 5] = alpha_prior[n, k]
            out[n, j + 6] = successes[n, k] / max(trials[n, k], 1e-12)
            out[n, j + 7] = accept_frac[n, k]
            out[n, j + 8] = last_drafted[n, k] / l_max
            out[n, j + 9] = last_accepted[n, k] / l_max
            out[n, j + 10] = min(prev_share[n, k] * k_active, 10.0)
            if has_true:
                out[n, j + 11] = alpha_true[n, k]
            if has_base:
                jb = j + 12 if has_true else j + 11
                out[n, jb] = base_lengths[n, k] / l_max
                out[n, jb + 1] = min(base_bandwidth[n, k] / bandwidth_hz * k_active, 10.0)
        out[n, glob] = k_active / max_users
        out[n, glob + 1] = min(last_round_time_s[n] / (l_max * t_ref), 10.0)
        out[n, glob + 2] = min(horizon_frac[n], 1.0)
