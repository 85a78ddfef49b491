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
