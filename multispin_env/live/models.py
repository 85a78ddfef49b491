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

from multispin_env.live.gpt import GPT

DEMO_PAIR = "demo-pair"


def default_pair_dir() -> Path:
    return Path(str(resources.files("multispin_env") / "live" / "models" / DEMO_PAIR))


@dataclass
class Pair:
    drafter: GPT
    verifier: GPT
    tokenizer: object
    folder: Path
    manifest: dict

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def verify_manifest(folder: Path) -> dict:
    path = folder / "MANIFEST.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    for name, entry in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{folder}: {name} is listed in MANIFEST.json but missing")
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(
                f"{folder}: {name} has sha256 {digest[:12]}..., the manifest says "
                f"{entry['sha256'][:12]}...: the file is corrupt or was replaced"
            )
    return manifest


def load_drafter(folder: str | Path | None = None, device: str = "cpu") -> GPT:
    """Only the drafter of a pair (what a device needs), manifest checked."""
    folder = Path(folder) if folder is not None else default_pair_dir()
    if not folder.is_dir():
        raise ValueError(f"model pair folder {folder} does not exist")
    verify_manifest(folder)
    return GPT.load(folder / "drafter", device)


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
