"""``multispin tune``: the best heuristic of the tuned family for one scenario.

    multispin tune --env multispin/RealisticLlama2-v0 --trials 60 --seeds 12

Searches the knobs of :class:`multispin_agents.tuned.TunedHeuristic` (scheme, acceptance
source, length cap, CSI margin, equal-share mix; Hete's fast solver unless --full-solver, so
the result can also serve as the exact starting point of a residual policy) with Optuna's
TPE sampler (seeded, so a rerun gives the same study). Each candidate is scored by its mean
episode goodput on *tuning seeds* (3,000,000 + i), disjoint from training (0 + i), model
selection (1,000,000 + i) and held-out evaluation (2,000,000 + i). The paper's schemes at
their defaults are enqueued as the first trials, so the result is never below untuned Hete
or Homo (fast solver) on the tuning seeds.

Writes ``results/tuned/<env>.json``: the best knobs, their score, the score of plain Hete on
the same seeds, the budget, and every trial. ``multispin evaluate --policies tuned`` (and
``experiment``, ``end-to-end``) read that file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

TUNE_SEED_START = 3_000_000


def score(heuristic, env_id: str, seeds, env_kwargs: dict | None = None) -> np.ndarray:
    """Episode goodput per seed of a heuristic (one batched simulator, common randomness)."""
    from multispin_eval.harness import SolverController, run_episodes

    return run_episodes(SolverController(heuristic), env_id, seeds, env_kwargs=env_kwargs).goodput


def reference_hete_goodput(env_id: str, seeds, env_kwargs: dict | None = None) -> np.ndarray:
    """Plain Hete on the same seeds: in the synchronous round of the scenario (for an
    extended-protocol id, its synchronous id), so "x Hete" always means the paper's scheme in
    the paper's round."""
    from multispin_agents.policies import SolverPolicy
    from multispin_env.registration import synchronous_id

    return score(SolverPolicy("hete"), synchronous_id(env_id) or env_id, seeds, env_kwargs)


def tune(
    env_id: str,
    trials: int = 60,
    num_seeds: int = 12,
    seed: int = 0,
    env_kwargs: dict | None = None,
    schemes: tuple[str, ...] = ("homo", "hete"),
    progress: bool = True,
    fast: bool = True,
    warm_start: list[dict] | None = None,
    oracle: bool = False,
) -> dict:
    """Run the search; returns the result dict that :func:`main` writes.

    Under an extended protocol the protocol's knobs are searched too (stop threshold and
    cap scale for early stop, deadline scale and cap scale for deadline verification, cap
    scale for pipelined groups). ``warm_start``: knob sets tried first (e.g. the best
    synchronous heuristic of the same scenario). ``oracle``: the family planning with the
    simulator's hidden truth (``TunedHeuristic.oracle``), an upper reference, not a baseline."""
    import optuna
    from tqdm import tqdm

    from multispin_agents.tuned import SOURCES, TunedHeuristic
    from multispin_eval.harness import scenario_for

    cfg, _ = scenario_for(env_id, env_kwargs)
    l_max = cfg.max_draft_length
    seeds = list(range(TUNE_SEED_START, TUNE_SEED_START + num_seeds))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True)
    )
    # the protocol's knobs and their ranges (on a grid: short, exact names)
    protocol_knobs = {}
    if cfg.early_stop:
        protocol_knobs["stop_threshold"] = (0.0, 0.9, 0.01)
    if cfg.streaming_deadline:
        protocol_knobs["deadline_scale"] = (0.3, 1.5, 0.01)
    if cfg.extended_protocol:
        protocol_knobs["cap_scale"] = (0.5, 3.0, 0.05)
    defaults = {"stop_threshold": 0.5, "deadline_scale": 1.0, "cap_scale": 1.0}
    for scheme in schemes:  # the untuned paper schemes first
        study.enqueue_trial(
            {"scheme": scheme, "alpha_source": "prior", "length_cap": l_max,
             "csi_margin": 1.0, "equal_mix": 0.0,
             **{key: defaults[key] for key in protocol_knobs}}
        )  # fmt: skip
    if cfg.early_stop:  # the synchronous scheme inside the protocol: never stop early
        study.enqueue_trial(
            {"scheme": "hete", "alpha_source": "prior", "length_cap": l_max,
             "csi_margin": 1.0, "equal_mix": 0.0,
             **{key: defaults[key] for key in protocol_knobs}, "stop_threshold": 0.0}
        )  # fmt: skip
    for knobs in warm_start or []:
        start = {key: knobs[key] for key in ("scheme", "alpha_source", "length_cap")}
        start.update({key: knobs[key] for key in ("csi_margin", "equal_mix")})
        start.update({key: knobs.get(key, defaults[key]) for key in protocol_knobs})
        study.enqueue_trial(start)
    t0 = time.perf_counter()

    def objective(trial) -> float:
        extra = {
            key: round(trial.suggest_float(key, low, high, step=step), 2)
            for key, (low, high, step) in protocol_knobs.items()
        }
        heuristic = TunedHeuristic(
            fast=fast,
            oracle=oracle,
            scheme=trial.suggest_categorical("scheme", list(schemes)),
            alpha_source=trial.suggest_categorical("alpha_source", list(SOURCES)),
            length_cap=trial.suggest_int("length_cap", 1, l_max),
            # on a 0.01 grid: short, exact names (the name is also the spec)
            csi_margin=round(trial.suggest_float("csi_margin", 0.3, 1.0, step=0.01), 2),
            equal_mix=round(trial.suggest_float("equal_mix", 0.0, 0.6, step=0.01), 2),
            **extra,
        )
        return float(score(heuristic, env_id, seeds, env_kwargs).mean())

    bar = tqdm(total=trials, desc=f"tuning heuristics on {env_id}", disable=not progress)

    def tick(study, trial) -> None:
        bar.update(1)
        bar.set_postfix(best=f"{study.best_value:.1f}")

    study.optimize(objective, n_trials=trials, callbacks=[tick])
    bar.close()
    params = dict(study.best_params)
    for key in ("csi_margin", "equal_mix", *protocol_knobs):  # the grid, without float residue
        params[key] = round(params[key], 2)
    best = TunedHeuristic(**params, fast=fast, oracle=oracle)
    hete = reference_hete_goodput(env_id, seeds, env_kwargs)
    rows = [
        {"number": t.number, "goodput": t.value, **t.params}
        for t in sorted(study.trials, key=lambda t: -(t.value or 0.0))
    ]
    return {
        "env_id": env_id,
        "env_kwargs": env_kwargs or {},
        "best": best.to_dict(),
        "name": best.name,
        "tuning_goodput": study.best_value,
        "hete_goodput": float(hete.mean()),
        "hete_reference": "Hete (full solver, offline acceptance) in the synchronous round",
        "tuning_seeds": [seeds[0], seeds[-1]],
        "budget": {"trials": trials, "sampler": "optuna TPE (multivariate)", "seed": seed},
        "wall_s": time.perf_counter() - t0,
        "trials": rows,
    }


def main(argv=None) -> dict:
    from multispin_agents.tuned import default_tuned_path
    from multispin_env.registration import synchronous_id
    from multispin_train.hyperparams import parse_cli_kwargs

    p = argparse.ArgumentParser(prog="multispin tune", description=__doc__.split("\n")[0])
    p.add_argument("--env", default="multispin/PaperLlama2-v0", help="registered env id")
    p.add_argument("--trials", type=int, default=60, help="candidates to score (Optuna TPE)")
    p.add_argument("--seeds", type=int, default=12, help="tuning episodes per candidate")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler")
    p.add_argument(
        "--schemes",
        nargs="+",
        default=["homo", "hete"],
        choices=["homo", "hete", "uni_bw"],
        help="paper schemes the search may pick",
    )
    p.add_argument(
        "--env-kwargs", nargs="*", default=[], metavar="KEY:VALUE", help="scenario overrides"
    )
    p.add_argument("--out", default=None, help="result file (default results/tuned/<env>.json)")
    p.add_argument(
        "--full-solver",
        dest="fast",
        action="store_false",
        help="Hete's full grid and polish (default: the fast variant, cheap enough to serve "
        "as the base of residual policies at every env step)",
    )
    p.add_argument(
        "--oracle",
        action="store_true",
        help="tune the family planning with the simulator's hidden truth (true acceptance and "
        "channel): an upper reference for what inferring them could add, not a deployable "
        "baseline (default out: results/tuned/<env>.oracle.json)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no bar")
    a = p.parse_args(argv)
    if a.trials < len(a.schemes) or a.seeds < 1:
        p.error(f"--trials must be >= {len(a.schemes)} (one per scheme) and --seeds >= 1")
    warm_start = []
    sync_id = synchronous_id(a.env)
    if sync_id is not None and default_tuned_path(sync_id).is_file():
        # the best synchronous heuristic, inside the protocol, is the first candidate
        warm_start.append(json.loads(default_tuned_path(sync_id).read_text())["best"])
        print(f"warm start: the tuned heuristic of {sync_id}")
    if a.oracle and default_tuned_path(a.env).is_file():  # the deployable best's knobs first
        warm_start.append(json.loads(default_tuned_path(a.env).read_text())["best"])
        print(f"warm start: the tuned heuristic of {a.env}")
    result = tune(
        a.env, a.trials, a.seeds, a.seed, parse_cli_kwargs(a.env_kwargs), tuple(a.schemes),
        a.progress, a.fast, warm_start, a.oracle,
    )  # fmt: skip
    out = Path(a.out) if a.out else default_tuned_path(a.env)
    if a.oracle and not a.out:
        out = out.with_suffix(".oracle.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"best: {result['name']}  {result['tuning_goodput']:.1f} tokens/s on "
        f"{a.seeds} tuning seeds (plain Hete in the synchronous round "
        f"{result['hete_goodput']:.1f}, "
        f"{result['tuning_goodput'] / result['hete_goodput']:.3f}x); {a.trials} trials in "
        f"{result['wall_s']:.0f} s -> {out}"
    )
    return result


if __name__ == "__main__":
    main()
