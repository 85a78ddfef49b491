"""Batched-verification latency models behind one small interface.

``latency_s(draft_lengths)`` takes per-user draft lengths (``(..., K)``, 0 = user not in the
batch) and returns the latency of verifying the whole batch in one forward pass.
``latency_for_batch_s(num_users, max_draft_length)`` is the same model for solvers that
reason about a batch before the lengths are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from multispin_env._jit import kernel


class VerificationModel(Protocol):
    coefficients: tuple[float, float, float]

    def latency_s(self, draft_lengths: np.ndarray) -> np.ndarray: ...

    def latency_for_batch_s(self, num_users: int, max_draft_length: int) -> float: ...


@kernel
def padded_latency_s(batch, longest, t_fix_s, t_user_s, t_token_s):
    """t_fix + B t_user + t_token B (longest + 1) for a batch of B users (0 when B = 0)."""
    if batch <= 0:
        return 0.0
    return t_fix_s + batch * t_user_s + t_token_s * batch * (longest + 1)


@kernel
def padded_batch_latency_s(draft_lengths, t_fix_s, t_user_s, t_token_s, out) -> None:
    """out[n] = t_fix + B t_user + t_token B (max_k L + 1), B = users with L > 0 in row n,
    and 0 for an empty batch. Both models below are this law (affine: t_token = 0); the
    simulator's round kernel calls it too."""
    for n in range(draft_lengths.shape[0]):
        batch, longest = 0, 0
        for k in range(draft_lengths.shape[1]):
            length = draft_lengths[n, k]
            if length > 0:
                batch += 1
            longest = max(longest, length)
        out[n] = padded_latency_s(batch, longest, t_fix_s, t_user_s, t_token_s)


def _latency(draft_lengths, coefficients: tuple[float, float, float]) -> np.ndarray:
    lengths = np.asarray(draft_lengths)
    if not np.issubdtype(lengths.dtype, np.integer) and np.any(lengths != np.round(lengths)):
        raise ValueError("draft_lengths must be whole numbers of tokens")
    lead = lengths.shape[:-1]
    rows = np.ascontiguousarray(lengths.reshape(-1, lengths.shape[-1]), dtype=np.int64)
    out = np.empty(rows.shape[0])
    padded_batch_latency_s(rows, *coefficients, out)
    return out.reshape(lead) if lead else out[0]


def _check_nonnegative(name: str, value: float) -> None:
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"verification.{name}={value!r} must be a finite number >= 0 (seconds)")


@dataclass(frozen=True)
class AffineVerification:
    """The paper's Eq. (7): T^ver(K) = t_fix_s + K * t_lin_s, independent of draft length.

    Attributes:
        t_fix_s: fixed overhead of one batched verifier forward (kernel launches, weights read).
        t_lin_s: incremental latency per additional draft (user) in the batch.
    """

    t_fix_s: float
    t_lin_s: float

    def __post_init__(self) -> None:
        _check_nonnegative("t_fix_s", self.t_fix_s)
        _check_nonnegative("t_lin_s", self.t_lin_s)

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(t_fix_s, t_user_s, t_token_s) of the padded-batch law."""
        return (self.t_fix_s, self.t_lin_s, 0.0)

    def latency_s(self, draft_lengths: np.ndarray) -> np.ndarray:
        return _latency(draft_lengths, self.coefficients)

    def latency_for_batch_s(self, num_users: int, max_draft_length: int) -> float:
        return self.t_fix_s + num_users * self.t_lin_s if num_users > 0 else 0.0


@dataclass(frozen=True)
class TokenAwareVerification:
    """Padded-batch cost: T = t_fix_s + t_user_s * K + t_token_s * K * (L_max_in_batch + 1).

    Real verifiers process every row padded to the longest draft plus the one position that
    yields the bonus token, so cost grows with K * (max L + 1) (cf. Vidur's token-level
    operators; our CPU measurement in docs/live-notes.md fits t = 7.4 + 0.31 K +
    0.107 K (L+1) ms). The paper's model is the special case t_token_s = 0.

    Attributes:
        t_fix_s: fixed overhead per batched forward.
        t_user_s: per-row (per-user) overhead.
        t_token_s: cost per padded token position in the batch.
    """

    t_fix_s: float
    t_user_s: float
    t_token_s: float

    def __post_init__(self) -> None:
        _check_nonnegative("t_fix_s", self.t_fix_s)
        _check_nonnegative("t_user_s", self.t_user_s)
        _check_nonnegative("t_token_s", self.t_token_s)

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(t_fix_s, t_user_s, t_token_s) of the padded-batch law."""
        return (self.t_fix_s, self.t_user_s, self.t_token_s)

    def latency_s(self, draft_lengths: np.ndarray) -> np.ndarray:
        return _latency(draft_lengths, self.coefficients)

    def latency_for_batch_s(self, num_users: int, max_draft_length: int) -> float:
        if num_users <= 0:
            return 0.0
        return (
            self.t_fix_s
            + num_users * self.t_user_s
            + self.t_token_s * num_users * (max_draft_length + 1)
        )


def build_verification(spec: dict) -> AffineVerification | TokenAwareVerification:
    """Build a model from a config mapping ``{"kind": "affine"|"token_aware", ...}``."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(
            "verification must be a mapping with a 'kind' of 'affine' or 'token_aware'"
        )
    params = {k: v for k, v in spec.items() if k != "kind"}
    kinds = {"affine": AffineVerification, "token_aware": TokenAwareVerification}
    cls = kinds.get(spec["kind"])
    if cls is None:
        raise ValueError(f"verification.kind={spec['kind']!r}; choose one of {sorted(kinds)}")
    try:
        return cls(**{k: float(v) for k, v in params.items()})
    except TypeError as err:
        fields = list(cls.__dataclass_fields__)
        raise ValueError(
            f"verification of kind {spec['kind']!r} takes exactly {fields}; got {sorted(params)}"
        ) from err
