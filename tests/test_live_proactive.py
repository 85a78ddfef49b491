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
    """Same tokens and PMFs, the probabilities up to fp16 rounding (near-ties may swap
    places in the top-k): a KV cache filled one token at a time and one forward over the
    whole context round differently."""
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


def test_a_guess_after_an_early_stop_or_a_cut(pair):
    """A draft whose last token is already in the cache (an early stop measured the next
    token with it; a cut kept fewer tokens than were fed) still guesses from it."""
    drafter, verifier = pair
    cfg = DecodingConfig(greedy=True, kept_vocab=8)
    for stop, keep in ((0.999, None), (0.0, 2)):
        prompt = [5, 6]
        device = DrafterSession(drafter, cfg, np.random.default_rng(0))
        device.start(prompt)
        device.begin(6, None, stop)
        while device.next_token() is not None:
            pass
        first = device.end(keep=keep)
        assert device.begin_ahead(4)
        device.next_token()
        server = VerifierServer(verifier, cfg, np.random.default_rng(0))
        server.add_user(0, prompt)
        ((m, committed),) = server.verify({0: first}).values()
        if not device.resolve_ahead(m, committed):
            device.begin(4)
        _same(device.finish_ahead(3), _fresh_draft(drafter, cfg, prompt + committed, 3, 0))


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


# ---------------------------------------------------------------- live, over TCP


@pytest.mark.parametrize("greedy", [True, False])
def test_live_pipeline_with_proactive_drafting_stays_exact(pair, greedy):
    """Devices draft ahead while their group's draft is verified; greedy output is still the
    verifier's own, sampled ahead tokens pass the server's seed check, and the ahead tokens
    are reported and accounted for."""
    from test_live_protocols import PROMPTS, FixedScheduler, _check_greedy, _play

    _, verifier = pair
    server, outputs = _play(
        pair,
        FixedScheduler(3, groups=2),
        rounds=8,
        greedy=greedy,
        pipeline_groups=2,
        proactive_drafting=True,
    )
    assert not server.protocol_errors
    if greedy:
        _check_greedy(server, verifier, outputs)
    else:
        for device_id in PROMPTS:
            assert outputs[device_id] == server.verifier.outputs[device_id]
    rows = [r for rec in server.records for r in rec.users if r.get("ahead")]
    assert rows, "no device drafted ahead"
    for r in rows:
        assert 1 <= r["ahead"] <= r["drafted"] and 0 <= r["ahead_free"] <= r["ahead"]
    for rec in server.records:
        assert rec.timeline_s == pytest.approx(sum(p["phase_s"] for p in rec.phases))


def test_ahead_tokens_are_free_only_within_the_wait_on_the_timeline():
    """The simulator's rule: tokens drafted on the guess fit in the wait since the end of
    the user's last phase; tokens drafted after the result, in the wait since the result."""
    from multispin_env.live.rounds import Answer, Assignment, PipelineRound

    class U:
        device_id = "a"

    piece = PipelineRound(2)
    piece.phase_end_s["a"], piece.result_at_s["a"] = 1.0, 1.25
    a = Assignment(U(), 4, 1e6, 3.0, group=0)
    # on the guess: the wait is 1.5 - 1.0 = 0.5 s, so tokens done by 0.2 and 0.5 s are free
    guess = Answer(None, 0.1, 0.05, 0.15, ahead_s=(0.2, 0.5, 0.7), ahead_guess=True)
    piece.charge_ahead(a, guess, start_s=1.5)
    assert guess.ahead_free == 2
    assert guess.compute_s == pytest.approx(0.1 + 0.2) and guess.finish_s == pytest.approx(0.35)
    # after the result: the wait is 1.5 - 1.25 = 0.25 s, one token fits
    truth = Answer(None, 0.1, 0.05, 0.15, ahead_s=(0.2, 0.5, 0.7), ahead_guess=False)
    piece.charge_ahead(a, truth, start_s=1.5)
    assert truth.ahead_free == 1 and truth.compute_s == pytest.approx(0.1 + 0.5)
    # a user that waits on its own result starts offset_s later: more of the wait
    a.offset_s = 0.3
    late = Answer(None, 0.1, 0.05, 0.15, ahead_s=(0.2, 0.5, 0.7), ahead_guess=False)
    piece.charge_ahead(a, late, start_s=1.5)
    assert late.ahead_free == 2
    assert piece.predrafted("b") == 0


def test_ahead_fields_are_checked():
    from multispin_env.live.validation import Rejected, parse_ahead

    assert parse_ahead({}, 3, offered=False) == ((), False)
    ok = {"ahead": 2, "ahead_compute_s": [0.1, 0.3], "ahead_guess": 1}
    assert parse_ahead(ok, 3, offered=True) == ((0.1, 0.3), True)
    bad = [
        (ok, 3, False, "did not follow a round that offered"),
        ({**ok, "ahead": 4}, 3, True, "draft.ahead=4"),
        ({**ok, "ahead": 0}, 3, True, "draft.ahead=0"),
        ({**ok, "ahead_compute_s": [0.1]}, 3, True, "ahead_compute_s must list 2"),
        ({**ok, "ahead_compute_s": [0.3, 0.1]}, 3, True, "non-decreasing"),
        ({**ok, "ahead_compute_s": [0.1, float("nan")]}, 3, True, "non-decreasing"),
        ({**ok, "ahead_compute_s": [0.1, "x"]}, 3, True, "must hold numbers"),
        ({**ok, "ahead_compute_s": ["0.1", "0.3"]}, 3, True, "must hold numbers"),
        ({**ok, "ahead_compute_s": [False, True]}, 3, True, "must hold numbers"),
        ({**ok, "ahead_guess": 2}, 3, True, "ahead_guess=2"),
        ({"ahead_guess": 1}, 3, True, "need draft.ahead"),
    ]
    for msg, tokens, offered, text in bad:
        with pytest.raises(Rejected, match=text):
            parse_ahead(msg, tokens, offered)
    with pytest.raises(Rejected, match="ahead_guess=1, but the previous draft"):
        parse_ahead(ok, 3, offered=True, whole_accepted=False)
    assert parse_ahead({**ok, "ahead_guess": 0}, 3, True, whole_accepted=False)[1] is False


def test_proactive_drafting_needs_pipelined_groups():
    from multispin_env.live.server import LiveConfig

    with pytest.raises(ValueError, match="proactive_drafting needs pipelined groups"):
        LiveConfig(proactive_drafting=True)
    with pytest.raises(ValueError, match="proactive_drafting needs pipelined groups"):
        LiveConfig(proactive_drafting=True, pipeline_groups=2, early_stop=True)
    LiveConfig(proactive_drafting=True, pipeline_groups=2)


def test_a_guess_claimed_after_a_rejection_costs_only_its_sender(pair):
    """A device that reports ahead tokens as drafted on the guess (the longer free wait)
    although its previous draft was not accepted whole is refused that round; the honest
    devices' rounds go on."""
    from test_live_protocols import FixedScheduler, _play

    import multispin_env.live.device as device_module

    honest = device_module._usable_ahead

    def liar(session, ahead, msg, length, stop, cfg):
        usable = honest(session, ahead, msg, length, stop, cfg)
        if usable is not None and cfg.device_id == "a":
            usable.guess = True  # always claim the guess's window
        return usable

    device_module._usable_ahead = liar
    try:
        server, outputs = _play(
            pair, FixedScheduler(3, groups=2), rounds=8, pipeline_groups=2, proactive_drafting=True
        )
    finally:
        device_module._usable_ahead = honest
    errors = [e for e in server.protocol_errors if "ahead_guess=1" in e]
    assert errors and all(e.startswith("'a': bad_draft") for e in errors)
    rejected = [r for rec in server.records for r in rec.users if r.get("rejected")]
    assert rejected and {r["device_id"] for r in rejected} == {"a"}
    for device_id in ("b", "c", "d"):
        assert outputs[device_id] == server.verifier.outputs[device_id]


@pytest.mark.parametrize("mode", ["rejected", "dropped"])
def test_no_guess_is_taken_after_a_draft_that_was_not_verified(mode):
    """A draft accepted whole, then one rejected (or dropped as late): a guess claimed on
    the next draft is refused, since the last draft was not accepted whole."""
    import asyncio

    from conftest import make_tiny_pair
    from test_live_protocols_adversarial import (
        VOCAB as ADV_VOCAB,
    )
    from test_live_protocols_adversarial import (
        Raw,
        Scheduler,
        _honest,
        _server,
        continuation,
        draft_msg,
    )

    drafter, verifier = make_tiny_pair(ADV_VOCAB, seed=2)
    prompt = [3, 4]

    async def scenario():
        server = _server(
            verifier,
            Scheduler(3, groups=2),
            pipeline_groups=2,
            proactive_drafting=True,
            round_timeout_s=0.5,
        )
        port = await server.start()
        _, good = _honest(port, "good", [1, 2], drafter)
        await server.wait_for_users(1)
        bad = await Raw.join(port, "bad", prompt)
        await server.wait_for_users(2)
        replies = []

        async def driver():
            rnd = await bad.next_of("round")  # accepted whole: the verifier's continuation
            tokens = continuation(server, verifier, "bad", prompt, 3)
            await bad.send(draft_msg(rnd["round"], tokens))
            replies.append((await bad.next_of("result"))["accepted"])
            rnd = await bad.next_of("round")
            if mode == "rejected":
                await bad.send(draft_msg(rnd["round"], [5, 5, 5]) | {"kept": 3})
                await bad.next_of("error")
            rnd = await bad.next_of("round")
            tokens = continuation(server, verifier, "bad", prompt, 3)
            claim = {"ahead": 3, "ahead_compute_s": [1e-4, 2e-4, 3e-4], "ahead_guess": 1}
            await bad.send(draft_msg(rnd["round"], tokens, compute_s=0.0) | claim)
            replies.append(await bad.next_of("error", "result"))

        task = asyncio.create_task(driver())
        for _ in range(4):
            await server.play_round()
        await server.flush()
        await asyncio.wait_for(task, 10)
        bad.close()
        await server.stop(grace_s=1.0)
        await good
        return replies

    accepted, claim_reply = asyncio.run(scenario())
    assert accepted == 3
    assert claim_reply["type"] == "error" and "ahead_guess=1" in claim_reply["message"]


def test_devices_drafting_ahead_stop_at_the_drafters_context():
    """Near the context limit an ahead draft is cut to the drafter's room: the run ends its
    requests cleanly (context_full) and stays exact."""
    from conftest import make_tiny_pair
    from test_live_protocols import FixedScheduler, _check_greedy, _play

    small = make_tiny_pair(VOCAB, seed=1, noise=0.2, n_positions=24)
    server, outputs = _play(
        small,
        FixedScheduler(3, groups=2),
        rounds=14,
        pipeline_groups=2,
        proactive_drafting=True,
    )
    _check_greedy(server, small[1], outputs)
    assert any(u.end_reason == "context_full" for u in server.users.values())
