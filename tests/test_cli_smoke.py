"""Smoke tests: the real commands with tiny budgets."""

import csv

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
        "tuned heuristic",
        "Hete-Multi-SPIN",
        "Fixed BW&L",
    ]
    assert summary["learned_vs_tuned_live"] > 0
    assert all(r["live_tokens_per_s"] > 0 and r["sim_tokens_per_s"] > 0 for r in summary["rows"])
    assert (tmp_path / "run" / "bundle" / "policy.onnx").is_file()
    assert "sim vs live" in capsys.readouterr().out


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
