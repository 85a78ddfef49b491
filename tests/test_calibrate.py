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


def _law_batches(t_fix, t_user, t_token, cells, repeats=10, noise=None):
    out = []
    for users, longest in cells:
        for i in range(repeats):
            seconds = t_fix + users * t_user + users * (longest + 1) * t_token
            if noise is not None:
                seconds *= noise[i % len(noise)]
            out.append({"users": users, "longest": longest, "measured_s": seconds})
    return out


def test_verification_law_is_scaled_to_live_batches_by_one_robust_scale():
    """The idle shape scaled by the median measured / idle ratio: a host 1.3x slower than the
    idle timing is recovered exactly for every part, a hiccup (one batch in ten 3x slower)
    does not move it, and no batches is an error."""
    from multispin_env.live.timing import scale_verification_law

    idle = {"kind": "token_aware", "t_fix_s": 5e-3, "t_user_s": 1e-3, "t_token_s": 2e-4}
    cells = [(4, 1), (4, 3), (8, 1), (8, 2)]
    live = _law_batches(1.3 * 5e-3, 1.3e-3, 1.3 * 2e-4, cells, noise=[1.0] * 9 + [3.0])
    fit = scale_verification_law(idle, live)
    assert fit["scale"] == pytest.approx(1.3)
    for part in ("t_fix_s", "t_user_s", "t_token_s"):
        assert fit["law"][part] == pytest.approx(1.3 * idle[part])
    assert fit["batch_sizes"] == {4: 20, 8: 20} and fit["batches"] == 40
    with pytest.raises(ValueError, match="no live verification"):
        scale_verification_law(idle, [])


def test_the_law_moves_with_the_context_and_the_scale_is_the_hosts():
    """Verification reads the whole context: the law at context C is the law at the timed
    context times 1 + per_token (C - C0). Warm-up batches at their own contexts give the
    host's scale, not the warm-up's context."""
    from multispin_env.live.timing import context_factor, law_at_context, scale_verification_law

    dependence = {"context_tokens": 150, "per_token": 0.002}
    assert context_factor(dependence, 150) == 1.0
    assert context_factor(dependence, 100) == pytest.approx(0.9)
    assert context_factor(dependence, 10_000) == 4.0 and context_factor(None, 50) == 1.0
    idle = {"kind": "token_aware", "t_fix_s": 5e-3, "t_user_s": 1e-3, "t_token_s": 2e-4}
    moved = law_at_context(idle, dependence, 250)
    assert moved["kind"] == "token_aware"
    assert moved["t_user_s"] == pytest.approx(1.2e-3) and moved["t_fix_s"] == pytest.approx(6e-3)
    # a host 1.1x the idle timing, warm-up batches at contexts 60..240
    batches = []
    for i, context in enumerate(range(60, 241, 20)):
        users, longest = (4, 8)[i % 2], 1 + i % 3
        seconds = 5e-3 + users * 1e-3 + users * (longest + 1) * 2e-4
        batches.append(
            {
                "users": users,
                "longest": longest,
                "measured_s": 1.1 * seconds * context_factor(dependence, context),
                "context_tokens": context,
            }
        )
    assert scale_verification_law(idle, batches, dependence)["scale"] == pytest.approx(1.1)
    # without the contexts, the warm-up's mean context (150) is taken for the law's
    assert scale_verification_law(idle, batches)["scale"] == pytest.approx(1.1, rel=0.15)


def test_context_dependence_is_a_line_through_timed_contexts(tiny_pair_factory, monkeypatch):
    """The slope relative to the time at the reference context, from (8, 2) verifications at
    1/2 to 3/2 of it: exact for a verifier whose time is a line in the context, and
    measured on a real (tiny) verifier at those contexts."""
    from multispin_env.live import calibrate, timing

    _, verifier = tiny_pair_factory(48, seed=0)
    real = timing.context_dependence(verifier, 160, reps=2)
    assert real["contexts"] == [80, 120, 160, 200, 240] and real["shape"] == [8, 2]
    assert all(t > 0 for t in real["seconds"]) and np.isfinite(real["per_token"])

    def linear(verifier, users, lengths, context, reps):
        assert (users, lengths) == ((8,), (2,))
        return [{"users": 8, "draft_length": 2, "seconds": 4e-3 + 5e-5 * context}]

    monkeypatch.setattr(calibrate, "time_verification", linear)
    fitted = timing.context_dependence(verifier, 160)
    assert fitted["per_token"] == pytest.approx(5e-5 / (4e-3 + 5e-5 * 160))
    # a hiccup at one context does not move the line

    def hiccup(verifier, users, lengths, context, reps):
        seconds = 4e-3 + 5e-5 * context
        return [{"users": 8, "draft_length": 2, "seconds": seconds * (2 if context == 240 else 1)}]

    monkeypatch.setattr(calibrate, "time_verification", hiccup)
    robust = timing.context_dependence(verifier, 160)
    assert robust["per_token"] == pytest.approx(5e-5 / (4e-3 + 5e-5 * 160))


def test_the_live_planning_law_is_online_the_scenarios_or_a_files(tmp_path):
    """Under measured timing the live server plans with the law it is given: the scenario's
    (as the simulator's server view), a law file, or an end-to-end timing.json; a bad file
    is refused with the flag and the fix named."""
    import json

    from multispin_env.live.scheduler import OnlineVerificationModel, make_scheduler
    from multispin_env.live.server import EdgeServer, LiveConfig
    from multispin_env.live.timing import planning_verification
    from multispin_env.verification import TokenAwareVerification

    scenario = load_preset("demo-pair-cpu")
    assert planning_verification("online") is None
    assert planning_verification("scenario", scenario) == scenario.verification_model
    law = {"kind": "token_aware", "t_fix_s": 0.004, "t_user_s": 0.001, "t_token_s": 0.0002}
    (tmp_path / "law.json").write_text(json.dumps(law))
    (tmp_path / "timing.json").write_text(json.dumps({"overrides": {"verification": law}}))
    expected = TokenAwareVerification(0.004, 0.001, 0.0002)
    for name in ("law.json", "timing.json"):
        assert planning_verification(str(tmp_path / name)) == expected
    (tmp_path / "bad.json").write_text(json.dumps({**law, "t_user_s": -1}))
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "flag.json").write_text(json.dumps({**law, "t_fix_s": True}))
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, why in (("missing.json", "no such file"), ("text.json", "not readable JSON"),
                      ("bad.json", "t_user_s"), ("flag.json", "must be numbers"),
                      ("list.json", "holds no law")):  # fmt: skip
        with pytest.raises(ValueError, match="--verification-law") as err:
            planning_verification(str(tmp_path / name))
        assert why in str(err.value) and "timing.json" in str(err.value)

    def server(choice):
        cfg = LiveConfig(max_users=2, scenario="demo-pair-cpu", verification_law=choice)
        return EdgeServer(cfg, verifier, make_scheduler("hete"), 48)

    from conftest import make_tiny_pair

    _, verifier = make_tiny_pair(48, seed=1)

    assert isinstance(server("online").verification, OnlineVerificationModel)
    assert server("scenario").verification == scenario.verification_model
    assert server(str(tmp_path / "timing.json")).verification == expected


def test_calibrated_tasks_keep_the_categories_and_move_their_mean():
    from multispin_train.end_to_end import calibrated_tasks

    preset = load_preset("demo-pair-cpu").tasks
    tasks = calibrated_tasks("demo-pair-cpu", 0.6)
    assert [t["name"] for t in tasks] == [t.name for t in preset]
    assert np.mean([t["alpha_mean"] for t in tasks]) == pytest.approx(0.6)
    ratios = [t["alpha_mean"] / p.alpha_mean for t, p in zip(tasks, preset, strict=True)]
    assert np.ptp(ratios) < 1e-12  # one scale for every category
    assert load_preset("demo-pair-cpu", tasks=tasks).tasks[0].alpha_mean == tasks[0]["alpha_mean"]


def test_each_protocol_takes_its_own_warm_ups_drafting_time():
    """8 devices draft at once in a synchronous round, one group when pipelined, and their
    CPU time per token differs: a policy is timed with its protocol's warm-up."""
    from multispin_train.end_to_end import timing_for

    law = {"kind": "token_aware", "t_fix_s": 5e-3, "t_user_s": 1e-3, "t_token_s": 2e-4}
    calibration = {
        "overrides": {"t_draft_mean_s": 2.0e-3, "verification": law},
        "drafting_by_protocol": {"sync": 2.5e-3, "pipeline": 2.0e-3},
    }
    assert timing_for(calibration, "sync")["t_draft_mean_s"] == 2.5e-3
    assert timing_for(calibration, "pipeline")["t_draft_mean_s"] == 2.0e-3
    assert timing_for(calibration, "deadline")["t_draft_mean_s"] == 2.5e-3  # all at once
    assert timing_for(calibration, "sync")["verification"] == law
    assert calibration["overrides"]["t_draft_mean_s"] == 2.0e-3  # the caller's stays
