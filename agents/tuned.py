"""Tuned heuristics: the paper's schemes with a few robustness knobs, tuned per scenario.

The paper's closed forms are optimal for the instance they are fed. Under CSI error, hidden
per-request acceptance and a token-aware verifier they are fed the wrong instance, and a few
knobs that make them more cautious often pay more than a learned policy does. Every learned
result in this project is compared against the best of this family, tuned on seeds disjoint
from the evaluation seeds (``multispin tune``).

Knobs of :class:`TunedHeuristic`:

scheme          ``homo``, ``hete`` or ``uni_bw``: the paper's solver.
alpha_source    ``prior`` (offline task means) or ``history`` (the server's EWMA estimate).
length_cap      the solver plans with L_max = min(length_cap, L_max): a cap on every draft.
csi_margin      the solver plans with r^ x csi_margin: an upload assumed slower than the
                estimate says, which shortens drafts when uploads dominate.
equal_mix       the bandwidth actually given is (1 - equal_mix) B_solver + equal_mix B / K:
                a hedge against a channel estimate that is wrong for one user.
fast            Hete on a coarser grid without polish (see ``SolverPolicy.fast``): for a base
                heuristic that runs inside the env at every step.
oracle          (spec token ``oracle``) the simulator's hidden truth replaces the estimates:
                every user's true acceptance rate for both sources (so the source token has
                no effect) and the true channel for the estimate. Not deployable (live mode
                has no truth to give); it measures how much the family could gain from
                knowing what the server cannot, an upper reference for what a learned policy
                could add by inferring it (``multispin tune --oracle``).

Knobs of the extended protocols (multispin_env.protocols; ignored in the synchronous round):

(spec tokens ``stop=`` in [0, 1), ``scale=`` in [0.25, 4], ``deadline=`` in [0.05, 4]; defaults
0.5, 1, 1, left out of the name when at their defaults)

stop_threshold  early stop: every user's confidence threshold lambda (AdaEDL's rule: stop when
                the drafter's confidence in the next token falls below lambda).
cap_scale       the solver's draft lengths times this are the caps (rounded, within L_max): a
                stop rule or a deadline cuts drafts short, so longer caps can pay.
deadline_scale  deadline verification: the deadline is this times the heuristic's own
                predicted straggler latency under streaming, max_k d + u + (L - 1) max(d, u).

Pipelined groups: users are split into balanced groups (snake order of the predicted
per-token draft + upload time at an equal share of the band) and each group is solved on
its own with the whole band. ``stable`` (spec token; ``stable_groups``) groups users by slot
instead (k mod G), the same every cycle: the simulator's cycle assumes a user's previous draft
is verified before its group's next phase, which groups that change every cycle break in the
live system (a user of the last group that lands in the first one waits for its result).

With ``length_cap = L_max``, ``csi_margin = 1`` and ``equal_mix = 0`` it is the paper's
scheme exactly in the synchronous round (tested); under an extended protocol the protocol
knobs below still act (e.g. the stop threshold's default 0.5). A tuned heuristic is written
as a spec string, for example ``tuned[hete,prior,cap=6,margin=0.8,mix=0.1]``, or saved as
the JSON that ``multispin tune`` writes (``tuned:PATH``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multispin_agents.policies import SolverPolicy
from multispin_env.types import Decision

SCHEMES = ("homo", "hete", "uni_bw")
SOURCES = ("prior", "history")
_SPEC = re.compile(r"^tuned\[(?P<body>[^\]]*)\]$")


@dataclass(frozen=True)
class TunedHeuristic:
    """A paper scheme with robustness knobs (see the module docstring)."""

    scheme: str = "hete"
    alpha_source: str = "prior"
    length_cap: int = 25
    csi_margin: float = 1.0
    equal_mix: float = 0.0
    fast: bool = False
    stop_threshold: float = 0.5
    cap_scale: float = 1.0
    deadline_scale: float = 1.0
    stable_groups: bool = False
    oracle: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r}; choose one of {SCHEMES}")
        if self.alpha_source not in SOURCES:
            raise ValueError(f"alpha_source={self.alpha_source!r}; choose one of {SOURCES}")
        if isinstance(self.length_cap, bool) or int(self.length_cap) != self.length_cap:
            raise ValueError(f"length_cap={self.length_cap!r} must be an integer >= 1")
        if self.length_cap < 1:
            raise ValueError(f"length_cap={self.length_cap} must be >= 1")
        if not 0.0 < self.csi_margin <= 1.0:
            raise ValueError(f"csi_margin={self.csi_margin} must be in (0, 1]")
        if not 0.0 <= self.equal_mix <= 1.0:
            raise ValueError(f"equal_mix={self.equal_mix} must be in [0, 1]")
        if not 0.0 <= self.stop_threshold < 1.0:
            raise ValueError(f"stop_threshold={self.stop_threshold} must be in [0, 1)")
        if not 0.25 <= self.cap_scale <= 4.0:
            raise ValueError(f"cap_scale={self.cap_scale} must be in [0.25, 4]")
        if not 0.05 <= self.deadline_scale <= 4.0:
            raise ValueError(f"deadline_scale={self.deadline_scale} must be in [0.05, 4]")

    @property
    def name(self) -> str:
        # repr: the name is also the spec, and parsing it back must give the same floats
        return (
            f"tuned[{self.scheme},{self.alpha_source},cap={self.length_cap},"
            f"margin={self.csi_margin!r},mix={self.equal_mix!r}{self._protocol_suffix()}"
            f"{',stable' if self.stable_groups else ''}{',fast' if self.fast else ''}"
            f"{',oracle' if self.oracle else ''}]"
        )

    def protocol_knobs(self) -> dict:
        """The protocol knobs (spec key -> value) that differ from their defaults."""
        knobs = {
            key: getattr(self, name)
            for key, name in _PROTOCOL_KEYS.items()
            if getattr(self, name) != _DEFAULTS[name]
        }
        return knobs | ({"stable": True} if self.stable_groups else {})

    def _view(self, view):
        """The view the knobs plan with: the hidden truth in place of estimates (``oracle``)."""
        if not self.oracle:
            return view
        if view.oracle_alpha is None or view.oracle_spectral_eff is None:
            raise ValueError(
                f"{self.name} plans with the hidden truth (oracle), which this view does not "
                "have (a live system cannot know it): drop 'oracle' from the spec"
            )
        return dataclasses.replace(
            view,
            alpha_prior=view.oracle_alpha,
            alpha_hat=view.oracle_alpha,
            spectral_eff_est=view.oracle_spectral_eff,
        )

    def _protocol_suffix(self) -> str:
        """Protocol knobs that differ from their defaults (so synchronous names stay short)."""
        out = ""
        for key, field_name in _PROTOCOL_KEYS.items():
            value = getattr(self, field_name)
            if value != _DEFAULTS[field_name]:
                out += f",{key}={value!r}"
        return out

    def decide(self, view) -> Decision:
        """The decision under the view's protocol (the synchronous round: :meth:`act`)."""
        view = self._view(view)
        groups = getattr(view, "pipeline_groups", 1)
        group = None
        if groups > 1 and self.stable_groups:
            group = slot_groups(view, groups)
        elif groups > 1:
            group = balanced_groups(view, groups, self.csi_margin)
        lengths, bandwidth = self.act(view, group)
        early_stop = getattr(view, "early_stop", False)
        streaming = getattr(view, "streaming_deadline", False)
        if not (early_stop or streaming or groups > 1):
            return Decision(lengths, bandwidth)
        if self.cap_scale != 1.0:
            lengths = np.clip(np.rint(lengths * self.cap_scale), 1, view.max_draft_length)
            lengths = lengths.astype(np.int64)
            bandwidth = self.bandwidth_for(view, lengths, group)
        stop = np.full(lengths.shape, self.stop_threshold) if early_stop else None
        deadline = None
        if streaming:
            deadline = self.deadline_scale * predicted_streaming_finish_s(
                view, lengths, bandwidth, self.csi_margin
            ).max(axis=1)
        return Decision(lengths, bandwidth, stop, deadline, group)

    def act(self, view, group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The allocation (lengths, bandwidth_hz); with ``group``, one solve per group."""
        view = self._view(view)
        planned = dataclasses.replace(
            view,
            spectral_eff_est=view.spectral_eff_est * self.csi_margin,
            max_draft_length=min(int(self.length_cap), int(view.max_draft_length)),
        )
        solver = SolverPolicy(self.scheme, self.alpha_source, fast=self.fast)
        lengths, bandwidth = solver.act(planned, group)
        if self.equal_mix > 0:
            bandwidth = _mix_equal(bandwidth, self.equal_mix, view.bandwidth_hz, group)
        return lengths, bandwidth

    def bandwidth_for(self, view, lengths: np.ndarray, group: np.ndarray | None = None):
        """This heuristic's bandwidth rule applied to other draft lengths ``(N, K)``: the
        latency-equalising split on the margin-scaled channel (equal shares for Uni-BW),
        then the equal-share mix; per pipeline group when ``group`` is given (each group
        has the whole band). For its own lengths it is its own bandwidth."""
        from multispin_env.allocation import groupwise_equalising_bandwidth

        view = self._view(view)
        lengths = np.asarray(lengths)
        if self.scheme == "uni_bw":  # equal shares of each group's band
            drafting = lengths > 0
            groups = (
                [drafting] if group is None else [drafting & (group == g) for g in np.unique(group)]
            )
            bandwidth = np.zeros(lengths.shape)
            for members in groups:
                count = np.maximum(members.sum(axis=1, keepdims=True), 1)
                bandwidth = np.where(members, view.bandwidth_hz / count, bandwidth)
        else:
            bandwidth = groupwise_equalising_bandwidth(
                lengths,
                view.t_draft_s,
                view.spectral_eff_est * self.csi_margin,
                view.payload_bits,
                view.bandwidth_hz,
                group,
            )
        if self.equal_mix > 0:
            bandwidth = _mix_equal(bandwidth, self.equal_mix, view.bandwidth_hz, group)
        return bandwidth

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_fast(self) -> TunedHeuristic:
        """The same knobs with the cheap solver (a base for residual training)."""
        return dataclasses.replace(self, fast=True)

    @staticmethod
    def from_dict(data: dict) -> TunedHeuristic:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(TunedHeuristic)})
        if unknown:
            raise ValueError(f"unknown tuned-heuristic field(s) {unknown}")
        return TunedHeuristic(**data)

    @staticmethod
    def parse(spec: str, max_draft_length: int | None = None) -> TunedHeuristic:
        """``tuned[hete,prior,cap=6,margin=0.8,mix=0.1]`` (any subset, in any order) or
        ``tuned:PATH`` (the JSON ``multispin tune`` writes)."""
        if spec.startswith("tuned:"):
            return load_tuned(spec[len("tuned:") :])
        if spec in SCHEMES:  # a paper scheme as it is: no cap below L_max
            return TunedHeuristic(spec, length_cap=max_draft_length or 10**6)
        match = _SPEC.match(spec)
        if not match:
            raise ValueError(
                f"{spec!r} is not a tuned heuristic; write tuned[hete,prior,cap=6,margin=0.8,"
                "mix=0.1] or tuned:PATH"
            )
        fields: dict = {}
        keys = {"cap": "length_cap", "margin": "csi_margin", "mix": "equal_mix", **_PROTOCOL_KEYS}
        for part in filter(None, (p.strip() for p in match.group("body").split(","))):
            if part in SCHEMES:
                fields["scheme"] = part
            elif part == "fast":
                fields["fast"] = True
            elif part == "stable":
                fields["stable_groups"] = True
            elif part == "oracle":
                fields["oracle"] = True
            elif part in SOURCES:
                fields["alpha_source"] = part
            elif "=" in part and part.split("=")[0] in keys:
                key, value = part.split("=", 1)
                if keys[key] in fields:
                    raise ValueError(f"{spec!r}: {key}= is given twice")
                try:
                    fields[keys[key]] = int(value) if key == "cap" else float(value)
                except ValueError:
                    kind = "an integer" if key == "cap" else "a number"
                    raise ValueError(f"{spec!r}: {key}={value!r} must be {kind}") from None
            else:
                raise ValueError(
                    f"{spec!r}: unknown part {part!r}; parts are a scheme {SCHEMES}, a source "
                    f"{SOURCES}, cap=INT, margin=FLOAT, mix=FLOAT, stop=FLOAT, scale=FLOAT, "
                    "deadline=FLOAT, stable, fast, oracle"
                )
        if max_draft_length is not None and "length_cap" not in fields:
            fields["length_cap"] = max_draft_length
        return TunedHeuristic(**fields)


_PROTOCOL_KEYS = {"stop": "stop_threshold", "scale": "cap_scale", "deadline": "deadline_scale"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TunedHeuristic)}


def _mix_equal(bandwidth, mix: float, bandwidth_hz: float, group) -> np.ndarray:
    """(1 - mix) B_k + mix B / K_g: the equal-share hedge within each user's group."""
    if group is None:
        return (1 - mix) * bandwidth + mix * bandwidth_hz / bandwidth.shape[1]
    size = np.zeros(group.shape)
    for g in np.unique(group):
        size = np.where(group == g, (group == g).sum(axis=1, keepdims=True), size)
    return (1 - mix) * bandwidth + mix * bandwidth_hz / size


def slot_groups(view, groups: int) -> np.ndarray:
    """``(N, K)`` groups by user slot, k mod G: the same every cycle while users stay."""
    n, k = view.t_draft_s.shape
    return np.broadcast_to(np.arange(k) % groups, (n, k)).astype(np.int64)


def balanced_groups(view, groups: int, csi_margin: float = 1.0) -> np.ndarray:
    """``(N, K)`` groups of equal size balanced by predicted per-token draft + upload time
    at an equal share of the band: users sorted by that time are dealt in snake order
    (0, 1, 1, 0, 0, 1, ... for two groups), so every group gets slow and fast users."""
    n, k = view.t_draft_s.shape
    share_hz = view.bandwidth_hz * groups / k
    per_token = view.t_draft_s + view.payload_bits / (
        share_hz * np.maximum(view.spectral_eff_est * csi_margin, 1e-9)
    )
    order = np.argsort(-per_token, axis=1, kind="stable")
    rank = np.arange(k)
    lap, seat = rank // groups, rank % groups
    snake = np.where(lap % 2 == 0, seat, groups - 1 - seat)
    group = np.empty((n, k), dtype=np.int64)
    np.put_along_axis(group, order, np.broadcast_to(snake, (n, k)), axis=1)
    return group


def predicted_streaming_finish_s(view, lengths, bandwidth_hz, csi_margin: float = 1.0):
    """When each user's last token would reach the server under streaming, on the
    server's (margin-scaled) channel estimate: d + u + (L - 1) max(d, u); 0 for L = 0."""
    d = view.t_draft_s
    rate = np.maximum(bandwidth_hz * view.spectral_eff_est * csi_margin, 1e-300)
    u = view.payload_bits / rate
    finish = d + u + (lengths - 1) * np.maximum(d, u)
    return np.where(lengths > 0, finish, 0.0)


def load_tuned(path: str | Path) -> TunedHeuristic:
    """The best heuristic from a ``multispin tune`` result file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no tuned-heuristic file; run `multispin tune` to make one")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "best" not in data:
        raise ValueError(f"{path}: not a `multispin tune` result (no 'best' field)")
    return TunedHeuristic.from_dict(data["best"])


def default_tuned_path(env_id: str, root: str | Path = "results/tuned") -> Path:
    """Where ``multispin tune --env ENV`` writes by default."""
    slug = env_id.split("/")[-1].lower()
    return Path(root) / f"{slug}.json"
