"""Hugging Face causal LMs (here a tiny random Llama) in the speculative-decoding path."""

import copy

import pytest
import torch

from multispin_env.live.hf import HFCausalLM, load_hf_pair
from multispin_env.live.speculative import (
    verifier_greedy_reference,
)

VOCAB = 64


def _llama_pair(seed=0, noise=0.4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    verifier = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in verifier.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    drafter = copy.deepcopy(verifier)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return drafter.eval(), verifier.eval()


def test_hf_batched_cached_forward_equals_recompute():
    _, verifier = _llama_pair()
    model = HFCausalLM(verifier)
    seqs = [[1, 2, 3, 4, 5], [7, 8, 6], [9, 10, 11, 12, 13, 14, 15]]
    _, caches = model.forward_cached([s[:-2] for s in seqs], [None] * 3)
    logits, caches = model.forward_cached([s[-2:] for s in seqs], caches)
    for seq, got, cache in zip(seqs, logits, caches, strict=True):
        with torch.no_grad():
            full = verifier(torch.tensor([seq])).logits[0, -2:]
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
        assert cache[0][0].shape[1] == len(seq)  # grouped-query caches, (kv_heads, T, d)


def test_greedy_speculative_with_hf_models_equals_verifier_greedy():
    drafter, verifier = _llama_pair(seed=1)
    from conftest import run_greedy_rounds

    d, v = HFCausalLM(drafter), HFCausalLM(verifier)
    prompts = {0: [1, 2, 3], 1: [5], 2: [7, 8, 9, 10]}
    server, accepted, drafted = run_greedy_rounds(d, v, prompts, 8, lambda r, u: 1 + (r + u) % 4)
    assert 0 < accepted < drafted
    for uid, prompt in prompts.items():
        out = server.outputs[uid]
        assert out == verifier_greedy_reference(v, prompt, len(out))


def test_load_hf_pair_from_local_folders(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    drafter, verifier = _llama_pair()
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    for name, model in (("d", drafter), ("v", verifier)):
        model.save_pretrained(tmp_path / name)
        fast.save_pretrained(tmp_path / name)
    d, v, tokenizer = load_hf_pair(tmp_path / "d", tmp_path / "v")
    assert tokenizer("t3 t7")["input_ids"] == [3, 7]
    x = [[3, 7, 9]]
    logits, _ = v.forward_cached(x, [None])
    with torch.no_grad():
        torch.testing.assert_close(
            logits[0], verifier(torch.tensor(x)).logits[0], atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_pair(tmp_path / "d", tmp_path / "missing")
    from multispin_env.live.hf import HFPair

    pair = HFPair(tmp_path / "d", tmp_path / "v")  # what live and record-traces load
    assert pair.encode("t3 t7") == [3, 7] and pair.decode([3, 7]) == "t3 t7"
    assert pair.verifier.forward_cached(x, [None])[0][0].shape == logits[0].shape
