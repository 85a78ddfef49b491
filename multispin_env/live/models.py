"""Load a drafter/verifier pair (and its tokenizer) from a local folder, offline.

A pair folder holds ``tokenizer.json``, ``drafter/`` and ``verifier/`` (each a Hugging Face
GPT-2 style ``config.json`` + ``model.safetensors``) and optionally ``MANIFEST.json`` with
sha256 sums, which are checked. The built-in pair (trained by
``python -m multispin_env.live.train_pair``) ships in ``multispin_env/live/models/demo-pair``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from multispin_env.live.gpt import GPT

DEMO_PAIR = "demo-pair"


def default_pair_dir() -> Path:
    return Path(str(resources.files("multispin_env") / "live" / "models" / DEMO_PAIR))


class CodePair:
    """What live mode asks of every pair (this, HFPair, SmolPair), for a pair that continues
    code: prompts, the token that ends a request (None: requests run until the context is
    full) and how to show an answer. Subclasses give ``encode`` and ``decode``."""

    end_id = None

    def prompts(self, count: int, tokens: int = 48) -> list[list[int]]:
        return stdlib_openings(self.encode, count, tokens)

    def show_answer(self, prompt: list[int], output: list[int]) -> str:
        return f"output: {self.decode(output[:40])!r}"


@dataclass
class Pair(CodePair):
    drafter: GPT
    verifier: GPT
    tokenizer: object
    folder: Path
    manifest: dict

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def stdlib_openings(encode, count: int, tokens: int = 48) -> list[list[int]]:
    """Openings of held-out stdlib files (every 20th file is the built-in pair's validation
    split): the prompts of the code pairs."""
    from multispin_env.live.train_pair import stdlib_files

    prompts = []
    for f in stdlib_files()[::20]:
        ids = encode(f.read_text(encoding="utf-8", errors="replace"))[:tokens]
        if len(ids) == tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MB blocks (SmolLM2's checkpoint is 538 MB)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_manifest(folder: Path) -> dict:
    path = folder / "MANIFEST.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    for name, entry in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{folder}: {name} is listed in MANIFEST.json but missing")
        digest = file_sha256(file)
        if digest != entry["sha256"]:
            raise ValueError(
                f"{folder}: {name} has sha256 {digest[:12]}..., the manifest says "
                f"{entry['sha256'][:12]}...: the file is corrupt or was replaced"
            )
    return manifest


@dataclass(frozen=True)
class _VocabCfg:
    vocab_size: int
    n_positions: int


class ReducedVocabDrafter:
    """A drafter over a subset of the verifier's vocabulary, seen through the full one.

    ``ids[i]`` is the full-vocabulary id of the drafter's token ``i + 1``; the drafter's token
    0 stands for every input token outside the subset and is never drafted. Inputs are mapped
    in, logits are scattered out with -inf elsewhere, so the drafter's q is exactly 0 off the
    subset and speculative decoding stays exact (FR-Spec's reduced draft vocabulary)."""

    def __init__(self, model, ids: list[int], full_vocab_size: int, map_inputs: bool = True):
        # map_inputs=False: the model reads full-vocabulary ids (its embedding is the
        # verifier's) and only its output layer is reduced, to exactly ``ids``
        self.map_inputs = map_inputs
        if map_inputs and len(ids) + 1 != model.cfg.vocab_size:
            raise ValueError(
                f"vocab.json lists {len(ids)} tokens but the drafter has "
                f"{model.cfg.vocab_size - 1}: the two files are from different builds"
            )
        self.model = model
        if not ids or len(set(ids)) != len(ids):
            raise ValueError("vocab.json: the draft vocabulary must be non-empty and distinct")
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        if int(self.ids.max()) >= full_vocab_size or int(self.ids.min()) < 0:
            raise ValueError(
                f"vocab.json has ids outside the full vocabulary of {full_vocab_size} tokens"
            )
        self.to_local = torch.zeros(full_vocab_size, dtype=torch.long)
        self.to_local[self.ids] = torch.arange(1, len(ids) + 1)
        self.cfg = _VocabCfg(full_vocab_size, model.cfg.n_positions)

    @torch.no_grad()
    def forward_cached(self, new_tokens: list[list[int]], caches: list):
        if self.map_inputs:
            new_tokens = [
                self.to_local[torch.as_tensor(t, dtype=torch.long)].tolist() for t in new_tokens
            ]
        logits, caches = self.model.forward_cached(new_tokens, caches)
        out = []
        for rows in logits:
            if rows.shape[1] != len(self.ids) + self.map_inputs:
                raise ValueError(
                    f"the drafter outputs {rows.shape[1]} logits for a draft vocabulary of "
                    f"{len(self.ids)}: its weights and vocab.json are from different builds"
                )
            full = torch.full((rows.shape[0], self.cfg.vocab_size), float("-inf"))
            full[:, self.ids] = rows[:, 1:] if self.map_inputs else rows
            out.append(full)
        return out, caches


def load_drafter(folder: str | Path | None = None, device: str = "cpu"):
    """Only the drafter of a pair (what a device needs), manifest checked. A folder with a
    ``vocab.json`` holds a reduced-vocabulary drafter (:class:`ReducedVocabDrafter`)."""
    folder = Path(folder) if folder is not None else default_pair_dir()
    if not folder.is_dir():
        raise ValueError(f"model pair folder {folder} does not exist")
    verify_manifest(folder)
    if (folder / "selfspec.json").is_file():  # SmolLM2's first layers + trained exit
        from multispin_env.live.smollm2 import load_self_spec_drafter

        return load_self_spec_drafter(folder, device)
    model = GPT.load(folder / "drafter", device)
    if (folder / "vocab.json").is_file():
        vocab = json.loads((folder / "vocab.json").read_text())
        return ReducedVocabDrafter(model, vocab["ids"], int(vocab["full_vocab_size"]))
    return model


def load_pair(folder: str | Path | None = None, device: str = "cpu") -> Pair:
    """Drafter, verifier and tokenizer from ``folder`` (default: the built-in pair), with
    the models on ``device`` ("cpu" or "cuda")."""
    from tokenizers import Tokenizer

    folder = Path(folder) if folder is not None else default_pair_dir()
    if not folder.is_dir():
        raise ValueError(
            f"model pair folder {folder} does not exist; train one with "
            "`python -m multispin_env.live.train_pair --out FOLDER`"
        )
    if (folder / "selfspec.json").is_file():
        raise ValueError(f"{folder} is the SmolLM2 drafter: run with --pair smollm2 instead")
    manifest = verify_manifest(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} has no tokenizer.json")
    drafter = GPT.load(folder / "drafter", device)
    verifier = GPT.load(folder / "verifier", device)
    if drafter.cfg.vocab_size != verifier.cfg.vocab_size:
        raise ValueError(
            f"{folder}: drafter and verifier vocabularies differ "
            f"({drafter.cfg.vocab_size} vs {verifier.cfg.vocab_size}); "
            "speculative decoding needs a shared tokenizer"
        )
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return Pair(drafter, verifier, tokenizer, folder, manifest)
