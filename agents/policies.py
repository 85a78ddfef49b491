"""Deployable controllers: the paper's solvers run on what a server knows, every round.

A policy maps a :class:`~multispin_env.episodes.ServerView` (arrays ``(N, K)`` over N
deployments) to an allocation ``(lengths, bandwidth_hz)``. The solvers assume a verification
latency that does not depend on draft length; under a token-aware verifier the policy runs
a short fixed point: solve with T^ver(K, L), re-evaluate T^ver at the longest chosen draft,
re-solve (``verification_iterations`` times), and keep the decision the verification model
scores best.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from multispin_agents.solvers import SOLVERS, evaluate_goodput

ALPHA_SOURCES = ("prior", "history", "oracle")


@dataclass
class SolverPolicy:
    """One of the paper's schemes as a per-round controller.

    Attributes:
        scheme: "fixed", "uni_bw", "homo" or "hete".
        alpha_source: "prior" (offline task means: what the paper assumes), "history"
            (the server's EWMA estimate), or "oracle" (the hidden true rate; an upper bound,
            not deployable).
        oracle_csi: use the true channel instead of the server's estimate (oracle only).
        verification_iterations: fixed-point rounds for token-aware verification.
        fast: Hete on a 12 x 12 grid without the integer polish: ~8x cheaper, within ~0.1%
            of the full solver's model goodput (for controllers called every env step).
    """

    scheme: str = "hete"
    alpha_source: str = "prior"
    oracle_csi: bool = False
    verification_iterations: int = 2
    fast: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SOLVERS:
            raise ValueError(f"scheme={self.scheme!r}; choose one of {sorted(SOLVERS)}")
        if self.alpha_source not in ALPHA_SOURCES:
            raise ValueError(f"alpha_source={self.alpha_source!r}; choose one of {ALPHA_SOURCES}")

    @property
    def name(self) -> str:
        suffix = "" if self.alpha_source == "prior" else f"[{self.alpha_source}]"
        if self.oracle_csi:
            suffix = f"[{self.alpha_source},csi]"
        return f"{self.scheme}{suffix}"

    def act(self, view, group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, bandwidth_hz) ``(N, K)`` for every env of ``view``.

        ``group`` ``(N, K)`` (pipelined groups): each group is solved on its own, as a
        batch of its users with the whole band (the groups upload in turn)."""
        if (self.alpha_source == "oracle" and view.oracle_alpha is None) or (
            self.oracle_csi and view.oracle_spectral_eff is None
        ):
            raise ValueError(
                f"{self.name} needs the hidden truth, which this view does not "
                "have (live systems cannot know it); use alpha_source='history'"
            )
        alpha = {"prior": view.alpha_prior, "history": view.alpha_hat, "oracle": view.oracle_alpha}[
            self.alpha_source
        ]
        alpha = np.clip(alpha, 1e-3, 1 - 1e-6)
        r = view.oracle_spectral_eff if self.oracle_csi else view.spectral_eff_est
        n, k = r.shape
        lengths = np.zeros((n, k), dtype=np.int64)
        bandwidth = np.zeros((n, k))
        solver = SOLVERS[self.scheme]
        if self.fast and self.scheme == "hete":
            solver = functools.partial(solver, grid_phi=12, grid_lambda=12, polish=False)
        l_max, q, b = view.max_draft_length, view.payload_bits, view.bandwidth_hz
        # a verifier whose cost does not depend on L needs no fixed point: one solve is exact
        coefficients = getattr(view.verification, "coefficients", None)
        token_aware = coefficients is None or coefficients[2] != 0
        iterations = max(1, self.verification_iterations) if token_aware else 1
        for i in range(n):
            users = [slice(None)] if group is None else [group[i] == g for g in np.unique(group[i])]
            for sel in users:
                a_i, t_i, r_i = alpha[i][sel], view.t_draft_s[i][sel], r[i][sel]
                members = len(a_i)
                best, best_val, guess = None, -np.inf, 4
                for _ in range(iterations):
                    t_ver = view.verification.latency_for_batch_s(members, guess)
                    alloc = solver(a_i, t_i, r_i, q, b, t_ver, l_max)
                    longest = int(alloc.draft_lengths.max())
                    true_t_ver = view.verification.latency_for_batch_s(members, longest)
                    val = evaluate_goodput(
                        a_i, t_i, r_i, q, alloc.draft_lengths, alloc.bandwidth_hz, true_t_ver
                    )
                    if val > best_val:
                        best, best_val = alloc, val
                    if longest == guess:
                        break
                    guess = longest
                lengths[i][sel], bandwidth[i][sel] = best.draft_lengths, best.bandwidth_hz
        return lengths, bandwidth
