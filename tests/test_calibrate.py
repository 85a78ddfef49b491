"""Calibration round trip: measure the live pair, write a profile, load it, reproduce."""

import gymnasium as gym
import numpy as np
import pytest
import yaml
from gymnasium.utils.env_checker import check_env

from multispin_env.config import ScenarioConfig, load_preset
from multispin_env.live.calibrate import calibrate, fit_verification, profile_document


def test_profile_round_trip_reproduces_the_measurements(tmp_path):
    measured = calibrate(per_category=3)
    doc = profile_document(measured, "sampling", "roundtrip", num_users=6)
    path = tmp_path / "roundtrip.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = ScenarioConfig.from_dict(yaml.safe_load(path.read_text()))
    assert cfg.t_draft_mean_s == pytest.approx(measured["drafter_per_token"]["mean_s"], rel=1e-3)
    assert cfg.payload_bits == measured["payload_bits"] == 1024 * (16 + 12)
    fit = measured["verification"]["token_aware"]
    for row in measured["verification_samples"]:
        predicted = cfg.verification_model.latency_for_batch_s(row["users"], row["draft_length"])
        assert abs(predicted - row["seconds"]) / row["seconds"] <= fit["worst_rel_error"] + 0.01
    by_name = {t.name: t for t in cfg.tasks}
    for cat, stats in measured["acceptance"]["sampling"].items():
        assert by_name[cat].alpha_mean == pytest.approx(stats["mean"], abs=1e-4)
    assert 0.3 < np.mean([t.alpha_mean for t in cfg.tasks]) < 0.95  # a realistic pair


def test_verification_fits_recover_known_laws():
    rows = [
        {
            "users": k,
            "draft_length": length,
            "seconds": 0.005 + 0.0007 * k + 0.0002 * k * (length + 1),
        }
        for k in (1, 2, 4, 8)
        for length in (1, 2, 4, 8)
    ]
    fits = fit_verification(rows)
    ta = fits["token_aware"]
    assert ta["t_fix_s"] == pytest.approx(0.005) and ta["t_user_s"] == pytest.approx(0.0007)
    assert ta["t_token_s"] == pytest.approx(0.0002) and ta["r2"] == pytest.approx(1.0)
    assert fits["affine"]["r2"] < 1.0  # the paper's form cannot express the token cost


def test_committed_profile_is_registered():
    cfg = load_preset("demo-pair-cpu")
    assert cfg.vocab_size == 4096 and cfg.verification["kind"] == "token_aware"
    env = gym.make("multispin/DemoPairCPU-v0", action_mode="lengths")
    check_env(env.unwrapped, skip_render_check=True)


def test_verify_benchmark_runs_and_fits_on_cpu(tmp_path):
    """The GPU verification benchmark's real script, tiny Llama on the CPU."""
    import json

    from multispin_eval.bench_verify import main

    report = main(
        ["--device", "cpu", "--models", "tiny-llama", "--users", "1", "2", "--lengths", "1", "3"]
        + ["--reps", "2", "--dtype", "fp32", "--out", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "verify_latency.json").read_text())
    entry = saved["models"]["tiny-llama"]
    assert report["models"]["tiny-llama"]["server"]["rows"] == entry["server"]["rows"]
    for kind in ("server", "forward"):
        rows = entry[kind]["rows"]
        assert sorted((r["users"], r["draft_length"]) for r in rows) == [
            (1, 1),
            (1, 3),
            (2, 1),
            (2, 3),
        ]
        assert all(r["seconds"] > 0 for r in rows)
        assert entry[kind]["fit"]["token_aware"]["t_fix_s"] >= 0
    assert "forward_cuda_graph" not in entry  # CUDA graphs only on a GPU
