"""``multispin live``: flags are checked up front, devices that die fail the run at once,
Ctrl-C still writes the summary, and the generated text is saved."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from multispin_env.live.cli import _wait_for_devices, build_parser, main, spawn_device


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--users", "0"], "--users: must be >= 1"),
        (["--max-draft-length", "0"], "--max-draft-length: must be >= 1"),
        (["--port", "80000"], "0..65535"),
        (["--rounds", "-3"], "--rounds: must be >= 1"),
        (["--temperature", "0"], "--temperature: must be a finite number > 0"),
        (["--round-timeout-s", "nan"], "--round-timeout-s: must be a finite number > 0"),
        (["--kept-vocab", "many"], "expected an integer"),
        (["--hf-drafter", "/tmp"], "--hf-drafter needs --hf-verifier too"),
        (["--hf-verifier", "/tmp"], "--hf-verifier needs --hf-drafter too"),
        (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
        (["--timing", "profile:a100"], "no preset 'a100'"),
        (["--timing", "fast"], "choose measured or profile:PRESET"),
        (["--time-scale", "-1"], "--time-scale -1.0: must be a finite number >= 0"),
        (["--csi-error-std", "nan"], "--csi-error-std nan: must be a number in [0, 10]"),
        (["--protocol", "warp"], "invalid choice"),
        (["--groups", "1"], "--groups: must be >= 2"),
        (["--verification-law", "/no/law.json"], "--verification-law /no/law.json: no such"),
        (["--alpha-prior", "1.5"], "--alpha-prior 1.5: must be a number in (0, 1)"),
        (["--alpha-prior", "nan"], "--alpha-prior nan: must be a number in (0, 1)"),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(argv, words, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err
    assert time.perf_counter() - t0 < 2.0  # no model loaded, no process started


def test_every_flag_has_help_text():
    missing = [
        a.option_strings
        for a in build_parser()._actions
        if a.option_strings and a.dest != "help" and not (a.help and a.help.strip())
    ]
    assert not missing


def test_more_users_than_prompts_is_an_error_not_a_silent_cap():
    from multispin_env.live.cli import live_args, run_live

    with pytest.raises(ValueError, match=r"--users 5000: the prompt set has only \d+ prompts"):
        asyncio.run(run_live(live_args(users=5000, trace=None)))


def test_a_device_that_dies_fails_the_run_at_once_with_its_log(tmp_path):
    """A device that cannot start used to leave the server waiting 120 s for it."""

    class NoOne:
        connected = []

    log = tmp_path / "dev-0.log"
    proc = spawn_device(1, "dev-0", [1, 2], model_dir=tmp_path / "missing", log_path=log)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="exited with status 2 before joining") as exc:
        asyncio.run(_wait_for_devices(NoOne(), [proc], [log], 120.0, asyncio.Event()))
    assert time.perf_counter() - t0 < 60
    assert "missing" in str(exc.value)  # the device's own message, from its log


def _squat(port: int) -> dict:
    """Say hello as the CLI's first device would, without the run's token."""
    import socket
    import struct

    import msgpack

    from multispin_env.live import protocol as proto

    msg = {"v": proto.PROTOCOL_VERSION, "type": "hello", "device_id": "dev-0", "prompt": [1],
           "speed_factor": 1.0, "mean_gain": 0.3}  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        body = msgpack.packb(msg)
        sock.sendall(struct.pack(">I", len(body)) + body)
        size = struct.unpack(">I", sock.recv(4))[0]
        data = b""
        while len(data) < size:
            data += sock.recv(size - len(data))
    return msgpack.unpackb(data)


def test_ctrl_c_writes_the_summary_and_outputs_of_the_rounds_played(tmp_path):
    """Also: a local process without the run's token can neither join nor take a device's
    name (the CLI makes a token for its own devices when none is given)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trace = tmp_path / "live" / "trace.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "multispin_env.cli", "live", "--users", "2", "--rounds",
         "100000", "--max-draft-length", "2", "--trace", str(trace), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if trace.exists() and len(trace.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        reply = _squat(port)
        assert reply["type"] == "error" and reply["code"] == "unauthorized"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted after" in err
    summary = json.loads(trace.with_suffix(".summary.json").read_text())
    assert summary["interrupted"] and summary["rounds"] >= 3
    outputs = json.loads(trace.with_suffix(".outputs.json").read_text())
    assert sorted(outputs) == ["dev-0", "dev-1"]
    assert all(len(o["tokens"]) > 0 and isinstance(o["text"], str) for o in outputs.values())
    assert sum(len(o["tokens"]) for o in outputs.values()) == summary["tokens"]
    # the devices were told bye and left cleanly (their logs hold no traceback)
    logs = list(trace.with_suffix(".devices").glob("dev-*.log"))
    assert len(logs) == 2 and all("Traceback" not in p.read_text() for p in logs)
