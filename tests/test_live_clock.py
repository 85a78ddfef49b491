"""The live timeline times model compute by the computing thread's CPU time on a CPU, so the
load of other processes sharing the host (device processes beside the server) stays out."""

import asyncio
import time
import types

import pytest
import torch
from test_live_server import VOCAB, _device

from multispin_env.live.clock import compute_clock, model_device_type
from multispin_env.live.device import run_device
from multispin_env.live.scheduler import make_scheduler
from multispin_env.live.server import EdgeServer, LiveConfig


@pytest.fixture(scope="module")
def pair():
    from conftest import make_tiny_pair

    return make_tiny_pair(VOCAB, seed=1)


def test_the_clock_follows_where_the_weights_live():
    assert model_device_type(torch.nn.Linear(2, 2)) == "cpu"
    assert compute_clock(torch.nn.Linear(2, 2)) is time.thread_time
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))  # no GPU needed to ask
    assert model_device_type(on_gpu) == "cuda"
    assert compute_clock(on_gpu) is time.perf_counter  # an accelerator: the CPU only waits
    assert compute_clock(object()) is time.thread_time  # cannot say: CPU
    wrapped = types.SimpleNamespace(model=types.SimpleNamespace(model=on_gpu))
    assert model_device_type(wrapped) == "cuda"  # a reduced-vocabulary drafter, say
    from multispin_env.live.models import ReducedVocabDrafter

    class Net(torch.nn.Linear):
        cfg = types.SimpleNamespace(n_positions=16, vocab_size=3)

    drafter = ReducedVocabDrafter(Net(2, 2).to("meta"), [0, 1], full_vocab_size=4)
    assert model_device_type(drafter) == "meta" and compute_clock(drafter) is time.perf_counter


def test_the_cpu_clock_leaves_out_time_the_thread_does_not_run():
    clock = compute_clock(torch.nn.Linear(2, 2))
    t0, wall0 = clock(), time.perf_counter()
    time.sleep(0.2)  # as when another process holds the core
    assert time.perf_counter() - wall0 >= 0.2
    assert clock() - t0 < 0.05


def test_verification_on_the_timeline_is_cpu_time_and_wall_time_is_kept_apart(pair):
    """A verifier that loses the core for 0.15 s per batch (here: sleeps) keeps its timeline
    verification time at its compute, while the wall-clock total records the wait."""
    drafter, verifier = pair
    pause_s, rounds = 0.15, 3

    async def scenario():
        cfg = LiveConfig(max_users=4, greedy=True, kept_vocab=16, max_draft_length=6)
        server = EdgeServer(cfg, verifier, make_scheduler("hete"), VOCAB)
        real_verify = server.verifier.verify

        def preempted_verify(drafts):
            time.sleep(pause_s)
            return real_verify(drafts)

        server.verifier.verify = preempted_verify
        port = await server.start()
        tasks = [
            asyncio.create_task(run_device(_device(d, p, port), drafter=drafter))
            for d, p in {"a": [1, 2, 3], "b": [5, 6]}.items()
        ]
        await server.wait_for_users(2)
        for _ in range(rounds):
            await server.play_round()
        await server.stop()
        await asyncio.gather(*tasks)
        return server

    server = asyncio.run(scenario())
    assert server.verify_wall_s >= rounds * pause_s
    for rec in server.records:
        assert 0 < rec.verify_s < pause_s / 3
        # each verification is in the record, the CPU and the wall time apart
        (batch,) = rec.batches
        assert batch["users"] == 2 and batch["longest"] >= 1
        assert batch["verify_s"] == batch["measured_s"] == rec.verify_s
        assert batch["wall_s"] >= pause_s
        assert rec.timeline_s == pytest.approx(
            max(u["compute_s"] + u["upload_s"] for u in rec.users) + rec.verify_s
        )
