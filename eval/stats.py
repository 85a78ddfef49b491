"""Small statistics shared by the evaluation code."""

from __future__ import annotations

import numpy as np


def ci95_halfwidth(values) -> float:
    """Half-width of the 95% confidence interval of the mean: Student's t with n - 1 degrees
    of freedom (1.96 is the large-n limit and is too narrow for a few seeds, e.g. 2.26 at
    n = 10). NaN for fewer than two values, where no interval can be given."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))


def ratio_of_means_ci95_halfwidth(x, y) -> float:
    """Half-width of the 95% confidence interval of ``mean(x) / mean(y)`` for paired samples
    (the same seeds, common random numbers), by the delta method: with R the ratio of means,
    the residuals x_i - R y_i have mean 0 and ``sd / (sqrt(n) mean(y))`` is the standard error
    of R; Student's t with n - 1 degrees of freedom as in :func:`ci95_halfwidth`. Use it where
    the point reported is the ratio of means (a CI of the mean of per-seed ratios belongs to
    another estimator, which can differ by more than its own width). NaN for fewer than two
    pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"paired samples need equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    ratio = x.mean() / y.mean()
    return ci95_halfwidth(x - ratio * y) / abs(y.mean())


# ---- reporting across training seeds (Agarwal et al. 2021, "Deep RL at the edge of the
# statistical precipice"; the definitions of the rliable package, re-implemented here because
# rliable's pinned dependency chain does not import with current pandas)


def iqm(scores) -> float:
    """Interquartile mean of all entries of ``scores`` (runs x tasks): the mean of the
    middle 50%, with the quartile entries weighted fractionally (scipy's trim_mean at 25%
    cuts whole entries; rliable uses that too)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(scores, dtype=float).ravel(), proportiontocut=0.25))


def stratified_bootstrap_ci(
    scores, statistic=iqm, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(scores)``, resampling runs with replacement
    within each task (column) independently: the stratified bootstrap of rliable."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim == 1:
        scores = scores[:, None]
    runs, tasks = scores.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    cols = np.arange(tasks)
    for i in range(reps):
        picks = rng.integers(0, runs, size=(runs, tasks))
        stats[i] = statistic(scores[picks, cols])
    lo, hi = np.percentile(stats, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def probability_of_improvement(x, y) -> float:
    """P(X > Y) averaged over tasks: for each task (column) the Mann-Whitney probability that
    a run of X scores above a run of Y (ties count one half), then the mean over tasks.
    ``x`` is (runs_x, tasks), ``y`` is (runs_y, tasks); a deterministic baseline has one run."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim == 1:
        x, y = x[:, None], y[:, None] if y.ndim == 1 else y
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} tasks, y has {y.shape[1]}")
    greater = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    ties = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return float((greater + 0.5 * ties).mean())
