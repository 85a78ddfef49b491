"""Live benchmark: round-time split and goodput for 1, 4 and 8 users with the built-in pair.

    OMP_NUM_THREADS=1 python -m multispin_eval.bench_live [--users 1 4 8] [--rounds 20]

Each configuration starts the edge server and real device processes on loopback, runs the
Hete scheduler, and reports per round: the straggler's drafting compute and uplink time, the
batched verification time, the timeline round time and the wall-clock round time, then
goodput on both clocks. Verification is measured on this host (`--device cuda`: on its GPU).
The run also times a fixed reference workload (``multispin_eval.machine_ref``) and prints the
verification time in reference ops and timeline tokens per reference op.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np


def main(argv=None) -> list[dict]:
    from multispin_env.live.cli import live_args, run_live
    from multispin_eval.machine_ref import measure

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--scheduler", default="hete")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu", help="torch device of the models: cpu or cuda")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    ref_before = measure()
    rows = []
    for users in a.users:
        args = live_args(
            users=users,
            scheduler=a.scheduler,
            rounds=a.rounds,
            model=a.model,
            device=a.device,
            round_timeout_s=30.0,
            trace=f"/tmp/bench_live_{users}.jsonl",
        )
        summary = asyncio.run(run_live(args))
        records = [json.loads(line) for line in open(args.trace)]
        strag = [
            max((u["compute_s"], u["upload_s"]) for u in r["users"] if "accepted" in u)
            for r in records
        ]
        rows.append(
            {
                "users": users,
                "draft_ms": 1e3 * float(np.mean([s[0] for s in strag])),
                "upload_ms": 1e3 * float(np.mean([s[1] for s in strag])),
                "verify_ms": 1e3 * float(np.mean([r["verify_s"] for r in records])),
                "timeline_round_ms": 1e3 * float(np.mean([r["timeline_s"] for r in records])),
                "wall_round_ms": 1e3 * float(np.mean([r["wall_s"] for r in records])),
                "tokens_per_s_timeline": summary["goodput_timeline_tokens_per_s"],
                "tokens_per_s_wall": summary["goodput_wall_tokens_per_s"],
                "accept_frac": summary["accept_frac"],
            }
        )
    ref = ref_before.averaged_with(measure())
    for r in rows:
        r["verify_ms_in_ref_ops"] = ref.latency_ratio(r["verify_ms"] * 1e-3)
        r["tokens_per_ref_op_timeline"] = ref.rate_ratio(r["tokens_per_s_timeline"])
        r["machine_ref"] = ref.as_dict()
    print(
        f"\n{'users':>5}{'draft ms':>10}{'upload ms':>11}{'verify ms':>11}{'round ms':>10}"
        f"{'wall ms':>9}{'tok/s timeline':>16}{'tok/s wall':>12}{'accept':>8}"
    )
    for r in rows:
        print(
            f"{r['users']:>5}{r['draft_ms']:>10.1f}{r['upload_ms']:>11.1f}{r['verify_ms']:>11.1f}"
            f"{r['timeline_round_ms']:>10.1f}{r['wall_round_ms']:>9.1f}"
            f"{r['tokens_per_s_timeline']:>16.1f}{r['tokens_per_s_wall']:>12.1f}"
            f"{r['accept_frac']:>8.3f}"
        )
    print(ref.describe())
    print(
        "per ref op: "
        + "; ".join(
            f"{r['users']} users: verify {r['verify_ms_in_ref_ops']:.1f} ref ops, "
            f"{r['tokens_per_ref_op_timeline']:.3f} tokens (timeline)"
            for r in rows
        )
    )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
