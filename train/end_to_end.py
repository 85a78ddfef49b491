"""Train in the calibrated simulator, export, deploy live: learned vs tuned vs Hete vs Fixed.

    multispin end-to-end                       # ~10 minutes on 2 cores
    multispin end-to-end --timesteps 30000 --rounds 20    # the short version in `multispin demo`

1. tunes the heuristic family on ``multispin/DemoPairCPU-v0`` (the scenario ``multispin
   calibrate`` measured from the built-in live pair) for the run's number of users;
2. trains PPO (per-user policy, ``residual`` actions over that tuned heuristic);
3. exports the best model as an ONNX bundle;
4. runs the live system (edge server + device processes, real models, sampling) with the
   learned bundle, the tuned heuristic, Hete-Multi-SPIN and Fixed BW&L on the same prompts,
   devices and seed;
5. predicts each policy's goodput in the calibrated simulator and reports the gap.

Writes ``results/end_to_end/{table.md,summary.json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

ENV_ID = "multispin/DemoPairCPU-v0"


def live_goodput(scheduler: str, users: int, rounds: int, seed: int, trace: str) -> dict:
    from multispin_env.live.cli import live_args, run_live

    args = live_args(
        users=users,
        scheduler=scheduler,
        rounds=rounds,
        scenario="demo-pair-cpu",
        round_timeout_s=30.0,
        seed=seed,
        trace=trace,
    )
    return asyncio.run(run_live(args))


def simulated_goodput(controller, seeds: list[int], users: int) -> float:
    from multispin_eval.harness import run_episodes

    metrics = run_episodes(
        controller, ENV_ID, seeds, env_kwargs={"num_users": users, "max_users": 8}
    )
    return float(metrics.goodput.mean())


def main(argv=None) -> dict:
    from multispin_agents.policies import SolverPolicy
    from multispin_agents.tuned import TunedHeuristic
    from multispin_eval.harness import BundleController, SolverController
    from multispin_train.export import export_run
    from multispin_train.train import TrainConfig, train
    from multispin_train.tune import tune

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(prog="multispin end-to-end", description=__doc__.split("\n")[0])
    p.add_argument(
        "--timesteps", type=int, default=100_000, help="training env steps (residual actions)"
    )
    p.add_argument(
        "--tune-trials", type=int, default=24, help="candidates when tuning the heuristic"
    )
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="runs/end_to_end")
    p.add_argument("--out", default="results/end_to_end")
    p.add_argument("--quiet", action="store_true", help="no training progress bar")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    scenario_kwargs = {"num_users": a.users, "max_users": 8}
    tuned = TunedHeuristic(**tune(
        ENV_ID, trials=a.tune_trials, num_seeds=4, env_kwargs=scenario_kwargs,
        progress=not a.quiet,
    )["best"])  # fmt: skip
    train(
        TrainConfig(
            env_id=ENV_ID,
            timesteps=a.timesteps,
            seed=a.seed,
            env_kwargs={"action_mode": "residual", "base_policy": tuned.name},
            run_dir=a.run_dir,
            eval_freq=max(a.timesteps // 5, 2000),
            eval_episodes=8,
            checkpoint_freq=0,
            name="learned",
            progress_bar=not a.quiet,
        )
    )
    best = Path(a.run_dir) / "best_model.zip"
    model_file = best.name if best.is_file() else "model.zip"
    bundle = export_run(a.run_dir, Path(a.run_dir) / "bundle", model_file)
    policies = {
        "learned (PPO, exported)": (f"bundle:{bundle}", BundleController(bundle)),
        "tuned heuristic": (tuned.name, SolverController(tuned)),
        "Hete-Multi-SPIN": ("hete", SolverController(SolverPolicy("hete", "history"))),
        "Fixed BW&L": ("fixed", SolverController(SolverPolicy("fixed"))),
    }
    sim_seeds = list(range(3_000_000, 3_000_016))
    rows = []
    for label, (scheduler, controller) in policies.items():
        live = live_goodput(
            scheduler,
            a.users,
            a.rounds,
            a.seed,
            str(out / f"trace_{scheduler.split(':')[0].split('[')[0]}.jsonl"),
        )
        predicted = simulated_goodput(controller, sim_seeds, a.users)
        measured = live["goodput_timeline_tokens_per_s"]
        rows.append(
            {
                "policy": label,
                "live_tokens_per_s": measured,
                "live_wall_tokens_per_s": live["goodput_wall_tokens_per_s"],
                "sim_tokens_per_s": predicted,
                "sim_gap": predicted / measured - 1.0,
                "live_accept_frac": live["accept_frac"],
            }
        )
    table = [
        "| policy | live tok/s (timeline) | live tok/s (wall) | simulator tok/s | "
        "sim vs live | live accept |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['policy']} | {r['live_tokens_per_s']:.1f} | "
        f"{r['live_wall_tokens_per_s']:.1f} | {r['sim_tokens_per_s']:.1f} | "
        f"{100 * r['sim_gap']:+.1f}% | {r['live_accept_frac']:.3f} |"
        for r in rows
    ]
    learned, tuned_row, hete = rows[0], rows[1], rows[2]
    summary = {
        "command": "multispin end-to-end " + " ".join(argv or []),
        "tuned_heuristic": tuned.to_dict(),
        "rows": rows,
        "learned_vs_hete_live": learned["live_tokens_per_s"] / hete["live_tokens_per_s"],
        "learned_vs_tuned_live": learned["live_tokens_per_s"] / tuned_row["live_tokens_per_s"],
        "max_abs_sim_gap": max(abs(r["sim_gap"]) for r in rows),
        "bundle": str(bundle),
    }
    (out / "table.md").write_text("\n".join(table) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(table))
    print(
        f"learned / tuned live = {summary['learned_vs_tuned_live']:.3f}, learned / Hete live "
        f"= {summary['learned_vs_hete_live']:.3f}; "
        f"largest sim-vs-live gap {100 * summary['max_abs_sim_gap']:.1f}% (target 10%)"
    )
    return summary


if __name__ == "__main__":
    main()
