"""What a message's values must mean before the server applies them.

:mod:`multispin_env.live.protocol` checks a message's form; this module checks its values
against the run: the models' vocabulary and context, the decoding settings, and what the
server asked this device for. Every check raises :class:`Rejected` with a short ``code`` for
the error reply and a message that names the field and what would be accepted. A rejected
message changes nothing on the server, and only its sender hears about it.

The checks that keep speculative decoding exact against a misbehaving device:

- a draft may not be longer than the length the server requested (a device could otherwise
  commit more tokens per round than it was given time and bandwidth for);
- each drafted token must lie in the support of the PMF the device uploaded for it, with
  q(x) > 0: the acceptance test ``u q(x) < p(x)`` passes for *every* u when q(x) = 0, so a
  token the device claims it could never have drafted would always be accepted;
- the PMF rows must be finite, non-negative, with distinct indices below the vocabulary, so
  that server and device renormalise the same distribution;
- in sampling mode each token must be the one its own uploaded PMF gives for the uniforms of
  the round's ``sample_seed`` (:func:`~multispin_env.live.speculative.draft_uniforms`), so a
  device cannot simply name a token with a tiny q(x) > 0.

What this does not stop (a known limitation, tested as such): in sampling mode a device
learns the uniforms with the round message, *before* it uploads its PMF, so a hostile device
can shape q around them, with its target token exactly where u lands and q(target) tiny;
then min(1, p/q) = 1 and it steers its *own* user's text (never another user's). Speculative
sampling is exact only if the drafts are honest draws from the uploaded q, and a server cannot
check that without drawing the tokens itself (one round trip per token). Greedy mode is
exact against any device: a token is accepted only if it is the verifier's own argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from multispin_env.live.protocol import ProtocolError
from multispin_env.live.speculative import Draft, sample_index

# reported drafting / upload times above this are not physical for one round
MAX_REPORTED_TIME_S = 3600.0
MAX_SPEED_FACTOR = 1e3
MAX_MEAN_GAIN = 1e6


class Rejected(ProtocolError):
    """A well-formed message whose values cannot be applied."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RunLimits:
    """What the run accepts.

    Attributes:
        vocab_size: token ids must be below this.
        context_tokens: the verifier's context (prompt + generated text must fit).
        kept: PMF entries per drafted token (min(kept_vocab, vocab_size), as devices upload).
    """

    vocab_size: int
    context_tokens: int
    kept: int


def _positive_finite(field: str, value: float, upper: float) -> None:
    if not (math.isfinite(value) and 0.0 < value <= upper):
        raise Rejected("bad_value", f"{field}={value!r} must be finite, > 0 and <= {upper:g}")


def check_hello(msg: dict, limits: RunLimits) -> None:
    """A new session's prompt and device parameters."""
    prompt = msg["prompt"]
    if not prompt:
        raise Rejected("bad_value", "hello.prompt is empty: send at least one token")
    bad = [t for t in prompt if t >= limits.vocab_size]
    if bad:
        raise Rejected(
            "bad_value",
            f"hello.prompt has token id {bad[0]} >= the vocabulary size {limits.vocab_size}",
        )
    if len(prompt) >= limits.context_tokens:
        raise Rejected(
            "bad_value",
            f"hello.prompt has {len(prompt)} tokens; the verifier's context is "
            f"{limits.context_tokens}, so a prompt may have at most {limits.context_tokens - 1}",
        )
    _positive_finite("hello.mean_gain", float(msg["mean_gain"]), MAX_MEAN_GAIN)
    _positive_finite("hello.speed_factor", float(msg["speed_factor"]), MAX_SPEED_FACTOR)


def parse_draft(msg: dict, requested_length: int, limits: RunLimits, uniforms=None) -> Draft:
    """The :class:`Draft` in a ``draft`` message, after every value was checked.
    ``uniforms`` (sampling mode): the round's draw for each position."""
    tokens = list(msg["tokens"])
    n = len(tokens)
    if n == 0:
        raise Rejected("bad_draft", "draft.tokens is empty: draft at least one token")
    if n > requested_length:
        raise Rejected(
            "bad_draft", f"draft has {n} tokens; this round's draft_length is {requested_length}"
        )
    if max(tokens) >= limits.vocab_size:
        raise Rejected(
            "bad_draft",
            f"draft.tokens has id {max(tokens)} >= the vocabulary size {limits.vocab_size}",
        )
    kept = msg["kept"]
    if kept != limits.kept:
        raise Rejected(
            "bad_draft",
            f"draft.kept={kept}; this run uploads {limits.kept} probabilities per token "
            "(min(kept_vocab, vocabulary)): use the server's --kept-vocab",
        )
    for field, itemsize in (("q_indices", 4), ("q_values", 2)):
        size = len(msg[field])
        if size != n * kept * itemsize:
            raise Rejected(
                "bad_draft",
                f"draft.{field} has {size} bytes; {n} tokens x kept {kept} x {itemsize} bytes "
                f"= {n * kept * itemsize} expected",
            )
    for field in ("compute_s", "upload_s"):
        value = float(msg[field])
        if not (math.isfinite(value) and 0.0 <= value <= MAX_REPORTED_TIME_S):
            raise Rejected(
                "bad_draft", f"draft.{field}={value!r} must be in [0, {MAX_REPORTED_TIME_S:g}] s"
            )
    indices = np.frombuffer(msg["q_indices"], dtype=np.int32).reshape(n, kept)
    values = np.frombuffer(msg["q_values"], dtype=np.float16).reshape(n, kept)
    if indices.min() < 0 or indices.max() >= limits.vocab_size:
        raise Rejected("bad_draft", f"draft.q_indices must lie in [0, {limits.vocab_size})")
    values64 = values.astype(np.float64)
    if not np.all(np.isfinite(values64)) or values64.min() < 0:
        raise Rejected("bad_draft", "draft.q_values must be finite and >= 0")
    ordered = np.sort(indices, axis=1)
    if kept > 1 and np.any(ordered[:, 1:] == ordered[:, :-1]):
        raise Rejected("bad_draft", "draft.q_indices repeats an index within a token's PMF")
    for i, x in enumerate(tokens):
        where = np.flatnonzero(indices[i] == x)
        if where.size == 0 or values64[i, where[0]] <= 0.0:
            raise Rejected(
                "bad_draft",
                f"draft token {i} (id {x}) has probability 0 in its own uploaded PMF; a "
                "device only drafts tokens it could sample",
            )
        if uniforms is not None:
            drawn = int(indices[i, sample_index(values[i], float(uniforms[i]))])
            if drawn != x:
                raise Rejected(
                    "bad_draft",
                    f"draft token {i} (id {x}) is not the token its uploaded PMF gives for the "
                    f"round's sample_seed (id {drawn}); draw token i with "
                    "draft_uniforms(sample_seed)[i]",
                )
    return Draft(tokens, indices, values)


def parse_ahead(
    msg: dict, tokens: int, offered: bool, whole_accepted: bool = True
) -> tuple[tuple[float, ...], bool]:
    """The proactive part of a ``draft`` message: (drafting time up to each token drafted
    ahead, drafted on the guess?). ``offered``: the round before offered drafting ahead;
    ``whole_accepted``: the sender's last draft was accepted whole (else no guess held)."""
    if "ahead" not in msg:
        if "ahead_compute_s" in msg or "ahead_guess" in msg:
            raise Rejected("bad_draft", "draft.ahead_compute_s/ahead_guess need draft.ahead")
        return (), False
    if not offered:
        raise Rejected(
            "bad_draft",
            "draft.ahead: this round did not follow a round that offered drafting ahead "
            "(ahead_max); draft after the round message",
        )
    count = msg["ahead"]
    if not 1 <= count <= tokens:
        raise Rejected("bad_draft", f"draft.ahead={count} must be in 1..{tokens} (the draft)")
    times = msg.get("ahead_compute_s")
    if not isinstance(times, list) or len(times) != count:
        raise Rejected(
            "bad_draft", f"draft.ahead_compute_s must list {count} times, one per ahead token"
        )
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
        raise Rejected("bad_draft", "draft.ahead_compute_s must hold numbers (seconds)")
    cumulative = tuple(float(t) for t in times)
    if not all(math.isfinite(t) and 0.0 <= t <= MAX_REPORTED_TIME_S for t in cumulative) or any(
        b < a for a, b in zip(cumulative, cumulative[1:], strict=False)
    ):
        raise Rejected(
            "bad_draft",
            "draft.ahead_compute_s must be cumulative seconds: non-decreasing, in "
            f"[0, {MAX_REPORTED_TIME_S:g}]",
        )
    guess = msg.get("ahead_guess", 0)
    if guess not in (0, 1):  # (an int: the message schema checked the type)
        raise Rejected("bad_draft", f"draft.ahead_guess={guess!r} must be 0 or 1")
    if guess and not whole_accepted:
        raise Rejected(
            "bad_draft",
            "draft.ahead_guess=1, but the previous draft was not accepted whole, so "
            "tokens drafted on that guess were dropped; report ahead_guess=0",
        )
    return cumulative, bool(guess)


def check_stream_token(msg: dict, expected_index: int, requested_length: int, kept: int) -> None:
    """One streamed ``token`` message, in order and of the run's PMF size (its values are
    checked with the whole draft, by :func:`parse_draft`, when the stream ends)."""
    if msg["index"] != expected_index:
        raise Rejected(
            "bad_draft",
            f"token.index={msg['index']}; the next token of this draft is index {expected_index} "
            "(tokens are streamed in order, from 0)",
        )
    if expected_index >= requested_length:
        raise Rejected(
            "bad_draft",
            f"token.index={expected_index} is beyond this round's draft_length {requested_length}",
        )
    for field, itemsize in (("q_indices", 4), ("q_values", 2)):
        if len(msg[field]) != kept * itemsize:
            raise Rejected(
                "bad_draft",
                f"token.{field} has {len(msg[field])} bytes; kept {kept} x {itemsize} = "
                f"{kept * itemsize} expected (use the server's --kept-vocab)",
            )


def stream_arrivals_s(compute_s: list[float], upload_per_token_s: float) -> np.ndarray:
    """Timeline arrival of each streamed token at the server: the uplink is a FIFO that
    sends token i once it is drafted (at ``compute_s[i]``, cumulative) and the previous one
    is through, so a_i = max(a_{i-1}, C_i) + u. With a constant drafting time d this is the
    simulator's d + u + (i - 1) max(d, u)."""
    times = np.asarray(compute_s, dtype=np.float64)
    if times.size and (
        not np.all(np.isfinite(times))
        or times.min() < 0
        or times.max() > MAX_REPORTED_TIME_S
        or np.any(np.diff(times) < 0)
    ):
        raise Rejected(
            "bad_draft",
            "token.compute_s must be finite, cumulative (non-decreasing) and in "
            f"[0, {MAX_REPORTED_TIME_S:g}] s",
        )
    arrivals = np.empty_like(times)
    previous = 0.0
    for i, finished in enumerate(times):
        previous = max(previous, finished) + upload_per_token_s
        arrivals[i] = previous
    return arrivals
