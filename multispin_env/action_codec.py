"""Action codecs: policy outputs <-> allocations, shared by the env and the live scheduler.

Every codec turns a batch of actions ``(N, ...)`` into integer draft lengths ``(N, K)`` in
[1, L_max] and bandwidth ``(N, K)`` in Hz that sums to B: feasible by construction. SB3
supports Box, Discrete and MultiDiscrete action spaces, so those are the only ones used.

modes
    full                  Box(-1, 1, (2 K_max,)): first K_max entries pick each user's draft
                          length (the interval is cut into L_max equal bins), the last K_max
                          are logits of the bandwidth shares: share = softmax(1.5 * logit) over
                          active users (shares within a ratio of e^3 ~ 20 are representable).
    lengths               Box(-1, 1, (K_max,)): per-user draft lengths as above; bandwidth is
                          the paper's latency-equalising split for those lengths (Lemma 3).
    lengths_discrete      MultiDiscrete([L_max] * K_max): L_k = a_k + 1; Lemma 3 bandwidth.
    homogeneous           Box(-1, 1, (1,)): one common draft length; Lemma 1 bandwidth.
    homogeneous_discrete  Discrete(L_max): L = a + 1; Lemma 1 bandwidth.
    residual              Box(-1, 1, (K_max,)): corrections to a base heuristic's draft lengths
                          (the env's ``base_policy``): L_k = clip(L_base_k + rint(a_k R), 1,
                          L_max), R = residual_range(L_max); bandwidth by the base's own rule
                          for the corrected lengths (its Lemma 3 split, with its CSI margin and
                          equal-share mix). A row whose lengths are unchanged gets the base's
                          allocation exactly, so a policy whose mean starts at zero starts as
                          the heuristic and RL only has to improve on it. (Bandwidth is not a
                          policy output here: exploring it scatters the round's straggler.)

Extended protocols (multispin_env.protocols) append their levers to a Box mode's action, in
this order (``ProtocolLevers``); discrete modes do not take them:

    stop threshold  K_max entries: lambda_k = 0.475 (a + 1) in [0, 0.95]; with ``residual``,
                    lambda_k = clip(lambda_base + 0.25 a, 0, 0.95).
    group           K_max entries: group = floor((a + 1) G / 2) in [0, G); with ``residual``,
                    the base's group moved to the next one where a > 0.5.
    deadline        1 entry (last): D = (0.2 + 0.4 (a + 1)) x the predicted time the last
                    token of the decoded allocation reaches the server under streaming (so D
                    is in [0.2, 1] of waiting for all); with ``residual``, D = D_base exp(0.5 a).
    With groups, bandwidth shares sum to B within each group (``full``: the softmax is taken
    per group; the other modes split each group's band by their rule).

Slots beyond the K active users are ignored. Box entries outside [-1, 1] are clipped;
discrete actions must be integers (or integral floats) in range: anything else raises,
naming the expected shape or range (see :meth:`ActionCodec.check`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

from multispin_env._jit import kernel
from multispin_env.allocation import groupwise_equalising_bandwidth
from multispin_env.types import Decision

SHARE_TEMPERATURE = 1.5
MODES = (
    "full",
    "lengths",
    "lengths_discrete",
    "homogeneous",
    "homogeneous_discrete",
    "residual",
)


def residual_range(max_draft_length: int) -> int:
    """Largest length correction the ``residual`` mode can make (a = +-1)."""
    return max(2, -(-max_draft_length // 4))


@dataclass(frozen=True)
class DecisionContext:
    """What the server knows when it turns an action into an allocation.

    Attributes:
        spectral_eff_est: ``(N, K)`` channel estimates r^_k in bit/s/Hz.
        t_draft_s: ``(N, K)`` per-token drafting latencies.
        payload_bits: Q_tok.
        bandwidth_hz: total uplink bandwidth B.
        base_lengths, base_bandwidth_hz: ``(N, K)`` the base heuristic's allocation (the
            ``residual`` mode corrects it; None otherwise).
        base_bandwidth_for: the base's bandwidth rule, ``(lengths (N, K), group=None) ->
            Hz (N, K)``, for corrected lengths (and groups).
        base_stop_threshold, base_deadline_s, base_group: the base's protocol levers.
    """

    spectral_eff_est: np.ndarray
    t_draft_s: np.ndarray
    payload_bits: float
    bandwidth_hz: float
    base_lengths: np.ndarray | None = None
    base_bandwidth_hz: np.ndarray | None = None
    base_bandwidth_for: Callable[..., np.ndarray] | None = None
    base_stop_threshold: np.ndarray | None = None
    base_deadline_s: np.ndarray | None = None
    base_group: np.ndarray | None = None

    @classmethod
    def of(cls, view, base=None, heuristic=None) -> DecisionContext:
        """The context of a server view (``episodes.ServerView``), with the base
        heuristic's decision ``base`` and its bandwidth rule where a residual policy
        corrects it (simulator and live server build it the same way)."""
        head = (view.spectral_eff_est, view.t_draft_s, view.payload_bits, view.bandwidth_hz)
        if base is None:
            return cls(*head)
        return cls(
            *head,
            base.draft_lengths,
            base.bandwidth_hz,
            lambda lengths, group=None: heuristic.bandwidth_for(view, lengths, group),
            base.stop_threshold,
            base.deadline_s,
            base.group,
        )


@kernel
def _box_length(a, l_max):
    """[-1, 1] cut into l_max equal bins -> draft length in [1, l_max]."""
    b = np.floor((np.float64(a) + 1.0) * (0.5 * l_max))
    return np.int64(1 + min(max(b, 0.0), l_max - 1))


@kernel
def _decode_full_kernel(action, num_users, max_users, l_max, bandwidth_hz, lengths, bandwidth):
    """``full`` mode: length bins and softmax(SHARE_TEMPERATURE * logit) shares."""
    for n in range(action.shape[0]):
        top = -np.inf
        for k in range(num_users):
            lengths[n, k] = _box_length(action[n, k], l_max)
            logit = SHARE_TEMPERATURE * min(max(np.float64(action[n, max_users + k]), -1.0), 1.0)
            bandwidth[n, k] = logit
            top = max(top, logit)
        total = 0.0
        for k in range(num_users):
            bandwidth[n, k] = np.exp(bandwidth[n, k] - top)
            total += bandwidth[n, k]
        for k in range(num_users):
            bandwidth[n, k] = bandwidth[n, k] / total * bandwidth_hz


@kernel
def _residual_lengths_kernel(action, base_lengths, l_max, step, lengths):
    """``residual`` mode: L_base + rint(a R), clipped; a = 0 gives the base exactly."""
    for n in range(lengths.shape[0]):
        for k in range(lengths.shape[1]):
            a = min(max(np.float64(action[n, k]), -1.0), 1.0)
            length = base_lengths[n, k] + np.rint(a * step)
            lengths[n, k] = np.int64(min(max(length, 1.0), l_max))


@kernel
def _box_lengths_kernel(action, width, l_max, lengths):
    """Per-user length bins from the first ``width`` entries of each row (``width`` = 1:
    one common length for every user)."""
    for n in range(lengths.shape[0]):
        for k in range(lengths.shape[1]):
            lengths[n, k] = _box_length(action[n, k if width > 1 else 0], l_max)


def _box_to_length(a: np.ndarray, l_max: int) -> np.ndarray:
    a = np.ascontiguousarray(a)
    lengths = np.empty(a.shape, dtype=np.int64)
    _box_lengths_kernel(
        a.reshape(-1, a.shape[-1]), a.shape[-1], l_max, lengths.reshape(-1, a.shape[-1])
    )
    return lengths


def _length_to_box(lengths: np.ndarray, l_max: int) -> np.ndarray:
    return (2.0 * (np.asarray(lengths, dtype=np.float64) - 0.5) / l_max - 1.0).astype(np.float32)


def _index(where: np.ndarray, single: bool) -> str:
    """An entry's position in the caller's terms (no batch axis for a single action)."""
    if single:
        return f"index {tuple(int(i) for i in where[1:])}"
    return f"env {int(where[0])}, index {tuple(int(i) for i in where[1:])}"


@dataclass(frozen=True)
class ProtocolLevers:
    """Which extended-protocol levers an action carries (see the module docstring)."""

    stop: bool = False
    deadline: bool = False
    groups: int = 1

    @classmethod
    def of(cls, config) -> ProtocolLevers:
        return cls(config.early_stop, config.streaming_deadline, config.pipeline_groups)

    @property
    def any(self) -> bool:
        return self.stop or self.deadline or self.groups > 1

    def width(self, max_users: int) -> int:
        return max_users * self.per_user + int(self.deadline)

    @property
    def per_user(self) -> int:
        """Action entries per user slot the levers add (stop threshold, group)."""
        return int(self.stop) + int(self.groups > 1)


class ActionCodec:
    """Decode policy actions into (draft lengths, bandwidth in Hz); see module docstring."""

    def __init__(
        self,
        mode: str,
        max_users: int,
        max_draft_length: int,
        levers: ProtocolLevers = ProtocolLevers(),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"action mode {mode!r} is not one of {MODES}")
        if max_users < 1 or max_draft_length < 1:
            raise ValueError("max_users and max_draft_length must be >= 1")
        if levers.any and mode.endswith("_discrete"):
            raise ValueError(
                f"action mode {mode!r} cannot carry the extended protocol's levers; use a Box "
                "mode (residual, full, lengths or homogeneous)"
            )
        self.mode, self.max_users, self.max_draft_length = mode, max_users, max_draft_length
        self.levers = levers
        l_max = max_draft_length
        self.base_width = {"full": 2 * max_users, "homogeneous": 1}.get(mode, max_users)
        width = self.base_width + levers.width(max_users)
        self.space: spaces.Space = (
            spaces.MultiDiscrete(np.full(max_users, l_max))
            if mode == "lengths_discrete"
            else spaces.Discrete(l_max)
            if mode == "homogeneous_discrete"
            else spaces.Box(-1.0, 1.0, (width,), dtype=np.float32)
        )

    def layout(self) -> tuple[int, int]:
        """(entries per user slot, global entries) of a Box action: per-user blocks of
        ``max_users`` entries each (length, [bandwidth logit], [stop], [group]), then the
        global ones ([deadline]); ``homogeneous`` is one global entry."""
        if self.mode == "homogeneous":
            return 0, 1 + self.levers.width(self.max_users)
        base = 2 if self.mode == "full" else 1
        return base + self.levers.per_user, int(self.levers.deadline)

    def check(self, action, num_envs: int | None = None, single: bool = False) -> np.ndarray:
        """``action`` validated and batched to ``(N,) + space.shape``, in a dtype the kernels
        take (float32/float64 for Box modes, int64 for discrete ones).

        ``single=True``: one env's action, shape ``space.shape``. ``num_envs=n``: a batch of
        exactly ``n``. Neither: either form. Box entries outside [-1, 1] are clipped (as
        SB3 does); integer arrays are accepted for Box modes, float16 is cast to float32.
        Discrete modes take integers (or integral floats) in range, never truncate.
        Raises ``ValueError`` for a wrong shape, NaN/inf, a non-integer or out-of-range
        discrete value, ``TypeError`` for a non-numeric dtype; messages give the expected
        shape or range and the offending entry.
        """
        shape = self.space.shape
        try:
            a = np.asarray(action)
        except ValueError as err:  # ragged nested lists
            raise ValueError(
                f"action {action!r} is not an array of shape {shape} ({self.mode!r} action "
                f"space {self.space}): {err}"
            ) from err
        if single:
            if a.shape != shape:
                raise ValueError(
                    f"action shape {a.shape} does not match the {self.mode!r} action space "
                    f"{self.space}: expected an action of shape {shape}, got shape {a.shape}"
                )
            a = a[None]
        elif num_envs is not None:
            if a.shape != (num_envs,) + shape:
                raise ValueError(
                    f"action shape {a.shape} does not match {num_envs} envs of the {self.mode!r} "
                    f"action space {self.space}: expected actions of shape "
                    f"{(num_envs,) + shape}, got shape {a.shape}"
                )
        else:
            if a.shape == shape:
                a = a[None]
            if a.ndim == 0 or a.shape[1:] != shape:
                raise ValueError(
                    f"action shape {np.asarray(action).shape} does not match the {self.mode!r} "
                    f"action space {self.space}: expected an action of shape {shape} or a "
                    f"batch of shape (N,) + {shape}"
                )
        kind = a.dtype.kind
        if kind not in "fiu":
            raise TypeError(
                f"{self.mode!r} actions must be numbers (float or integer arrays), got dtype "
                f"{a.dtype}"
            )
        if kind == "f" and not np.isfinite(a.sum()) and not np.isfinite(a).all():
            where = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(
                f"action contains NaN or inf: {a[tuple(where)].item()!r} at "
                f"{_index(where, single)}; every entry of a {self.mode!r} action must be a "
                "finite number"
            )
        if self.mode.endswith("_discrete"):
            return self._check_discrete(a, single)
        if a.dtype == np.float16 or kind in "iu":
            a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
        return a

    def _check_discrete(self, a: np.ndarray, single: bool) -> np.ndarray:
        hi = self.max_draft_length - 1
        rule = f"{self.mode} actions must be integers in [0, {hi}] (draft length - 1)"
        if a.dtype.kind == "f":
            frac = a != np.floor(a)
            if frac.any():
                where = np.argwhere(frac)[0]
                raise ValueError(
                    f"{rule}, got {a[tuple(where)].item()!r} at {_index(where, single)}"
                )
        bad = (a < 0) | (a > hi)
        if bad.any():
            where = np.argwhere(bad)[0]
            raise ValueError(f"{rule}, got {a[tuple(where)].item()!r} at {_index(where, single)}")
        return a.astype(np.int64, copy=False)

    def decode(self, action, ctx: DecisionContext) -> tuple[np.ndarray, np.ndarray]:
        """Batch of actions -> (lengths ``(N, K)`` int64, bandwidth ``(N, K)`` Hz)."""
        return self.decode_checked(self.check(action), ctx)

    def decode_decision(self, a: np.ndarray, ctx: DecisionContext) -> Decision:
        """A checked batch of actions -> a :class:`Decision` with the protocol's levers."""
        if not self.levers.any:
            return Decision(*self.decode_checked(a, ctx))
        lev, n, k = self.levers, *ctx.spectral_eff_est.shape
        a = np.clip(a, -1.0, 1.0)
        residual = self.mode == "residual"
        if residual and ctx.base_lengths is None:
            self.decode_checked(a, ctx)  # raises the missing-base error
        offset = self.base_width
        stop = deadline = group = None
        if lev.stop:
            raw = a[:, offset : offset + k].astype(np.float64)
            offset += self.max_users
            if residual:
                stop = np.clip(ctx.base_stop_threshold + 0.25 * raw, 0.0, 0.95)
            else:
                stop = 0.475 * (raw + 1.0)
        if lev.groups > 1:
            raw = a[:, offset : offset + k]
            offset += self.max_users
            if residual:
                group = (ctx.base_group + (raw > 0.5)) % lev.groups
            else:
                group = np.minimum(np.floor((raw + 1.0) * lev.groups / 2), lev.groups - 1)
            group = group.astype(np.int64)
        if residual:
            lengths, bandwidth = self.decode_checked(a[:, : self.base_width], ctx, group)
        elif self.mode == "full" and group is not None:
            lengths, bandwidth = self.decode_checked(a[:, : self.base_width], ctx)
            totals = np.zeros((n, k))
            for g in range(lev.groups):
                mask = group == g
                total = np.where(mask, bandwidth, 0.0).sum(axis=1, keepdims=True)
                totals = np.where(mask, total, totals)
            bandwidth = bandwidth / totals * ctx.bandwidth_hz
        else:
            lengths, bandwidth = self.decode_checked(a[:, : self.base_width], ctx, group)
        if lev.deadline:
            raw_deadline = a[:, offset].astype(np.float64)
            if residual:
                deadline = ctx.base_deadline_s * np.exp(0.5 * raw_deadline)
            else:
                rate = np.maximum(bandwidth * ctx.spectral_eff_est, 1e-300)
                u = ctx.payload_bits / rate
                d = ctx.t_draft_s
                last = (d + u + (lengths - 1) * np.maximum(d, u)).max(axis=1)
                deadline = (0.2 + 0.4 * (raw_deadline + 1.0)) * last
        return Decision(lengths, bandwidth, stop, deadline, group)

    def decode_checked(self, a: np.ndarray, ctx: DecisionContext, group=None):
        """:meth:`decode` of an action already passed through :meth:`check` (allocation
        only; ``group`` splits the band per pipeline group)."""
        n, k = ctx.spectral_eff_est.shape
        if a.shape[0] != n:
            raise ValueError(f"got {a.shape[0]} actions for {n} environments")
        l_max = self.max_draft_length
        if self.mode == "full":
            lengths = np.empty((n, k), dtype=np.int64)
            bandwidth = np.empty((n, k))
            _decode_full_kernel(
                np.ascontiguousarray(a), k, self.max_users, l_max, float(ctx.bandwidth_hz),
                lengths, bandwidth,
            )  # fmt: skip
            return lengths, bandwidth
        if self.mode == "residual":
            if ctx.base_lengths is None or ctx.base_bandwidth_for is None:
                raise ValueError(
                    "the 'residual' action mode corrects a base heuristic's allocation, but "
                    "none was given: set the env option base_policy (e.g. 'hete' or "
                    "'tuned[hete,cap=6]')"
                )
            base_lengths = np.asarray(ctx.base_lengths)
            lengths = np.empty((n, k), dtype=np.int64)
            _residual_lengths_kernel(
                np.ascontiguousarray(a),
                np.ascontiguousarray(base_lengths, dtype=np.float64),
                l_max,
                float(residual_range(l_max)),
                lengths,
            )
            bandwidth = np.array(ctx.base_bandwidth_hz, dtype=np.float64)
            changed = np.any(lengths != base_lengths, axis=1)
            if group is not None:
                changed |= np.any(group != ctx.base_group, axis=1)
            if changed.any():
                fresh = (
                    ctx.base_bandwidth_for(lengths)
                    if group is None
                    else ctx.base_bandwidth_for(lengths, group)
                )
                bandwidth[changed] = fresh[changed]
            return lengths, bandwidth
        if self.mode == "lengths":
            lengths = _box_to_length(a[:, :k], l_max)
        elif self.mode == "lengths_discrete":
            lengths = a[:, :k] + 1
        elif self.mode == "homogeneous":
            lengths = np.empty((n, k), dtype=np.int64)
            _box_lengths_kernel(np.ascontiguousarray(a), 1, l_max, lengths)
        else:
            lengths = np.repeat(a.reshape(n, 1) + 1, k, axis=1)
        bandwidth = groupwise_equalising_bandwidth(
            lengths, ctx.t_draft_s, ctx.spectral_eff_est, ctx.payload_bits, ctx.bandwidth_hz, group
        )
        return lengths, bandwidth

    def encode(self, lengths, bandwidth_hz=None) -> np.ndarray:
        """Allocation -> an action that decodes back to it (batched ``(N, K)`` inputs).

        Exact for lengths in every mode; for ``full`` also for bandwidth shares whose
        largest/smallest ratio is within e^(2 * SHARE_TEMPERATURE). ``homogeneous`` modes
        take the first user's length.
        """
        if self.levers.any:
            raise ValueError("encode covers allocations only, not an extended protocol's levers")
        lengths = np.atleast_2d(np.asarray(lengths))
        n, k = lengths.shape
        l_max = self.max_draft_length
        if np.any((lengths < 1) | (lengths > l_max)):
            raise ValueError(f"lengths must be in [1, {l_max}]")
        if self.mode == "residual":
            raise ValueError("the 'residual' codec encodes corrections, not allocations")
        if self.mode in ("homogeneous", "homogeneous_discrete"):
            if self.mode == "homogeneous":
                return _length_to_box(lengths[:, :1], l_max)
            return (lengths[:, 0] - 1).astype(np.int64)
        if self.mode == "lengths_discrete":
            out = np.zeros((n, self.max_users), dtype=np.int64)
            out[:, :k] = lengths - 1
            return out
        width = self.max_users if self.mode == "lengths" else 2 * self.max_users
        out = np.zeros((n, width), dtype=np.float32)
        out[:, :k] = _length_to_box(lengths, l_max)
        if self.mode == "full":
            if bandwidth_hz is None:
                raise ValueError("the 'full' codec needs bandwidth_hz to encode")
            log_share = np.log(np.maximum(np.atleast_2d(bandwidth_hz), 1e-300))
            logits = (log_share - log_share.max(axis=1, keepdims=True)) / SHARE_TEMPERATURE + 1.0
            out[:, self.max_users : self.max_users + k] = np.clip(logits, -1.0, 1.0)
        return out
