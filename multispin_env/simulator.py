"""One synchronous Multi-SPIN round, vectorised over N independent deployments.

The simulator is RL-agnostic: it knows users, channels, drafting, uploading, batched
verification and acceptance, and nothing about observations or rewards. State lives in
``(N, K)`` numpy arrays (N deployments x K users); N = 1 is one deployment.

Round t, for every deployment (paper §III-A):
  1. the server sees each user's channel estimate for round t (``gain_estimate``);
  2. a policy picks (L_k, B_k) -> :meth:`MultiSpinSimulator.step`;
  3. users draft (L_k T^S_k) and upload (L_k Q_tok / (B_k r_k)) with the *true* channel;
  4. the server waits for the straggler, verifies the batch (verification model);
  5. user k keeps min(Geom, L_k) accepted tokens + 1 corrected/bonus token;
  6. finished requests are replaced, fading and CSI for round t+1 are drawn.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaincinv

from multispin_env import rng as crng
from multispin_env.config import ScenarioConfig
from multispin_env.physics import spectral_efficiency
from multispin_env.types import RoundResult

_EPISODE_COUNTER = np.uint64(1 << 40)  # counter slot for per-episode draws, above any round
_ALPHA_CLIP = (1e-3, 1.0 - 1e-6)
_ROUND_STREAMS = np.array(
    [
        crng.STREAM_FADING_MAG,
        crng.STREAM_FADING_PHASE,
        crng.STREAM_ACCEPT,
        crng.STREAM_CSI_MAG,
        crng.STREAM_CSI_PHASE,
        crng.STREAM_REQUEST_LEN,
        crng.STREAM_REQUEST_ALPHA,
        crng.STREAM_REQUEST_TASK,
    ]
)


class MultiSpinSimulator:
    """Vectorised Multi-SPIN system model.

    Args:
        config: a validated :class:`ScenarioConfig`.
        num_envs: number of independent deployments N simulated side by side.

    Public state after :meth:`reset` (all ``(N, K)`` unless noted):
        mean_gain: H_bar_k. t_draft_s: T^S_k. task: task index per user.
        alpha: the current request's true acceptance rate (hidden from a realistic policy).
        task_alpha_mean: the offline task-mean estimate a server could know.
        gain, gain_estimate: true channel gain of the coming round and the server's estimate.
        spectral_eff, spectral_eff_estimate: the matching r_k = log2(1 + p H / N0).
        remaining_tokens: tokens left in each user's request (inf for endless requests).
        round_index: ``(N,)`` rounds played since reset.
    """

    def __init__(self, config: ScenarioConfig, num_envs: int = 1) -> None:
        if not isinstance(config, ScenarioConfig):
            raise TypeError(f"config must be a ScenarioConfig, got {type(config).__name__}")
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} must be an integer >= 1")
        self.config = config
        self.num_envs = int(num_envs)
        self.num_users = config.num_users
        self.payload_bits = float(config.payload_bits)
        self.verification = config.verification_model
        tasks = config.tasks
        self._task_alpha = np.array([t.alpha_mean for t in tasks])
        weights = np.array([t.weight for t in tasks], dtype=np.float64)
        self._task_cdf = np.cumsum(weights / weights.sum())
        self._task_cdf[-1] = 1.0
        if config.per_request_acceptance:
            ab = np.array([t.beta_params for t in tasks])
            self._task_beta_a, self._task_beta_b = ab[:, 0], ab[:, 1]
        shape = (self.num_envs, self.num_users)
        self.keys = np.zeros(self.num_envs, dtype=np.uint64)
        self.round_index = np.zeros(self.num_envs, dtype=np.int64)
        self.mean_gain = np.zeros(shape)
        self.t_draft_s = np.zeros(shape)
        self.task = np.zeros(shape, dtype=np.int64)
        self.alpha = np.zeros(shape)
        self._log_alpha = np.zeros(shape)
        self._finite_requests = config.request_length_tokens > 0
        self.task_alpha_mean = np.zeros(shape)
        self.gain = np.zeros(shape)
        self.gain_estimate = np.zeros(shape)
        self.spectral_eff = np.zeros(shape)
        self.spectral_eff_estimate = np.zeros(shape)
        self.remaining_tokens = np.full(shape, np.inf)
        round_streams = (crng.STREAM_ACCEPT, crng.STREAM_FADING_MAG)
        if config.csi_error_std > 0:
            round_streams += (crng.STREAM_FADING_PHASE, crng.STREAM_CSI_MAG, crng.STREAM_CSI_PHASE)
        self._round_uniforms = crng.RoundUniforms(self.num_envs, self.num_users, round_streams)
        self._has_reset = False

    # ------------------------------------------------------------------ reset
    def reset(
        self,
        keys: np.ndarray | None = None,
        *,
        rng: np.random.Generator | None = None,
        env_ids: np.ndarray | None = None,
    ) -> None:
        """Draw a new realization (devices, tasks, first channel) for some or all envs.

        Give either ``keys`` (uint64, one per reset env) or ``rng`` (keys are drawn from it).
        ``env_ids`` selects which envs to reset (default: all).
        """
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64)
        if keys is None:
            if rng is None:
                raise ValueError("reset needs keys or a numpy.random.Generator (rng=...)")
            keys = crng.new_keys(rng, len(ids))
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        if keys.shape != ids.shape:
            raise ValueError(f"reset got {keys.size} keys for {ids.size} environments")
        cfg, k = self.config, self.num_users
        self.keys[ids] = keys
        self.round_index[ids] = 0
        self._round_uniforms.rekey(keys, ids)
        epi = np.full(len(ids), _EPISODE_COUNTER, dtype=np.uint64)
        u_gain = crng.uniforms(keys, epi, 0, k)
        u_draft = crng.uniforms(keys, epi, 1, k)
        self.mean_gain[ids] = cfg.mean_gain_low + (cfg.mean_gain_high - cfg.mean_gain_low) * u_gain
        self.t_draft_s[ids] = cfg.t_draft_mean_s * (
            1.0 - cfg.t_draft_spread + 2.0 * cfg.t_draft_spread * u_draft
        )
        all_users = np.ones((len(ids), k), dtype=bool)
        self._start_requests(ids, epi, all_users)
        self._draw_channels(ids)
        self._has_reset = True

    def _start_requests(self, ids: np.ndarray, counters: np.ndarray, mask: np.ndarray) -> None:
        """New requests for users in ``mask`` (rows = ``ids``): task, alpha, length."""
        cfg, k = self.config, self.num_users
        if not mask.any():
            return
        u_task = crng.uniforms(self.keys[ids], counters, crng.STREAM_REQUEST_TASK, k)
        task = np.searchsorted(self._task_cdf, u_task, side="right").clip(
            0, len(self._task_cdf) - 1
        )
        alpha_mean = self._task_alpha[task]
        if cfg.per_request_acceptance:
            u_alpha = crng.uniforms(self.keys[ids], counters, crng.STREAM_REQUEST_ALPHA, k)
            alpha = betaincinv(self._task_beta_a[task], self._task_beta_b[task], u_alpha)
            alpha = np.clip(alpha, *_ALPHA_CLIP)
        else:
            alpha = alpha_mean
        if cfg.request_length_tokens > 0:
            u_len = crng.uniforms(self.keys[ids], counters, crng.STREAM_REQUEST_LEN, k)
            length = _geometric_length(u_len, cfg.request_length_tokens)
        else:
            length = np.full((len(ids), k), np.inf)
        rows = ids[:, None]
        cols = np.broadcast_to(np.arange(k), mask.shape)
        sel_r, sel_c = np.broadcast_to(rows, mask.shape)[mask], cols[mask]
        self.task[sel_r, sel_c] = task[mask]
        self.task_alpha_mean[sel_r, sel_c] = alpha_mean[mask]
        self.alpha[sel_r, sel_c] = alpha[mask]
        self._log_alpha[sel_r, sel_c] = np.log(alpha[mask])
        self.remaining_tokens[sel_r, sel_c] = length[mask]

    def _draw_channels(self, ids: np.ndarray | None = None) -> None:
        """True gain and server estimate for the coming round of envs ``ids`` (None = all)."""
        cfg = self.config
        sel = slice(None) if ids is None else ids  # a slice avoids fancy-indexing copies
        counters = self.round_index[sel]
        draw = self._round_uniforms.get
        mean_gain = self.mean_gain[sel]
        if cfg.rayleigh_fading:
            power = -np.log(draw(crng.STREAM_FADING_MAG, counters, ids))  # |h|^2/H_bar ~ Exp(1)
        else:
            power = np.ones_like(mean_gain)
        gain = mean_gain * power
        if cfg.csi_error_std > 0:
            u_phase = draw(crng.STREAM_FADING_PHASE, counters, ids)
            u_emag = draw(crng.STREAM_CSI_MAG, counters, ids)
            u_ephase = draw(crng.STREAM_CSI_PHASE, counters, ids)
            h = np.sqrt(gain) * np.exp(2j * np.pi * u_phase)
            e = (
                cfg.csi_error_std
                * np.sqrt(-mean_gain * np.log(u_emag))
                * np.exp(2j * np.pi * u_ephase)
            )
            estimate = np.abs(h + e) ** 2
        else:
            estimate = gain
        self.gain[sel] = gain
        self.gain_estimate[sel] = estimate
        # cached: the policy, the observation and the round all read them every step
        p, n0 = cfg.tx_power_w, cfg.noise_power_w
        r = spectral_efficiency(p, gain, n0)
        self.spectral_eff[sel] = r
        self.spectral_eff_estimate[sel] = (
            r if estimate is gain else spectral_efficiency(p, estimate, n0)
        )

    # ------------------------------------------------------------------ step
    def validate_allocation(self, draft_lengths: np.ndarray, bandwidth_hz: np.ndarray) -> None:
        """Raise ValueError naming the problem if an allocation is infeasible."""
        shape = (self.num_envs, self.num_users)
        if draft_lengths.shape != shape or bandwidth_hz.shape != shape:
            raise ValueError(
                f"allocation arrays must have shape (num_envs, num_users)={shape}; got "
                f"draft_lengths {draft_lengths.shape}, bandwidth_hz {bandwidth_hz.shape}"
            )
        l_max = self.config.max_draft_length
        if draft_lengths.min() < 0 or draft_lengths.max() > l_max:
            raise ValueError(f"draft_lengths must be integers in [0, max_draft_length={l_max}]")
        if not np.all(np.isfinite(bandwidth_hz)) or bandwidth_hz.min() < 0:
            raise ValueError("bandwidth_hz must be finite and >= 0")
        total = bandwidth_hz.sum(axis=-1)
        if np.any(total > self.config.bandwidth_hz * (1 + 1e-6)):
            worst = float(total.max())
            raise ValueError(
                f"bandwidth_hz sums to {worst:.6g} Hz, above the budget "
                f"bandwidth_hz={self.config.bandwidth_hz:.6g} Hz"
            )
        if np.any((draft_lengths > 0) & (bandwidth_hz <= 0)):
            raise ValueError("a user with draft length > 0 needs bandwidth_hz > 0 to upload")
        if np.any((draft_lengths > 0).sum(axis=-1) == 0):
            raise ValueError("every environment needs at least one user with draft length >= 1")

    def step(self, draft_lengths, bandwidth_hz, validate: bool = True) -> RoundResult:
        """Play one round in every env. Arrays are ``(N, K)`` (or ``(K,)`` when N = 1)."""
        if not self._has_reset:
            raise RuntimeError("call reset() before step()")
        n, k = self.num_envs, self.num_users
        lengths = np.asarray(draft_lengths)
        bw = np.asarray(bandwidth_hz, dtype=np.float64)
        if lengths.ndim == 1 and n == 1:
            lengths, bw = lengths[None, :], bw[None, :]
        if not np.issubdtype(lengths.dtype, np.integer):
            rounded = np.round(lengths)
            if np.any(rounded != lengths):
                raise ValueError("draft_lengths must be whole numbers of tokens")
            lengths = rounded.astype(np.int64)
        if validate:
            self.validate_allocation(lengths, bw)
        cfg = self.config
        active = lengths > 0
        lf = lengths.astype(np.float64)

        t_draft = lf * self.t_draft_s
        # idle users have L = 0 and so no upload time; validated active users have B_k > 0
        t_upload = lf * (self.payload_bits / np.maximum(bw * self.spectral_eff, 1e-300))
        finish = t_draft + t_upload
        t_ma = finish.max(axis=-1)
        straggler = finish.argmax(axis=-1)
        t_ver = self.verification.latency_s(lengths)
        round_time = t_ma + t_ver

        u_acc = self._round_uniforms.get(crng.STREAM_ACCEPT, self.round_index)
        # P(accepted >= j) = alpha^j: a truncated geometric via inverse CDF.
        accepted = np.minimum(np.floor(np.log(u_acc) / self._log_alpha), lf).astype(np.int64)
        committed = accepted + active
        # Eq. (12); alpha < 1 always (task means are validated, Beta draws clipped)
        exp_tokens = active * (1.0 - self.alpha ** (lf + 1.0)) / (1.0 - self.alpha)

        if self._finite_requests:
            committed = np.minimum(committed, self.remaining_tokens).astype(np.int64)
            self.remaining_tokens = self.remaining_tokens - committed
            done = self.remaining_tokens <= 0
        else:
            done = np.zeros((n, k), dtype=bool)

        energy = lf * cfg.draft_energy_j_per_token + cfg.tx_power_w * t_upload
        result = RoundResult(
            drafted=lengths,
            accepted=accepted,
            committed=committed,
            expected_tokens=exp_tokens,
            t_draft_s=t_draft,
            t_upload_s=t_upload,
            t_verify_s=t_ver,
            round_time_s=round_time,
            straggler=straggler,
            energy_j=energy,
            request_done=done,
        )
        self.round_index += 1
        if done.any():
            rows = np.flatnonzero(done.any(axis=-1))
            self._start_requests(rows, self.round_index[rows].astype(np.uint64), done[rows])
        self._draw_channels()
        return result


def _geometric_length(u: np.ndarray, mean_tokens: float) -> np.ndarray:
    """Request length >= 1 with the given mean (geometric on {1, 2, ...})."""
    if mean_tokens <= 1.0:
        return np.ones_like(u)
    p_stop = 1.0 / mean_tokens
    return 1.0 + np.floor(np.log(u) / np.log1p(-p_stop))
