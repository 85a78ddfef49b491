"""The SmolLM2 pair's drafter, distilled: ``python -m multispin_env.live.distil_smollm2 build``.

No small model shares SmolLM2's tokenizer, so the project makes one. Two stages:

1. ``generate``: SmolLM2-135M-Instruct answers the committed ``train`` chat prompts
   (:mod:`multispin_env.live.chat_prompts`), three quarters sampled at T=1 and a quarter
   greedy, and we keep, for every answer token, the verifier's top-``k`` next-token
   probabilities: soft targets carry far more than the sampled token alone (DistillSpec).
2. ``train``: a *self-speculative* drafter (Kangaroo, LayerSkip): SmolLM2's first 4 of 30
   layers with an early exit. Layers 0-1 are SmolLM2's own, frozen, and not stored (the
   converted checkpoint supplies them); layers 2-3 and the final norm are trained as the exit;
   the output layer is SmolLM2's tied embedding restricted to a *draft vocabulary* of the
   12,288 tokens holding the most soft-target mass (FR-Spec's reduced draft vocabulary). A
   token outside it is never drafted (q = 0), which costs acceptance only the verifier's mass
   there, and verification stays exact. Loss: cross-entropy to the renormalised top-k soft
   targets on answer positions; the step with the best validation acceptance is kept.

Per drafted token the drafter computes 4 layers and a 12,288-row output layer, about 0.16 of
SmolLM2's 30 layers and 49,152-row output layer. The folder it writes
(``multispin_env/live/models/smollm2-drafter``: ``drafter.safetensors`` with the trained
tensors in fp16, ``vocab.json``, ``selfspec.json`` naming the SmolLM2 checkpoint by sha256,
``MANIFEST.json`` with the command, versions and training record) is what
:func:`multispin_env.live.models.load_drafter` loads. Both stages are seeded; bit-identical
results also need the same thread count, torch build and CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SMOLLM2_VOCAB = 49152  # SmolLM2's tokenizer: every id the verifier can score


def generate(
    out: Path,
    *,
    top_k: int = 16,
    max_new: int = 128,
    batch: int = 32,
    greedy_every: int = 4,
    seed: int = 0,
    limit: int | None = None,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

    from multispin_env.live import chat_prompts, smollm2

    torch.set_num_threads(2)
    folder = smollm2.convert()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    rows = chat_prompts.load("train")[:limit]
    prompts = [smollm2.chat_ids(tok, r["prompt"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    class Keep(LogitsProcessor):
        def __init__(self):
            self.steps = []

        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.float(), dim=-1)
            p, i = probs.topk(top_k, dim=-1)
            self.steps.append((i.to(torch.int32), p.to(torch.float16)))
            return scores

    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("--limit must be at least 1 (the prompts to answer)")
    records, t0, n_tokens = [], time.time(), 0
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    for b, idx in enumerate(batches):
        greedy = b % greedy_every == greedy_every - 1
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        keep = Keep()
        torch.manual_seed(seed * 100_003 + b)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=not greedy,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                logits_processor=[keep],
                eos_token_id=eos,
                pad_token_id=pad,
            )
        answer = gen[:, width:]
        top_i = torch.stack([s[0] for s in keep.steps], dim=1)
        top_p = torch.stack([s[1] for s in keep.steps], dim=1)
        for r, i in enumerate(idx):
            toks = answer[r].tolist()
            n = toks.index(eos) + 1 if eos in toks else len(toks)
            records.append(
                {
                    "row": i,
                    "category": rows[i]["category"],
                    "greedy": greedy,
                    "prompt": prompts[i],
                    "answer": toks[:n],
                    "top_ids": top_i[r, :n].numpy(),
                    "top_p": top_p[r, :n].numpy(),
                }
            )
            n_tokens += n
        rate = n_tokens / (time.time() - t0)
        print(
            f"[generate] batch {b + 1}/{len(batches)}: {n_tokens} answer tokens, {rate:.0f} tok/s",
            flush=True,
        )
        if (b + 1) % 8 == 0 or b + 1 == len(batches):
            torch.save(records, out / "samples.pt")
    meta = {
        "prompts": len(records),
        "answer_tokens": n_tokens,
        "top_k": top_k,
        "max_new": max_new,
        "seconds": round(time.time() - t0, 1),
        "seed": seed,
        "torch": torch.__version__,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=1))


# -- stage 2: distillation helpers ------------------------------------------------------------
def _batch(items):
    """Right-padded inputs, and the answer positions' soft targets gathered flat."""
    width = max(len(i[0]) for i in items)
    x = torch.zeros(len(items), width, dtype=torch.long)
    rows, cols, t_ids, t_p = [], [], [], []
    for b, (ids, start, ti, tp) in enumerate(items):
        x[b, : len(ids)] = ids
        n = ti.shape[0]
        rows.append(torch.full((n,), b))
        cols.append(torch.arange(start - 1, start - 1 + n))  # position predicting answer[j]
        t_ids.append(ti)
        t_p.append(tp)
    return x, torch.cat(rows), torch.cat(cols), torch.cat(t_ids), torch.cat(t_p)


def _soft_loss_and_alpha(logits, t_ids, t_p):
    """Cross-entropy to the renormalised soft targets, and the acceptance lower bound
    sum_{x in top-k} min(p(x), q(x)) averaged over positions."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    lq = logq.gather(1, t_ids)
    target = t_p / t_p.sum(1, keepdim=True).clamp_min(1e-9)
    loss = -(target * lq).sum(1).mean()
    alpha = torch.minimum(t_p, lq.detach().exp()).sum(1).mean()
    return loss, float(alpha)


# -- the self-speculative drafter (what ships) ------------------------------------------------
def vocabulary_by_mass(records: list[dict], size: int, always: tuple[int, ...] = ()) -> list[int]:
    """The ``size`` tokens holding the most of the verifier's soft-target mass, sorted."""
    mass = np.zeros(SMOLLM2_VOCAB)
    for r in records:
        np.add.at(mass, r["top_ids"].ravel(), r["top_p"].astype(np.float64).ravel())
    chosen = set(np.argsort(-mass)[:size].tolist()) | set(always)
    return sorted(int(i) for i in chosen)


def train_self_spec(
    work: Path,
    out: Path,
    *,
    layers: int = 4,
    trained_layers: int = 2,
    vocab_size: int = 12288,
    minutes: float = 20.0,
    lr: float = 3e-4,
    batch_tokens: int = 4096,
    seed: int = 0,
    threads: int = 2,
) -> dict:
    """Train the top ``trained_layers`` of a ``layers``-deep SmolLM2 prefix and its final norm
    as an early exit, by distillation from ``work/samples.pt``, for a wall-clock budget."""
    import math

    from safetensors.torch import save_file

    from multispin_env.live import smollm2
    from multispin_env.live.train_pair import write_manifest

    if not 1 <= trained_layers <= layers <= 30:
        raise ValueError(
            f"--layers {layers} --trained-layers {trained_layers}: need 1 <= trained layers "
            "<= layers <= 30 (SmolLM2's depth)"
        )
    if not 16 <= vocab_size <= SMOLLM2_VOCAB:
        raise ValueError(f"--vocab {vocab_size}: must be in 16..{SMOLLM2_VOCAB}")
    if not (work / "samples.pt").is_file():
        raise ValueError(
            f"{work}/samples.pt does not exist: run the generate stage first "
            f"(python -m multispin_env.live.distil_smollm2 generate --work {work})"
        )
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    records = torch.load(work / "samples.pt", weights_only=False)
    if len(records) < 20:
        raise ValueError(
            f"{work}/samples.pt has {len(records)} answers; distillation needs at least 20 "
            "(5% of them, at least 1, are held out for validation)"
        )
    eos = 2  # <|im_end|>: the end of every answer must be draftable
    vocab = vocabulary_by_mass(records, vocab_size, always=(eos,))
    to_local = torch.full((SMOLLM2_VOCAB,), -1, dtype=torch.long)
    to_local[torch.as_tensor(vocab)] = torch.arange(len(vocab))
    model = smollm2.self_spec_model(layers, vocab)
    borrowed = layers - trained_layers
    trainable = {}
    for name, param in model.named_parameters():
        keep = name == "model.norm.weight" or (
            name.startswith("model.layers.") and int(name.split(".")[2]) >= borrowed
        )
        param.requires_grad_(keep)
        if keep:
            trainable[name] = param

    def tensors(rows):
        out_ = []
        for r in rows:
            ids = torch.as_tensor(r["prompt"] + r["answer"])
            t_ids = to_local[torch.as_tensor(r["top_ids"].astype(np.int64))]
            t_p = torch.as_tensor(r["top_p"].astype(np.float32))
            t_p = torch.where(t_ids < 0, torch.zeros_like(t_p), t_p)  # outside: q = 0 there
            out_.append((ids, len(r["prompt"]), t_ids.clamp_min(0), t_p))
        return out_

    order = rng.permutation(len(records))
    n_val = max(1, len(records) // 20)
    val = tensors([records[i] for i in order[:n_val]])
    tr = tensors([records[i] for i in order[n_val:]])
    covered = float(
        sum(i[3].sum() for i in val)
        / sum(torch.as_tensor(records[j]["top_p"].astype(np.float32)).sum() for j in order[:n_val])
    )
    opt = torch.optim.AdamW(trainable.values(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    print(
        f"[train] SmolLM2 layers 0-{borrowed - 1} borrowed, {borrowed}-{layers - 1} and the "
        f"final norm trained ({sum(p.numel() for p in trainable.values())} parameters); draft "
        f"vocabulary {len(vocab)} (holds {covered:.3f} of the validation top-16 mass); "
        f"{len(tr)} train / {len(val)} val answers",
        flush=True,
    )

    def logits_of(items):
        x, rows, cols, ti, tp = _batch(items)
        mask = torch.arange(x.shape[1])[None] < torch.tensor([len(i[0]) for i in items])[:, None]
        hidden = model.model(input_ids=x, attention_mask=mask.long()).last_hidden_state
        return model.lm_head(hidden[rows, cols]), ti, tp

    def evaluate():
        model.eval()
        losses, alphas, weights = [], [], []
        with torch.no_grad():
            for s in range(0, len(val), 8):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits, ti, tp = logits_of(val[s : s + 8])
                loss, alpha = _soft_loss_and_alpha(logits, ti, tp)
                losses.append(float(loss))
                alphas.append(alpha)
                weights.append(len(ti))
        model.train()
        return float(np.average(losses, weights=weights)), float(
            np.average(alphas, weights=weights)
        )

    def batches():
        while True:
            chunk, size = [], 0
            for i in rng.permutation(len(tr)):
                chunk.append(tr[i])
                size += len(tr[i][0])
                if size >= batch_tokens:
                    yield chunk
                    chunk, size = [], 0
            if chunk:
                yield chunk

    v_loss, v_alpha = evaluate()
    history = [
        {"step": 0, "s": 0, "val_loss": round(v_loss, 4), "val_alpha_topk": round(v_alpha, 4)}
    ]
    print(f"[train] before training: val {v_loss:.3f}, val acceptance >= {v_alpha:.3f}", flush=True)
    best = (v_alpha, 0, {k: v.detach().clone() for k, v in trainable.items()})
    budget_s, start, step, data = minutes * 60, time.perf_counter(), 0, batches()
    model.train()
    while (elapsed := time.perf_counter() - start) < budget_s:
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget_s))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * cosine
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, ti, tp = logits_of(next(data))
        loss, _ = _soft_loss_and_alpha(logits, ti, tp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            v_loss, v_alpha = evaluate()
            history.append(
                {
                    "step": step,
                    "s": round(elapsed),
                    "train_loss": round(float(loss.detach()), 4),
                    "val_loss": round(v_loss, 4),
                    "val_alpha_topk": round(v_alpha, 4),
                }
            )
            print(
                f"[train] step {step} ({elapsed:.0f}/{budget_s:.0f} s): "
                f"loss {float(loss.detach()):.3f}, "
                f"val {v_loss:.3f}, val acceptance >= {v_alpha:.3f}",
                flush=True,
            )
            if v_alpha > best[0]:
                best = (v_alpha, step, {k: v.detach().clone() for k, v in trainable.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in best[2].items()},
        str(out / "drafter.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "vocab.json").write_text(
        json.dumps({"full_vocab_size": SMOLLM2_VOCAB, "ids": vocab}) + "\n"
    )
    verifier = smollm2.check(smollm2.convert())
    spec = {
        "layers": layers,
        "borrowed_layers": borrowed,
        "verifier_sha256": verifier["files"]["model.safetensors"]["sha256"],
    }
    (out / smollm2.SELF_SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    report = {
        "steps": step,
        "kept_step": best[1],
        "train_s": round(time.perf_counter() - start, 1),
        "val_acceptance_topk_lower_bound": round(best[0], 4),
        "vocabulary": len(vocab),
        "vocabulary_mass_covered": round(covered, 4),
        "trained_parameters": sum(p.numel() for p in trainable.values()),
        "config": {
            "layers": layers,
            "trained_layers": trained_layers,
            "lr": lr,
            "batch_tokens": batch_tokens,
            "minutes": minutes,
            "seed": seed,
        },
        "history": history,
    }
    meta = work / "samples.json"
    write_manifest(
        out,
        {
            "command": "python -m multispin_env.live.distil_smollm2 train "
            f"--work {work} --out {out} "
            f"--minutes {minutes:g} --layers {layers} --trained-layers {trained_layers} "
            f"--vocab {vocab_size}",
            "torch": torch.__version__,
            "samples": json.loads(meta.read_text()) if meta.is_file() else {},
            "drafter": report,
        },
    )
    return report


DRAFTER_OUT = "multispin_env/live/models/smollm2-drafter"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    stages = {
        "generate": sub.add_parser("generate", help="SmolLM2's answers and soft targets"),
        "train": sub.add_parser("train", help="distil the drafter from generated samples"),
        "build": sub.add_parser("build", help="both stages"),
    }
    for name, q in stages.items():
        q.add_argument("--work", type=Path, default=Path("runs/smollm2-distil"))
        if name != "train":
            q.add_argument("--limit", type=int, default=None, help="only the first N prompts")
            q.add_argument("--max-new", type=int, default=128, help="answer tokens at most")
        if name != "generate":
            q.add_argument("--out", type=Path, default=Path(DRAFTER_OUT))
            q.add_argument("--minutes", type=float, default=20.0, help="training budget")
            q.add_argument("--layers", type=int, default=4, help="SmolLM2 layers the drafter runs")
            q.add_argument("--trained-layers", type=int, default=2, help="top layers trained")
            q.add_argument("--vocab", type=int, default=12288, help="draft vocabulary size")
    a = p.parse_args(argv)
    if a.stage in ("generate", "build"):
        generate(a.work, limit=a.limit, max_new=a.max_new)
    if a.stage in ("train", "build"):
        report = train_self_spec(
            a.work,
            a.out,
            minutes=a.minutes,
            layers=a.layers,
            trained_layers=a.trained_layers,
            vocab_size=a.vocab,
        )
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
