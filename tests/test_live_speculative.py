"""Live mode core: the cached batched forward and exact speculative decoding."""

import numpy as np
import pytest
import torch

from multispin_env.live.gpt import GPT
from multispin_env.live.speculative import (
    DecodingConfig,
    Draft,
    DrafterSession,
    VerifierServer,
    accept,
    truncated_pmf,
    uploaded_distribution,
    verifier_greedy_reference,
)

VOCAB = 48


def test_batched_cached_forward_equals_per_user_recompute(tiny_pair_factory):
    _, model = tiny_pair_factory(VOCAB)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, VOCAB, n)) for n in (9, 3, 17, 1 + 5)]
    splits = [6, 1, 10, 4]
    _, caches = model.forward_cached([s[:k] for s, k in zip(seqs, splits, strict=True)], [None] * 4)
    logits, _ = model.forward_cached([s[k:] for s, k in zip(seqs, splits, strict=True)], caches)
    for seq, k, got in zip(seqs, splits, logits, strict=True):
        full = model(torch.tensor([seq]))[0][k:]
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_weights_round_trip_and_load_in_transformers(tmp_path, tiny_pair_factory):
    from transformers import GPT2LMHeadModel

    _, model = tiny_pair_factory(VOCAB)
    model.save(tmp_path / "m")
    ours = GPT.load(tmp_path / "m")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    x = torch.tensor([[1, 5, 7, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits[0], ours(x)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no config.json"):
        GPT.load(tmp_path / "missing")


@pytest.mark.parametrize("lengths", [[1, 3, 2], [4, 4, 4], [2, 1, 5]])
def test_greedy_speculative_equals_verifier_greedy(lengths, tiny_pair_factory):
    from conftest import run_greedy_rounds

    drafter, verifier = tiny_pair_factory(VOCAB, seed=1)
    prompts = {0: [1, 2, 3], 1: [5], 2: [7, 8, 9, 10, 11, 12]}
    server, accepted, drafted = run_greedy_rounds(
        drafter, verifier, prompts, 15, lambda r, u: lengths[(r + u) % 3], kept_vocab=8
    )
    assert 0 < accepted < drafted  # the pair disagrees sometimes: a real test of the rule
    for uid, prompt in prompts.items():
        out = server.outputs[uid]
        assert out == verifier_greedy_reference(verifier, prompt, len(out))


def _synthetic(rng, vocab=12, rows=3):
    p = rng.dirichlet(np.full(vocab, 0.7), size=rows)
    q_logits = torch.tensor(np.log(rng.dirichlet(np.full(vocab, 0.7), size=rows - 1)))
    return p, q_logits


@pytest.mark.parametrize("kept", [12, 5])
def test_sampling_rule_outputs_the_verifier_distribution(kept):
    rng = np.random.default_rng(0)
    p, q_logits = _synthetic(rng)
    cfg = DecodingConfig(kept_vocab=kept)
    pmfs = [truncated_pmf(q_logits[i], cfg) for i in range(2)]
    q = [uploaded_distribution(i, v, 12) for i, v in pmfs]
    trials = 40_000
    first = np.zeros(12)
    first_accepted = 0
    for _ in range(trials):
        tokens = [int(rng.choice(12, p=q[i])) for i in range(2)]
        draft = Draft(tokens, np.stack([i for i, _ in pmfs]), np.stack([v for _, v in pmfs]))
        m, committed = accept(p, draft, cfg, rng)
        first[committed[0]] += 1
        first_accepted += m >= 1
    empirical = first / trials
    # the first output token follows the verifier's p exactly (total variation ~ sampling noise)
    assert 0.5 * np.abs(empirical - p[0]).sum() < 0.012
    # and the first draft is accepted with probability sum_x min(p, q)
    expected = np.minimum(p[0], q[0]).sum()
    assert abs(first_accepted / trials - expected) < 4 * np.sqrt(expected * (1 - expected) / trials)


def test_greedy_rule_and_truncated_payload():
    p = np.eye(4)[[2, 1, 3]]  # verifier argmax: 2, then 1, then 3
    idx, val = truncated_pmf(torch.zeros(4), DecodingConfig(kept_vocab=2))
    draft = Draft([2, 0], np.stack([idx, idx]), np.stack([val, val]))
    assert accept(p, draft, DecodingConfig(greedy=True), np.random.default_rng()) == (1, [2, 1])
    assert draft.payload_bits(vocab_size=4096, prob_bits=16) == 2 * 2 * (16 + 12)
    assert val.dtype == np.float16 and idx.shape == (2,)


def test_end_to_end_sampling_acceptance_matches_sum_min_pq(tiny_pair_factory):
    drafter, verifier = tiny_pair_factory(VOCAB, seed=2, noise=0.25)
    cfg = DecodingConfig(kept_vocab=VOCAB)
    server = VerifierServer(verifier, cfg, np.random.default_rng(0))
    device = DrafterSession(drafter, cfg, np.random.default_rng(1))
    prompt = [3, 4]
    server.add_user(0, prompt)
    device.start(prompt)
    accepted = trials = 0
    expected = []
    for _ in range(60):
        context = prompt + server.outputs[0]
        with torch.no_grad():
            p = torch.softmax(verifier(torch.tensor([context]))[0, -1].double(), -1).numpy()
            q = torch.softmax(drafter(torch.tensor([context]))[0, -1].double(), -1).numpy()
        expected.append(np.minimum(p, q).sum())
        draft = device.propose(1)
        ((m, committed),) = server.verify({0: draft}).values()
        device.commit(m, committed)
        accepted += m
        trials += 1
        if len(prompt) + len(server.outputs[0]) > 200:
            break
    assert abs(accepted / trials - np.mean(expected)) < 0.2
