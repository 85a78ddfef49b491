"""Profile a live model pair on this machine and write a scenario profile the simulator loads.

    multispin calibrate [--model PAIR] [--out multispin_env/presets/demo-pair-cpu.yaml]

Measures, with the real models and the same code the live server runs:

- the drafter's per-token latency (CPU time of one cached forward, batch 1, as on a device);
- the batched verification latency over users K and draft length L, fitted two ways, the
  paper's ``T_fix + K T_lin`` and the token-aware ``T_fix + c_K K + c_tok K (L+1)``, each with
  R^2 and worst relative error;
- the acceptance rate per prompt category (stdlib package) and decoding mode: the per-prompt
  exact acceptance probability (sampling: mean of sum_x min(p, q); greedy: argmax agreement),
  whose mean and spread become the scenario's tasks;
- the payload bits per drafted token (|V_kept| (16 + ceil(log2 V))).

The profile keeps the paper preset's channel constants (power, noise, gains, bandwidth) and
records every measured figure and the command under ``provenance``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from multispin_env.config import load_preset_document
from multispin_env.live.clock import compute_clock
from multispin_env.live.models import load_pair

# prompt categories: stdlib packages with distinct styles, plus the top-level modules
CATEGORIES = ("asyncio", "email", "json", "top_level")


def _fit(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    pred = design @ coef
    r2 = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    worst = float(np.max(np.abs(pred - y) / y))
    return coef, float(r2), worst


def time_verification(
    verifier, users=(1, 2, 4, 8), lengths=(1, 2, 4, 8), context=96, reps=11, kept_vocab=1024
) -> list[dict]:
    """Median seconds of one verification step per (K, L), timed exactly as the live server
    times it (CPU time on a CPU, :mod:`multispin_env.live.clock`): ``VerifierServer.verify``
    (the batched forward plus the acceptance rule on the uploaded truncated PMFs and the
    cache bookkeeping), sampling mode."""
    from multispin_env.live.speculative import (
        DecodingConfig,
        Draft,
        VerifierServer,
        truncated_pmf,
    )

    rng = np.random.default_rng(0)
    vocab = verifier.cfg.vocab_size
    cfg = DecodingConfig(kept_vocab=kept_vocab)
    clock = compute_clock(verifier)  # as the server's clock (CPU time on a CPU)

    def drafts(k: int, length: int) -> dict:
        out = {}
        for u in range(k):
            pmfs = [truncated_pmf(torch.randn(vocab), cfg) for _ in range(length)]
            out[u] = Draft(
                [int(i[0]) for i, _ in pmfs],
                np.stack([i for i, _ in pmfs]),
                np.stack([v for _, v in pmfs]),
            )
        return out

    rows = []
    for k in users:
        for length in lengths:
            server = VerifierServer(verifier, cfg, np.random.default_rng(1))
            for u in range(k):
                server.add_user(u, list(rng.integers(1, vocab, context)))
            server.verify(drafts(k, length))  # prefill the caches, warm up
            times = []
            for _ in range(reps):
                batch = drafts(k, length)
                t0 = clock()
                server.verify(batch)
                times.append(clock() - t0)
            rows.append({"users": k, "draft_length": length, "seconds": float(np.median(times))})
    return rows


def fit_verification(rows: list[dict]) -> dict:
    k = np.array([r["users"] for r in rows], dtype=float)
    tokens = np.array([r["users"] * (r["draft_length"] + 1) for r in rows], dtype=float)
    y = np.array([r["seconds"] for r in rows])
    (a_fix, a_lin), a_r2, a_worst = _fit(np.stack([np.ones_like(k), k], 1), y)
    (t_fix, t_user, t_tok), t_r2, t_worst = _fit(np.stack([np.ones_like(k), k, tokens], 1), y)
    return {
        "affine": {
            "t_fix_s": float(a_fix),
            "t_lin_s": float(a_lin),
            "r2": a_r2,
            "worst_rel_error": a_worst,
        },
        "token_aware": {
            "t_fix_s": float(max(t_fix, 0.0)),
            "t_user_s": float(max(t_user, 0.0)),
            "t_token_s": float(max(t_tok, 0.0)),
            "r2": t_r2,
            "worst_rel_error": t_worst,
        },
    }


def time_drafter(drafter, context=96, rounds=40, length=4) -> dict:
    """CPU seconds per drafted token, measured exactly as a device measures its compute:
    ``DrafterSession.propose`` (forward, truncated PMF, sampling), after a warm-up."""
    from multispin_env.live.speculative import DecodingConfig, DrafterSession

    rng = np.random.default_rng(1)
    clock = compute_clock(drafter)
    session = DrafterSession(drafter, DecodingConfig(), rng)
    session.start(list(rng.integers(1, drafter.cfg.vocab_size, context)))
    # the context goes into the KV cache once, as on a device in a running request: a
    # draft then feeds only the one or two tokens committed last round (timing proposes
    # from an empty cache would charge the whole prompt's prefill to every draft)
    draft = session.propose(length)
    session.commit(0, [draft.tokens[0]])
    for _ in range(5):
        session.propose(length)
    per_token = []
    for _ in range(rounds):  # propose without commit: the same state every time
        t0 = clock()
        session.propose(length)
        per_token.append((clock() - t0) / length)
    return {
        "mean_s": float(np.mean(per_token)),
        "median_s": float(np.median(per_token)),
        "std_s": float(np.std(per_token)),
        "draft_length": length,
    }


def category_prompts(pair, per_category: int, tokens: int) -> dict[str, list[list[int]]]:
    import sysconfig

    from multispin_env.live.train_pair import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[list[int]]] = {c: [] for c in CATEGORIES}
    for f in stdlib_files():
        rel = f.relative_to(root).parts
        cat = "top_level" if len(rel) == 1 else rel[0]
        if cat not in CATEGORIES:
            continue
        ids = pair.encode(f.read_text(encoding="utf-8", errors="replace"))
        # several windows per file: more prompts for small packages
        for start in range(0, max(len(ids) - tokens, 1), 400):
            if len(out[cat]) < per_category and len(ids) >= start + tokens:
                out[cat].append(ids[start : start + tokens])
    return {c: p for c, p in out.items() if len(p) >= 3}


@torch.no_grad()
def verifier_continuation(
    verifier, prompt: list[int], tokens: int, greedy: bool, rng: np.random.Generator
) -> list[int]:
    """What the live system outputs for this prompt: the verifier's greedy continuation, or
    a sample from it (speculative sampling outputs exactly the verifier's distribution)."""
    out, cache, feed = [], None, list(prompt)
    for _ in range(tokens):
        logits, caches = verifier.forward_cached([feed], [cache])
        cache = caches[0]
        p = torch.softmax(logits[0][-1].double(), -1).numpy()
        token = int(np.argmax(p)) if greedy else int(rng.choice(len(p), p=p / p.sum()))
        out.append(token)
        feed = [token]
    return out


@torch.no_grad()
def prompt_acceptance(
    pair, prompt: list[int], greedy: bool, positions: int = 24, seed: int = 0
) -> float:
    """Exact per-token acceptance along the text the live system would produce."""
    cont = verifier_continuation(
        pair.verifier, prompt, positions, greedy, np.random.default_rng(seed)
    )
    seq = prompt + cont
    # forward_cached from an empty cache: every pair's models have it (GPT, HF, reduced vocab)
    p_logits = pair.verifier.forward_cached([seq], [None])[0][0][len(prompt) - 1 : -1]
    p = torch.softmax(p_logits.double(), -1)
    q_logits = pair.drafter.forward_cached([seq], [None])[0][0][len(prompt) - 1 : -1].double()
    if greedy:
        return float((q_logits.argmax(-1) == p.argmax(-1)).double().mean())
    q = torch.softmax(q_logits, -1)
    return float(torch.minimum(p, q).sum(-1).mean())


def forward_ratio(pair, context: int = 96, reps: int = 15) -> dict:
    """Seconds of one cached one-token forward, drafter against verifier, timed side by side
    (interleaved, medians), and the ratio: what "the drafter costs 1/N of the verifier"
    means on the machine at hand."""
    rng = np.random.default_rng(2)
    prompt = [int(t) for t in rng.integers(1, pair.verifier.cfg.vocab_size, context)]
    caches = {}
    for name in ("drafter", "verifier"):
        _, c = getattr(pair, name).forward_cached([prompt], [None])
        caches[name] = c[0]
    times = {"drafter": [], "verifier": []}
    for i in range(reps + 2):
        for name in ("drafter", "verifier"):
            t0 = time.perf_counter()
            getattr(pair, name).forward_cached([[int(prompt[i % context])]], [caches[name]])
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    d, v = (float(np.median(times[n])) for n in ("drafter", "verifier"))
    return {"drafter_s": d, "verifier_s": v, "ratio": d / v}


def load_named_pair(name: str = "builtin", model_dir=None):
    if name == "smollm2":
        from multispin_env.live.smollm2 import SmolPair

        return SmolPair()
    return load_pair(model_dir)


def calibrate(
    model_dir=None,
    per_category: int = 12,
    prompt_tokens: int = 64,
    pair_name: str = "builtin",
    positions: int = 24,
) -> dict:
    torch.set_num_threads(1)
    pair = load_named_pair(pair_name, model_dir)
    verification_rows = time_verification(pair.verifier)
    fits = fit_verification(verification_rows)
    drafter = time_drafter(pair.drafter)
    ratio = forward_ratio(pair)
    if pair_name == "smollm2":  # the committed chat prompts' held-out split
        prompts = pair.category_prompts(per_category)
    else:
        prompts = category_prompts(pair, per_category, prompt_tokens)
    acceptance = {}
    for mode in ("greedy", "sampling"):
        acceptance[mode] = {}
        for cat, plist in prompts.items():
            values = np.array(
                [
                    prompt_acceptance(pair, p, mode == "greedy", positions, seed=i)
                    for i, p in enumerate(plist)
                ]
            )
            acceptance[mode][cat] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "prompts": len(values),
            }
    vocab = pair.verifier.cfg.vocab_size
    kept = min(1024, vocab)
    return {
        "verification_samples": verification_rows,
        "verification": fits,
        "drafter_per_token": drafter,
        "forward_ratio": ratio,
        "acceptance": acceptance,
        "vocab_size": vocab,
        "kept_vocab": kept,
        "payload_bits": kept * (16 + math.ceil(math.log2(vocab))),
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
        },
    }


def profile_document(
    measured: dict,
    mode: str = "sampling",
    name: str = "demo-pair-cpu",
    base: str = "paper-llama2",
    num_users: int = 8,
    max_draft_length: int = 8,
    command: str = "",
) -> dict:
    """A scenario preset from the measurements (channel constants from ``base``)."""
    doc = load_preset_document(base)
    doc.pop("provenance", None)
    ta = measured["verification"]["token_aware"]
    max_std = lambda m: 0.99 * math.sqrt(m * (1 - m))  # noqa: E731  (Beta feasibility)
    doc.update(
        {
            "name": name,
            "num_users": num_users,
            "max_draft_length": max_draft_length,
            "t_draft_mean_s": round(measured["drafter_per_token"]["mean_s"], 6),
            "vocab_size": measured["vocab_size"],
            "kept_vocab": measured["kept_vocab"],
            "verification": {
                "kind": "token_aware",
                "t_fix_s": round(ta["t_fix_s"], 6),
                "t_user_s": round(ta["t_user_s"], 7),
                "t_token_s": round(ta["t_token_s"], 7),
            },
            "tasks": [
                {
                    "name": cat,
                    "alpha_mean": round(v["mean"], 4),
                    "alpha_std": round(min(v["std"], max_std(v["mean"])), 4),
                }
                for cat, v in measured["acceptance"][mode].items()
            ],
            "server_t_draft_s": round(measured["drafter_per_token"]["mean_s"], 6),
        }
    )
    doc["provenance"] = {
        "source": "measured on this machine with the live models (multispin calibrate)",
        "command": command,
        "decoding_mode": mode,
        "verification_fits": measured["verification"],
        "drafter_per_token": measured["drafter_per_token"],
        "acceptance": measured["acceptance"],
        "payload_bits": measured["payload_bits"],
        "host": measured["host"],
        "channel": f"tx power, noise, gains and bandwidth from the {base} preset",
    }
    return doc


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="multispin calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pair folder (default: the built-in pair)")
    p.add_argument(
        "--pair",
        default="builtin",
        choices=["builtin", "smollm2"],
        help="smollm2: SmolLM2-135M-Instruct and its distilled drafter on the chat prompts",
    )
    p.add_argument("--positions", type=int, default=24, help="answer tokens scored per prompt")
    p.add_argument(
        "--report",
        default=None,
        help="folder for acceptance.md (the per-category table) and calibration.json",
    )
    p.add_argument(
        "--out",
        default=None,
        help="profile to write (default multispin_env/presets/{demo-pair,smollm2}-cpu.yaml)",
    )
    p.add_argument("--mode", default="sampling", choices=["sampling", "greedy"])
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--per-category", type=int, default=12)
    a = p.parse_args(argv)
    for flag in ("users", "per_category", "positions"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if a.pair == "smollm2" and a.model:
        p.error("--pair smollm2 brings its own models: leave out --model")
    if a.out is None:
        stem = "smollm2-cpu" if a.pair == "smollm2" else "demo-pair-cpu"
        a.out = f"multispin_env/presets/{stem}.yaml"
    if not Path(a.out).parent.is_dir():  # before minutes of measuring, not after
        p.error(f"--out {a.out}: folder {Path(a.out).parent} does not exist")
    measured = calibrate(a.model, a.per_category, pair_name=a.pair, positions=a.positions)
    command = "multispin calibrate " + " ".join(argv if argv is not None else [])
    doc = profile_document(
        measured, a.mode, Path(a.out).stem, num_users=a.users, command=command.strip()
    )
    Path(a.out).write_text(yaml.safe_dump(doc, sort_keys=False))
    v = measured["verification"]
    print(f"drafter: {1e3 * measured['drafter_per_token']['mean_s']:.2f} ms/token")
    r = measured["forward_ratio"]
    print(
        f"one-token forward: drafter {1e3 * r['drafter_s']:.2f} ms, verifier "
        f"{1e3 * r['verifier_s']:.2f} ms (ratio 1/{1 / r['ratio']:.1f})"
    )
    print(
        f"verification affine: T_fix {1e3 * v['affine']['t_fix_s']:.2f} ms + K x "
        f"{1e3 * v['affine']['t_lin_s']:.2f} ms (R2 {v['affine']['r2']:.3f}, worst "
        f"{100 * v['affine']['worst_rel_error']:.0f}%)"
    )
    ta = v["token_aware"]
    print(
        f"verification token-aware: {1e3 * ta['t_fix_s']:.2f} ms + K x "
        f"{1e3 * ta['t_user_s']:.3f} ms + K(L+1) x {1e3 * ta['t_token_s']:.3f} ms "
        f"(R2 {ta['r2']:.3f}, worst {100 * ta['worst_rel_error']:.0f}%)"
    )
    for mode, cats in measured["acceptance"].items():
        print(
            mode
            + ": "
            + ", ".join(
                f"{c} {s['mean']:.3f}±{s['std']:.3f} (n={s['prompts']})" for c, s in cats.items()
            )
        )
    print(f"wrote {a.out}")
    if a.report:
        write_report(measured, Path(a.report), command.strip())
    return measured


def write_report(measured: dict, folder: Path, command: str) -> None:
    """The acceptance table (category x mode) and every measured figure, for the README."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    r = measured["forward_ratio"]
    lines = [
        f"`{command}`",
        "",
        "Exact per-token acceptance along the verifier's own continuation of each held-out "
        "prompt (sampling: mean of sum_x min(p, q); greedy: argmax agreement); mean ± std "
        "over prompts.",
        "",
        "| category | prompts | greedy | sampling |",
        "|---|---|---|---|",
    ]
    greedy, sampling = measured["acceptance"]["greedy"], measured["acceptance"]["sampling"]
    for cat, g in greedy.items():
        s_ = sampling[cat]
        lines.append(
            f"| {cat} | {g['prompts']} | {g['mean']:.3f} ± {g['std']:.3f} | "
            f"{s_['mean']:.3f} ± {s_['std']:.3f} |"
        )
    for mode in ("greedy", "sampling"):
        cats = measured["acceptance"][mode].values()
        n = sum(c["prompts"] for c in cats)
        measured.setdefault("overall", {})[mode] = sum(c["mean"] * c["prompts"] for c in cats) / n
    lines.append(
        f"| **all** | {n} | **{measured['overall']['greedy']:.3f}** | "
        f"**{measured['overall']['sampling']:.3f}** |"
    )
    lines += [
        "",
        f"One-token cached forward, timed side by side: drafter {1e3 * r['drafter_s']:.2f} ms, "
        f"verifier {1e3 * r['verifier_s']:.2f} ms (drafter = 1/{1 / r['ratio']:.1f} of the "
        "verifier).",
    ]
    (folder / "acceptance.md").write_text("\n".join(lines) + "\n")
    (folder / "calibration.json").write_text(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
