"""Smoke tests: the real commands with tiny budgets."""

import csv

import pytest

from multispin_env.cli import main as cli


def test_demo_runs_and_writes_plot(tmp_path, capsys):
    cli(["demo", "--realizations", "3", "--rounds", "2", "--out", str(tmp_path)])
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
