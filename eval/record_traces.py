"""Token-level traces of a live pair: what every drafted token was, and whether it passed.

    multispin record-traces [--model PAIR | --hf-drafter DIR --hf-verifier DIR]
                            [--per-category 4] [--rounds 24] [--lengths 1 2 4 8]

Runs exact speculative decoding in-process (the live code: ``DrafterSession`` drafts,
``VerifierServer`` verifies every user in one batched forward) on prompts of each category
(stdlib packages, as ``multispin calibrate``), for each decoding mode and draft length, and
records:

per drafted token (``tokens.npz``, one array per column, all the same length):
    ``mode`` (0 greedy, 1 sampling), ``draft_length`` L, ``request`` (prompt id),
    ``category`` (index into the manifest's list), ``round`` (the request's round),
    ``position`` (1..L in the draft), ``token``, ``top_prob`` (the drafter's top probability
    of its full tempered softmax at that position), ``entropy`` (nats, of the truncated PMF
    actually uploaded), ``accept_prob`` (sampling: the exact acceptance probability
    sum_x min(p(x), q(x)) with p the verifier's distribution and q the uploaded PMF, both at
    that position given the draft before it; greedy: 1 if the token is the verifier's argmax
    there, else 0), ``accepted`` (the rule accepted it), ``reached`` (the rule looked at it:
    every position up to the first rejection);

per round (``rounds.npz``): ``mode``, ``draft_length``, ``round``, ``users`` (K),
``padded_length`` (the longest draft), ``verify_s`` (measured batched verification),
``draft_s_per_token`` (the users' mean drafting CPU seconds per token).

``manifest.json`` holds the pair (folder and sha256 of its manifest, or the HF folders),
the decoding settings, the categories, the machine, the versions, the command and the
column descriptions. ``report.md`` compares, per mode and L, the live per-position acceptance
P(token i accepted | drafted) and tokens per round with the simulator's i.i.d. law
(alpha^i and (1 - alpha^(L+1)) / (1 - alpha), alpha the mean ``accept_prob``), and gives the
correlation of a request's acceptance between consecutive rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

TOKEN_COLUMNS = {
    "mode": "0 greedy, 1 sampling",
    "draft_length": "L of the round",
    "request": "prompt id (one request per prompt)",
    "category": "index into manifest['categories']",
    "round": "the request's round, from 0",
    "position": "1..L within the draft",
    "token": "drafted token id",
    "top_prob": "drafter's top probability of its full tempered softmax",
    "entropy": "entropy (nats) of the uploaded truncated PMF",
    "accept_prob": "sampling: sum min(p, q); greedy: argmax match (0/1)",
    "accepted": "accepted by the rule",
    "reached": "the rule looked at it (up to the first rejection)",
}
ROUND_COLUMNS = {
    "mode": "0 greedy, 1 sampling",
    "draft_length": "L",
    "round": "round index",
    "users": "K in the batch",
    "padded_length": "longest draft in the batch",
    "verify_s": "measured batched verification seconds",
    "draft_s_per_token": "mean drafting CPU seconds per token over the users",
}


@torch.no_grad()
def _position_stats(pair, context: list[int], draft, cfg) -> tuple[np.ndarray, ...]:
    """(top_prob, entropy, accept_prob) at every drafted position, by teacher forcing the
    draft through both models once (no caches: exact, and cheap for small models)."""
    from multispin_env.live.speculative import uploaded_distribution

    seq = torch.tensor([context + draft.tokens])
    start, n = len(context) - 1, len(draft.tokens)
    v_logits = pair.verifier(seq)[0, start : start + n].double()
    d_logits = pair.drafter(seq)[0, start : start + n].double()
    top = torch.softmax(d_logits / cfg.temperature, -1).max(-1).values.numpy()
    values = draft.q_values.astype(np.float64)
    q_rows = values / values.sum(axis=1, keepdims=True)
    entropy = -(q_rows * np.log(np.clip(q_rows, 1e-300, None))).sum(axis=1)
    if cfg.greedy:
        accept = (v_logits.argmax(-1).numpy() == np.array(draft.tokens)).astype(np.float64)
    else:
        p = torch.softmax(v_logits / cfg.temperature, -1).numpy()
        vocab = p.shape[1]
        q = [uploaded_distribution(draft.q_indices[i], draft.q_values[i], vocab) for i in range(n)]
        accept = np.array([np.minimum(p[i], q[i]).sum() for i in range(n)])
    return top, entropy, accept


def record(pair, prompts: dict, lengths, rounds: int, greedy: bool, temperature=1.0,
           kept_vocab=1024, seed=0, progress=None) -> tuple[dict, dict]:  # fmt: skip
    """Token and round columns of one decoding mode, every draft length."""
    from multispin_env.live.speculative import DecodingConfig, DrafterSession, VerifierServer

    cfg = DecodingConfig(greedy=greedy, temperature=temperature, kept_vocab=kept_vocab)
    flat = [(c, p) for c, plist in enumerate(prompts.values()) for p in plist]
    tok = {k: [] for k in TOKEN_COLUMNS}
    rnd = {k: [] for k in ROUND_COLUMNS}
    context_limit = pair.verifier.cfg.n_positions
    for length in lengths:
        rng = np.random.default_rng(seed + length)
        server = VerifierServer(pair.verifier, cfg, rng)
        devices = {}
        for uid, (_, prompt) in enumerate(flat):
            server.add_user(uid, list(prompt))
            device_rng = np.random.default_rng(rng.integers(1 << 62))
            devices[uid] = DrafterSession(pair.drafter, cfg, device_rng)
            devices[uid].start(list(prompt))
        for r in range(rounds):
            live = [
                u for u in devices
                if len(flat[u][1]) + len(server.outputs[u]) + length + 2 < context_limit
            ]  # fmt: skip
            if not live:
                break
            drafts, per_token = {}, []
            for u in live:
                t0 = time.thread_time()
                drafts[u] = devices[u].propose(length)
                per_token.append((time.thread_time() - t0) / length)
            contexts = {u: flat[u][1] + server.outputs[u] for u in live}
            t0 = time.perf_counter()
            results = server.verify(drafts)
            verify_s = time.perf_counter() - t0
            for u in live:
                m, committed = results[u]
                devices[u].commit(m, committed)
                top, entropy, accept = _position_stats(pair, contexts[u], drafts[u], cfg)
                for i in range(length):
                    tok["mode"].append(0 if greedy else 1)
                    tok["draft_length"].append(length)
                    tok["request"].append(u)
                    tok["category"].append(flat[u][0])
                    tok["round"].append(r)
                    tok["position"].append(i + 1)
                    tok["token"].append(drafts[u].tokens[i])
                    tok["top_prob"].append(top[i])
                    tok["entropy"].append(entropy[i])
                    tok["accept_prob"].append(accept[i])
                    tok["accepted"].append(i < m)
                    tok["reached"].append(i <= m)
            for key, value in (
                ("mode", 0 if greedy else 1),
                ("draft_length", length),
                ("round", r),
                ("users", len(live)),
                ("padded_length", length),
                ("verify_s", verify_s),
                ("draft_s_per_token", float(np.mean(per_token))),
            ):
                rnd[key].append(value)
            if progress is not None:
                progress.update(1)
    return tok, rnd


def _columns(parts: list[dict], names: dict) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        values = np.concatenate([np.asarray(p[name]) for p in parts])
        if values.dtype == np.float64 and name not in ("verify_s", "draft_s_per_token"):
            values = values.astype(np.float32)
        elif values.dtype.kind in "iu":
            values = values.astype(np.int32)
        out[name] = values
    return out


def summarise(tokens: dict[str, np.ndarray]) -> list[dict]:
    """Per mode and L: live per-position acceptance and tokens per round, and the i.i.d.
    law's prediction from the mean exact acceptance probability."""
    rows = []
    for mode in np.unique(tokens["mode"]):
        for length in np.unique(tokens["draft_length"]):
            sel = (tokens["mode"] == mode) & (tokens["draft_length"] == length)
            if not sel.any():
                continue
            alpha = float(tokens["accept_prob"][sel].mean())
            per_position = [
                float(tokens["accepted"][sel & (tokens["position"] == i)].mean())
                for i in range(1, length + 1)
            ]
            rounds = sel & (tokens["position"] == 1)
            accepted = tokens["accepted"][sel].reshape(-1, length).sum(axis=1)
            iid = [alpha**i for i in range(1, length + 1)]
            rows.append(
                {
                    "mode": "greedy" if mode == 0 else "sampling",
                    "L": int(length),
                    "rounds": int(rounds.sum()),
                    "alpha": alpha,
                    "per_position": per_position,
                    "iid_per_position": iid,
                    "max_position_gap": float(np.max(np.abs(np.array(per_position) - iid))),
                    "tokens_per_round": float(accepted.mean() + 1),
                    "iid_tokens_per_round": (1 - alpha ** (length + 1)) / (1 - alpha),
                    "lag1_round_corr": _lag1(tokens, sel),
                }
            )
    return rows


def fit_position_model(tokens: dict[str, np.ndarray], pseudo_counts: float = 20.0) -> dict:
    """Per decoding mode: the first position's acceptance alpha_1 and the conditional
    acceptance of every later position given the ones before it, pooled over draft lengths,
    as factors c_i = P(i | i - 1) / alpha_1 (``ScenarioConfig.acceptance_position_factors``).
    Each conditional is shrunk towards alpha_1 by ``pseudo_counts`` (few long drafts reach
    the last positions)."""
    out = {}
    for mode in np.unique(tokens["mode"]):
        sel = tokens["mode"] == mode
        length = tokens["draft_length"][sel]
        position = tokens["position"][sel]
        accepted = tokens["accepted"][sel].astype(bool)
        first = position == 1
        alpha_1 = float(accepted[first].mean())
        factors = [1.0]
        for i in range(2, int(length.max()) + 1):
            here = position == i
            tried = int(np.sum(accepted[np.flatnonzero(here) - 1]))  # the previous one passed
            passed = int(np.sum(accepted[here]))
            conditional = (passed + pseudo_counts * alpha_1) / (tried + pseudo_counts)
            factors.append(conditional / alpha_1)
        out["greedy" if mode == 0 else "sampling"] = {
            "alpha_1": alpha_1,
            "factors": factors,
            "pseudo_counts": pseudo_counts,
        }
    return out


def _lag1(tokens, sel) -> float:
    """Correlation of a request's mean acceptance probability between consecutive rounds."""
    key = tokens["request"][sel].astype(np.int64) * 10_000 + tokens["round"][sel]
    order = np.argsort(key, kind="stable")
    req, rnd = tokens["request"][sel][order], tokens["round"][sel][order]
    acc = tokens["accept_prob"][sel][order]
    pairs = np.stack([req, rnd], 1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    means = np.bincount(inverse.ravel(), weights=acc) / np.bincount(inverse.ravel())
    same = uniq[1:, 0] == uniq[:-1, 0]
    if same.sum() < 3:
        return float("nan")
    return float(np.corrcoef(means[1:][same], means[:-1][same])[0, 1])


def report_markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | L | rounds | alpha | P(i accepted), live | alpha^i (i.i.d.) | max gap | "
        "tokens/round live | i.i.d. | gap | lag-1 corr |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['L']} | {r['rounds']} | {r['alpha']:.3f} | "
            + " ".join(f"{x:.2f}" for x in r["per_position"])
            + " | "
            + " ".join(f"{x:.2f}" for x in r["iid_per_position"])
            + f" | {r['max_position_gap']:.3f} | {r['tokens_per_round']:.2f} | "
            f"{r['iid_tokens_per_round']:.2f} | "
            f"{100 * (r['iid_tokens_per_round'] / r['tokens_per_round'] - 1):+.1f}% | "
            f"{r['lag1_round_corr']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from tqdm import tqdm

    from multispin_env.live.calibrate import CATEGORIES, category_prompts
    from multispin_env.live.models import load_pair

    p = argparse.ArgumentParser(prog="multispin record-traces", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pair folder (default: the built-in pair)")
    p.add_argument("--hf-drafter", default=None, help="local Hugging Face drafter folder")
    p.add_argument("--hf-verifier", default=None, help="local Hugging Face verifier folder")
    p.add_argument(
        "--per-category", type=int, default=4, help="prompts (requests) per category (>= 3)"
    )
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
    p.add_argument("--rounds", type=int, default=24, help="rounds per request and draft length")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4, 8], help="draft lengths")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--kept-vocab", type=int, default=1024, help="uploaded PMF entries per token")
    p.add_argument(
        "--skip",
        type=int,
        default=0,
        help="prompt windows to skip per category (a held-out set: --skip 6)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/traces/builtin_pair", help="output folder")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=["greedy", "sampling"],
        default=["greedy", "sampling"],
        help="decoding modes to record (default both)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.skip < 0:
        p.error("--skip must be >= 0")
    if a.per_category < 3:
        p.error("--per-category must be >= 3 (a category with fewer prompts is left out)")
    for flag in ("prompt_tokens", "rounds", "kept_vocab"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if min(a.lengths) < 1:
        p.error("--lengths must be >= 1")
    if not (np.isfinite(a.temperature) and a.temperature > 0):
        p.error("--temperature must be a finite number > 0")
    if bool(a.hf_drafter) != bool(a.hf_verifier):
        p.error("--hf-drafter and --hf-verifier go together (a pair sharing one tokenizer)")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if a.hf_verifier:
        from multispin_env.live.hf import HFPair

        pair = HFPair(a.hf_drafter, a.hf_verifier)
        pair_info = {"hf_drafter": a.hf_drafter, "hf_verifier": a.hf_verifier}
    else:
        pair = load_pair(a.model)
        folder = (
            Path(a.model)
            if a.model
            else Path(__file__).resolve().parents[1] / ("multispin_env/live/models/demo-pair")
        )
        manifest = folder / "MANIFEST.json"
        pair_info = {
            "folder": str(a.model or "built-in demo-pair"),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
            if manifest.is_file()
            else None,
        }
    prompts = category_prompts(pair, a.per_category + a.skip, a.prompt_tokens)
    prompts = {c: plist[a.skip :] for c, plist in prompts.items() if len(plist) >= a.skip + 3}
    if not prompts:
        p.error(f"--skip {a.skip} leaves no category with 3 prompts; skip fewer")
    requests = sum(len(v) for v in prompts.values())
    modes = [m == "greedy" for m in ("greedy", "sampling") if m in a.modes]
    bar = tqdm(total=len(modes) * len(a.lengths) * a.rounds, desc="rounds", disable=a.quiet)
    parts_tok, parts_rnd = [], []
    for greedy in modes:
        tok, rnd = record(
            pair, prompts, a.lengths, a.rounds, greedy, a.temperature, a.kept_vocab, a.seed, bar
        )
        parts_tok.append(tok)
        parts_rnd.append(rnd)
    bar.close()
    tokens = _columns(parts_tok, TOKEN_COLUMNS)
    rounds = _columns(parts_rnd, ROUND_COLUMNS)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "tokens.npz", **tokens)
    np.savez_compressed(out / "rounds.npz", **rounds)
    rows = summarise(tokens)
    manifest = {
        "format": 1,
        "pair": pair_info,
        "decoding": {"temperature": a.temperature, "kept_vocab": a.kept_vocab},
        "categories": [c for c in CATEGORIES if c in prompts],
        "requests": requests,
        "lengths": a.lengths,
        "rounds_per_request": a.rounds,
        "token_columns": TOKEN_COLUMNS,
        "round_columns": ROUND_COLUMNS,
        "tokens": int(len(tokens["mode"])),
        "machine": {"machine": platform.machine(), "processor": platform.processor()},
        "versions": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "numpy": np.__version__,
        },
        "command": "multispin record-traces "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "wall_s": time.perf_counter() - t0,
        "summary": rows,
        "position_model": fit_position_model(tokens),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    table = report_markdown(rows)
    (out / "report.md").write_text(table)
    print(table)
    print(f"{manifest['tokens']} drafted tokens from {requests} requests -> {out.resolve()}")
    return manifest


if __name__ == "__main__":
    main()
