"""Smoke tests: the real commands with tiny budgets."""

import csv

import numpy as np
import pytest

from multispin_env.cli import main as cli


def test_demo_runs_and_writes_plot(tmp_path, capsys):
    cli(["demo", "--realizations", "3", "--rounds", "2", "--out", str(tmp_path), "--no-live"])
    out = capsys.readouterr().out
    assert "Hete-Multi-SPIN" in out and "Cen-SPIN" in out
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_reproduce_writes_tables_plots_and_summary(tmp_path):
    cli(["reproduce", "--realizations", "3", "--rounds", "1", "--out", str(tmp_path)])
    for fig in ("fig6", "fig7", "fig8"):
        assert (tmp_path / f"{fig}.png").stat().st_size > 1000
        rows = list(csv.DictReader((tmp_path / f"{fig}.csv").open()))
        assert rows and all(float(r["model_tokens_per_s"]) > 0 for r in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "Hete over Fixed at 5 MHz" in summary


def test_unknown_subcommand_is_rejected():
    with pytest.raises(SystemExit):
        cli(["no-such-command"])


def test_end_to_end_smoke(tmp_path, capsys):
    """The whole chain with tiny budgets: train, export, three live runs, predictions."""
    import json

    cli(
        [
            "end-to-end",
            "--timesteps",
            "256",
            "--rounds",
            "3",
            "--users",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "out"),
            "--tune-trials",
            "3",
            "--quiet",
        ]
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["policy"] for r in summary["rows"]] == [
        "learned (PPO, exported)",
        "tuned heuristic (sync)",
        "Hete-Multi-SPIN (sync)",
        "Fixed BW&L",
    ]
    assert summary["learned_vs_tuned_live"] > 0
    # measured timing: the pair was timed on this machine and the simulator predicts with it
    timing = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert summary["timing_calibrated_here"] == timing["overrides"]
    assert 0 < timing["overrides"]["t_draft_mean_s"] < 1
    assert len(timing["idle_shape"]["verification_rows"]) == 16
    # the drafting time is the warm-up live run's median; the law is the idle shape, scaled
    warmup = (tmp_path / "out" / "trace_warmup_sync.jsonl").read_text().splitlines()
    assert len(warmup) == 3 and timing["warmups"] == [
        {"scheduler": "hete", "protocol": "sync", "rounds": 3, "seed": 10_000}
    ]
    fit = timing["verification_fit"]
    assert fit["scale"] > 0 and fit["batch_sizes"] == {"2": 3}
    idle = timing["idle_shape"]["overrides"]["verification"]
    law = timing["overrides"]["verification"]
    for part in ("t_fix_s", "t_user_s", "t_token_s"):
        assert law[part] == pytest.approx(idle[part] * fit["scale"])
    assert all(r["live_tokens_per_s"] > 0 and r["sim_tokens_per_s"] > 0 for r in summary["rows"])
    # the warm-up's acceptance on the runs' prompts would be the live prior and scale the
    # simulator's tasks; 3 rounds of 2 users look at too few tokens, so the preset's stays
    assert 0 < timing["acceptance"]["tokens_examined"] < 100
    assert timing["acceptance"]["alpha"] is None and summary["acceptance_calibrated_here"] is None
    assert all(
        r["sim_preset_acceptance_tokens_per_s"] == r["sim_tokens_per_s"] for r in summary["rows"]
    )
    assert summary["live_verification_law"] == str(tmp_path / "out" / "timing.json")
    # each policy is predicted, and plans live, with the law at the mean context the
    # simulator predicts for its run (verification reads the whole context)
    from multispin_env.live.timing import law_at_context

    assert np.isfinite(timing["context_dependence"]["per_token"])
    policy_laws = sorted((tmp_path / "out").glob("timing_*_*.json"))
    assert len(policy_laws) == len(summary["rows"])
    for path in policy_laws:
        doc = json.loads(path.read_text())
        assert doc["context_tokens"] > 48  # the prompt plus half the run's tokens
        moved = law_at_context(law, timing["context_dependence"], doc["context_tokens"])
        assert doc["overrides"]["verification"] == pytest.approx(moved)
    assert all(r["context_tokens_predicted"] > 48 for r in summary["rows"])
    assert (tmp_path / "run" / "bundle" / "policy.onnx").is_file()
    # the bundle is what the gate deployed (64 fresh simulated episodes by default)
    assert summary["gate"]["episodes"] == 64 and summary["gate"]["deployed"] in (
        "base",
        "candidate",
    )
    sidecar = json.loads((tmp_path / "run" / "bundle" / "policy.json").read_text())
    assert sidecar["source_model"].endswith("deployed_model.zip")
    out = capsys.readouterr().out
    assert "sim vs live" in out and "gate: candidate / base" in out


def test_end_to_end_protocol_with_profile_timing_smoke(tmp_path, capsys):
    """An extended protocol end to end: both tuned heuristics, the learned bundle played live
    under its protocol, two runs per policy, the profile's timeline in live and simulator."""
    import json

    cli(
        ["end-to-end", "--protocol", "deadline", "--timing", "profile:paper-llama2",
         "--runs", "2", "--timesteps", "256", "--rounds", "3", "--users", "2",
         "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
         "--tune-trials", "2", "--quiet"]
    )  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {r["policy"]: r for r in summary["rows"]}
    assert list(rows) == [
        "learned (PPO, exported)",
        "tuned heuristic (deadline)",
        "tuned heuristic (sync)",
        "Hete-Multi-SPIN (sync)",
    ]
    assert rows["learned (PPO, exported)"]["protocol"] == "deadline"
    assert rows["Hete-Multi-SPIN (sync)"]["protocol"] == "sync"
    assert all(len(r["live_runs_tokens_per_s"]) == 2 for r in rows.values())
    assert "per_run_ratio_ci95_halfwidth" in summary["ratios"]["learned_vs_tuned_sync"]
    meta = json.loads((tmp_path / "run" / "bundle" / "policy.json").read_text())
    assert meta["protocol_levers"] == {"stop": False, "deadline": True, "groups": 1}
    # the simulator ran the profile's timing: paper-llama2's drafter, ~27 ms per token
    assert meta["env_kwargs"]["t_draft_mean_s"] == pytest.approx(0.0268)
    assert "timing profile:paper-llama2" in capsys.readouterr().out


def test_protocols_table_smoke(tmp_path):
    """`multispin protocols` on 2 episodes: every protocol's heuristic and tuned rows, ratios
    to the synchronous references, and the files it promises."""
    from multispin_eval.protocols import main

    out = tmp_path / "protocols"
    summary = main(
        ["--scenarios", "paper", "--seeds", "2", "--out", str(out),
         "--experiments", str(tmp_path / "none"), "--no-progress"]
    )  # fmt: skip
    rows = summary["paper"]["rows"]
    assert [r["policy"] for r in rows[:4]] == ["fixed", "homo", "hete", "tuned"]
    assert {r["protocol"] for r in rows} == {"sync", "EarlyStop", "Deadline", "Pipeline"}
    hete = next(r for r in rows if r["protocol"] == "sync" and r["policy"] == "hete")
    assert hete["vs_hete"] == 1.0
    for r in rows:
        assert r["goodput"] > 0 and 0 < r["server_busy"] <= 1.0 + 1e-9
    for name in ("paper.csv", "paper.md", "paper.png", "summary.json"):
        assert (out / name).is_file()
