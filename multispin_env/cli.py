"""The ``multispin`` command: one entry point for every job.

multispin demo                   # short end-to-end demo on the built-in defaults
multispin reproduce [...]        # paper Fig. 6-8 (python -m multispin_eval.reproduce)
multispin bench-solvers [...]    # solver latency and optimality gap
multispin bench-env [...]        # env steps/s, scalar vs batched
multispin calibrate-paper        # back-solve the presets' unstated constants
multispin train [...]            # SB3 training (python -m multispin_train)
multispin evaluate [...]         # learned vs heuristic policies: tables and plots
multispin tune --env ID          # the best tuned heuristic for a scenario (results/tuned/)
multispin sweep [...]            # Optuna sweep over seeds x scenarios x hyperparameters
multispin experiment paper|realistic   # one command per headline result
multispin experiment realistic-pipeline  # ... and per extended protocol (see --help)
multispin protocols              # synchronous round vs the extended protocols, per scenario
multispin live --users 8 --scheduler hete --rounds 50   # real models over TCP
multispin record-traces          # token-level acceptance traces of the live pair
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = {
    "demo": ("multispin_eval.demo", "compare the paper's schemes on the built-in defaults"),
    "reproduce": ("multispin_eval.reproduce", "reproduce the paper's Fig. 6-8"),
    "bench-solvers": ("multispin_eval.bench_solvers", "solver latency and optimality benchmark"),
    "calibrate-paper": ("multispin_eval.calibrate_paper", "back-solve p_k and T^S of the presets"),
    "train": ("multispin_train.train", "train an SB3 agent on a registered env"),
    "evaluate": ("multispin_eval.compare", "compare trained and baseline policies"),
    "tune": ("multispin_train.tune", "tune the heuristic family on tuning seeds"),
    "sweep": ("multispin_train.sweep", "Optuna hyperparameter sweep (RDB storage)"),
    "experiment": (
        "multispin_train.experiments",
        "headline experiments: paper | realistic | <scenario>-<protocol>",
    ),
    "live": ("multispin_env.live.cli", "edge server + device processes with real models"),
    "export": ("multispin_train.export", "ONNX policy bundle from a training run"),
    "calibrate": ("multispin_env.live.calibrate", "profile the live pair into a scenario preset"),
    "end-to-end": ("multispin_train.end_to_end", "calibrated sim -> train -> export -> live"),
    "bench-env": ("multispin_eval.bench_env", "env steps/s, scalar vs batched"),
    "protocols": ("multispin_eval.protocols", "synchronous round vs extended protocols"),
    "record-traces": ("multispin_eval.record_traces", "token-level traces of a live pair"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="multispin", description=__doc__.split("\n")[0])
    parser.add_argument(
        "command",
        choices=sorted(_SUBCOMMANDS),
        help="; ".join(f"{k}: {v[1]}" for k, v in _SUBCOMMANDS.items()),
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(_SUBCOMMANDS[args.command][0])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
