"""The committed demo pair: integrity, quality ordering, exact greedy speculative decoding."""

import json
import shutil

import pytest

from multispin_env.live.models import default_pair_dir, load_pair
from multispin_env.live.speculative import (
    verifier_greedy_reference,
)


@pytest.fixture(scope="module")
def pair():
    return load_pair()


def test_manifest_checks_and_verifier_is_the_better_model(pair):
    manifest = pair.manifest
    assert set(manifest["files"]) >= {
        "tokenizer.json",
        "drafter/model.safetensors",
        "verifier/model.safetensors",
    }
    assert manifest["verifier"]["val_loss"] < manifest["drafter"]["val_loss"] - 0.2
    assert manifest["verifier"]["parameters"] > 4 * manifest["drafter"]["parameters"]
    total = sum(f["bytes"] for f in manifest["files"].values())
    assert total < 20 * 2**20  # fp16 weights stay small enough to commit
    text = "def parse_args(argv):\n    parser = argparse."
    assert pair.decode(pair.encode(text)) == text


def test_corrupt_or_incomplete_pair_fails_at_load(tmp_path):
    broken = tmp_path / "pair"
    shutil.copytree(default_pair_dir(), broken)
    weights = broken / "verifier" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or was replaced"):
        load_pair(broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_pair(broken)
    with pytest.raises(ValueError, match="does not exist"):
        load_pair(tmp_path / "nowhere")
    manifest = json.loads((default_pair_dir() / "MANIFEST.json").read_text())
    assert "train_pair" in manifest["command"]


def test_greedy_speculative_decoding_equals_verifier_greedy_on_real_models(pair):
    from conftest import run_greedy_rounds

    prompts = {
        0: pair.encode("import os\nimport sys\n\n\ndef main("),
        1: pair.encode("class Queue:\n    def __init__(self"),
    }
    server, accepted, drafted = run_greedy_rounds(
        pair.drafter, pair.verifier, prompts, 10, lambda r, u: 2 + (r + u) % 4, kept_vocab=1024
    )
    assert 0.3 < accepted / drafted < 1.0  # a real pair: mostly but not always agreeing
    for uid, prompt in prompts.items():
        out = server.outputs[uid]
        assert out == verifier_greedy_reference(pair.verifier, prompt, len(out))


def test_live_cli_smoke_with_device_processes(tmp_path, capsys):
    from multispin_env.cli import main as cli

    trace = tmp_path / "trace.jsonl"
    cli(["live", "--users", "2", "--rounds", "3", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert "goodput:" in out and "dev-1" in out
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(len(r["users"]) == 2 and r["verify_s"] > 0 for r in records)
    summary = json.loads(trace.with_suffix(".summary.json").read_text())
    assert summary["rounds"] == 3 and summary["tokens"] >= 6
