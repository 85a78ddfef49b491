"""Counter-based random numbers, vectorised over environments and users.

Why not one ``numpy.random.Generator`` per environment: the batched env steps N environments
in one numpy call, and N generators would mean a Python loop per step (too slow at N=256),
while one shared generator would make env n's stream depend on N. A counter-based generator
(as in JAX/Philox) makes every draw a pure function of (key, round, stream, user): the
scalar env and env n of the batched env draw the very same numbers given the same key, and
any number of environments is one vectorised hash.

Keys come from ``numpy.random.Generator.integers`` (seeded by ``reset(seed=...)``), so every
source of randomness still flows from the caller's seed.

Each draw is splitmix64 (Steele et al., "Fast splittable pseudorandom number generators",
OOPSLA 2014): the finaliser applied to key + golden * index, i.e. element ``index`` of the
splitmix64 stream seeded with ``key``; that generator passes BigCrush.
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
    # uint64 array arithmetic wraps modulo 2^64 silently (only numpy scalars warn)
    base = (counters * np.uint64(NUM_STREAMS) + np.uint64(stream)) * np.uint64(4096)
    start = keys + _GOLDEN * (base + np.uint64(1))
    bits = _mix(start[:, None] + _user_offsets(num_users)[None, :])
    return ((bits >> _S11).astype(np.float64) + 0.5) * _INV_2_53


class RoundUniforms:
    """Per-round draws of a few streams, precomputed for blocks of rounds.

    ``get(stream, counters)`` returns exactly ``uniforms(keys, counters, stream, K)``, but
    the hashing runs once per ``block`` rounds per env instead of once per call: at K = 20
    numpy's per-call overhead, not arithmetic, is what a step costs.
    """

    def __init__(
        self, num_envs: int, num_users: int, streams: tuple[int, ...], block: int = 64
    ) -> None:
        self.streams = tuple(streams)
        self._slot = {s: i for i, s in enumerate(self.streams)}
        self.block, self.num_users = block, num_users
        self._values = np.zeros((num_envs, block, len(self.streams), num_users))
        self._start = np.zeros(num_envs, dtype=np.int64)
        self._keys = np.zeros(num_envs, dtype=np.uint64)
        self._rows = np.arange(num_envs)

    def rekey(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """New keys for some envs (after reset); their block restarts at round 0."""
        self._keys[rows] = keys
        self._fill(rows, np.zeros(len(rows), dtype=np.int64))

    def _fill(self, rows: np.ndarray, start: np.ndarray) -> None:
        counters = (start[:, None] + np.arange(self.block)[None, :]).ravel()
        keys = np.repeat(self._keys[rows], self.block)
        for slot, stream in enumerate(self.streams):
            u = uniforms(keys, counters, stream, self.num_users)
            self._values[rows, :, slot, :] = u.reshape(len(rows), self.block, self.num_users)
        self._start[rows] = start

    def get(self, stream: int, counters: np.ndarray, rows: np.ndarray | None = None):
        """Draws ``(len(rows), K)`` of ``stream`` at ``counters`` (one per env in rows)."""
        all_rows = rows is None
        rows = self._rows if all_rows else rows
        offset = counters - (self._start if all_rows else self._start[rows])
        if offset.min() < 0 or offset.max() >= self.block:
            stale = (offset < 0) | (offset >= self.block)
            self._fill(rows[stale], counters[stale])
            offset = counters - self._start[rows]
        return self._values[rows, offset, self._slot[stream]]


_OFFSETS: dict[int, np.ndarray] = {}


def _user_offsets(num_users: int) -> np.ndarray:
    """golden * k for k < num_users (cached: the same few K are used all the time)."""
    offsets = _OFFSETS.get(num_users)
    if offsets is None:
        with np.errstate(over="ignore"):
            offsets = _GOLDEN * np.arange(num_users, dtype=np.uint64)
        _OFFSETS[num_users] = offsets
    return offsets


_KEY_HIGH = np.iinfo(np.int64).max


def new_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """Fresh per-environment keys drawn from a seeded generator."""
    return rng.integers(0, _KEY_HIGH, size=count, dtype=np.int64).astype(np.uint64)
