"""Real branches of the Lambert W function, vectorised with numpy.

``scipy.special.lambertw`` is complex-valued and ~1 us per element; Algorithm 1 evaluates
W0 on a whole (phi, lambda, user) grid every round, so we solve w + ln w = ln z by Newton's
method in the log domain (no overflow for the huge z that alpha^(-phi/2T) produces).
"""

from __future__ import annotations

import numpy as np
from scipy.special import lambertw as _scipy_lambertw


def lambertw0_from_log(log_z: np.ndarray, iterations: int = 8) -> np.ndarray:
    """W0(z) for z = exp(log_z) > 0, given log z (any real, including very large)."""
    log_z = np.asarray(log_z, dtype=np.float64)
    big = log_z > 1.0
    safe_log = np.where(big, log_z, 2.0)
    # Start below the root (w <= z), where the update keeps w > 0 and converges monotonically.
    w = np.where(big, safe_log - np.log(safe_log), np.log1p(np.exp(np.minimum(log_z, 1.0))))
    for _ in range(iterations):
        w = w / (1.0 + w) * (1.0 + log_z - np.log(w))
    return w


def lambertw0(z: np.ndarray) -> np.ndarray:
    """W0(z) for real z > 0."""
    z = np.asarray(z, dtype=np.float64)
    if np.any(z <= 0):
        raise ValueError("lambertw0 is implemented for z > 0 only")
    return lambertw0_from_log(np.log(z))


def lambertw_minus1(x: float) -> float:
    """W_{-1}(x) for x in [-1/e, 0): the lower real branch (<= -1)."""
    if not -np.exp(-1.0) - 1e-15 <= x < 0.0:
        raise ValueError(f"W_-1 is real only on [-1/e, 0); got {x}")
    x = max(x, -np.exp(-1.0))
    return float(_scipy_lambertw(x, k=-1).real)
