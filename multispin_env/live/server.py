"""The edge server: accepts device connections, schedules, verifies in batches, commits.

One asyncio process. Every round it:

1. draws each connected user's channel (Rayleigh block fading around the gain the device
   reported; the channel constants come from a scenario preset) and forms the server's view;
2. asks the scheduler for (L_k, B_k) and sends each device its ``round`` message;
3. waits for the drafts until all arrive or ``round_timeout_s`` passes: a device that is
   late or disconnected is dropped from this round (it may send again next round, or rejoin);
4. verifies every received draft in ONE batched verifier forward, applies the acceptance
   rule, sends the results and appends one JSON line to the trace.

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
x speed factor), the emulated uplink delays and the measured verification time, which does
not depend on how the devices share this host's cores; and as wall-clock.
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

from multispin_env.config import load_preset
from multispin_env.episodes import ServerView
from multispin_env.live import protocol as proto
from multispin_env.live.scheduler import BundleScheduler, OnlineVerificationModel
from multispin_env.live.speculative import DecodingConfig, VerifierServer, draft_uniforms
from multispin_env.live.validation import Rejected, RunLimits, check_hello, parse_draft
from multispin_env.observation import ObservationSpec, UserHistory, build_observation
from multispin_env.physics import spectral_efficiency


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

    def __post_init__(self) -> None:
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


class EdgeServer:
    def __init__(self, cfg: LiveConfig, verifier, scheduler, vocab_size: int) -> None:
        self.cfg = cfg
        self.scenario = load_preset(cfg.scenario)
        self.bandwidth_hz = cfg.bandwidth_hz or self.scenario.bandwidth_hz
        self.decoding = DecodingConfig(cfg.greedy, cfg.temperature, cfg.kept_vocab)
        self.verifier = VerifierServer(verifier, self.decoding, np.random.default_rng(cfg.seed))
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.payload_bits = min(cfg.kept_vocab, vocab_size) * (
            16 + int(np.ceil(np.log2(vocab_size)))
        )
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.users: dict[str, _User] = {}
        self.history = UserHistory(1, cfg.max_users)
        if cfg.alpha_prior is None:
            self.alpha_prior = float(np.mean([t.alpha_mean for t in self.scenario.tasks]))
        else:
            self.alpha_prior = cfg.alpha_prior
        self.history.reset(np.full((1, cfg.max_users), self.alpha_prior))
        self.verification = OnlineVerificationModel()
        self.records: list[RoundRecord] = []
        # the latest errors (bounded: a peer can make the server write one per message)
        self.protocol_errors: collections.deque[str] = collections.deque(maxlen=1000)
        self.protocol_error_count = 0
        self.sample_rng = np.random.default_rng(cfg.seed + 2)  # per-round draft seeds
        self._sample_seeds: dict[str, int] = {}
        kept = min(cfg.kept_vocab, vocab_size)
        self.limits = RunLimits(vocab_size, int(verifier.cfg.n_positions), kept)
        # frame caps: a hello carries a prompt; a draft at most L_max tokens with their PMFs
        self.max_hello_bytes = 16 * self.limits.context_tokens + 4096
        # (generous: a frame over it is not skipped but ends the connection)
        self.max_frame_bytes = max(1 << 20, cfg.max_draft_length * (kept * 6 + 16) + 4096)
        self.max_connections = cfg.max_connections or 2 * cfg.max_users + 4
        self._round = -1
        self._expected: set[str] = set()
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
            if self._expected <= set(self._inbox) | self._rejected:
                self._arrived.set()

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
            if user.end_reason == "context_full":
                raise Rejected("ended", "this request is over: the verifier's context is full")
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
            user.ended, user.end_reason = False, None
        user.writer, user.disconnected_at, user.missed_rounds = writer, None, 0
        return user

    async def _receive_draft(self, user: _User, msg: dict, writer) -> None:
        device_id = user.device_id
        if msg["round"] != self._round:
            await self._reply_error(
                writer,
                "out_of_order",
                f"draft for round {msg['round']} while round {self._round} is open; not applied",
                device_id,
            )
            return
        if device_id in self._inbox or device_id in self._rejected:
            await self._reply_error(
                writer, "duplicate", f"a second draft for round {self._round}", device_id
            )
            return
        if device_id not in self._expected:
            await self._reply_error(
                writer,
                "out_of_order",
                f"round {self._round} is closed for this device (late, or not scheduled in it)",
                device_id,
            )
            return
        try:
            uniforms = None
            if not self.decoding.greedy:  # sampling: the tokens must be the seed's draws
                uniforms = draft_uniforms(self._sample_seeds[device_id], len(msg["tokens"]))
            draft = parse_draft(msg, self._requested[device_id], self.limits, uniforms)
            self._inbox[device_id] = (draft, msg)
        except Rejected as err:
            # its answer for this round is "nothing": the others need not wait for it
            self._rejected.add(device_id)
            await self._reply_error(writer, err.code, f"{err} (round {self._round})", device_id)
        if self._expected <= set(self._inbox) | self._rejected:
            self._arrived.set()

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
        )

    def _observation_spec(self) -> ObservationSpec:
        return ObservationSpec(
            max_users=self.cfg.max_users,
            max_draft_length=self.cfg.max_draft_length,
            t_ref_s=self.cfg.t_ref_s or self.scenario.t_draft_mean_s,
            payload_bits=float(self.payload_bits),
            bandwidth_hz=self.bandwidth_hz,
            observe_base=getattr(self.scheduler, "base", None) is not None,
        )

    def observation(self, users: list[_User], r_est: np.ndarray, base=None) -> np.ndarray:
        """The env's observation vector ``(1, size)`` for the connected users, built by the
        same builder and history as in simulation (users fill slots 0..K-1 in slot order)."""
        spec = self._observation_spec()
        elapsed = sum(r.timeline_s for r in self.records)
        horizon_frac = (elapsed % self.cfg.horizon_s) / self.cfg.horizon_s
        return build_observation(
            spec,
            self.history.columns([u.slot for u in users]),
            r_est[None, :],
            np.array([[u.t_draft_est_s for u in users]]),
            np.full((1, len(users)), self.alpha_prior),
            np.array([horizon_frac]),
            base_lengths=None if base is None else base[0],
            base_bandwidth_hz=None if base is None else base[1],
        )

    def context_room(self, user: _User) -> int:
        """Draft tokens that still fit in the verifier's context for this user."""
        used = user.prompt_len + len(self.verifier.outputs[user.device_id])
        return self.limits.context_tokens - used

    async def _end_request(self, user: _User, reason: str) -> None:
        user.ended, user.end_reason = True, reason
        await self._send(user.writer, proto.message("end", reason=reason))

    async def play_round(self) -> RoundRecord | None:
        for user in self.connected:  # requests that no longer fit end here, cleanly
            if self.context_room(user) < 1:
                await self._end_request(user, "context_full")
        users = [u for u in self.connected if not u.ended]
        if not users:
            return None
        wall0 = time.perf_counter()
        self._round += 1
        sc = self.scenario
        gains = np.array([u.mean_gain for u in users]) * self.rng.exponential(size=len(users))
        r_true = spectral_efficiency(sc.tx_power_w, gains, sc.noise_power_w)
        estimate = gains
        if self.cfg.csi_error_std > 0:
            h = np.sqrt(gains) * np.exp(2j * np.pi * self.rng.random(len(users)))
            e = (
                self.cfg.csi_error_std
                * np.sqrt(np.array([u.mean_gain for u in users]) / 2)
                * (self.rng.standard_normal(len(users)) + 1j * self.rng.standard_normal(len(users)))
            )
            estimate = np.abs(h + e) ** 2
        r_est = spectral_efficiency(sc.tx_power_w, estimate, sc.noise_power_w)
        view = self._view(users, r_est)
        if getattr(self.scheduler, "uses_observation", False):  # e.g. an exported policy
            if isinstance(self.scheduler, BundleScheduler):
                base = self.scheduler.base_allocation(view)
                obs = self.observation(users, r_est, base)
                names = self._observation_spec().feature_names
                lengths, bandwidth = self.scheduler.act(view, obs, names, base)
            else:
                lengths, bandwidth = self.scheduler.act(view, self.observation(users, r_est))
        else:
            lengths, bandwidth = self.scheduler.act(view)
        # near the context limit a draft is shortened to what still fits
        lengths = [
            max(1, min(int(length), self.context_room(u)))
            for u, length in zip(users, lengths[0], strict=True)
        ]
        bandwidth = bandwidth[0]
        self._inbox, self._rejected, self._arrived = {}, set(), asyncio.Event()
        seeds = self.sample_rng.integers(0, 2**62, size=len(users))
        self._sample_seeds = {u.device_id: int(x) for u, x in zip(users, seeds, strict=True)}
        # the whole round is expected before the first send yields: a device that leaves (or
        # answers) while the others are still being sent to must not end the round early
        self._expected = {u.device_id for u in users}
        self._requested = {u.device_id: int(x) for u, x in zip(users, lengths, strict=True)}
        for u, length, bw, r in zip(users, lengths, bandwidth, r_true, strict=True):
            sent = await self._send(
                u.writer,
                proto.message(
                    "round",
                    round=self._round,
                    draft_length=int(length),
                    bandwidth_hz=float(bw),
                    spectral_eff=float(r),
                    sample_seed=self._sample_seeds[u.device_id],
                ),
            )
            if not sent:
                self._expected.discard(u.device_id)
        if self._expected <= set(self._inbox) | self._rejected:
            self._arrived.set()
        if self._expected:
            try:
                await asyncio.wait_for(self._arrived.wait(), self.cfg.round_timeout_s)
            except asyncio.TimeoutError:
                pass
        received = {d: m for d, m in self._inbox.items() if d in self._expected}
        rejected = sorted(self._rejected)
        self._expected = set()
        dropped = [u.device_id for u in users if u.device_id not in received]
        for u in users:
            if u.device_id in received or u.device_id in self._rejected:
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
                        u.device_id,
                    )
                    writer = u.writer
                    self._disconnect(u, writer)
                    writer.close()
        drafts = {d: draft for d, (draft, _) in received.items()}
        received = {d: msg for d, (_, msg) in received.items()}
        verify_s, results = 0.0, {}
        if drafts:
            t0 = time.perf_counter()
            results = self.verifier.verify(drafts)
            verify_s = time.perf_counter() - t0
            self.verification.observe(
                len(drafts), max(len(d.tokens) for d in drafts.values()), verify_s
            )
        rows = []
        drafted = np.zeros((1, self.cfg.max_users))
        accepted_arr = np.zeros((1, self.cfg.max_users))
        for u, length, bw, r in zip(users, lengths, bandwidth, r_true, strict=True):
            row = {
                "device_id": u.device_id,
                "slot": u.slot,
                "draft_length": int(length),
                "bandwidth_hz": float(bw),
                "spectral_eff": float(r),
                "dropped": u.device_id in dropped,
                "rejected": u.device_id in self._rejected,
            }
            if u.device_id in results:
                m, committed = results[u.device_id]
                msg = received[u.device_id]
                row |= {
                    "accepted": m,
                    "committed": len(committed),
                    "compute_s": msg["compute_s"],
                    "upload_s": msg["upload_s"],
                }
                per_token_s = msg["compute_s"] / len(msg["tokens"])
                u.t_draft_est_s = 0.7 * u.t_draft_est_s + 0.3 * per_token_s
                drafted[0, u.slot], accepted_arr[0, u.slot] = len(msg["tokens"]), m
                # if this fails, it is committed on the server; the device gets it on rejoin
                await self._send(
                    u.writer,
                    proto.message("result", round=self._round, accepted=m, committed=committed),
                )
            rows.append(row)
        served = [row for row in rows if "accepted" in row]
        timeline = (
            max(row["compute_s"] + row["upload_s"] for row in served) + verify_s if served else 0.0
        )
        share = np.zeros((1, self.cfg.max_users))
        for u, bw in zip(users, bandwidth, strict=True):
            share[0, u.slot] = bw / self.bandwidth_hz
        self.history.update(drafted, accepted_arr, share, np.array([timeline]))
        record = RoundRecord(
            self._round, rows, verify_s, timeline, time.perf_counter() - wall0, dropped, rejected
        )
        self.records.append(record)
        if self.cfg.trace_path:
            with open(self.cfg.trace_path, "a") as f:
                f.write(json.dumps(record.__dict__) + "\n")
        return record

    def summary(self) -> dict:
        tokens = sum(row.get("committed", 0) for rec in self.records for row in rec.users)
        drafted = sum(
            row["draft_length"] for rec in self.records for row in rec.users if "accepted" in row
        )
        accepted = sum(row.get("accepted", 0) for rec in self.records for row in rec.users)
        timeline = sum(rec.timeline_s for rec in self.records)
        wall = sum(rec.wall_s for rec in self.records)
        return {
            "rounds": len(self.records),
            "tokens": tokens,
            "accept_frac": accepted / max(drafted, 1),
            "timeline_s": timeline,
            "wall_s": wall,
            "goodput_timeline_tokens_per_s": tokens / timeline if timeline else 0.0,
            "goodput_wall_tokens_per_s": tokens / wall if wall else 0.0,
            "verify_s_mean": float(np.mean([r.verify_s for r in self.records]))
            if self.records
            else 0.0,
            "dropped_user_rounds": sum(len(r.dropped) for r in self.records),
            "rejected_drafts": sum(len(r.rejected) for r in self.records),
            "protocol_errors": self.protocol_error_count,
            "ended_requests": sorted(
                u.device_id for u in self.users.values() if u.end_reason == "context_full"
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
