"""Typed, validated scenario configuration. Units are in every field name.

A :class:`ScenarioConfig` is checked when it is built: a bad value raises ``ValueError``
naming the field, the value and the allowed range. Presets are YAML files in
``multispin_env/presets/`` (data, with provenance), loaded by :func:`load_preset`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import yaml

from multispin_env.physics import payload_bits_per_token
from multispin_env.verification import build_verification

MAX_USERS = 4096  # the counter-based RNG reserves 4096 user slots per (round, stream)


def check_type(where: str, value: Any, kind: str) -> Any:
    """``value`` checked against a field's declared type and normalised to the plain Python
    type (``np.int64(5)`` -> ``5``, ``np.float32(0.1)`` -> ``0.1`` as a float).

    ``kind`` is the annotation as written (``"int"``, ``"float"``, ``"bool"``, ``"str"``,
    ``"dict"``, ``"tuple[...]"``; ``"X | None"`` also allows None). A bool is never taken for
    a number and a string never for a number or a bool. Raises ``TypeError`` naming
    ``where`` (e.g. ``ScenarioConfig.bandwidth_hz``) and the expected type.
    """
    kind = kind.replace(" ", "")
    if kind.endswith("|None"):
        if value is None:
            return None
        kind = kind[: -len("|None")]
    got = type(value).__name__
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        hint = " (write true or false, without quotes)" if isinstance(value, str) else ""
        raise TypeError(f"{where}={value!r} must be a bool (True or False), got {got}{hint}")
    if kind == "int":
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        raise TypeError(f"{where}={value!r} must be an integer, got {got}")
    if kind == "float":
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        ):
            return float(value)
        hint = " (write the number without quotes)" if isinstance(value, str) else ""
        raise TypeError(f"{where}={value!r} must be a number, got {got}{hint}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise TypeError(f"{where}={value!r} must be a string, got {got}")
    if kind == "dict":
        if isinstance(value, dict):
            return value
        raise TypeError(f"{where}={value!r} must be a mapping, got {got}")
    if kind.startswith("tuple"):
        if isinstance(value, (tuple, list)):
            return tuple(value)
        raise TypeError(f"{where}={value!r} must be a list, got {got}")
    raise AssertionError(f"check_type: unsupported field type {kind!r} for {where}")


@dataclass(frozen=True)
class TaskSpec:
    """A prompt category with its empirical acceptance rate (paper Table I).

    Attributes:
        name: dataset name, e.g. "gsm8k".
        alpha_mean: mean per-token acceptance rate over prompts.
        alpha_std: standard deviation of the per-prompt acceptance rate (used only when
            per-request acceptance is on; a Beta with these moments is drawn per request).
        weight: relative probability that a request comes from this task.
    """

    name: str
    alpha_mean: float
    alpha_std: float = 0.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        where = f"tasks[{self.name!r}]"
        for f in dataclasses.fields(self):
            checked = check_type(f"{where}.{f.name}", getattr(self, f.name), f.type)
            object.__setattr__(self, f.name, checked)
        if not 0.0 < self.alpha_mean < 1.0:
            raise ValueError(f"{where}.alpha_mean={self.alpha_mean} must be in (0, 1)")
        max_std = math.sqrt(self.alpha_mean * (1.0 - self.alpha_mean))
        if not 0.0 <= self.alpha_std < max_std:
            raise ValueError(
                f"{where}.alpha_std={self.alpha_std} must be in [0, {max_std:.4f}) "
                "(a Beta distribution needs std < sqrt(mean (1 - mean)))"
            )
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"{where}.weight={self.weight} must be a finite number > 0")

    @property
    def beta_params(self) -> tuple[float, float]:
        """(a, b) of the Beta distribution with this mean and std."""
        m, v = self.alpha_mean, self.alpha_std**2
        nu = m * (1.0 - m) / v - 1.0
        return m * nu, (1.0 - m) * nu


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything the simulator needs to know about one deployment.

    Paper notation in brackets. Realism options (per-request acceptance, finite requests, CSI
    error, energy) are off in the paper presets.
    """

    name: str = "custom"
    """Scenario name (used in logs and registered env ids)."""
    num_users: int = 20
    """Number of devices K."""
    bandwidth_hz: float = 10e6
    """Total uplink bandwidth B shared by FDMA."""
    noise_power_w: float = 1e-10
    """Receiver noise power N0 (a power, not a density: Eq. 8 does not scale it by B)."""
    tx_power_w: float = 1e-7
    """Device transmit power p_k (same for all devices)."""
    mean_gain_low: float = 0.2
    """Lower end of the per-device average channel gain H_bar_k ~ U(low, high)."""
    mean_gain_high: float = 0.5
    """Upper end of the per-device average channel gain."""
    rayleigh_fading: bool = True
    """Draw H_k = |h_k|^2, h_k ~ CN(0, H_bar_k), independently every round (block fading)."""
    t_draft_mean_s: float = 0.02
    """Mean per-token drafting latency T^S of the drafter on a device."""
    t_draft_spread: float = 0.15
    """Device heterogeneity: T^S_k ~ U[1 - spread, 1 + spread] * t_draft_mean_s."""
    vocab_size: int = 32000
    """Vocabulary size V of the model pair (sets the index bits of the payload)."""
    kept_vocab: int = 1024
    """Truncated PMF size |V_kept| uploaded per drafted token."""
    prob_bits: int = 16
    """Bits per uploaded probability Q_B."""
    max_draft_length: int = 25
    """Largest draft length L_max any policy may choose."""
    verification: dict = field(
        default_factory=lambda: {"kind": "affine", "t_fix_s": 0.02268, "t_lin_s": 0.01272}
    )
    """Batched verification latency model: {"kind": "affine", t_fix_s, t_lin_s} (Eq. 7) or
    {"kind": "token_aware", t_fix_s, t_user_s, t_token_s}."""
    tasks: tuple[TaskSpec, ...] = (TaskSpec("default", 0.75),)
    """Prompt categories with acceptance statistics; a user's task is drawn by weight."""
    server_t_draft_s: float = 0.005
    """Per-token drafting latency of the drafter run on the server (Cen-SPIN baseline only)."""
    per_request_acceptance: bool = False
    """Draw each request's acceptance rate from Beta(task mean, task std) instead of using
    the task mean (Table I gives the spread over prompts)."""
    request_length_tokens: float = 0.0
    """Mean tokens per request; 0 means endless requests (the paper's setting). When > 0,
    requests have geometric lengths and a finished user starts a new request (new task)."""
    csi_error_std: float = 0.0
    """Channel estimation error: the server sees |h + e|^2 with e ~ CN(0, std^2 H_bar)."""
    draft_energy_j_per_token: float = 0.0
    """Device energy per drafted token (transmission energy is p_k times upload time)."""
    early_stop: bool = False
    """Protocol switch: confidence-based early stop (AdaEDL). Each user gets a cap and a
    confidence threshold; acceptance becomes token level (see multispin_env.protocols)."""
    token_logit_std: float = 0.73
    """Token-level acceptance: std of the per-token acceptance logit around the request's
    mean (only with early_stop). Default: the fit on the built-in pair,
    results/token_model/builtin_pair.json (python -m multispin_eval.fit_token_model)."""
    confidence_noise_std: float = 1.81
    """Token-level acceptance: std of the noise between the drafter's confidence logit and
    the token's acceptance logit (0: the drafter knows exactly; only with early_stop)."""
    streaming_deadline: bool = False
    """Protocol switch: devices stream each drafted token; the server verifies every user's
    received prefix at a deadline it picks (see multispin_env.protocols)."""
    pipeline_groups: int = 1
    """Protocol switch: G >= 2 groups pipelined (one drafts and uploads while another is
    verified; SpecEdge). 1 = the synchronous round."""
    proactive_drafting: bool = True
    """With pipeline_groups >= 2: devices keep drafting while their draft is verified."""
    acceptance_position_factors: tuple[float, ...] = ()
    """Acceptance model of the synchronous round. Empty: i.i.d. (the paper's law, P(first j
    accepted) = alpha^j). Otherwise position-dependent: token i is accepted, given the ones
    before it were, with probability min(alpha c_i, 0.999), c_i the i-th factor (the last one
    repeats; c_1 = 1), so P(first j accepted) = prod_{i <= j} alpha c_i. Fitted from token
    traces of a live pair (``multispin record-traces``): greedy drafts agree in runs, so
    their conditional acceptance rises along the draft."""

    def __post_init__(self) -> None:
        def need(ok: bool, field_name: str, rule: str) -> None:
            if not ok:
                value = getattr(self, field_name)
                raise ValueError(f"ScenarioConfig.{field_name}={value!r}: {rule}")

        for f in dataclasses.fields(self):
            checked = check_type(f"ScenarioConfig.{f.name}", getattr(self, f.name), f.type)
            object.__setattr__(self, f.name, checked)
        need(
            1 <= self.num_users <= MAX_USERS, "num_users", f"must be an integer in [1, {MAX_USERS}]"
        )
        for name in (
            "bandwidth_hz",
            "noise_power_w",
            "tx_power_w",
            "t_draft_mean_s",
            "mean_gain_low",
            "mean_gain_high",
        ):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, name, "must be a finite number > 0")
        need(
            self.mean_gain_high >= self.mean_gain_low,
            "mean_gain_high",
            f"must be >= mean_gain_low={self.mean_gain_low}",
        )
        need(0.0 <= self.t_draft_spread < 1.0, "t_draft_spread", "must be in [0, 1)")
        need(
            1 <= self.max_draft_length <= 256,
            "max_draft_length",
            "must be an integer in [1, 256]",
        )
        need(
            self.vocab_size >= 2,
            "vocab_size",
            "must be an integer >= 2",
        )
        need(
            1 <= self.kept_vocab <= self.vocab_size,
            "kept_vocab",
            f"must be an integer in [1, vocab_size={self.vocab_size}]",
        )
        need(
            1 <= self.prob_bits <= 64,
            "prob_bits",
            "must be an integer in [1, 64]",
        )
        need(
            math.isfinite(self.server_t_draft_s) and self.server_t_draft_s >= 0,
            "server_t_draft_s",
            "must be a finite number >= 0 seconds",
        )
        need(
            math.isfinite(self.request_length_tokens)
            and (self.request_length_tokens == 0 or self.request_length_tokens >= 1),
            "request_length_tokens",
            "must be 0 (endless) or a finite number >= 1 token",
        )
        # upper bounds far beyond any real system, below where |h + e|^2 or the energy
        # sums overflow float64 (non-finite observations and bandwidth)
        need(
            math.isfinite(self.csi_error_std) and 0 <= self.csi_error_std <= 1e6,
            "csi_error_std",
            "must be a finite number in [0, 1e6]",
        )
        need(
            math.isfinite(self.draft_energy_j_per_token)
            and 0 <= self.draft_energy_j_per_token <= 1e6,
            "draft_energy_j_per_token",
            "must be a finite number in [0, 1e6] joules per token",
        )
        need(
            math.isfinite(self.token_logit_std) and 0 < self.token_logit_std <= 20,
            "token_logit_std",
            "must be a finite number in (0, 20] (logit units)",
        )
        need(
            math.isfinite(self.confidence_noise_std) and 0 <= self.confidence_noise_std <= 100,
            "confidence_noise_std",
            "must be a finite number in [0, 100] (logit units)",
        )
        need(
            1 <= self.pipeline_groups <= 8,
            "pipeline_groups",
            "must be an integer in [1, 8] (1 = synchronous round)",
        )
        need(
            not (self.streaming_deadline and self.pipeline_groups > 1),
            "streaming_deadline",
            "deadline verification and pipelined groups do not combine; switch one off "
            "(pipeline_groups=1 or streaming_deadline=false)",
        )
        factors = self.acceptance_position_factors
        need(
            all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                for c in factors
            )
            and all(0 < c <= 100 for c in factors)
            and (not factors or factors[0] == 1.0)
            and len(factors) <= 256,
            "acceptance_position_factors",
            "must be at most 256 finite numbers in (0, 100], the first one 1.0 (empty: i.i.d.)",
        )
        need(
            not (factors and self.extended_protocol),
            "acceptance_position_factors",
            "the position-dependent acceptance model is the synchronous round's; the extended "
            "protocols use i.i.d. or token-level acceptance (leave it empty there)",
        )
        need(len(self.tasks) >= 1, "tasks", "needs at least one task")
        need(
            all(isinstance(t, TaskSpec) for t in self.tasks),
            "tasks",
            "must be TaskSpec entries (use ScenarioConfig.from_dict for mappings)",
        )
        if self.per_request_acceptance:
            need(
                all(t.alpha_std > 0 for t in self.tasks),
                "tasks",
                "per_request_acceptance needs alpha_std > 0 for every task",
            )
        object.__setattr__(self, "_verification_model", build_verification(self.verification))

    # derived quantities ------------------------------------------------------------------
    @property
    def payload_bits(self) -> int:
        """Q_tok: uploaded bits per drafted token (Eq. 9)."""
        return payload_bits_per_token(self.kept_vocab, self.prob_bits, self.vocab_size)

    @property
    def extended_protocol(self) -> bool:
        """True when any protocol switch beyond the synchronous round is on."""
        return self.early_stop or self.streaming_deadline or self.pipeline_groups > 1

    @property
    def protocol_name(self) -> str:
        """``sync``, or the switches that are on joined by ``+`` (``early_stop+deadline``)."""
        parts = [
            name
            for name, on in (
                ("early_stop", self.early_stop),
                ("deadline", self.streaming_deadline),
                (f"groups{self.pipeline_groups}", self.pipeline_groups > 1),
            )
            if on
        ]
        return "+".join(parts) or "sync"

    @property
    def verification_model(self):
        return self._verification_model  # type: ignore[attr-defined]

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioConfig:
        """Build from a plain mapping (e.g. parsed YAML); unknown keys are an error.

        A float field may be given as a numeric string here: YAML 1.1 reads ``1e-10``
        (no dot) as a string. Overrides (``with_overrides``, ``load_preset(**overrides)``,
        env kwargs) are typed values and take no strings.
        """
        return cls._build(_yaml_numbers(data))

    @classmethod
    def _build(cls, data: dict[str, Any]) -> ScenarioConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        data.pop("provenance", None)
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"unknown ScenarioConfig field(s): {', '.join(hints)}; "
                f"valid fields are {sorted(known)}"
            )
        if "tasks" in data:
            tasks = check_type("ScenarioConfig.tasks", data["tasks"], "tuple")
            data["tasks"] = tuple(_task(i, t) for i, t in enumerate(tasks))
        return cls(**data)

    def with_overrides(self, **overrides: Any) -> ScenarioConfig:
        """A validated copy with some fields replaced (same errors as from_dict)."""
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(overrides)
        return ScenarioConfig._build(merged)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = [dataclasses.asdict(t) for t in self.tasks]
        return out


def preset_names() -> list[str]:
    """Names of the shipped presets (files in multispin_env/presets/)."""
    folder = resources.files("multispin_env") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset_document(name: str) -> dict[str, Any]:
    """The raw YAML mapping of a preset, provenance included."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; available presets: {names}")
    text = (resources.files("multispin_env") / "presets" / f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def load_preset(name: str, **overrides: Any) -> ScenarioConfig:
    """A shipped preset, with validated overrides applied on top."""
    doc = _yaml_numbers(load_preset_document(name))
    doc.update(overrides)
    return ScenarioConfig._build(doc)


_FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(ScenarioConfig) if f.type == "float")


def _yaml_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """Numeric strings of float fields as floats (YAML 1.1 reads ``1e-10`` as a string)."""
    data = dict(data)
    for key in _FLOAT_FIELDS:
        value = data.get(key)
        if isinstance(value, str):
            try:
                data[key] = float(value)
            except ValueError:
                pass  # left to the type check, which names the field
    return data


def _task(index: int, task: Any) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    fields = [f.name for f in dataclasses.fields(TaskSpec)]
    if not isinstance(task, dict) or not {"name", "alpha_mean"} <= set(task) <= set(fields):
        raise ValueError(
            f"ScenarioConfig.tasks[{index}]={task!r} must be a mapping with keys "
            f"name and alpha_mean (optional: alpha_std, weight)"
        )
    return TaskSpec(**task)
