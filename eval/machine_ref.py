"""A fixed machine-speed reference workload, timed in the same run as a benchmark.

Absolute timings on shared or virtual machines move by 2x from run to run, and from machine
to machine by more. Every benchmark here (``bench_env``, ``bench_solvers``, ``bench_live``,
the bundle latency of ``multispin export``) therefore also times this fixed workload and
reports its results divided by the reference as well as in absolute units. The ratio is
what to compare across machines and runs.

One *reference op* is one 256 x 256 float64 matrix product (numpy, one BLAS thread with
``OMP_NUM_THREADS=1``) plus 10,000 iterations of a small pure-Python loop: the two kinds of
work the benchmarks do (compiled array arithmetic and interpreter overhead). The reference
is the best of a few short repeats of each part (noise on a shared machine only slows), and
``ref_ops_per_s`` is 1 / (matmul time + loop time). Benchmarks measure it before and after
their own timings and use the mean of the two.

    python -m multispin_eval.machine_ref
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

MATMUL_SIZE = 256
PY_ITERS_PER_OP = 10_000


@dataclass(frozen=True)
class MachineRef:
    matmul_per_s: float  # 256x256 float64 products per second
    python_iters_per_s: float  # pure-Python loop iterations per second

    @property
    def ref_ops_per_s(self) -> float:
        return 1.0 / (1.0 / self.matmul_per_s + PY_ITERS_PER_OP / self.python_iters_per_s)

    def describe(self) -> str:
        return (
            f"machine reference: {self.ref_ops_per_s:,.0f} ref ops/s (1 ref op = one "
            f"{MATMUL_SIZE}x{MATMUL_SIZE} float64 matmul + {PY_ITERS_PER_OP:,} Python loop "
            f"iterations; {self.matmul_per_s:,.0f} matmuls/s, "
            f"{self.python_iters_per_s / 1e6:.1f}M loop iterations/s)"
        )

    def rate_ratio(self, per_s: float) -> float:
        """A throughput (things per second) in things per reference op."""
        return per_s / self.ref_ops_per_s

    def latency_ratio(self, seconds: float) -> float:
        """A latency in reference ops (how many reference ops fit in it)."""
        return seconds * self.ref_ops_per_s

    def averaged_with(self, other: MachineRef) -> MachineRef:
        """The mean of two measurements (taken before and after a benchmark)."""
        return MachineRef(
            (self.matmul_per_s + other.matmul_per_s) / 2,
            (self.python_iters_per_s + other.python_iters_per_s) / 2,
        )

    def as_dict(self) -> dict:
        return {
            "ref_ops_per_s": self.ref_ops_per_s,
            "matmul_per_s": self.matmul_per_s,
            "python_iters_per_s": self.python_iters_per_s,
        }


def _python_loop(n: int) -> int:
    acc = 0
    for i in range(n):
        acc = (acc + i * i) & 0xFFFF
    return acc


def measure(repeats: int = 5, matmuls: int = 20, py_iters: int = 200_000) -> MachineRef:
    """Time the reference workload (~0.3-1 s): best of ``repeats`` for each part."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE))
    b = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE))
    a @ b  # warm-up
    _python_loop(1000)
    best_mm = best_py = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(matmuls):
            a @ b
        best_mm = min(best_mm, (time.perf_counter() - t0) / matmuls)
        t0 = time.perf_counter()
        _python_loop(py_iters)
        best_py = min(best_py, (time.perf_counter() - t0) / py_iters)
    return MachineRef(matmul_per_s=1.0 / best_mm, python_iters_per_s=1.0 / best_py)


def main() -> MachineRef:
    ref = measure()
    print(ref.describe())
    return ref


if __name__ == "__main__":
    main()
