"""Measure a pair's acceptance: greedy and sampling, per draft length, on held-out prompts.

    python -m multispin_env.live.acceptance [--model FOLDER] [--users 8] [--rounds 30]

Runs speculative decoding in-process (no network) for several users in batch and reports,
per draft length L: the fraction of drafted tokens accepted, the tokens committed per round
against the i.i.d. formula (1 - a^(L+1)) / (1 - a), and a = the acceptance rate. For
sampling, a is the mean of sum_x min(p(x), q(x)) over drafted positions (the exact per-token
acceptance probability); for greedy, the fraction of drafted positions where the draft equals
the verifier's argmax (counted only up to the first mismatch, as the rule sees them).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from multispin_env.live.models import load_pair
from multispin_env.live.speculative import (
    DecodingConfig,
    DrafterSession,
    VerifierServer,
    uploaded_distribution,
)


def measure(pair, prompts, length: int, rounds: int, greedy: bool, seed: int = 0) -> dict:
    cfg = DecodingConfig(greedy=greedy, kept_vocab=1024)
    server = VerifierServer(pair.verifier, cfg, np.random.default_rng(seed))
    devices = {}
    for uid, prompt in enumerate(prompts):
        server.add_user(uid, prompt)
        devices[uid] = DrafterSession(pair.drafter, cfg, np.random.default_rng(seed + 1 + uid))
        devices[uid].start(prompt)
    drafted = accepted = committed = 0
    alpha_terms: list[float] = []
    max_len = pair.verifier.cfg.n_positions - length - 2
    for _ in range(rounds):
        live = {
            u: d for u, d in devices.items() if len(prompts[u]) + len(server.outputs[u]) < max_len
        }
        if not live:
            break
        drafts = {u: d.propose(length) for u, d in live.items()}
        contexts = {u: prompts[u] + server.outputs[u] for u in live}
        results = server.verify(drafts)
        for u, (m, toks) in results.items():
            live[u].commit(m, toks)
            drafted += length
            accepted += m
            committed += len(toks)
            if not greedy:  # exact acceptance probability at the positions the rule saw
                ctx = contexts[u] + drafts[u].tokens[: m + 1]
                with torch.no_grad():
                    p_all = torch.softmax(pair.verifier(torch.tensor([ctx]))[0].double(), -1)
                for i in range(min(m + 1, length)):
                    p = p_all[len(contexts[u]) - 1 + i].numpy()
                    q = uploaded_distribution(
                        drafts[u].q_indices[i], drafts[u].q_values[i], p.shape[0]
                    )
                    alpha_terms.append(float(np.minimum(p, q).sum()))
            else:
                alpha_terms.extend([1.0] * m + ([0.0] if m < length else []))
    rounds_done = drafted / max(length, 1)
    alpha = float(np.mean(alpha_terms))
    return {
        "L": length,
        "mode": "greedy" if greedy else "sampling",
        "accept_frac": accepted / drafted,
        "alpha": alpha,
        "tokens_per_round": committed / rounds_done,
        "iid_formula": (1 - alpha ** (length + 1)) / (1 - alpha),
    }


def main(argv=None) -> list[dict]:
    from multispin_env.live.cli import default_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pair = load_pair(a.model)
    prompts = default_prompts(pair, a.users, tokens=64)
    rows = [
        measure(pair, prompts, length, a.rounds, greedy)
        for greedy in (True, False)
        for length in a.lengths
    ]
    print(f"{'mode':<9}{'L':>3}{'accept frac':>12}{'alpha':>8}{'tok/round':>11}{'iid formula':>12}")
    for r in rows:
        print(
            f"{r['mode']:<9}{r['L']:>3}{r['accept_frac']:>12.3f}{r['alpha']:>8.3f}"
            f"{r['tokens_per_round']:>11.2f}{r['iid_formula']:>12.2f}"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
