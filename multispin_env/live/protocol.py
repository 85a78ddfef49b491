"""Wire protocol between the edge server and device processes (asyncio streams + msgpack).

Framing: a 4-byte big-endian length, then one msgpack map. Every message carries the schema
version ``v`` and a ``type``; :func:`decode` checks both and every field's type before a
message is acted on, so a malformed or foreign message raises :class:`ProtocolError` (which
names the field) and changes nothing.

Messages (v1):

============  =========  ==========================================================
type          direction  fields
============  =========  ==========================================================
hello         dev -> srv device_id, prompt (token ids), speed_factor, mean_gain
welcome       srv -> dev user_id, committed (all tokens committed so far: a rejoining
                         device rebuilds its state from the server's record)
round         srv -> dev round, draft_length, bandwidth_hz, spectral_eff
draft         dev -> srv round, tokens, q_indices (int32 bytes), q_values (fp16 bytes),
                         kept, compute_s (drafting CPU time x speed factor), upload_s
result        srv -> dev round, accepted, committed
error         both       code, message
bye           both       (none)
============  =========  ==========================================================
"""

from __future__ import annotations

import asyncio
import math
import struct

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024

SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {
        "device_id": str,
        "prompt": list,
        "speed_factor": (int, float),
        "mean_gain": (int, float),
    },
    "welcome": {"user_id": int, "committed": list},
    "round": {
        "round": int,
        "draft_length": int,
        "bandwidth_hz": (int, float),
        "spectral_eff": (int, float),
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
    "result": {"round": int, "accepted": int, "committed": list},
    "error": {"code": str, "message": str},
    "bye": {},
}


class ProtocolError(ValueError):
    """A message that cannot be applied; the text names what is wrong."""


def message(kind: str, **fields) -> dict:
    """A validated message dict (raises ProtocolError if fields are wrong)."""
    msg = {"v": PROTOCOL_VERSION, "type": kind, **fields}
    validate(msg)
    return msg


def validate(msg) -> dict:
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a map, got {type(msg).__name__}")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {msg.get('v')!r}; this end speaks v{PROTOCOL_VERSION}"
        )
    kind = msg.get("type")
    if kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {sorted(SCHEMAS)}")
    for name, expected in SCHEMAS[kind].items():
        if name not in msg:
            raise ProtocolError(f"{kind} message is missing field {name!r}")
        value = msg[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ProtocolError(f"{kind}.{name} must be {expected}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{kind}.{name} must be finite")
        if name in ("prompt", "tokens", "committed") and not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
        ):
            raise ProtocolError(f"{kind}.{name} must be a list of non-negative token ids")
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
        raise ProtocolError(f"undecodable message: {err}") from err
    return validate(msg)


async def read_message(reader: asyncio.StreamReader) -> dict:
    """The next message; raises ProtocolError for bad frames, IncompleteReadError at EOF."""
    header = await reader.readexactly(4)
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    return decode(await reader.readexactly(size))


async def send_message(writer: asyncio.StreamWriter, msg: dict) -> None:
    writer.write(encode(msg))
    await writer.drain()
