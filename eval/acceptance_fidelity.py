"""Does the simulator's acceptance match a live pair's? Per position and per round, held out.

    python -m multispin_eval.acceptance_fidelity \\
        --fit results/traces/builtin_pair --heldout results/traces/builtin_pair_heldout

Takes the acceptance model fitted on one trace set (``multispin record-traces``: per decoding
mode the first position's acceptance alpha_1 and the position factors) and plays the
simulator's synchronous round with it, at each draft length of the held-out set (other
prompts, other seed). Compares per position P(token i accepted | drafted) and tokens per
round with the held-out live traces, for the position-dependent model and for the i.i.d.
law at the same alpha_1. Targets (the fidelity issue): every position within 0.05, tokens
per round within 5%. Writes ``fidelity.{md,json}`` beside the held-out traces.

    python -m multispin_eval.acceptance_fidelity --pool results/traces/builtin_pair* \
        --splits 20

The same check on random halves of a pool of trace sets: every split puts each request
(prompt) on one side, fits on one half and checks on the other. The held-out set above comes
from later windows of the same files, a shift in the prompt population; random halves
measure how well the model carries over to other prompts of the same population, and how
much of the gap is the prompts drawn. Writes ``fidelity_splits.{md,json}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROUNDS = 20_000  # simulated rounds per (mode, L): P(i accepted) to about +-0.007


def simulate(alpha_1: float, factors, length: int, rounds: int = ROUNDS, seed: int = 0):
    """Accepted drafts per round of the simulator's synchronous round (one user, fixed L)."""
    from multispin_env.config import TaskSpec, load_preset
    from multispin_env.simulator import MultiSpinSimulator

    cfg = load_preset(
        "demo-pair-cpu",
        num_users=1,
        max_draft_length=max(length, 1),
        tasks=[TaskSpec("fit", float(alpha_1))],
        acceptance_position_factors=list(factors),
    )
    sim = MultiSpinSimulator(cfg, num_envs=rounds)
    sim.reset(np.random.default_rng(seed).integers(0, 2**63, size=rounds, dtype=np.uint64))
    result = sim.step(np.full((rounds, 1), length), np.full((rounds, 1), cfg.bandwidth_hz))
    return result.accepted[:, 0]


def live_stats(tokens: dict, mode: int, length: int) -> tuple[np.ndarray, float, int]:
    sel = (tokens["mode"] == mode) & (tokens["draft_length"] == length)
    accepted = tokens["accepted"][sel].reshape(-1, length).sum(axis=1)
    return accepted, float(accepted.mean() + 1), len(accepted)


def compare(fit: dict, tokens: dict) -> list[dict]:
    rows = []
    for mode_name, model in fit.items():
        mode = 0 if mode_name == "greedy" else 1
        for length in sorted(np.unique(tokens["draft_length"][tokens["mode"] == mode])):
            length = int(length)
            live, live_tokens, n = live_stats(tokens, mode, length)
            live_pos = [float(np.mean(live >= i)) for i in range(1, length + 1)]
            row = {"mode": mode_name, "L": length, "live_rounds": n, "live_per_position": live_pos,
                   "live_tokens_per_round": live_tokens}  # fmt: skip
            for name, factors in (("position", model["factors"]), ("iid", [])):
                sim = simulate(model["alpha_1"], factors, length, seed=length)
                pos = [float(np.mean(sim >= i)) for i in range(1, length + 1)]
                row[f"{name}_per_position"] = pos
                row[f"{name}_max_position_gap"] = float(
                    np.max(np.abs(np.array(pos) - np.array(live_pos)))
                )
                row[f"{name}_tokens_per_round"] = float(sim.mean() + 1)
                row[f"{name}_tokens_gap"] = float(sim.mean() + 1) / live_tokens - 1
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | L | live rounds | P(i accepted) live | position model | max gap | i.i.d. | "
        "max gap | tokens/round live | position | i.i.d. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        lines.append(
            f"| {r['mode']} | {r['L']} | {r['live_rounds']} | {fmt(r['live_per_position'])} | "
            f"{fmt(r['position_per_position'])} | {r['position_max_position_gap']:.3f} | "
            f"{fmt(r['iid_per_position'])} | {r['iid_max_position_gap']:.3f} | "
            f"{r['live_tokens_per_round']:.2f} | {r['position_tokens_per_round']:.2f} "
            f"({100 * r['position_tokens_gap']:+.1f}%) | {r['iid_tokens_per_round']:.2f} "
            f"({100 * r['iid_tokens_gap']:+.1f}%) |"
        )
    return "\n".join(lines) + "\n"


def pooled_tokens(folders: list[str]) -> dict[str, np.ndarray]:
    """The token columns of several trace sets, with request ids made distinct per set."""
    parts = []
    for i, folder in enumerate(folders):
        tokens = dict(np.load(Path(folder) / "tokens.npz"))
        tokens["request"] = tokens["request"].astype(np.int64) + 100_000 * i
        parts.append(tokens)
    return {key: np.concatenate([t[key] for t in parts]) for key in parts[0]}


def split_check(tokens: dict, splits: int, seed: int = 0) -> dict:
    """Fit on a random half of the requests, check on the other half, ``splits`` times. Per
    decoding mode: how many splits meet both targets, and the largest position gap and
    tokens-per-round gap over the draft lengths (median and 90th percentile over splits)."""
    from multispin_eval.record_traces import fit_position_model

    requests = np.unique(tokens["request"])
    per_mode: dict[str, list] = {}
    for s in range(splits):
        rng = np.random.default_rng([seed, s])
        half = np.isin(tokens["request"], rng.permutation(requests)[: len(requests) // 2])
        fit = fit_position_model({k: v[half] for k, v in tokens.items()})
        rows = compare(fit, {k: v[~half] for k, v in tokens.items()})
        for mode in fit:
            mine = [r for r in rows if r["mode"] == mode]
            per_mode.setdefault(mode, []).append(
                (max(r["position_max_position_gap"] for r in mine),
                 max(abs(r["position_tokens_gap"]) for r in mine))
            )  # fmt: skip
    out = {"requests": int(len(requests)), "splits": splits, "modes": {}}
    for mode, gaps in per_mode.items():
        gaps = np.array(gaps)
        met = (gaps[:, 0] <= 0.05) & (gaps[:, 1] <= 0.05)
        out["modes"][mode] = {
            "splits_meeting_both_targets": int(met.sum()),
            "max_position_gap": {"median": float(np.median(gaps[:, 0])),
                                 "p90": float(np.percentile(gaps[:, 0], 90))},
            "max_tokens_gap": {"median": float(np.median(gaps[:, 1])),
                               "p90": float(np.percentile(gaps[:, 1], 90))},
        }  # fmt: skip
    return out


def split_markdown(result: dict) -> str:
    lines = [
        f"{result['requests']} requests, {result['splits']} random halves (fit on one, check "
        "on the other)\n",
        "| mode | splits meeting both targets | largest position gap: median | p90 | "
        "largest tokens/round gap: median | p90 |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in result["modes"].items():
        lines.append(
            f"| {mode} | {r['splits_meeting_both_targets']} / {result['splits']} | "
            f"{r['max_position_gap']['median']:.3f} | {r['max_position_gap']['p90']:.3f} | "
            f"{100 * r['max_tokens_gap']['median']:.1f}% | "
            f"{100 * r['max_tokens_gap']['p90']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fit", default="results/traces/builtin_pair", help="traces to fit on")
    p.add_argument(
        "--heldout", default="results/traces/builtin_pair_heldout", help="traces to check on"
    )
    p.add_argument("--pool", nargs="+", help="trace sets to split at random instead")
    p.add_argument("--splits", type=int, default=20, help="random halves (with --pool)")
    p.add_argument("--seed", type=int, default=0, help="seeds the halves (with --pool)")
    p.add_argument("--out", default="results/traces", help="where --pool writes its report")
    a = p.parse_args(argv)
    if a.pool:
        missing = [f for f in a.pool if not (Path(f) / "tokens.npz").is_file()]
        if missing or a.splits < 1:
            p.error(f"--pool needs trace sets ({missing} have no tokens.npz) and --splits >= 1")
        result = split_check(pooled_tokens(a.pool), a.splits, a.seed) | {"pool": a.pool}
        table = split_markdown(result)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "fidelity_splits.md").write_text(table)
        (Path(a.out) / "fidelity_splits.json").write_text(json.dumps(result, indent=2))
        print(table)
        return [result]
    for folder in (a.fit, a.heldout):
        if not (Path(folder) / "manifest.json").is_file():
            p.error(f"{folder}: no trace set (run `multispin record-traces --out {folder}`)")
    fit = json.loads((Path(a.fit) / "manifest.json").read_text())["position_model"]
    tokens = dict(np.load(Path(a.heldout) / "tokens.npz"))
    rows = compare(fit, tokens)
    met = {
        mode: {
            "per_position_0.05": all(r["position_max_position_gap"] <= 0.05 for r in mine),
            "tokens_per_round_5pct": all(abs(r["position_tokens_gap"]) <= 0.05 for r in mine),
        }
        for mode in fit
        if (mine := [r for r in rows if r["mode"] == mode])
    }
    table = markdown(rows)
    summary = {
        "fit": a.fit,
        "heldout": a.heldout,
        "position_model": fit,
        "rows": rows,
        "targets_met": met,
    }
    out = Path(a.heldout)
    (out / "fidelity.md").write_text(table)
    (out / "fidelity.json").write_text(json.dumps(summary, indent=2))
    print(table)
    for mode, m in met.items():
        print(f"{mode}: every position within 0.05: {m['per_position_0.05']}; tokens/round "
              f"within 5%: {m['tokens_per_round_5pct']}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
