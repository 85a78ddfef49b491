"""Adversarial clients against a live server with real device processes.

Each case sends one malformed, semantically bad or hostile message (or behaves badly: stays
silent, trickles bytes, floods connections, claims another user's id) while two real device
processes keep drafting. Every case must get a clear error, the rounds must go on, and no
committed token may be lost: in greedy mode every user's committed text equals the
verifier's own greedy continuation, so a lost, duplicated or injected token shows up.
"""

import asyncio
import struct
import subprocess

import msgpack
import numpy as np
import pytest

from multispin_env.live import protocol as proto
from multispin_env.live.scheduler import make_scheduler
from multispin_env.live.server import EdgeServer, LiveConfig
from multispin_env.live.speculative import verifier_greedy_reference

VOCAB = 48
KEPT = 16


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from conftest import make_tiny_pair

    drafter, verifier = make_tiny_pair(VOCAB, seed=3)
    folder = tmp_path_factory.mktemp("pair")
    drafter.save(folder / "drafter")
    return drafter, verifier, folder


def _server(verifier, **kw) -> EdgeServer:
    fields = dict(
        max_users=6,
        greedy=True,
        kept_vocab=KEPT,
        max_draft_length=4,
        round_timeout_s=1.0,
        hello_timeout_s=0.5,
        frame_timeout_s=0.5,
        heartbeat_s=0.2,
        max_connections=10,
    )
    fields.update(kw)
    return EdgeServer(LiveConfig(**fields), verifier, make_scheduler("hete"), VOCAB)


def hello(device_id: str, prompt=(5, 6, 7), **fields) -> dict:
    msg = {
        "v": proto.PROTOCOL_VERSION,
        "type": "hello",
        "device_id": device_id,
        "prompt": list(prompt),
        "speed_factor": 1.0,
        "mean_gain": 0.3,
    }
    return msg | fields


def draft(round_: int, tokens, *, kept=KEPT, indices=None, values=None, **fields) -> dict:
    """A well-formed draft: each token's PMF is uniform over ids 0..kept-1 (tokens < kept)."""
    n = len(tokens)
    if indices is None:
        indices = np.tile(np.arange(kept, dtype=np.int32), (n, 1))
    if values is None:
        values = np.full((n, kept), 1.0 / max(kept, 1), dtype=np.float16)
    msg = {
        "v": proto.PROTOCOL_VERSION,
        "type": "draft",
        "round": round_,
        "tokens": list(tokens),
        "q_indices": np.asarray(indices, dtype=np.int32).tobytes(),
        "q_values": np.asarray(values, dtype=np.float16).tobytes(),
        "kept": kept,
        "compute_s": 0.001,
        "upload_s": 0.001,
    }
    return msg | fields


async def send_raw(writer, obj) -> None:
    body = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    writer.write(struct.pack(">I", len(body)) + body)
    await writer.drain()


async def next_of(reader, *kinds, timeout_s: float = 10.0) -> dict:
    """The next message of one of ``kinds`` (pings, results and rounds in between skipped)."""

    async def scan():
        while True:
            msg = await proto.read_message(reader)
            if msg["type"] in kinds:
                return msg

    return await asyncio.wait_for(scan(), timeout_s)


async def closed_by_server(reader, timeout_s: float = 5.0) -> bool:
    async def drain():
        while await reader.read(1 << 16):
            pass

    try:
        await asyncio.wait_for(drain(), timeout_s)
    except (ConnectionError, asyncio.TimeoutError):
        return False
    return True


def _oob_index_values():
    idx = np.tile(np.arange(KEPT, dtype=np.int32), (1, 1))
    idx[0, -1] = VOCAB + 5
    return idx


def _dup_indices():
    idx = np.tile(np.arange(KEPT, dtype=np.int32), (1, 1))
    idx[0, 1] = idx[0, 0]
    return idx


def _nan_values():
    v = np.full((1, KEPT), 1.0 / KEPT, dtype=np.float16)
    v[0, 2] = np.nan
    return v


def _zero_mass_on_token():
    v = np.full((1, KEPT), 1.0 / (KEPT - 1), dtype=np.float16)
    v[0, 3] = 0.0  # the drafted token 3 has q = 0: the old rule always accepted it
    return v


def _nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# (name, message for round r requesting L tokens, expected error code)
DRAFT_CASES = [
    ("token id past the vocabulary", lambda r, L: draft(r, [99999]), "bad_draft"),
    ("kept=0", lambda r, L: draft(r, [3], kept=0, indices=np.zeros((1, 0))), "bad_draft"),
    ("7-byte index buffer", lambda r, L: draft(r, [3]) | {"q_indices": b"\0" * 7}, "bad_draft"),
    ("600 tokens", lambda r, L: draft(r, [3] * 600), "bad_draft"),
    ("one token longer than requested", lambda r, L: draft(r, [3] * (L + 1)), "bad_draft"),
    ("kept not matching the arrays", lambda r, L: draft(r, [3]) | {"kept": 8}, "bad_draft"),
    ("negative compute time", lambda r, L: draft(r, [3], compute_s=-1.0), "bad_draft"),
    ("1e300 upload time", lambda r, L: draft(r, [3], upload_s=1e300), "bad_draft"),
    ("empty draft", lambda r, L: draft(r, []), "bad_draft"),
    (
        "PMF index past the vocabulary",
        lambda r, L: draft(r, [3], indices=_oob_index_values()),
        "bad_draft",
    ),  # noqa: E501
    ("repeated PMF index", lambda r, L: draft(r, [3], indices=_dup_indices()), "bad_draft"),
    ("NaN probability", lambda r, L: draft(r, [3], values=_nan_values()), "bad_draft"),
    (
        "token outside its own support",
        lambda r, L: draft(r, [3], values=_zero_mass_on_token()),
        "bad_draft",
    ),  # noqa: E501
    ("token not among the uploaded indices", lambda r, L: draft(r, [KEPT + 4]), "bad_draft"),
    ("boolean where a number belongs", lambda r, L: draft(r, [3], compute_s=True), "bad_message"),
    ("string token", lambda r, L: draft(r, ["3"]), "bad_message"),
    (
        "missing field",
        lambda r, L: {k: v for k, v in draft(r, [3]).items() if k != "kept"},
        "bad_message",
    ),  # noqa: E501
    ("stale round", lambda r, L: draft(r - 1, [3]), "out_of_order"),
    ("future round", lambda r, L: draft(r + 7, [3]), "out_of_order"),
    ("undecodable bytes", lambda r, L: b"\xc1\xc1\xc1\xc1", "bad_message"),
    ("foreign protocol version", lambda r, L: draft(r, [3]) | {"v": 99}, "bad_message"),
    (
        "a server-side message type",
        lambda r, L: {
            "v": proto.PROTOCOL_VERSION,
            "type": "result",
            "round": r,
            "accepted": 5,
            "committed": [1, 2, 3],
        },
        "unexpected",
    ),  # noqa: E501
    ("a hello after hello", lambda r, L: hello("mallory"), "unexpected"),
]
# after these the sender still owes this round a draft (its bad message was not a draft)
NOT_AN_ANSWER = {"bad_message", "out_of_order", "unexpected"}

HELLO_CASES = [
    ("token id 99999 in the prompt", hello("h1", prompt=[1, 99999]), "bad_value"),
    ("a 600-token prompt", hello("h2", prompt=[1] * 600), "bad_value"),
    ("empty prompt", hello("h3", prompt=[]), "bad_value"),
    ("mean gain -1", hello("h4", mean_gain=-1.0), "bad_value"),
    ("mean gain 0", hello("h5", mean_gain=0), "bad_value"),
    ("mean gain 1e308", hello("h6", mean_gain=1e308), "bad_value"),
    ("speed factor 0", hello("h7", speed_factor=0.0), "bad_value"),
    ("empty device id", hello(""), "bad_message"),
    ("a 5000-character device id", hello("x" * 5000), "bad_message"),
    ("a draft before hello", draft(0, [3]), "expected_hello"),
    ("hijack: an existing id without its secret", hello("dev-0"), "session_taken"),
    (
        "hijack: an existing id with a wrong secret",
        hello("dev-1", session="0" * 32),
        "session_taken",
    ),
    ("a list as the message type", {"v": proto.PROTOCOL_VERSION, "type": []}, "bad_message"),
    ("a map as the message type", {"v": proto.PROTOCOL_VERSION, "type": {"a": 1}}, "bad_message"),  # noqa: E501
    ("a version nested 900 deep", {"v": _nested(900), "type": "hello"}, "bad_message"),
    ("a 4050-character version", {"v": "x" * 4050, "type": "hello"}, "bad_message"),
    ("a 3000-entry version", {"v": [None] * 3000, "type": "hello"}, "bad_message"),
]


def test_fuzz_live_server_with_real_devices(pair):
    """>= 30 malformed, semantic and adversarial cases; real device processes keep going."""
    from multispin_env.live.cli import spawn_device

    drafter, verifier, folder = pair
    report = []

    async def mallory(port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(writer, hello("mallory", prompt=[5, 6]))
        welcome = await next_of(reader, "welcome")
        session = welcome["session"]
        for name, make, code in DRAFT_CASES:
            rnd = await next_of(reader, "round")
            r, length = rnd["round"], rnd["draft_length"]
            await send_raw(writer, make(r, length))
            err = await next_of(reader, "error")
            report.append((name, code, err["code"], err["message"]))
            if err["code"] in NOT_AN_ANSWER:
                await send_raw(writer, draft(r, [3]))  # answer the round properly
                await next_of(reader, "result")
        # a second draft for a round that already has one
        rnd = await next_of(reader, "round")
        await send_raw(writer, draft(rnd["round"], [3]))
        await send_raw(writer, draft(rnd["round"], [4]))
        err = await next_of(reader, "error")
        report.append(("second draft in one round", "duplicate", err["code"], err["message"]))
        # an oversized frame: the stream is out of step, so the server hangs up ...
        writer.write(struct.pack(">I", 1 << 30) + b"\0" * 64)
        await writer.drain()
        err = await next_of(reader, "error")
        report.append(("a 1 GiB frame header", "bad_frame", err["code"], err["message"]))
        assert await closed_by_server(reader)
        # ... and the rightful owner rejoins with its secret, losing nothing
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(writer, hello("mallory", prompt=[5, 6], session=session))
        welcome = await next_of(reader, "welcome")
        assert welcome["committed"] == server.verifier.outputs["mallory"]
        for _ in range(2):  # plays on after rejoining
            rnd = await next_of(reader, "round")
            await send_raw(writer, draft(rnd["round"], [3]))
            await next_of(reader, "result")
        await send_raw(writer, {"v": proto.PROTOCOL_VERSION, "type": "bye"})
        writer.close()

    async def one_shot(port, msg, name, code):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(writer, msg)
        reply = await next_of(reader, "error", "welcome")
        report.append((name, code, reply.get("code", "welcome"), reply.get("message", "")))
        assert await closed_by_server(reader), name  # no session was opened
        writer.close()

    async def misbehaving_connections(port, server):
        # silent before hello, and trickling a header byte: both time out
        for name, payload in (("silent before hello", b""), ("one header byte", b"\0")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            err = await next_of(reader, "error")
            report.append((name, "hello_timeout", err["code"], err["message"]))
            assert await closed_by_server(reader)
            writer.close()
        # an oversized frame before hello is refused without reading it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack(">I", 1 << 24))
        await writer.drain()
        err = await next_of(reader, "error")
        report.append(("16 MiB frame before hello", "bad_message", err["code"], err["message"]))
        assert "limit" in err["message"] and await closed_by_server(reader)
        writer.close()
        # a flood of idle connections meets the connection cap
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
        codes = []
        for reader, _ in idle:
            codes.append((await next_of(reader, "error"))["code"])
        busy = [c for c in codes if c == "busy"]
        report.append(("12 idle connections at once", "busy", busy[0] if busy else codes, ""))
        for _, writer in idle:
            writer.close()
        # a device that says hello and then never drafts is cut off after 2 missed rounds
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(writer, hello("sloth"))
        await next_of(reader, "welcome")
        err = await next_of(reader, "error", timeout_s=20)
        report.append(("hello, then silence", "unresponsive", err["code"], err["message"]))
        writer.close()
        sloth_rounds = [r for r in server.records if "sloth" in r.dropped]
        assert len(sloth_rounds) <= 2

    async def scenario():
        server = _server(verifier)
        port = await server.start()
        prompts = {"dev-0": [1, 2, 3], "dev-1": [9, 8]}
        procs = {
            d: spawn_device(port, d, p, greedy=True, kept_vocab=KEPT, time_scale=0.0,
                            model_dir=folder)
            for d, p in prompts.items()
        }  # fmt: skip
        done = asyncio.Event()

        async def drive():
            while not done.is_set():
                await server.play_round()
                await asyncio.sleep(0.005)

        try:
            await server.wait_for_users(2, timeout_s=120)
            driver = asyncio.create_task(drive())
            await mallory(port, server)
            for name, msg, code in HELLO_CASES:
                await one_shot(port, msg, name, code)
            await misbehaving_connections(port, server)
            rounds_before = len(server.records)
            await asyncio.sleep(0.3)
            assert len(server.records) > rounds_before  # still playing
            done.set()
            await driver
        finally:
            await server.stop()
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        return server, prompts, procs

    server, prompts, procs = asyncio.run(scenario())
    wrong = [(n, want, got, m) for n, want, got, m in report if got != want]
    assert not wrong, wrong
    assert len(report) >= 30
    for name, _, _, message in report:
        assert message or name.startswith("12 idle"), f"{name}: empty error message"
        assert len(message) <= 500, f"{name}: error text echoes {len(message)} characters"
    # nothing lost, duplicated or injected: greedy output is the verifier's own continuation
    for device_id, prompt in (prompts | {"mallory": [5, 6]}).items():
        out = server.verifier.outputs[device_id]
        assert len(out) > 0
        assert out == verifier_greedy_reference(verifier, prompt, len(out)), device_id
    assert all(p.returncode == 0 for p in procs.values())
    assert len(server.records) > len(DRAFT_CASES)


def test_sampling_mode_rejects_injected_tokens_and_overlong_drafts(pair):
    """The hole: with q(x) = 0 the test u q(x) < p(x) always passes, so a device could
    commit any text. Such drafts, and drafts longer than requested, are refused."""
    _, verifier, _ = pair

    async def scenario():
        server = _server(verifier, greedy=False, max_draft_length=2)
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(writer, hello("eve", prompt=[5, 6]))
        await next_of(reader, "welcome")
        codes = []

        async def play(msg_for):
            task = asyncio.create_task(server.play_round())
            rnd = await next_of(reader, "round")
            await send_raw(writer, msg_for(rnd["round"], rnd["draft_length"]))
            codes.append((await next_of(reader, "error"))["code"])
            await task

        inject = 7  # a token eve's uploaded PMF gives probability 0
        values = np.full((1, KEPT), 1.0 / (KEPT - 1), dtype=np.float16)
        values[0, inject] = 0.0
        for _ in range(3):
            await play(lambda r, L: draft(r, [inject], values=values))
        await play(lambda r, L: draft(r, [3] * 10))
        assert codes == ["bad_draft"] * 4
        assert server.verifier.outputs["eve"] == []  # nothing was injected
        writer.close()
        await server.stop()

    asyncio.run(scenario())


def test_auth_token_and_non_loopback_bind(pair):
    _, verifier, _ = pair

    async def scenario():
        with pytest.raises(ValueError, match="auth-token"):
            await _server(verifier).start(host="0.0.0.0")
        server = _server(verifier, auth_token="s3cret-token")
        port = await server.start()
        for fields, expect in (({}, "error"), ({"auth": "wrong-token"}, "error"),
                               ({"auth": "s3cret-token"}, "welcome")):  # fmt: skip
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await send_raw(writer, hello("d", **fields))
            reply = await next_of(reader, "error", "welcome")
            assert reply["type"] == expect
            if expect == "error":
                assert reply["code"] == "unauthorized"
            writer.close()
        await server.stop()

    asyncio.run(scenario())


def test_slots_are_freed_on_bye_and_after_the_rejoin_grace(pair):
    _, verifier, _ = pair

    async def scenario():
        server = _server(verifier, max_users=2, rejoin_grace_s=0.3)
        port = await server.start()
        conns = {}
        for d in ("a", "b"):
            conns[d] = await asyncio.open_connection("127.0.0.1", port)
            await send_raw(conns[d][1], hello(d))
            await next_of(conns[d][0], "welcome")
        full = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(full[1], hello("c"))
        assert (await next_of(full[0], "error", "welcome"))["code"] == "full"
        await send_raw(conns["a"][1], {"v": proto.PROTOCOL_VERSION, "type": "bye"})
        assert await closed_by_server(conns["a"][0])
        c = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(c[1], hello("c"))
        assert (await next_of(c[0], "welcome", "error"))["type"] == "welcome"  # bye freed it
        conns["b"][1].close()  # b vanishes without bye: its slot waits for it a while
        await asyncio.sleep(0.05)
        d = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(d[1], hello("d"))
        assert (await next_of(d[0], "error", "welcome"))["code"] == "full"
        await asyncio.sleep(0.4)
        d = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(d[1], hello("d"))
        assert (await next_of(d[0], "welcome", "error"))["type"] == "welcome"  # grace over
        await server.stop(grace_s=0.2)

    asyncio.run(scenario())


def test_context_limit_ends_one_request_and_the_others_go_on(tiny_pair_factory):
    """A user whose text reaches the verifier's context gets shorter drafts, then ``end``;
    the run and the other users go on (the verifier raised for everyone before)."""
    from multispin_env.live.device import DeviceConfig, run_device

    drafter, verifier = tiny_pair_factory(VOCAB, seed=4, n_positions=40)

    async def scenario():
        server = _server(verifier, max_draft_length=6, round_timeout_s=5.0)
        port = await server.start()
        prompts = {"long": list(range(1, 34)), "short": [2, 3]}  # 33 of 40 positions used
        tasks = {
            d: asyncio.create_task(
                run_device(
                    DeviceConfig(d, p, port=port, greedy=True, kept_vocab=KEPT, time_scale=0.0),
                    drafter=drafter,
                )
            )
            for d, p in prompts.items()
        }
        await server.wait_for_users(2)
        for _ in range(12):
            await server.play_round()
        await server.stop()
        outputs = {d: await t for d, t in tasks.items()}
        assert server.users["long"].end_reason == "context_full"
        # the last commit may end one past the context: its bonus token is never fed
        assert len(prompts["long"]) + len(server.verifier.outputs["long"]) in (40, 41)
        assert outputs["long"] == server.verifier.outputs["long"]  # the device left cleanly
        assert len(server.records) == 12 and server.records[-1].users[0]["device_id"] == "short"
        for d, p in prompts.items():
            out = server.verifier.outputs[d]
            assert out == verifier_greedy_reference(verifier, p, len(out))

    asyncio.run(scenario())


def test_device_says_server_gone_when_the_server_dies_or_freezes(pair, tmp_path):
    """A device exits non-zero with 'server gone' (no traceback) when the server dies, and
    does not block forever on a server that stops talking."""
    import signal
    import sys
    import textwrap

    from multispin_env.live.device import DeviceConfig, ServerGone, run_device

    drafter, _, folder = pair

    async def frozen():
        async def handle(reader, writer):
            await proto.read_message(reader)
            welcome = proto.message("welcome", user_id=0, session="s" * 32, committed=[])
            await proto.send_message(writer, welcome)
            await asyncio.sleep(30)  # then nothing: no rounds, no pings

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        cfg = DeviceConfig("d", [1, 2], port=port, greedy=True, kept_vocab=KEPT,
                           server_timeout_s=0.5)  # fmt: skip
        with pytest.raises(ServerGone, match="no message"):
            await asyncio.wait_for(run_device(cfg, drafter=drafter), 10)
        srv.close()

    asyncio.run(frozen())

    # a real server process killed mid-run: the device process reports it and exits 3
    server_script = tmp_path / "server.py"
    server_script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
            from conftest import make_tiny_pair
            from multispin_env.live.scheduler import make_scheduler
            from multispin_env.live.server import EdgeServer, LiveConfig

            async def main():
                _, verifier = make_tiny_pair({VOCAB}, seed=3)
                cfg = LiveConfig(max_users=2, greedy=True, kept_vocab={KEPT})
                server = EdgeServer(cfg, verifier, make_scheduler("hete"), {VOCAB})
                port = await server.start()
                print(port, flush=True)
                await server.wait_for_users(1, timeout_s=120)
                print("joined", flush=True)
                while True:
                    await server.play_round()
                    await asyncio.sleep(0.01)

            asyncio.run(main())
            """
        )
    )
    server_proc = subprocess.Popen(
        [sys.executable, str(server_script)], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server_proc.stdout.readline())
        device = subprocess.Popen(
            [sys.executable, "-m", "multispin_env.live.device", "--port", str(port),
             "--device-id", "d", "--prompt", "1,2", "--greedy", "--kept-vocab", str(KEPT),
             "--time-scale", "0", "--model", str(folder)],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server_proc.stdout.readline().strip() == "joined"
        import time

        time.sleep(0.5)  # a few rounds
        server_proc.send_signal(signal.SIGKILL)
        _, err = device.communicate(timeout=60)
    finally:
        server_proc.kill()
    assert device.returncode == 3, err
    assert "server gone" in err and "Traceback" not in err


def test_a_client_that_stops_reading_cannot_stall_the_rounds(pair):
    """A peer that floods bad frames and never reads fills its send buffer with error replies;
    the server must drop it after send_timeout_s instead of waiting in drain() forever (the
    round loop froze before), and its error log stays bounded."""
    import socket

    from multispin_env.live.device import DeviceConfig, run_device

    drafter, verifier, _ = pair

    async def scenario():
        server = _server(verifier, send_timeout_s=0.5, round_timeout_s=2.0)
        port = await server.start()
        good = asyncio.create_task(
            run_device(
                DeviceConfig("good", [1, 2], port=port, greedy=True, kept_vocab=KEPT,
                             time_scale=0.0),
                drafter=drafter,
            )
        )  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(writer, hello("flood"))
        await next_of(reader, "welcome")
        # stop reading: a small receive buffer that is never drained
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.transport.pause_reading()
        bad = msgpack.packb({"v": "z" * 3990, "type": "draft"})
        writer.transport.set_write_buffer_limits(high=1 << 30)
        for _ in range(3000):
            writer.write(struct.pack(">I", len(bad)) + bad)
        await server.wait_for_users(2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(6):  # (before the fix the first round froze in drain(): bound it)
            await asyncio.wait_for(server.play_round(), 10.0)
        assert loop.time() - t0 < 6 * 2.0 + 2.0  # no round waited on the flooder for long
        assert "flood" not in {u.device_id for u in server.connected}
        assert len(server.protocol_errors) <= 1000
        assert server.verifier.outputs["good"]
        writer.close()
        await server.stop(grace_s=0.5)
        await good

    asyncio.run(scenario())


def test_sampling_drafts_must_be_the_seeds_draws(pair):
    """In sampling mode a device draws token i with draft_uniforms(sample_seed)[i] from its
    uploaded PMF. A token with a tiny q(x) > 0 would pass the q > 0 check and be accepted
    almost surely (min(1, p/q) ~ 1): it is refused unless it is the seed's draw. Honest
    devices (run_device) draft exactly those tokens and are never refused."""
    from multispin_env.live.device import DeviceConfig, run_device
    from multispin_env.live.speculative import draft_uniforms, sample_index

    drafter, verifier, _ = pair

    async def scenario():
        server = _server(verifier, greedy=False, max_draft_length=3)
        port = await server.start()
        honest = asyncio.create_task(
            run_device(
                DeviceConfig("honest", [3, 4], port=port, greedy=False, kept_vocab=KEPT,
                             time_scale=0.0),
                drafter=drafter,
            )
        )  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_raw(writer, hello("mallet", prompt=[5, 6]))
        await next_of(reader, "welcome")
        await server.wait_for_users(2)
        codes = []
        values = np.zeros((1, KEPT), dtype=np.float16)
        values[0, 1] = 1.0
        values[0, 9] = 2.0**-24  # q(9) > 0 but tiny: the old rule accepted it almost surely
        for _ in range(4):
            task = asyncio.create_task(server.play_round())
            rnd = await next_of(reader, "round")
            u = draft_uniforms(rnd["sample_seed"], 1)[0]
            assert sample_index(values[0], u) == 1  # the seed's draw is token 1, not 9
            await send_raw(writer, draft(rnd["round"], [9], values=values))
            codes.append((await next_of(reader, "error"))["code"])
            await task
        assert codes == ["bad_draft"] * 4
        assert server.verifier.outputs["mallet"] == []
        assert not [e for e in server.protocol_errors if e.startswith("honest")]
        assert len(server.verifier.outputs["honest"]) >= 4
        writer.close()
        await server.stop(grace_s=0.5)
        await honest

    asyncio.run(scenario())
