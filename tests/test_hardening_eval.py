"""`multispin evaluate`: Student-t intervals, one seed, bad seed counts, a learned policy in
another action mode, a legend that covers no bar, and plots that leave the backend alone."""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TINY_TRAIN_ARGS

from multispin_eval.compare import main as evaluate_main
from multispin_eval.compare import make_figure
from multispin_eval.harness import EpisodeMetrics
from multispin_eval.stats import ci95_halfwidth, ratio_of_means_ci95_halfwidth


def _metrics(goodput):
    goodput = np.asarray(goodput, dtype=float)
    ones = np.ones_like(goodput)
    return EpisodeMetrics(goodput, ones, ones / 3, ones / 3, ones / 3, ones, 4 * ones, ones)


def test_confidence_interval_uses_student_t():
    values = [100.0, 110.0, 95.0, 120.0]
    # t(0.975, 3) = 3.182: the interval is 62% wider than 1.96 would make it
    expected = 3.182446 * np.std(values, ddof=1) / 2.0
    assert ci95_halfwidth(values) == pytest.approx(expected, rel=1e-6)
    assert _metrics(values).summary()["goodput_ci95"] == pytest.approx(expected, rel=1e-6)
    assert np.isnan(ci95_halfwidth([100.0]))
    assert np.isnan(_metrics([100.0]).summary()["goodput_ci95"])


def test_the_ratio_of_means_interval_covers_the_ratio_it_reports():
    """The compare table's "vs Hete" is mean(x) / mean(y) over paired seeds. Its interval is
    the delta method's: exact scaling, zero width for a constant ratio, and 95% coverage of
    the true ratio of means in repeated paired draws (where the mean per-seed ratio, with its
    own CI, would sit off the point reported)."""
    x, y = np.array([120.0, 80.0, 150.0, 95.0]), np.array([100.0, 90.0, 110.0, 100.0])
    width = ratio_of_means_ci95_halfwidth(x, y)
    assert ratio_of_means_ci95_halfwidth(3 * x, y) == pytest.approx(3 * width)
    assert ratio_of_means_ci95_halfwidth(x, 3 * y) == pytest.approx(width / 3)
    assert ratio_of_means_ci95_halfwidth(1.2 * y, y) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(ratio_of_means_ci95_halfwidth([1.0], [2.0]))
    with pytest.raises(ValueError, match="equal lengths"):
        ratio_of_means_ci95_halfwidth([1.0, 2.0], [1.0])
    rng = np.random.default_rng(0)
    covered, trials, n = 0, 2000, 32
    for _ in range(trials):  # a scale factor per seed (heavy-tailed), shared by the pair
        scale = rng.lognormal(0.0, 0.5, n)
        a, b = scale * rng.normal(1.3, 0.2, n), scale * rng.normal(1.0, 0.2, n)
        true_ratio = 1.3  # E[scale] is common to both means and cancels
        half = ratio_of_means_ci95_halfwidth(a, b)
        covered += abs(a.mean() / b.mean() - true_ratio) <= half
    assert 0.93 <= covered / trials <= 0.97


def test_one_seed_prints_na_not_zero(tmp_path, capsys):
    rows = evaluate_main(
        ["--policies", "fixed", "hete", "--seeds", "1", "--horizon-s", "2"]
        + ["--out", str(tmp_path), "--no-progress"]
    )
    fixed = next(r for r in rows if r["policy"] == "fixed")
    assert np.isnan(fixed["goodput_ci95"]) and np.isnan(fixed["vs_hete_ci95"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| fixed "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "n/a" and cells[4] == "n/a", line
    csv_row = (tmp_path / "compare.csv").read_text().splitlines()
    fixed_csv = next(x for x in csv_row if x.startswith("fixed,")).split(",")
    assert fixed_csv[2] == "" and fixed_csv[4] == ""


@pytest.mark.parametrize("count", ["0", "-2", "two"])
def test_bad_seed_count_is_a_clear_argparse_error(tmp_path, capsys, count):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--policies", "hete", "--seeds", count, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and ("at least 1" in err or "not an integer" in err), err


def test_learned_policy_in_another_action_mode_is_refused(tmp_path, capsys):
    from multispin_train.train import main as train_main

    run = tmp_path / "run"
    train_main(
        TINY_TRAIN_ARGS
        + ["--run-dir", str(run), "--env-kwargs", "action_mode:lengths", "num_users:4"]
    )
    with pytest.raises(SystemExit) as exit_info:  # one line naming the field, no traceback
        evaluate_main(
            ["--policies", str(run), "--seeds", "2", "--out", str(tmp_path / "cmp")]
            + ["--env-kwargs", "action_mode:full", "num_users:4", "--no-progress"]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("multispin evaluate: error:")
    assert re.search(r"action_mode='lengths'.*action_mode='full'", err)
    # the same policy in its own mode runs
    rows = evaluate_main(
        ["--policies", str(run), "--seeds", "2", "--horizon-s", "2", "--no-progress"]
        + ["--env-kwargs", "num_users:4", "--out", str(tmp_path / "ok")]
    )
    assert {r["policy"] for r in rows} == {"hete", "run"}


def _rows(n):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        split = rng.dirichlet([2, 2, 2])
        rows.append(
            {
                "policy": "hete" if i == 0 else f"policy{i}",
                "goodput": float(rng.uniform(50, 150)),
                "goodput_ci95": float("nan") if i == 1 else 3.0,
                "draft_frac": split[0],
                "upload_frac": split[1],
                "verify_frac": split[2],
            }
        )
    return rows


@pytest.mark.parametrize("n", [2, 5, 9])
def test_legend_covers_no_bar(n):
    fig = make_figure(_rows(n), "title")
    fig.canvas.draw()
    split_axes = fig.axes[1]
    legend = split_axes.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in split_axes.patches]
    assert len(bars) == 3 * n
    overlapping = [b for b in bars if b.overlaps(legend)]
    assert not overlapping, f"legend {legend} covers {len(overlapping)} bars"


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    script = textwrap.dedent(
        f"""
        import matplotlib
        from pathlib import Path

        before = matplotlib.get_backend()
        from multispin_eval.compare import write_outputs
        from multispin_eval.reproduce import _plot_protocols

        rows = [
            dict(policy=p, goodput=g, goodput_ci95=1.0, vs_hete=g / 100, vs_hete_ci95=0.0,
                 jain=0.9, draft_frac=0.3, upload_frac=0.3, verify_frac=0.4, round_ms=400.0,
                 draft_length=4.0, energy_j_per_token=1e-9)
            for p, g in (("hete", 100.0), ("fixed", 60.0))
        ]
        write_outputs(rows, Path({str(tmp_path)!r}), "t")
        paper = [
            dict(pair=pair, bandwidth_mhz=10.0, scheme=s, model_tokens_per_s=1.0)
            for pair in ("paper-llama2", "paper-qwen35") for s in ("hete", "cen", "p2p")
        ]
        _plot_protocols(paper, Path({str(tmp_path)!r}) / "p.png")
        import gymnasium as gym
        import multispin_env  # noqa: F401
        from multispin_train.experiments import plot_learning_curves

        env = gym.make("multispin/PaperLlama2-v0", num_users=3, render_mode="rgb_array")
        env.reset(seed=0)
        env.step(env.action_space.sample())
        assert env.render().shape[-1] == 3
        curve = Path({str(tmp_path)!r}) / "eval_progress.csv"
        curve.write_text("timesteps,wall_s,eval_goodput_tokens_per_s\\n0,0,10\\n64,60,20\\n")
        out = Path({str(tmp_path)!r}) / "c.png"
        plot_learning_curves({{0: curve.parent}}, out, "t")
        print(before, matplotlib.get_backend())
        """
    )
    env = dict(os.environ, MPLBACKEND="svg")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "svg"]
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_seed_statistics_match_their_definitions():
    from multispin_eval.stats import iqm, probability_of_improvement, stratified_bootstrap_ci

    # IQM of 1..8: the middle half is 3, 4, 5, 6
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)
    assert iqm([[1, 100], [2, 3], [4, 5], [6, -50]]) == pytest.approx((2 + 3 + 4 + 5) / 4)
    # a constant score has a zero-width interval; a spread one covers its IQM
    assert stratified_bootstrap_ci(np.full((5, 3), 2.0)) == (2.0, 2.0)
    rng = np.random.default_rng(0)
    scores = rng.normal(1.0, 0.1, size=(5, 32))
    lo, hi = stratified_bootstrap_ci(scores, reps=500)
    assert lo < iqm(scores) < hi and hi - lo < 0.1
    # probability of improvement: all above, all below, ties, and a 3-of-4 case
    assert probability_of_improvement([[2.0]], [[1.0]]) == 1.0
    assert probability_of_improvement([[0.0]], [[1.0]]) == 0.0
    assert probability_of_improvement([[1.0]], [[1.0]]) == 0.5
    assert probability_of_improvement([[1], [2], [3], [0]], [[0.5]]) == 0.75
