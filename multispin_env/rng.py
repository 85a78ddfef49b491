"""Counter-based random numbers, vectorised over environments and users.

Why not one ``numpy.random.Generator`` per environment: the batched env steps N environments
in one kernel call, and N generators would mean a Python loop per step (too slow at N=256),
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

from multispin_env._jit import kernel

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 1.0 / 9007199254740992.0
_ONE, _BLOCK_U = np.uint64(1), np.uint64(4096)

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
_NUM_STREAMS_U = np.uint64(NUM_STREAMS)


@kernel
def _finalise(z):
    """splitmix64's finaliser of state ``z``, as a uniform in (0, 1) (53 bits)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return (np.float64(z >> _S11) + 0.5) * _INV_2_53


@kernel
def _draw_row(key, counter, stream, out):
    """out[k] = uniform draw k of (key, counter, stream): splitmix64 element
    ``(counter * NUM_STREAMS + stream) * 4096 + k + 1`` of the stream seeded with the key.
    uint64 arithmetic wraps modulo 2^64, as the generator requires."""
    base = (counter * _NUM_STREAMS_U + stream) * _BLOCK_U
    start = key + _GOLDEN * (base + _ONE)
    for k in range(out.shape[0]):
        out[k] = _finalise(start + _GOLDEN * np.uint64(k))


@kernel
def uniform_at(key, counter, stream, index):
    """Draw ``index`` of (key, counter, stream) alone: element ``index`` of what
    :func:`uniforms` returns for that key, counter and stream (for kernels that need only a
    few draws, e.g. per drafted token)."""
    base = (counter * _NUM_STREAMS_U + np.uint64(stream)) * _BLOCK_U
    return _finalise(key + _GOLDEN * (base + _ONE + np.uint64(index)))


@kernel
def _fill_uniforms(keys, counters, stream, out):
    for i in range(out.shape[0]):
        _draw_row(keys[i], counters[i], stream, out[i])


@kernel
def _fill_blocks(keys, rows, start, streams, values):
    """values[r, b, s, :] = draws of stream ``streams[s]`` at counter start[i] + b, for
    r = rows[i] (the RoundUniforms cache, written in place)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for b in range(values.shape[1]):
            counter = np.uint64(start[i] + b)
            for s in range(streams.shape[0]):
                _draw_row(keys[r], counter, streams[s], values[r, b, s])


def uniforms(keys: np.ndarray, counters: np.ndarray, stream: int, num_users: int) -> np.ndarray:
    """Uniform(0, 1) draws of shape ``(N, num_users)``, open at both ends.

    Args:
        keys: ``(N,)`` uint64 per-environment keys.
        counters: ``(N,)`` integer per-environment counters (e.g. the round index).
        stream: one of the ``STREAM_*`` constants.
        num_users: number of users (columns).
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
    counters = np.ascontiguousarray(counters, dtype=np.uint64).reshape(-1)
    out = np.empty((keys.shape[0], num_users))
    _fill_uniforms(keys, counters, np.uint64(stream), out)
    return out


@kernel
def _block_offsets(counters, start, rows, block, out) -> bool:
    """out[i] = counters[i] - start[rows[i]]; True if any falls outside [0, block)."""
    stale = False
    for i in range(rows.shape[0]):
        out[i] = counters[i] - start[rows[i]]
        stale = stale or out[i] < 0 or out[i] >= block
    return stale


class RoundUniforms:
    """Per-round draws of a few streams, precomputed for blocks of rounds.

    ``get(stream, counters)`` returns exactly ``uniforms(keys, counters, stream, K)``, but
    the hashing runs once per ``block`` rounds per env instead of once per call. Kernels
    read ``values[n, offsets[n], slot(stream), k]`` directly, with ``offsets`` from
    :meth:`offsets`.
    """

    def __init__(
        self, num_envs: int, num_users: int, streams: tuple[int, ...], block: int = 64
    ) -> None:
        self.streams = tuple(streams)
        self._slot = {s: i for i, s in enumerate(self.streams)}
        self._stream_ids = np.array(self.streams, dtype=np.uint64)
        self.block, self.num_users = block, num_users
        self.values = np.zeros((num_envs, block, len(self.streams), num_users))
        self._start = np.zeros(num_envs, dtype=np.int64)
        self._keys = np.zeros(num_envs, dtype=np.uint64)
        self._rows = np.arange(num_envs)

    def rekey(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """New keys for some envs (after reset); their block restarts at round 0."""
        self._keys[rows] = keys
        self._fill(rows, np.zeros(len(rows), dtype=np.int64))

    def _fill(self, rows: np.ndarray, start: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        start = np.asarray(start, dtype=np.int64)
        _fill_blocks(self._keys, rows, start, self._stream_ids, self.values)
        self._start[rows] = start

    def slot(self, stream: int) -> int:
        """Index of ``stream`` on the third axis of ``values`` (-1 if not precomputed)."""
        return self._slot.get(stream, -1)

    def offsets(self, counters: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Block offsets of ``counters`` (one per env in ``rows``, default all), refilling
        the blocks of envs whose counter left their block."""
        rows = self._rows if rows is None else np.asarray(rows, dtype=np.int64)
        counters = np.asarray(counters, dtype=np.int64)
        offset = np.empty(len(rows), dtype=np.int64)
        if _block_offsets(counters, self._start, rows, self.block, offset):
            stale = (offset < 0) | (offset >= self.block)
            self._fill(rows[stale], counters[stale])
            offset = counters - self._start[rows]
        return offset

    def get(self, stream: int, counters: np.ndarray, rows: np.ndarray | None = None):
        """Draws ``(len(rows), K)`` of ``stream`` at ``counters`` (one per env in rows)."""
        offset = self.offsets(counters, rows)
        return self.values[self._rows if rows is None else rows, offset, self._slot[stream]]


_KEY_HIGH = np.iinfo(np.int64).max


def new_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """Fresh per-environment keys drawn from a seeded generator."""
    return rng.integers(0, _KEY_HIGH, size=count, dtype=np.int64).astype(np.uint64)


def keys_from(rngs) -> np.ndarray:
    """One key from each generator, equal to ``new_keys(rng, 1)`` of each (a scalar draw
    consumes a generator exactly as a draw of size 1), without a numpy call per env."""
    return np.array(
        [rng.integers(0, _KEY_HIGH, dtype=np.int64) for rng in rngs], dtype=np.int64
    ).astype(np.uint64)
