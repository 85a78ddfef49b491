"""The edge server: accepts device connections, schedules, verifies in batches, commits.

One asyncio process. Every round (:meth:`EdgeServer.play_round`) it:

1. draws each connected user's channel (Rayleigh block fading around the gain the device
   reported; the channel constants come from a scenario preset) and forms the server's view;
2. asks the scheduler for its decision: (L_k, B_k) and, under an extended protocol, the
   levers (stop thresholds, a deadline, groups);
3. hands the round to its protocol piece (:mod:`multispin_env.live.rounds`: synchronous,
   deadline, pipelined groups), which plays the message flow with the shared parts below:
   ``open_round`` and ``send_round`` (the ``round`` messages), ``collect`` (drafts or
   streamed tokens until all are in or ``round_timeout_s`` passes: a device that is late or
   disconnected is dropped from the round; it may send again next round, or rejoin) and
   ``verify_and_reply`` (every draft in ONE batched verifier forward, the acceptance rule,
   the results);
4. updates the history the schedulers read and appends one JSON line to the trace.

The server is the single source of truth for each user's committed tokens (``outputs``): a
device that reconnects with the same ``device_id`` *and the session secret from its welcome*
is sent them and resumes from there, so nothing accepted is lost or duplicated; a hello that
names a taken id without the secret is refused (it would otherwise read and take over that
user's session).

One bad peer affects only itself. Malformed messages, out-of-order drafts and well-formed
messages with bad values (token ids, draft sizes, times, gains; see
:mod:`multispin_env.live.validation`) get an ``error`` reply and are not applied; a rejected
draft counts as that user's (empty) answer for the round, so the others do not wait for it.
A connection must say hello within ``hello_timeout_s``, a started frame must arrive within
``frame_timeout_s``, frames are capped (small before hello), connections are capped, and a
device that misses ``max_missed_rounds`` rounds in a row is disconnected, so a silent or
trickling peer cannot stall the rounds or hold memory. A user whose text reaches the
verifier's context limit gets its drafts shortened to fit, then an ``end`` message; the others
go on. A device that says bye frees its slot at once; one that vanishes keeps its slot for
``rejoin_grace_s``. Where ``auth_token`` is set, every hello must carry it (required when the
server listens on a non-loopback address).

Time is reported twice: on a *timeline* built from the devices' measured compute (CPU time
x speed factor), the emulated uplink delays and the verification's CPU time on a CPU
verifier (:mod:`multispin_env.live.clock`), which do not depend on how the devices and the
server share this host's cores; and as wall-clock. With
``timing="profile:PRESET"`` the timeline takes drafting, verification and payload times
from the preset instead (:mod:`multispin_env.live.timing`). The summary reports how much of
the timeline the verifier is busy and each device is idle (the overlaps the extended
protocols buy).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multispin_env.action_codec import ProtocolLevers
from multispin_env.config import load_preset
from multispin_env.episodes import ServerView
from multispin_env.live import protocol as proto
from multispin_env.live.clock import compute_clock
from multispin_env.live.rounds import Answer, Assignment, Played, make_round_protocol
from multispin_env.live.scheduler import BundleScheduler, OnlineVerificationModel
from multispin_env.live.speculative import DecodingConfig, VerifierServer, draft_uniforms
from multispin_env.live.timing import load_profile, parse_timing, planning_verification
from multispin_env.live.validation import (
    MAX_REPORTED_TIME_S,
    Rejected,
    RunLimits,
    check_hello,
    check_stream_token,
    parse_ahead,
    parse_draft,
    stream_arrivals_s,
)
from multispin_env.observation import ObservationSpec, UserHistory, build_observation
from multispin_env.physics import spectral_efficiency
from multispin_env.protocols import resolve_levers
from multispin_env.types import Decision

# why a request is over for good (a rejoin is refused), with the text the refusal gives
FINISHED = {
    "context_full": "the verifier's context is full",
    "end_of_text": "its answer is complete",
}


@dataclass
class LiveConfig:
    """Server settings.

    Attributes:
        max_users: user slots (devices beyond this are refused).
        scenario: preset supplying channel constants (tx power, noise, total bandwidth).
        bandwidth_hz: total uplink bandwidth (default: the scenario's).
        max_draft_length: L_max for the scheduler (kept small: the verifier's context is 512).
        round_timeout_s: wall-clock deadline for drafts; late devices are dropped that round.
        alpha_prior: acceptance assumed for users with no history yet (default: the mean of
            the scenario's task acceptance rates, as the simulator's prior).
        greedy, temperature, kept_vocab: decoding (devices must use the same).
        csi_error_std: channel estimation error the scheduler sees (as in the simulator).
        trace_path: JSONL file, one line per round (None: no trace).
        seed: seeds channels and the verifier's sampling.
        t_ref_s, horizon_s: observation normalisation and episode clock for schedulers that
            read the env's observation vector (default: the scenario's drafting latency).
        hello_timeout_s: a new connection must say hello within this time.
        frame_timeout_s: a frame, once started, must arrive whole within this time.
        max_connections: open connections at once, hello or not (default 2 x max_users + 4).
        max_missed_rounds: a connected device that misses this many rounds in a row is
            disconnected (it may rejoin), so a silent device stalls at most that many rounds.
        rejoin_grace_s: how long a device that vanished without bye keeps its slot.
        heartbeat_s: the server pings every device this often, so devices can tell a slow
            round from a dead server.
        send_timeout_s: a message to a device must leave the server's buffer within this
            time; a device that stops reading is disconnected instead of stalling the round.
        auth_token: deployment token every hello must carry (None: no token; required when
            listening on a non-loopback address).
        early_stop, streaming_deadline, pipeline_groups: the round protocol, as the
            simulator's switches (:mod:`multispin_env.live.rounds`).
        proactive_drafting: pipelined groups only: devices draft their next draft while
            their draft is verified (SpecEdge), as the simulator's ``proactive_drafting``;
            only the ahead tokens that fit in the wait on the timeline come for free.
        timing: ``measured`` (this host's times) or ``profile:PRESET`` (drafting,
            verification and payload from a preset; :mod:`multispin_env.live.timing`).
        verification_law: under measured timing, the verification law the schedulers plan
            with: ``online`` (fitted to this run's batches as it goes), ``scenario`` (the
            scenario's law, as the simulator's server view) or a JSON file
            (:func:`~multispin_env.live.timing.planning_verification`). A profile's law is
            always the profile's.
        end_token: the pair's end-of-text token (a chat model's end of turn): a request
            whose committed text contains it ends before the next round (reason
            ``end_of_text``), so no tokens past the answer are drafted or counted.
            None: requests end only when the context is full.
    """

    max_users: int = 8
    scenario: str = "paper-llama2"
    bandwidth_hz: float | None = None
    max_draft_length: int = 8
    round_timeout_s: float = 10.0
    alpha_prior: float | None = None
    greedy: bool = False
    temperature: float = 1.0
    kept_vocab: int = 1024
    csi_error_std: float = 0.0
    end_token: int | None = None
    trace_path: str | None = None
    seed: int = 0
    t_ref_s: float | None = None
    horizon_s: float = 30.0
    hello_timeout_s: float = 5.0
    frame_timeout_s: float = 10.0
    max_connections: int | None = None
    max_missed_rounds: int = 2
    rejoin_grace_s: float = 30.0
    heartbeat_s: float = 2.0
    send_timeout_s: float = 2.0
    auth_token: str | None = None
    early_stop: bool = False
    streaming_deadline: bool = False
    pipeline_groups: int = 1
    proactive_drafting: bool = False
    timing: str = "measured"
    verification_law: str = "online"

    def __post_init__(self) -> None:
        try:
            parse_timing(self.timing)
        except ValueError as err:
            raise ValueError(f"LiveConfig.timing: {err}") from None
        positive = (
            "round_timeout_s",
            "hello_timeout_s",
            "frame_timeout_s",
            "heartbeat_s",
            "send_timeout_s",
            "temperature",
            "horizon_s",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"LiveConfig.{name}={value!r} must be a finite number > 0")
        for name in ("max_users", "max_draft_length", "kept_vocab", "max_missed_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LiveConfig.{name}={value!r} must be an integer >= 1")
        if self.rejoin_grace_s < 0:
            raise ValueError(f"LiveConfig.rejoin_grace_s={self.rejoin_grace_s} must be >= 0")
        if isinstance(self.pipeline_groups, bool) or not 1 <= self.pipeline_groups <= 8:
            raise ValueError(
                f"LiveConfig.pipeline_groups={self.pipeline_groups!r} must be an integer in 1..8"
            )
        if self.streaming_deadline and self.pipeline_groups > 1:
            raise ValueError(
                "LiveConfig: streaming_deadline and pipeline_groups > 1 do not combine (as in "
                "the simulator); pick one"
            )
        if self.proactive_drafting and (self.pipeline_groups < 2 or self.early_stop):
            raise ValueError(
                "LiveConfig.proactive_drafting needs pipelined groups (pipeline_groups >= 2) "
                "without early stop: a device drafts ahead while another group works"
            )
        if self.auth_token is not None and len(self.auth_token) < 8:
            raise ValueError("LiveConfig.auth_token must have at least 8 characters")


@dataclass
class _User:
    slot: int
    device_id: str
    mean_gain: float
    speed_factor: float
    session: str
    prompt_len: int
    writer: asyncio.StreamWriter | None = None
    t_draft_est_s: float = 2e-3
    ended: bool = False  # said bye or finished its request: the slot is free
    end_reason: str | None = None
    disconnected_at: float | None = None
    missed_rounds: int = 0


@dataclass
class RoundRecord:
    round: int
    users: list
    verify_s: float
    timeline_s: float
    wall_s: float
    dropped: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    protocol: str = "sync"
    phases: list = field(default_factory=list)  # pipelined groups: one entry per phase
    # every batched verification of the round: users, longest draft, the measured (CPU)
    # seconds, the timeline's (the profile's under profile timing) and the wall clock's:
    # what `multispin end-to-end` fits the verification law to
    batches: list = field(default_factory=list)


class EdgeServer:
    def __init__(self, cfg: LiveConfig, verifier, scheduler, vocab_size: int) -> None:
        self.cfg = cfg
        self.scenario = load_preset(cfg.scenario)
        self.bandwidth_hz = cfg.bandwidth_hz or self.scenario.bandwidth_hz
        self.decoding = DecodingConfig(cfg.greedy, cfg.temperature, cfg.kept_vocab)
        self.verifier = VerifierServer(verifier, self.decoding, np.random.default_rng(cfg.seed))
        self.scheduler = scheduler
        if isinstance(scheduler, BundleScheduler):  # a policy runs in its own protocol only
            scheduler.check_protocol(cfg.early_stop, cfg.streaming_deadline, cfg.pipeline_groups)
        self.round_protocol = make_round_protocol(cfg.streaming_deadline, cfg.pipeline_groups)
        self.vocab_size = vocab_size
        self.payload_bits = min(cfg.kept_vocab, vocab_size) * (
            16 + int(np.ceil(np.log2(vocab_size)))
        )
        # profile timing (live.timing): drafting, verification and payload from a preset
        self.profile = None if cfg.timing == "measured" else load_profile(parse_timing(cfg.timing))
        if self.profile is not None:
            self.payload_bits = int(self.profile.payload_bits)
        self.verify_wall_s = 0.0  # measured verification time (the timeline may use a profile)
        self._clock = compute_clock(verifier)  # CPU time on a CPU (live.clock)
        self._batches: list[dict] = []  # this round's verifications, for its record
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.users: dict[str, _User] = {}
        self.history = UserHistory(1, cfg.max_users)
        if cfg.alpha_prior is None:
            self.alpha_prior = float(np.mean([t.alpha_mean for t in self.scenario.tasks]))
        else:
            self.alpha_prior = cfg.alpha_prior
        self.history.reset(np.full((1, cfg.max_users), self.alpha_prior))
        if self.profile is not None:
            self.verification = self.profile.verification_model  # the profile's law, exactly
        else:
            known = planning_verification(cfg.verification_law, self.scenario)
            self.verification = OnlineVerificationModel() if known is None else known
        self.records: list[RoundRecord] = []
        # the latest errors (bounded: a peer can make the server write one per message)
        self.protocol_errors: collections.deque[str] = collections.deque(maxlen=1000)
        self.protocol_error_count = 0
        self.sample_rng = np.random.default_rng(cfg.seed + 2)  # per-round draft seeds
        self._sample_seeds: dict[str, int] = {}
        # proactive drafting: each user's next seed, announced with its round message, and
        # the users whose last round message offered drafting ahead
        self._next_seeds: dict[str, int] = {}
        self._ahead_offered: set[str] = set()
        self._may_ahead: set[str] = set()
        self._whole_accepted: dict[str, bool] = {}
        kept = min(cfg.kept_vocab, vocab_size)
        self.limits = RunLimits(vocab_size, int(verifier.cfg.n_positions), kept)
        # frame caps: a hello carries a prompt; a draft at most L_max tokens with their PMFs
        self.max_hello_bytes = 16 * self.limits.context_tokens + 4096
        # (generous: a frame over it is not skipped but ends the connection)
        self.max_frame_bytes = max(1 << 20, cfg.max_draft_length * (kept * 6 + 16) + 4096)
        self.max_connections = cfg.max_connections or 2 * cfg.max_users + 4
        self._round = -1
        self._expected: set[str] = set()
        self._open: dict[str, Assignment] = {}
        self._streams: dict[str, list] = {}
        self._requested: dict[str, int] = {}
        self._inbox: dict = {}
        self._rejected: set[str] = set()
        self._arrived = asyncio.Event()
        self._server = None
        self._heartbeat = None
        self._connections: set = set()  # server-side stream writers of open connections
        self.port = None

    # ---------------------------------------------------------------- connections
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        if not _is_loopback(host) and not self.cfg.auth_token:
            raise ValueError(
                f"listening on {host!r} (not loopback) needs a deployment token: pass "
                "--auth-token or set MULTISPIN_AUTH_TOKEN, and give the devices the same"
            )
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._heartbeat = asyncio.create_task(self._ping_loop())
        return self.port

    async def _ping_loop(self) -> None:
        ping = proto.encode(proto.message("ping"))
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            for user in self.connected:
                # write() only queues: a device that never reads is dropped by missed rounds
                if not user.writer.is_closing():
                    user.writer.write(ping)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Say bye to every device, let their connections end, then close the server."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for user in self.users.values():
            if user.writer is not None:
                await self._send(user.writer, proto.message("bye"))
        deadline = time.perf_counter() + grace_s
        while self.connected and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)  # devices close their side after bye
        for writer in list(self._connections):  # devices that did not leave in time
            writer.close()
        if self._server is not None:
            self._server.close()
            # Python >= 3.12 waits here until every connection is closed (hence the closes
            # above and in _handle); the timeout keeps a stuck transport from hanging stop()
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout=grace_s)
            except asyncio.TimeoutError:
                pass

    @property
    def connected(self) -> list[_User]:
        return sorted(
            (u for u in self.users.values() if u.writer is not None), key=lambda u: u.slot
        )

    def _slot_taken(self, user: _User, now: float) -> bool:
        if user.ended:
            return False
        if user.writer is not None or user.disconnected_at is None:
            return True
        return now - user.disconnected_at < self.cfg.rejoin_grace_s

    def _free_slot(self, prefer: int | None = None) -> int | None:
        now = time.monotonic()
        used = {u.slot for u in self.users.values() if self._slot_taken(u, now)}
        if prefer is not None and prefer not in used:
            return prefer
        free = [s for s in range(self.cfg.max_users) if s not in used]
        return free[0] if free else None

    async def _send(self, writer, msg: dict) -> bool:
        """Send one message; a peer that does not read within ``send_timeout_s`` is cut off
        (its connection aborted) rather than stalling the caller. False if not sent."""
        if writer is None:
            return False
        try:
            writer.write(proto.encode(msg))
            await asyncio.wait_for(writer.drain(), self.cfg.send_timeout_s)
            return True
        except asyncio.TimeoutError:
            writer.transport.abort()
            return False
        except (ConnectionError, RuntimeError):
            return False

    async def _reply_error(self, writer, code: str, text: str, who: str = "?") -> None:
        text = text if len(text) <= 500 else text[:497] + "..."
        self.protocol_error_count += 1
        self.protocol_errors.append(f"{proto.short(who)}: {code}: {text}")
        await self._send(writer, proto.message("error", code=code, message=text))

    def _disconnect(self, user: _User, writer) -> None:
        if user.writer is writer:
            user.writer = None  # dropped from rounds, record kept
            user.disconnected_at = time.monotonic()
            self._expected.discard(user.device_id)
            self._check_arrived()

    async def _handle(self, reader, writer) -> None:
        user = None
        if len(self._connections) >= self.max_connections:
            await self._reply_error(
                writer, "busy", f"the server has {self.max_connections} open connections"
            )
            writer.close()
            return
        self._connections.add(writer)
        try:
            user = await self._hello(reader, writer)
            if user is None:
                return
            while True:
                try:
                    msg = await proto.read_message(
                        reader, self.max_frame_bytes, frame_timeout_s=self.cfg.frame_timeout_s
                    )
                except proto.FrameError as err:  # the stream is out of step: hang up
                    await self._reply_error(writer, "bad_frame", str(err), user.device_id)
                    break
                except proto.ProtocolError as err:
                    await self._reply_error(writer, "bad_message", str(err), user.device_id)
                    continue
                if user.writer is not writer:
                    break  # the session rejoined on another connection
                if msg["type"] == "draft":
                    await self._receive_draft(user, msg, writer)
                elif msg["type"] == "token":
                    await self._receive_token(user, msg, writer)
                elif msg["type"] == "draft_end":
                    await self._receive_draft_end(user, msg, writer)
                elif msg["type"] == "bye":
                    user.ended = True  # frees the slot
                    user.end_reason = user.end_reason or "bye"
                    break
                else:
                    await self._reply_error(
                        writer, "unexpected", f"{msg['type']} from a device", user.device_id
                    )
        except asyncio.TimeoutError:
            who = user.device_id if user else "?"
            await self._reply_error(
                writer, "too_slow", "a frame did not arrive whole in time; closing", who
            )
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the device left, or the server is shutting down
        except Exception as err:  # noqa: BLE001 - a bug here must cost only this connection
            who = user.device_id if user else "?"
            await self._reply_error(writer, "internal", f"{type(err).__name__}; closing", who)
        finally:
            # close our side too: a peer's EOF alone leaves the transport half-open, and on
            # Python >= 3.12 Server.wait_closed() waits for it (stop() hung there)
            writer.close()
            self._connections.discard(writer)
            if user is not None:
                self._disconnect(user, writer)

    async def _hello(self, reader, writer) -> _User | None:
        """Read and check the hello, register or resume the session, send the welcome."""
        try:
            hello = await proto.read_message(
                reader,
                self.max_hello_bytes,
                idle_timeout_s=self.cfg.hello_timeout_s,
                frame_timeout_s=self.cfg.hello_timeout_s,
            )
        except asyncio.TimeoutError:
            await self._reply_error(
                writer, "hello_timeout", f"no hello within {self.cfg.hello_timeout_s:g} s"
            )
            return None
        except proto.ProtocolError as err:
            await self._reply_error(writer, "bad_message", str(err))
            return None
        if hello["type"] != "hello":
            await self._reply_error(writer, "expected_hello", f"got {hello['type']}")
            return None
        device_id = hello["device_id"]
        token = self.cfg.auth_token
        if token and not hmac.compare_digest(hello.get("auth", "").encode(), token.encode()):
            await self._reply_error(
                writer, "unauthorized", "hello.auth does not match the deployment token"
            )
            return None
        try:
            check_hello(hello, self.limits)
            user = self._register(hello, writer)
        except Rejected as err:
            await self._reply_error(writer, err.code, str(err), device_id)
            return None
        await self._send(
            writer,
            proto.message(
                "welcome",
                user_id=user.slot,
                session=user.session,
                committed=list(self.verifier.outputs[user.device_id]),
            ),
        )
        return user

    def _register(self, hello: dict, writer) -> _User:
        device_id = hello["device_id"]
        user = self.users.get(device_id)
        if user is None:
            slot = self._free_slot()
            if slot is None:
                raise Rejected("full", f"all {self.cfg.max_users} slots taken")
            user = _User(
                slot,
                device_id,
                float(hello["mean_gain"]),
                float(hello["speed_factor"]),
                session=secrets.token_hex(16),
                prompt_len=len(hello["prompt"]),
            )
            if self.profile is not None:
                user.t_draft_est_s = self.token_time_s(user)
            self.users[device_id] = user
            self.verifier.add_user(device_id, list(hello["prompt"]))
            self.history.reset_users(slot, self.alpha_prior)
        else:
            if not hmac.compare_digest(hello.get("session", "").encode(), user.session.encode()):
                raise Rejected(
                    "session_taken",
                    f"device id {device_id!r} belongs to another session; to rejoin, send the "
                    "session secret from its welcome, or pick a new device id",
                )
            if user.end_reason in FINISHED:
                raise Rejected("ended", f"this request is over: {FINISHED[user.end_reason]}")
            slot = (
                self._free_slot(prefer=user.slot)
                if not self._slot_taken(user, time.monotonic())
                else user.slot
            )
            if slot is None:
                raise Rejected("full", f"all {self.cfg.max_users} slots taken")
            if slot != user.slot:
                user.slot = slot
                self.history.reset_users(slot, self.alpha_prior)
            if user.writer is not None:  # the same session on a new connection wins
                user.writer.close()
            # a draft of the old connection still waiting for verification is dropped: the
            # welcome carries only what is committed, and the device drafts again from there
            self.round_protocol.discard(device_id)
            # (its announced seed stays: a round of it may be open; a fresh device has
            # nothing drafted ahead, and it may not claim what was offered to the old one)
            self._ahead_offered.discard(device_id)
            user.ended, user.end_reason = False, None
        user.writer, user.disconnected_at, user.missed_rounds = writer, None, 0
        return user

    async def _admit(self, user: _User, msg: dict, writer, streamed: bool) -> bool:
        """Is this draft (or streamed token) for the open round, from a device expected in
        it that has not answered yet, in the round's mode? Replies the error if not."""
        device_id = user.device_id
        if msg["round"] != self._round:
            what = f"{msg['type']} for round {msg['round']} while round {self._round} is open"
            await self._reply_error(writer, "out_of_order", f"{what}; not applied", device_id)
            return False
        if device_id in self._inbox or device_id in self._rejected:
            await self._reply_error(
                writer, "duplicate", f"a second draft for round {self._round}", device_id
            )
            return False
        if device_id not in self._expected:
            await self._reply_error(
                writer,
                "out_of_order",
                f"round {self._round} is closed for this device (late, or not scheduled in it)",
                device_id,
            )
            return False
        if streamed != self.round_protocol.streams:
            want = "token + draft_end messages" if self.round_protocol.streams else "one draft"
            self._rejected.add(device_id)
            await self._reply_error(
                writer,
                "bad_draft",
                f"{msg['type']} in a {self.round_protocol.name} round, which takes {want} "
                f"(round {self._round})",
                device_id,
            )
            self._check_arrived()
            return False
        return True

    def _check_arrived(self) -> None:
        if self._expected <= set(self._inbox) | self._rejected:
            self._arrived.set()

    async def _reject(self, user: _User, writer, err: Rejected) -> None:
        # its answer for this round is "nothing": the others need not wait for it
        self._rejected.add(user.device_id)
        self._streams.pop(user.device_id, None)
        self._whole_accepted[user.device_id] = False  # nothing of it was accepted
        await self._reply_error(writer, err.code, f"{err} (round {self._round})", user.device_id)
        self._check_arrived()

    async def _receive_draft(self, user: _User, msg: dict, writer) -> None:
        if not await self._admit(user, msg, writer, streamed=False):
            return
        device_id = user.device_id
        try:
            uniforms = None
            if not self.decoding.greedy:  # sampling: the tokens must be the seed's draws
                uniforms = draft_uniforms(self._sample_seeds[device_id], len(msg["tokens"]))
            draft = parse_draft(msg, self._requested[device_id], self.limits, uniforms)
            ahead_s, ahead_guess = parse_ahead(
                msg,
                len(draft.tokens),
                offered=device_id in self._may_ahead,
                whole_accepted=self._whole_accepted.get(device_id, False),
            )
        except Rejected as err:
            await self._reject(user, writer, err)
            return
        compute_s, upload_s = float(msg["compute_s"]), float(msg["upload_s"])
        self._inbox[device_id] = Answer(
            draft,
            compute_s,
            upload_s,
            compute_s + upload_s,
            round=self._round,
            tokens_drafted=len(draft.tokens),
            ahead_s=ahead_s,
            ahead_guess=ahead_guess,
            drafting_s=compute_s + (ahead_s[-1] if ahead_s else 0.0),
        )
        self._check_arrived()

    async def _receive_token(self, user: _User, msg: dict, writer) -> None:
        """One streamed token: kept until the stream's draft_end (values checked there)."""
        if not await self._admit(user, msg, writer, streamed=True):
            return
        stream = self._streams.setdefault(user.device_id, [])
        try:
            check_stream_token(msg, len(stream), self._requested[user.device_id], self.limits.kept)
        except Rejected as err:
            await self._reject(user, writer, err)
            return
        stream.append(msg)

    async def _receive_draft_end(self, user: _User, msg: dict, writer) -> None:
        """The end of a streamed draft: check it whole, keep the prefix that reached the
        server by the deadline on the round's timeline."""
        if not await self._admit(user, msg, writer, streamed=True):
            return
        device_id = user.device_id
        stream = self._streams.pop(device_id, [])
        a = self._open[device_id]
        try:
            if msg["count"] != len(stream):
                raise Rejected(
                    "bad_draft",
                    f"draft_end.count={msg['count']} but {len(stream)} tokens were streamed",
                )
            if msg["cut"] not in (0, 1):
                raise Rejected("bad_draft", f"draft_end.cut={msg['cut']} must be 0 or 1")
            if not stream and not msg["cut"]:
                raise Rejected(
                    "bad_draft",
                    "draft_end.count=0 with cut=0: stream at least one token, or say cut=1 "
                    "when the deadline left no time for one",
                )
            compute_s = float(msg["compute_s"])
            times = [float(t["compute_s"]) for t in stream]
            if not (np.isfinite(compute_s) and 0 <= compute_s <= MAX_REPORTED_TIME_S) or (
                times and compute_s < times[-1]
            ):
                raise Rejected(
                    "bad_draft",
                    f"draft_end.compute_s={compute_s!r} must be in [0, {MAX_REPORTED_TIME_S:g}] "
                    "s and at least the last token's compute_s",
                )
            rate_bps = max(a.bandwidth_hz * a.spectral_eff, 1e-9)
            per_token_s = self.payload_bits / rate_bps
            arrivals = stream_arrivals_s(times, per_token_s)
            deadline = np.inf if a.deadline_s is None else a.deadline_s
            kept = int(np.sum(arrivals <= deadline * (1 + 1e-9)))  # the rest came too late
            cut = bool(msg["cut"]) or kept < len(stream)
            draft = None
            if kept:
                whole = {
                    "tokens": [t["token"] for t in stream[:kept]],
                    "q_indices": b"".join(t["q_indices"] for t in stream[:kept]),
                    "q_values": b"".join(t["q_values"] for t in stream[:kept]),
                    "kept": self.limits.kept,
                    "compute_s": compute_s,
                    "upload_s": kept * per_token_s,
                }
                uniforms = None
                if not self.decoding.greedy:
                    uniforms = draft_uniforms(self._sample_seeds[device_id], kept)
                draft = parse_draft(whole, self._requested[device_id], self.limits, uniforms)
        except Rejected as err:
            await self._reject(user, writer, err)
            return
        finish_s = deadline if cut or not kept else float(arrivals[kept - 1])
        self._inbox[device_id] = Answer(
            draft,
            compute_s,
            kept * per_token_s,
            finish_s,
            cut=cut,
            round=self._round,
            tokens_drafted=len(stream) + int(bool(msg["cut"])),
        )
        self._check_arrived()

    async def wait_for_users(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.perf_counter() + timeout_s
        while len(self.connected) < count:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {len(self.connected)} of {count} devices connected")
            await asyncio.sleep(0.05)

    # ---------------------------------------------------------------- rounds
    def _view(self, users: list[_User], r_est: np.ndarray) -> ServerView:
        slots = [u.slot for u in users]
        alpha_hat = self.history.alpha_hat[:, slots]
        return ServerView(
            spectral_eff_est=r_est[None, :],
            t_draft_s=np.array([[u.t_draft_est_s for u in users]]),
            alpha_prior=np.full((1, len(users)), self.alpha_prior),
            alpha_hat=alpha_hat,
            payload_bits=float(self.payload_bits),
            bandwidth_hz=self.bandwidth_hz,
            max_draft_length=self.cfg.max_draft_length,
            verification=self.verification,
            oracle_alpha=None,
            oracle_spectral_eff=None,
            early_stop=self.cfg.early_stop,
            streaming_deadline=self.cfg.streaming_deadline,
            pipeline_groups=self.cfg.pipeline_groups,
        )

    def _observation_spec(self) -> ObservationSpec:
        return ObservationSpec(
            max_users=self.cfg.max_users,
            max_draft_length=self.cfg.max_draft_length,
            t_ref_s=self.cfg.t_ref_s or self.scenario.t_draft_mean_s,
            payload_bits=float(self.payload_bits),
            bandwidth_hz=self.bandwidth_hz,
            observe_base=getattr(self.scheduler, "base", None) is not None,
            levers=ProtocolLevers.of(self.cfg),  # LiveConfig names the switches as the scenario
        )

    def observation(self, users: list[_User], r_est: np.ndarray, base=None) -> np.ndarray:
        """The env's observation vector ``(1, size)`` for the connected users, built by the
        same builder and history as in simulation (users fill slots 0..K-1 in slot order).
        ``base``: the base heuristic's :class:`~multispin_env.types.Decision`. No device
        With proactive drafting, ``predrafted`` is the ahead tokens that came free in the
        user's last draft (the server learns the current count only with the draft)."""
        spec = self._observation_spec()
        protocol = None
        if spec.levers.any:
            free = [self.round_protocol.predrafted(u.device_id) for u in users]
            protocol = {"predrafted": np.array([free], dtype=np.float64)}
            if base is not None:
                protocol |= {
                    "base_stop": base.stop_threshold,
                    "base_group": base.group,
                    "base_deadline": base.deadline_s,
                }
        elapsed = sum(r.timeline_s for r in self.records)
        horizon_frac = (elapsed % self.cfg.horizon_s) / self.cfg.horizon_s
        return build_observation(
            spec,
            self.history.columns([u.slot for u in users]),
            r_est[None, :],
            np.array([[u.t_draft_est_s for u in users]]),
            np.full((1, len(users)), self.alpha_prior),
            np.array([horizon_frac]),
            base_lengths=None if base is None else base.draft_lengths,
            base_bandwidth_hz=None if base is None else base.bandwidth_hz,
            protocol=protocol,
        )

    def context_room(self, user: _User) -> int:
        """Draft tokens that still fit in the verifier's context for this user, counting a
        draft still waiting for verification (pipelining) as if all of it and its bonus
        token were committed."""
        used = user.prompt_len + len(self.verifier.outputs[user.device_id])
        used += self.round_protocol.pending_tokens(user.device_id)
        return self.limits.context_tokens - used

    async def _end_request(self, user: _User, reason: str) -> None:
        user.ended, user.end_reason = True, reason
        await self._send(user.writer, proto.message("end", reason=reason))

    # ------------------------------------------------------------ shared round parts
    def open_round(self, assignments: list[Assignment]) -> int:
        """Open a wire round for these users: from now on their drafts (or streamed tokens)
        for it are accepted. The whole round is expected before the first send yields: a
        device that leaves (or answers) while others are still sent to must not end it."""
        self._round += 1
        self._inbox, self._rejected, self._arrived = {}, set(), asyncio.Event()
        self._streams = {}
        self._open = {a.device_id: a for a in assignments}
        self._expected = set(self._open)
        self._requested = {a.device_id: a.draft_length for a in assignments}
        seeds = self.sample_rng.integers(0, 2**62, size=len(assignments))
        self._sample_seeds = {a.device_id: int(x) for a, x in zip(assignments, seeds, strict=True)}
        ids = list(self._open)
        self._may_ahead = self._ahead_offered & set(ids)
        self._ahead_offered -= set(ids)
        if self.cfg.proactive_drafting:  # the seed announced last round, and the next one
            nexts = self.sample_rng.integers(0, 2**62, size=len(ids))
            for device_id, x in zip(ids, nexts, strict=True):
                if device_id in self._next_seeds:
                    self._sample_seeds[device_id] = self._next_seeds[device_id]
                self._next_seeds[device_id] = int(x)
        self._check_arrived()  # a round nobody is in is over at once
        return self._round

    def token_time_s(self, user: _User) -> float:
        """Profile timing: the user's drafting seconds per token (the profile's mean times the
        device's speed factor, as the simulator's per-user T^S_k)."""
        return float(self.profile.t_draft_mean_s * user.speed_factor)

    async def send_round(self, a: Assignment) -> None:
        """The ``round`` message of one user (not expected any more if it cannot be sent)."""
        fields = {}
        if self.profile is not None:
            fields["token_time_s"] = self.token_time_s(a.user)
            fields["upload_bits"] = int(self.payload_bits)
        if a.stop_threshold > 0:
            fields["stop_threshold"] = float(a.stop_threshold)
        if a.deadline_s is not None:  # (clamped to a reportable time in _assign)
            fields["deadline_s"] = float(a.deadline_s)
        if self.cfg.proactive_drafting:
            fields["ahead_max"] = int(self.cfg.max_draft_length)
            fields["next_sample_seed"] = self._next_seeds[a.device_id]
        sent = await self._send(
            a.user.writer,
            proto.message(
                "round",
                round=self._round,
                draft_length=int(a.draft_length),
                bandwidth_hz=float(a.bandwidth_hz),
                spectral_eff=float(a.spectral_eff),
                sample_seed=self._sample_seeds[a.device_id],
                **fields,
            ),
        )
        if not sent:
            self._expected.discard(a.device_id)
        elif self.cfg.proactive_drafting:
            self._ahead_offered.add(a.device_id)
        self._check_arrived()

    async def collect(self) -> tuple[dict, list, list]:
        """Wait for the open round's answers (all in, or ``round_timeout_s``); close it.
        Returns ({device id: Answer}, rejected ids, dropped ids). A device that missed
        ``max_missed_rounds`` rounds in a row is disconnected."""
        if self._expected:
            try:
                await asyncio.wait_for(self._arrived.wait(), self.cfg.round_timeout_s)
            except asyncio.TimeoutError:
                pass
        answers = {d: ans for d, ans in self._inbox.items() if d in self._expected}
        rejected = sorted(self._rejected)
        self._expected = set()
        dropped = [d for d in self._open if d not in answers and d not in self._rejected]
        for device_id in dropped:  # its draft is not verified: no guess on it can hold
            self._whole_accepted[device_id] = False
        for device_id, a in self._open.items():
            u = a.user
            if device_id in answers or device_id in self._rejected:
                u.missed_rounds = 0
            elif u.writer is not None:
                u.missed_rounds += 1
                if u.missed_rounds >= self.cfg.max_missed_rounds:
                    # a silent device would make every round wait the full timeout
                    await self._reply_error(
                        u.writer,
                        "unresponsive",
                        f"no draft in {u.missed_rounds} rounds in a row; disconnecting "
                        "(rejoin with the session secret to continue)",
                        device_id,
                    )
                    writer = u.writer
                    self._disconnect(u, writer)
                    writer.close()
        return answers, rejected, dropped

    async def verify_and_reply(self, answers: dict) -> tuple[dict, float]:
        """Verify every non-empty draft in ONE batched forward and send the results.
        Returns ({device id: (accepted, committed)}, verification seconds)."""
        drafts = {d: ans.draft for d, ans in answers.items() if ans.draft is not None}
        if not drafts:
            return {}, 0.0
        t0, wall0 = self._clock(), time.perf_counter()
        results = self.verifier.verify(drafts)
        verify_s = self._clock() - t0
        wall_s = time.perf_counter() - wall0
        self.verify_wall_s += wall_s
        longest = max(len(d.tokens) for d in drafts.values())
        batch = {"users": len(drafts), "longest": longest, "measured_s": verify_s}
        if self.profile is None:
            if isinstance(self.verification, OnlineVerificationModel):
                self.verification.observe(len(drafts), longest, verify_s)
        else:
            verify_s = float(self.verification.latency_for_batch_s(len(drafts), longest))
        self._batches.append(batch | {"verify_s": verify_s, "wall_s": wall_s})
        for device_id, (m, committed) in results.items():
            user = self.users[device_id]
            # drafting ahead on the guess can hold only after a draft accepted whole
            self._whole_accepted[device_id] = m == len(drafts[device_id].tokens)
            # if this fails, it is committed on the server; the device gets it on rejoin
            await self._send(
                user.writer,
                proto.message(
                    "result", round=answers[device_id].round, accepted=m, committed=committed
                ),
            )
        return results, verify_s

    def row(self, a: Assignment, answer: Answer | None, results: dict, dropped: list) -> dict:
        """One user's line of the round record (and its drafting-speed estimate)."""
        u = a.user
        row = {
            "device_id": u.device_id,
            "slot": u.slot,
            "group": a.group,
            "draft_length": int(a.draft_length),
            "bandwidth_hz": float(a.bandwidth_hz),
            "spectral_eff": float(a.spectral_eff),
            "dropped": u.device_id in dropped,
            "rejected": answer is None and u.device_id not in dropped,
        }
        if answer is None:
            return row
        drafted = 0 if answer.draft is None else len(answer.draft.tokens)
        m, committed = results.get(u.device_id, (0, []))
        row |= {
            "drafted": drafted,
            "accepted": m,
            "committed": len(committed),
            "compute_s": answer.compute_s,
            "upload_s": answer.upload_s,
            "finish_s": a.offset_s + answer.finish_s,
            "cut": answer.cut,
        }
        if answer.ahead_s:
            row |= {
                "ahead": len(answer.ahead_s),
                "ahead_free": answer.ahead_free,
                "drafting_s": answer.drafting_s,
            }
        if drafted and self.profile is None:
            per_token_s = answer.drafting_s / max(answer.tokens_drafted, 1)
            u.t_draft_est_s = 0.7 * u.t_draft_est_s + 0.3 * per_token_s
        return row

    # ---------------------------------------------------------------- rounds
    async def play_round(self) -> RoundRecord | None:
        """One round (one cycle of every group under pipelining): channel, decision, the
        protocol piece's message flow and verification, history and record."""
        for user in self.connected:  # requests that are over end here, cleanly
            waiting = self.round_protocol.pending_tokens(user.device_id)
            if user.ended or waiting:
                continue
            if self.context_room(user) < 1:
                await self._end_request(user, "context_full")
            elif self.cfg.end_token is not None and (
                self.cfg.end_token in self.verifier.outputs[user.device_id]
            ):
                await self._end_request(user, "end_of_text")
        # a user whose waiting draft leaves no room sits this round out until it is verified
        users = [u for u in self.connected if not u.ended and self.context_room(u) >= 1]
        if not users and not self.round_protocol.pending_tokens(None):
            return None
        wall0 = time.perf_counter()
        r_true, r_est = self._draw_channel(users)
        assignments = self._assign(users, r_true, r_est)
        played = await self.round_protocol.play(self, assignments)
        return self._finish_round(played, wall0)

    async def flush(self) -> RoundRecord | None:
        """Verify drafts still waiting at the end of a run (the last pipeline group)."""
        wall0 = time.perf_counter()
        played = await self.round_protocol.flush(self)
        return None if played is None else self._finish_round(played, wall0)

    def _draw_channel(self, users: list[_User]) -> tuple[np.ndarray, np.ndarray]:
        """(true, estimated) spectral efficiency: Rayleigh block fading around each device's
        mean gain, seen by the scheduler with the configured CSI error."""
        sc = self.scenario
        mean_gain = np.array([u.mean_gain for u in users])
        gains = mean_gain * self.rng.exponential(size=len(users))
        r_true = spectral_efficiency(sc.tx_power_w, gains, sc.noise_power_w)
        estimate = gains
        if self.cfg.csi_error_std > 0:
            h = np.sqrt(gains) * np.exp(2j * np.pi * self.rng.random(len(users)))
            e = (
                self.cfg.csi_error_std
                * np.sqrt(mean_gain / 2)
                * (self.rng.standard_normal(len(users)) + 1j * self.rng.standard_normal(len(users)))
            )
            estimate = np.abs(h + e) ** 2
        return r_true, spectral_efficiency(sc.tx_power_w, estimate, sc.noise_power_w)

    def _decide(self, users: list[_User], r_est: np.ndarray) -> Decision:
        """The scheduler's decision on the server's view (levers it leaves out get the
        protocol's defaults in :meth:`_assign`)."""
        view = self._view(users, r_est)
        if isinstance(self.scheduler, BundleScheduler):
            base = self.scheduler.base_decision(view)
            obs = self.observation(users, r_est, base)
            names = self._observation_spec().feature_names
            decision = self.scheduler.decide(view, obs, names, base)
        elif getattr(self.scheduler, "uses_observation", False):
            decision = Decision(*self.scheduler.act(view, self.observation(users, r_est)))
        elif hasattr(self.scheduler, "decide"):
            decision = self.scheduler.decide(view)
        else:
            decision = Decision(*self.scheduler.act(view))
        return decision

    def _levers(self, decision: Decision, k: int) -> tuple[np.ndarray, float | None, np.ndarray]:
        """This round's (threshold per user, deadline or None, group per user), checked as the
        simulator checks them (:func:`~multispin_env.protocols.resolve_levers`), with its
        defaults: never stop early, no deadline, user k in group k mod G. Levers of protocols
        this server does not run are ignored. A bad one is the scheduler's bug: say which and
        stop, rather than starve a user or go back in time."""
        cfg = self.cfg
        try:
            stop, deadline, group = resolve_levers(
                (1, k),
                cfg.pipeline_groups,
                decision.stop_threshold if cfg.early_stop else None,
                decision.deadline_s if cfg.streaming_deadline else None,
                decision.group if cfg.pipeline_groups > 1 else None,
            )
        except ValueError as e:
            name = getattr(self.scheduler, "name", type(self.scheduler).__name__)
            raise ValueError(f"scheduler {name}: {e}") from None
        # no deadline (inf) waits for every draft, up to the longest time a device may report
        if not cfg.streaming_deadline:
            return stop[0], None, group[0]
        return stop[0], min(float(deadline[0]), MAX_REPORTED_TIME_S), group[0]

    def _assign(self, users: list[_User], r_true: np.ndarray, r_est: np.ndarray) -> list:
        """Each user's part of the round: the decision with its levers, drafts capped to the
        context."""
        decision = self._decide(users, r_est)
        stop, deadline, group = self._levers(decision, len(users))
        # near the context limit a draft is shortened to what still fits
        lengths = [
            max(1, min(int(length), self.context_room(u)))
            for u, length in zip(users, decision.draft_lengths[0], strict=True)
        ]
        return [
            Assignment(u, length, float(bw), float(r), float(threshold), deadline, int(g))
            for u, length, bw, r, threshold, g in zip(
                users, lengths, decision.bandwidth_hz[0], r_true, stop, group, strict=True
            )
        ]

    def _finish_round(self, played: Played, wall0: float) -> RoundRecord:
        drafted = np.zeros((1, self.cfg.max_users))
        accepted = np.zeros((1, self.cfg.max_users))
        share = np.zeros((1, self.cfg.max_users))
        for row in played.rows:
            share[0, row["slot"]] = row["bandwidth_hz"] / self.bandwidth_hz
            if "accepted" in row:  # (a pipelined user may be verified twice in a cycle)
                drafted[0, row["slot"]] += row["drafted"]
                accepted[0, row["slot"]] += row["accepted"]
        self.history.update(drafted, accepted, share, np.array([played.timeline_s]))
        record = RoundRecord(
            self._round,
            played.rows,
            played.verify_s,
            played.timeline_s,
            time.perf_counter() - wall0,
            played.dropped,
            played.rejected,
            self.round_protocol.name,
            played.phases,
            self._batches,
        )
        self._batches = []
        self.records.append(record)
        if self.cfg.trace_path:
            with open(self.cfg.trace_path, "a") as f:
                f.write(json.dumps(record.__dict__) + "\n")
        return record

    def summary(self) -> dict:
        tokens = sum(row.get("committed", 0) for rec in self.records for row in rec.users)
        drafted = sum(row.get("drafted", 0) for rec in self.records for row in rec.users)
        accepted = sum(row.get("accepted", 0) for rec in self.records for row in rec.users)
        timeline = sum(rec.timeline_s for rec in self.records)
        wall = sum(rec.wall_s for rec in self.records)
        busy_by_device: dict[str, float] = {}
        for rec in self.records:
            for row in rec.users:
                if "compute_s" in row:
                    busy = row["compute_s"] + row["upload_s"]
                    device = row["device_id"]
                    busy_by_device[device] = busy_by_device.get(device, 0.0) + busy
        idle = {d: 1.0 - busy / timeline for d, busy in busy_by_device.items()} if timeline else {}
        return {
            "protocol": self.round_protocol.name + ("+early_stop" if self.cfg.early_stop else ""),
            "rounds": len(self.records),
            "tokens": tokens,
            "accept_frac": accepted / max(drafted, 1),
            "timeline_s": timeline,
            "wall_s": wall,
            "goodput_timeline_tokens_per_s": tokens / timeline if timeline else 0.0,
            "goodput_wall_tokens_per_s": tokens / wall if wall else 0.0,
            "timing": self.cfg.timing,
            "verify_wall_s": self.verify_wall_s,
            "verify_s_mean": float(np.mean([r.verify_s for r in self.records]))
            if self.records
            else 0.0,
            # timeline accounting of the overlaps: how much of the run the verifier works,
            # and how much each device neither drafts nor uploads
            "server_busy_frac": sum(r.verify_s for r in self.records) / timeline
            if timeline
            else 0.0,
            "device_idle_frac_mean": float(np.mean(list(idle.values()))) if idle else 0.0,
            "device_idle_frac": idle,
            "cut_drafts": sum(bool(row.get("cut")) for rec in self.records for row in rec.users),
            "dropped_user_rounds": sum(len(r.dropped) for r in self.records),
            "rejected_drafts": sum(len(r.rejected) for r in self.records),
            "protocol_errors": self.protocol_error_count,
            "ended_requests": sorted(
                u.device_id for u in self.users.values() if u.end_reason in FINISHED
            ),
        }


def write_trace_header(path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False  # all interfaces
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: treat as reachable from outside
