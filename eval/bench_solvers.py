"""Solver benchmark: decision latency at K users and optimality gap against brute force.

    OMP_NUM_THREADS=1 python -m multispin_eval.bench_solvers [--users 20] [--repeats 200]

Target (issue: system model): Hete-Multi-SPIN <= 5 ms for K = 20 on one core, within 0.5%
of the brute-force optimum on random small instances. The run also times a fixed reference
workload (``multispin_eval.machine_ref``) and prints each latency in reference ops, the
figure to compare across machines.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from multispin_agents.solvers import SOLVERS, brute_force_oracle, hete_multispin
from multispin_env.config import load_preset
from multispin_env.simulator import MultiSpinSimulator
from multispin_eval.machine_ref import measure


def _instances(preset: str, users: int, count: int, seed: int):
    cfg = load_preset(preset, num_users=users)
    sim = MultiSpinSimulator(cfg, num_envs=count)
    sim.reset(rng=np.random.default_rng(seed))
    t_ver = cfg.verification_model.latency_for_batch_s(users, cfg.max_draft_length)
    r = sim.spectral_eff_estimate
    return [
        dict(
            alpha=sim.alpha[i],
            t_draft_s=sim.t_draft_s[i],
            spectral_eff=r[i],
            payload_bits=cfg.payload_bits,
            bandwidth_hz=cfg.bandwidth_hz,
            t_ver_s=t_ver,
            max_draft_length=cfg.max_draft_length,
        )
        for i in range(count)
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper-llama2")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--gap-instances", type=int, default=100)
    args = parser.parse_args(argv)

    instances = _instances(args.preset, args.users, args.repeats, seed=0)
    ref_before = measure()
    print(f"decision latency, K={args.users}, {args.repeats} instances ({args.preset}), one thread")
    print(f"{'solver':<22}{'median ms':>10}{'p95 ms':>10}{'mean goodput':>14}")
    variants = dict(SOLVERS)
    variants["hete (no polish)"] = lambda **kw: hete_multispin(**kw, polish=False)
    medians = {}
    for name, solver in variants.items():
        times, goodputs = [], []
        for inst in instances:
            t0 = time.perf_counter()
            alloc = solver(**inst)
            times.append(time.perf_counter() - t0)
            goodputs.append(alloc.goodput_tokens_per_s)
        ms = np.array(times) * 1e3
        medians[name] = float(np.median(ms))
        print(
            f"{name:<22}{np.median(ms):>10.3f}{np.percentile(ms, 95):>10.3f}"
            f"{np.mean(goodputs):>14.2f}"
        )
    ref = ref_before.averaged_with(measure())
    print(f"hete median / 5 ms target = {medians['hete'] / 5.0:.2f}")
    print(ref.describe())
    print(
        "median latency in ref ops (latency x ref ops/s): "
        + ", ".join(f"{n} {ref.latency_ratio(ms * 1e-3):.3f}" for n, ms in medians.items())
    )

    print(
        f"\noptimality vs brute force on {args.gap_instances} random small instances "
        "(K=3, L_max=12 and K=4, L_max=8)"
    )
    rng = np.random.default_rng(1)
    ratios = {"hete": [], "hete (no polish)": []}
    for trial in range(args.gap_instances):
        k, l_max = (3, 12) if trial % 2 else (4, 8)
        inst = dict(
            alpha=rng.uniform(0.5, 0.97, k),
            t_draft_s=rng.uniform(0.005, 0.05, k),
            spectral_eff=rng.uniform(0.3, 10.0, k),
            payload_bits=31744.0,
            bandwidth_hz=float(rng.uniform(0.5e6, 20e6)),
            t_ver_s=float(rng.uniform(0.02, 0.5)),
            max_draft_length=l_max,
        )
        best = brute_force_oracle(**inst).goodput_tokens_per_s
        ratios["hete"].append(hete_multispin(**inst).goodput_tokens_per_s / best)
        ratios["hete (no polish)"].append(
            hete_multispin(**inst, polish=False).goodput_tokens_per_s / best
        )
    for name, vals in ratios.items():
        vals = np.array(vals)
        print(
            f"{name:<22} worst {vals.min():.5f}  mean {vals.mean():.5f}  "
            f"exact in {np.mean(vals > 1 - 1e-9) * 100:.0f}% of instances"
        )


if __name__ == "__main__":
    main()
