"""Adversarial tests of the extended protocols live (deadline streams, pipelined groups,
early stop, profile timing).

Hand-driven raw TCP devices misbehave (bad streams, silence, disconnects, rejoins, drafts
near the context limit, seed-aware PMFs) next to honest in-process devices. Each case checks
that the bad message gets an ``error`` naming the field, costs only its sender, and loses
nothing already accepted; that every honest greedy output equals the verifier's own greedy
decoding; and that recorded rounds follow the protocols' timing rules, recomputed here
independently from the messages and the profile.
"""

import asyncio
import struct

import msgpack
import numpy as np
import pytest
import torch

from multispin_env.live import protocol as proto
from multispin_env.live.device import DeviceConfig, run_device
from multispin_env.live.server import EdgeServer, LiveConfig
from multispin_env.live.speculative import (
    DecodingConfig,
    DrafterSession,
    VerifierServer,
    draft_uniforms,
    sample_index,
    verifier_greedy_reference,
)
from multispin_env.live.validation import Rejected, stream_arrivals_s
from multispin_env.types import Decision

VOCAB = 48
KEPT = 16
PAYLOAD_BITS = KEPT * (16 + 6)  # Eq. 9 with a 48-token vocabulary: ceil(log2 48) = 6


@pytest.fixture(scope="module")
def pair():
    from conftest import make_tiny_pair

    return make_tiny_pair(VOCAB, seed=2)


# ---------------------------------------------------------------------------- helpers
class Scheduler:
    """The same decision for every user; ``groups_of(cycle, k)`` may change the groups and
    ``deadline_of(view)`` may set the deadline from the server's view."""

    def __init__(self, length=3, stop=None, deadline_s=None, groups=None, groups_of=None):
        self.length, self.stop, self.deadline_s, self.groups = length, stop, deadline_s, groups
        self.groups_of = groups_of
        self.calls = 0
        self.deadline_of = None

    def decide(self, view):
        k = view.spectral_eff_est.shape[1]
        lengths = np.full((1, k), self.length)
        group = None
        if self.groups is not None:
            group = (np.arange(k) % self.groups)[None, :]
            if self.groups_of is not None:
                group = np.asarray(self.groups_of(self.calls, k))[None, :]
        self.calls += 1
        if group is None:
            bandwidth = np.full((1, k), view.bandwidth_hz / k)
        else:
            sizes = np.bincount(group[0], minlength=max(self.groups, group.max() + 1))
            bandwidth = view.bandwidth_hz / sizes[group]
        stop = None if self.stop is None else np.full((1, k), self.stop)
        deadline = self.deadline_s
        if self.deadline_of is not None:
            deadline = self.deadline_of(view, bandwidth)
        deadline = None if deadline is None else np.array([deadline])
        return Decision(lengths, bandwidth, stop, deadline, group)


def _server(verifier, scheduler, **kw) -> EdgeServer:
    fields = dict(
        max_users=4,
        greedy=True,
        kept_vocab=KEPT,
        max_draft_length=4,
        round_timeout_s=5.0,
        heartbeat_s=0.5,
    )
    fields.update(kw)
    return EdgeServer(LiveConfig(**fields), verifier, scheduler, VOCAB)


def _honest(port, device_id, prompt, drafter, **kw):
    cfg = DeviceConfig(
        device_id, prompt, port=port, greedy=kw.pop("greedy", True), kept_vocab=KEPT,
        time_scale=0.0, **kw,
    )  # fmt: skip
    return cfg, asyncio.create_task(run_device(cfg, drafter=drafter))


class Raw:
    """A hand-driven device: raw frames (so that invalid values can be sent)."""

    def __init__(self, reader, writer, welcome):
        self.reader, self.writer, self.welcome = reader, writer, welcome

    @classmethod
    async def join(cls, port, device_id, prompt, session=None):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer, None)
        hello = {"device_id": device_id, "prompt": list(prompt), "speed_factor": 1.0,
                 "mean_gain": 0.3}  # fmt: skip
        if session:
            hello["session"] = session
        await raw.send({"type": "hello", **hello})
        raw.welcome = await raw.next_of("welcome", "error")
        return raw

    async def send(self, msg: dict) -> None:
        body = msgpack.packb({"v": proto.PROTOCOL_VERSION, **msg}, use_bin_type=True)
        self.writer.write(struct.pack(">I", len(body)) + body)
        await self.writer.drain()

    async def next_of(self, *kinds, timeout_s: float = 10.0) -> dict:
        async def scan():
            while True:
                msg = await proto.read_message(self.reader)
                if msg["type"] in kinds:
                    return msg

        return await asyncio.wait_for(scan(), timeout_s)

    async def stream(self, r, tokens, times, cut=0, end_compute=None, rows=None):
        """Stream ``tokens`` (drafting times ``times``) and a matching draft_end."""
        for i, (x, c) in enumerate(zip(tokens, times, strict=True)):
            row = None if rows is None else rows[i]
            await self.send(token_msg(r, i, x, c, row))
        end = times[-1] if end_compute is None and times else (end_compute or 0.0)
        await self.send(end_msg(r, len(tokens), end, cut))

    def close(self):
        self.writer.close()


def pmf_row(token: int, zero_token: bool = False):
    """A uniform PMF over ``token`` and 15 other ids (q(token) = 0 if ``zero_token``)."""
    others = [i for i in range(VOCAB) if i != token]
    indices = np.array([token] + others[: KEPT - 1], dtype=np.int32)
    values = np.full(KEPT, 1.0 / KEPT, dtype=np.float16)
    if zero_token:
        values[0] = 0.0
    return indices, values


def token_msg(r, index, token, compute_s, row=None) -> dict:
    indices, values = pmf_row(token) if row is None else row
    return {
        "type": "token",
        "round": r,
        "index": index,
        "token": token,
        "q_indices": np.asarray(indices, np.int32).tobytes(),
        "q_values": np.asarray(values, np.float16).tobytes(),
        "compute_s": compute_s,
    }


def end_msg(r, count, compute_s, cut=0) -> dict:
    return {"type": "draft_end", "round": r, "count": count, "compute_s": compute_s, "cut": cut}


def draft_msg(r, tokens, compute_s=1e-3, upload_s=1e-3) -> dict:
    rows = [pmf_row(t) for t in tokens]
    return {
        "type": "draft",
        "round": r,
        "tokens": list(tokens),
        "q_indices": b"".join(i.tobytes() for i, _ in rows),
        "q_values": b"".join(v.tobytes() for _, v in rows),
        "kept": KEPT,
        "compute_s": compute_s,
        "upload_s": upload_s,
    }


def continuation(server, verifier, device_id, prompt, n):
    """The verifier's next ``n`` greedy tokens for this user (a draft that is all accepted)."""
    context = list(prompt) + server.verifier.outputs[device_id]
    return verifier_greedy_reference(verifier, context, n)


def _check_exact(server, verifier, prompts, device_outputs=None):
    for device_id, prompt in prompts.items():
        out = server.verifier.outputs[device_id]
        assert out == verifier_greedy_reference(verifier, prompt, len(out)), device_id
        if device_outputs is not None and device_id in device_outputs:
            assert device_outputs[device_id] == out, device_id  # the device agrees


def _rows(rec):
    return {r["device_id"]: r for r in rec.users}


# ------------------------------------------------------------- deadline: bad streams
def _bad_stream_cases():
    """(name, messages for round r, expected code, text the error must contain, whether the
    rejection is the sender's answer for the round)."""
    t = 5  # any token: a greedy verifier decides what is committed
    bad_size = token_msg(0, 0, t, 1e-3) | {"q_indices": b"\0" * 7}
    return [
        ("token for a future round", lambda r: [token_msg(r + 1, 0, t, 1e-3)], "out_of_order",
         "round", False),
        ("duplicate index", lambda r: [token_msg(r, 0, t, 1e-3), token_msg(r, 0, t, 2e-3)],
         "bad_draft", "token.index", True),
        ("index gap", lambda r: [token_msg(r, 0, t, 1e-3), token_msg(r, 2, t, 2e-3)],
         "bad_draft", "token.index", True),
        ("index out of order", lambda r: [token_msg(r, 1, t, 1e-3)], "bad_draft",
         "token.index", True),
        ("token for a closed round", lambda r: [token_msg(r - 1, 0, t, 1e-3)], "out_of_order",
         "round", False),
        ("more tokens than draft_length",
         lambda r: [token_msg(r, i, t, 1e-3 * (i + 1)) for i in range(4)], "bad_draft",
         "draft_length", True),
        ("draft_end count above the stream", lambda r: [token_msg(r, 0, t, 1e-3),
         end_msg(r, 2, 1e-3)], "bad_draft", "draft_end.count", True),
        ("draft_end count below the stream", lambda r: [token_msg(r, 0, t, 1e-3),
         token_msg(r, 1, t, 2e-3), end_msg(r, 1, 2e-3)], "bad_draft", "draft_end.count", True),
        ("draft_end without tokens", lambda r: [end_msg(r, 1, 1e-3)], "bad_draft",
         "draft_end.count", True),
        ("cut=2", lambda r: [token_msg(r, 0, t, 1e-3), end_msg(r, 1, 1e-3, cut=2)],
         "bad_draft", "draft_end.cut", True),
        ("cut=-1", lambda r: [token_msg(r, 0, t, 1e-3), end_msg(r, 1, 1e-3, cut=-1)],
         "bad_draft", "draft_end.cut", True),
        ("boolean cut", lambda r: [end_msg(r, 0, 0.0, cut=True)], "bad_message",
         "draft_end.cut", False),
        ("decreasing compute_s", lambda r: [token_msg(r, 0, t, 2e-3), token_msg(r, 1, t, 1e-3),
         end_msg(r, 2, 2e-3)], "bad_draft", "token.compute_s", True),
        ("negative compute_s", lambda r: [token_msg(r, 0, t, -1e-3), end_msg(r, 1, 0.0)],
         "bad_draft", "token.compute_s", True),
        ("huge compute_s", lambda r: [token_msg(r, 0, t, 1e9), end_msg(r, 1, 1e9)],
         "bad_draft", "compute_s", True),
        ("NaN compute_s", lambda r: [token_msg(r, 0, t, float("nan"))], "bad_message",
         "token.compute_s", False),
        ("infinite draft_end compute_s", lambda r: [end_msg(r, 0, float("inf"))],
         "bad_message", "draft_end.compute_s", False),
        ("draft_end compute_s below the last token's", lambda r: [token_msg(r, 0, t, 2e-3),
         end_msg(r, 1, 1e-3)], "bad_draft", "draft_end.compute_s", True),
        ("7-byte index row", lambda r: [bad_size | {"round": r}], "bad_draft",
         "token.q_indices", True),
        ("value row one entry short", lambda r: [token_msg(r, 0, t, 1e-3)
         | {"q_values": b"\0" * (2 * KEPT - 2)}], "bad_draft", "token.q_values", True),
        ("token outside its own PMF support", lambda r: [token_msg(r, 0, t, 1e-3,
         pmf_row(t, zero_token=True)), end_msg(r, 1, 1e-3)], "bad_draft", "probability 0",
         True),
        ("token not among its PMF's indices", lambda r: [token_msg(r, 0, 40, 1e-3,
         pmf_row(3)), end_msg(r, 1, 1e-3)], "bad_draft", "probability 0", True),
        ("token id past the vocabulary", lambda r: [token_msg(r, 0, VOCAB + 3, 1e-3,
         pmf_row(3)), end_msg(r, 1, 1e-3)], "bad_draft", "vocabulary", True),
        ("negative token id", lambda r: [token_msg(r, 0, -1, 1e-3, pmf_row(3)),
         end_msg(r, 1, 1e-3)], "bad_message", "token.token", True),
        ("NaN probability", lambda r: [token_msg(r, 0, t, 1e-3, (pmf_row(t)[0], np.r_[
         pmf_row(t)[1][:-1], np.float16("nan")].astype(np.float16))), end_msg(r, 1, 1e-3)],
         "bad_draft", "q_values", True),
        ("repeated PMF index", lambda r: [token_msg(r, 0, t, 1e-3, (np.r_[pmf_row(t)[0][:-1],
         t].astype(np.int32), pmf_row(t)[1])), end_msg(r, 1, 1e-3)], "bad_draft",
         "q_indices", True),
        ("PMF index past the vocabulary", lambda r: [token_msg(r, 0, t, 1e-3,
         (np.r_[pmf_row(t)[0][:-1], VOCAB].astype(np.int32), pmf_row(t)[1])),
         end_msg(r, 1, 1e-3)], "bad_draft", "q_indices", True),
        ("a whole draft in a deadline round", lambda r: [draft_msg(r, [t])], "bad_draft",
         "token + draft_end", True),
        ("a token after draft_end", lambda r: [token_msg(r, 0, t, 1e-3), end_msg(r, 1, 1e-3),
         token_msg(r, 1, t, 2e-3)], "duplicate", "round", None),
    ]  # fmt: skip


def test_deadline_bad_streams_are_named_cost_only_their_sender_and_lose_nothing(pair):
    drafter, verifier = pair
    cases = _bad_stream_cases()
    prompts = {"good": [1, 2], "bad": [3, 4]}

    async def scenario():
        server = _server(verifier, Scheduler(3, deadline_s=60.0), streaming_deadline=True)
        port = await server.start()
        cfg, good = _honest(port, "good", prompts["good"], drafter)
        await server.wait_for_users(1)
        bad = await Raw.join(port, "bad", prompts["bad"])
        report = []
        for name, make, code, field, answered in cases:
            before = list(server.verifier.outputs["bad"])
            good_before = len(server.verifier.outputs["good"])
            play = asyncio.create_task(server.play_round())
            rnd = await bad.next_of("round")
            r = rnd["round"]
            assert rnd["draft_length"] == 3 and rnd["deadline_s"] == 60.0
            for msg in make(r):
                await bad.send(msg)
            err = await bad.next_of("error")
            report.append((name, err["code"], err["message"]))
            assert err["code"] == code, (name, err)
            assert field in err["message"], (name, err["message"])
            if answered is False:  # not an answer: the sender still owes the round a draft
                x = continuation(server, verifier, "bad", prompts["bad"], 2)
                await bad.stream(r, x, [1e-3, 2e-3])
                await bad.next_of("result")
            rec = await asyncio.wait_for(play, 10)
            rows = _rows(rec)
            assert rec.wall_s < 2.0, name  # nobody waited for the round timeout
            assert rows["good"].get("committed", 0) >= 1, name  # the other user was served
            assert len(server.verifier.outputs["good"]) > good_before
            after = server.verifier.outputs["bad"]
            assert after[: len(before)] == before, name  # nothing accepted was lost
            if answered:
                assert "bad" in rec.rejected and rows["bad"]["rejected"], name
                assert after == before, name  # the bad stream changed nothing
            else:
                assert "bad" not in rec.rejected and len(after) > len(before), name
        # the sender rejoins with its secret: its whole record, nothing lost or duplicated
        bad.close()
        await asyncio.sleep(0.05)
        again = await Raw.join(port, "bad", prompts["bad"], session=bad.welcome["session"])
        assert again.welcome["type"] == "welcome"
        assert again.welcome["committed"] == server.verifier.outputs["bad"]
        again.close()
        await server.stop(grace_s=1.0)
        out = await good
        assert not [e for e in server.protocol_errors if not e.startswith("'bad'")]
        return server, out, cfg, report

    server, out, cfg, report = asyncio.run(scenario())
    assert len(report) == len(cases)
    _check_exact(server, verifier, prompts, {"good": out})
    assert not [line for line in cfg.log if "server error" in line]


# ------------------------------------------------------------- deadline: timing rule
def test_deadline_rule_on_recorded_rounds_fifo_arrivals_and_min_of_d_and_last_arrival(pair):
    """Two hand-driven devices report chosen drafting times; the server must keep exactly
    the tokens whose FIFO arrival a_i = max(a_{i-1}, C_i) + u is <= D, verify only those,
    and put the round at T = min(D, last arrival) + V (a cut draft counts as D)."""
    _, verifier = pair
    prompts = {"p": [6, 1, 2], "q": [9]}
    # per round and device: (drafting times as fractions of D, declared cut)
    plans = [
        {"p": ([0.0, 0.0], 0), "q": ([0.1], 0)},  # all in time: T = last arrival
        {"p": ([0.0, 0.0, 0.0, 0.0], 0), "q": ([0.3, 0.35, 0.9], 0)},  # upload-bound cut
        {"p": ([0.0], 1), "q": ([0.0], 0)},  # declared cut although in time: counts as D
        {"p": ([], 1), "q": ([], 1)},  # both cut to nothing: nothing to verify, T = D
        {"p": ([0.2, 0.5, 0.97], 0), "q": ([0.0, 0.0], 0)},  # compute-bound tail
    ]
    scheduler = Scheduler(4)

    def deadline_of(view, bandwidth):  # D = 2.5 uploads of the slowest user's token
        upload = view.payload_bits / (bandwidth[0] * view.spectral_eff_est[0])
        return 2.5 * float(upload.max())

    scheduler.deadline_of = deadline_of

    async def scenario():
        server = _server(verifier, scheduler, streaming_deadline=True, max_users=2)
        assert server.payload_bits == PAYLOAD_BITS
        port = await server.start()
        devices = {d: await Raw.join(port, d, p) for d, p in prompts.items()}
        checked = 0
        for plan in plans:
            play = asyncio.create_task(server.play_round())
            rounds = {d: await raw.next_of("round") for d, raw in devices.items()}
            deadline = {m["deadline_s"] for m in rounds.values()}
            assert len(deadline) == 1
            deadline = deadline.pop()
            expected = {}
            for d, raw in devices.items():
                msg = rounds[d]
                fractions, declared = plan[d]
                times = [f * deadline for f in fractions]
                u = PAYLOAD_BITS / (msg["bandwidth_hz"] * msg["spectral_eff"])
                arrivals, previous = [], 0.0
                for c in times:  # the FIFO uplink, recomputed here
                    previous = max(previous, c) + u
                    arrivals.append(previous)
                kept = sum(a <= deadline for a in arrivals)
                cut = bool(declared) or kept < len(times)
                finish = deadline if cut or not kept else arrivals[kept - 1]
                expected[d] = (kept, cut, finish, u)
                tokens = continuation(server, verifier, d, prompts[d], len(times))
                await raw.stream(msg["round"], tokens, times, cut=declared,
                                 end_compute=times[-1] if times else 0.0)  # fmt: skip
            rec = await asyncio.wait_for(play, 10)
            rows = _rows(rec)
            for d, (kept, cut, finish, u) in expected.items():
                row = rows[d]
                assert row["drafted"] == kept, (plan, d, row)
                assert row["accepted"] == kept  # the verifier's own tokens: all accepted
                assert row["committed"] == (kept + 1 if kept else 0)
                assert row["cut"] == cut
                assert row["finish_s"] == pytest.approx(finish, rel=1e-12, abs=0.0)
                assert row["finish_s"] <= deadline * (1 + 1e-9)
                assert row["upload_s"] == pytest.approx(kept * u, rel=1e-12)
                checked += kept != len(plan[d][0])  # rounds where a late tail was dropped
            t = min(deadline, max(f for _, _, f, _ in expected.values()))
            verified = [d for d, e in expected.items() if e[0]]
            assert (rec.verify_s > 0) == bool(verified)
            assert rec.timeline_s == pytest.approx(t + rec.verify_s, rel=1e-12)
        for raw in devices.values():
            raw.close()
        await server.stop(grace_s=0.5)
        return server, checked

    server, checked = asyncio.run(scenario())
    assert checked >= 1  # at least one stream was cut by arrival, not by the device
    assert not server.protocol_errors
    _check_exact(server, verifier, prompts)


def test_stream_arrivals_match_an_independent_fifo_and_refuse_bad_times():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 9))
        times = np.cumsum(rng.exponential(1e-3, n) * (rng.random(n) < 0.7))
        u = float(rng.exponential(1e-3))
        expected, previous = [], 0.0
        for c in times:
            previous = max(previous, c) + u
            expected.append(previous)
        assert stream_arrivals_s(list(times), u) == pytest.approx(expected, rel=1e-12)
    assert stream_arrivals_s([], 1e-3).size == 0
    assert list(stream_arrivals_s([0.0, 0.0, 0.0], 1.0)) == [1.0, 2.0, 3.0]
    for bad in ([float("nan")], [float("inf")], [-1e-9], [3600.5], [1e-3, 5e-4]):
        with pytest.raises(Rejected, match="token.compute_s"):
            stream_arrivals_s(bad, 1e-3)


# ---------------------------------------------------------- deadline: disconnects
def test_deadline_device_disconnecting_mid_stream_ends_its_part_only_and_rejoins(pair):
    drafter, verifier = pair
    prompts = {"good": [1, 2, 3], "gone": [7, 7]}

    async def scenario():
        server = _server(verifier, Scheduler(3, deadline_s=60.0), streaming_deadline=True)
        port = await server.start()
        _, good = _honest(port, "good", prompts["good"], drafter)
        await server.wait_for_users(1)
        gone = await Raw.join(port, "gone", prompts["gone"])
        play = asyncio.create_task(server.play_round())
        rnd = await gone.next_of("round")
        x = continuation(server, verifier, "gone", prompts["gone"], 2)
        for i in range(2):  # two of three tokens, then the connection drops
            await gone.send(token_msg(rnd["round"], i, x[i], 1e-3 * (i + 1)))
        gone.close()
        rec = await asyncio.wait_for(play, 10)
        assert rec.wall_s < 2.0  # the round did not wait for the vanished device
        rows = _rows(rec)
        assert rows["gone"]["dropped"] and "accepted" not in rows["gone"]
        assert rows["good"]["committed"] >= 1
        assert server.verifier.outputs["gone"] == []  # a half stream commits nothing
        # the device comes back as a real device with its secret and plays on
        cfg, back = _honest(port, "gone", prompts["gone"], drafter,
                            session=gone.welcome["session"])  # fmt: skip
        await server.wait_for_users(2)
        for _ in range(3):
            await server.play_round()
        await server.stop()
        return server, {"good": await good, "gone": await back}

    server, outputs = asyncio.run(scenario())
    assert len(outputs["gone"]) >= 3
    _check_exact(server, verifier, prompts, outputs)


def test_deadline_device_that_never_ends_its_stream_is_dropped_at_the_round_timeout(pair):
    drafter, verifier = pair
    prompts = {"good": [4, 5], "stuck": [8, 2, 2]}

    async def scenario():
        server = _server(
            verifier, Scheduler(3, deadline_s=60.0), streaming_deadline=True,
            round_timeout_s=0.5, max_missed_rounds=3,
        )  # fmt: skip
        port = await server.start()
        _, good = _honest(port, "good", prompts["good"], drafter)
        await server.wait_for_users(1)
        stuck = await Raw.join(port, "stuck", prompts["stuck"])
        play = asyncio.create_task(server.play_round())
        rnd = await stuck.next_of("round")
        x = continuation(server, verifier, "stuck", prompts["stuck"], 1)
        await stuck.send(token_msg(rnd["round"], 0, x[0], 1e-3))  # ... and no draft_end
        rec = await asyncio.wait_for(play, 10)
        assert 0.5 <= rec.wall_s < 3.0  # ended by round_timeout_s, not later
        rows = _rows(rec)
        assert rows["stuck"]["dropped"] and rows["good"]["committed"] >= 1
        assert server.verifier.outputs["stuck"] == []  # the unfinished stream is not verified
        # its draft_end arrives a round late: refused by round, not applied
        play = asyncio.create_task(server.play_round())
        nxt = await stuck.next_of("round")
        await stuck.send(end_msg(rnd["round"], 1, 1e-3))
        err = await stuck.next_of("error")
        assert err["code"] == "out_of_order" and f"round {rnd['round']}" in err["message"]
        await stuck.stream(nxt["round"], x[:1], [1e-3])  # and it answers the new round
        rec = await asyncio.wait_for(play, 10)
        assert _rows(rec)["stuck"]["committed"] == 2  # answered in time: not dropped
        assert server.users["stuck"].missed_rounds == 0
        stuck.close()
        await server.stop(grace_s=1.0)
        return server, {"good": await good}

    server, outputs = asyncio.run(scenario())
    _check_exact(server, verifier, prompts, outputs)


# ------------------------------------------------------------- messages out of mode
@pytest.mark.parametrize("protocol", ["sync", "pipeline"])
def test_streamed_messages_in_a_round_that_takes_one_draft_are_refused_by_name(pair, protocol):
    drafter, verifier = pair
    prompts = {"good": [1, 9], "odd": [2, 3]}
    kw = {"pipeline_groups": 2} if protocol == "pipeline" else {}

    async def scenario():
        groups = 2 if protocol == "pipeline" else None
        server = _server(verifier, Scheduler(3, groups=groups), **kw)
        port = await server.start()
        _, good = _honest(port, "good", prompts["good"], drafter)
        await server.wait_for_users(1)
        odd = await Raw.join(port, "odd", prompts["odd"])
        for msg_of in (lambda r: token_msg(r, 0, 5, 1e-3), lambda r: end_msg(r, 0, 0.0)):
            play = asyncio.create_task(server.play_round())
            rnd = await odd.next_of("round")
            await odd.send(msg_of(rnd["round"]))
            err = await odd.next_of("error")
            assert err["code"] == "bad_draft"
            assert f"in a {protocol} round" in err["message"] and "one draft" in err["message"]
            rec = await asyncio.wait_for(play, 10)
            assert rec.wall_s < 2.0  # the refusal is its answer: nobody waits
            assert "odd" in rec.rejected
        odd.close()
        await server.flush()
        await server.stop(grace_s=1.0)
        return server, {"good": await good}

    server, outputs = asyncio.run(scenario())
    assert server.verifier.outputs["odd"] == []
    _check_exact(server, verifier, prompts, outputs)


# ------------------------------------------------------------------- pipeline timing
def test_pipeline_phases_follow_the_timeline_rule_under_profile_timing(pair):
    """Each phase = max(draft + upload of group g, verification of group g - 1), with the
    profile's drafting time, payload and verification law; the cycle is the sum of its
    phases; every draft is verified exactly once (the flush verifies the last group); users
    whose previous draft is in verification start V later."""
    from multispin_env.config import load_preset

    drafter, verifier = pair
    profile = load_preset("realistic-llama2")
    prompts = {"a": [1, 2, 3], "b": [5], "c": [7, 8], "d": [11, 4, 4]}
    speed = {"a": 1.0, "b": 1.3, "c": 0.8, "d": 2.0}
    layout = [[0, 1, 0, 1], [0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]]
    scheduler = Scheduler(3, groups=2, groups_of=lambda cycle, k: layout[cycle][:k])
    events = []

    async def scenario():
        server = _server(verifier, scheduler, pipeline_groups=2,
                         timing="profile:realistic-llama2")  # fmt: skip
        collect, verify = server.collect, server.verify_and_reply

        async def logged_collect():
            opened = dict(server._open)
            answers, rejected, dropped = await collect()
            events.append(("collect", opened, answers))
            return answers, rejected, dropped

        async def logged_verify(answers):
            results, verify_s = await verify(answers)
            drafts = {d: len(a.draft.tokens) for d, a in answers.items() if a.draft is not None}
            events.append(("verify", drafts, verify_s))
            return results, verify_s

        server.collect, server.verify_and_reply = logged_collect, logged_verify
        port = await server.start()
        tasks = {}
        for d, p in prompts.items():  # one at a time: slots follow the order
            _, tasks[d] = _honest(port, d, p, drafter, speed_factor=speed[d])
            await server.wait_for_users(len(tasks))
        for _ in range(len(layout)):
            await server.play_round()
        assert await server.flush() is not None
        await server.stop()
        return server, {d: await t for d, t in tasks.items()}

    server, outputs = asyncio.run(scenario())
    _check_exact(server, verifier, prompts, outputs)
    # group phases, in order, from the logged calls: [verify of the previous group] collect
    phases, pending, previous = [], None, {}
    for kind, *data in events:
        if kind == "verify":
            pending = data
            continue
        opened, answers = data
        phases.append((pending, opened, answers, previous))
        previous, pending = answers, None
    flush_verify = pending
    recorded = [p for rec in server.records for p in rec.phases]
    assert len(recorded) == len(phases) + 1 and recorded[-1]["group"] is None
    waited = 0
    for (verified, opened, answers, before), phase in zip(phases, recorded, strict=False):
        with_draft = {d: a for d, a in before.items() if a.draft is not None}
        if verified is None:
            assert not with_draft and phase["verify_s"] == 0.0
            v = 0.0
        else:
            drafts, v = verified
            assert drafts == {d: len(a.draft.tokens) for d, a in with_draft.items()}
            law = profile.verification_model.latency_for_batch_s(len(drafts), max(drafts.values()))
            assert v == pytest.approx(law, rel=1e-12) and phase["verify_s"] == v
        busy = []
        for d, a in opened.items():
            assert {a.group} == {phase["group"]}
            offset = v if d in before else 0.0  # started after its previous result
            assert a.offset_s == pytest.approx(offset, rel=1e-12)
            waited += d in before
            ans = answers[d]
            n = len(ans.draft.tokens)
            rate = a.bandwidth_hz * a.spectral_eff
            assert ans.compute_s == pytest.approx(n * profile.t_draft_mean_s * speed[d])
            assert ans.upload_s == pytest.approx(n * profile.payload_bits / rate)
            busy.append(offset + ans.compute_s + ans.upload_s)
        assert phase["draft_upload_s"] == pytest.approx(max(busy, default=0.0), rel=1e-12)
        assert phase["phase_s"] == pytest.approx(max(phase["draft_upload_s"], v), rel=1e-12)
    assert waited >= 1  # the changing layout made some user wait for its result
    # groups holding users whose draft is still in verification play last; with the same
    # groups as the cycle before, nobody waits
    start = 0
    for cycle, rec in enumerate(server.records[:-1]):
        mine = phases[start : start + len(rec.phases)]
        start += len(rec.phases)
        carried = set(mine[0][3])
        counts = [sum(d in carried for d in opened) for _, opened, _, _ in mine]
        assert counts == sorted(counts), (cycle, counts)
        if cycle and layout[cycle] == layout[cycle - 1]:
            assert counts[0] == 0 and all(a.offset_s == 0 for a in mine[0][1].values())
    assert start == len(phases)
    assert flush_verify is not None and recorded[-1]["verify_s"] == flush_verify[1]
    for rec in server.records:
        assert rec.timeline_s == pytest.approx(sum(p["phase_s"] for p in rec.phases))
        assert rec.verify_s == pytest.approx(sum(p["verify_s"] for p in rec.phases))
    # every draft verified once: one row with "accepted" per cycle and user, and the rows'
    # committed tokens add up to the user's whole text
    for d in prompts:
        rows = [r for rec in server.records for r in rec.users if r["device_id"] == d]
        verified_rows = [r for r in rows if "accepted" in r]
        assert len(verified_rows) == len(layout)
        assert sum(r["committed"] for r in verified_rows) == len(outputs[d])


# ------------------------------------------------------------- pipeline: misbehaviour
def test_pipeline_silent_device_costs_its_phase_only_and_is_cut_off(pair):
    drafter, verifier = pair
    prompts = {"a": [1, 2], "c": [3, 1]}

    async def scenario():
        server = _server(verifier, Scheduler(3, groups=2), pipeline_groups=2,
                         round_timeout_s=0.3, max_missed_rounds=2)  # fmt: skip
        port = await server.start()
        _, a = _honest(port, "a", prompts["a"], drafter)
        await server.wait_for_users(1)
        silent = await Raw.join(port, "s", [9, 9])  # slot 1: group 1
        _, c = _honest(port, "c", prompts["c"], drafter)  # slot 2: group 0
        await server.wait_for_users(3)
        for _ in range(4):
            await server.play_round()
        await server.flush()
        err = await silent.next_of("error")
        silent.close()
        await server.stop()
        return server, {"a": await a, "c": await c}, err

    server, outputs, err = asyncio.run(scenario())
    assert err["code"] == "unresponsive"
    _check_exact(server, verifier, prompts, outputs)
    dropped = [rec for rec in server.records if "s" in rec.dropped]
    assert len(dropped) == 2  # max_missed_rounds phases, then disconnected
    assert server.verifier.outputs["s"] == []
    for d in prompts:  # the honest users were verified once per cycle all along
        rows = [r for rec in server.records for r in rec.users if r["device_id"] == d]
        assert len([r for r in rows if "accepted" in r]) == 4
    for rec in server.records:
        assert rec.timeline_s == pytest.approx(sum(p["phase_s"] for p in rec.phases))


def test_pipeline_draft_from_a_device_outside_the_open_phase_is_refused(pair):
    drafter, verifier = pair
    prompts = {"a": [1, 2], "x": [4, 6]}

    async def scenario():
        server = _server(verifier, Scheduler(2, groups=2), pipeline_groups=2)
        port = await server.start()
        _, a = _honest(port, "a", prompts["a"], drafter)
        await server.wait_for_users(1)
        x = await Raw.join(port, "x", prompts["x"])  # group 1
        codes = []

        async def play_x():
            last = None
            for cycle in range(4):
                rnd = await x.next_of("round")
                if last is not None:
                    assert rnd["round"] == last + 2  # group 0's phase came in between
                last = rnd["round"]
                tokens = continuation(server, verifier, "x", prompts["x"], 2)
                await x.send(draft_msg(rnd["round"], tokens))
                if cycle == 3:
                    return
                await x.next_of("result")  # verified in the next cycle's first phase...
                # ... while group 0's round (last + 1) is open: x is not in it
                await x.send(draft_msg(last + 1, tokens))
                codes.append(await x.next_of("error"))

        task = asyncio.create_task(play_x())
        for _ in range(4):
            await server.play_round()
        await asyncio.wait_for(task, 10)
        await server.flush()  # verifies x's fourth draft
        x.close()
        await server.stop(grace_s=1.0)
        return server, {"a": await a}, codes

    server, outputs, codes = asyncio.run(scenario())
    assert [c["code"] for c in codes] == ["out_of_order"] * 3
    assert all("closed for this device" in c["message"] for c in codes)
    rows = [r for rec in server.records for r in rec.users if r["device_id"] == "x"]
    assert len([r for r in rows if "accepted" in r]) == 4  # the strays were not applied
    assert sum(r["committed"] for r in rows if "committed" in r) == len(
        server.verifier.outputs["x"]
    )
    _check_exact(server, verifier, prompts, outputs)


def test_pipeline_rejoin_while_a_draft_awaits_verification_loses_nothing(pair):
    drafter, verifier = pair
    prompts = {"good": [1, 2], "r": [5, 6, 7]}

    async def scenario():
        server = _server(verifier, Scheduler(3, groups=2), pipeline_groups=2)
        port = await server.start()
        _, good = _honest(port, "good", prompts["good"], drafter)
        await server.wait_for_users(1)
        raw = await Raw.join(port, "r", prompts["r"])  # group 1: its draft is carried
        play = asyncio.create_task(server.play_round())
        rnd = await raw.next_of("round")
        await raw.send(draft_msg(rnd["round"], [3, 3, 3]))
        await asyncio.wait_for(play, 10)
        assert server.round_protocol.carry is not None  # r's draft awaits verification
        raw.close()  # a network blip, then the same device rejoins with its secret
        await asyncio.sleep(0.05)
        cfg, back = _honest(port, "r", prompts["r"], drafter, session=raw.welcome["session"])
        await server.wait_for_users(2)
        for _ in range(3):
            await server.play_round()
        await server.flush()
        await server.stop()
        return server, {"good": await good, "r": await back}, cfg

    server, outputs, cfg = asyncio.run(scenario())
    _check_exact(server, verifier, {"good": prompts["good"]}, outputs)
    out = server.verifier.outputs["r"]
    assert out == verifier_greedy_reference(verifier, prompts["r"], len(out))
    assert outputs["r"] == out  # the device holds every committed token
    assert not [line for line in cfg.log if "ignored result" in line], cfg.log


@pytest.mark.parametrize("who", ["hostile", "honest-longer-drafter"])
def test_pipeline_near_the_context_limit_cannot_crash_the_round(who):
    from conftest import make_tiny_pair

    drafter, verifier = make_tiny_pair(VOCAB, seed=2, n_positions=40)
    if who == "honest-longer-drafter":  # a drafter whose own context is longer (HF pairs)
        drafter, _ = make_tiny_pair(VOCAB, seed=2, n_positions=64)
    long_prompt = list(range(1, 35))  # 34 of 40 positions

    async def scenario():
        server = _server(verifier, Scheduler(4, groups=2), pipeline_groups=2, max_users=2,
                         round_timeout_s=2.0)  # fmt: skip
        port = await server.start()
        _, good = _honest(port, "good", [1, 2], drafter)
        await server.wait_for_users(1)
        tasks = []
        if who == "hostile":
            raw = await Raw.join(port, "long", long_prompt)

            async def hostile():  # drafts exactly the length it is given
                while True:
                    rnd = await raw.next_of("round", "end")
                    if rnd["type"] == "end":
                        return
                    await raw.send(draft_msg(rnd["round"], [3] * rnd["draft_length"]))

            tasks.append(asyncio.create_task(hostile()))
        else:
            _, task = _honest(port, "long", long_prompt, drafter)
            tasks.append(task)
        await server.wait_for_users(2)
        try:
            for _ in range(8):
                await server.play_round()
            await server.flush()
        finally:
            await server.stop(grace_s=0.5)
            for task in tasks:
                task.cancel()
            await asyncio.gather(good, *tasks, return_exceptions=True)
        return server

    server = asyncio.run(scenario())
    _check_exact(server, verifier, {"good": [1, 2], "long": long_prompt})
    assert len(long_prompt) + len(server.verifier.outputs["long"]) <= 41


def test_pipeline_group_labels_outside_the_groups_do_not_silently_starve_a_user(pair):
    drafter, verifier = pair
    prompts = {"a": [1, 2], "b": [3, 4]}
    scheduler = Scheduler(2, groups=2, groups_of=lambda cycle, k: [0, 2][:k])

    async def scenario():
        server = _server(verifier, scheduler, pipeline_groups=2, round_timeout_s=1.0)
        port = await server.start()
        tasks = {}
        for d, p in prompts.items():
            _, tasks[d] = _honest(port, d, p, drafter)
            await server.wait_for_users(len(tasks))
        error = None
        try:
            for _ in range(2):
                await server.play_round()
        except ValueError as err:
            error = err
        await server.flush()
        await server.stop()
        await asyncio.gather(*tasks.values())
        return server, error

    server, error = asyncio.run(scenario())
    if error is None:  # no refusal: then every user must have played every cycle
        for d in prompts:
            rows = [r for rec in server.records for r in rec.users if r["device_id"] == d]
            assert len([r for r in rows if "accepted" in r]) == 2, d
    else:
        assert "group" in str(error)


def test_deadline_a_negative_deadline_is_refused_or_keeps_the_timeline_non_negative(pair):
    drafter, verifier = pair

    async def scenario():
        server = _server(verifier, Scheduler(3, deadline_s=-1.0), streaming_deadline=True)
        port = await server.start()
        _, task = _honest(port, "a", [1, 2], drafter)
        await server.wait_for_users(1)
        try:
            return await server.play_round(), None
        except ValueError as err:
            return None, err
        finally:
            await server.stop(grace_s=0.5)
            await asyncio.gather(task, return_exceptions=True)

    rec, error = asyncio.run(scenario())
    if error is None:
        assert rec.timeline_s >= 0.0, rec.timeline_s
    else:
        assert "deadline" in str(error)


# ------------------------------------------------------------------------ sampling
def test_sampling_streamed_tokens_must_be_the_seeds_draws(pair):
    drafter, verifier = pair

    async def scenario():
        server = _server(verifier, Scheduler(2, deadline_s=60.0), streaming_deadline=True,
                         greedy=False)  # fmt: skip
        port = await server.start()
        cfg, honest = _honest(port, "honest", [3, 4], drafter, greedy=False, seed=4)
        await server.wait_for_users(1)
        raw = await Raw.join(port, "mallet", [5, 6])
        values = np.zeros(KEPT, dtype=np.float16)
        values[1], values[9] = 1.0, np.float16(2.0**-14)  # the seed's draw is index 1
        indices = np.arange(KEPT, dtype=np.int32)
        codes = []
        for _ in range(3):
            play = asyncio.create_task(server.play_round())
            rnd = await raw.next_of("round")
            u = draft_uniforms(rnd["sample_seed"], 1)[0]
            assert indices[sample_index(values, u)] == 1
            await raw.stream(rnd["round"], [9], [1e-3], rows=[(indices, values)])
            err = await raw.next_of("error")
            codes.append(err["code"])
            assert "sample_seed" in err["message"]
            await asyncio.wait_for(play, 10)
        raw.close()
        await server.stop(grace_s=1.0)
        await honest
        return server, codes, cfg

    server, codes, cfg = asyncio.run(scenario())
    assert codes == ["bad_draft"] * 3
    assert server.verifier.outputs["mallet"] == []
    assert len(server.verifier.outputs["honest"]) >= 3  # honest streams pass the seed check
    assert not [e for e in server.protocol_errors if "honest" in e.split(":")[0]]
    assert not [line for line in cfg.log if "server error" in line]


def _shaped_row(u: float, target: int):
    """An fp16 PMF whose inverse-CDF draw at ``u`` is ``target`` with q(target) ~ 6e-5:
    what a device that knows the round's uniforms before it uploads can send."""
    b = float(np.float16(2.0**-14))

    def split(x, n):  # n fp16 values summing to x (from below, finely)
        out = []
        for _ in range(n):
            v = np.float16(x)
            if float(v) > x:
                v = np.nextafter(v, np.float16(0))
            out.append(v)
            x -= float(v)
        return out

    before = split(max(u - b / 2, 0.0), 4)
    after = split(max(1.0 - float(np.sum(np.array(before, np.float64))) - b, 0.0), 4)
    values = np.array(before + [b] + after + [0.0] * (KEPT - 9), dtype=np.float16)
    others = [i for i in range(VOCAB) if i != target]
    indices = np.array(others[:4] + [target] + others[4 : KEPT - 1], dtype=np.int32)
    assert int(indices[sample_index(values, u)]) == target  # it is the seed's draw
    return indices, values


@pytest.mark.xfail(
    strict=True,
    reason=(
        "KNOWN LIMITATION (validation.py docstring, README): sampling mode is not exact "
        "against a device that shapes its uploaded PMF around the round's uniforms, which it "
        "knows before uploading (sample_seed in the round message): the seed check passes "
        "while q(x) is tiny, so min(1, p/q) = 1 and the device steers its own text"
    ),
)
@pytest.mark.parametrize("protocol", ["sync", "deadline"])
def test_sampling_a_device_cannot_steer_the_text_by_shaping_its_pmf(pair, protocol):
    _, verifier = pair
    prompt = [5, 6, 7]
    rounds = 30

    async def scenario():
        kw = {"streaming_deadline": True} if protocol == "deadline" else {}
        scheduler = Scheduler(1, deadline_s=60.0 if kw else None)
        server = _server(verifier, scheduler, greedy=False, max_users=1, **kw)
        port = await server.start()
        raw = await Raw.join(port, "steer", prompt)
        hits, expected, variance = 0, 0.0, 0.0
        for _ in range(rounds):
            context = prompt + server.verifier.outputs["steer"]
            with torch.no_grad():
                p = torch.softmax(verifier(torch.tensor([context]))[0, -1].double(), -1)
            target = int(torch.argsort(p)[-2])  # the verifier's second choice
            play = asyncio.create_task(server.play_round())
            rnd = await raw.next_of("round")
            row = _shaped_row(float(draft_uniforms(rnd["sample_seed"], 1)[0]), target)
            if protocol == "deadline":
                await raw.stream(rnd["round"], [target], [1e-4], rows=[row])
            else:
                await raw.send(draft_msg(rnd["round"], [target]) | {
                    "q_indices": row[0].tobytes(), "q_values": row[1].tobytes()})  # fmt: skip
            await asyncio.wait_for(play, 10)
            hits += server.verifier.outputs["steer"][len(context) - len(prompt)] == target
            expected += float(p[target])
            variance += float(p[target] * (1 - p[target]))
        raw.close()
        await server.stop(grace_s=0.5)
        assert not server.protocol_errors  # every shaped draft passed validation
        return hits, expected, variance

    hits, expected, variance = asyncio.run(scenario())
    # exact decoding: the first committed token follows p, so hits ~ sum of p(target)
    assert hits <= expected + 4 * variance**0.5 + 2, (hits, expected)


# ------------------------------------------------------------------------ early stop
def test_early_stop_rule_and_kv_cache_through_stops_cuts_and_rejections(pair):
    """In process: a drafter session that stops early, is cut (deadline keep=) and partly
    rejected, round after round, drafts exactly what a fresh session on the committed text
    drafts; each draft stops exactly where the drafter's top probability < the threshold."""
    drafter, verifier = pair
    cfg = DecodingConfig(greedy=True, kept_vocab=KEPT)
    server = VerifierServer(verifier, cfg, np.random.default_rng(0))
    device = DrafterSession(drafter, cfg, np.random.default_rng(0))
    prompt = [2, 9, 4]
    server.add_user(0, prompt)
    device.start(prompt)
    rng = np.random.default_rng(1)

    def top_prob(context):
        with torch.no_grad():
            return float(torch.softmax(drafter(torch.tensor([context]))[0, -1].double(), -1).max())

    stopped = cut = 0
    for _ in range(14):
        threshold = float(rng.choice([0.0, 0.5, 0.8, 0.95]))
        context = prompt + server.outputs[0]
        fresh = DrafterSession(drafter, cfg, np.random.default_rng(0))
        fresh.start(context)  # no cache: what the long-lived session must reproduce
        steps = {}
        for name, session in (("device", device), ("fresh", fresh)):
            session.begin(5, None, threshold)
            steps[name] = []
            while (step := session.next_token()) is not None:
                steps[name].append(step)
        tokens = [x for x, _, _ in steps["device"]]
        assert tokens == [x for x, _, _ in steps["fresh"]]
        for (_, i1, v1), (_, i2, v2) in zip(steps["device"], steps["fresh"], strict=True):
            assert set(i1[:4].tolist()) == set(i2[:4].tolist())
            np.testing.assert_allclose(np.sort(v1.astype(float)), np.sort(v2.astype(float)),
                                       atol=2e-3)  # fmt: skip
        for i in range(1, len(tokens)):  # each drafted token (from the second) passed
            assert top_prob(context + tokens[:i]) >= threshold
        if len(tokens) < 5:  # it stopped: the next token's confidence was below
            stopped += 1
            assert threshold > 0 and top_prob(context + tokens) < threshold
        assert device.stopped_early == (len(tokens) < 5)
        keep = int(rng.integers(0, len(tokens) + 1)) if rng.random() < 0.5 else None
        draft = device.end(keep=keep)
        cut += keep is not None and keep < len(tokens)
        assert draft.tokens == tokens[: len(draft.tokens)]
        if draft.tokens:  # a draft cut to nothing is not verified and nothing is committed
            ((m, committed),) = server.verify({0: draft}).values()
            device.commit(m, committed)
    assert stopped >= 2 and cut >= 2
    out = server.outputs[0]
    assert out == verifier_greedy_reference(verifier, prompt, len(out))


def test_round_messages_carry_the_levers_and_a_short_early_stop_draft_is_accepted(pair):
    """Early stop + deadline under profile timing: the round message carries the threshold,
    the deadline and the profile's per-token time (x the speed factor) and payload; plain
    sync sends none of them. A device may end its draft before draft_length."""
    from multispin_env.config import load_preset

    _, verifier = pair
    profile = load_preset("realistic-llama2")

    async def one_round(**kw):
        server = _server(verifier, Scheduler(4, stop=0.7, deadline_s=0.25), max_users=1, **kw)
        port = await server.start()
        raw = await Raw.join(port, "lever", [3, 3])
        play = asyncio.create_task(server.play_round())
        rnd = await raw.next_of("round")
        tokens = continuation(server, verifier, "lever", [3, 3], 1)
        if kw.get("streaming_deadline"):
            await raw.stream(rnd["round"], tokens, [1e-3])
        else:
            await raw.send(draft_msg(rnd["round"], tokens))
        rec = await asyncio.wait_for(play, 10)
        raw.close()
        await server.stop(grace_s=0.5)
        return rnd, _rows(rec)["lever"], server

    rnd, row, server = asyncio.run(
        one_round(early_stop=True, streaming_deadline=True, timing="profile:realistic-llama2")
    )
    assert rnd["stop_threshold"] == 0.7 and rnd["deadline_s"] == 0.25
    assert rnd["token_time_s"] == pytest.approx(profile.t_draft_mean_s * 1.0)
    assert rnd["upload_bits"] == profile.payload_bits == server.payload_bits
    assert row["drafted"] == 1 and row["committed"] == 2 and not row["cut"]
    rnd, row, _ = asyncio.run(one_round())
    assert not {"stop_threshold", "deadline_s", "token_time_s", "upload_bits"} & set(rnd)
    assert row["drafted"] == 1 and row["committed"] == 2
