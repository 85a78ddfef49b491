"""Wire protocol between the edge server and device processes (asyncio streams + msgpack).

Framing: a 4-byte big-endian length, then one msgpack map. Every message carries the schema
version ``v`` and a ``type``; :func:`decode` checks both and every field's type before a
message is acted on, so a malformed or foreign message raises :class:`ProtocolError` (which
names the field) and changes nothing. A frame whose length header is over the reader's limit
raises :class:`FrameError`: the stream can no longer be trusted to be in step, so the reader
closes the connection instead of reading on.

This module checks *form* (types, finiteness, sizes of strings and lists). What a value means
for the run (token ids below the vocabulary, a draft no longer than requested, buffers of the
announced size, a prompt that fits the verifier's context) is checked by the server, which
knows the models: see :mod:`multispin_env.live.validation`.

Messages (v3; fields in brackets are optional):

============  =========  ==========================================================
type          direction  fields
============  =========  ==========================================================
hello         dev -> srv device_id, prompt (token ids), speed_factor, mean_gain,
                         [session] (the secret from a previous welcome, to rejoin),
                         [auth] (the deployment token, where the server requires one)
welcome       srv -> dev user_id, session (this session's secret: keep it to rejoin),
                         committed (all tokens committed so far: a rejoining device
                         rebuilds its state from the server's record)
round         srv -> dev round, draft_length, bandwidth_hz, spectral_eff, sample_seed
                         (sampling mode: the device draws its tokens with
                         speculative.draft_uniforms(sample_seed), so the server can check
                         them), [stop_threshold] (early stop: end the draft when the
                         drafter's top probability for the next token is below it),
                         [deadline_s] (stream the draft token by token; tokens that would
                         reach the server after deadline_s on the round's timeline are not
                         sent), [token_time_s, upload_bits] (profile timing: drafting
                         seconds per token and uploaded bits per token to report and
                         emulate instead of the measured ones; see live.timing),
                         [ahead_max, next_sample_seed] (proactive drafting: while this
                         draft is verified, draft up to ahead_max tokens of the next one,
                         with draft_uniforms(next_sample_seed), the next round's seed)
draft         dev -> srv round, tokens, q_indices (int32 bytes), q_values (fp16 bytes),
                         kept, compute_s (drafting CPU time x speed factor, after the
                         round message), upload_s, [ahead (the first tokens, drafted
                         before the round message), ahead_compute_s (drafting time up to
                         each of them), ahead_guess (1: drafted on the guess that the
                         previous draft was all accepted, 0: after its result)]
token         dev -> srv round, index, token, q_indices, q_values (one PMF row),
                         compute_s (drafting time from the round's start to this token)
draft_end     dev -> srv round, count (tokens streamed), compute_s (all drafting time),
                         cut (1: the deadline cut the draft, 0: it ended on its own)
result        srv -> dev round, accepted, committed
end           srv -> dev reason (the user's request is over, e.g. the verifier's context
                         is full; the device leaves with what it has)
ping          srv -> dev (none): the server is alive between rounds
error         both       code, message
bye           both       (none)
============  =========  ==========================================================
"""

from __future__ import annotations

import asyncio
import math
import reprlib
import struct

import msgpack

PROTOCOL_VERSION = 3
MAX_FRAME_BYTES = 16 * 1024 * 1024  # what a device accepts from the server
MAX_ID_CHARS = 64
MAX_TOKENS_PER_LIST = 1 << 16  # form check only; the server applies the real limits

SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {
        "device_id": str,
        "prompt": list,
        "speed_factor": (int, float),
        "mean_gain": (int, float),
    },
    "welcome": {"user_id": int, "session": str, "committed": list},
    "round": {
        "round": int,
        "draft_length": int,
        "bandwidth_hz": (int, float),
        "spectral_eff": (int, float),
        "sample_seed": int,
    },
    "draft": {
        "round": int,
        "tokens": list,
        "q_indices": bytes,
        "q_values": bytes,
        "kept": int,
        "compute_s": (int, float),
        "upload_s": (int, float),
    },
    "token": {
        "round": int,
        "index": int,
        "token": int,
        "q_indices": bytes,
        "q_values": bytes,
        "compute_s": (int, float),
    },
    "draft_end": {"round": int, "count": int, "compute_s": (int, float), "cut": int},
    "result": {"round": int, "accepted": int, "committed": list},
    "end": {"reason": str},
    "ping": {},
    "error": {"code": str, "message": str},
    "bye": {},
}
OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"session": str, "auth": str},
    "round": {
        "stop_threshold": (int, float),
        "deadline_s": (int, float),
        "token_time_s": (int, float),
        "upload_bits": int,
        "ahead_max": int,
        "next_sample_seed": int,
    },
    "draft": {"ahead": int, "ahead_compute_s": list, "ahead_guess": int},
}


def _check_field(kind: str, name: str, value, expected) -> None:
    if isinstance(value, bool) or not isinstance(value, expected):
        raise ProtocolError(f"{kind}.{name} must be {expected}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{kind}.{name} must be finite")
    if isinstance(value, str) and len(value) > 4096:
        raise ProtocolError(f"{kind}.{name} is {len(value)} characters; at most 4096")
    if name == "token" and value < 0:
        raise ProtocolError(f"{kind}.token must be a non-negative token id, got {value}")
    if name in ("prompt", "tokens", "committed"):
        if len(value) > MAX_TOKENS_PER_LIST:
            raise ProtocolError(
                f"{kind}.{name} has {len(value)} tokens; at most {MAX_TOKENS_PER_LIST}"
            )
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
            raise ProtocolError(f"{kind}.{name} must be a list of non-negative token ids")
    if name == "device_id" and not (
        0 < len(value) <= MAX_ID_CHARS and value.isprintable() and not value.isspace()
    ):
        raise ProtocolError(
            f"{kind}.device_id must be 1..{MAX_ID_CHARS} printable characters, got {short(value)}"
        )


class ProtocolError(ValueError):
    """A message that cannot be applied; the text names what is wrong."""


class FrameError(ProtocolError):
    """A frame that breaks the framing itself (over the size limit): close the connection."""


def message(kind: str, **fields) -> dict:
    """A validated message dict (raises ProtocolError if fields are wrong)."""
    msg = {"v": PROTOCOL_VERSION, "type": kind, **fields}
    validate(msg)
    return msg


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 4


def short(value) -> str:
    """A bounded repr of peer input for error texts (no deep recursion, no echo of megabytes)."""
    return _SHORT.repr(value)


def validate(msg) -> dict:
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a map, got {type(msg).__name__}")
    version = msg.get("v")
    if not (isinstance(version, int) and not isinstance(version, bool)) or (
        version != PROTOCOL_VERSION
    ):
        raise ProtocolError(
            f"unsupported protocol version {short(version)}; this end speaks v{PROTOCOL_VERSION}"
        )
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(
            f"unknown message type {short(kind)}; expected one of {sorted(SCHEMAS)}"
        )
    for name, expected in SCHEMAS[kind].items():
        if name not in msg:
            raise ProtocolError(f"{kind} message is missing field {name!r}")
        _check_field(kind, name, msg[name], expected)
    for name, expected in OPTIONAL.get(kind, {}).items():
        if name in msg:
            _check_field(kind, name, msg[name], expected)
    return msg


def encode(msg: dict) -> bytes:
    body = msgpack.packb(validate(msg), use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return struct.pack(">I", len(body)) + body


def decode(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as err:  # msgpack raises several types for garbage
        raise ProtocolError(f"undecodable message: {short(str(err))}") from err
    try:
        return validate(msg)
    except ProtocolError:
        raise
    except (TypeError, ValueError, RecursionError) as err:  # hostile shapes: never escape
        raise ProtocolError(f"invalid message: {type(err).__name__}") from err


async def read_message(
    reader: asyncio.StreamReader,
    max_bytes: int = MAX_FRAME_BYTES,
    idle_timeout_s: float | None = None,
    frame_timeout_s: float | None = None,
) -> dict:
    """The next message.

    Raises :class:`ProtocolError` for a bad message (the stream stays in step),
    :class:`FrameError` for a frame over ``max_bytes`` (the stream is not in step: close it),
    ``asyncio.TimeoutError`` when no frame starts within ``idle_timeout_s`` or a started frame
    does not arrive whole within ``frame_timeout_s`` (a peer trickling bytes), and
    ``IncompleteReadError`` at EOF."""
    first = await _within(reader.readexactly(1), idle_timeout_s)
    header = first + await _within(reader.readexactly(3), frame_timeout_s)
    (size,) = struct.unpack(">I", header)
    if size > max_bytes:
        raise FrameError(f"frame of {size} bytes exceeds this connection's limit of {max_bytes}")
    return decode(await _within(reader.readexactly(size), frame_timeout_s))


async def _within(coro, timeout_s: float | None):
    """``await coro`` with a time limit (``asyncio.TimeoutError``). Not ``asyncio.wait_for``:
    on Python < 3.12 it can swallow a cancellation that arrives as the read completes, and a
    cancelled device then read on instead of leaving (seen in the rejoin test)."""
    if timeout_s is None:
        return await coro
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


async def send_message(writer: asyncio.StreamWriter, msg: dict) -> None:
    writer.write(encode(msg))
    await writer.drain()
