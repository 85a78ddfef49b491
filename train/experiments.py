"""The headline experiments, each one command: tune, train over seeds, compare.

    multispin experiment paper        # static acceptance known: learned vs Hete (optimal there)
    multispin experiment realistic    # hidden per-request acceptance, churn, CSI error,
                                      # token-aware verification (GPU-like split)
    multispin experiment realistic-pipeline   # an extended protocol (multispin_env.protocols):
                                      # {paper,realistic}-{pipeline,deadline,early-stop}

Each experiment

1. takes the best tuned heuristic of the scenario (``results/tuned/<env>.json``, made by
   ``multispin tune`` on tuning seeds if it is missing);
2. trains PPO with ``residual`` actions over that heuristic (its cheap solver variant), from
   a zero-initialised actor, once per training seed (default 5 seeds, ``--jobs`` at a time);
   model selection (``best_model.zip``) evaluates before the first update too, so a run can
   only keep a policy that beat its starting point on the evaluation seeds;
3. gates every seed's selected policy (``multispin_train.gate``): it is deployed only if it
   beats its base heuristic on 256 fresh episodes (the lower end of the paired 95% CI above
   1); otherwise the deployed policy is the base itself (the residual zeroed);
4. compares every seed's deployed policy with Fixed, Uni-BW, Homo, Hete and the tuned
   heuristic on 32 held-out episodes (seeds 2,000,000+, disjoint from training, model
   selection, the gate and tuning), with common random numbers;
5. reports, across training seeds, the interquartile mean of the per-episode goodput ratio
   to the tuned heuristic with a stratified-bootstrap 95% CI, the probability of improvement
   over the tuned heuristic, the worst seed, and each seed's paired CI; the same for the
   selected policies before the gate;
6. exports every seed's deployed policy as a bundle (``bundle_s<seed>/``: ONNX + sidecar).

Outputs: ``results/experiments/<name>/`` (``compare.{md,csv,png}``, ``seeds.csv``,
``learning_curves.png``, ``summary.json``, bundles); runs in ``runs/experiments/<name>/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EXPERIMENTS = {
    "paper": {
        "env_id": "multispin/PaperLlama2-v0",
        "timesteps": 100_000,
        "target": 0.98,
        "target_of": "hete",
        "policies": ["fixed", "uni_bw", "homo", "hete"],
        "question": "learned policy >= 0.98 x Hete-Multi-SPIN (optimal in this setting) as an "
        "IQM over training seeds",
    },
    "realistic": {
        "env_id": "multispin/RealisticLlama2-v0",
        "timesteps": 250_000,
        "target": 1.0,
        "target_of": "tuned",
        "policies": ["fixed", "uni_bw", "homo", "hete", "hete[history]"],
        "question": "learned policy >= 1.0 x the best tuned heuristic as an IQM over training "
        "seeds",
    },
}
# the extended protocols (multispin_env.protocols): residual over the protocol's own tuned
# heuristic; the untuned protocol heuristic (Hete with the protocol's default knobs) and the
# synchronous paper schemes run inside the protocol for reference
for _scenario, _env, _target in (
    ("paper", "PaperLlama2", 1.0),
    ("realistic", "RealisticLlama2", 1.1),
):
    for _protocol, _slug in (
        ("Pipeline", "pipeline"),
        ("Deadline", "deadline"),
        ("EarlyStop", "early-stop"),
    ):
        EXPERIMENTS[f"{_scenario}-{_slug}"] = {
            "env_id": f"multispin/{_env}{_protocol}-v0",
            "timesteps": 100_000,
            "target": _target,
            "target_of": "tuned",
            "policies": ["fixed", "hete", "heuristic=tuned[hete,prior]"],
            "question": f"learned policy >= {_target} x the best tuned heuristic of the same "
            "protocol as an IQM over training seeds",
        }


GATE_EPISODES = 256  # fresh episodes for each seed's safety test (0: no gate)


def ensure_tuned(env_id: str, progress: bool = True) -> Path:
    """The scenario's tuned-heuristic file, made with ``multispin tune``'s defaults if missing."""
    from multispin_agents.tuned import default_tuned_path

    path = default_tuned_path(env_id)
    if not path.is_file():
        from multispin_train.tune import main as tune_main

        tune_main(["--env", env_id] + ([] if progress else ["--no-progress"]))
    return path


def plot_learning_curves(runs: dict[int, Path], path: Path, title: str) -> None:
    """Each run's evaluation goodput relative to its first evaluation (before any update:
    the base heuristic itself, on that run's evaluation episodes)."""
    from multispin_eval.plotting import new_figure

    fig, ax = new_figure(figsize=(6.4, 3.6))
    for seed, run_dir in runs.items():
        with (run_dir / "eval_progress.csv").open() as f:
            rows = list(csv.DictReader(f))
        steps = [int(r["timesteps"]) / 1e3 for r in rows]
        goodput = np.array([float(r["eval_goodput_tokens_per_s"]) for r in rows])
        ax.plot(steps, goodput / goodput[0], marker="o", ms=3, lw=1, label=f"seed {seed}")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="base heuristic (step 0)")
    ax.set_xlabel("training env steps (thousands)")
    ax.set_ylabel("eval goodput / base heuristic")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _train_command(spec: dict, base_policy: str, seed: int, steps: int, run_dir: Path) -> list:
    return [
        sys.executable, "-m", "multispin_env.cli", "train",
        "--env", spec["env_id"],
        "--env-kwargs", "action_mode:residual", f"base_policy:{base_policy}",
        "--timesteps", str(steps), "--seed", str(seed),
        "--eval-freq", "10000", "--eval-episodes", "16", "--checkpoint-freq", "0",
        "--run-dir", str(run_dir), "--no-progress", "--name", f"learned s{seed}",
    ]  # fmt: skip


def train_seeds(spec, base_policy, seeds, steps, run_root: Path, jobs: int) -> dict[int, Path]:
    """One residual training run per seed, ``jobs`` processes at a time (one thread each)."""
    from tqdm import tqdm

    runs = {s: run_root / f"s{s}" for s in seeds}
    pending = list(seeds)
    active: dict[int, subprocess.Popen] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bar = tqdm(total=len(seeds), desc=f"training {len(seeds)} seeds, {jobs} at a time")
    while pending or active:
        while pending and len(active) < jobs:
            seed = pending.pop(0)
            runs[seed].mkdir(parents=True, exist_ok=True)
            log = open(runs[seed] / "train.log", "w")  # noqa: SIM115
            cmd = _train_command(spec, base_policy, seed, steps, runs[seed])
            active[seed] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
            log.close()
        for seed, proc in list(active.items()):
            if proc.poll() is not None:
                del active[seed]
                bar.update(1)
                if proc.returncode != 0:
                    tail = (runs[seed] / "train.log").read_text()[-2000:]
                    raise RuntimeError(f"training seed {seed} failed:\n{tail}")
        time.sleep(1.0)
    bar.close()
    return runs


def seed_statistics(ratios: np.ndarray) -> dict:
    """Across-seed report of per-episode goodput ratios (seeds x episodes) to a reference."""
    from multispin_eval.stats import (
        ci95_halfwidth,
        iqm,
        probability_of_improvement,
        stratified_bootstrap_ci,
    )

    lo, hi = stratified_bootstrap_ci(ratios)
    per_seed = ratios.mean(axis=1)
    return {
        "iqm": iqm(ratios),
        "iqm_ci95": [lo, hi],
        "probability_of_improvement": probability_of_improvement(ratios, np.ones_like(ratios[:1])),
        "per_seed_mean": per_seed.tolist(),
        "per_seed_ci95": [ci95_halfwidth(r) for r in ratios],
        "worst_seed_mean": float(per_seed.min()),
    }


def run_experiment(
    name: str,
    timesteps: int | None,
    seeds: list[int],
    eval_seeds: int,
    out_root: str,
    run_root: str,
    jobs: int = 2,
    evaluate_only: bool = False,
    progress: bool = True,
    gate_episodes: int = GATE_EPISODES,
) -> dict:
    from multispin_agents.tuned import load_tuned
    from multispin_eval.compare import (
        EVAL_SEED_START,
        compare_with_scores,
        make_controller,
        to_markdown,
        write_outputs,
    )
    from multispin_eval.harness import run_episodes
    from multispin_train.export import export_run
    from multispin_train.gate import DEPLOYED_MODEL

    spec = EXPERIMENTS[name]
    env_id = spec["env_id"]
    steps = timesteps or spec["timesteps"]
    tuned_path = ensure_tuned(env_id, progress)
    tuned = load_tuned(tuned_path)
    base_policy = tuned.with_fast().name
    run_root_p = Path(run_root) / name
    t0 = time.perf_counter()
    if evaluate_only:
        runs = {s: run_root_p / f"s{s}" for s in seeds}
        missing = [str(r) for r in runs.values() if not (r / "best_model.zip").is_file()]
        if missing:
            raise ValueError(f"--evaluate-only needs finished runs; missing {missing}")
    else:
        runs = train_seeds(spec, base_policy, seeds, steps, run_root_p, jobs)
    train_wall = time.perf_counter() - t0
    gates = gate_seeds(env_id, runs, gate_episodes, progress)
    held_out = list(range(EVAL_SEED_START, EVAL_SEED_START + eval_seeds))
    deployed = DEPLOYED_MODEL if gate_episodes else "best_model.zip"
    learned = [f"learned s{s}={runs[s] / deployed}" for s in seeds]
    policies = spec["policies"] + [f"tuned={tuned.name}"] + learned
    rows, scores = compare_with_scores(env_id, policies, held_out, progress=progress)
    selected = {  # before the gate: where it fell back, the candidate it refused
        s: run_episodes(make_controller(str(runs[s] / "best_model.zip")), env_id, held_out).goodput
        if gates.get(s, {}).get("deployed") == "base"
        else scores[f"learned s{s}"]
        for s in seeds
    }
    out = Path(out_root) / name
    title = f"{name}: {env_id}, {eval_seeds} held-out episodes, {len(seeds)} training seeds"
    write_outputs(rows, out, title)
    reference = spec["target_of"]
    vs = {
        ref: seed_statistics(np.stack([scores[f"learned s{s}"] / scores[ref] for s in seeds]))
        for ref in ("hete", "tuned")
    }
    stats, vs_hete, vs_tuned = vs[reference], vs["hete"], vs["tuned"]
    selected_vs_tuned = seed_statistics(np.stack([selected[s] / scores["tuned"] for s in seeds]))
    configs = {s: json.loads((runs[s] / "config.json").read_text()) for s in seeds}
    plot_learning_curves(runs, out / "learning_curves.png", title)
    bundles = {}
    for s in seeds:
        bundle = export_run(runs[s], out / f"bundle_s{s}", model_file=deployed, parity_samples=64)
        bundles[s] = str(bundle)
    with (out / "seeds.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["seed", "vs_tuned", "vs_tuned_ci95", "vs_hete", "vs_hete_ci95", "train_s",
             "selected_vs_tuned", "gate_ratio", "gate_ci95_low", "gate_ci95_high", "deployed"]
        )  # fmt: skip
        for i, s in enumerate(seeds):
            g = gates.get(s, {"mean": float("nan"), "ci95": [float("nan")] * 2, "deployed": ""})
            w.writerow(
                [s, f"{vs_tuned['per_seed_mean'][i]:.4f}", f"{vs_tuned['per_seed_ci95'][i]:.4f}",
                 f"{vs_hete['per_seed_mean'][i]:.4f}", f"{vs_hete['per_seed_ci95'][i]:.4f}",
                 configs[s].get("train_time_s"),
                 f"{selected_vs_tuned['per_seed_mean'][i]:.4f}", f"{g['mean']:.4f}",
                 f"{g['ci95'][0]:.4f}", f"{g['ci95'][1]:.4f}", g["deployed"] or "ungated"]
            )  # fmt: skip
    tuned_row = next(r for r in rows if r["policy"] == "tuned")
    summary = {
        "experiment": name,
        "question": spec["question"],
        "command": f"multispin experiment {name} --seeds {' '.join(map(str, seeds))}"
        + (f" --timesteps {timesteps}" if timesteps else "")
        + (f" --gate-episodes {gate_episodes}" if gate_episodes != GATE_EPISODES else ""),
        "env_id": env_id,
        "tuned_heuristic": tuned.to_dict(),
        "tuned_heuristic_file": str(tuned_path),
        "base_policy": base_policy,
        "tuned_vs_hete": tuned_row["vs_hete"],
        "tuned_vs_hete_ci95": tuned_row["vs_hete_ci95"],
        "train_timesteps": steps,
        "train_seeds": seeds,
        "train_time_s": {s: configs[s].get("train_time_s") for s in seeds},
        # None: --evaluate-only (the runs' own training times are in train_time_s)
        "train_wall_s": None if evaluate_only else round(train_wall, 1),
        "target": f">= {spec['target']} x {reference} (IQM over seeds)",
        "learned_vs_target_reference": stats,
        "learned_vs_hete": vs_hete,
        "learned_vs_tuned": vs_tuned,
        "gate_episodes": gate_episodes,
        "gate": {s: gates[s] for s in sorted(gates)},
        "selected_vs_tuned_before_gate": selected_vs_tuned,
        "target_met": stats["iqm"] >= spec["target"],
        "held_out_seeds": [held_out[0], held_out[-1]],
        "bundles": bundles,
        "table": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(title)
    print(to_markdown(rows))
    print(
        f"learned / {reference}: IQM {stats['iqm']:.3f} [{stats['iqm_ci95'][0]:.3f}, "
        f"{stats['iqm_ci95'][1]:.3f}] over {len(seeds)} seeds, P(improvement) "
        f"{stats['probability_of_improvement']:.2f}, worst seed {stats['worst_seed_mean']:.3f}; "
        f"target {'met' if summary['target_met'] else 'NOT met'}"
    )
    if gates:
        kept = [s for s in seeds if gates[s]["deployed"] == "candidate"]
        print(
            f"gate ({gate_episodes} fresh episodes): deployed the learned correction of seeds "
            f"{kept or 'none'}, the base elsewhere; before the gate, learned / tuned IQM "
            f"{selected_vs_tuned['iqm']:.3f}, worst seed {selected_vs_tuned['worst_seed_mean']:.3f}"
        )
    return summary


def gate_seeds(env_id, runs: dict, episodes: int, progress: bool) -> dict:
    """The safety test of every run against the base they share (``multispin_train.gate``):
    the base's goodput on the gate's episodes is played once, for every run."""
    if not episodes:
        return {}
    from tqdm import tqdm

    from multispin_train.gate import GATE_SEED_START, base_goodput, base_of, describe, gate_run

    gate_seed_list = list(range(GATE_SEED_START, GATE_SEED_START + episodes))
    _, base_policy, plain = base_of(next(iter(runs.values())))  # one base for every run
    base = base_goodput(env_id, base_policy, gate_seed_list, plain)
    gates = {}
    for s in tqdm(runs, desc=f"gate on {episodes} fresh episodes", disable=not progress):
        gates[s] = gate_run(runs[s], episodes, base_scores=base)
        if progress:
            tqdm.write(f"seed {s}: {describe(gates[s])}")
    return gates


def main(argv=None) -> dict:
    from multispin_train.gate import gate_episodes_arg

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(prog="multispin experiment", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="which headline experiment")
    p.add_argument("--timesteps", type=int, help="env steps per training seed (default: per name)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (>= 5)"
    )
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    p.add_argument("--eval-seeds", type=int, default=32, help="held-out episodes")
    p.add_argument("--out", default="results/experiments", help="results folder")
    p.add_argument("--runs", default="runs/experiments", help="training runs folder")
    p.add_argument(
        "--evaluate-only",
        action="store_true",
        help="skip training; re-evaluate the runs already in --runs/<name>/s<seed>",
    )
    p.add_argument(
        "--gate-episodes",
        type=gate_episodes_arg,
        default=GATE_EPISODES,
        help="fresh episodes on which each seed's policy must beat its base heuristic to be "
        "deployed (0: no gate, deploy the selected policy)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no bars")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.eval_seeds < 2:
        p.error("--jobs must be >= 1 and --eval-seeds >= 2")
    return run_experiment(
        a.name, a.timesteps, a.seeds, a.eval_seeds, a.out, a.runs, a.jobs, a.evaluate_only,
        a.progress, a.gate_episodes,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
