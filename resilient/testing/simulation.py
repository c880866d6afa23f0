"""Deterministic simulation of a job: the real scheduler against simulated actors, storage and time.

The scheduler (`resilient.runtime.scheduler`) makes every decision of a job; here it runs against a
simulated cluster instead of Ray: actors with start, batch and restore latencies, a checkpoint store with
epoch fencing, a sink with create-only markers, a progress record, and a virtual clock. Faults are drawn
from one seeded ``random.Random``, so a run is a pure function of its `Scenario`: a failing seed
reproduces with one line (`Scenario.repro`).

Faults, each at a seeded rate:

* actor deaths at any moment: while it builds or restores, during a call, a rollback, a checkpoint save
  or the final save; most are plain process deaths (``Cause.PROCESS``), some are reported as node loss,
  preemption or OOM kills (never to be charged to a batch), some announced first by a preemption notice
  (the node draining, then gone at its deadline);
* hangs (a call that never answers) and zombies (a kill that does not take: the old incarnation goes on
  answering late and saving checkpoints, which the epoch fence must refuse);
* exceptions in user code: transient (once per chosen batch, half-applied to the state first) and
  deterministic (poison batches, and batches that crash their actor every time); constructors that raise;
* failed or slow storage writes: group commits and progress saves;
* the driver crashing (every actor dies with it, a commit in flight lands partly) and the job re-run
  from its records, as `resilient.runtime.supervisor` does;
* the driver asked to stop (SIGTERM: `StopRequested` with a deadline), then the job re-run;
* hot snapshots (`resilient.runtime.hot`) shipped with stateful answers and lost with their node (a
  death reported as node loss or preemption): the replacement then restores from storage.

After the run, `check` lists every violation of the guarantees:

* every batch is committed exactly once with the reference output, or is a dead letter, and dead
  letters are only batches that failed by themselves (poison, crashers) or were charged for deaths Ray
  could not tell apart from a crash;
* for stateful pipelines, every slot's final checkpoint equals a fault-free run (dead letters skipped),
  no checkpoint is ever saved ahead of an output that is not committed (checked at each save), and no
  replacement starts from a hot snapshot ahead of a batch not answered (checked at each such start);
* the job finishes once faults stop; no attempt is charged for an external death, a drain notice or a
  stop; the scheduler's memory stays bounded by the work in flight;
* replays are counted (``replayed``, and ``replayed_after_stop`` in the runs after a stop): with
  preemption notices as the only fault and deadlines the hand-over fits in, and after a stop given
  the time it needs, nothing is replayed (tests/test_simulation.py).

Example:
    >>> r = simulate(Scenario(seed=3, batches=40, slots=2, stateful=True))
    >>> r.violations, r.completed
    ([], True)
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resilient.runtime import events as ev
from resilient.runtime import records
from resilient.runtime.ledger import Ledger
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
    Result,
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
from resilient.runtime.scheduler import DeadLetter, Policy, Scheduler

__all__ = ["Outcome", "Scenario", "random_scenario", "simulate"]


@dataclass(frozen=True)
class Scenario:
    """One simulated job: its shape, its settings, and its faults (rates per event, seeded)."""

    seed: int
    batches: int = 100
    slots: int = 2
    stateful: bool = False
    standby: int = 1
    queue_depth: int = 2
    batches_per_call: int | str = "auto"
    checkpoint_every: int = 5
    max_attempts: int = 3
    fail_fast_after: int = 0
    kill_rate: float = 0.0  # per scheduler step (an input or a tick): an actor dies (some for external causes)
    external_share: float = 0.3  # of those deaths, reported as node lost, preempted or OOM-killed
    notice_share: float = 0.0  # of those deaths, announced first by a preemption notice (a node draining)
    notice_seconds: tuple[float, float] = (0.5, 5.0)  # how far ahead a preemption notice comes
    hang_rate: float = 0.0  # per call: it never answers
    zombie_rate: float = 0.0  # per kill: it does not take, the old incarnation goes on
    transient_rate: float = 0.0  # per batch: raises once (half-applied)
    poison: tuple[int, ...] = ()  # raise every time
    crashers: tuple[int, ...] = ()  # kill their actor every time
    broken_starts: int = 0  # the first N actor constructions raise
    commit_fail_rate: float = 0.0
    progress_fail_rate: float = 0.0
    driver_crashes: int = 0  # the driver dies this many times; each time the job is re-run
    stops: int = 0  # the driver is asked to stop (SIGTERM) this many times; each time the job is re-run
    stop_seconds: tuple[float, float] = (0.5, 5.0)  # the stop deadline, after the request
    hot: bool = True  # stateful calls ship their newest snapshot (a hot snapshot) for replacements
    fault_window: float = 60.0  # virtual seconds after which no new fault is injected
    batch_seconds: float = 0.01
    time_limit: float = 3600.0  # virtual seconds: a run still going then has not finished (liveness)

    @property
    def repro(self) -> str:
        """One line that runs this scenario again."""
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if v != getattr(_DEFAULT, k) or k == "seed")
        return f"from resilient.testing.simulation import *; simulate(Scenario({fields}))"


_DEFAULT = Scenario(seed=0)


def random_scenario(seed: int, *, max_batches: int = 300) -> Scenario:
    """A scenario of varied size, settings and faults, drawn from `seed`."""
    r = random.Random(seed * 7919 + 17)
    batches = r.randint(1, max_batches)
    stateful = r.random() < 0.5
    slots = r.randint(1, 5)
    poison = tuple(sorted(r.sample(range(batches), k=min(batches, r.choice([0, 0, 1, 2])))))
    rest = [b for b in range(batches) if b not in poison]
    crashers = tuple(sorted(r.sample(rest, k=min(len(rest), r.choice([0, 0, 0, 1])))))
    return Scenario(
        seed=seed, batches=batches, slots=slots, stateful=stateful, standby=r.choice([0, 1, 2]),
        queue_depth=r.choice([1, 2, 3]), batches_per_call=r.choice(["auto", 1, 2, 4]),
        checkpoint_every=r.choice([1, 3, 10]), max_attempts=r.choice([3, 4]),
        kill_rate=r.choice([0.0, 0.005, 0.02, 0.05]), external_share=r.random(), notice_share=r.choice([0.0, 0.3]),
        hang_rate=r.choice([0.0, 0.0, 0.01]), zombie_rate=r.choice([0.0, 0.3]),
        transient_rate=r.choice([0.0, 0.02, 0.1]), poison=poison, crashers=crashers,
        broken_starts=r.choice([0, 0, 0, 1]), commit_fail_rate=r.choice([0.0, 0.05]),
        progress_fail_rate=r.choice([0.0, 0.1]), driver_crashes=r.choice([0, 0, 1, 2]),
        fault_window=r.choice([5.0, 30.0]), stops=r.choice([0, 0, 0, 1]), hot=r.random() < 0.75,
    )


@dataclass
class Outcome:
    """What a simulated job did, and what it got wrong (`violations`, empty when all guarantees held)."""

    scenario: Scenario
    completed: bool = False
    failed: str | None = None
    violations: list[str] = field(default_factory=list)
    runs: int = 0
    virtual_seconds: float = 0.0
    batches_done: int = 0  # batches taken from scheduled to committed (or dead), all runs
    decisions: int = 0  # inputs and ticks the scheduler took
    scheduler_seconds: float = 0.0  # CPU (wall) seconds spent inside the scheduler
    restarts: int = 0
    start_deaths: int = 0  # incarnations that died while starting, not by the pipeline's exception
    handovers: int = 0  # slots handed over ahead of a preemption (a node draining)
    replayed: int = 0  # batches sent again as replays (stateful: rebuilding state), all runs
    replayed_after_stop: int = 0  # of those, in the runs that follow a stop
    hot_restores: int = 0  # replacements that started from a hot snapshot
    hot_lost: int = 0  # hot snapshots handed to a replacement but lost with their node
    stops: int = 0  # runs that ended by a stop
    charged_external: int = 0
    peak_timers: int = 0
    peak_calls: int = 0


# ---------------------------------------------------------------------------------- the simulated world


@dataclass
class _Checkpoint:
    epoch: int
    cursor: int
    total: int


class _Storage:
    """Durable things: slot checkpoints (epoch-fenced), the sink's markers, the progress record."""

    def __init__(self) -> None:
        self.claimed: dict[int, int] = {}  # slot -> newest epoch claimed
        self.checkpoints: dict[int, _Checkpoint] = {}
        self.markers: dict[int, Any] = {}  # batch id -> committed output (create-only)
        self.commit_writes: dict[int, int] = {}
        self.progress: dict | None = None
        self.epoch = 0
        self.on_save: Callable[[int, int], None] | None = None  # (slot, cursor) of each checkpoint saved

    def claim(self, slot: int) -> int:
        self.epoch += 1
        self.claimed[slot] = self.epoch
        return self.epoch

    def save_checkpoint(self, slot: int, epoch: int, cursor: int, total: int) -> bool:
        if epoch < self.claimed.get(slot, 0):
            return False  # fenced: a newer incarnation owns the slot
        self.checkpoints[slot] = _Checkpoint(epoch, cursor, total)
        if self.on_save is not None:
            self.on_save(slot, cursor)
        return True

    def commit(self, batch_ids: tuple, outputs: tuple) -> None:
        for b, out in zip(batch_ids, outputs):
            self.commit_writes[b] = self.commit_writes.get(b, 0) + 1
            self.markers.setdefault(b, out)


class _Actor:
    """One simulated worker process: a pipeline keeping a running total per slot (stateful) or squaring."""

    def __init__(self, world: _World, ready_at: float) -> None:
        self.world = world
        self.ready_at = ready_at  # construction done
        self.alive = True
        self.zombie = False
        self.broken = False  # its constructor raised
        self.slot = -1
        self.inc = -1
        self.epoch = -1
        self.busy_until = ready_at
        self.pending: list[tuple] = []  # ops queued or running: (kind, arg)
        self.cursor = 0
        self.total = 0
        self.dirty = False
        self.since = 0
        self.snap: tuple[int, int] | None = None
        self.hot: tuple[int, int] | None = None  # the newest snapshot taken in the current call
        self.leaving_at = float("inf")  # told to wind down: no batch starts after this
        world.nodes += 1
        self.node = f"node-{world.nodes}"  # one actor per node: a preemption takes exactly it

    def restore(self, hot: tuple[int, int] | None = None) -> None:
        """Load the slot's hot snapshot ``(cursor, total)`` if given, else its checkpoint (if any)."""
        ck = self.world.storage.checkpoints.get(self.slot)
        s = self.world.scenario
        if hot is not None:
            self.cursor, self.total = hot
        elif ck is None:
            self.cursor, self.total = self.slot, 0
        else:
            self.cursor, self.total = ck.cursor, ck.total
        if not s.stateful:
            self.cursor = 0
        self.dirty = False
        self.snap = None
        self.since = 0

    def run_batch(self, b: int, replay: bool, floor: int) -> Any:
        w, s = self.world, self.world.scenario
        if b in w.crash_ids:
            self.world.die(self, Cause.PROCESS)
            return None
        if b in w.poison or (b in w.transient and b not in w.raised_once):
            w.raised_once.add(b)
            if s.stateful:
                self.total += 1000 + b  # half-applied: the rollback must undo it
                self.dirty = True
            return Failure(b, self.slot, self.epoch, f"ValueError: batch {b} is bad", _tb(b in w.poison))
        if s.stateful:
            self.total += b
            self.cursor = b + s.slots
            self.since += 1
            if self.since >= s.checkpoint_every:
                self.snap, self.since = (self.cursor, self.total), 0
                self.hot = self.snap
            if self.snap is not None and self.snap[0] <= floor:
                if not w.storage.save_checkpoint(self.slot, self.epoch, *self.snap):
                    return Failure(b, self.slot, self.epoch, "FencedError: a newer epoch owns the slot", "")
                self.snap = None
            out = None if replay else (b, self.total)
            snapshot = None if self.snap is None else self.snap[0]
            return Result(b, self.slot, self.epoch, out, s.batch_seconds, self.cursor, snapshot=snapshot)
        out = None if replay else (b, b * b)
        return Result(b, self.slot, self.epoch, out, s.batch_seconds, self.cursor)


def _tb(poison: bool) -> str:
    line = 41 if poison else 42
    return f'Traceback (most recent call last):\n  File "pipeline.py", line {line}, in __call__\nValueError: bad'


class _World:
    """The simulated cluster and storage, driving one scheduler per driver run."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = s = scenario
        self.rng = random.Random(scenario.seed)
        self.storage = _Storage()
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.actors: dict[int, _Actor] = {}  # inc -> actor
        self.spares: dict[int, _Actor] = {}
        self.poison = set(s.poison)
        self.crash_ids = set(s.crashers)
        self.transient = {b for b in range(s.batches) if self.rng.random() < s.transient_rate}
        self.raised_once: set[int] = set()
        self.constructions = 0
        self.nodes = 0
        self.outcome = Outcome(scenario)
        self.sched: Scheduler | None = None
        self.run_id = 0
        self.ended: str | None = None
        self.dead_letters: dict[int, DeadLetter] = {}
        self.charged: dict[int, int] = {}
        self.groups_of: dict[int, tuple[int, int]] = {}  # batch -> (run, group) that committed it
        self.commits_inflight: dict[int, CommitGroup] = {}
        self._checked: dict[int, int] = {}  # slot -> cursor below which every batch was found committed
        self.storage.on_save = self._saved
        self.lost_nodes: set[str] = set()

    def _check_hot(self, slot: int, cursor: int) -> None:
        """A replacement starts from a hot snapshot at `cursor`: every batch of the slot below it must be
        committed, on its way to a commit, or a dead letter (its output is never lost)."""
        sched = self.sched
        assert sched is not None
        for b in range(slot, min(cursor, self.scenario.batches), self.scenario.slots):
            if not (sched.ledger.is_done(b) or b in sched.committing or b in sched.dead):
                self.outcome.violations.append(f"slot {slot}: started from a hot snapshot at cursor {cursor} "
                                               f"while batch {b}'s output was not answered")
                return

    def _saved(self, slot: int, cursor: int) -> None:
        """A checkpoint at `cursor` was saved: every batch of the slot below it must be committed already
        (or a dead letter), or a restore could skip an output that a crash loses."""
        dead = self.sched.dead if self.sched is not None else {}
        s = self.scenario
        start = self._checked.get(slot, slot)  # markers and dead letters stay: what was checked holds
        for b in range(start, min(cursor, s.batches), s.slots):
            if b not in self.storage.markers and b not in dead:
                self.outcome.violations.append(f"slot {slot}: checkpoint at cursor {cursor} saved before batch "
                                               f"{b}'s output was committed")
                return
        self._checked[slot] = max(start, cursor)

    # ------------------------------------------------------------------ time

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (when, self.seq, (self.run_id, fn)))

    def faulty(self) -> bool:
        return self.now < self.scenario.fault_window

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.faulty() and self.rng.random() < rate

    # ------------------------------------------------------------------ the scheduler's edge

    def _decide(self, step: Callable[..., list], *args: Any) -> list:
        """One scheduler step, its CPU time counted."""
        t0 = time.process_time()
        commands = step(*args, self.now)
        self.outcome.scheduler_seconds += time.process_time() - t0
        self.outcome.decisions += 1
        return commands

    def feed(self, item: Any) -> None:
        if self.ended is not None or self.sched is None:
            return
        commands = self._decide(self.sched.handle, item)
        external = isinstance(item, (NodeDraining, StopRequested)) or (
            isinstance(item, ActorDown) and item.cause.external)
        if external and any(isinstance(c, Emit) and isinstance(c.event, (ev.BatchRetried, ev.BatchDeadLettered))
                            for c in commands):
            self.outcome.charged_external += 1
            what = {NodeDraining: "a drain notice", StopRequested: "a stop"}.get(
                type(item), f"an external death ({getattr(item, 'cause', None)})")
            self.outcome.violations.append(f"{what} was charged to a batch")
        self.apply(commands)

    def tick(self) -> None:
        if self.ended is not None or self.sched is None:
            return
        self.apply(self._decide(self.sched.tick))

    def apply(self, commands: list) -> None:
        for c in commands:
            getattr(self, "_c_" + type(c).__name__)(c)
            if self.ended is not None:
                return
        if self.faulty() and self.rng.random() < self.scenario.kill_rate:
            self.random_kill()
        sched = self.sched
        if sched is not None:
            self.outcome.peak_timers = max(self.outcome.peak_timers, len(sched._timers))
            self.outcome.peak_calls = max(self.outcome.peak_calls, len(sched.calls))

    # ------------------------------------------------------------------ commands

    def _new_actor(self, delay: float) -> _Actor:
        a = _Actor(self, self.now + delay)
        self.constructions += 1
        if self.constructions <= self.scenario.broken_starts:
            a.broken = True
        return a

    def _c_StartSpare(self, c: StartSpare) -> None:
        a = self.spares[c.spare] = self._new_actor(self.rng.uniform(0.5, 2.0))

        def up() -> None:
            if a.alive and self.spares.get(c.spare) is a:
                self.feed(SpareUp(c.spare, a.node))

        self.at(a.ready_at, up)

    def _c_KillSpare(self, c: KillSpare) -> None:
        a = self.spares.pop(c.spare, None)
        if a is not None:
            a.alive = False

    def _c_StartActor(self, c: StartActor) -> None:
        a = self.spares.pop(c.spare, None) if c.spare is not None else None
        if a is None:
            a = self._new_actor(self.rng.uniform(0.5, 2.0))
        a.slot, a.inc = c.slot, c.inc
        a.epoch = self.storage.claim(c.slot)
        self.actors[c.inc] = a
        if self._gone(a):  # a standby that died while it waited
            return
        when = max(self.now, a.ready_at) + self.rng.uniform(0.01, 0.2)
        a.busy_until = when
        a.pending.append(("up", c.inc))

        def up() -> None:
            if not a.alive:
                return
            a.pending.remove(("up", c.inc))
            if a.broken:
                a.alive = False
                self.feed(ActorDown(c.slot, c.inc, Cause.USER, "OSError: no weights", _tb(True)))
                return
            hot = c.hot is not None and c.hot[2] not in self.lost_nodes  # else the worker restores from storage
            self.outcome.hot_lost += c.hot is not None and not hot
            a.restore(c.hot[:2] if hot else None)
            if hot:
                self._check_hot(c.slot, a.cursor)
                self.outcome.hot_restores += 1
            gen = 1 if self.storage.checkpoints.get(c.slot) and not hot else None
            self.feed(ActorUp(c.slot, c.inc, a.epoch, pid=1000 + c.inc, node=a.node, cursor=a.cursor, generation=gen,
                              hot=hot))

        self.at(when, up)

    def _gone(self, a: _Actor) -> bool:
        """An op sent to a dead actor fails at once (Ray answers it with the actor's death)."""
        if a.alive:
            return False
        self.at(self.now + 0.002, lambda: self.feed(ActorDown(a.slot, a.inc, Cause.PROCESS, "dead already")))
        return True

    def _c_SendCall(self, c: SendCall) -> None:
        a = self.actors.get(c.inc)
        if a is None:
            self.outcome.violations.append(f"call {c.call} sent to unknown incarnation {c.inc}")
            return
        if self._gone(a):
            return
        s = self.scenario
        replays = sum(1 for _, replay in c.items if replay)
        self.outcome.replayed += replays
        if self.outcome.stops:
            self.outcome.replayed_after_stop += replays
        start = max(self.now, a.busy_until)
        each = s.batch_seconds * self.rng.uniform(0.5, 2.0)
        done = start + each * len(c.items) + 0.001
        a.busy_until = done
        op = ("call", c.call)
        a.pending.append(op)
        if self.chance(s.hang_rate):
            a.busy_until = float("inf")
            return  # never answers

        def answer() -> None:
            if not a.alive or op not in a.pending:
                return
            a.pending.remove(op)
            if a.dirty:
                return  # refuses calls until rolled back (the driver drops the refusal)
            answers = []
            a.hot = None
            for i, (b, replay) in enumerate(c.items):
                if start + i * each >= a.leaving_at:
                    break  # wound down before this batch began: unrun
                out = a.run_batch(b, replay, c.floor)
                if out is None:
                    return  # the batch killed its actor
                answers.append(out)
                if isinstance(out, Failure) and s.stateful:
                    break
            hot = None  # as `Worker.run`: the newest snapshot, unless past the call's first failure
            failed = next((x.batch_id for x in answers if isinstance(x, Failure)), None)
            if s.stateful and s.hot and a.hot is not None and (failed is None or a.hot[0] <= failed):
                hot = (a.hot[0], (*a.hot, a.node))  # the token: the state, and the node holding it
            self.feed_late(a, CallAnswered(c.call, tuple(answers), hot))

        self.at(done, answer)

    def feed_late(self, a: _Actor, item: Any) -> None:
        """A zombie's answer arrives late: after its replacement has long taken over."""
        if a.zombie:
            self.at(self.now + self.rng.uniform(1.0, 5.0), lambda: self.feed(item))
        else:
            self.feed(item)

    def _c_KillActor(self, c: KillActor) -> None:
        a = self.actors.pop(c.inc, None)
        if a is None or not a.alive:
            return
        if self.chance(self.scenario.zombie_rate):
            a.zombie = True  # the kill did not take: it goes on, unseen
            if a.busy_until == float("inf"):
                a.busy_until = self.now
            return
        self.die(a, Cause.PROCESS, told=False)

    def _c_RollbackActor(self, c: RollbackActor) -> None:
        a = self.actors[c.inc]
        if self._gone(a):
            return
        when = max(self.now, a.busy_until) + self.rng.uniform(0.01, 0.1)
        a.busy_until = when
        op = ("rollback", c.inc)
        a.pending.append(op)

        def done() -> None:
            if not a.alive or op not in a.pending:
                return
            a.pending.remove(op)
            a.restore()
            self.feed(RollbackDone(c.slot, c.inc, a.cursor))

        self.at(when, done)

    def _c_FinishActor(self, c: FinishActor) -> None:
        a = self.actors[c.inc]
        if self._gone(a):
            return
        when = max(self.now, a.busy_until) + self.rng.uniform(0.01, 0.2)
        a.busy_until = when
        op = ("finish", c.inc)
        a.pending.append(op)

        def done() -> None:
            if not a.alive or op not in a.pending:
                return
            a.pending.remove(op)
            if self.scenario.stateful and not self.storage.save_checkpoint(a.slot, a.epoch, a.cursor, a.total):
                return
            a.snap = None  # the final save took a fresh snapshot, as the worker's `finish` does
            self.feed(FinishDone(c.slot, c.inc))

        self.at(when, done)

    def _c_WindDown(self, c: WindDown) -> None:
        a = self.actors.get(c.inc)
        if a is not None and a.alive:
            a.leaving_at = self.now + self.rng.uniform(0.001, 0.02)

    def _c_PersistState(self, c: PersistState) -> None:
        a = self.actors.get(c.inc)
        if a is None or not a.alive:
            return

        def persist() -> None:  # beside the calls in flight: only the save's own latency
            if a.alive and a.snap is not None and a.snap[0] <= c.floor:
                if self.storage.save_checkpoint(a.slot, a.epoch, *a.snap):
                    a.snap = None

        self.at(self.now + self.rng.uniform(0.001, 0.02), persist)

    def _c_CommitGroup(self, c: CommitGroup) -> None:
        for b in c.batch_ids:  # a retried group is the same group; another group is a second commit
            seen = self.groups_of.get(b)
            if seen is not None and seen[0] == self.run_id and seen[1] != c.group:
                self.outcome.violations.append(f"batch {b} sent to a commit twice in one run")
            self.groups_of[b] = (self.run_id, c.group)
        self.commits_inflight[c.group] = c
        fail = self.chance(self.scenario.commit_fail_rate)
        when = self.now + self.rng.uniform(0.001, 0.05) * (10 if self.chance(0.05) else 1)

        def done() -> None:
            self.commits_inflight.pop(c.group, None)
            if fail:
                if self.rng.random() < 0.5:  # a prefix of it landed before the error
                    k = self.rng.randint(0, len(c.batch_ids))
                    self.storage.commit(c.batch_ids[:k], c.outputs[:k])
                self.feed(CommitFailed(c.group, "OSError: connection reset", True))
                return
            self.storage.commit(c.batch_ids, c.outputs)
            self.feed(CommitDone(c.group))

        self.at(when, done)

    def _c_SaveProgress(self, c: SaveProgress) -> None:
        record = dict(c.fields)
        if c.final:
            self.storage.progress = record
            return
        fail = self.chance(self.scenario.progress_fail_rate)

        def done() -> None:
            if fail:
                self.feed(ProgressFailed(c.seq, "OSError: connection reset", True))
                return
            self.storage.progress = record
            self.feed(ProgressDone(c.seq))

        self.at(self.now + self.rng.uniform(0.001, 0.02), done)

    def _c_Emit(self, c: Emit) -> None:
        e = c.event
        if isinstance(e, ev.BatchDeadLettered):
            self.outcome.batches_done += 1
        elif isinstance(e, ev.BatchesCommitted):
            self.outcome.batches_done += len(e.batch_ids)
        elif isinstance(e, ev.ActorReplaced):
            self.outcome.restarts += 1
            if e.reason.startswith("died while starting"):
                self.outcome.start_deaths += 1
            elif e.reason.startswith("handed over"):
                self.outcome.handovers += 1

    def _c_FailJob(self, c: FailJob) -> None:
        self.ended = "failed"
        self.outcome.failed = c.error

    def _c_CompleteJob(self, c: CompleteJob) -> None:
        self.ended = "complete"

    def _c_StopJob(self, c: StopJob) -> None:
        self.ended = "stopped"

    # ------------------------------------------------------------------ faults

    def die(self, a: _Actor, cause: Cause, *, told: bool = True) -> None:
        """The actor's process is gone: every op it had pending answers with its death."""
        if not a.alive:
            return
        a.alive = False
        if cause in (Cause.NODE, Cause.PREEMPTED):
            self.lost_nodes.add(a.node)  # and the object store's copies on it
        pending, a.pending = a.pending, []
        if a.inc < 0:
            return  # a standby: found dead when it is activated
        for _ in pending:
            self.at(self.now + self.rng.uniform(0.001, 0.05),
                    lambda a=a: self.feed(ActorDown(a.slot, a.inc, cause, f"{cause.value} death")))

    def random_kill(self) -> None:
        live = [a for a in list(self.actors.values()) + list(self.spares.values()) if a.alive]
        if not live:
            return
        a = self.rng.choice(live)
        if self.rng.random() < self.scenario.notice_share:  # a preemption notice, then the node goes
            deadline = self.now + self.rng.uniform(*self.scenario.notice_seconds)
            self.feed(NodeDraining(a.node, deadline))
            self.at(deadline, lambda: self.die(a, Cause.PREEMPTED))
            return
        external = self.rng.random() < self.scenario.external_share
        cause = self.rng.choice([Cause.NODE, Cause.PREEMPTED, Cause.OOM]) if external else Cause.PROCESS
        self.at(self.now + self.rng.uniform(0.0, 0.5), lambda: self.die(a, cause))

    # ------------------------------------------------------------------ runs

    def start_run(self) -> None:
        """A driver run: resume from the progress record and the sink's markers, as the Ray driver does."""
        s = self.scenario
        self.run_id += 1
        self.outcome.runs += 1
        resume = records.read_progress(self.storage.progress)
        watermark = resume.watermark
        dead = {d["batch_id"]: DeadLetter(**d) for d in resume.dead}
        done = {b for b in self.storage.markers if b >= watermark} | {b for b in dead if b >= watermark}
        ledger = Ledger(s.batches, max(64, 4 * s.slots * s.queue_depth * 8), watermark=watermark, done_above=done)
        policy = Policy(
            slots=s.slots, stateful=s.stateful, queue_depth=s.queue_depth, batches_per_call=s.batches_per_call,
            batch_timeout_seconds=5.0, start_timeout_seconds=30.0, max_attempts=s.max_attempts,
            start_deaths=20, fail_fast_after=s.fail_fast_after, standby=s.standby, commit_group_size=64,
            commit_interval_seconds=0.1, backoff_seconds=0.1, backoff_max_seconds=2.0,
        )
        self.sched = Scheduler(policy, ledger, dead=dead, rng=random.Random(self.rng.random()), now=self.now)
        self.ended = None
        self.apply(self.sched.start(self.now))

    def crash_driver(self) -> None:
        """The driver dies: its actors die with it; a commit in flight may have landed in part."""
        for c in list(self.commits_inflight.values()):
            k = self.rng.randint(0, len(c.batch_ids))
            self.storage.commit(c.batch_ids[:k], c.outputs[:k])
        self.commits_inflight.clear()
        for a in list(self.actors.values()) + list(self.spares.values()):
            a.alive = False
        self.actors.clear()
        self.spares.clear()
        self.sched = None
        self.queue.clear()

    def run(self) -> Outcome:
        s = self.scenario
        self.start_run()
        # the driver dies once this share of the batches is committed (1.0: after the last commit, while
        # the slots save their final state): early, in the middle and at the very end
        crash_at = sorted(1.0 if self.rng.random() < 0.3 else self.rng.random() for _ in range(s.driver_crashes))
        stop_at = sorted(self.rng.random() for _ in range(s.stops))
        stopping = False
        while True:
            if self.ended == "complete":
                break
            if self.ended == "failed":
                break
            if self.ended == "stopped":  # the driver exits (its actors with it); the job is run again
                self.outcome.stops += 1
                stopping = False
                self.crash_driver()
                self.start_run()
                continue
            if stop_at and not stopping and len(self.storage.markers) >= stop_at[0] * s.batches:
                stop_at.pop(0)
                stopping = True
                self.feed(StopRequested(self.now + self.rng.uniform(*s.stop_seconds), "SIGTERM"))
                continue
            wake = self.sched.next_wakeup() if self.sched else None
            nxt = self.queue[0][0] if self.queue else None
            when = min(x for x in (wake, nxt) if x is not None) if (wake is not None or nxt is not None) else None
            if when is None:
                self.outcome.violations.append("the job stalled: nothing pending and not finished")
                break
            if when > s.time_limit:
                self.outcome.violations.append(f"the job did not finish within {s.time_limit:g} virtual seconds")
                break
            if crash_at and len(self.storage.markers) >= crash_at[0] * (s.batches - len(self.poison | self.crash_ids)):
                crash_at.pop(0)
                stopping = False
                self.crash_driver()
                self.start_run()
                continue
            self.now = max(self.now, when)
            if nxt is not None and nxt <= when:
                _, _, (run_id, fn) = heapq.heappop(self.queue)
                if run_id == self.run_id:
                    fn()
            self.tick()
        self.outcome.completed = self.ended == "complete"
        self.outcome.virtual_seconds = self.now
        return self.outcome


# ---------------------------------------------------------------------------------- checks


def simulate(scenario: Scenario) -> Outcome:
    """Run one scenario and check every guarantee; the outcome's `violations` lists what broke."""
    world = _World(scenario)
    outcome = world.run()
    check(world, outcome)
    return outcome


def _reference(s: Scenario, dead: set[int]) -> tuple[dict[int, Any], dict[int, int]]:
    outputs: dict[int, Any] = {}
    totals = {slot: 0 for slot in range(s.slots)}
    for b in range(s.batches):
        if b in dead:
            continue
        if s.stateful:
            totals[b % s.slots] += b
            outputs[b] = (b, totals[b % s.slots])
        else:
            outputs[b] = (b, b * b)
    return outputs, totals


def check(world: _World, outcome: Outcome) -> None:
    """Append every broken guarantee to ``outcome.violations``."""
    s, v = world.scenario, outcome.violations
    may_fail = s.broken_starts >= s.max_attempts or (s.fail_fast_after and (s.poison or s.transient_rate))
    if outcome.failed is not None and not may_fail:
        v.append(f"the job failed: {outcome.failed}")
    if not outcome.completed:
        if outcome.failed is None:
            v.append("the job did not complete")
        return
    record = world.storage.progress or {}
    if record.get("state") != "complete":
        v.append(f"the final progress record says {record.get('state')!r}")
    dead = {d["batch_id"] for d in record.get("dead", [])}
    allowed = world.poison | world.crash_ids
    unexpected = sorted(dead - allowed)
    if unexpected:
        # a healthy batch can only die by being charged for plain process deaths it was alone in (Ray
        # cannot tell those from a crash it caused)
        if not s.kill_rate and not s.hang_rate:
            v.append(f"healthy batches dead-lettered: {unexpected[:10]}")
    missing_dead = sorted(allowed - dead)
    if missing_dead:
        v.append(f"poison or crashing batches not dead-lettered: {missing_dead[:10]}")
    expected, totals = _reference(s, dead)
    markers = world.storage.markers
    wrong = [b for b in expected if markers.get(b) != expected[b]]
    if wrong:
        b = wrong[0]
        v.append(f"{len(wrong)} batches committed wrong or not at all, e.g. batch {b}: {markers.get(b)} != {expected[b]}")
    extra = sorted(set(markers) - set(expected))
    if extra:
        v.append(f"outputs committed for dead letters: {extra[:10]}")
    if s.stateful:
        for slot, total in totals.items():
            ck = world.storage.checkpoints.get(slot)
            if ck is None or ck.total != total:
                v.append(f"slot {slot}: final state {None if ck is None else ck.total} != {total}")
    window = max(64, 4 * s.slots * s.queue_depth * 8)
    bound = 8 * (s.slots * s.queue_depth * 8 + window) + 64
    if outcome.peak_timers > bound:
        v.append(f"the scheduler held {outcome.peak_timers} timers (bound {bound})")
    if outcome.peak_calls > s.slots * s.queue_depth:
        v.append(f"{outcome.peak_calls} calls in flight for {s.slots} slots of depth {s.queue_depth}")


def sweep(seeds: range, *, max_batches: int = 300, make: Callable[[int], Scenario] | None = None,
          on_violation: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run many seeds; return the outcomes with violations."""
    bad = []
    for seed in seeds:
        scenario = (make or (lambda n: random_scenario(n, max_batches=max_batches)))(seed)
        out = simulate(scenario)
        if out.violations:
            bad.append(out)
            if on_violation:
                on_violation(out)
    return bad

