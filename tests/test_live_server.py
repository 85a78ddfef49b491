"""Live edge server and devices over real TCP (loopback), with tiny random models."""

import asyncio
import struct

import msgpack
import numpy as np
import pytest

from multispin_env.live import protocol as proto
from multispin_env.live.device import DeviceConfig, run_device
from multispin_env.live.scheduler import OnlineVerificationModel, make_scheduler
from multispin_env.live.server import EdgeServer, LiveConfig
from multispin_env.live.speculative import verifier_greedy_reference

VOCAB = 48


@pytest.fixture(scope="module")
def pair():
    from conftest import make_tiny_pair

    return make_tiny_pair(VOCAB, seed=1)


def _server(verifier, **kw):
    cfg = LiveConfig(max_users=4, greedy=True, kept_vocab=16, max_draft_length=6, **kw)
    return EdgeServer(cfg, verifier, make_scheduler(kw.pop("scheduler", "hete")), VOCAB)


def _device(device_id, prompt, port, **kw):
    return DeviceConfig(
        device_id,
        prompt,
        port=port,
        greedy=True,
        kept_vocab=16,
        time_scale=kw.pop("time_scale", 0.0),
        **kw,
    )


def _check_outputs(server, verifier, prompts):
    for device_id, prompt in prompts.items():
        out = server.verifier.outputs[device_id]
        assert out == verifier_greedy_reference(verifier, prompt, len(out))


def test_live_rounds_equal_verifier_greedy_and_devices_agree(pair):
    drafter, verifier = pair

    async def scenario():
        server = _server(verifier, trace_path=None)
        port = await server.start()
        prompts = {"a": [1, 2, 3], "b": [5], "c": [7, 8, 9, 10]}
        tasks = [
            asyncio.create_task(
                run_device(_device(d, p, port, speed_factor=1.0 + 0.5 * i), drafter=drafter)
            )
            for i, (d, p) in enumerate(prompts.items())
        ]
        await server.wait_for_users(3)
        for _ in range(8):
            await server.play_round()
        await server.stop()
        outputs = await asyncio.gather(*tasks)
        for (device_id, _), out in zip(prompts.items(), outputs, strict=True):
            assert out == server.verifier.outputs[device_id]  # device and server agree
        _check_outputs(server, verifier, prompts)
        summary = server.summary()
        assert summary["rounds"] == 8 and summary["dropped_user_rounds"] == 0
        assert summary["tokens"] >= 24 and summary["goodput_timeline_tokens_per_s"] > 0
        rec = server.records[-1]
        assert rec.timeline_s == pytest.approx(
            max(u["compute_s"] + u["upload_s"] for u in rec.users) + rec.verify_s
        )
        assert not server.protocol_errors

    asyncio.run(scenario())


async def _raw(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer


def test_bad_and_out_of_order_messages_are_rejected_and_not_applied(pair):
    drafter, verifier = pair

    async def scenario():
        server = _server(verifier)
        port = await server.start()
        task = asyncio.create_task(run_device(_device("good", [1, 2], port), drafter=drafter))
        reader, writer = await _raw(port)
        await proto.send_message(
            writer,
            proto.message("hello", device_id="raw", prompt=[4], speed_factor=1.0, mean_gain=0.3),
        )
        assert (await proto.read_message(reader))["type"] == "welcome"
        garbage = b"\xc1\xc1\xc1"
        writer.write(struct.pack(">I", len(garbage)) + garbage)
        foreign = msgpack.packb({"v": 99, "type": "draft"})
        writer.write(struct.pack(">I", len(foreign)) + foreign)
        await writer.drain()
        errors = [await proto.read_message(reader) for _ in range(2)]
        assert [e["code"] for e in errors] == ["bad_message", "bad_message"]
        assert "version" in errors[1]["message"]
        stale = proto.message(
            "draft",
            round=41,
            tokens=[1],
            q_indices=b"\0" * 4,
            q_values=b"\0" * 2,
            kept=1,
            compute_s=0.0,
            upload_s=0.0,
        )
        await proto.send_message(writer, stale)
        err = await proto.read_message(reader)
        assert err["code"] == "out_of_order"
        await server.wait_for_users(2)
        writer.close()  # the raw client never drafts: it must not stall the round
        before = list(server.verifier.outputs["raw"])
        await server.play_round()
        assert server.verifier.outputs["raw"] == before  # nothing applied for it
        assert len(server.verifier.outputs["good"]) >= 1
        await server.stop()
        await task

    asyncio.run(scenario())


def test_disconnect_and_rejoin_lose_and_duplicate_nothing(pair):
    drafter, verifier = pair

    async def scenario():
        server = _server(verifier)
        port = await server.start()
        prompts = {"x": [3, 1], "y": [9, 9, 2]}
        keep = asyncio.create_task(run_device(_device("x", prompts["x"], port), drafter=drafter))
        flaky_cfg = _device("y", prompts["y"], port)
        flaky = asyncio.create_task(run_device(flaky_cfg, drafter=drafter))
        await server.wait_for_users(2)
        for _ in range(4):
            await server.play_round()
        flaky.cancel()  # the device dies mid-run
        for _ in range(250):  # until the server has noticed (no fixed sleep: CI may be slow)
            if [u.device_id for u in server.connected] == ["x"]:
                break
            await asyncio.sleep(0.02)
        committed_before = list(server.verifier.outputs["y"])
        for _ in range(3):
            rec = await server.play_round()
            assert [u["device_id"] for u in rec.users] == ["x"]
        assert server.verifier.outputs["y"] == committed_before
        rejoined = asyncio.create_task(
            run_device(
                _device("y", prompts["y"], port, seed=5, session=flaky_cfg.session),
                drafter=drafter,
            )
        )
        await server.wait_for_users(2)
        for _ in range(4):
            await server.play_round()
        await server.stop()
        _, out_y = await asyncio.gather(keep, rejoined)
        assert out_y == server.verifier.outputs["y"]  # the rejoined device resumed exactly
        assert len(out_y) > len(committed_before)
        _check_outputs(server, verifier, prompts)

    asyncio.run(scenario())


def test_late_device_is_dropped_from_the_round(pair):
    drafter, verifier = pair

    async def scenario():
        server = _server(verifier, round_timeout_s=0.3)
        port = await server.start()
        fast = asyncio.create_task(run_device(_device("fast", [1], port), drafter=drafter))
        slow = asyncio.create_task(
            run_device(_device("slow", [2], port, time_scale=1e5), drafter=drafter)
        )  # huge uplink delay
        await server.wait_for_users(2)
        rec = await server.play_round()
        assert rec.dropped == ["slow"]
        assert server.verifier.outputs["slow"] == []
        assert len(server.verifier.outputs["fast"]) >= 1
        slow.cancel()
        await server.stop()
        await fast

    asyncio.run(scenario())


def test_protocol_validation_names_the_problem():
    with pytest.raises(proto.ProtocolError, match="missing field 'kept'"):
        proto.validate(
            {
                "v": proto.PROTOCOL_VERSION,
                "type": "draft",
                "round": 1,
                "tokens": [1],
                "q_indices": b"",
                "q_values": b"",
                "compute_s": 0.0,
                "upload_s": 0.0,
            }
        )
    with pytest.raises(proto.ProtocolError, match="non-negative token ids"):
        proto.message("hello", device_id="d", prompt=[-1], speed_factor=1.0, mean_gain=0.3)
    with pytest.raises(proto.ProtocolError, match="must be finite"):
        proto.message("round", round=0, draft_length=2, bandwidth_hz=float("nan"), spectral_eff=1.0)
    with pytest.raises(proto.ProtocolError, match="unknown message type"):
        proto.validate({"v": proto.PROTOCOL_VERSION, "type": "shutdown"})
    msg = proto.message("result", round=3, accepted=1, committed=[4, 5])
    assert proto.decode(proto.encode(msg)[4:]) == msg


def test_online_verification_fit_recovers_the_measured_law():
    model = OnlineVerificationModel()
    rng = np.random.default_rng(0)
    for _ in range(300):
        k, length = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        model.observe(k, length, 0.004 + 0.0003 * k * (length + 1))
    # a ridge towards the CPU prior (3 pseudo-observations against 200 measurements)
    assert model.t_fix_s == pytest.approx(0.004, rel=0.1)
    assert model.t_token_s == pytest.approx(0.0003, rel=0.05)
    assert model.latency_for_batch_s(8, 7) == pytest.approx(0.004 + 0.0003 * 64, rel=0.03)


def test_device_process_killed_mid_run(pair, tmp_path):
    """Real device processes over TCP; one is SIGKILLed mid-run. The run goes on and every
    user's committed tokens stay intact (greedy mode: equal to the verifier's own output)."""
    import signal
    import subprocess

    from multispin_env.live.cli import spawn_device

    drafter, verifier = pair
    drafter.save(tmp_path / "pair" / "drafter")

    async def scenario():
        server = _server(verifier, round_timeout_s=20.0)
        port = await server.start()
        prompts = {"dev-0": [1, 2], "dev-1": [4, 4, 4], "dev-2": [8]}
        procs = {
            d: spawn_device(
                port, d, p, greedy=True, kept_vocab=16, time_scale=0.0, model_dir=tmp_path / "pair"
            )
            for d, p in prompts.items()
        }
        try:
            await server.wait_for_users(3, timeout_s=120)
            for _ in range(4):
                await server.play_round()
            procs["dev-1"].send_signal(signal.SIGKILL)
            procs["dev-1"].wait()
            frozen = list(server.verifier.outputs["dev-1"])
            for _ in range(4):
                rec = await server.play_round()
            assert {u["device_id"] for u in rec.users} == {"dev-0", "dev-2"}
            assert server.verifier.outputs["dev-1"] == frozen
            assert len(server.records) == 8
        finally:
            await server.stop()
            for p in procs.values():
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        _check_outputs(server, verifier, prompts)
        assert procs["dev-0"].returncode == 0 and procs["dev-2"].returncode == 0

    asyncio.run(scenario())


def test_schedulers_can_read_the_env_observation(pair):
    """A scheduler that asks for it gets the env's observation vector, built by the same
    builder from the server's history; its decision is what the devices are told."""
    from multispin_env.observation import USER_FEATURES, ObservationSpec

    drafter, verifier = pair

    class Recorder:
        uses_observation = True

        def __init__(self):
            self.seen = []

        def act(self, view, obs):
            self.seen.append((obs.copy(), view.spectral_eff_est.copy()))
            k = view.spectral_eff_est.shape[1]
            return np.full((1, k), 3), np.full((1, k), view.bandwidth_hz / k)

    async def scenario():
        cfg = LiveConfig(max_users=4, greedy=True, kept_vocab=16, max_draft_length=6)
        recorder = Recorder()
        server = EdgeServer(cfg, verifier, recorder, VOCAB)
        port = await server.start()
        tasks = [
            asyncio.create_task(run_device(_device(d, [1, 2], port), drafter=drafter))
            for d in ("p", "q")
        ]
        await server.wait_for_users(2)
        for _ in range(3):
            rec = await server.play_round()
        await server.stop()
        await asyncio.gather(*tasks)
        assert all(u["draft_length"] == 3 for u in rec.users)
        f = len(USER_FEATURES)
        spec = ObservationSpec(
            4, 6, server.scenario.t_draft_mean_s, server.payload_bits, server.bandwidth_hz
        )
        obs, r_est = recorder.seen[-1]
        assert obs.shape == (1, spec.size)
        users = obs[0, : 4 * f].reshape(4, f)
        np.testing.assert_array_equal(users[:, 0], [1, 1, 0, 0])  # two connected users
        np.testing.assert_allclose(users[:2, 1], np.minimum(r_est[0] / 10, 4), rtol=1e-6)
        np.testing.assert_allclose(users[:2, f - 3] * 6, 3)  # last drafted = 3 of L_max 6

    asyncio.run(scenario())


def test_stop_closes_every_connection_so_it_cannot_hang(pair):
    """Regression: the server left connections half-open after a device's bye, and on
    Python >= 3.12 ``Server.wait_closed()`` waits for them, so ``stop()`` hung (seen on a
    Python 3.12 machine). Every server-side transport must be closed, whatever the version."""
    _, verifier = pair

    async def scenario():
        server = _server(verifier)
        port = await server.start()
        polite, polite_w = await _raw(port)
        silent, silent_w = await _raw(port)
        for device_id, w in (("polite", polite_w), ("silent", silent_w)):
            hello = proto.message(
                "hello", device_id=device_id, prompt=[3], speed_factor=1.0, mean_gain=0.3
            )
            await proto.send_message(w, hello)
        assert (await proto.read_message(polite))["type"] == "welcome"
        assert (await proto.read_message(silent))["type"] == "welcome"
        server_side = list(server._connections)
        assert len(server_side) == 2
        await proto.send_message(polite_w, proto.message("bye"))  # leaves; "silent" stays
        await asyncio.wait_for(server.stop(grace_s=0.5), timeout=5.0)
        assert all(w.is_closing() for w in server_side)
        assert not server._connections
        await asyncio.wait_for(silent.read(), timeout=5.0)  # bye, then the server hangs up
        assert silent.at_eof()
        for w in (polite_w, silent_w):
            w.close()

    asyncio.run(scenario())


def test_a_request_ends_at_the_end_token_and_the_others_go_on(pair):
    """A chat answer is over at the end of the assistant's turn: the server ends that
    request before the next round (reason end_of_text), the device leaves, a rejoin is
    refused, and the other users keep going, still exactly the verifier's greedy text."""
    drafter, verifier = pair
    prompts = {"a": [1, 2, 3], "b": [5, 6]}
    # the end token: the 3rd token of a's greedy text, which b's first tokens do not contain
    ref_a = verifier_greedy_reference(verifier, prompts["a"], 12)
    ref_b = verifier_greedy_reference(verifier, prompts["b"], 4)
    end = next(t for t in ref_a[2:] if t not in ref_b)

    async def scenario():
        server = _server(verifier, trace_path=None, end_token=end)
        port = await server.start()
        tasks = [
            asyncio.create_task(run_device(_device(d, p, port), drafter=drafter))
            for d, p in prompts.items()
        ]
        await server.wait_for_users(2)
        for _ in range(10):
            if await server.play_round() is None:
                break
        await server.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        out_a = server.verifier.outputs["a"]
        assert end in out_a and server.users["a"].end_reason == "end_of_text"
        # nothing drafted for a after the round that committed the end token
        first = out_a.index(end)
        committed_before = [
            sum(u["committed"] for u in rec.users if u["device_id"] == "a" and "committed" in u)
            for rec in server.records
        ]
        assert sum(committed_before) == len(out_a) and len(out_a) - first <= 7
        assert "a" in server.summary()["ended_requests"]
        after = [r for r in server.records if all(u["device_id"] != "a" for u in r.users)]
        assert after and all([u["device_id"] for u in r.users] == ["b"] for r in after)
        _check_outputs(server, verifier, prompts)

    asyncio.run(scenario())
