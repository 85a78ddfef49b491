"""Proactive drafting live (SpecEdge): a device drafts its next draft while its draft is
verified. The draft it then uploads must be the draft it would have drafted after the round
message, token for token and PMF for PMF, so that speculative decoding stays exact."""

import numpy as np
import pytest
import torch

from multispin_env.live.speculative import (
    DecodingConfig,
    DrafterSession,
    VerifierServer,
    draft_uniforms,
    uploaded_distribution,
)

VOCAB = 48


@pytest.fixture(scope="module")
def pair():
    from conftest import make_tiny_pair

    return make_tiny_pair(VOCAB, seed=1, noise=0.2)


def _fresh_draft(drafter, cfg, context, length, seed):
    """The draft a device with no history drafts after the round message."""
    session = DrafterSession(drafter, cfg, np.random.default_rng(0))
    session.start(context)
    uniforms = None if cfg.greedy else draft_uniforms(seed, length)
    return session.propose(length, uniforms)


def _same(a, b):
    """Same tokens and PMFs; the probabilities up to fp16 rounding (near-ties may swap places in the top-k), since a KV cache filled one
    token at a time and one forward over the whole context round differently."""
    assert a.tokens == b.tokens
    for row in range(len(a.tokens)):
        dense = [uploaded_distribution(d.q_indices[row], d.q_values[row], VOCAB) for d in (a, b)]
        np.testing.assert_allclose(*dense, atol=1e-3)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize(("ahead", "length"), [(0, 3), (2, 4), (5, 3), (6, 6)])
def test_an_ahead_draft_is_the_draft_after_the_message(pair, greedy, ahead, length):
    """Whatever the verifier says, the next draft equals a fresh device's draft from the
    committed context: kept when the guess held, drafted again from the truth when not."""
    drafter, verifier = pair
    cfg = DecodingConfig(greedy=greedy, kept_vocab=8)
    held = 0
    for trial in range(12):
        prompt = [3, 9, 4, 17 + trial]
        rng = np.random.default_rng(trial)
        server = VerifierServer(verifier, cfg, rng)
        server.add_user(0, prompt)
        device = DrafterSession(drafter, cfg, np.random.default_rng(trial))
        device.start(prompt)
        first_length = 1 + trial % 3
        first = device.propose(first_length, None if greedy else draft_uniforms(trial, 3))
        seed = 1000 + trial
        uniforms = None if greedy else draft_uniforms(seed, 8)
        assert device.begin_ahead(8, uniforms)
        for _ in range(ahead):
            assert device.next_token() is not None
        ((m, committed),) = server.verify({0: first}).values()
        if device.resolve_ahead(m, committed):
            held += 1
            assert device.drafted == ahead
        else:
            device.begin(8, uniforms)  # drafting ahead again, from the committed context
            for _ in range(ahead):
                device.next_token()
        draft = device.finish_ahead(length)
        _same(draft, _fresh_draft(drafter, cfg, prompt + committed, length, seed))
        # and the round after it is unaffected: verify, commit, draft once more
        ((m2, committed2),) = server.verify({0: draft}).values()
        device.commit(m2, committed2)
        again = device.propose(2, None if greedy else draft_uniforms(7, 2))
        _same(again, _fresh_draft(drafter, cfg, prompt + committed + committed2, 2, 7))
    assert 0 < held < 12, held  # both paths ran


def test_dropping_an_unresolved_guess_restores_the_committed_state(pair):
    drafter, _ = pair
    cfg = DecodingConfig(greedy=True, kept_vocab=8)
    device = DrafterSession(drafter, cfg, np.random.default_rng(0))
    device.start([5, 6])
    device.propose(2)
    assert device.begin_ahead(4)
    device.next_token()
    device.drop_ahead()  # the draft's result never came: it was not committed
    _same(device.propose(3), _fresh_draft(drafter, cfg, [5, 6], 3, 0))


def test_no_guess_after_an_early_stop_fed_the_last_token(pair):
    drafter, _ = pair
    cfg = DecodingConfig(greedy=True, kept_vocab=8)
    device = DrafterSession(drafter, cfg, np.random.default_rng(0))
    device.start([5, 6])
    device.begin(6, None, 0.999)  # stops at the second token: its confidence was measured
    while device.next_token() is not None:
        pass
    device.end()
    assert device.stopped_early
    assert not device.begin_ahead(4)


def test_sampling_with_kept_ahead_tokens_follows_the_verifier(pair):
    """Sampling mode: the first token committed by a draft that was drafted ahead, from a
    guess that held, follows the verifier's distribution given the committed context. The
    contexts vary, so the draws are compared with the mean of their own distributions
    (and, for the test's power, with the drafter's)."""
    drafter, verifier = pair
    cfg = DecodingConfig(kept_vocab=8, temperature=1.0)
    rng = np.random.default_rng(11)
    firsts, expected, drafter_expected = [], np.zeros(VOCAB), np.zeros(VOCAB)
    for trial in range(3000):
        prompt = [3, 9, 4, trial % VOCAB]
        server = VerifierServer(verifier, cfg, rng)
        server.add_user(0, prompt)
        device = DrafterSession(drafter, cfg, rng)
        device.start(prompt)
        first = device.propose(1)
        assert device.begin_ahead(3, rng.random(3))
        device.next_token()
        ((m, committed),) = server.verify({0: first}).values()
        if not device.resolve_ahead(m, committed):
            continue
        draft = device.finish_ahead(2)
        ((_, committed2),) = server.verify({0: draft}).values()
        firsts.append(committed2[0])
        context = torch.tensor([prompt + committed])
        with torch.no_grad():
            expected += torch.softmax(verifier(context)[0, -1].double(), -1).numpy()
            drafter_expected += torch.softmax(drafter(context)[0, -1].double(), -1).numpy()
    n = len(firsts)
    assert n >= 300
    empirical = np.bincount(firsts, minlength=VOCAB) / n
    tv = 0.5 * np.abs(empirical - expected / n).sum()
    tv_drafter = 0.5 * np.abs(empirical - drafter_expected / n).sum()
    # total variation of ~400 draws: ~ sqrt(support / n) / 2 ~ 0.03; the drafter's is far
    assert tv < 0.08 < tv_drafter
