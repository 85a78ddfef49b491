"""The synchronous round against the extended protocols, one table per scenario.

    multispin protocols                       # paper and realistic, 32 held-out episodes
    multispin protocols --scenarios realistic --seeds 8

For each scenario: the synchronous round with Fixed, Homo, Hete and the best tuned heuristic,
then every extended protocol (``multispin_env.protocols``) with its untuned heuristic (Hete
with the protocol's default knobs: AdaEDL's threshold 0.5, a deadline at the predicted
straggler, balanced groups), its best tuned heuristic (``results/tuned/<env>.json``) and the
learned policies of ``multispin experiment <scenario>-<protocol>`` (every training seed's
bundle; a protocol without committed bundles has no learned row). The learned row's ratio
columns are the mean per-episode ratio over all seeds and episodes (comparable with the other
rows); the across-seed interquartile means with stratified-bootstrap 95% CIs, against the
protocol's own tuned heuristic and the synchronous references, are printed under the table and
kept in ``summary.json``; the row's other columns are the median seed's episodes.

All rows play the same held-out seeds (2,000,000 + i): device speeds, channels and requests
are the same realization in every protocol, so ratios are paired per episode. Ratios are to
synchronous Hete and to the synchronous tuned heuristic (mean of per-episode ratios, paired
Student-t 95% CI). Where the gain comes from: the server's busy fraction (verification time /
elapsed; the synchronous round idles the server while devices draft and upload), the mean
round (pipeline cycle) time, committed tokens per user per round (goodput x round time / K),
and tokens drafted but not committed per committed token (rejected, cut by a deadline, or
drafted ahead on a wrong guess). The straggler's draft/upload split of ``multispin evaluate``
is left out: under streaming and pipelines drafting, uploading and verifying overlap.

Writes ``results/protocols/<scenario>.{csv,md,png}`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from multispin_eval.compare import EVAL_SEED_START

SCENARIOS = {
    "paper": "PaperLlama2",
    "realistic": "RealisticLlama2",
}
PROTOCOL_SLUGS = {"EarlyStop": "early-stop", "Deadline": "deadline", "Pipeline": "pipeline"}


def _ratio_stats(x: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    from multispin_eval.stats import ci95_halfwidth

    ratio = x / ref
    return float(ratio.mean()), ci95_halfwidth(ratio)


def _row(label, protocol, metrics, refs, num_users: int) -> dict:
    s = metrics.summary()
    row = {
        "protocol": protocol,
        "policy": label,
        "goodput": s["goodput"],
        "goodput_ci95": s["goodput_ci95"],
    }
    for name, ref in refs.items():
        row[f"vs_{name}"], row[f"vs_{name}_ci95"] = _ratio_stats(metrics.goodput, ref)
    row.update(
        server_busy=s["verify_frac"],
        round_ms=s["round_ms"],
        tokens_per_user_round=s["goodput"] * s["round_ms"] / 1e3 / num_users,
        wasted_per_token=s["wasted_per_token"],
    )
    return row


def scenario_table(scenario: str, seeds: list[int], experiments: Path, progress=True) -> dict:
    """Rows for one scenario, plus the learned policies' across-seed statistics."""
    from multispin_agents.policies import SolverPolicy
    from multispin_agents.tuned import TunedHeuristic, default_tuned_path, load_tuned
    from multispin_eval.harness import (
        BundleController,
        SolverController,
        run_episodes,
        scenario_for,
    )
    from multispin_eval.stats import iqm, stratified_bootstrap_ci

    base = SCENARIOS[scenario]
    sync_id = f"multispin/{base}-v0"
    k = scenario_for(sync_id)[0].num_users
    sync_tuned_path = default_tuned_path(sync_id)
    if not sync_tuned_path.is_file():
        raise ValueError(
            f"no tuned heuristic at {sync_tuned_path}: run multispin tune --env {sync_id}"
        )
    runs = {}

    def run(controller, env_id):
        t0 = time.perf_counter()
        m = run_episodes(controller, env_id, seeds)
        if progress:
            print(f"  {env_id} {controller.name}: {m.goodput.mean():.1f} tok/s "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        return m

    for label, policy in (
        ("fixed", SolverPolicy("fixed")),
        ("homo", SolverPolicy("homo")),
        ("hete", SolverPolicy("hete")),
        ("tuned", load_tuned(sync_tuned_path)),
    ):
        runs[("sync", label)] = run(SolverController(policy), sync_id)
    refs = {"hete": runs[("sync", "hete")].goodput, "tuned_sync": runs[("sync", "tuned")].goodput}
    rows = [_row(label, "sync", m, refs, k) for (_, label), m in runs.items()]
    learned = {}
    for protocol, slug in PROTOCOL_SLUGS.items():
        env_id = f"multispin/{base}{protocol}-v0"
        path = default_tuned_path(env_id)
        heuristic = run(SolverController(TunedHeuristic.parse("tuned[hete,prior]", 25)), env_id)
        rows.append(_row("heuristic", protocol, heuristic, refs, k))
        if not path.is_file():
            continue
        tuned = run(SolverController(load_tuned(path)), env_id)
        rows.append(_row("tuned", protocol, tuned, refs, k))
        bundles = sorted((experiments / f"{scenario}-{slug}").glob("bundle_s*"))
        if not bundles:
            continue
        per_seed = [run(BundleController(b), env_id) for b in bundles]
        goodput = np.stack([m.goodput for m in per_seed])
        stats = {}
        for name, ref in (
            ("tuned", tuned.goodput),
            ("tuned_sync", refs["tuned_sync"]),
            ("hete", refs["hete"]),
        ):
            ratios = goodput / ref
            lo, hi = stratified_bootstrap_ci(ratios)
            stats[f"vs_{name}"] = {"iqm": iqm(ratios), "ci95": [lo, hi]}
        learned[protocol] = {"bundles": [str(b) for b in bundles], **stats}
        # the learned row shows the median seed's episodes (the IQM is in the summary)
        median = int(np.argsort(goodput.mean(axis=1))[len(bundles) // 2])
        row = _row(f"learned ({len(bundles)} seeds)", protocol, per_seed[median], refs, k)
        for name, ref in (("hete", refs["hete"]), ("tuned_sync", refs["tuned_sync"])):
            # comparable with the other rows: the mean per-episode ratio, over all seeds
            row[f"vs_{name}"] = float((goodput / ref).mean())
            row[f"vs_{name}_ci95"] = float("nan")
        row["learned_vs_tuned_protocol_iqm"] = stats["vs_tuned"]["iqm"]
        rows.append(row)
    return {"rows": rows, "learned": learned}


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| protocol | policy | goodput tok/s | vs sync Hete | vs sync tuned | server busy | "
        "round ms | tokens / user / round | wasted / token |"
    )
    lines = [head, "|" + "---|" * 9]

    def ratio(r, key):
        ci = r.get(f"{key}_ci95", float("nan"))
        return f"{r[key]:.3f}" + ("" if not np.isfinite(ci) else f" ± {ci:.3f}")

    for r in rows:
        lines.append(
            f"| {r['protocol']} | {r['policy']} | {r['goodput']:.1f} ± {r['goodput_ci95']:.1f} | "
            f"{ratio(r, 'vs_hete')} | {ratio(r, 'vs_tuned_sync')} | {r['server_busy']:.2f} | "
            f"{r['round_ms']:.0f} | {r['tokens_per_user_round']:.2f} | "
            f"{r['wasted_per_token']:.2f} |"
        )
    return "\n".join(lines)


def make_figure(rows: list[dict], title: str):
    from multispin_eval.plotting import new_figure

    fig, ax = new_figure(figsize=(7.5, 3.8))
    labels = [f"{r['protocol']}\n{r['policy'].split(' ')[0]}" for r in rows]
    colors = {"sync": "0.6", "EarlyStop": "C0", "Deadline": "C1", "Pipeline": "C2"}
    values = [r["vs_tuned_sync"] for r in rows]
    errors = [r.get("vs_tuned_sync_ci95", 0.0) for r in rows]
    errors = [0.0 if not np.isfinite(e) else e for e in errors]
    ax.bar(range(len(rows)), values, yerr=errors, color=[colors[r["protocol"]] for r in rows])
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    ax.set_ylabel("goodput / synchronous tuned heuristic")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="multispin protocols", description=__doc__.split("\n")[0])
    p.add_argument(
        "--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS),
        help="which scenarios (default both)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=32, help="held-out episodes (default 32)")
    p.add_argument(
        "--experiments", default="results/experiments",
        help="folder of experiment results with bundles (default results/experiments)",
    )  # fmt: skip
    p.add_argument(
        "--out", default="results/protocols", help="output folder (default results/protocols)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="quiet")
    a = p.parse_args(argv)
    if a.seeds < 2:
        p.error("--seeds must be >= 2 (paired confidence intervals need two episodes)")
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + a.seeds))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"held_out_seeds": [seeds[0], seeds[-1]], "command": "multispin protocols"}
    for scenario in a.scenarios:
        result = scenario_table(scenario, seeds, Path(a.experiments), a.progress)
        rows = result["rows"]
        title = f"{scenario}: synchronous round vs extended protocols, {a.seeds} held-out episodes"
        with (out / f"{scenario}.csv").open("w", newline="") as f:
            keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k)
                          if k in rows[-1] else 99)  # fmt: skip
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        table = to_markdown(rows)
        (out / f"{scenario}.md").write_text(f"{title}\n\n{table}\n")
        make_figure(rows, title).savefig(out / f"{scenario}.png", dpi=110)
        summary[scenario] = result
        print(title)
        print(table)
        lines = []
        for protocol, stats in result["learned"].items():
            cells = []
            for key in ("vs_tuned", "vs_tuned_sync", "vs_hete"):
                lo, hi = stats[key]["ci95"]
                cells.append(f"{stats[key]['iqm']:.3f} [{lo:.3f}, {hi:.3f}]")
            lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
        if lines:
            iqm_table = (
                "| learned: IQM over seeds [95% CI] | vs tuned, same protocol | vs tuned sync | "
                "vs sync Hete |\n|---|---|---|---|\n" + "\n".join(lines)
            )
            print(iqm_table)
            with (out / f"{scenario}.md").open("a") as f:
                f.write(f"\n{iqm_table}\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


if __name__ == "__main__":
    main()
