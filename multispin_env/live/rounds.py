"""Round protocols of the live server: each is one piece, its message flow and timing rule.

A piece gets the round's :class:`Assignment` per user (the scheduler's decision, already
capped to the verifier's context) and plays it with the server's shared parts:
``open_round`` / ``send_round`` (the ``round`` messages), ``collect`` (drafts or streamed
tokens, with the timeouts and per-sender validation), ``verify_and_reply`` (one batched
verification, results to the devices) and ``row``. It returns a :class:`Played`: the rows of
the users verified, the verification time and the timeline of the round. The pieces mirror
the simulator's (:mod:`multispin_env.protocols`), with the measured times in place of the
model's:

- :class:`SynchronousRound` (the paper): everyone drafts and uploads, one verification.
  Timeline ``max_k (compute_k + upload_k) + V``. Early stop changes only the devices (the
  ``stop_threshold`` of their round message), so it is this piece too.
- :class:`DeadlineRound`: devices stream each token as it is drafted; the server verifies
  at ``T = min(D, last arrival)`` the prefix of every user that reached it by then. Arrival
  times are computed by the server from the reported drafting times and the uplink rate it
  assigned (:func:`~multispin_env.live.validation.stream_arrivals_s`). Timeline ``T + V``.
- :class:`PipelineRound` (SpecEdge): the users are split in groups; while group g drafts
  and uploads, the server verifies group g - 1. The last group's drafts are verified in the
  first phase of the next cycle (:meth:`PipelineRound.flush` verifies them at the end of a
  run). A user whose previous draft is still being verified gets its round message when its
  result is out, so its phase starts ``V`` later on the timeline. Phase time
  ``max(max_k in g (offset_k + compute_k + upload_k), V_{g-1})``, cycle = the sum. The
  groups play in the order that puts groups holding such users last (labels are arbitrary:
  each group has the whole band); with groups that stay the same from cycle to cycle (the
  tuned heuristic's ``stable`` knob) no user ever waits, which is what the simulator's cycle
  assumes. With proactive drafting (``LiveConfig.proactive_drafting``, SpecEdge) a device
  drafts its next draft while it waits: first on the guess that its draft is all accepted
  with its own top token as the bonus (kept if the result says so), then, once the result
  is out, on the committed context. Its next draft reports the time up to each token drafted
  ahead; as in the simulator's cycle, those drafted on the guess are free within the wait
  since the end of the user's phase, those drafted after the result within the wait since
  the result, and the rest count as drafting in the phase (:meth:`PipelineRound.charge_ahead`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class Assignment:
    """One user's part of a round.

    Attributes:
        user: the server's record of the user.
        draft_length: L_k (a cap under early stop or a deadline).
        bandwidth_hz: B_k (its group's band under pipelining).
        spectral_eff: the true spectral efficiency of this round (the device emulates its
            uplink with it; the scheduler saw an estimate).
        stop_threshold: early-stop confidence threshold (0: never stop early).
        deadline_s: verification deadline on the round's timeline (None: no streaming).
        group: pipeline group.
        offset_s: timeline seconds between the phase start and this user's round message.
    """

    user: object
    draft_length: int
    bandwidth_hz: float
    spectral_eff: float
    stop_threshold: float = 0.0
    deadline_s: float | None = None
    group: int = 0
    offset_s: float = 0.0

    @property
    def device_id(self) -> str:
        return self.user.device_id


@dataclass
class Answer:
    """What a user sent back for a round.

    Attributes:
        draft: the verified part of the draft (None: nothing to verify).
        compute_s: drafting time (device CPU time x speed factor), cut tokens included.
        upload_s: uplink time of the tokens sent.
        finish_s: timeline seconds from the user's round message until its draft (the part
            that counts) is at the server.
        cut: a deadline cut the draft short.
        round: the wire round it answers (its result names it).
        tokens_drafted: tokens the device drafted, cut ones included.
        ahead_s: proactive drafting: the drafting time up to each of the draft's first
            tokens that were drafted before the round message (cumulative seconds).
        ahead_guess: those tokens were drafted on the guess that the previous draft was all
            accepted (from the end of the user's phase), not after its result.
        ahead_free: how many of them fit in the user's wait on the timeline (set by the
            pipeline piece; the rest count as drafting in the phase).
        drafting_s: all drafting time of the draft, ahead tokens included (the server's
            per-token speed estimate); default ``compute_s``.
    """

    draft: object
    compute_s: float
    upload_s: float
    finish_s: float
    cut: bool = False
    round: int = 0
    tokens_drafted: int = 0
    ahead_s: tuple = ()
    ahead_guess: bool = False
    ahead_free: int = 0
    drafting_s: float | None = None

    def __post_init__(self) -> None:
        if self.drafting_s is None:
            self.drafting_s = self.compute_s


@dataclass
class Played:
    """A piece's outcome: the rows of the users verified in it and its timeline."""

    rows: list = field(default_factory=list)
    verify_s: float = 0.0
    timeline_s: float = 0.0
    dropped: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    phases: list = field(default_factory=list)


class SynchronousRound:
    """The paper's round (with or without early stop)."""

    name = "sync"
    streams = False

    async def play(self, server, assignments: list[Assignment]) -> Played:
        server.open_round(assignments)
        for a in assignments:
            await server.send_round(a)
        answers, rejected, dropped = await server.collect()
        results, verify_s = await server.verify_and_reply(answers)
        rows = [server.row(a, answers.get(a.device_id), results, dropped) for a in assignments]
        timeline = self.verify_at_s(assignments, answers)
        timeline += verify_s if timeline > 0 else 0.0
        return Played(rows, verify_s, timeline, dropped, rejected)

    def verify_at_s(self, assignments: list[Assignment], answers: dict) -> float:
        """When verification starts on the round's timeline: the last draft is in."""
        finish = [ans.finish_s for ans in answers.values() if ans.draft is not None]
        return max(finish, default=0.0)

    async def flush(self, server) -> Played | None:
        return None

    def pending_tokens(self, device_id: str | None) -> int:
        """Tokens a draft still waiting for verification may commit (None: any user)."""
        return 0

    def discard(self, device_id: str) -> None:
        """Drop a user's draft still waiting for verification (it rejoined)."""

    def predrafted(self, device_id: str) -> int:
        """Ahead tokens that came free in the user's last draft (proactive drafting)."""
        return 0


class DeadlineRound(SynchronousRound):
    """Streamed drafts, verified at the deadline with the prefixes received."""

    name = "deadline"
    streams = True

    def verify_at_s(self, assignments: list[Assignment], answers: dict) -> float:
        """T = min(D, the last arrival); a draft the deadline cut counts as arriving at D."""
        deadline = min((a.deadline_s for a in assignments), default=0.0)
        finish = [ans.finish_s for ans in answers.values()]
        return min(deadline, max(finish)) if finish else 0.0


class PipelineRound:
    """Groups that draft and upload while the previous group is verified."""

    name = "pipeline"
    streams = False

    def __init__(self, groups: int) -> None:
        if groups < 2:
            raise ValueError(f"pipelined groups: groups={groups} must be >= 2")
        self.groups = groups
        self.carry: tuple[list[Assignment], dict] | None = None  # drafts not yet verified
        # the run's timeline (proactive drafting): seconds so far, and per user the end of
        # its last phase, the time its last result was out, its last free ahead tokens
        self.clock_s = 0.0
        self.phase_end_s: dict[str, float] = {}
        self.result_at_s: dict[str, float] = {}
        self.free_ahead: dict[str, int] = {}

    async def _verify_carry(self, server, played: Played, start_s: float) -> float:
        if self.carry is None:
            return 0.0
        assignments, answers = self.carry
        self.carry = None
        results, verify_s = await server.verify_and_reply(answers)
        played.rows += [server.row(a, answers.get(a.device_id), results, []) for a in assignments]
        played.verify_s += verify_s
        for device_id in answers:
            self.result_at_s[device_id] = start_s + verify_s
        return verify_s

    def charge_ahead(self, a: Assignment, answer: Answer, start_s: float) -> None:
        """Proactive drafting on the timeline, as the simulator's cycle: the ahead tokens
        drafted on the guess fit in the wait since the end of the user's last phase, those
        drafted after the result in the wait since the result; the ones that do not fit
        count as drafting in this phase."""
        if not answer.ahead_s:
            return
        since = (self.phase_end_s if answer.ahead_guess else self.result_at_s).get(a.device_id)
        wait_s = 0.0 if since is None else max(0.0, start_s + a.offset_s - since)
        free = bisect.bisect_right(answer.ahead_s, wait_s + 1e-12)
        charged = answer.ahead_s[-1] - (answer.ahead_s[free - 1] if free else 0.0)
        answer.compute_s += charged
        answer.finish_s += charged
        answer.ahead_free = free

    def predrafted(self, device_id: str) -> int:
        return self.free_ahead.get(device_id, 0)

    def pending_tokens(self, device_id: str | None) -> int:
        """Tokens a draft still waiting for verification may commit: all of it plus the
        bonus token (None: the total over every waiting draft)."""
        if self.carry is None:
            return 0
        answers = self.carry[1]
        ids = list(answers) if device_id is None else [device_id]
        return sum(
            len(answers[d].draft.tokens) + 1
            for d in ids
            if d in answers and answers[d].draft is not None
        )

    def discard(self, device_id: str) -> None:
        """Drop a user's draft still waiting for verification (it rejoined: its welcome
        carries only the committed tokens, and it drafts again from there)."""
        if self.carry is None:
            return
        assignments, answers = self.carry
        answers.pop(device_id, None)
        assignments = [a for a in assignments if a.device_id != device_id]
        self.carry = (assignments, answers) if answers else None

    def phase_order(self, assignments: list[Assignment]) -> list[int]:
        """Groups in the order they play this cycle: the group labels are arbitrary (each
        group has the whole band), so the groups holding users whose previous draft is still
        being verified go last, where their result is out before their phase."""
        waiting = set() if self.carry is None else set(self.carry[1])
        count = [
            sum(a.device_id in waiting for a in assignments if a.group == g)
            for g in range(self.groups)
        ]
        return sorted(range(self.groups), key=lambda g: count[g])

    async def play(self, server, assignments: list[Assignment]) -> Played:
        played = Played()
        start_s = self.clock_s
        for g in self.phase_order(assignments):
            members = [a for a in assignments if a.group == g]
            if not members and self.carry is None:
                continue
            waiting = set() if self.carry is None else set(self.carry[1])
            server.open_round(members)
            for a in members:  # users with a draft in verification start after its result
                if a.device_id not in waiting:
                    await server.send_round(a)
            verify_s = await self._verify_carry(server, played, start_s)
            for a in members:
                if a.device_id in waiting:
                    a.offset_s = verify_s
                    await server.send_round(a)
            answers, rejected, dropped = await server.collect()
            played.dropped += dropped
            played.rejected += rejected
            # users without an answer (dropped, rejected) get their row now; the others
            # when they are verified
            played.rows += [
                server.row(a, None, {}, dropped) for a in members if a.device_id not in answers
            ]
            for a in members:  # no draft this phase: its waits start again from nothing
                if a.device_id not in answers:
                    self.phase_end_s.pop(a.device_id, None)
                    self.result_at_s.pop(a.device_id, None)
            answered = [a for a in members if a.device_id in answers]
            for a in answered:
                self.charge_ahead(a, answers[a.device_id], start_s)
                self.free_ahead[a.device_id] = answers[a.device_id].ahead_free
            self.carry = (answered, answers) if answers else None
            busy = [
                a.offset_s + answers[a.device_id].finish_s
                for a in answered
                if answers[a.device_id].draft is not None
            ]
            draft_upload_s = max(busy, default=0.0)
            phase_s = max(draft_upload_s, verify_s)
            played.phases.append(
                {
                    "group": g,
                    "draft_upload_s": draft_upload_s,
                    "verify_s": verify_s,
                    "phase_s": phase_s,
                }
            )
            played.timeline_s += phase_s
            start_s += phase_s
            for a in answered:
                self.phase_end_s[a.device_id] = start_s
        self.clock_s = start_s
        return played

    async def flush(self, server) -> Played | None:
        """Verify the last group's drafts (the end of a run): its own phase."""
        if self.carry is None:
            return None
        played = Played()
        verify_s = await self._verify_carry(server, played, self.clock_s)
        self.clock_s += verify_s
        played.timeline_s = verify_s
        played.phases.append(
            {"group": None, "draft_upload_s": 0.0, "verify_s": verify_s, "phase_s": verify_s}
        )
        return played


def make_round_protocol(streaming_deadline: bool, pipeline_groups: int):
    """The piece for a protocol's switches (early stop is a field of the round message)."""
    if streaming_deadline and pipeline_groups > 1:
        raise ValueError(
            "deadline verification and pipelined groups do not combine (as in the simulator)"
        )
    if pipeline_groups > 1:
        return PipelineRound(pipeline_groups)
    return DeadlineRound() if streaming_deadline else SynchronousRound()
