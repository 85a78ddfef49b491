"""The one place that sets how the core's fused numba kernels are compiled.

Why kernels: at K = 20 users a round is ~100 tiny numpy operations, and numpy's ~1 us per
call, not arithmetic, set the cost of a step. Each hot function (a round, the channel draw,
the history update, the observation, the action decode) is instead one compiled loop over
``(N, K)``. The scalar env (N = 1) and the batched env call the very same kernels, as do
the live scheduler and the paper solvers, so there is one implementation of each formula.

- ``cache=True``: compiled code is stored next to the sources (``__pycache__``), so only
  the first import on a machine pays the compile time (a few seconds).
- ``error_model="numpy"``: division by zero gives inf/nan as numpy does, instead of raising.
- ``NUMBA_DISABLE_JIT=1`` runs the same kernels as plain Python (slow; for debugging).
"""

from __future__ import annotations

import numba
import numpy as np


def kernel(fn):
    """Compile ``fn`` as a core kernel (no Python objects inside; see module docstring)."""
    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # no writable cache location (read-only install and home): compile
        return numba.njit(cache=False, nogil=True, error_model="numpy")(fn)  # every run


def as_array(x, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """``x`` as a C-contiguous array of ``shape`` and ``dtype`` for a kernel, broadcasting
    scalars and rows. Arrays that already fit pass through untouched (the hot path)."""
    if type(x) is np.ndarray and x.shape == shape:
        if x.dtype == dtype and x.flags.c_contiguous:
            return x
        return np.ascontiguousarray(x, dtype=dtype)
    return np.ascontiguousarray(np.broadcast_to(np.asarray(x, dtype=dtype), shape))
