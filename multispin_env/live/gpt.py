"""A small GPT-2-style decoder in plain torch, with an explicit KV cache per sequence.

Why not ``transformers`` for the built-in pair: a forward of these tiny models costs ~2 ms in
plain torch against ~7.5 ms through transformers (docs/live-notes.md), and speculative
decoding needs a padded multi-user batch over caches of different lengths, which is simplest
to get exactly right with the cache in our hands. Weights use Hugging Face's GPT-2 names
(``transformer.h.0.attn.c_attn.weight``...), so the same safetensors load in
``transformers.GPT2LMHeadModel`` too.

Shapes: a cache is a list (one per layer) of ``(k, v)`` tensors ``(heads, T, head_dim)``
for ONE sequence; the batched forward takes a list of caches of different lengths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Cache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 4096
    n_positions: int = 512
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4

    def to_hf(self) -> dict:
        """A config.json that transformers reads as a GPT2LMHeadModel."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }

    @staticmethod
    def from_hf(cfg: dict) -> GPTConfig:
        return GPTConfig(
            cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"]
        )


class _Conv1D(nn.Module):
    """GPT-2's linear layer with weight stored as (in, out) (HF naming and layout)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], -1
        )


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.n_embd
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = nn.Module()
        self.attn.c_attn = _Conv1D(d, 3 * d)
        self.attn.c_proj = _Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = nn.Module()
        self.mlp.c_fc = _Conv1D(d, 4 * d)
        self.mlp.c_proj = _Conv1D(4 * d, d)
        self.n_head = cfg.n_head

    def forward(self, x, past_k, past_v, mask):
        b, n, d = x.shape
        h = self.n_head
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        keys = torch.cat([past_k, k], dim=2) if past_k is not None else k
        values = torch.cat([past_v, v], dim=2) if past_v is not None else v
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(b, n, d))
        x = x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))
        return x, k, v


class GPT(nn.Module):
    """GPT-2 decoder (pre-LayerNorm, learned positions, tied input/output embeddings)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.transformer.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.transformer.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.transformer.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        nn.init.normal_(self.transformer.wpe.weight, std=0.01)
        for block in self.transformer.h:  # GPT-2's scaled init of residual projections
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    # -- training: plain causal forward ------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` of a causal forward without cache (training)."""
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)[None]
        mask = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        for block in self.transformer.h:
            x, _, _ = block(x, None, None, mask)
        return self.transformer.ln_f(x) @ self.transformer.wte.weight.T

    # -- inference: padded batch over per-sequence caches -------------------------------
    @torch.no_grad()
    def forward_cached(
        self, new_tokens: list[list[int]], caches: list[Cache | None]
    ) -> tuple[list[torch.Tensor], list[Cache]]:
        """One batched forward of each sequence's new tokens on top of its own cache.

        Caches are left-padded to the longest and new tokens right-padded, with a mask so
        that every row sees exactly its own history: the result equals running each row
        alone (tested to 1e-5). Returns per-row logits ``(n_new, V)`` and per-row caches
        extended by the new tokens' keys and values.
        """
        b = len(new_tokens)
        h = self.cfg.n_head
        hd = self.cfg.n_embd // h
        lens = [0 if c is None else c[0][0].shape[1] for c in caches]
        counts = [len(t) for t in new_tokens]
        if min(counts) < 1:
            raise ValueError("every row needs at least one new token")
        t_max, n_max = max(lens), max(counts)
        # positions are per row (left-padded caches), so only each row's own length counts
        longest = max(t + n for t, n in zip(lens, counts, strict=True))
        if longest > self.cfg.n_positions:
            raise ValueError(
                f"sequence of {longest} tokens exceeds n_positions={self.cfg.n_positions}"
            )
        dev = self.transformer.wte.weight.device
        ids = torch.zeros(b, n_max, dtype=torch.long)
        pos = torch.zeros(b, n_max, dtype=torch.long)
        mask = torch.zeros(b, 1, n_max, t_max + n_max, dtype=torch.bool)
        causal = torch.ones(n_max, n_max, dtype=torch.bool).tril()
        for r, (toks, t) in enumerate(zip(new_tokens, lens, strict=True)):
            ids[r, : len(toks)] = torch.as_tensor(toks)
            pos[r, : len(toks)] = torch.arange(t, t + len(toks))
            mask[r, 0, :, t_max - t : t_max] = True  # this row's own cache (left-padded)
            mask[r, 0, :, t_max:] = causal
        ids, pos, mask = ids.to(dev), pos.to(dev), mask.to(dev)
        x = self.transformer.wte(ids) + self.transformer.wpe(pos)
        new_caches: list[Cache] = [[] for _ in range(b)]
        for layer, block in enumerate(self.transformer.h):
            past_k = torch.zeros(b, h, t_max, hd, device=dev)
            past_v = torch.zeros(b, h, t_max, hd, device=dev)
            for r, c in enumerate(caches):
                if c is not None and lens[r] > 0:
                    past_k[r, :, t_max - lens[r] :] = c[layer][0]
                    past_v[r, :, t_max - lens[r] :] = c[layer][1]
            x, k, v = block(x, past_k, past_v, mask)
            for r in range(b):
                old = None if caches[r] is None else caches[r][layer]
                kr, vr = k[r, :, : counts[r]], v[r, :, : counts[r]]
                new_caches[r].append(
                    (kr, vr)
                    if old is None
                    else (torch.cat([old[0], kr], 1), torch.cat([old[1], vr], 1))
                )
        logits = (self.transformer.ln_f(x) @ self.transformer.wte.weight.T).float().cpu()
        return [logits[r, : counts[r]] for r in range(b)], new_caches

    # -- persistence ---------------------------------------------------------------------
    def save(self, folder: str | Path, dtype=torch.float16) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().to(dtype).contiguous()
            for k, v in self.state_dict().items()
            if k != "lm_head.weight"
        }
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.cfg.to_hf(), indent=2))

    @staticmethod
    def load(folder: str | Path, device: str = "cpu") -> GPT:
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise ValueError(f"model folder {folder} has no {name}")
        model = GPT(GPTConfig.from_hf(json.loads((folder / "config.json").read_text())))
        state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith(".attn.bias")]
        if missing or [
            u for u in unexpected if not u.endswith((".attn.bias", ".attn.masked_bias"))
        ]:
            raise ValueError(
                f"{folder}: weights do not match the config (missing {missing}, "
                f"unexpected {unexpected})"
            )
        return model.to(device).eval()


def cache_crop(cache: Cache, length: int) -> Cache:
    """The first ``length`` positions of a cache."""
    return [(k[:, :length], v[:, :length]) for k, v in cache]
