"""Train the built-in drafter/verifier pair on the Python standard library's sources.

    python -m multispin_env.live.train_pair --out multispin_env/live/models/demo-pair

Why this corpus and these sizes: nothing can be downloaded at run time and no PyPI package
ships a matched pair (docs/live-notes.md), but every Python installation ships ~12 MB of
its own source code. A byte-level BPE tokenizer (4096 tokens) is trained on it, then a
drafter (GPT-2 2 layers, d=128, ~1M parameters) and a verifier (6 layers, d=256, ~6M) on the
same tokens. The verifier gets ~4x the drafter's compute so that it is clearly the better
model. The result is committed as fp16 safetensors with a sha256 manifest; training is
reproducible bit for bit only for the same torch build, thread count and CPU kernels, so
tests never retrain, they load the committed files.

Run on the project's 2-core machine: ~16 minutes (see README "Live mode").
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from multispin_env.live.gpt import GPT, GPTConfig
from multispin_env.live.models import file_sha256

DRAFTER = GPTConfig(vocab_size=4096, n_positions=512, n_layer=2, n_embd=128, n_head=4)
VERIFIER = GPTConfig(vocab_size=4096, n_positions=512, n_layer=6, n_embd=256, n_head=8)
EOS = "<|endoftext|>"


def stdlib_files() -> list[Path]:
    """Every ``*.py`` of the standard library, tests and site-packages excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idle_test")
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(skip))


def build_tokenizer(files: list[Path], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(f) for f in files], trainer)
    tok.save(str(out / "tokenizer.json"))
    return tok


def encode_files(tok, files: list[Path]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        x = np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


@torch.no_grad()
def validation_loss(model: GPT, data: np.ndarray, seq: int = 256, n: int = 32) -> float:
    model.eval()
    starts = np.linspace(0, len(data) - seq - 2, n).astype(int)
    x = torch.from_numpy(np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int64))
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    model.train()
    return float(loss)


def train_model(
    cfg: GPTConfig,
    train: np.ndarray,
    val: np.ndarray,
    steps: int,
    lr: float,
    seed: int,
    batch: int = 16,
    seq: int = 256,
    label: str = "",
) -> tuple[GPT, dict]:
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = GPT(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = 20

    def schedule(step: int) -> float:  # warm-up, then cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    data = batches(train, batch, seq, np.random.default_rng(seed))
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"training {label}", unit="step")
    for step in bar:
        x, y = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, cfg.vocab_size), y.reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    report = {
        "steps": steps,
        "train_s": round(time.perf_counter() - start, 1),
        "val_loss": round(validation_loss(model, val), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model.eval(), report


def write_manifest(folder: Path, extra: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    manifest = {
        "files": {
            str(p.relative_to(folder)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in files
        }
    } | extra
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="multispin_env/live/models/demo-pair")
    p.add_argument("--drafter-steps", type=int, default=600)
    p.add_argument("--verifier-steps", type=int, default=900)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    val_files, train_files = files[::20], [f for i, f in enumerate(files) if i % 20]
    tok = build_tokenizer(train_files, DRAFTER.vocab_size, out)
    train, val = encode_files(tok, train_files), encode_files(tok, val_files)
    print(f"corpus: {len(files)} stdlib files, {len(train):,} train / {len(val):,} val tokens")
    drafter, d_rep = train_model(
        DRAFTER, train, val, a.drafter_steps, 2e-3, a.seed, label="drafter"
    )
    verifier, v_rep = train_model(
        VERIFIER, train, val, a.verifier_steps, 1e-3, a.seed + 1, label="verifier"
    )
    drafter.save(out / "drafter")
    verifier.save(out / "verifier")
    command = (
        "python -m multispin_env.live.train_pair --out "
        + a.out
        + f" --drafter-steps {a.drafter_steps} --verifier-steps {a.verifier_steps}"
        + f" --seed {a.seed} --threads {a.threads}"
    )
    write_manifest(
        out,
        {
            "command": command,
            "torch": torch.__version__,
            "corpus": {
                "files": len(files),
                "train_tokens": int(len(train)),
                "val_tokens": int(len(val)),
            },
            "drafter": d_rep,
            "verifier": v_rep,
        },
    )
    print(json.dumps({"drafter": d_rep, "verifier": v_rep}, indent=2))


if __name__ == "__main__":
    main()
