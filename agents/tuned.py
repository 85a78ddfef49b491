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

With ``length_cap = L_max``, ``csi_margin = 1`` and ``equal_mix = 0`` it is the paper's
scheme exactly (tested). A tuned heuristic is written as a spec string, for example
``tuned[hete,prior,cap=6,margin=0.8,mix=0.1]``, or saved as the JSON that ``multispin tune``
writes (``tuned:PATH``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multispin_agents.policies import SolverPolicy

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

    @property
    def name(self) -> str:
        # repr: the name is also the spec, and parsing it back must give the same floats
        return (
            f"tuned[{self.scheme},{self.alpha_source},cap={self.length_cap},"
            f"margin={self.csi_margin!r},mix={self.equal_mix!r}{',fast' if self.fast else ''}]"
        )

    def act(self, view) -> tuple[np.ndarray, np.ndarray]:
        planned = dataclasses.replace(
            view,
            spectral_eff_est=view.spectral_eff_est * self.csi_margin,
            max_draft_length=min(int(self.length_cap), int(view.max_draft_length)),
        )
        solver = SolverPolicy(self.scheme, self.alpha_source, fast=self.fast)
        lengths, bandwidth = solver.act(planned)
        if self.equal_mix > 0:
            k = bandwidth.shape[1]
            bandwidth = (1 - self.equal_mix) * bandwidth + self.equal_mix * view.bandwidth_hz / k
        return lengths, bandwidth

    def bandwidth_for(self, view, lengths: np.ndarray) -> np.ndarray:
        """This heuristic's bandwidth rule applied to other draft lengths ``(N, K)``: the
        latency-equalising split on the margin-scaled channel (equal shares for Uni-BW),
        then the equal-share mix. For its own lengths it is its own bandwidth."""
        from multispin_env.allocation import latency_equalising_bandwidth

        lengths = np.asarray(lengths)
        k = lengths.shape[1]
        if self.scheme == "uni_bw":
            return np.full(lengths.shape, view.bandwidth_hz / k)
        bandwidth, _ = latency_equalising_bandwidth(
            lengths,
            view.t_draft_s,
            view.spectral_eff_est * self.csi_margin,
            view.payload_bits,
            view.bandwidth_hz,
        )
        if self.equal_mix > 0:
            bandwidth = (1 - self.equal_mix) * bandwidth + self.equal_mix * view.bandwidth_hz / k
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
        keys = {"cap": "length_cap", "margin": "csi_margin", "mix": "equal_mix"}
        for part in filter(None, (p.strip() for p in match.group("body").split(","))):
            if part in SCHEMES:
                fields["scheme"] = part
            elif part == "fast":
                fields["fast"] = True
            elif part in SOURCES:
                fields["alpha_source"] = part
            elif "=" in part and part.split("=")[0] in keys:
                key, value = part.split("=", 1)
                fields[keys[key]] = int(value) if key == "cap" else float(value)
            else:
                raise ValueError(
                    f"{spec!r}: unknown part {part!r}; parts are a scheme {SCHEMES}, a source "
                    f"{SOURCES}, cap=INT, margin=FLOAT, mix=FLOAT, fast"
                )
        if max_draft_length is not None and "length_cap" not in fields:
            fields["length_cap"] = max_draft_length
        return TunedHeuristic(**fields)


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
