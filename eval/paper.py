"""Scheme goodputs on the paper's setting, averaged over channel/compute realizations.

A *realization* is one draw of device speeds T^S_k, average gains H_bar_k, each user's task
(hence alpha_k) and, per round, Rayleigh fading. For each realization and round every
scheme solves its allocation with the true parameters (the paper assumes known CSI and
offline acceptance rates) and is scored two ways:

- ``model``: the goodput its allocation achieves under Eq. (13) (expected tokens / time);
- ``simulated``: committed tokens / elapsed time when the simulator plays those rounds with
  sampled acceptances (long-run goodput, what a deployment would measure).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multispin_agents.solvers import SOLVERS, cen_spin, evaluate_goodput, p2p_spin
from multispin_env.config import ScenarioConfig
from multispin_env.simulator import MultiSpinSimulator
from multispin_eval.stats import ci95_halfwidth

SCHEMES = ("fixed", "uni_bw", "homo", "hete")


@dataclass
class SchemeStats:
    model_mean: float
    model_ci95: float
    simulated_mean: float
    simulated_ci95: float


def _ci95(values: np.ndarray) -> float:
    return ci95_halfwidth(values)


def evaluate_schemes(
    cfg: ScenarioConfig,
    realizations: int = 50,
    rounds: int = 4,
    seed: int = 0,
    schemes=SCHEMES,
    protocols: bool = False,
) -> dict[str, SchemeStats]:
    """Average goodput of each scheme over ``realizations`` x ``rounds`` channel draws.

    All schemes see the same realizations and the same acceptance draws (common random
    numbers), so differences between schemes are not sampling noise.
    """
    k, l_max = cfg.num_users, cfg.max_draft_length
    t_ver = cfg.verification_model.latency_for_batch_s(k, l_max)
    t_ver_one = cfg.verification_model.latency_for_batch_s(1, l_max)
    names = list(schemes) + (["p2p", "cen"] if protocols else [])
    model = {s: np.zeros(realizations) for s in names}
    simulated = {s: np.zeros(realizations) for s in names}
    keys = np.random.default_rng(seed).integers(0, 2**62, size=realizations).astype(np.uint64)
    sims = {s: MultiSpinSimulator(cfg, num_envs=realizations) for s in schemes}
    for sim in sims.values():
        sim.reset(keys)
    tokens = {s: np.zeros(realizations) for s in schemes}
    elapsed = {s: np.zeros(realizations) for s in schemes}
    for _ in range(rounds):
        for s in schemes:
            sim = sims[s]
            r_est = sim.spectral_eff_estimate
            lengths = np.zeros((realizations, k), dtype=np.int64)
            bandwidth = np.zeros((realizations, k))
            for i in range(realizations):
                alloc = SOLVERS[s](
                    sim.alpha[i],
                    sim.t_draft_s[i],
                    r_est[i],
                    cfg.payload_bits,
                    cfg.bandwidth_hz,
                    t_ver,
                    l_max,
                )
                lengths[i], bandwidth[i] = alloc.draft_lengths, alloc.bandwidth_hz
                model[s][i] += (
                    evaluate_goodput(
                        sim.alpha[i],
                        sim.t_draft_s[i],
                        sim.spectral_eff[i],
                        cfg.payload_bits,
                        alloc.draft_lengths,
                        alloc.bandwidth_hz,
                        t_ver,
                    )
                    / rounds
                )
            if protocols and s == schemes[0]:
                for i in range(realizations):
                    model["p2p"][i] += (
                        p2p_spin(
                            sim.alpha[i],
                            sim.t_draft_s[i],
                            sim.spectral_eff[i],
                            cfg.payload_bits,
                            cfg.bandwidth_hz,
                            t_ver_one,
                            l_max,
                        )[0]
                        / rounds
                    )
                    model["cen"][i] += (
                        cen_spin(sim.alpha[i], cfg.server_t_draft_s, t_ver_one, l_max)[0] / rounds
                    )
            result = sim.step(lengths, bandwidth)
            tokens[s] += result.committed.sum(axis=-1)
            elapsed[s] += result.round_time_s
    for s in schemes:
        simulated[s] = tokens[s] / elapsed[s]
    if protocols:  # no uplink / batching subtleties: the model value is the protocol's goodput
        simulated["p2p"], simulated["cen"] = model["p2p"], model["cen"]
    return {
        s: SchemeStats(
            float(model[s].mean()), _ci95(model[s]), float(simulated[s].mean()), _ci95(simulated[s])
        )
        for s in names
    }
