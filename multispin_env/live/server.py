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
device that reconnects with the same ``device_id`` is sent them and resumes from there, so
nothing accepted is lost or duplicated. Malformed or out-of-order messages get an ``error``
reply and are not applied.

Time is reported twice: on a *timeline* built from the devices' measured compute (CPU time
x speed factor), the emulated uplink delays and the measured verification time, which does
not depend on how the devices share this host's cores; and as wall-clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multispin_env.config import load_preset
from multispin_env.episodes import ServerView
from multispin_env.live import protocol as proto
from multispin_env.live.scheduler import OnlineVerificationModel
from multispin_env.live.speculative import DecodingConfig, Draft, VerifierServer
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


@dataclass
class _User:
    slot: int
    device_id: str
    mean_gain: float
    speed_factor: float
    writer: asyncio.StreamWriter | None = None
    t_draft_est_s: float = 2e-3


@dataclass
class RoundRecord:
    round: int
    users: list
    verify_s: float
    timeline_s: float
    wall_s: float
    dropped: list = field(default_factory=list)


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
        self.protocol_errors: list[str] = []
        self._round = -1
        self._expected: set[str] = set()
        self._inbox: dict[str, dict] = {}
        self._arrived = asyncio.Event()
        self._server = None
        self._connections: set = set()  # server-side stream writers of open connections
        self.port = None

    # ---------------------------------------------------------------- connections
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Say bye to every device, let their connections end, then close the server."""
        for user in self.users.values():
            if user.writer is not None:
                try:
                    await proto.send_message(user.writer, proto.message("bye"))
                except (ConnectionError, RuntimeError):
                    pass
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

    async def _reply_error(self, writer, code: str, text: str) -> None:
        self.protocol_errors.append(f"{code}: {text}")
        try:
            await proto.send_message(writer, proto.message("error", code=code, message=text))
        except (ConnectionError, RuntimeError):
            pass

    async def _handle(self, reader, writer) -> None:
        user = None
        self._connections.add(writer)
        try:
            hello = await proto.read_message(reader)
            if hello["type"] != "hello":
                await self._reply_error(writer, "expected_hello", f"got {hello['type']}")
                writer.close()
                return
            user = self._register(hello, writer)
            if user is None:
                await self._reply_error(writer, "full", f"all {self.cfg.max_users} slots taken")
                writer.close()
                return
            await proto.send_message(
                writer,
                proto.message(
                    "welcome",
                    user_id=user.slot,
                    committed=list(self.verifier.outputs[user.device_id]),
                ),
            )
            while True:
                try:
                    msg = await proto.read_message(reader)
                except proto.ProtocolError as err:
                    await self._reply_error(writer, "bad_message", str(err))
                    continue
                if msg["type"] == "draft":
                    if msg["round"] != self._round or user.device_id not in self._expected:
                        await self._reply_error(
                            writer,
                            "out_of_order",
                            f"draft for round {msg['round']} while round "
                            f"{self._round} is open; not applied",
                        )
                        continue
                    self._inbox[user.device_id] = msg
                    if self._expected <= set(self._inbox):
                        self._arrived.set()
                elif msg["type"] == "bye":
                    break
                else:
                    await self._reply_error(writer, "unexpected", f"{msg['type']} from a device")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the device left, or the server is shutting down
        except proto.ProtocolError as err:
            await self._reply_error(writer, "bad_message", str(err))
        finally:
            # close our side too: a peer's EOF alone leaves the transport half-open, and on
            # Python >= 3.12 Server.wait_closed() waits for it (stop() hung there)
            writer.close()
            self._connections.discard(writer)
            if user is not None and user.writer is writer:
                user.writer = None  # disconnected: dropped from rounds, record kept
                self._expected.discard(user.device_id)
                if self._expected <= set(self._inbox):
                    self._arrived.set()

    def _register(self, hello: dict, writer) -> _User | None:
        device_id = hello["device_id"]
        user = self.users.get(device_id)
        if user is None:
            used = {u.slot for u in self.users.values()}
            free = [s for s in range(self.cfg.max_users) if s not in used]
            if not free:
                return None
            user = _User(
                free[0], device_id, float(hello["mean_gain"]), float(hello["speed_factor"])
            )
            self.users[device_id] = user
            self.verifier.add_user(device_id, list(hello["prompt"]))
        user.writer = writer
        return user

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

    def observation(self, users: list[_User], r_est: np.ndarray) -> np.ndarray:
        """The env's observation vector ``(1, size)`` for the connected users, built by the
        same builder and history as in simulation (users fill slots 0..K-1 in slot order)."""
        spec = ObservationSpec(
            max_users=self.cfg.max_users,
            max_draft_length=self.cfg.max_draft_length,
            t_ref_s=self.cfg.t_ref_s or self.scenario.t_draft_mean_s,
            payload_bits=float(self.payload_bits),
            bandwidth_hz=self.bandwidth_hz,
        )
        elapsed = sum(r.timeline_s for r in self.records)
        horizon_frac = (elapsed % self.cfg.horizon_s) / self.cfg.horizon_s
        return build_observation(
            spec,
            self.history.columns([u.slot for u in users]),
            r_est[None, :],
            np.array([[u.t_draft_est_s for u in users]]),
            np.full((1, len(users)), self.alpha_prior),
            np.array([horizon_frac]),
        )

    async def play_round(self) -> RoundRecord | None:
        users = self.connected
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
            lengths, bandwidth = self.scheduler.act(view, self.observation(users, r_est))
        else:
            lengths, bandwidth = self.scheduler.act(view)
        lengths, bandwidth = lengths[0], bandwidth[0]
        self._inbox, self._arrived = {}, asyncio.Event()
        self._expected = set()
        for u, length, bw, r in zip(users, lengths, bandwidth, r_true, strict=True):
            try:
                await proto.send_message(
                    u.writer,
                    proto.message(
                        "round",
                        round=self._round,
                        draft_length=int(length),
                        bandwidth_hz=float(bw),
                        spectral_eff=float(r),
                    ),
                )
                self._expected.add(u.device_id)
            except (ConnectionError, RuntimeError, AttributeError):
                u.writer = None
        if self._expected:
            try:
                await asyncio.wait_for(self._arrived.wait(), self.cfg.round_timeout_s)
            except asyncio.TimeoutError:
                pass
        received = {d: m for d, m in self._inbox.items() if d in self._expected}
        self._expected = set()
        dropped = [u.device_id for u in users if u.device_id not in received]
        drafts = {}
        for device_id, msg in received.items():
            kept = msg["kept"]
            drafts[device_id] = Draft(
                list(msg["tokens"]),
                np.frombuffer(msg["q_indices"], dtype=np.int32).reshape(-1, kept),
                np.frombuffer(msg["q_values"], dtype=np.float16).reshape(-1, kept),
            )
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
                u.t_draft_est_s = 0.7 * u.t_draft_est_s + 0.3 * msg["compute_s"] / int(length)
                drafted[0, u.slot], accepted_arr[0, u.slot] = len(msg["tokens"]), m
                try:
                    await proto.send_message(
                        u.writer,
                        proto.message("result", round=self._round, accepted=m, committed=committed),
                    )
                except (ConnectionError, RuntimeError, AttributeError):
                    pass  # committed on the server; the device gets it on rejoin
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
            self._round, rows, verify_s, timeline, time.perf_counter() - wall0, dropped
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
        }


def write_trace_header(path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("")
