"""Fit the simulator's token-level confidence/acceptance model on the built-in pair.

    python -m multispin_eval.fit_token_model [--prompts 16] [--gen-tokens 192] [--stride 2]

The confidence-based early stop (AdaEDL, arXiv 2410.18351) needs a token-level model: a
request of mean acceptance alpha has, at drafted position i, the latent acceptance
probability a_i = sigmoid(m + s z_i) with z_i ~ N(0, 1) i.i.d. and m such that E[a_i] = alpha,
and the drafter sees a confidence c_i = sigmoid(m + s z_i + sigma e_i), e_i ~ N(0, 1): the
logit of the confidence is the logit of the acceptance plus noise. This script measures, on
the committed drafter/verifier pair (``multispin_env/live/models/demo-pair``):

- the text: held-out stdlib openings (the live CLI's default prompts) continued by sampling
  from the *verifier* at the live temperature, because committed text in speculative
  sampling is distributed exactly as the verifier's;
- the drafts: at many start points along that text the drafter drafts ``--draft-len``
  tokens autoregressively (sampled from its uploaded top-``kept_vocab`` fp16 PMF, as a live
  device does), and at every drafted position the verifier's p is computed at the same
  context (teacher forcing on the drafter's own tokens, with KV caches of the shared text);
- per drafted position: a = sum_v min(p_v, q_v) (the exact acceptance probability of the
  speculative-sampling rule, with q the uploaded PMF), the drafter's entropy H (nats) and top
  probability (both of its full tempered softmax).

Two confidence proxies are compared by their correlation with logit(a): AdaEDL's bound
c = 1 - sqrt(gamma H) (gamma = 0.2) and the top probability. The fit (``fit_logit_model``):
s = std logit(a); rho = Pearson corr(logit a, logit c) of the better proxy; and since in the
model corr = s / sqrt(s^2 + sigma^2), sigma = s sqrt(1 / rho^2 - 1). The fit uses only the
correlation, so it is independent of the proxy's scale: a threshold on the proxy does not
translate one-to-one to a threshold on the model's c, which is why the sanity check compares
the two at matched quantiles. Output: ``results/token_model/builtin_pair.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import optimize, stats

from multispin_env.live.gpt import GPT, cache_crop

EPS = 1e-3
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
BOOTSTRAP = 300


# -- the estimator and the model (pure functions) --------------------------------------------
def logit(x, eps: float = EPS) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float64), eps, 1.0 - eps)
    return np.log(x) - np.log1p(-x)


def adaedl_confidence(entropy, gamma: float = 0.2) -> np.ndarray:
    """AdaEDL's lower bound on the acceptance probability, 1 - sqrt(gamma H), clipped."""
    h = np.maximum(np.asarray(entropy, dtype=np.float64), 0.0)
    return np.clip(1.0 - np.sqrt(gamma * h), EPS, 1.0 - EPS)


def fit_logit_model(a, c) -> tuple[float, float, float]:
    """(s, sigma, rho) of the model logit(c) = logit(a) + sigma e from paired samples.

    s is the standard deviation of logit(a) (a clipped to [1e-3, 1 - 1e-3]); rho the Pearson
    correlation of logit(a) and logit(c); sigma = s sqrt(1/rho^2 - 1), because in the model
    corr = s / sqrt(s^2 + sigma^2). The correlation does not depend on the scale of c, so any
    confidence that is an increasing affine function of the model's in logit space gives the
    same fit. A confidence that is not positively correlated gives sigma = inf."""
    la, lc = logit(a), logit(c)
    if la.shape != lc.shape or la.size < 3:
        raise ValueError("a and c need the same shape and at least 3 samples")
    s = float(np.std(la))
    if s == 0.0 or np.std(lc) == 0.0:
        raise ValueError("a or c is constant: the correlation is undefined")
    rho = float(np.corrcoef(la, lc)[0, 1])
    sigma = s * float(np.sqrt(max(1.0 / rho**2 - 1.0, 0.0))) if rho > 0 else float("inf")
    return s, sigma, rho


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(64)
_GH_W = _GH_W / _GH_W.sum()


def mean_acceptance(m: float, s: float) -> float:
    """E[sigmoid(m + s z)], z ~ N(0, 1) (Gauss-Hermite quadrature)."""
    return float(np.sum(_GH_W / (1.0 + np.exp(-(m + s * _GH_X)))))


def solve_mean_logit(alpha: float, s: float) -> float:
    """The m with E[sigmoid(m + s z)] = alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    return float(optimize.brentq(lambda m: mean_acceptance(m, s) - alpha, -60.0, 60.0))


def simulate_model(
    alpha: float, s: float, sigma: float, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n tokens of the fitted model: (latent acceptance a, confidence c)."""
    m = solve_mean_logit(alpha, s)
    z = rng.standard_normal(n)
    e = rng.standard_normal(n)
    a = 1.0 / (1.0 + np.exp(-(m + s * z)))
    c = 1.0 / (1.0 + np.exp(-(m + s * z + sigma * e)))
    return a, c


def threshold_table(a, c, a_sim, c_sim, quantiles=QUANTILES) -> list[dict]:
    """Mean acceptance among tokens whose confidence is at or above the q-quantile of the
    confidence, measured (proxy c) and simulated (model c), at matched quantiles."""
    rows = []
    for q in quantiles:
        t, t_sim = float(np.quantile(c, q)), float(np.quantile(c_sim, q))
        rows.append(
            {
                "quantile": q,
                "threshold_measured": t,
                "mean_a_measured": float(np.mean(a[c >= t])),
                "threshold_model": t_sim,
                "mean_a_model": float(np.mean(a_sim[c_sim >= t_sim])),
            }
        )
    return rows


def fit_tokens(tokens: dict, gamma: float = 0.2, seed: int = 0, n_sim: int = 400_000) -> dict:
    """The whole fit from measured tokens (``a``, ``entropy``, ``top_prob`` arrays)."""
    a = np.asarray(tokens["a"], dtype=np.float64)
    proxies = {
        "adaedl_entropy": adaedl_confidence(tokens["entropy"], gamma),
        "top_prob": np.clip(np.asarray(tokens["top_prob"], dtype=np.float64), EPS, 1 - EPS),
    }
    la = logit(a)
    corr = {}
    for name, c in proxies.items():
        lc = logit(c)
        corr[name] = {
            "pearson": float(np.corrcoef(la, lc)[0, 1]),
            "spearman": float(stats.spearmanr(la, lc).statistic),
        }
    proxy = max(corr, key=lambda k: corr[k]["pearson"])
    c = proxies[proxy]
    s, sigma, rho = fit_logit_model(a, c)
    alpha = float(np.mean(a))
    a_sim, c_sim = simulate_model(alpha, s, sigma, n_sim, np.random.default_rng(seed))
    pos = np.asarray(tokens.get("position", np.zeros(a.size, dtype=int)))
    prompt = np.asarray(tokens.get("prompt", np.zeros(a.size, dtype=int)))
    return {
        "token_logit_std": s,
        "confidence_noise_std": sigma,
        "alpha_mean": alpha,
        "proxy": proxy,
        "rho": rho,
        "n_tokens": int(a.size),
        "gamma": gamma,
        "correlations": corr,
        "ci95_prompt_bootstrap": _bootstrap(a, c, prompt, np.random.default_rng(seed + 1)),
        "adaedl_clipped_frac": float(np.mean(proxies["adaedl_entropy"] <= EPS)),
        "mean_logit_fitted_m": solve_mean_logit(alpha, s),
        "mean_logit_measured": float(np.mean(la)),
        "logit_a_skew": float(stats.skew(la)),
        "logit_a_excess_kurtosis": float(stats.kurtosis(la)),
        "alpha_by_draft_position": [float(np.mean(a[pos == i])) for i in np.unique(pos)],
        "lag1_corr_logit_a_in_draft": _lag1(la, pos),
        "check_table": threshold_table(a, c, a_sim, c_sim),
    }


def _lag1(la: np.ndarray, pos: np.ndarray) -> float | None:
    """Correlation of logit(a) at consecutive positions of the same draft (the model says
    0: i.i.d. z_i). Tokens are stored draft by draft, position 1 first."""
    nxt = np.flatnonzero((pos[:-1] + 1 == pos[1:]) & (pos[:-1] > 0))
    if nxt.size < 3:
        return None
    return float(np.corrcoef(la[nxt], la[nxt + 1])[0, 1])


def _bootstrap(a, c, prompt, rng, n: int = BOOTSTRAP) -> dict | None:
    """95% intervals of (s, sigma, rho, alpha), resampling whole prompts (tokens of one
    prompt share text and are not independent)."""
    ids = np.unique(prompt)
    if ids.size < 3:
        return None
    rows = [np.flatnonzero(prompt == i) for i in ids]
    draws = []
    for _ in range(n):
        take = np.concatenate([rows[j] for j in rng.integers(0, ids.size, ids.size)])
        draws.append((*fit_logit_model(a[take], c[take]), float(np.mean(a[take]))))
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    names = ("token_logit_std", "confidence_noise_std", "rho", "alpha_mean")
    return {k: [float(x), float(y)] for k, x, y in zip(names, lo, hi, strict=True)}


# -- measuring the pair ------------------------------------------------------------------
def _uploaded_pmf(logits: torch.Tensor, temperature: float, kept: int) -> torch.Tensor:
    """Rows of the dense PMF a device samples from and uploads: top-k of softmax(l / T),
    renormalised, quantised to fp16 and renormalised again (as ``truncated_pmf`` and
    ``uploaded_distribution`` in multispin_env/live/speculative.py, batched)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    values, indices = torch.topk(probs, min(kept, probs.shape[-1]), dim=-1)
    values = (values / values.sum(-1, keepdim=True)).half().double()
    values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, indices, values)


def _sample_rows(probs: torch.Tensor, rng: np.random.Generator) -> list[int]:
    cdf = np.cumsum(probs.numpy(), axis=-1)
    u = rng.random(cdf.shape[0]) * cdf[:, -1]
    return [int(min(np.searchsorted(row, x, side="right"), cdf.shape[1] - 1)) for row, x in
            zip(cdf, u, strict=True)]  # fmt: skip


def continue_with_verifier(
    verifier: GPT, prompts: list[list[int]], new_tokens: int, temperature: float, rng
) -> list[list[int]]:
    """Each prompt followed by ``new_tokens`` sampled from the verifier (batched, cached)."""
    seqs = [list(p) for p in prompts]
    feeds, caches = [list(p) for p in prompts], [None] * len(prompts)
    for _ in range(new_tokens):
        logits, caches = verifier.forward_cached(feeds, caches)
        last = torch.stack([row[-1] for row in logits])
        nxt = _sample_rows(torch.softmax(last.double() / temperature, -1), rng)
        for seq, x in zip(seqs, nxt, strict=True):
            seq.append(x)
        feeds = [[x] for x in nxt]
    return seqs


def measure_sequence(
    pair,
    seq: list[int],
    starts: list[int],
    draft_len: int,
    temperature: float,
    kept_vocab: int,
    rng: np.random.Generator,
    prompt_id: int = 0,
) -> dict:
    """Draft ``draft_len`` tokens from every context ``seq[:t]``, t in ``starts`` (batched),
    and score each drafted position against the verifier at the same context."""
    _, (d_full,) = pair.drafter.forward_cached([seq], [None])
    _, (v_full,) = pair.verifier.forward_cached([seq], [None])
    d_caches = [cache_crop(d_full, t - 1) for t in starts]
    feeds = [[seq[t - 1]] for t in starts]
    drafts: list[list[int]] = [[] for _ in starts]
    q_rows, ent_rows, top_rows = [], [], []
    for _ in range(draft_len):
        logits, d_caches = pair.drafter.forward_cached(feeds, d_caches)
        last = torch.stack([row[-1] for row in logits])
        full = torch.softmax(last.double() / temperature, -1)
        ent_rows.append(-(full * torch.log(full.clamp_min(1e-300))).sum(-1))
        top_rows.append(full.max(-1).values)
        q = _uploaded_pmf(last, temperature, kept_vocab)
        q_rows.append(q)
        for d, x in zip(drafts, _sample_rows(q, rng), strict=True):
            d.append(x)
        feeds = [[d[-1]] for d in drafts]
    v_caches = [cache_crop(v_full, t - 1) for t in starts]
    v_logits, _ = pair.verifier.forward_cached(
        [[seq[t - 1]] + d for t, d in zip(starts, drafts, strict=True)], v_caches
    )
    p = torch.softmax(torch.stack([row[:draft_len] for row in v_logits]).double() / temperature, -1)
    q = torch.stack(q_rows, dim=1)  # (starts, L, V)
    a = torch.minimum(p, q).sum(-1)
    return {
        "a": a.numpy().ravel(),
        "entropy": torch.stack(ent_rows, 1).numpy().ravel(),
        "top_prob": torch.stack(top_rows, 1).numpy().ravel(),
        "position": np.tile(np.arange(1, draft_len + 1), len(starts)),
        "prompt": np.full(len(starts) * draft_len, prompt_id),
    }


def collect_tokens(
    pair,
    n_prompts: int = 32,
    prompt_tokens: int = 64,
    gen_tokens: int = 192,
    stride: int = 2,
    draft_len: int = 8,
    temperature: float = 1.0,
    kept_vocab: int = 1024,
    seed: int = 0,
) -> dict:
    """Measured tokens (``a``, ``entropy``, ``top_prob``, ``position`` arrays) of a pair."""
    from multispin_env.live.cli import default_prompts

    rng = np.random.default_rng(seed)
    prompts = default_prompts(pair, n_prompts, tokens=prompt_tokens)
    if not prompts:
        raise ValueError("no held-out prompt of the requested length")
    seqs = continue_with_verifier(pair.verifier, prompts, gen_tokens, temperature, rng)
    starts = list(range(prompt_tokens, prompt_tokens + gen_tokens + 1, stride))
    parts = [
        measure_sequence(pair, seq, starts, draft_len, temperature, kept_vocab, rng, i)
        for i, seq in enumerate(seqs)
    ]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["n_prompts"] = len(prompts)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pair folder (default: the built-in pair)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=192)
    p.add_argument("--stride", type=int, default=2, help="tokens between draft start points")
    p.add_argument("--draft-len", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0, help="live mode's default")
    p.add_argument("--kept-vocab", type=int, default=1024, help="live mode's default")
    p.add_argument("--gamma", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/token_model/builtin_pair.json")
    a = p.parse_args(argv)
    from multispin_env.live.models import load_pair

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    pair = load_pair(a.model)
    tokens = collect_tokens(
        pair,
        a.prompts,
        a.prompt_tokens,
        a.gen_tokens,
        a.stride,
        a.draft_len,
        a.temperature,
        a.kept_vocab,
        a.seed,
    )
    res = fit_tokens(tokens, a.gamma, a.seed)
    res.update(
        {
            "n_prompts": tokens["n_prompts"],
            "settings": {
                k: getattr(a, k)
                for k in (
                    "prompt_tokens",
                    "gen_tokens",
                    "stride",
                    "draft_len",
                    "temperature",
                    "kept_vocab",
                    "seed",
                )
            },
            "command": shlex.join(
                ["python", "-m", "multispin_eval.fit_token_model"]
                + list(sys.argv[1:] if argv is None else argv)
            ),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    )
    print(
        f"{res['n_tokens']} drafted tokens from {res['n_prompts']} prompts, "
        f"alpha = {res['alpha_mean']:.3f} (by draft position: "
        + " ".join(f"{x:.3f}" for x in res["alpha_by_draft_position"])
        + ")"
    )
    for name, c in res["correlations"].items():
        print(
            f"  proxy {name:<15} Pearson {c['pearson']:+.3f}  Spearman {c['spearman']:+.3f}"
            " (logit a vs logit c)"
        )
    print(
        f"proxy {res['proxy']}: token_logit_std s = {res['token_logit_std']:.3f}, "
        f"rho = {res['rho']:.3f}, confidence_noise_std sigma = "
        f"{res['confidence_noise_std']:.3f}  (m = {res['mean_logit_fitted_m']:.3f}, "
        f"measured mean logit a = {res['mean_logit_measured']:.3f})"
    )
    ci = res["ci95_prompt_bootstrap"]
    if ci:
        print(
            "95% intervals (prompt bootstrap): "
            + ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in ci.items())
        )
    print(
        f"AdaEDL bound clipped to {EPS} on {res['adaedl_clipped_frac']:.0%} of tokens; "
        f"logit(a) skew {res['logit_a_skew']:.2f}, excess kurtosis "
        f"{res['logit_a_excess_kurtosis']:.2f}; lag-1 corr of logit(a) within a draft "
        f"{res['lag1_corr_logit_a_in_draft']:.3f} (model: 0)"
    )
    print("mean acceptance among tokens with confidence >= the q-quantile threshold:")
    print(f"{'q':>5}{'t measured':>12}{'a measured':>12}{'t model':>10}{'a model':>10}")
    for r in res["check_table"]:
        print(
            f"{r['quantile']:>5.2f}{r['threshold_measured']:>12.3f}{r['mean_a_measured']:>12.3f}"
            f"{r['threshold_model']:>10.3f}{r['mean_a_model']:>10.3f}"
        )
    print(f"wall {res['wall_s']} s")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
