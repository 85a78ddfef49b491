"""Any Hugging Face causal LM as a drafter or verifier (e.g. TinyLlama-1.1B -> Llama-2-7B).

:class:`HFCausalLM` gives a ``transformers`` model the interface the speculative-decoding
code uses: ``forward_cached(new_tokens, caches)`` over per-sequence KV caches, in one padded
batch. Past keys/values are left-padded into one ``DynamicCache``, the new tokens are
right-padded, a 2-D attention mask hides the padding and explicit ``position_ids`` keep every
row's true positions (so RoPE models are exact too). Per-row caches are plain
``[(k, v), ...]`` tensors ``(kv_heads, T, head_dim)``, the same format as the built-in
decoder's.

    pair = load_hf_pair("/models/tinyllama-1.1b", "/models/llama-2-7b", device="cuda")

Everything is loaded from local folders (``local_files_only``): nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multispin_env.live.models import CodePair


@dataclass(frozen=True)
class _Cfg:
    vocab_size: int
    n_positions: int


class HFCausalLM:
    """A transformers causal LM behind ``forward_cached`` (see module docstring)."""

    def __init__(self, model) -> None:
        self.model = model.eval()
        config = model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", 2048
        )
        self.cfg = _Cfg(int(config.vocab_size), int(positions))
        import inspect

        self._forward_params = set(inspect.signature(model.forward).parameters)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward_cached(self, new_tokens: list[list[int]], caches: list):
        from transformers import DynamicCache

        b = len(new_tokens)
        lens = [0 if c is None else c[0][0].shape[1] for c in caches]
        counts = [len(t) for t in new_tokens]
        if min(counts) < 1:
            raise ValueError("every row needs at least one new token")
        t_max, n_max = max(lens), max(counts)
        dev = self.device
        ids = torch.zeros(b, n_max, dtype=torch.long)
        pos = torch.zeros(b, n_max, dtype=torch.long)
        mask = torch.zeros(b, t_max + n_max, dtype=torch.long)
        for r, (toks, t) in enumerate(zip(new_tokens, lens, strict=True)):
            ids[r, : len(toks)] = torch.as_tensor(toks)
            pos[r] = torch.arange(t, t + n_max)
            mask[r, t_max - t : t_max + len(toks)] = 1
        cache = DynamicCache()
        if t_max > 0:
            template = next(c for c in caches if c is not None)
            layers = []
            for layer, (k0, v0) in enumerate(template):
                shape = (b, k0.shape[0], t_max, k0.shape[2])
                keys = torch.zeros(shape, dtype=k0.dtype, device=dev)
                values = torch.zeros(shape, dtype=v0.dtype, device=dev)
                for r, c in enumerate(caches):
                    if c is not None and lens[r] > 0:
                        keys[r, :, t_max - lens[r] :] = c[layer][0]
                        values[r, :, t_max - lens[r] :] = c[layer][1]
                layers.append((keys, values))
            cache = DynamicCache(ddp_cache_data=layers)
        # transformers renamed past_key_values to cache (deprecated in 5.x, removed in 5.40)
        key = "cache" if "cache" in self._forward_params else "past_key_values"
        out = self.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            use_cache=True,
            **{key: cache},
        )
        full = getattr(out, "cache", None) or out.past_key_values
        new_caches = []
        for r in range(b):
            lo, hi = t_max - lens[r], t_max + counts[r]
            new_caches.append(
                [(layer.keys[r, :, lo:hi], layer.values[r, :, lo:hi]) for layer in full.layers]
            )
        logits = out.logits.float().cpu()
        return [logits[r, : counts[r]] for r in range(b)], new_caches


def load_hf_model(folder: str | Path, device: str = "cpu", dtype=torch.float32) -> HFCausalLM:
    """A local transformers checkpoint (config + weights), offline."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return HFCausalLM(model.to(device))


def load_hf_pair(drafter_dir, verifier_dir, device: str = "cpu", dtype=torch.float32):
    """(drafter, verifier, tokenizer) from two local folders that must share a tokenizer."""
    from transformers import AutoTokenizer

    drafter = load_hf_model(drafter_dir, device, dtype)
    verifier = load_hf_model(verifier_dir, device, dtype)
    tok_d = AutoTokenizer.from_pretrained(drafter_dir, local_files_only=True)
    tok_v = AutoTokenizer.from_pretrained(verifier_dir, local_files_only=True)
    if tok_d.get_vocab() != tok_v.get_vocab():
        raise ValueError(
            f"{drafter_dir} and {verifier_dir} do not share a tokenizer; "
            "speculative decoding needs identical vocabularies"
        )
    return drafter, verifier, tok_v


class HFPair(CodePair):
    """Two local Hugging Face causal LMs sharing a tokenizer, with the pair interface the live
    tools use (``drafter``, ``verifier``, ``tokenizer``, ``encode``, ``decode``, and
    :class:`~multispin_env.live.models.CodePair`'s prompts and answers)."""

    def __init__(self, drafter_dir, verifier_dir, device: str = "cpu") -> None:
        self.drafter_dir, self.verifier_dir = str(drafter_dir), str(verifier_dir)
        self.drafter, self.verifier, self.tokenizer = load_hf_pair(
            drafter_dir, verifier_dir, device=device
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)
