"""The two types every layer speaks: an :class:`Allocation` in, a :class:`RoundResult` out.

Arrays are over users, with an optional leading batch axis (``(K,)`` for one instance,
``(N, K)`` for N environments stepped together). Users that are not active in a round have
draft length 0 and bandwidth 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """One round's decision for every user.

    Attributes:
        draft_lengths: integer draft length L_k per user (0 = user idle this round).
        bandwidth_hz: uplink bandwidth B_k per user in Hz (FDMA share of the total).
        goodput_tokens_per_s: the goodput the policy's own model predicts for this decision
            (Eq. 13 of the paper), or NaN if the policy makes no prediction.
    """

    draft_lengths: np.ndarray
    bandwidth_hz: np.ndarray
    goodput_tokens_per_s: float = float("nan")

    def __post_init__(self) -> None:
        lengths = np.asarray(self.draft_lengths)
        bandwidth = np.asarray(self.bandwidth_hz, dtype=np.float64)
        if lengths.shape != bandwidth.shape:
            raise ValueError(
                f"Allocation.draft_lengths has shape {lengths.shape} but bandwidth_hz has "
                f"shape {bandwidth.shape}; give one entry per user in both"
            )
        if not np.issubdtype(lengths.dtype, np.integer):
            if not np.all(np.isfinite(lengths)) or np.any(lengths != np.round(lengths)):
                raise ValueError("Allocation.draft_lengths must be whole numbers of tokens")
            lengths = lengths.astype(np.int64)
        object.__setattr__(self, "draft_lengths", lengths.astype(np.int64, copy=False))
        object.__setattr__(self, "bandwidth_hz", bandwidth)


@dataclass(frozen=True)
class Decision:
    """A round's decision under any protocol: the allocation plus the extended protocols'
    levers (None where the protocol does not have them; see multispin_env.protocols).

    Attributes:
        draft_lengths: ``(N, K)`` draft lengths (caps under early stop or a deadline).
        bandwidth_hz: ``(N, K)`` bandwidth in Hz (summing to B per pipeline group).
        stop_threshold: ``(N, K)`` early-stop confidence thresholds in [0, 1).
        deadline_s: ``(N,)`` verification deadlines in seconds after the round starts.
        group: ``(N, K)`` pipeline group of each user.
    """

    draft_lengths: np.ndarray
    bandwidth_hz: np.ndarray
    stop_threshold: np.ndarray | None = None
    deadline_s: np.ndarray | None = None
    group: np.ndarray | None = None

    def levers(self) -> dict:
        """The extended-protocol keyword arguments of ``MultiSpinSimulator.step``."""
        return {
            "stop_threshold": self.stop_threshold,
            "deadline_s": self.deadline_s,
            "group": self.group,
        }


@dataclass(frozen=True)
class RoundResult:
    """What happened in one synchronous round (draft -> upload -> wait -> verify -> accept).

    Per-user arrays have shape ``(..., K)``; per-round arrays have shape ``(...)``.

    Attributes:
        drafted: tokens drafted by each user (= its draft length).
        accepted: drafted tokens the verifier accepted (the accepted prefix, without the
            corrected/bonus token).
        committed: tokens appended to each user's output this round: accepted + 1
            (corrected or bonus token), truncated at the end of the user's request.
        expected_tokens: E[N_k | L_k] of Eq. (12) under the user's true acceptance rate.
        t_draft_s: drafting time L_k * T^S_k.
        t_upload_s: upload time L_k * Q_tok / (B_k r_k).
        t_verify_s: batched verification latency of the round.
        round_time_s: max_k (t_draft + t_upload) + t_verify.
        straggler: index of the user whose draft+upload finished last (-1 if none active).
        energy_j: device energy spent this round (drafting + transmission).
        request_done: True where the user's request finished this round.
        verified: tokens verified per user (None: all drafted, the synchronous round).
        wasted: drafted tokens not committed (None: drafted - accepted).
    """

    drafted: np.ndarray
    accepted: np.ndarray
    committed: np.ndarray
    expected_tokens: np.ndarray
    t_draft_s: np.ndarray
    t_upload_s: np.ndarray
    t_verify_s: np.ndarray
    round_time_s: np.ndarray
    straggler: np.ndarray
    energy_j: np.ndarray
    request_done: np.ndarray
    verified: np.ndarray | None = None
    wasted: np.ndarray | None = None

    @property
    def verified_tokens(self) -> np.ndarray:
        """Drafted tokens the server verified (all of them in the synchronous round; the
        received prefix under deadline verification)."""
        return self.drafted if self.verified is None else self.verified

    @property
    def wasted_tokens(self) -> np.ndarray:
        """Drafted tokens that were not committed: rejected, never verified, or drafted
        proactively on a wrong guess."""
        return self.drafted - self.accepted if self.wasted is None else self.wasted

    @property
    def goodput_tokens_per_s(self) -> np.ndarray:
        """Realised sum goodput of the round: committed tokens / round time."""
        return self.committed.sum(axis=-1) / self.round_time_s

    @property
    def expected_goodput_tokens_per_s(self) -> np.ndarray:
        """Model goodput of the round, Eq. (13): sum of E[N_k|L_k] / round time."""
        return self.expected_tokens.sum(axis=-1) / self.round_time_s
