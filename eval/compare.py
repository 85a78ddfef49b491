"""Compare learned and heuristic policies on the same scenario and seeds.

    multispin evaluate --env multispin/RealisticLlama2-v0 \\
        --policies fixed uni_bw homo hete "hete[history]" runs/realistic-ppo --seeds 32

A policy is a scheme name (``fixed``, ``uni_bw``, ``homo``, ``hete``), optionally with the
acceptance source in brackets (``hete[history]``: the server's EWMA estimate;
``hete[oracle]``: the hidden true rate; ``hete[oracle,csi]``: true rate and true channel;
both are upper bounds that cannot be deployed), or a
training run directory (its ``model.zip``) or a model file inside one
(``runs/x/best_model.zip``), an exported bundle folder (``policy.onnx`` + ``policy.json``),
or a tuned heuristic (``tuned``: ``results/tuned/<env>.json``; ``tuned[hete,cap=6,...]``;
``tuned:PATH``); ``label=path`` names it. Writes ``compare.csv``, ``compare.md``
and ``compare.png`` to ``--out``; goodput is normalised to Hete-Multi-SPIN fed with the
offline task means and the last CSI (the paper's controller as deployed).

On an extended-protocol id (``multispin_env.protocols``) a bare scheme name plays the paper's
synchronous decision unaware of the protocol: no early stop, no deadline, groups by user
index with the bandwidth split over all users; so "vs Hete" there is relative to that. A tuned
heuristic (``tuned``, ``tuned[...]``) decides the protocol's levers. ``multispin protocols``
compares every protocol against synchronous Hete instead.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from multispin_agents.policies import SolverPolicy
from multispin_env.episodes import split_kwargs
from multispin_eval.harness import (
    BundleController,
    LearnedController,
    SolverController,
    run_episodes,
)
from multispin_eval.stats import ratio_of_means_ci95_halfwidth

EVAL_SEED_START = 2_000_000  # disjoint from training (seed + 0..) and its eval (seed + 1e6)
_SPEC = re.compile(r"^(fixed|uni_bw|homo|hete)(?:\[(prior|history|oracle)(,csi)?\])?$")
# env options that fix a policy's observation or action layout: a learned policy can only run
# with the values it was trained with
POLICY_LAYOUT_OPTIONS = ("action_mode", "max_users", "observe_true_alpha")


def make_controller(spec: str, env_id: str | None = None):
    head, sep, rest = spec.partition("=")
    # label=policy; a tuned heuristic's knobs (tuned[...,cap=6]) also contain '='
    label, target = (head, rest) if sep and "[" not in head else ("", spec)
    match = _SPEC.match(target)
    if target == "tuned" or target.startswith(("tuned[", "tuned:")):
        from multispin_agents.tuned import TunedHeuristic, default_tuned_path

        if target == "tuned":
            if env_id is None:
                raise ValueError("'tuned' needs the env id to find results/tuned/<env>.json")
            path = default_tuned_path(env_id)
            if not path.is_file():
                raise ValueError(
                    f"no tuned heuristic for {env_id} at {path}: run `multispin tune --env "
                    f"{env_id}` first, or name one as tuned[hete,cap=6,...] or tuned:PATH"
                )
            target = f"tuned:{path}"
        ctrl = SolverController(TunedHeuristic.parse(target))
    elif match:
        ctrl = SolverController(
            SolverPolicy(match.group(1), match.group(2) or "prior", oracle_csi=bool(match.group(3)))
        )
    elif Path(target).is_dir() and (Path(target) / "policy.json").is_file():
        ctrl = BundleController(target)  # an exported bundle (ONNX + sidecar)
    elif Path(target).is_dir():
        ctrl = LearnedController(target)
    elif target.endswith(".zip") and Path(target).is_file():  # a checkpoint inside a run dir
        ctrl = LearnedController(Path(target).parent, Path(target).name)
    else:
        raise ValueError(
            f"policy {target!r} is neither a scheme (fixed, uni_bw, homo, hete, optionally "
            "with [prior|history|oracle]), a tuned heuristic (tuned, tuned[...], tuned:PATH), "
            "a training run directory nor an exported bundle folder"
        )
    if label:
        ctrl.name = label
    return ctrl


def compare(*args, **kwargs) -> list[dict]:
    """Rows of summary metrics, one per policy, plus ``vs_hete`` (goodput ratio); arguments
    as for :func:`compare_with_scores`."""
    return compare_with_scores(*args, **kwargs)[0]


def compare_with_scores(
    env_id: str,
    specs: list[str],
    seeds: list[int],
    env_kwargs: dict | None = None,
    horizon_s: float | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """:func:`compare` plus each policy's per-episode goodput (same seed order for all)."""
    controllers = [make_controller(s, env_id) for s in specs]
    options, scenario = split_kwargs(dict(env_kwargs or {}))
    for ctrl in controllers:
        if isinstance(ctrl, (LearnedController, BundleController)):
            trained_options, trained_on = split_kwargs(ctrl.env_kwargs)
            for key in POLICY_LAYOUT_OPTIONS:
                if key in options and options[key] != trained_options.get(key, options[key]):
                    raise ValueError(
                        f"policy {ctrl.name!r} was trained with {key}={trained_options[key]!r}, "
                        f"but --env-kwargs sets {key}={options[key]!r}: the policy's "
                        f"{'actions' if key == 'action_mode' else 'observations'} only fit the "
                        f"env's {key} it was trained with. Drop {key} from --env-kwargs (each "
                        "learned policy runs with its own) or evaluate a policy trained with "
                        f"{key}={options[key]!r}"
                    )
            if trained_on != scenario or ctrl.env_id != env_id:
                raise ValueError(
                    f"policy {ctrl.name!r} was trained on {ctrl.env_id} with scenario overrides "
                    f"{trained_on}, but the comparison runs {env_id} with {scenario}; pass the "
                    "same --env and --env-kwargs so every policy faces the same deployment"
                )
    if not any(getattr(c, "name", "") == "hete" for c in controllers):
        controllers.insert(0, make_controller("hete"))
    rows = []
    for ctrl in tqdm(controllers, desc="evaluating policies", disable=not progress):
        metrics = run_episodes(ctrl, env_id, seeds, horizon_s=horizon_s, env_kwargs=env_kwargs)
        rows.append({"policy": ctrl.name, **metrics.summary(), "_goodput": metrics.goodput})
    scores = {r["policy"]: r["_goodput"] for r in rows}
    ref = next(r for r in rows if r["policy"] == "hete")
    ref_goodput = ref["_goodput"]
    for r in rows:
        r["vs_hete"] = r["goodput"] / ref["goodput"]
        # paired over seeds (common random numbers), so the CI is much tighter than the two
        # goodputs' own; it is the CI of this ratio of means, not of the mean per-seed ratio
        goodput = r.pop("_goodput")
        r["vs_hete_ci95"] = (
            ratio_of_means_ci95_halfwidth(goodput, ref_goodput) if r is not ref else 0.0
        )
    return rows, scores


COLUMNS = [
    ("policy", "policy", "{}"),
    ("goodput", "goodput tok/s", "{:.1f}"),
    ("goodput_ci95", "±95% CI", "{:.1f}"),
    ("vs_hete", "vs Hete", "{:.3f}"),
    ("vs_hete_ci95", "±95% CI (paired)", "{:.3f}"),
    ("jain", "Jain", "{:.3f}"),
    ("draft_frac", "draft", "{:.2f}"),
    ("upload_frac", "upload", "{:.2f}"),
    ("verify_frac", "verify", "{:.2f}"),
    ("round_ms", "round ms", "{:.0f}"),
    ("draft_length", "mean L", "{:.2f}"),
    ("energy_j_per_token", "J/token", "{:.3g}"),
]


def _cell(value, fmt: str) -> str:
    """One table cell; a NaN (a CI from a single seed) prints as n/a."""
    if isinstance(value, float) and np.isnan(value):
        return "n/a"
    return fmt.format(value)


def to_markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_cell(r[key], fmt) for key, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def make_figure(rows: list[dict], title: str):
    """Goodput bars (with 95% CIs) and the round-time split, on a private Agg canvas."""
    from multispin_eval.plotting import new_figure

    fig, (ax, ax2) = new_figure(1, 2, figsize=(11, 4.4))
    names = [r["policy"] for r in rows]
    ax.barh(
        names,
        [r["goodput"] for r in rows],
        xerr=[np.nan_to_num(r["goodput_ci95"]) for r in rows],
        color=["tab:orange" if not _SPEC.match(n.split("=")[-1]) else "tab:blue" for n in names],
    )
    ax.axvline(
        next(r["goodput"] for r in rows if r["policy"] == "hete"), color="k", lw=0.8, ls="--"
    )
    ax.set_xlabel("episode goodput (tokens/s)")
    ax.invert_yaxis()
    left = np.zeros(len(rows))
    for key, color in (
        ("draft_frac", "tab:green"),
        ("upload_frac", "tab:red"),
        ("verify_frac", "tab:purple"),
    ):
        vals = np.array([r[key] for r in rows])
        ax2.barh(names, vals, left=left, color=color, label=key.replace("_frac", ""))
        left += vals
    ax2.set_xlabel("share of round time (straggler's draft / upload, verify)")
    ax2.invert_yaxis()
    # below the bars, never on them
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    os.makedirs(out, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c[0] for c in COLUMNS])
        writer.writeheader()
        writer.writerows(  # a CI that does not exist (one seed) is an empty cell
            {k: "" if _cell(r[k], "{}") == "n/a" else r[k] for k, _, _ in COLUMNS} for r in rows
        )
    (out / "compare.md").write_text(f"{title}\n\n{to_markdown(rows)}")
    make_figure(rows, title).savefig(out / "compare.png", dpi=110)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} episodes: give at least 1 (and at least 2 for a confidence interval)"
        )
    return value


def main(argv=None) -> list[dict]:
    from multispin_train.hyperparams import parse_cli_kwargs

    p = argparse.ArgumentParser(prog="multispin evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--env", default="multispin/PaperLlama2-v0")
    p.add_argument("--policies", nargs="+", default=["fixed", "uni_bw", "homo", "hete"])
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=32,
        help="number of held-out episodes (>= 1; >= 2 for confidence intervals)",
    )
    p.add_argument("--seed-start", type=int, default=EVAL_SEED_START)
    p.add_argument(
        "--env-kwargs",
        nargs="*",
        default=[],
        metavar="KEY:VALUE",
        help="scenario overrides applied to every policy",
    )
    p.add_argument("--horizon-s", type=float)
    p.add_argument("--out", default="results/compare")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    seeds = list(range(a.seed_start, a.seed_start + a.seeds))
    try:
        rows = compare(
            a.env, a.policies, seeds, parse_cli_kwargs(a.env_kwargs), a.horizon_s, a.progress
        )
    except ValueError as e:
        p.exit(2, f"multispin evaluate: error: {e}\n")
    title = f"{a.env}: {a.seeds} held-out episodes (seeds {seeds[0]}..{seeds[-1]})"
    write_outputs(rows, Path(a.out), title)
    print(title)
    print(to_markdown(rows))
    print(f"wrote {a.out}/compare.csv, compare.md, compare.png")
    return rows


if __name__ == "__main__":
    main()
