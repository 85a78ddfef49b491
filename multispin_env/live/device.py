"""A device: a drafter model behind a TCP connection to the edge server.

    python -m multispin_env.live.device --port 7400 --device-id dev0 --prompt 12,55,901 \\
        --speed-factor 1.3 --model multispin_env/live/models/demo-pair

Per round it drafts ``draft_length`` tokens with its own KV cache, then waits out its emulated
uplink (payload bits / (B_k r_k), the paper's Eq. 9) before sending the draft. Compute time
is measured as this process's CPU time (so it does not grow when devices share the host's
cores) times the device's speed factor; slower devices (factor > 1) also sleep the extra
time so that wall-clock behaves like the timeline.

The welcome carries a session secret: a device keeps it (in memory, and in
``--session-file`` if given, so a restarted process can rejoin) and sends it to rejoin. The
server pings between rounds; a device that hears nothing for ``--server-timeout-s`` says
"server gone" and exits non-zero, as it does when the server closes without a bye. Exit
codes: 0 after the server's bye or the end of its request, 2 when the server refuses the
device, 3 when the server is gone, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multispin_env.live import protocol as proto
from multispin_env.live.clock import compute_clock


@dataclass
class DeviceConfig:
    """One device.

    Attributes:
        device_id: stable name; reconnecting with the same id resumes the same user.
        prompt: prompt token ids (used on first join; on rejoin the server's record wins).
        speed_factor: compute slowdown vs this host (device heterogeneity, T^S_k).
        mean_gain: average channel gain H_bar_k reported to the server.
        model_dir: folder of the pair (its ``drafter/`` is loaded).
        greedy, temperature, kept_vocab: decoding settings (must match the server's).
        seed: seeds this device's draft sampling.
        time_scale: multiplies emulated sleeps (tests use < 1 to run faster).
        session: the session secret from a previous welcome (to rejoin); set on welcome.
        session_file: where the secret is kept across restarts of the process.
        auth_token: the deployment token, where the server requires one.
        server_timeout_s: silence after which the server is taken to be gone.
    """

    device_id: str
    prompt: list[int]
    host: str = "127.0.0.1"
    port: int = 7400
    speed_factor: float = 1.0
    mean_gain: float = 0.35
    model_dir: str | None = None
    greedy: bool = False
    temperature: float = 1.0
    kept_vocab: int = 1024
    seed: int = 0
    time_scale: float = 1.0
    prob_bits: int = 16
    hf_model: str | None = None  # a local Hugging Face model folder instead of model_dir
    device: str = "cpu"
    session: str | None = None
    session_file: str | None = None
    auth_token: str | None = None
    server_timeout_s: float = 30.0
    log: list = field(default_factory=list)


class ServerGone(ConnectionError):
    """The server closed without a bye or fell silent."""


class Refused(RuntimeError):
    """The server refused this device (its error reply says why)."""


async def run_device(cfg: DeviceConfig, drafter=None) -> list[int]:
    """Serve rounds until the server says bye or closes; returns the committed tokens."""
    import torch

    from multispin_env.live.models import load_drafter
    from multispin_env.live.speculative import DecodingConfig, DrafterSession, draft_uniforms

    torch.set_num_threads(1)
    if drafter is None and cfg.hf_model:
        from multispin_env.live.hf import load_hf_model

        drafter = load_hf_model(cfg.hf_model, device=cfg.device)
    elif drafter is None:
        drafter = load_drafter(cfg.model_dir, device=cfg.device)
    decoding = DecodingConfig(
        greedy=cfg.greedy, temperature=cfg.temperature, kept_vocab=cfg.kept_vocab
    )
    session = DrafterSession(drafter, decoding, np.random.default_rng(cfg.seed))
    clock = compute_clock(drafter)  # CPU time on a CPU: the other processes' load is not ours
    if not cfg.prompt:
        raise ValueError("the prompt needs at least one token")
    if cfg.session is None and cfg.session_file and Path(cfg.session_file).exists():
        cfg.session = Path(cfg.session_file).read_text().strip() or None
    try:
        reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
    except OSError as err:
        raise ServerGone(f"cannot reach the server at {cfg.host}:{cfg.port}: {err}") from err
    hello = {
        "device_id": cfg.device_id,
        "prompt": cfg.prompt,
        "speed_factor": cfg.speed_factor,
        "mean_gain": cfg.mean_gain,
    }
    if cfg.session:
        hello["session"] = cfg.session
    if cfg.auth_token:
        hello["auth"] = cfg.auth_token
    context = drafter.cfg.n_positions
    vocab = drafter.cfg.vocab_size
    committed: list[int] = []
    reading = None
    try:
        await proto.send_message(writer, proto.message("hello", **hello))
        welcome = await _next(reader, cfg)
        if welcome["type"] == "error":
            raise Refused(f"server refused {cfg.device_id!r}: {welcome['message']}")
        if welcome["type"] != "welcome":
            raise proto.ProtocolError(f"expected welcome, got {welcome['type']}")
        cfg.session = welcome["session"]
        if cfg.session_file:
            Path(cfg.session_file).write_text(cfg.session)
        committed = list(welcome["committed"])
        session.start(cfg.prompt + committed)
        inbox: asyncio.Queue = asyncio.Queue()
        reading = asyncio.create_task(_read_into(reader, cfg, inbox))
        last_round, ahead = None, None
        while True:
            if ahead is not None and ahead.open and inbox.empty():
                await _draft_ahead_token(session, ahead, clock, cfg)
                continue
            msg = await inbox.get()
            if isinstance(msg, BaseException):
                raise msg
            kind = msg["type"]
            if kind == "round":
                # the server keeps drafts within its context; a smaller drafter caps here
                room = context - len(cfg.prompt) - len(committed)
                length = min(msg["draft_length"], room)
                if length < 1:
                    cfg.log.append("drafter context full; leaving")
                    await proto.send_message(writer, proto.message("bye"))
                    break
                uniforms = None if cfg.greedy else draft_uniforms(msg["sample_seed"], length)
                stop = float(msg.get("stop_threshold", 0.0))
                if not 0.0 <= stop < 1.0:
                    cfg.log.append(f"ignored stop_threshold {stop}: not in [0, 1)")
                    stop = 0.0
                last_round = msg["round"]
                rate_bps = msg["bandwidth_hz"] * msg["spectral_eff"]
                ahead = _usable_ahead(session, ahead, msg, length, stop, cfg)
                if "deadline_s" in msg:
                    await _stream_draft(
                        session, msg, length, uniforms, stop, rate_bps, vocab, writer, cfg
                    )
                    continue
                t0 = clock()
                if ahead is None:
                    predrafted = 0
                    draft = session.propose(length, uniforms, stop)
                else:
                    predrafted = min(ahead.drafted, length)
                    draft = session.finish_ahead(length)
                compute_s = (clock() - t0) * cfg.speed_factor
                upload_s = draft.payload_bits(vocab, cfg.prob_bits) / max(rate_bps, 1e-9)
                extra = compute_s * (1 - 1 / cfg.speed_factor) if cfg.speed_factor > 1 else 0.0
                if "token_time_s" in msg:  # profile timing: the profile's clock, not ours
                    compute_s = (len(draft.tokens) - predrafted) * msg["token_time_s"]
                    upload_s = len(draft.tokens) * msg["upload_bits"] / max(rate_bps, 1e-9)
                    extra = compute_s
                fields = {}
                if predrafted:  # drafted before the round message: their own times
                    fields = {
                        "ahead": predrafted,
                        "ahead_compute_s": ahead.cumulative_s[:predrafted],
                        "ahead_guess": int(ahead.guess),
                    }
                await asyncio.sleep((extra + upload_s) * cfg.time_scale)
                await proto.send_message(
                    writer,
                    proto.message(
                        "draft",
                        round=msg["round"],
                        tokens=draft.tokens,
                        q_indices=draft.q_indices.tobytes(),
                        q_values=draft.q_values.tobytes(),
                        kept=int(draft.q_indices.shape[1]),
                        compute_s=compute_s,
                        upload_s=upload_s,
                        **fields,
                    ),
                )
                # the drafter's context after this draft and the guessed bonus token
                room = context - len(cfg.prompt) - len(committed) - len(draft.tokens) - 1
                ahead = _begin_ahead(session, msg, stop, clock, cfg, room)
            elif kind == "result":
                if msg["round"] != last_round:
                    cfg.log.append(f"ignored result for round {msg['round']}")
                    continue
                committed.extend(msg["committed"])
                if ahead is not None and not ahead.resolved:
                    ahead.resolved = True
                    if not session.resolve_ahead(msg["accepted"], msg["committed"]):
                        # the guess failed: ahead from the truth, within the context left
                        room = context - len(cfg.prompt) - len(committed)
                        if not ahead.restart(session, room):
                            ahead = None
                else:
                    session.commit(msg["accepted"], msg["committed"])
            elif kind == "error":
                cfg.log.append(f"server error {msg['code']}: {msg['message']}")
                if msg["code"] in ("unresponsive", "bad_frame", "too_slow"):
                    raise ServerGone(f"the server hung up: {msg['message']}")
            elif kind == "end":
                cfg.log.append(f"request ended: {msg['reason']}")
                await proto.send_message(writer, proto.message("bye"))
                break
            elif kind == "bye":
                break
    except asyncio.IncompleteReadError as err:
        raise ServerGone("the server closed the connection without a bye") from err
    except ConnectionResetError as err:
        raise ServerGone(f"the connection to the server was reset ({err})") from err
    finally:
        if reading is not None:
            reading.cancel()
        writer.close()
    return committed


@dataclass
class _Ahead:
    """A draft being drafted before its round message (proactive drafting).

    ``guess``: drafted on the guess that the previous draft is all accepted with the
    drafter's top token as bonus (False: on the committed context, after the result).
    ``resolved``: that draft's result has come. ``cumulative_s``: drafting time up to each
    ahead token (CPU time x speed factor, or the profile's time per token), reported so that
    the server counts only what fits in the wait on its timeline."""

    seed: int
    offered: int  # the round message's ahead_max
    max_tokens: int  # within the drafter's context
    uniforms: object
    guess: bool = True
    resolved: bool = False
    open: bool = True
    token_time_s: float | None = None
    carry_s: float = 0.0  # the guess's own forward, counted with the first ahead token
    cumulative_s: list = field(default_factory=list)

    @property
    def drafted(self) -> int:
        return len(self.cumulative_s)

    def restart(self, session, room: int) -> bool:
        """Draft ahead again, from the committed context (the result is in), at most
        ``room`` tokens (the drafter's context left); False when there is none."""
        self.max_tokens = min(self.offered, room)
        if self.max_tokens < 1:
            return False
        self.guess, self.open, self.carry_s, self.cumulative_s = False, True, 0.0, []
        session.begin(self.max_tokens, self.uniforms, 0.0)
        return True


def _begin_ahead(session, msg, stop, clock, cfg, room: int) -> _Ahead | None:
    """Start drafting the next draft while this one is verified, where the round message
    asks for it (``ahead_max``, with the next round's ``next_sample_seed``), at most
    ``room`` tokens: what the drafter's context has left after the draft and the guess."""
    offered = int(msg.get("ahead_max", 0))
    max_tokens = min(offered, room)
    if max_tokens < 1 or stop > 0 or "next_sample_seed" not in msg:
        return None
    from multispin_env.live.speculative import draft_uniforms

    seed = int(msg["next_sample_seed"])
    uniforms = None if cfg.greedy else draft_uniforms(seed, offered)
    t0 = clock()
    if not session.begin_ahead(max_tokens, uniforms):
        return None
    return _Ahead(
        seed,
        offered,
        max_tokens,
        uniforms,
        token_time_s=msg.get("token_time_s"),
        carry_s=(clock() - t0) * cfg.speed_factor,
    )


async def _draft_ahead_token(session, ahead: _Ahead, clock, cfg) -> None:
    """One ahead token, then a turn for the reader (a message may have come)."""
    t0 = clock()
    step = session.next_token()
    spent_s = (clock() - t0) * cfg.speed_factor
    if step is None:  # as far ahead as allowed
        ahead.open = False
        return
    token_s = ahead.token_time_s if ahead.token_time_s is not None else spent_s + ahead.carry_s
    ahead.carry_s = 0.0
    ahead.cumulative_s.append((ahead.cumulative_s[-1] if ahead.cumulative_s else 0.0) + token_s)
    extra = spent_s * (1 - 1 / cfg.speed_factor) if cfg.speed_factor > 1 else 0.0
    await asyncio.sleep(extra * cfg.time_scale)


def _usable_ahead(session, ahead: _Ahead | None, msg, length, stop, cfg) -> _Ahead | None:
    """The ahead draft if this round can take it as its start; else it is dropped (a guess
    whose result never came, another seed, an early stop, a deadline, a longer draft)."""
    if ahead is None:
        return None
    if not ahead.resolved:
        session.drop_ahead()
        return None
    usable = (
        (cfg.greedy or int(msg["sample_seed"]) == ahead.seed)
        and length <= ahead.max_tokens
        and stop == 0
        and "deadline_s" not in msg
    )
    if not usable:
        cfg.log.append(f"dropped {ahead.drafted} tokens drafted ahead for round {msg['round']}")
    return ahead if usable else None


async def _read_into(reader, cfg: DeviceConfig, inbox: asyncio.Queue) -> None:
    """Every message but pings into ``inbox``; the error that ends reading goes in last."""
    while True:
        try:
            msg = await _next(reader, cfg)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 (handed to the main loop to raise)
            inbox.put_nowait(err)
            return
        inbox.put_nowait(msg)


async def _stream_draft(session, msg, length, uniforms, stop, rate_bps, vocab, writer, cfg):
    """Draft token by token and stream each token with its PMF as soon as it is drafted.

    The emulated uplink is a FIFO: token i reaches the server at a_i = max(a_{i-1}, C_i) + u
    on the round's timeline (C_i: drafting time so far, u: one token's upload). A token
    that would arrive after the round's deadline is not sent, and drafting stops there.
    Wall clock follows the timeline: a sender task sends each token at its arrival time
    while drafting goes on."""
    deadline_s = float(msg["deadline_s"])
    index_bits = int(np.ceil(np.log2(vocab)))
    profiled = "token_time_s" in msg  # profile timing: the profile's clock, not ours
    clock = compute_clock(session.model)
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue: asyncio.Queue = asyncio.Queue()

    async def sender() -> None:
        while True:
            at, out = await queue.get()
            await asyncio.sleep(max(0.0, start + at * cfg.time_scale - loop.time()))
            await proto.send_message(writer, out)
            if out["type"] == "draft_end":
                return

    task = asyncio.create_task(sender())
    session.begin(length, uniforms, stop)
    compute_s, arrival_s, count, cut = 0.0, 0.0, 0, 0
    try:
        while True:
            t0 = clock()
            step = session.next_token()
            if step is None:
                if not profiled:  # the forward that measured the stop confidence
                    compute_s += (clock() - t0) * cfg.speed_factor
                break
            token, indices, values = step
            if profiled:
                compute_s += msg["token_time_s"]
                upload_s = msg["upload_bits"] / max(rate_bps, 1e-9)
            else:
                compute_s += (clock() - t0) * cfg.speed_factor
                upload_s = indices.shape[0] * (cfg.prob_bits + index_bits) / max(rate_bps, 1e-9)
            arrival = max(arrival_s, compute_s) + upload_s
            if arrival > deadline_s:
                cut = 1  # it would come too late: not sent, and drafting stops
                break
            arrival_s = arrival
            queue.put_nowait(
                (
                    arrival_s,
                    proto.message(
                        "token",
                        round=msg["round"],
                        index=count,
                        token=int(token),
                        q_indices=indices.tobytes(),
                        q_values=values.tobytes(),
                        compute_s=compute_s,
                    ),
                )
            )
            count += 1
            # a slower device (factor > 1) takes its extra drafting time on the wall clock
            await asyncio.sleep(max(0.0, start + compute_s * cfg.time_scale - loop.time()))
        session.end(keep=count)
        end = proto.message(
            "draft_end", round=msg["round"], count=count, compute_s=compute_s, cut=cut
        )
        queue.put_nowait((max(arrival_s, compute_s), end))
        await task
    finally:
        task.cancel()


async def _next(reader, cfg: DeviceConfig) -> dict:
    """The next message that is not a ping; ServerGone after ``server_timeout_s`` of silence."""
    while True:
        try:
            msg = await proto.read_message(
                reader, idle_timeout_s=cfg.server_timeout_s, frame_timeout_s=cfg.server_timeout_s
            )
        except asyncio.TimeoutError as err:
            raise ServerGone(f"no message from the server in {cfg.server_timeout_s:g} s") from err
        if msg["type"] != "ping":
            return msg


def _token_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        msg = f"--prompt must be comma-separated token ids: {err}"
        raise argparse.ArgumentTypeError(msg) from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError("--prompt needs at least one non-negative token id")
    return ids


def build_parser() -> argparse.ArgumentParser:
    from multispin_env.live.cli import at_least, positive_float

    p = argparse.ArgumentParser(
        prog="python -m multispin_env.live.device", description=__doc__.split("\n")[0]
    )
    p.add_argument("--host", default="127.0.0.1", help="the edge server's address")
    p.add_argument("--port", type=int, default=7400, help="the edge server's port")
    p.add_argument("--device-id", required=True, help="this user's name (1-64 characters)")
    p.add_argument("--prompt", required=True, type=_token_list, help="comma-separated token ids")
    p.add_argument(
        "--speed-factor",
        type=positive_float,
        default=1.0,
        help="compute slowdown vs this host (> 1: a slower device)",
    )
    p.add_argument(
        "--mean-gain", type=positive_float, default=0.35, help="average channel gain H_bar_k"
    )
    p.add_argument("--model", default=None, help="model pair folder (default: built-in pair)")
    p.add_argument("--greedy", action="store_true", help="argmax drafting (as the server)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    p.add_argument(
        "--kept-vocab", type=at_least(1), default=1024, help="probabilities uploaded per token"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds this device's draft sampling")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="multiplies emulated sleeps (tests: 0)"
    )
    p.add_argument("--hf-model", default=None, help="local Hugging Face drafter folder")
    p.add_argument("--device", default="cpu", help="torch device for the drafter")
    p.add_argument(
        "--session-file",
        default=None,
        help="file keeping the session secret, so a restarted device rejoins its session",
    )
    p.add_argument(
        "--auth-token",
        default=os.environ.get("MULTISPIN_AUTH_TOKEN"),
        help="deployment token, where the server requires one (default: $MULTISPIN_AUTH_TOKEN)",
    )
    p.add_argument(
        "--server-timeout-s",
        type=positive_float,
        default=30.0,
        help="silence from the server after which it is taken to be gone",
    )
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    cfg = DeviceConfig(
        device_id=a.device_id,
        prompt=a.prompt,
        host=a.host,
        port=a.port,
        speed_factor=a.speed_factor,
        mean_gain=a.mean_gain,
        model_dir=a.model,
        greedy=a.greedy,
        temperature=a.temperature,
        kept_vocab=a.kept_vocab,
        seed=a.seed,
        time_scale=a.time_scale,
        hf_model=a.hf_model,
        device=a.device,
        session_file=a.session_file,
        auth_token=a.auth_token,
        server_timeout_s=a.server_timeout_s,
    )
    try:
        asyncio.run(run_device(cfg))
    except KeyboardInterrupt:
        sys.exit(130)
    except Refused as err:
        print(f"device {cfg.device_id}: {err}", file=sys.stderr)
        sys.exit(2)
    except ServerGone as err:
        print(f"device {cfg.device_id}: server gone: {err}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, proto.ProtocolError) as err:  # bad model folder, prompt, message
        print(f"device {cfg.device_id}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
