"""The scheduler: every decision of a job, as a pure state machine.

``Scheduler.handle(input, now)`` and ``Scheduler.tick(now)`` return the commands to carry out
(`resilient.runtime.protocol`). No Ray, no I/O, no clock and no global randomness here: time comes in as
``now``, jitter from an injected ``random.Random``. The Ray driver and the simulation run this same code.

Exactly-once protocol
---------------------
* Every batch has a stable id (its position in the source). A batch is *done* when its output is
  committed (a group commit the driver reports durable) or it is a dead letter. At-least-once delivery
  plus create-only commits gives exactly one committed output per batch.
* Each batch not done is in exactly one place: the ready queue, a retry timer, a call in flight, the
  next group, or a commit in flight (stateful: its slot's queue, a call, the group, a commit). A batch
  that answered is taken into the group once (``committing``); a second answer is dropped.
* Answers are fenced twice: a call whose incarnation is no longer its slot's is forgotten (its answer is
  ignored), and an answer whose epoch is not its incarnation's is a zombie's and is dropped.
* Group commit: one commit in flight at a time; the next starts when the committer is free and the last
  started ``commit_interval_seconds`` ago, or the group is full, or a redelivered (urgent) batch waits,
  or no call is in flight (the tail of a job). A commit that fails transiently is retried after a
  backoff (markers are create-only: a retry never doubles an output), up to ``COMMIT_ATTEMPTS`` times in
  a row; a permanent storage error fails the job.
* Progress (watermark, done ids above it, dead letters) is saved after the commits it describes, one
  save at a time, about every second and soon after a dead letter. A re-run resumes from it.
* Stateful slots apply their batches in id order. A slot checkpoint is persisted by the worker only
  below ``floor`` (the slot's smallest batch not committed), so a restore never skips a lost output. The
  worker learns the floor with each call; and when an answer says it holds a snapshot (``snapshot``, its
  cursor), the group holding the outputs below it is committed at once and, as soon as that commit
  lands, `PersistState` tells the worker out of band, so the persisted checkpoint trails the slot by a
  commit and a save rather than by the calls queued on it. A restored or rolled-back slot replays from
  its cursor; batches already done replay without output.
* Hot snapshots (`resilient.runtime.hot`): a stateful call may ship the newest snapshot it took beside its
  answers (``CallAnswered.hot``, kept in driver memory). Every batch below its cursor answered without
  error in that call or an earlier one of the slot, and an accepted answer's output is committed (or
  the job fails), so a replacement may start from it: `StartActor` carries the slot's newest, which the
  worker restores instead of the persisted checkpoint (falling back to it if the token is lost). It
  saves the wait for the commit and the save behind a checkpoint, and the read from storage. Only the
  answers the scheduler accepts count (a forgotten call's or a zombie's never do); a hand-over's
  persisted state (exact) supersedes it, and it is gone with the driver (a re-run restores from storage).

Failures
--------
* Death while batches run (`ActorDown`): the slot gets a new incarnation (a standby when one is built).
  ``Cause.PROCESS`` with one batch in flight charges that batch an attempt; with several, each becomes a
  *suspect* that runs alone, so the next death names its batch. External causes (node lost,
  preempted, OOM-killed) charge nothing. Stateless in-flight batches go back to the front of the ready
  queue; a stateful replacement restores and replays.
* Death while starting: ``Cause.USER`` (constructor or restore raised) counts towards
  ``max_attempts`` starts in a row, then fails the job with the user's traceback. Any other cause is
  not the pipeline's fault: retried after a backoff, under its own budget (``start_deaths`` in a row per
  slot), so that only a crash loop ends the job. A start that does not answer within
  ``start_timeout_seconds`` counts the same way.
* Exception in user code (`Failure`): charged; a stateless batch is retried after a backoff (a timer),
  a stateful slot is rolled back to its last checkpoint (a command, not a wait) and replays once the
  backoff has passed.
* Hang: a call running ``batch_timeout_seconds`` kills its actor; attributed like a death. A rollback or
  a final save running that long is a hang too (nothing is charged).
* Node draining (`NodeDraining`, a preemption notice): the node's slots take no more batches and are
  handed over to new incarnations, in this order: (1) the calls in flight answer (`WindDown` tells the
  worker to finish the batch it runs and answer the rest of its calls unrun: those batches wait for the
  next incarnation, so the hand-over waits for one batch, not a queue of calls); (2) stateful: the
  slot's answered outputs are committed (the next group goes at once), then the incarnation persists
  its state (`FinishActor`): a checkpoint exactly at its cursor, so the next incarnation replays
  nothing; (3) the old incarnation is killed and a standby not on a draining node takes the slot (or a
  new actor: Ray places none on a draining node). ``DRAIN_MARGIN_S`` before the deadline, whatever has
  not finished is abandoned: the slot is handed over as it is, its calls in flight are sent again and a
  stateful slot replays from its last checkpoint. Standbys on a draining node (`SpareUp` says where
  each is) are killed (`KillSpare`) and built again elsewhere.
* Preemption is never the batches' fault: a hand-over, a death Ray reports as a preemption, or any death
  on a node known to be draining charges no batch and no start budget. It counts towards
  ``preemptions`` (None: no limit), past which the job fails.
* Graceful stop (`StopRequested`: SIGTERM, Ctrl-C, ``ray job stop``): nothing more is read or sent and
  no actor is started; every slot stops like a hand-over (answers committed, stateful state persisted)
  but is not replaced; then the progress record is saved and the job ends with `StopJob`.
  ``STOP_MARGIN_S`` before the stop deadline, whatever is left is abandoned (calls in flight are run
  again by the next run). A re-run resumes with nothing replayed beyond those calls.
* Poison: ``max_attempts`` failed attempts make a dead letter (or fail the job, ``on_poison="fail"``).
* Systematic errors: when the first ``fail_fast_after`` distinct batches all raise the same error
  (exception type and raising line) before any batch succeeds, the job fails at once with it.

Nothing here blocks: waiting is a timer (`next_wakeup`), and every actor operation is a command whose
answer comes back as an input.
"""

from __future__ import annotations

import collections
import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from resilient.runtime import events as ev
from resilient.runtime.calls import BatchTimer, batches_per_call, most_per_call
from resilient.runtime.ledger import Ledger
from resilient.runtime.policy import (
    COMMIT_ATTEMPTS,
    DRAIN_MARGIN_S,
    INF,
    STOP_MARGIN_S,
    PROGRESS_EVERY_S,
    SPARE_DELAY_S,
    DeadLetter,
    Policy,
    backoff,
    failure_signature,
)
from resilient.runtime.protocol import (
    ActorDown,
    ActorUp,
    CallAnswered,
    Cause,
    CommitDone,
    CommitFailed,
    CommitGroup,
    CompleteJob,
    Emit,
    FailJob,
    Failure,
    FinishActor,
    FinishDone,
    KillActor,
    KillSpare,
    NodeDraining,
    PersistState,
    ProgressDone,
    ProgressFailed,
    RollbackActor,
    RollbackDone,
    SaveProgress,
    SendCall,
    SpareUp,
    StartActor,
    StartSpare,
    StopJob,
    StopRequested,
    WindDown,
)

__all__ = ["INF", "DeadLetter", "Policy", "Scheduler", "backoff", "failure_signature"]

# slot phases
STARTING, WAITING, RUNNING, ROLLING, FINISHING, FINISHED = "starting", "waiting", "running", "rolling", \
    "finishing", "finished"
HANDING, STOPPED = "handing", "stopped"  # persisting its state before a hand-over; done for a stopped job


@dataclass(slots=True)
class _Call:
    id: int
    slot: int
    inc: int
    ids: tuple


@dataclass(slots=True)
class _Slot:
    index: int
    inc: int = -1
    phase: str = WAITING
    epoch: int = -1
    pid: int | None = None
    node: str | None = None
    cursor: int = 0
    started: bool = False  # some incarnation has come up in this run
    inflight: collections.deque = field(default_factory=collections.deque)  # _Call, oldest first
    queue: collections.deque = field(default_factory=collections.deque)  # stateful: (batch_id, replay)
    outstanding: set = field(default_factory=set)  # stateful: queued or sent, not done
    paused_until: float = 0.0  # stateful: replays only after the backoff of a rollback
    resume_at: float = 0.0
    rolled_for: int = -1  # the batch whose exception the rollback in progress is for
    alone: int | None = None  # the call of a suspect running alone: nothing else is sent meanwhile
    quick: bool = False  # a replacement incarnation: its first new batch goes alone and is committed at once
    snapshot: int = -1  # stateful: the cursor of the snapshot its worker holds until the outputs below it commit
    told: int = -1  # the highest snapshot cursor its worker was told to persist (`PersistState`)
    hot: tuple[int, Any] | None = None  # stateful: (cursor, token) of the newest hot snapshot answered
    winding: bool = False  # told to wind down (`WindDown`): its calls in flight answer after their current batch
    user_failures: int = 0  # constructor/restore exceptions in a row
    start_deaths: int = 0  # other deaths while starting, in a row


class Scheduler:
    """One job's decisions. Feed it inputs; carry out what it returns. Not thread-safe.

    Args:
        policy: the settings it decides with.
        ledger: which batches are done (resumed from the progress record).
        dead: dead letters of earlier runs.
        rng: jitter for backoffs (seeded in simulations).
        now: the time the job starts (the driver's monotonic clock or a virtual one).

    Example:
        >>> from resilient.runtime.ledger import Ledger
        >>> s = Scheduler(Policy(slots=1, stateful=False, standby=0), Ledger(2, 64), now=0.0)
        >>> [start] = s.start(0.0); start
        StartActor(slot=0, inc=1, spare=None, hot=None)
        >>> cmds = s.handle(ActorUp(0, start.inc, epoch=7), 0.0)   # up: two calls of one batch each
        >>> [(type(c).__name__, getattr(c, "items", None)) for c in cmds]
        [('Emit', None), ('SendCall', ((0, False),)), ('SendCall', ((1, False),))]
        >>> s.handle(ActorDown(0, start.inc, Cause.PREEMPTED), 0.1)[:2]   # not charged: sent again
        [KillActor(slot=0, inc=1), Emit(event=ActorReplaced(slot=0, reason='was preempted (preempted)', cause='preempted', redelivered=(0, 1)))]
    """

    def __init__(self, policy: Policy, ledger: Ledger, *, dead: dict[int, DeadLetter] | None = None,
                 redo: Iterable[int] = (), rng: random.Random | None = None, now: float = 0.0) -> None:
        self.policy = p = policy
        self.ledger = ledger
        self.dead: dict[int, DeadLetter] = dict(dead or {})
        self.rng = rng or random.Random()
        self.total = ledger.total
        self.slots = [_Slot(i) for i in range(p.slots)]
        self.calls: dict[int, _Call] = {}
        self.ready: collections.deque[int] = collections.deque()  # stateless batches to send, in order
        self.lone: collections.deque[int] = collections.deque()  # stateless suspects, each to run alone
        self._reserved: int | None = None  # a slot kept empty for the next lone suspect
        self.group: list[tuple[int, int, Any]] = []  # (slot, batch id, output) waiting for a commit
        self.commits: dict[int, list[tuple[int, int, Any]]] = {}  # group id -> its outputs, in flight
        self.commit_tries: dict[int, int] = {}
        self.committing: set[int] = set()  # batch ids in `group` or in a commit in flight
        self.suspects: set[int] = set()
        self.urgent: set[int] = set()  # redelivered after a death: committed without waiting
        self.failures: dict[int, list[tuple[str, str]]] = {}
        self.timer = BatchTimer()
        self.restarts = self.retries = self.calls_sent = 0
        self.read_pos = 0
        self.reading = False
        self.state = "running"  # then "complete" or "failed"
        self.error: str | None = None
        self._redo = sorted(redo)
        self._idle: dict[int, None] = {}  # running slots that can take a call (ordered: round robin)
        self._timers: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._inc = 0
        self._call = 0
        self._group_id = 0
        self._spare = 0
        self.spares: list[int] = []  # standbys built and not used yet
        self._spares_due: float | None = None
        self._last_flush = -float("inf")
        self._flush_timer = False
        self._group_urgent = 0  # redelivered batches waiting in the group: committed without delay
        self._snap_waits = False  # a slot's snapshot waits for outputs in the group: committed without delay
        self._to_finish: set[int] = set(range(p.slots))  # slots whose final state is not being saved
        self._n_finished = 0
        self._actors_seen: list[dict] | None = None
        self._draining: dict[str, float] = {}  # node -> when it goes
        self._spare_nodes: dict[int, str | None] = {}  # standby -> its node, once it is built
        self._awaiting: set[int] = set()  # leaving slots waiting for their outputs to be committed
        self._stop: StopRequested | None = None
        self.preempted = 0  # incarnations lost to a preemption (announced or not), this run
        self._progress_seq = 0
        self._progress_inflight: int | None = None
        self._progress_due = now + PROGRESS_EVERY_S
        self._progress_soon = False
        self._progress_timer = False
        self._successes = 0
        self._firsts: dict[int, tuple[str, str]] = {}  # fail fast: first failing batches' signatures
        self._fail_fast = p.fail_fast_after > 0
        self._queued = 0
        self._out: list = []
        per = most_per_call(p.batches_per_call)
        self._room = 2 * p.slots * p.queue_depth * per

    # ------------------------------------------------------------------ the interface

    def start(self, now: float) -> list:
        """The first commands: an incarnation for every slot, then the standbys."""
        for slot in self.slots:
            self._start(slot, now, spare_ok=False)
        for _ in range(self.policy.standby):
            self._build_spare()
        return self._flush_out(now)

    def handle(self, item: Any, now: float) -> list:
        """Take one input; return the commands it leads to."""
        if self.state != "running":
            return []
        name = _HANDLERS.get(type(item))
        if name is None:
            raise TypeError(f"the scheduler takes inputs of resilient.runtime.protocol, not {item!r}")
        getattr(self, name)(item, now)
        return self._flush_out(now)

    def tick(self, now: float) -> list:
        """Fire the timers due at `now` (hangs, backoffs, commit interval, progress)."""
        if self.state != "running":
            return []
        timers = self._timers
        if not timers or timers[0][0] > now:
            return []  # nothing is due: nothing has changed since the last input
        while timers and timers[0][0] <= now and self.state == "running":
            _, _, kind, arg = heapq.heappop(timers)
            getattr(self, _TIMERS[kind])(arg, now)
        return self._flush_out(now)

    def next_wakeup(self) -> float | None:
        """When `tick` next has something to do (None: only an input can move the job)."""
        return self._timers[0][0] if self._timers else None

    def commit_floor(self, slot: int) -> int:
        out = self.slots[slot].outstanding
        return min(out) if out else INF

    def progress_fields(self) -> dict:
        """What the progress record needs from the scheduler (`resilient.runtime.records`)."""
        return {
            **self.ledger.snapshot(),
            "dead": [d.__dict__ for d in self.dead.values()],
            "restarts": self.restarts,
            "retries": self.retries,
            "actors": self._actors(),
            "state": self.state,
            "error": self.error,
        }

    def _actors(self) -> list[dict]:
        if self._actors_seen is None:  # rebuilt only when an incarnation came up or went
            self._actors_seen = [{"slot": s.index, "pid": s.pid, "node_id": s.node, "epoch": s.epoch}
                                 for s in self.slots if s.pid is not None]
        return list(self._actors_seen)

    # ------------------------------------------------------------------ inputs

    def _on_up(self, e: ActorUp, now: float) -> None:
        slot = self.slots[e.slot]
        if slot.inc != e.inc or slot.phase != STARTING:
            return
        slot.phase, slot.epoch, slot.pid, slot.node = RUNNING, e.epoch, e.pid, e.node
        self._actors_seen = None
        slot.cursor = e.cursor
        if slot.hot is not None and slot.hot[0] < e.cursor:
            slot.hot = None  # storage held a newer state
        slot.user_failures = slot.start_deaths = 0
        slot.quick = slot.started and self.policy.stateful
        slot.started = True
        slot.paused_until = 0.0
        self._emit(ev.ActorStarted(e.slot, e.pid, e.epoch, e.cursor, e.generation, e.node, e.hot))
        if self.policy.stateful and self.reading:
            self._rebuild_queue(slot)
        self._idle[slot.index] = None
        if len(self.spares) < self.policy.standby and self._spares_due is None:
            self._spares_due = now + SPARE_DELAY_S
            self._timer(self._spares_due, "spares", self._spares_due)
        self._maybe_top_up_spares()
        if not self.reading and all(s.started for s in self.slots):
            self._begin_reading()
        if self._draining or self._stop is not None:
            self._drain_check(slot, now, arm=True)

    def _on_down(self, e: ActorDown, now: float) -> None:
        slot = self.slots[e.slot]
        if slot.inc != e.inc or slot.phase in (WAITING, FINISHED, STOPPED):
            return
        cause = e.cause
        if cause in (Cause.PROCESS, Cause.NODE) and slot.node is not None and slot.node in self._draining:
            cause = Cause.PREEMPTED  # its node was announced to go: the preemption, not the batch
        if slot.phase == STARTING:
            self._start_died(slot, cause, e.error, e.traceback, now)
            return
        lost = self._inflight_ids(slot)
        culprit = None
        if cause is Cause.PROCESS and slot.phase == RUNNING:
            if len(lost) == 1:
                culprit = lost[0]
            else:
                self.suspects.update(lost)
        what = {Cause.USER: "could not restore its state", Cause.NODE: "lost its node",
                Cause.PREEMPTED: "was preempted", Cause.OOM: "was killed for lack of memory"}.get(cause, "died")
        self._replace(slot, f"{what} ({e.error.splitlines()[0] if e.error else cause.value})", cause, culprit,
                      now, error=e.error)

    def _on_answer(self, e: CallAnswered, now: float) -> None:
        call = self.calls.get(e.call)
        if call is None:
            return  # its incarnation was replaced or rolled back: dropped
        slot = self.slots[call.slot]
        if any(answer.epoch != slot.epoch for answer in e.answers):
            # a zombie answered in the incarnation's place: nothing of it is committed, and the
            # incarnation is replaced like a dead one (its calls, this one too, go again)
            self._replace(slot, "answered under a fenced epoch", Cause.PROCESS, None, now)
            return
        del self.calls[e.call]
        if slot.inflight and slot.inflight[0] is call:
            slot.inflight.popleft()
            if slot.inflight:
                self._watch_head(slot, now)
        else:
            slot.inflight.remove(call)
        if slot.alone == call.id:
            slot.alone = None
        if slot.phase == RUNNING and not (self._draining and slot.node in self._draining):
            self._idle[slot.index] = None
        stateful, fresh = self.policy.stateful, False
        if e.hot is not None and stateful and (slot.hot is None or e.hot[0] > slot.hot[0]):
            slot.hot = e.hot  # the worker ships one only below the call's first failure
        for answer in e.answers:
            b = answer.batch_id
            self.suspects.discard(b)
            if type(answer) is Failure:
                self._raised(slot, b, answer.error, answer.traceback, now)
                if stateful:
                    return  # rolled back: the call's later batches did not run; they replay
                continue
            self._successes += 1
            self.timer.add(answer.seconds)
            if answer.snapshot is not None and answer.snapshot > slot.told and answer.snapshot != slot.snapshot:
                slot.snapshot, fresh = answer.snapshot, True  # persisted once the outputs below it are committed
            if answer.output is None or b in self.committing or self.ledger.is_done(b):
                continue
            self.committing.add(b)
            self.group.append((slot.index, b, answer.output))
            if b in self.urgent:
                self._group_urgent += 1
        if slot.snapshot >= 0 and not self._persist_if_covered(slot) and fresh:
            self._snap_waits = True  # the group holding the outputs below it goes at once
        if not stateful and len(e.answers) < len(call.ids):  # the call failed as a whole: the rest go again
            answered = {answer.batch_id for answer in e.answers}
            again = [b for b in call.ids if b not in answered and not self.ledger.is_done(b)
                     and b not in self.committing]
            self.ready.extendleft(reversed(again))
            self._queued += len(again)
        if (self._draining or self._stop is not None) and slot.inc == call.inc:
            self._drain_check(slot, now)

    def _on_rolled(self, e: RollbackDone, now: float) -> None:
        slot = self.slots[e.slot]
        if slot.inc != e.inc or slot.phase != ROLLING:
            return
        slot.cursor = e.cursor
        slot.phase = RUNNING
        self._emit(ev.SlotRolledBack(slot.index, slot.rolled_for, slot.cursor))
        self._rebuild_queue(slot)
        self._idle[slot.index] = None
        if slot.resume_at > now:
            slot.paused_until = slot.resume_at
            self._timer(slot.resume_at, "resume", slot.index)
        if self._draining or self._stop is not None:
            self._drain_check(slot, now, arm=True)

    def _on_finished(self, e: FinishDone, now: float) -> None:
        slot = self.slots[e.slot]
        if slot.inc != e.inc:
            return
        if slot.phase == FINISHING:
            slot.phase = FINISHED
            slot.hot = None  # its object store memory goes
            self._n_finished += 1
        elif slot.phase == HANDING:  # its state is persisted at its cursor: the next incarnation replays nothing
            slot.phase = RUNNING
            slot.hot = None  # older than that
            self._leave(slot, now)

    def _on_commit(self, e: CommitDone, now: float) -> None:
        group = self.commits.pop(e.group, None)
        if group is None:
            return
        self.commit_tries.pop(e.group, None)
        ledger, stateful = self.ledger, self.policy.stateful
        for s, b, _ in group:  # committed now, or by an earlier run whose marker we had not seen
            self.committing.discard(b)
            self.urgent.discard(b)
            if stateful:
                self.slots[s].outstanding.discard(b)
            self.failures.pop(b, None)
            ledger.mark_done(b)
        self._emit(ev.BatchesCommitted(tuple(b for _, b, _ in group), tuple(o for _, _, o in group)))
        if stateful:
            for s in {s for s, _, _ in group}:
                if self.slots[s].snapshot >= 0:
                    self._persist_if_covered(self.slots[s])
        self._maybe_top_up_spares()
        for s in list(self._awaiting):
            self._drain_check(self.slots[s], now)

    def _persist_if_covered(self, slot: _Slot) -> bool:
        """Tell the slot's worker to persist its snapshot as soon as every output below it is committed,
        instead of waiting for the floor to reach it with the next call; False if some is not yet."""
        if self.commit_floor(slot.index) < slot.snapshot:
            return False
        # the bound is the snapshot's own cursor, not the floor: by the time the worker reads it, it may hold
        # a newer snapshot, past batches sent since (the floor is INF when none is outstanding)
        self._out.append(PersistState(slot.index, slot.inc, slot.snapshot))
        slot.told, slot.snapshot = slot.snapshot, -1
        return True

    def _on_commit_failed(self, e: CommitFailed, now: float) -> None:
        if e.group not in self.commits:
            return
        tries = self.commit_tries.get(e.group, 0) + 1
        self.commit_tries[e.group] = tries
        if not e.retryable or tries >= COMMIT_ATTEMPTS:
            self._fail(f"the sink could not commit a group of {len(self.commits[e.group])} outputs "
                       f"({tries} attempts): {e.error}")
            return
        self._timer(now + self._backoff(tries), "recommit", e.group)

    def _on_progress(self, e: ProgressDone, now: float) -> None:
        if self._progress_inflight == e.seq:
            self._progress_inflight = None

    def _on_progress_failed(self, e: ProgressFailed, now: float) -> None:
        if self._progress_inflight != e.seq:
            return
        self._progress_inflight = None
        if not e.retryable:
            self._fail(f"the job's progress could not be saved: {e.error}")
            return
        self._progress_soon = True  # the next one goes as soon as allowed: a record is whole or absent

    def _on_draining(self, e: NodeDraining, now: float) -> None:
        """A node is about to go: its slots are handed over (see the module docstring) and its standbys
        replaced. Nothing is charged: it is not the batches' doing."""
        if self._draining.get(e.node) == e.deadline:
            return  # told again
        self._draining[e.node] = e.deadline
        for spare in [sp for sp in self.spares if self._spare_nodes.get(sp) == e.node]:
            self._drop_spare(spare)
        for slot in self.slots:
            if slot.node == e.node:
                self._drain_check(slot, now, arm=True)

    def _on_spare_up(self, e: SpareUp, now: float) -> None:
        if e.spare not in self.spares:
            return
        self._spare_nodes[e.spare] = e.node
        if e.node is not None and e.node in self._draining:
            self._drop_spare(e.spare)

    def _drop_spare(self, spare: int) -> None:
        self.spares.remove(spare)
        self._spare_nodes.pop(spare, None)
        self._out.append(KillSpare(spare))
        if self._stop is None:
            self._top_up_spares()

    def _on_stop(self, e: StopRequested, now: float) -> None:
        if self._stop is not None:
            return
        self._stop = e
        self._spares_due = None
        for sp in list(self.spares):
            self._spare_nodes.pop(sp, None)
            self._out.append(KillSpare(sp))
        self.spares.clear()
        for slot in self.slots:
            if slot.phase in (STARTING, WAITING, ROLLING):
                self._stop_slot(slot)  # nothing of it to save: its state is its last checkpoint
            else:
                self._drain_check(slot, now, arm=True)
        self._timer(e.deadline - STOP_MARGIN_S, "stop", None)

    def _leaving_at(self, slot: _Slot) -> float | None:
        """When `slot` must be off its incarnation (its node's drain deadline, the stop deadline), with the
        margin taken off; None if it is not leaving."""
        at = None
        if slot.node is not None and slot.node in self._draining:
            at = self._draining[slot.node] - DRAIN_MARGIN_S
        if self._stop is not None:
            stop = self._stop.deadline - STOP_MARGIN_S
            at = stop if at is None else min(at, stop)
        return at

    def _leaving(self, slot: _Slot) -> bool:
        """Its node is draining or the job is stopping: it takes no new batch."""
        return self._leaving_at(slot) is not None

    def _drain_check(self, slot: _Slot, now: float, *, arm: bool = False) -> None:
        """Move a leaving slot (node draining, job stopping) one step on: wait for its calls in flight,
        then (stateful) for its outputs' commit, then persist its state, then leave; past its deadline,
        leave as it is. With `arm`, also set the timer of that deadline."""
        at = self._leaving_at(slot)
        if at is None or slot.phase in (STARTING, WAITING, FINISHED, STOPPED):
            self._awaiting.discard(slot.index)
            return
        self._idle.pop(slot.index, None)
        if slot.phase == RUNNING and slot.inflight and not slot.winding and now < at:
            slot.winding = True  # its queued calls would put the hand-over off: they answer at once, unrun
            self._out.append(WindDown(slot.index, slot.inc))
        if now >= at:
            if slot.phase in (RUNNING, HANDING, ROLLING):
                self._awaiting.discard(slot.index)
                self._leave(slot, now)
            return
        if slot.phase == RUNNING and not slot.inflight:
            if not self.policy.stateful:
                self._leave(slot, now)
            elif self._uncommitted(slot):
                self._awaiting.add(slot.index)  # the group goes at once (`_maybe_flush`); checked at its commit
            else:
                self._awaiting.discard(slot.index)
                slot.phase = HANDING
                self._out.append(FinishActor(slot.index, slot.inc))
        if arm:
            self._timer(at, "drain", (slot.index, slot.inc))

    def _uncommitted(self, slot: _Slot) -> bool:
        """Some output of `slot` has answered and is not committed yet (in the group or a commit)."""
        i = slot.index
        return any(s == i for s, _, _ in self.group) or any(s == i for g in self.commits.values() for s, _, _ in g)

    def _leave(self, slot: _Slot, now: float) -> None:
        """Take the slot off its incarnation: stopped, if the job is stopping; else handed over."""
        self._awaiting.discard(slot.index)
        if self._stop is not None:
            self._stop_slot(slot)
        else:
            self._replace(slot, f"handed over: its node {slot.node} is draining", Cause.PREEMPTED, None, now)

    def _stop_slot(self, slot: _Slot) -> None:
        if slot.phase != WAITING:
            self._out.append(KillActor(slot.index, slot.inc))
        for call in slot.inflight:  # run again by the next run
            self.calls.pop(call.id, None)
        slot.inflight.clear()
        self._idle.pop(slot.index, None)
        self._awaiting.discard(slot.index)
        slot.phase = STOPPED

    def _t_drain(self, arg: tuple[int, int], now: float) -> None:
        s, inc = arg
        slot = self.slots[s]
        if slot.inc == inc:
            self._drain_check(slot, now)

    def _t_stop(self, arg: Any, now: float) -> None:
        for slot in self.slots:
            if slot.phase not in (FINISHED, STOPPED, FINISHING):
                self._stop_slot(slot)
        self._maybe_stopped(now, late=True)

    def _maybe_stopped(self, now: float, *, late: bool = False) -> None:
        """A stopping job ends once every slot has stopped and every answered output is committed (or at
        its deadline, whatever is left)."""
        if not late and (self.group or self.commits or any(s.phase not in (STOPPED, FINISHED) for s in self.slots)):
            return
        assert self._stop is not None
        self.state = "stopped"
        self._out.append(SaveProgress(self._next_progress(), self.progress_fields(), final=True))
        ledger = self.ledger
        self._out.append(StopJob(self._stop.reason, ledger.watermark + len(ledger.done_above), self.total))

    # ------------------------------------------------------------------ timers

    def _timer(self, when: float, kind: str, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, arg))

    def _t_hang(self, arg: tuple[int, int], now: float) -> None:
        s, call_id = arg
        slot = self.slots[s]
        if slot.phase != RUNNING or not slot.inflight or slot.inflight[0].id != call_id:
            return
        ids = slot.inflight[0].ids
        if len(ids) > 1:
            self.suspects.update(ids)
        what = f"batch {ids[0]}" if len(ids) == 1 else f"a call of batches {list(ids)}"
        self._replace(slot, f"hung on {what} for > {self.policy.batch_timeout_seconds:g}s", Cause.PROCESS,
                      ids[0] if len(ids) == 1 else None, now)

    def _t_stuck(self, arg: tuple[int, int, str], now: float) -> None:
        """A rollback or a final save still running after ``batch_timeout_seconds``: a hang."""
        s, inc, phase = arg
        slot = self.slots[s]
        if slot.inc == inc and slot.phase == phase:
            what = "rolling back" if phase == ROLLING else "saving its final state"
            self._replace(slot, f"hung {what} for > {self.policy.batch_timeout_seconds:g}s", Cause.PROCESS, None, now)

    def _t_start_timeout(self, arg: tuple[int, int], now: float) -> None:
        s, inc = arg
        slot = self.slots[s]
        if slot.inc == inc and slot.phase == STARTING:
            self._start_died(slot, Cause.TIMEOUT,
                             f"did not start within {self.policy.start_timeout_seconds:g}s", "", now)

    def _t_restart(self, s: int, now: float) -> None:
        slot = self.slots[s]
        if slot.phase == WAITING:
            if self._stop is not None:
                self._stop_slot(slot)
            else:
                self._start(slot, now)

    def _t_retry(self, b: int, now: float) -> None:
        if not self.ledger.is_done(b) and b not in self.dead:
            (self.lone.append if b in self.suspects else self.ready.appendleft)(b)
            self._queued += 1

    def _t_resume(self, s: int, now: float) -> None:
        slot = self.slots[s]
        if slot.phase == RUNNING and slot.paused_until <= now:
            self._idle[s] = None  # the backoff after its rollback has passed: it replays

    def _t_spares(self, due: float, now: float) -> None:
        if self._spares_due == due:  # SPARE_DELAY_S after the hand-over at the latest
            self._top_up_spares()

    def _t_recommit(self, group: int, now: float) -> None:
        outputs = self.commits.get(group)
        if outputs is not None:
            self._out.append(CommitGroup(group, tuple(b for _, b, _ in outputs), tuple(o for _, _, o in outputs)))

    def _t_flush(self, arg: Any, now: float) -> None:
        self._flush_timer = False

    def _t_progress(self, arg: Any, now: float) -> None:
        self._progress_timer = False  # `_maybe_save_progress` runs after every tick

    # ------------------------------------------------------------------ slots and actors

    def _start(self, slot: _Slot, now: float, *, spare_ok: bool = True) -> None:
        self._inc += 1
        slot.inc, slot.phase = self._inc, STARTING
        slot.snapshot = slot.told = -1
        slot.winding = False
        slot.alone = None
        self._to_finish.add(slot.index)
        slot.pid = slot.node = None
        slot.epoch = -1
        self._actors_seen = None
        spare = None
        if spare_ok:  # the oldest standby not on a draining node (where it is may not be known yet)
            draining = self._draining
            spare = next((sp for sp in self.spares if self._spare_nodes.get(sp) not in draining), None)
            if spare is not None:
                self.spares.remove(spare)
                self._spare_nodes.pop(spare, None)
        self._out.append(StartActor(slot.index, slot.inc, spare, None if slot.hot is None else slot.hot[1]))
        self._timer(now + self.policy.start_timeout_seconds, "start_timeout", (slot.index, slot.inc))

    def _build_spare(self) -> None:
        self._spare += 1
        self.spares.append(self._spare)
        self._out.append(StartSpare(self._spare))

    def _maybe_top_up_spares(self) -> None:
        """Standbys used by a hand-over are rebuilt once the batches it redelivered are committed, and the
        first new batch of each replacement (or, by the "spares" timer, SPARE_DELAY_S after it): building
        one takes a core for about a second, which the replacement needs first."""
        if self._spares_due is not None and not self.urgent and not any(s.quick for s in self.slots):
            self._top_up_spares()

    def _top_up_spares(self) -> None:
        self._spares_due = None
        while len(self.spares) < self.policy.standby and self._stop is None:
            self._build_spare()

    def _start_died(self, slot: _Slot, cause: Cause, error: str, tb: str, now: float) -> None:
        """An incarnation died before serving: the user's exception fails the job after `max_attempts`
        in a row; any other death is retried after a backoff under the `start_deaths` budget."""
        p = self.policy
        self.restarts += 1
        self._out.append(KillActor(slot.index, slot.inc))  # a restore that raised leaves the actor up
        if cause is Cause.USER:
            slot.user_failures += 1
            n = slot.user_failures
            if n >= p.max_attempts:
                self._fail(f"slot {slot.index}: the pipeline's constructor or restore raised {n} times in a "
                           f"row; the last time: {error}", tb)
                return
            reason = f"could not start: {error.splitlines()[0] if error else 'its constructor raised'}"
        elif cause is Cause.PREEMPTED:  # not a crash loop: the preemption budget counts it
            n = max(1, slot.start_deaths)
            if not self._preempted():
                return
            reason = f"was preempted while starting ({error.splitlines()[0] if error else cause.value})"
        else:
            slot.start_deaths += 1
            n = slot.start_deaths
            if n > p.start_deaths:
                self._fail(f"slot {slot.index}: {n} actors in a row died while starting, none of them by an "
                           f"exception of the pipeline (killed, out of memory, node lost); the last one: "
                           f"{error or cause.value}", tb)
                return
            reason = f"died while starting ({error.splitlines()[0] if error else cause.value})"
        slot.phase = WAITING
        self._idle.pop(slot.index, None)
        self._emit(ev.ActorReplaced(slot.index, reason, cause.value, ()))
        if self._stop is not None:
            self._stop_slot(slot)
            return
        self._timer(now + self._backoff(n), "restart", slot.index)

    def _replace(self, slot: _Slot, reason: str, cause: Cause, culprit: int | None, now: float,
                 error: str = "") -> None:
        """The slot's incarnation is gone (died, hung, could not restore): forget its calls, charge the
        culprit if there is one, start the next incarnation, and send stateless batches again."""
        lost = self._inflight_ids(slot)
        ledger = self.ledger
        self.urgent.update(b for b in lost if not ledger.is_done(b))
        for call in slot.inflight:
            self.calls.pop(call.id, None)
        slot.inflight.clear()
        self._idle.pop(slot.index, None)
        self._out.append(KillActor(slot.index, slot.inc))
        self.restarts += 1
        self._emit(ev.ActorReplaced(slot.index, reason, cause.value, tuple(lost)))
        if cause is Cause.PREEMPTED and not self._preempted():
            return
        if culprit is not None and not ledger.is_done(culprit):
            self._charge(culprit, f"{reason}: {error}".strip(": ") if error else reason, "")
            if self.state != "running":
                return
        if not self.policy.stateful:
            again = [b for b in lost if not ledger.is_done(b) and b not in self.dead]
            self.ready.extendleft(reversed([b for b in again if b not in self.suspects]))
            self.lone.extend(b for b in again if b in self.suspects)
            self._queued += len(again)
        else:
            self._queued -= len(slot.queue)
            slot.queue.clear()
        if self._stop is not None:
            slot.phase = WAITING  # its actor is killed above
            self._stop_slot(slot)
            return
        self._start(slot, now)

    def _preempted(self) -> bool:
        """Count one preempted incarnation; False (and the job failed) past the preemption budget."""
        self.preempted += 1
        budget = self.policy.preemptions
        if budget is not None and self.preempted > budget:
            self._fail(f"{self.preempted} worker actors were preempted, more than the {budget} allowed "
                       "(RESILIENT_PREEMPTIONS); the job stops here and resumes when re-run")
            return False
        return True

    def _rebuild_queue(self, slot: _Slot) -> None:
        """After a restore or a rollback: every batch of the slot from its cursor up to the read position,
        in order; those done (or on their way to a commit) as replays."""
        self._queued -= len(slot.queue)
        slot.queue.clear()
        ledger, committing, dead = self.ledger, self.committing, self.dead
        for b in range(slot.cursor, self.read_pos, self.policy.slots):
            if b in dead:
                continue
            slot.queue.append((b, ledger.is_done(b) or b in committing))
        self._queued += len(slot.queue)

    @staticmethod
    def _inflight_ids(slot: _Slot) -> list[int]:
        return [b for call in slot.inflight for b in call.ids]

    def _watch_head(self, slot: _Slot, now: float) -> None:
        self._timer(now + self.policy.batch_timeout_seconds, "hang", (slot.index, slot.inflight[0].id))

    # ------------------------------------------------------------------ failures

    def _raised(self, slot: _Slot, b: int, error: str, tb: str, now: float) -> None:
        if self._fail_fast and self._systematic(b, error, tb):
            return
        attempts = self._charge(b, error, tb)
        if self.state != "running":
            return
        dead = b in self.dead
        if self.policy.stateful:
            for call in slot.inflight:
                self.calls.pop(call.id, None)
            slot.inflight.clear()
            slot.alone = None
            self._idle.pop(slot.index, None)
            self._queued -= len(slot.queue)
            slot.queue.clear()
            slot.phase = ROLLING
            slot.snapshot = slot.told = -1  # the rollback drops the worker's snapshot
            slot.resume_at = now if dead else now + self._backoff(attempts)
            slot.rolled_for = b
            self._out.append(RollbackActor(slot.index, slot.inc))
            self._timer(now + self.policy.batch_timeout_seconds, "stuck", (slot.index, slot.inc, ROLLING))
        elif not dead:
            self._timer(now + self._backoff(attempts), "retry", b)

    def _systematic(self, b: int, error: str, tb: str) -> bool:
        """Fail fast: True (and the job failed) when the first distinct failing batches all raised the
        same error before any batch succeeded."""
        if self._successes:
            self._fail_fast = False
            return False
        sig = failure_signature(error, tb)
        if b not in self._firsts:
            if self._firsts and sig != next(iter(self._firsts.values())):
                self._fail_fast = False
                return False
            self._firsts[b] = sig
        if len(self._firsts) >= self.policy.fail_fast_after:
            ids = sorted(self._firsts)
            self._fail(f"the first {len(ids)} batches that ran ({', '.join(map(str, ids))}) all raised the same "
                       f"error and none succeeded: {error}", tb)
            return True
        return False

    def _charge(self, b: int, error: str, tb: str) -> int:
        """Count a failed attempt of batch `b`; dead-letter it when it has had enough (or fail the job,
        ``on_poison="fail"``). Return how many attempts it has had."""
        attempts = self.ledger.failed_attempt(b)
        self.retries += 1
        history = self.failures.setdefault(b, [])
        history.append((error, tb))
        if attempts < self.policy.max_attempts:
            self._emit(ev.BatchRetried(b, attempts, error))
            return attempts
        del self.failures[b]
        every = "; ".join(f"attempt {i}: {e}" for i, (e, _) in enumerate(history, 1))
        last_tb = next((t for _, t in reversed(history) if t), "")
        if self.policy.on_poison == "fail":
            self._fail(f"batch {b} failed {attempts} times (poison): {every}", last_tb)
            return attempts
        self.dead[b] = DeadLetter(b, every, last_tb, attempts)
        self.urgent.discard(b)
        self.suspects.discard(b)
        if self.policy.stateful:
            self.slots[b % self.policy.slots].outstanding.discard(b)
        self.ledger.mark_done(b)
        self._progress_soon = True
        self._emit(ev.BatchDeadLettered(b, every, attempts))
        return attempts

    def _backoff(self, attempt: int) -> float:
        p = self.policy
        return backoff(attempt, p.backoff_seconds, p.backoff_max_seconds, self.rng.random())

    def _fail(self, error: str, tb: str = "") -> None:
        self.state, self.error = "failed", error
        self._out.append(FailJob(error, tb))

    def _emit(self, event: Any) -> None:
        self._out.append(Emit(event))

    # ------------------------------------------------------------------ reading, dispatch, commits

    def _begin_reading(self) -> None:
        self.reading = True
        start = self.ledger.watermark
        if self.policy.stateful:
            start = min([start] + [s.cursor for s in self.slots])
        self.read_pos = start
        for b in self._redo:  # retried dead letters below the watermark (stateless only)
            self.ready.append(b)
            self._queued += 1
        if self._redo:
            self._progress_soon = True  # the request is taken: its batches are not dead any more

    def _fill(self) -> None:
        """Read ahead (ids only) within the ledger's window and the queue room."""
        ledger, total, stateful, slots = self.ledger, self.total, self.policy.stateful, self.slots
        n = self.policy.slots
        pos = self.read_pos
        limit = min(total, ledger.watermark + ledger.window)
        while pos < limit and self._queued < self._room:
            b = pos
            pos += 1
            if stateful:
                slot = slots[b % n]
                if b < slot.cursor or b in self.dead:
                    continue
                done = ledger.is_done(b)
                slot.queue.append((b, done))
                self._queued += 1
                if not done:
                    slot.outstanding.add(b)
                if slot.phase == RUNNING and len(slot.inflight) < self.policy.queue_depth:
                    self._idle[slot.index] = None
            elif not ledger.is_done(b):
                self.ready.append(b)
                self._queued += 1
        self.read_pos = pos

    def _per_call(self) -> int:
        p = self.policy
        return batches_per_call(p.batches_per_call, self.timer.seconds, p.batch_timeout_seconds, stateful=p.stateful)

    def _dispatch(self, now: float) -> None:
        if self.policy.stateful:
            self._dispatch_own(now)
            return
        if self.lone:
            self._dispatch_lone(now)
        self._dispatch_shared(now)

    def _dispatch_shared(self, now: float) -> None:
        """Stateless: batches of the ready queue to the slots with room, in turn."""
        ready, idle = self.ready, self._idle
        if not ready or not idle:
            return
        depth, per_call = self.policy.queue_depth, self._per_call()
        for s in list(idle):
            if not ready:
                return
            slot = self.slots[s]
            if slot.phase != RUNNING or slot.alone is not None or s == self._reserved or self._leaving(slot):
                del idle[s]
                continue
            while len(slot.inflight) < depth and ready:
                n = min(per_call, len(ready))
                self._queued -= n
                self._send(slot, tuple((ready.popleft(), False) for _ in range(n)), now)
            if len(slot.inflight) >= depth:
                del idle[s]

    def _dispatch_lone(self, now: float) -> None:
        """Stateless suspects, each alone on an actor with nothing else in flight. A slot is reserved for
        them (sent nothing more) until it is empty, so a suspect never waits behind a busy pool."""
        while self.lone:
            slot = self._lone_slot()
            if slot is None:
                return
            self._queued -= 1
            self._send(slot, ((self.lone.popleft(), False),), now)
            slot.alone = self._call
            self._idle.pop(slot.index, None)

    def _lone_slot(self) -> _Slot | None:
        if self._reserved is not None:
            slot = self.slots[self._reserved]
            if slot.phase == RUNNING and slot.alone is None:
                if slot.inflight:
                    return None
                self._reserved = None
                return slot
            self._reserved = None
        for s in self._idle:
            slot = self.slots[s]
            if slot.phase == RUNNING and slot.alone is None and not slot.inflight:
                return slot
        for slot in self.slots:  # once per reservation
            if slot.phase == RUNNING and slot.alone is None:
                self._reserved = slot.index
                self._idle.pop(slot.index, None)
                return None
        return None

    def _dispatch_own(self, now: float) -> None:
        """Stateful: each slot's own queue, in id order; a suspect alone on its actor."""
        idle = self._idle
        if not idle:
            return
        depth, per_call, suspects = self.policy.queue_depth, self._per_call(), self.suspects
        for s in list(idle):
            slot = self.slots[s]
            if slot.phase != RUNNING or slot.paused_until > now or slot.alone is not None or self._leaving(slot):
                del idle[s]  # (reading ahead marks a slot idle again: a leaving one takes nothing new)
                continue
            q = slot.queue
            while len(slot.inflight) < depth and q:
                if suspects and q[0][0] in suspects:
                    if slot.inflight:
                        break
                    self._queued -= 1
                    self._send(slot, (q.popleft(),), now)
                    slot.alone = self._call
                    break
                items, n = [], per_call
                if slot.quick and not q[0][1]:  # a new incarnation's first new batch: alone, committed at once
                    slot.quick = False
                    n = 1
                    self.urgent.add(q[0][0])
                while q and len(items) < n and not (suspects and q[0][0] in suspects):
                    items.append(q.popleft())
                self._queued -= len(items)
                self._send(slot, tuple(items), now)
            if len(slot.inflight) >= depth or not q or slot.alone is not None:
                del idle[s]

    def _send(self, slot: _Slot, items: tuple, now: float) -> None:
        self._call += 1
        call = _Call(self._call, slot.index, slot.inc, tuple(b for b, _ in items))
        self.calls[call.id] = call
        slot.inflight.append(call)
        if len(slot.inflight) == 1:
            self._watch_head(slot, now)
        self.calls_sent += 1
        floor = self.commit_floor(slot.index) if self.policy.stateful else INF
        self._out.append(SendCall(slot.index, slot.inc, call.id, items, floor))

    def _maybe_flush(self, now: float) -> None:
        """Start the next group commit when the committer is idle and the interval has passed (or the
        group is full, or an urgent batch or the job's tail waits)."""
        if not self.group or self.commits:
            return
        p = self.policy
        full = len(self.group) >= p.commit_group_size
        urgent = (not self.calls or self._group_urgent or self._snap_waits or self._awaiting
                  or self._stop is not None)
        due = self._last_flush + p.commit_interval_seconds
        if not (full or urgent) and now < due:
            if not self._flush_timer:
                self._flush_timer = True
                self._timer(due, "flush", None)
            return
        self._last_flush = now
        self._snap_waits = False
        group, self.group = self.group[: p.commit_group_size], self.group[p.commit_group_size:]
        if self._group_urgent:
            self._group_urgent -= sum(1 for _, b, _ in group if b in self.urgent)
        self._group_id += 1
        self.commits[self._group_id] = group
        self._out.append(CommitGroup(self._group_id, tuple(b for _, b, _ in group), tuple(o for _, _, o in group)))

    def _maybe_finish(self, now: float) -> None:
        """Once every batch is done: each idle stateful slot persists its final state, once; then the job
        is complete."""
        if not self.reading or self.read_pos < self.total or not self.ledger.finished or self.commits or self.group:
            return  # (until everything is read, a stateful slot may have replays to queue)
        for s in list(self._to_finish):
            slot = self.slots[s]
            if not self.policy.stateful:
                slot.phase = FINISHED
                self._n_finished += 1
                self._to_finish.discard(s)
            elif slot.phase == RUNNING and not slot.queue and not slot.inflight:
                self._to_finish.discard(s)
                slot.phase = FINISHING
                self._idle.pop(slot.index, None)
                self._out.append(FinishActor(slot.index, slot.inc))
                self._timer(now + self.policy.batch_timeout_seconds, "stuck", (slot.index, slot.inc, FINISHING))
        if self._n_finished == len(self.slots):
            self.state = "complete"
            self._out.append(SaveProgress(self._next_progress(), self.progress_fields(), final=True))
            self._out.append(CompleteJob())

    def _next_progress(self) -> int:
        self._progress_seq += 1
        return self._progress_seq

    def _maybe_save_progress(self, now: float) -> None:
        if self._progress_inflight is not None:
            return
        if now >= self._progress_due or self._progress_soon:
            self._progress_soon = False
            self._progress_due = now + PROGRESS_EVERY_S
            self._progress_inflight = self._next_progress()
            self._out.append(SaveProgress(self._progress_inflight, self.progress_fields()))
        if not self._progress_timer:
            self._progress_timer = True
            self._timer(self._progress_due, "progress", None)

    def _flush_out(self, now: float) -> list:
        if self.state == "running":
            if self._stop is None:
                if self.reading:
                    self._fill()
                self._dispatch(now)
            self._maybe_flush(now)
            if self._stop is None:
                self._maybe_finish(now)
            else:
                self._maybe_stopped(now)
        if self.state == "running":
            self._maybe_save_progress(now)
        out, self._out = self._out, []
        return out


_HANDLERS = {
    ActorUp: "_on_up",
    ActorDown: "_on_down",
    CallAnswered: "_on_answer",
    RollbackDone: "_on_rolled",
    FinishDone: "_on_finished",
    CommitDone: "_on_commit",
    CommitFailed: "_on_commit_failed",
    ProgressDone: "_on_progress",
    ProgressFailed: "_on_progress_failed",
    NodeDraining: "_on_draining",
    SpareUp: "_on_spare_up",
    StopRequested: "_on_stop",
}

_TIMERS = {
    "hang": "_t_hang",
    "start_timeout": "_t_start_timeout",
    "stuck": "_t_stuck",
    "restart": "_t_restart",
    "retry": "_t_retry",
    "resume": "_t_resume",
    "spares": "_t_spares",
    "recommit": "_t_recommit",
    "flush": "_t_flush",
    "progress": "_t_progress",
    "drain": "_t_drain",
    "stop": "_t_stop",
}
