"""Short end-to-end demo on the built-in defaults (the README's main command).

Plays the paper's setting (K = 20 users, 10 MHz, TinyLlama -> Llama-2 calibration) in the
simulator with every allocation scheme, prints a table and writes a bar chart.

    multispin demo [--preset paper-llama2] [--realizations 30] [--rounds 20] [--out results/demo]
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

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
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


if __name__ == "__main__":
    main()
