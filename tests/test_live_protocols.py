"""The extended protocols live (multispin_env.live.rounds): exactness, timing, messages.

Real TCP on loopback with tiny random models: every protocol keeps speculative decoding
exact (greedy output = the verifier's own greedy decoding; in sampling mode the first
committed token follows the verifier's distribution with early stop and cut prefixes), and
the round's timeline follows the protocol's rule from the measured times.
"""

import asyncio

import numpy as np
import pytest
import torch

from multispin_env.live import protocol as proto
from multispin_env.live.device import DeviceConfig, run_device
from multispin_env.live.rounds import PipelineRound, make_round_protocol
from multispin_env.live.server import EdgeServer, LiveConfig
from multispin_env.live.speculative import (
    DecodingConfig,
    DrafterSession,
    VerifierServer,
    verifier_greedy_reference,
)
from multispin_env.live.validation import Rejected, stream_arrivals_s
from multispin_env.types import Decision

VOCAB = 48
PROMPTS = {"a": [1, 2, 3], "b": [5], "c": [7, 8, 9, 10], "d": [11, 4]}


@pytest.fixture(scope="module")
def pair():
    from conftest import make_tiny_pair

    return make_tiny_pair(VOCAB, seed=1)


class FixedScheduler:
    """Every user gets the same decision: length, bandwidth share, levers."""

    def __init__(self, length=4, stop=None, deadline_s=None, groups=None):
        self.length, self.stop, self.deadline_s, self.groups = length, stop, deadline_s, groups

    def decide(self, view):
        k = view.spectral_eff_est.shape[1]
        lengths = np.full((1, k), self.length)
        group = None if self.groups is None else (np.arange(k) % self.groups)[None, :]
        if group is None:
            bandwidth = np.full((1, k), view.bandwidth_hz / k)
        else:
            sizes = np.bincount(group[0], minlength=self.groups)
            bandwidth = view.bandwidth_hz / sizes[group]
        stop = None if self.stop is None else np.full((1, k), self.stop)
        deadline = None if self.deadline_s is None else np.array([self.deadline_s])
        return Decision(lengths, bandwidth, stop, deadline, group)


def _play(pair, scheduler, rounds=6, users=PROMPTS, greedy=True, **protocol):
    drafter, verifier = pair

    async def scenario():
        cfg = LiveConfig(max_users=4, greedy=greedy, kept_vocab=16, max_draft_length=6, **protocol)
        server = EdgeServer(cfg, verifier, scheduler, VOCAB)
        port = await server.start()
        tasks = [
            asyncio.create_task(
                run_device(
                    DeviceConfig(
                        d,
                        p,
                        port=port,
                        greedy=greedy,
                        kept_vocab=16,
                        time_scale=0.0,
                        speed_factor=1.0 + 0.5 * i,
                        seed=i,
                    ),
                    drafter=drafter,
                )
            )
            for i, (d, p) in enumerate(users.items())
        ]
        await server.wait_for_users(len(users))
        for _ in range(rounds):
            await server.play_round()
        await server.flush()
        await server.stop()
        outputs = await asyncio.gather(*tasks)
        return server, dict(zip(users, outputs, strict=True))

    return asyncio.run(scenario())


def _check_greedy(server, verifier, outputs):
    for device_id, prompt in PROMPTS.items():
        out = server.verifier.outputs[device_id]
        assert outputs[device_id] == out  # the device and the server agree
        assert out == verifier_greedy_reference(verifier, prompt, len(out))
    assert not server.protocol_errors


def test_early_stop_drafts_shorter_and_stays_exact(pair):
    _, verifier = pair
    server, outputs = _play(pair, FixedScheduler(6, stop=0.9), early_stop=True)
    _check_greedy(server, verifier, outputs)
    rows = [r for rec in server.records for r in rec.users if "drafted" in r]
    drafted = [r["drafted"] for r in rows]
    assert min(drafted) >= 1 and max(drafted) <= 6
    assert np.mean(drafted) < 6  # a high threshold stops some drafts early
    # without early stop in the server the threshold is not sent: full drafts
    plain, _ = _play(pair, FixedScheduler(6, stop=0.9), rounds=2)
    assert all(r["drafted"] == 6 for rec in plain.records for r in rec.users)


def test_deadline_verifies_the_prefixes_in_time_and_stays_exact(pair):
    _, verifier = pair
    # a deadline of a few tokens' drafting time: most drafts are cut, some to nothing
    server, outputs = _play(
        pair, FixedScheduler(6, deadline_s=3e-3), rounds=8, streaming_deadline=True
    )
    _check_greedy(server, verifier, outputs)
    rows = [r for rec in server.records for r in rec.users if "drafted" in r]
    assert any(r["cut"] for r in rows)
    for rec in server.records:
        served = [r for r in rec.users if "finish_s" in r]
        finish = max(r["finish_s"] for r in served)
        assert finish <= 3e-3 * (1 + 1e-9)
        # T = min(D, last arrival): a cut draft counts as arriving at D
        expected_t = 3e-3 if any(r["cut"] for r in served) else finish
        assert rec.timeline_s == pytest.approx(expected_t + rec.verify_s)
        for r in served:  # only the in-time prefix is verified and committed
            assert r["committed"] == (r["accepted"] + 1 if r["drafted"] else 0)
    assert server.summary()["cut_drafts"] > 0


def test_deadline_with_a_generous_deadline_equals_the_synchronous_drafts(pair):
    _, verifier = pair
    server, outputs = _play(
        pair,
        FixedScheduler(4, stop=0.5, deadline_s=60.0),
        rounds=4,
        streaming_deadline=True,
        early_stop=True,
    )
    _check_greedy(server, verifier, outputs)
    rows = [r for rec in server.records for r in rec.users if "drafted" in r]
    assert not any(r["cut"] for r in rows)


@pytest.mark.parametrize("early_stop", [False, True])
def test_pipelined_groups_overlap_verification_and_stay_exact(pair, early_stop):
    _, verifier = pair
    server, outputs = _play(
        pair,
        FixedScheduler(4, stop=0.6 if early_stop else None, groups=2),
        rounds=5,
        pipeline_groups=2,
        early_stop=early_stop,
    )
    _check_greedy(server, verifier, outputs)
    cycles = [rec for rec in server.records if rec.phases and rec.phases[0]["group"] == 0]
    assert len(cycles) == 5
    for rec in server.records:
        # a cycle is the sum of its phases, each max(draft + upload of g, verify of g - 1)
        assert rec.timeline_s == pytest.approx(sum(p["phase_s"] for p in rec.phases))
        for phase in rec.phases:
            assert phase["phase_s"] == pytest.approx(
                max(phase["draft_upload_s"], phase["verify_s"])
            )
    # after the first cycle every phase verifies the previous group's drafts
    assert all(p["verify_s"] > 0 for rec in cycles[1:] for p in rec.phases)
    # every user was verified once per cycle (the flush verified the last group)
    for device_id in PROMPTS:
        verified = [r for rec in server.records for r in rec.users if r["device_id"] == device_id]
        assert len([r for r in verified if "accepted" in r]) == 5
    summary = server.summary()
    assert summary["protocol"].startswith("pipeline")
    assert 0 < summary["server_busy_frac"] <= 1 and 0 <= summary["device_idle_frac_mean"] < 1


def test_pipeline_user_with_a_draft_in_verification_starts_after_its_result(pair):
    """Groups that change between cycles: a user of the last group is verified in the next
    cycle's first phase, so if it is in that phase's group it starts V later."""

    class Alternating(FixedScheduler):
        calls = 0

        def decide(self, view):
            decision = super().decide(view)
            Alternating.calls += 1
            if Alternating.calls % 2 == 0:
                decision.group[:] = 1 - decision.group
            return decision

    _, verifier = pair
    server, outputs = _play(pair, Alternating(3, groups=2), rounds=4, pipeline_groups=2)
    _check_greedy(server, verifier, outputs)
    offsets = [p for rec in server.records[1:] for p in rec.phases if p["group"] == 0]
    assert offsets and all(p["draft_upload_s"] >= p["verify_s"] for p in offsets)


def test_stream_arrivals_follow_the_simulators_law():
    d, u = 2e-3, 5e-3  # upload-bound: a_i = d + i u
    arrivals = stream_arrivals_s([d * (i + 1) for i in range(5)], u)
    assert arrivals == pytest.approx([d + u + i * max(d, u) for i in range(5)])
    d, u = 5e-3, 2e-3  # compute-bound: a_i = i d + u
    arrivals = stream_arrivals_s([d * (i + 1) for i in range(5)], u)
    assert arrivals == pytest.approx([d + u + i * max(d, u) for i in range(5)])
    with pytest.raises(Rejected, match="cumulative"):
        stream_arrivals_s([2e-3, 1e-3], u)


def test_protocol_switches_are_checked():
    with pytest.raises(ValueError, match="do not combine"):
        LiveConfig(streaming_deadline=True, pipeline_groups=2)
    with pytest.raises(ValueError, match="pipeline_groups"):
        LiveConfig(pipeline_groups=0)
    assert make_round_protocol(False, 1).name == "sync"
    assert make_round_protocol(True, 1).name == "deadline"
    assert make_round_protocol(False, 3).groups == 3
    with pytest.raises(ValueError, match="groups=1"):
        PipelineRound(1)


def test_streamed_tokens_are_checked_and_a_bad_stream_costs_only_its_sender(pair):
    drafter, verifier = pair

    async def scenario():
        cfg = LiveConfig(
            max_users=4, greedy=True, kept_vocab=16, max_draft_length=6, streaming_deadline=True
        )
        server = EdgeServer(cfg, verifier, FixedScheduler(3, deadline_s=60.0), VOCAB)
        port = await server.start()
        good = asyncio.create_task(
            run_device(
                DeviceConfig("good", [1, 2], port=port, greedy=True, kept_vocab=16, time_scale=0),
                drafter=drafter,
            )
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        hello = {"device_id": "bad", "prompt": [3], "speed_factor": 1.0, "mean_gain": 0.3}
        await proto.send_message(writer, proto.message("hello", **hello))
        await proto.read_message(reader)  # welcome
        await server.wait_for_users(2)
        play = asyncio.create_task(server.play_round())
        msg = await proto.read_message(reader)
        while msg["type"] != "round":
            msg = await proto.read_message(reader)
        row = np.arange(16, dtype=np.int32)
        values = np.full(16, 1 / 16, dtype=np.float16)
        token = {
            "round": msg["round"],
            "token": 0,
            "q_indices": row.tobytes(),
            "q_values": values.tobytes(),
            "compute_s": 1e-3,
        }
        await proto.send_message(writer, proto.message("token", index=1, **token))  # gap
        err = await proto.read_message(reader)
        while err["type"] != "error":
            err = await proto.read_message(reader)
        assert err["code"] == "bad_draft" and "index" in err["message"]
        rec = await play
        # the bad device's round is "nothing"; the good one was verified
        rows = {r["device_id"]: r for r in rec.users}
        assert rows["bad"]["rejected"] and rows["good"]["committed"] >= 1
        # a whole draft in a streaming round is refused by name
        play = asyncio.create_task(server.play_round())
        msg = await proto.read_message(reader)
        while msg["type"] != "round":
            msg = await proto.read_message(reader)
        draft = {
            "round": msg["round"],
            "tokens": [0],
            "q_indices": row.tobytes(),
            "q_values": values.tobytes(),
            "kept": 16,
            "compute_s": 1e-3,
            "upload_s": 1e-3,
        }
        await proto.send_message(writer, proto.message("draft", **draft))
        err = await proto.read_message(reader)
        while err["type"] != "error":
            err = await proto.read_message(reader)
        assert "token + draft_end" in err["message"]
        await play
        writer.close()
        await server.stop()
        await good
        out = server.verifier.outputs["good"]
        assert out == verifier_greedy_reference(verifier, [1, 2], len(out))

    asyncio.run(scenario())


def _first_token_frequencies(pair, trials, stop, keep):
    """Sampling mode: draft with early stop, cut the draft to ``keep`` tokens (a deadline),
    verify; the first committed token's frequencies."""
    drafter, verifier = pair
    cfg = DecodingConfig(kept_vocab=8, temperature=1.0)
    rng = np.random.default_rng(5)
    prompt = [3, 9, 4]
    counts = np.zeros(VOCAB)
    for _ in range(trials):
        server = VerifierServer(verifier, cfg, rng)
        device = DrafterSession(drafter, cfg, rng)
        server.add_user(0, prompt)
        device.start(prompt)
        device.begin(4, None, stop)
        while device.next_token() is not None:
            pass
        draft = device.end(keep=keep)
        if not draft.tokens:
            continue
        ((m, committed),) = server.verify({0: draft}).values()
        counts[committed[0]] += 1
    with torch.no_grad():
        p = torch.softmax(verifier(torch.tensor([prompt]))[0, -1].double(), -1).numpy()
    return counts / counts.sum(), p


@pytest.mark.parametrize(("stop", "keep"), [(0.5, None), (0.0, 1), (0.4, 2)])
def test_sampling_first_token_follows_the_verifier_with_early_stop_and_cuts(pair, stop, keep):
    empirical, p = _first_token_frequencies(pair, 1500, stop, keep)
    # total variation of 1500 draws from p: ~ sqrt(support / n) / 2; 0.08 is > 3 sigma here
    assert 0.5 * np.abs(empirical - p).sum() < 0.08


def test_profile_timing_puts_the_profiles_times_on_the_timeline(pair):
    """Real tokens, the profile's clock: drafting = tokens x t_draft x speed factor, upload =
    tokens x the profile's payload / rate, verification = the profile's law."""
    from multispin_env.config import load_preset

    _, verifier = pair
    profile = load_preset("realistic-llama2")
    for protocol in ({}, {"streaming_deadline": True}, {"pipeline_groups": 2}):
        scheduler = FixedScheduler(
            3, deadline_s=60.0 if protocol.get("streaming_deadline") else None,
            groups=protocol.get("pipeline_groups"),
        )  # fmt: skip
        server, outputs = _play(
            pair, scheduler, rounds=3, timing="profile:realistic-llama2", **protocol
        )
        _check_greedy(server, verifier, outputs)
        assert server.payload_bits == profile.payload_bits
        speed = {d: u.speed_factor for d, u in server.users.items()}
        for rec in server.records:
            for row in rec.users:
                if not row.get("drafted"):
                    continue
                n = row["drafted"]
                assert row["compute_s"] == pytest.approx(
                    n * profile.t_draft_mean_s * speed[row["device_id"]]
                )
                rate = row["bandwidth_hz"] * row["spectral_eff"]
                assert row["upload_s"] == pytest.approx(n * profile.payload_bits / rate)
        sync_like = [rec for rec in server.records if not rec.phases]
        for rec in sync_like:
            served = [r for r in rec.users if r.get("drafted")]
            law = profile.verification_model.latency_for_batch_s(
                len(served), max(r["drafted"] for r in served)
            )
            assert rec.verify_s == pytest.approx(law)
        summary = server.summary()
        assert summary["timing"] == "profile:realistic-llama2" and summary["verify_wall_s"] > 0


def test_live_cli_protocol_and_timing_flags_are_checked():
    from argparse import Namespace

    from multispin_agents.tuned import TunedHeuristic
    from multispin_env.live.cli import protocol_name, protocol_switches, resolve_protocol
    from multispin_env.live.timing import parse_timing

    assert protocol_switches("early-stop+pipeline", 3) == {
        "early_stop": True,
        "streaming_deadline": False,
        "pipeline_groups": 3,
    }
    for name in ("sync", "deadline", "early-stop+deadline", "pipeline"):
        assert protocol_name(*protocol_switches(name).values()) == name
    assert parse_timing("measured") is None
    assert parse_timing("profile:paper-llama2") == "paper-llama2"
    with pytest.raises(ValueError, match="no preset 'a100'"):
        parse_timing("profile:a100")
    with pytest.raises(ValueError, match="LiveConfig.timing"):
        LiveConfig(timing="fast")
    tuned = TunedHeuristic.parse("tuned[hete,prior,cap=8,margin=1.0,mix=0.0,stop=0.3]")
    args = Namespace(protocol="deadline", groups=2, scheduler=tuned.name)
    with pytest.raises(ValueError, match="stop= acts only"):
        resolve_protocol(args, tuned)
    args.protocol = "early-stop"
    assert resolve_protocol(args, tuned)["early_stop"]
    args.protocol = None  # not a bundle: the synchronous round, which has no stop knob
    assert resolve_protocol(args, TunedHeuristic.parse("tuned[hete,prior,cap=8]")) == (
        protocol_switches("sync")
    )


def test_an_extended_protocol_bundle_is_deployed_live_unchanged(pair, tmp_path):
    """A residual policy trained under pipelined groups, exported, then scheduling the live
    server under the same protocol: its levers (groups) are decoded live."""
    from conftest import TINY_TRAIN_ARGS

    from multispin_env.live.scheduler import BundleScheduler
    from multispin_train.export import export_run
    from multispin_train.train import main as train_main

    run = tmp_path / "run"
    train_main(
        TINY_TRAIN_ARGS
        + ["--env", "multispin/DemoPairCPU-v0", "--run-dir", str(run), "--eval-episodes", "1"]
        + ["--no-reference", "--horizon-reward", "--env-kwargs", "action_mode:residual",
           "num_users:4", "max_users:4", "pipeline_groups:2", "proactive_drafting:false",
           "base_policy:tuned[hete,history,cap=6,margin=1.0,mix=0.0,fast]"]
    )  # fmt: skip
    bundle = export_run(run, tmp_path / "bundle", parity_samples=4)
    scheduler = BundleScheduler(str(bundle))
    assert scheduler.levers.groups == 2
    drafter, verifier = pair

    async def scenario():
        cfg = LiveConfig(
            max_users=4, greedy=True, kept_vocab=16, max_draft_length=8, pipeline_groups=2,
            scenario="demo-pair-cpu",
        )  # fmt: skip
        server = EdgeServer(cfg, verifier, scheduler, VOCAB)
        port = await server.start()
        tasks = [
            asyncio.create_task(
                run_device(
                    DeviceConfig(d, p, port=port, greedy=True, kept_vocab=16, time_scale=0.0),
                    drafter=drafter,
                )
            )
            for d, p in PROMPTS.items()
        ]
        await server.wait_for_users(4)
        for _ in range(3):
            await server.play_round()
        await server.flush()
        await server.stop()
        return server, dict(zip(PROMPTS, await asyncio.gather(*tasks), strict=True))

    server, outputs = asyncio.run(scenario())
    _check_greedy(server, verifier, outputs)
    groups = {r["group"] for rec in server.records for r in rec.users}
    assert groups <= {0, 1} and len(server.records[0].phases) >= 1
    with pytest.raises(ValueError, match="--protocol"):
        EdgeServer(LiveConfig(max_users=4, kept_vocab=16), verifier, scheduler, VOCAB)
