"""The supervisor: drives a job from its source through worker actors to committed outputs.

Exactly-once protocol
---------------------
* Every input batch has a stable id (its position in the source). A batch is *done* when its output is
  committed in the sink (a create-only commit marker, written only here, by the driver) or recorded as a
  dead letter. At-least-once delivery + create-only commits = exactly one committed output per batch.
* Workers send their encoded outputs back; the driver commits them in groups (`FileSink.commit_group`:
  one part object, one index, a marker per batch). A group starts when the committer is idle and the
  previous group started at least `commit_interval_seconds` ago (or it is full: `commit_group_size`), so
  it holds what arrived meanwhile: the cost of durable writes is shared by the batches of an interval,
  and an output waits about one interval at most. Batches count as done only when their group's markers
  are durable.
* Worker incarnations are fenced by epochs: an answer from an incarnation that is not the slot's current
  one is dropped, so a zombie's output is never committed.
* Progress (the ledger's watermark and the few done ids above it) is persisted after the commits it
  describes, never before. A re-run with the same job id reads it, scans commit markers from the
  watermark up, and continues: nothing done is redone, nothing is held per completed batch.
* Batches travel to workers in actor calls of one batch or several (`resilient.runtime.calls`: short
  batches share a call's fixed cost); at most `queue_depth` calls are in flight per actor. A worker
  answers each batch of a call with its result or its error.
* Stateful pipelines route batch ``b`` to slot ``b % slots`` and apply each slot's batches in id order.
  A slot checkpoint (state + cursor) is persisted only once every output it covers is committed. A
  replacement restores the newest checkpoint and replays the slot's batches from its cursor: batches
  already committed are applied again to rebuild the state but their outputs are not staged again.

Failures
--------
* Actor death (crash, SIGKILL, node loss): a replacement with a new epoch takes the slot; its in-flight and
  queued batches are redelivered (stateless: to any slot at once). The replacement is a standby when one
  is built (a hand-over); the standby is rebuilt once the redelivered batches are committed, or
  `SPARE_DELAY_S` after the hand-over at the latest, so that building it does not slow the recovery.
* Exception in user code: retried with exponential backoff and jitter; a stateful slot is first rolled
  back to its last checkpoint and replayed, so a half-applied batch never leaks into the state.
* Hang: a call running past `batch_timeout_seconds` gets its actor killed and replaced.
* Attribution: a death or hang with one batch in flight is that batch's failed attempt. With several (in
  one call or in several), each of them is a *suspect* and is retried alone, so the next failure names
  its batch; only named failures count towards the poison limit.
* Poison: a batch failing `max_attempts` times (exceptions, crashes or hangs) becomes a dead letter
  (batch id, error, traceback, attempts) and the job goes on, or the job fails (``on_poison="fail"``).
"""

from __future__ import annotations

import collections
import heapq
import logging
import random
import time
import traceback
import types
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from resilient.errors import NoCheckpointError, ResilientError
from resilient.retry import RetryPolicy
from resilient.runtime.calls import BatchTimer, batches_per_call, most_per_call
from resilient.runtime.ledger import Ledger, slot_of
from resilient.runtime.worker import DirtyWorkerError, Failure, JobSpec, Result, Worker, slot_key
from resilient.storage import CheckpointStore

__all__ = ["DeadLetter", "JobFailedError", "JobResult", "JobMismatchError", "Supervisor"]

log = logging.getLogger("resilient.runtime")
INF = 1 << 62
SPARE_DELAY_S = 1.0  # the longest a hand-over defers rebuilding the standby it used



def _death_cause(actor: Any, error: BaseException, timeout: float = 10.0) -> BaseException:
    """Why `actor` died, as well as Ray can tell. A call can fail as "temporarily unavailable" before Ray
    knows the actor died in its constructor; asked once more, the dead actor's answer names the error
    its constructor raised. Any other error is returned as it is."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    if not isinstance(error, ActorUnavailableError):
        return error
    try:
        ray.get(actor.ready.remote(), timeout=timeout)
    except RayActorError as e:
        return e
    except Exception:  # noqa: BLE001 - a timeout or anything else: the first error is what we know
        return error
    return error


def _inflight_ids(slot: _Slot) -> list[int]:
    """The batches of the slot's calls in flight, in the order the actor runs them."""
    return [b for _, ids in slot.inflight for b in ids]


class JobFailedError(ResilientError):
    """The job stopped: a poison batch with ``on_poison="fail"``, or an unrecoverable error."""


class JobMismatchError(ResilientError):
    """A job id was reused with a different pipeline, configuration or source; refused, not resumed."""


@dataclass(frozen=True)
class DeadLetter:
    """A poison batch: its id, every attempt's error ("attempt 1: ...; attempt 2: ..."), the last user
    traceback, and how many attempts it had."""

    batch_id: int
    error: str
    traceback: str
    attempts: int


@dataclass
class JobResult:
    """How a run ended: batches in all and committed (all runs), its dead letters, actor replacements
    and failed attempts (this run), seconds, the watermark it resumed from, and the actor calls that
    carried its batches (one or several batches each: ``RESILIENT_BATCHES_PER_CALL``)."""

    job_id: str
    total: int
    committed: int
    dead_letters: list[DeadLetter]
    restarts: int
    retries: int
    seconds: float
    resumed_from: int
    calls: int = 0


@dataclass
class _Slot:
    index: int
    actor: Any = None
    epoch: int = 0
    pid: int | None = None
    node_id: str | None = None
    cursor: int = 0
    inflight: collections.deque = field(default_factory=collections.deque)  # calls: (ref, batch ids)
    queue: collections.deque = field(default_factory=collections.deque)  # (batch_id, batch, replay)
    head_since: float = 0.0
    running: bool = False
    pending: Any = None  # the activation in flight while the slot starts
    start_failures: int = 0  # actors in a row that died before serving


class Supervisor:
    """Runs one job to completion (or resumes it). Driver side; not thread-safe; one per job run."""

    def __init__(
        self,
        spec: JobSpec,
        source: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, dict], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.source = source
        self.settings = spec.settings
        self.store = CheckpointStore(spec.settings)
        self.sink = spec.sink
        self.clock = clock
        self.on_event = on_event or (lambda kind, info: None)
        self.rng = rng or random.Random()
        self.total = len(source)
        self.slots = [_Slot(i) for i in range(spec.slots)]
        self.refs: dict[Any, tuple[int, tuple[int, ...], int]] = {}  # call ref -> (slot, batch ids, epoch)
        self.ready_queue: collections.deque = collections.deque()  # stateless: (batch_id, batch)
        self.delayed: list[tuple[float, int, Any]] = []  # stateless retries: (ready_at, batch_id, batch)
        self.outstanding: dict[int, set[int]] = {s.index: set() for s in self.slots}
        self.commits: dict[Future, list[tuple[int, Any]]] = {}  # group commit -> [(slot, EncodedOutput)]
        self.group: list[tuple[int, Any]] = []  # answers waiting for the next group commit
        self.committing: set[int] = set()  # batch ids in `group` or in a group commit in flight
        self.suspects: set[int] = set()  # in flight together when an actor died: each now runs alone
        self.urgent: set[int] = set()  # redelivered after an actor died: committed without waiting
        self._last_flush = -float("inf")
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resilient-commit")
        self._replica_seen: dict[tuple[str, str], int] = {}  # (process, url) -> failures it last reported
        self._replica_state: dict[str, list] = {}  # url -> [errors, {process: degraded}]
        self.dead: dict[int, DeadLetter] = {}
        self.failures: dict[int, list[tuple[str, str]]] = {}  # batch -> (error, traceback) per failed attempt
        self.restarts = 0
        self.retries = 0
        self.calls = 0  # actor calls that carried batches
        self.timer = BatchTimer()  # seconds per batch on the workers: sizes calls (`batches_per_call`)
        self.read_pos = 0
        self._reader = None
        self._last_progress = 0.0
        self._progress_saving = None  # the periodic progress save in flight (a PendingSave)
        self._actor_cls = None
        self.spares: list[Any] = []
        self._spares_due: float | None = None  # when the standbys used up by a hand-over are rebuilt
        self.finishing: dict[Any, int] = {}  # final-state save ref -> slot
        self.finished_slots: set[int] = set()
        self.starting: dict[Any, int] = {}  # activation ref -> slot
        self._started_at = time.time()
        self.resumed_done = 0
        self._state = "running"
        self._retry_seen = -1  # generation of the last retry request acted on
        self._retried = False  # this run retries dead letters: the job's completion summary changes
        self._error: str | None = None

    # ------------------------------------------------------------------ job record and resume

    def _fingerprint(self) -> dict:
        t = self.spec.target
        return {
            "pipeline": f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', repr(t))}",
            "stateful": self.spec.stateful,
            "slots": self.spec.slots if self.spec.stateful else None,
            "sink": repr(self.sink),
            "total": self.total,
        }

    def _open_job(self) -> None:
        key = f"{self.spec.job_id}/job"
        record = {"job": self._fingerprint(), "source": self.source.fingerprint()}
        try:
            existing = self.store.load(key).state
        except NoCheckpointError:
            self.store.save(key, record)
            return
        from resilient.io.sources import check_fingerprint

        if existing["job"] != record["job"]:
            diff = {k: (existing["job"].get(k), v) for k, v in record["job"].items() if existing["job"].get(k) != v}
            raise JobMismatchError(
                f"job {self.spec.job_id!r} exists with a different pipeline or configuration: {diff}; "
                "use a new job id, or re-run the same pipeline to resume"
            )
        check_fingerprint(existing["source"], record["source"])

    def _resume(self) -> Ledger:
        s = self.settings
        window = max(64, 4 * self.spec.slots * s.queue_depth * most_per_call(s.batches_per_call))
        try:
            progress = self.store.load(f"{self.spec.job_id}/progress").state
        except NoCheckpointError:
            progress = {"watermark": 0, "dead": []}
        for d in progress.get("dead", []):
            self.dead[d["batch_id"]] = DeadLetter(**d)
        watermark = int(progress["watermark"])
        redo = set(progress.get("redo", []))
        self._retry_seen = int(progress.get("retry_generation", -1))
        for b in self._retry_requested():
            if self.spec.stateful:
                log.error("job %s: dead letters cannot be retried in a stateful pipeline (its slots' state "
                          "is past them); request for %s ignored", self.spec.job_id, b)
                break
            if self.dead.pop(b, None) is not None:
                self._retried = True
                if b < watermark:
                    redo.add(b)
        done = {b for b in self.sink.committed_from(watermark)}
        done |= {b for b in self.dead if b >= watermark}
        redo = {b for b in redo if not self.sink.is_committed(b)}  # a few ids: one marker read each
        return Ledger(self.total, window, watermark=watermark, done_above=done, redo=redo)

    def _retry_requested(self) -> list[int]:
        """Dead letters a user asked to retry (``resilient dead-letters JOB --retry``: the ``<job>/retry``
        record), once per request."""
        try:
            request = self.store.load(f"{self.spec.job_id}/retry")
        except NoCheckpointError:
            return []
        if request.generation <= self._retry_seen:
            return []
        self._retry_seen = request.generation
        ids = sorted(int(b) for b in request.state.get("batch_ids", []))
        log.warning("job %s: retrying dead letters %s on request", self.spec.job_id, ids)
        return ids

    def _save_progress(self, ledger: Ledger) -> None:
        """Save the job's progress record now (after the periodic save in flight, if any, so the record
        never goes back). The record (``<job_id>/progress`` in the checkpoint store) is what a re-run resumes
        from (watermark, done_above, dead) and what ``resilient status`` shows while the job runs and after.

        Fields: ``watermark`` (every batch below is done), ``done_above`` (done ids at or above it),
        ``total``, ``dead`` (dead letters as dicts: batch_id, error, traceback, attempts), ``committed``
        (batches with a committed output, all runs), ``rate_per_s`` (commits per second in this run),
        ``restarts``, ``retries`` (this run), ``actors`` (slot, pid, node_id, epoch of each running slot),
        ``started_at`` / ``updated_at`` (Unix time of this run's start and of this record), ``state``
        ("running", "complete" or "failed"), ``error`` (why it failed, or None), ``redo`` (retried dead
        letters below the watermark, not committed yet) and ``retry_generation`` (the last retry request
        acted on).
        """
        self._settle_progress()
        self.store.save(self._progress_key(), self._progress_record(ledger))
        self._last_progress = self.clock()
        self._driver_replica_events()

    def _save_progress_soon(self, ledger: Ledger) -> None:
        """The periodic progress save, in the background: the loop only builds the record (a save takes
        5-10 ms on a local disk, more on an object store, and would hold up dispatching). One at a time;
        the record describes only commits already durable, so it may land whenever it lands."""
        if self._progress_saving is not None:
            if not self._progress_saving.done():
                return
            self._settle_progress()
        self._progress_saving = self.store.save_async(self._progress_key(), self._progress_record(ledger), copy=False)
        self._last_progress = self.clock()

    def _settle_progress(self) -> None:
        """Wait for the periodic save in flight; raise its error (a storage failure stops the job)."""
        saving, self._progress_saving = self._progress_saving, None
        if saving is not None:
            saving.wait()
            self._driver_replica_events()

    def _driver_replica_events(self) -> None:
        self._replica_events("driver", [(h.url, h.degraded, h.failures) for h in self.store.health()])

    def _progress_key(self) -> str:
        return f"{self.spec.job_id}/progress"

    def _progress_record(self, ledger: Ledger) -> dict:
        snap = ledger.snapshot()
        snap["dead"] = [d.__dict__ for d in self.dead.values()]
        snap["retry_generation"] = self._retry_seen
        now = time.time()
        done = ledger.watermark + len(ledger.done_above)
        snap.update(
            committed=done - len(self.dead),
            rate_per_s=round((done - self.resumed_done) / max(1e-9, now - self._started_at), 3),
            restarts=self.restarts,
            retries=self.retries,
            actors=[{"slot": s.index, "pid": s.pid, "node_id": s.node_id, "epoch": s.epoch}
                    for s in self.slots if s.pid is not None],
            started_at=self._started_at,
            updated_at=now,
            state=self._state,
            error=self._error,
        )
        return snap

    # ------------------------------------------------------------------ actors

    def _new_actor(self) -> Any:
        import ray

        if self._actor_cls is None:
            self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
        return self._actor_cls.options(
            num_cpus=self.settings.actor_cpus, num_gpus=self.settings.actor_gpus
        ).remote(self.spec)

    def _top_up_spares(self) -> None:
        """Keep `standby` actors constructed ahead (model loaded), so a replacement is a hand-over."""
        self._spares_due = None
        while len(self.spares) < self.settings.standby:
            self.spares.append(self._new_actor())

    def _maybe_top_up_spares(self) -> None:
        """Rebuild standbys after a hand-over once the redelivered batches are committed, or at the latest
        `SPARE_DELAY_S` after it: building one (a process start, imports, the model) takes a core for about
        a second, which the replacement needs while it replays and redelivers."""
        if self._spares_due is not None and (not self.urgent or self.clock() >= self._spares_due):
            self._top_up_spares()

    def _start_slot(self, slot: _Slot) -> None:
        """Give the slot a new incarnation: a new epoch (fencing the old one), a standby actor if one is
        there, else a fresh one. Asynchronous: the slot runs once its activation (restore) answers."""
        slot.actor = self.spares.pop(0) if self.spares else self._new_actor()  # starts while we claim
        slot.epoch = self.store.claim_epoch(slot_key(self.spec.job_id, slot.index))
        slot.running = False
        slot.pid = slot.node_id = None
        slot.pending = slot.actor.activate.remote(slot.index, slot.epoch)
        self.starting[slot.pending] = slot.index

    def _on_started(self, ref: Any, ledger: Ledger) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        slot = self.slots[self.starting.pop(ref)]
        if slot.pending is not ref:
            return
        slot.pending = None
        try:
            info = ray.get(ref)
        except RayActorError as e:
            slot.start_failures += 1
            if slot.start_failures >= self.settings.max_attempts:
                cause = _death_cause(slot.actor, e)
                raise JobFailedError(
                    f"slot {slot.index}: {slot.start_failures} actors in a row died while starting "
                    f"(building the pipeline or restoring its state); the last one: {cause}"
                ) from cause
            self._replace(slot, ledger, f"died while starting ({type(e).__name__})", None)
            return
        except RayTaskError as e:
            raise JobFailedError(f"slot {slot.index} could not restore its state: {e}") from e
        slot.pid, slot.node_id, slot.cursor = info["pid"], info["node_id"], info["cursor"]
        slot.running = True
        slot.start_failures = 0
        slot.head_since = self.clock()
        if self.spec.stateful and self._reader is not None:
            self._rebuild_slot_queue(slot, ledger)
        if len(self.spares) < self.settings.standby and self._spares_due is None:
            self._spares_due = self.clock() + SPARE_DELAY_S  # see _maybe_top_up_spares
        generation = info.get("generation")
        if self.spec.stateful and (self.restarts or generation is not None):
            log.warning(
                "slot %d: epoch %d running on pid %s, %s; replaying its batches from %d",
                slot.index, slot.epoch, slot.pid,
                f"resumed from checkpoint generation {generation}" if generation is not None
                else "no checkpoint yet (state rebuilt from the start)", slot.cursor,
            )
        self._checkpoint_events(slot.index, info.get("checkpoints", ()))
        self.on_event("started", {"slot": slot.index, "pid": slot.pid, "epoch": slot.epoch, "cursor": slot.cursor,
                                  "generation": generation})

    def _replace(self, slot: _Slot, ledger: Ledger, reason: str, culprit: int | None, error: str = "") -> None:
        import ray

        lost = _inflight_ids(slot)
        self.urgent.update(b for b in lost if not ledger.is_done(b))
        for ref, _ in slot.inflight:
            self.refs.pop(ref, None)
        slot.inflight.clear()
        if slot.pending is not None:
            self.starting.pop(slot.pending, None)
            slot.pending = None
        for ref in [r for r, i in self.finishing.items() if i == slot.index]:
            del self.finishing[ref]
        try:
            ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        old_pid, old_epoch = slot.pid, slot.epoch
        for state in self._replica_state.values():  # the dead incarnation's view of the replicas goes
            state[1].pop(f"slot-{slot.index}-e{old_epoch}", None)
        if culprit is not None and not ledger.is_done(culprit):
            self._count_failure(culprit, ledger, f"{reason}: {error}".strip(": "), "")
        self._start_slot(slot)
        self.restarts += 1
        if not self.spec.stateful:
            queued = [(b, batch) for b, batch, _ in slot.queue]
            slot.queue.clear()
            self._send_again(slot.index, lost, ledger, then=queued)
        log.warning(
            "slot %d: actor pid %s (epoch %d) %s; replacing it (epoch %d, %s); redelivering %s",
            slot.index, old_pid, old_epoch, reason, slot.epoch,
            "restoring its last checkpoint" if self.spec.stateful else "stateless", lost or "nothing",
        )
        self.on_event("restart", {"slot": slot.index, "reason": reason, "redelivered": lost})

    # ------------------------------------------------------------------ reading and routing

    def _batch(self, batch_id: int) -> Any:
        """Re-read one batch (retries, redelivery): sources are replayable by offset."""
        for b, batch in self.source.read(batch_id):
            return batch
        raise JobFailedError(f"source has no batch {batch_id}")

    def _send_again(self, s: int, lost: Sequence[int], ledger: Ledger, then: Sequence[tuple[int, Any]] = ()) -> None:
        """Stateless: batches `lost` on slot `s` (they will not answer) go to the front of the ready queue,
        in order and followed by `then`, unless done already or on their way again."""
        pending = self._pending_ids()
        items = []
        for b in lost:
            self.outstanding[s].discard(b)
            if not ledger.is_done(b) and b not in pending:
                items.append((b, self._batch(b)))
        self.ready_queue.extendleft(reversed(items + list(then)))

    def _pending_ids(self) -> set[int]:
        ids = {b for b, _ in self.ready_queue} | {b for _, b, _ in self.delayed} | self.committing
        for s in self.slots:
            ids |= {b for b, _, _ in s.queue} | set(_inflight_ids(s))
        return ids

    def _fill(self, ledger: Ledger) -> None:
        room = 2 * self.spec.slots * self.settings.queue_depth * self._per_call()  # batches queued at most
        while self.read_pos < self.total and ledger.may_read(self.read_pos) and self._queued() < room:
            b, batch = next(self._reader)
            if b != self.read_pos:
                raise JobFailedError(f"source yielded batch {b} where {self.read_pos} was expected")
            self.read_pos += 1
            if self.spec.stateful:
                slot = self.slots[slot_of(b, self.spec.slots)]
                if b < slot.cursor or b in self.dead:
                    continue
                done = ledger.is_done(b)
                slot.queue.append((b, batch, done))
                if not done:
                    self.outstanding[slot.index].add(b)
            elif not ledger.is_done(b):
                self.ready_queue.append((b, batch))

    def _queued(self) -> int:
        return len(self.ready_queue) + sum(len(s.queue) for s in self.slots)

    def _per_call(self) -> int:
        s = self.settings
        return batches_per_call(s.batches_per_call, self.timer.seconds, s.batch_timeout_seconds)

    def _rebuild_slot_queue(self, slot: _Slot, ledger: Ledger) -> None:
        """After a restore or rollback: every batch of the slot from its cursor up to the read position, in
        order; committed ones as replays."""
        slot.queue.clear()
        if slot.cursor >= self.read_pos:
            return
        for b, batch in self.source.read(slot.cursor):
            if b >= self.read_pos:
                break
            if slot_of(b, self.spec.slots) != slot.index or b in self.dead:
                continue
            slot.queue.append((b, batch, ledger.is_done(b) or b in self.committing))

    def _commit_floor(self, slot: _Slot) -> int:
        pending = self.outstanding[slot.index]
        return min(pending) if pending else INF

    def _dispatch(self) -> None:
        now = self.clock()
        while self.delayed and self.delayed[0][0] <= now:
            _, b, batch = heapq.heappop(self.delayed)
            self.ready_queue.appendleft((b, batch))
        depth, per_call = self.settings.queue_depth, self._per_call()
        for slot in self.slots:
            queue = slot.queue if self.spec.stateful else self.ready_queue
            while slot.running and len(slot.inflight) < depth and queue:
                if self.suspects and any(x in self.suspects for x in _inflight_ids(slot)):
                    break  # a suspect runs alone on its actor
                alone = queue[0][0] in self.suspects
                if slot.inflight and alone:
                    break
                items = [self._take(slot, queue)]
                while not alone and len(items) < per_call and queue and queue[0][0] not in self.suspects:
                    items.append(self._take(slot, queue))
                ref = slot.actor.process.remote((self._commit_floor(slot), items))
                self.calls += 1
                if not slot.inflight:
                    slot.head_since = now
                ids = tuple(b for b, _, _ in items)
                slot.inflight.append((ref, ids))
                self.refs[ref] = (slot.index, ids, slot.epoch)

    def _take(self, slot: _Slot, queue: collections.deque) -> tuple[int, Any, bool]:
        """The next batch for `slot` from `queue` (its own, or the stateless ready queue)."""
        if self.spec.stateful:
            return queue.popleft()
        b, batch = queue.popleft()
        self.outstanding[slot.index].add(b)
        return b, batch, False

    # ------------------------------------------------------------------ answers

    def _count_failure(self, b: int, ledger: Ledger, error: str, tb: str) -> bool:
        """Count a failed attempt; dead-letter the batch when it has had enough. True if it is now dead."""
        attempts = ledger.failed_attempt(b)
        self.retries += 1
        history = self.failures.setdefault(b, [])
        history.append((error, tb))
        if attempts < self.settings.max_attempts:
            self.on_event("retry", {"batch_id": b, "attempts": attempts, "error": error})
            return False
        # every attempt's error, so a reader sees how it failed each time (raised, killed its actor, hung)
        del self.failures[b]
        error = "; ".join(f"attempt {i}: {e}" for i, (e, _) in enumerate(history, 1))
        tb = next((t for _, t in reversed(history) if t), "")
        letter = DeadLetter(b, error, tb, attempts)
        if self.settings.on_poison == "fail":
            raise JobFailedError(f"batch {b} failed {attempts} times (poison): {error}")
        self.dead[b] = letter
        self.urgent.discard(b)
        for pending in self.outstanding.values():
            pending.discard(b)
        ledger.mark_done(b)
        self._save_progress(ledger)
        log.error("batch %d is a poison batch after %d attempts; dead-lettered: %s", b, attempts, error)
        self.on_event("dead_letter", {"batch_id": b, "error": error, "attempts": attempts})
        return True

    def _backoff(self, attempts: int) -> float:
        """Delay before retrying a batch after its `attempts`-th failure: the tenacity policy's
        exponential backoff with jitter (a stateless retry is scheduled, not slept for; a stateful slot
        waits this long before its rollback replay)."""
        wait = RetryPolicy.from_settings(self.settings).retrying().wait
        return float(wait(types.SimpleNamespace(attempt_number=attempts, outcome=None, seconds_since_start=0.0)))

    def _handle(self, ref: Any, ledger: Ledger) -> None:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        meta = self.refs.get(ref)
        if meta is None:
            return  # from a replaced incarnation or a rolled-back run: dropped
        s, ids, epoch = meta
        slot = self.slots[s]
        try:
            answers: list[Result | Failure] = ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            # with one batch in flight, it killed the actor; with several, any of them may have (an answer
            # can be lost when the process dies right after sending it): each is retried alone
            # (`suspects`), so the next death names its batch
            lost = _inflight_ids(slot)
            culprit = lost[0] if len(lost) == 1 else None
            if culprit is None:
                self.suspects.update(lost)
            self._replace(slot, ledger, "died", culprit, f"{type(e).__name__}")
            return
        except RayTaskError as e:
            self._forget(slot, ref)
            self.suspects.difference_update(ids)
            cause = e.cause if hasattr(e, "cause") else e
            if isinstance(cause, DirtyWorkerError):
                return  # queued behind the failing batch; redelivered after the rollback
            # the worker answers its user's exceptions batch by batch (`Failure`); what escapes it anyway
            # is put on the call's first batch, and the call's other batches go again (a stateful slot
            # replays them after its rollback)
            own = "".join(traceback.format_exception(cause)) if isinstance(cause, BaseException) else ""
            tb = str(e) if "Traceback" in str(e) else own  # the remote traceback is in Ray's wrapper's text
            if not self.spec.stateful:
                self._send_again(s, ids[1:], ledger)
            self._on_exception(slot, ids[0], ledger, f"{type(cause).__name__}: {cause}", tb)
            return
        self._forget(slot, ref)
        if epoch != slot.epoch:
            return  # a zombie's answer: never committed
        for answer in answers:
            if answer.epoch != slot.epoch:
                return  # a zombie's answer: never committed
            b = answer.batch_id
            self.suspects.discard(b)
            if isinstance(answer, Failure):
                self._on_exception(slot, b, ledger, answer.error, answer.traceback)
                if self.spec.stateful:
                    return  # rolled back: the call's later batches were not run; they are queued again
                continue
            self.timer.add(answer.seconds)
            self._checkpoint_events(s, answer.checkpoints)
            self._replica_events(f"slot-{s}-e{epoch}", answer.replicas)
            if answer.output is None or b in self.committing:  # a replay, or an output already on its way
                continue
            self.committing.add(b)
            self.group.append((s, answer.output))

    def _replica_events(self, process: str, health: Any) -> None:
        """Replica health reported by one process (the driver, a worker incarnation), folded into one
        running error count and a degraded flag per replica URL."""
        for url, degraded, failures in health:
            seen = self._replica_seen.get((process, url), 0)
            self._replica_seen[(process, url)] = failures
            state = self._replica_state.setdefault(url, [0, {}])
            before = (state[0], any(state[1].values()))
            state[0] += max(0, failures - seen)
            state[1][process] = degraded
            if (state[0], any(state[1].values())) != before:
                self.on_event("replica", {"url": url, "degraded": any(state[1].values()), "errors": state[0]})

    def _checkpoint_events(self, slot: int, outcomes: Any) -> None:
        for c in outcomes:
            self.on_event("checkpoint", {"slot": slot, **c})

    def _flush(self, *, force: bool = False) -> None:
        """Start the next group commit when the committer is idle and the last one started at least
        `commit_interval_seconds` ago (or the group is full, or `force`)."""
        if not self.group:
            return
        full = len(self.group) >= self.settings.commit_group_size
        now = self.clock()
        # a redelivered batch (recovery) commits as soon as the committer is free: failover time counts;
        # so does the tail of a job, when no answer is on its way to share the group with
        urgent = not self.refs or (self.urgent and any(o.batch_id in self.urgent for _, o in self.group))
        if not (force or full) and (self.commits or (
                not urgent and now - self._last_flush < self.settings.commit_interval_seconds)):
            return
        self._last_flush = now
        group, self.group = self.group[: self.settings.commit_group_size], self.group[self.settings.commit_group_size:]
        fut = self.committer.submit(self.sink.commit_group, [o for _, o in group])
        self.commits[fut] = group

    def _forget(self, slot: _Slot, ref: Any) -> None:
        """An answer arrived: the call leaves the books, and the next call in flight becomes the head."""
        self.refs.pop(ref, None)
        if slot.inflight and slot.inflight[0][0] == ref:
            slot.inflight.popleft()
            slot.head_since = self.clock()
        else:
            slot.inflight = collections.deque(x for x in slot.inflight if x[0] != ref)

    def _on_exception(self, slot: _Slot, b: int, ledger: Ledger, error: str, tb: str) -> None:
        """Batch `b` raised `error` ("Type: message") with traceback `tb`: count the attempt, then retry
        it after a backoff (a stateful slot is rolled back and replays) or dead-letter it."""
        import ray

        attempts = ledger.attempts.get(b, 0) + 1
        dead = self._count_failure(b, ledger, error, tb)
        log.warning("batch %d raised %s (attempt %d)%s", b, error, attempts, "; dead-lettered" if dead else "")
        if self.spec.stateful:
            for r, _ in slot.inflight:
                self.refs.pop(r, None)
            slot.inflight.clear()
            slot.cursor = ray.get(slot.actor.rollback.remote())
            if not dead:
                time.sleep(self._backoff(attempts))
            self._rebuild_slot_queue(slot, ledger)
            self.on_event("rollback", {"slot": slot.index, "batch_id": b, "cursor": slot.cursor})
        elif not dead:
            self.outstanding[slot.index].discard(b)
            heapq.heappush(self.delayed, (self.clock() + self._backoff(attempts), b, self._batch(b)))
        else:
            self.outstanding[slot.index].discard(b)

    def _collect_commits(self, ledger: Ledger, *, block: bool = False) -> None:
        for fut in list(self.commits):
            if not (block or fut.done()):
                continue
            group = self.commits.pop(fut)
            fut.result()  # a failed commit is a storage failure: the job stops, progress stays behind it
            for s, out in group:  # committed now, or by an earlier run whose marker we had not seen
                self.committing.discard(out.batch_id)
                self.urgent.discard(out.batch_id)
                self.outstanding[s].discard(out.batch_id)
                self.failures.pop(out.batch_id, None)
                ledger.mark_done(out.batch_id)
            self.on_event("commit", {"batch_ids": [o.batch_id for _, o in group], "outputs": [o for _, o in group]})

    def _maybe_finish(self, ledger: Ledger) -> None:
        """Once every batch is done: each idle slot persists its final state (stateful), once."""
        if not ledger.finished or self.commits or self.group:
            return
        busy = set(self.finishing.values()) | self.finished_slots
        for slot in self.slots:
            if slot.index in busy:
                continue
            if not self.spec.stateful:
                self.finished_slots.add(slot.index)
            elif slot.running and not slot.queue and not slot.inflight:
                self.finishing[slot.actor.finish.remote(INF)] = slot.index

    def _on_finished(self, ref: Any, ledger: Ledger) -> None:
        import ray
        from ray.exceptions import RayActorError

        slot = self.slots[self.finishing.pop(ref)]
        try:
            done = ray.get(ref)
        except RayActorError as e:  # died while saving its final state: a replacement restores and replays
            self._replace(slot, ledger, f"died while finishing ({type(e).__name__})", None)
            return
        self._checkpoint_events(slot.index, done["checkpoints"])
        self.finished_slots.add(slot.index)

    def _check_hangs(self, ledger: Ledger) -> None:
        now = self.clock()
        for slot in self.slots:
            if slot.running and slot.inflight and now - slot.head_since > self.settings.batch_timeout_seconds:
                ids = slot.inflight[0][1]  # the call running: when it carries several, each is retried alone
                if len(ids) > 1:
                    self.suspects.update(ids)
                what = f"batch {ids[0]}" if len(ids) == 1 else f"a call of batches {list(ids)}"
                self._replace(slot, ledger, f"hung on {what} for > {self.settings.batch_timeout_seconds:g}s",
                              ids[0] if len(ids) == 1 else None)

    # ------------------------------------------------------------------ the loop

    def run(self) -> JobResult:
        import ray

        t0 = time.perf_counter()
        self._open_job()  # a mismatched job raises here, before anything of it is written
        ledger = self._resume()
        resumed_from = ledger.watermark
        self.resumed_done = ledger.watermark + len(ledger.done_above)
        try:
            if ledger.finished and self.sink.is_complete() is not None:
                log.info("job %s is complete already: nothing to run", self.spec.job_id)
                return self._job_result(t0, resumed_from)
            for slot in self.slots:
                self._start_slot(slot)
            self._top_up_spares()  # built with the slots, not while the job runs: a standby costs start-up only
            while self.starting:  # first start: every slot's cursor decides where reading begins
                ready, _ = ray.wait(list(self.starting), num_returns=1)
                self._on_started(ready[0], ledger)
            start = ledger.watermark
            if self.spec.stateful:
                start = min([start] + [s.cursor for s in self.slots])
            self.read_pos = start
            self._reader = iter(self.source.read(start))
            for b in sorted(ledger.redo):  # retried dead letters, below the watermark (stateless only)
                self.ready_queue.append((b, self._batch(b)))
            if ledger.redo:
                self._save_progress(ledger)  # the request is taken: its batches are not dead any more
            while not ledger.finished or len(self.finished_slots) < len(self.slots):
                self._fill(ledger)
                self._dispatch()
                self._maybe_finish(ledger)
                refs = list(self.refs) + list(self.starting) + list(self.finishing)
                if refs:  # one answer per turn: the loop costs less than a second wait, and refills sooner
                    ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
                    for ref in ready:
                        if ref in self.starting:
                            self._on_started(ref, ledger)
                        elif ref in self.finishing:
                            self._on_finished(ref, ledger)
                        else:
                            self._handle(ref, ledger)
                elif self.commits:
                    futures.wait(list(self.commits), timeout=0.05, return_when=futures.FIRST_COMPLETED)
                else:
                    time.sleep(0.005)
                self._collect_commits(ledger)
                self._maybe_top_up_spares()
                self._flush()
                self._check_hangs(ledger)
                if self.clock() - self._last_progress > 1.0:
                    self._save_progress_soon(ledger)
            self._flush(force=True)
            self._collect_commits(ledger, block=True)
            self._state = "complete"
            self._save_progress(ledger)
            summary = {"total": self.total, "dead_letters": sorted(self.dead), "restarts": self.restarts}
            self.sink.mark_complete(summary, replace=self._retried)
        except BaseException as e:
            self._state, self._error = "failed", f"{type(e).__name__}: {e}"
            for step in (self._settle_progress, lambda: self._save_progress(ledger)):
                try:
                    step()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            raise
        finally:
            for actor in [slot.actor for slot in self.slots] + self.spares:
                if actor is not None:
                    try:
                        ray.kill(actor)
                    except Exception:  # noqa: BLE001
                        pass
            self.committer.shutdown(wait=True)
            self.store.close()
        return self._job_result(t0, resumed_from)

    def _job_result(self, t0: float, resumed_from: int) -> JobResult:
        return JobResult(
            job_id=self.spec.job_id,
            total=self.total,
            committed=self.total - len(self.dead),
            dead_letters=sorted(self.dead.values(), key=lambda d: d.batch_id),
            restarts=self.restarts,
            retries=self.retries,
            seconds=time.perf_counter() - t0,
            resumed_from=resumed_from,
            calls=self.calls,
        )
