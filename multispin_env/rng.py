"""Counter-based random numbers, vectorised over environments and users.

Why not one ``numpy.random.Generator`` per environment: the batched env steps N environments
in one numpy call, and N generators would mean a Python loop per step (too slow at N=256),
while one shared generator would make env n's stream depend on N. A counter-based generator
(as in JAX/Philox) makes every draw a pure function of (key, round, stream, user): the
scalar env and env n of the batched env draw the very same numbers given the same key, and
any number of environments is one vectorised hash.

Keys come from ``numpy.random.Generator.integers`` (seeded by ``reset(seed=...)``), so every
source of randomness still flows from the caller's seed.

The mixer is the splitmix64 finaliser (Steele et al., "Fast splittable pseudorandom number
generators", OOPSLA 2014), which passes BigCrush when fed a counter.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 1.0 / 9007199254740992.0

# Named streams keep draws for different purposes independent of each other.
STREAM_FADING_MAG = 0
STREAM_FADING_PHASE = 1
STREAM_ACCEPT = 2
STREAM_CSI_MAG = 3
STREAM_CSI_PHASE = 4
STREAM_REQUEST_LEN = 5
STREAM_REQUEST_ALPHA = 6
STREAM_REQUEST_TASK = 7
NUM_STREAMS = 8


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def uniforms(keys: np.ndarray, counters: np.ndarray, stream: int, num_users: int) -> np.ndarray:
    """Uniform(0, 1) draws of shape ``(N, num_users)``, open at both ends.

    Args:
        keys: ``(N,)`` uint64 per-environment keys.
        counters: ``(N,)`` integer per-environment counters (e.g. the round index).
        stream: one of the ``STREAM_*`` constants.
        num_users: number of users (columns).
    """
    keys = np.asarray(keys, dtype=np.uint64)
    counters = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = (counters * np.uint64(NUM_STREAMS) + np.uint64(stream)) * np.uint64(4096)
        users = np.arange(num_users, dtype=np.uint64)
        z = keys[:, None] + _GOLDEN * (base[:, None] + users[None, :] + np.uint64(1))
        bits = _mix(_mix(z) ^ keys[:, None])
    return ((bits >> _S11).astype(np.float64) + 0.5) * _INV_2_53


def new_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """Fresh per-environment keys drawn from a seeded generator."""
    return rng.integers(0, np.iinfo(np.int64).max, size=count, dtype=np.int64).astype(np.uint64)
