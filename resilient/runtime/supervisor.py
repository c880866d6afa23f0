"""The Ray driver of a job: turns Ray refs and storage futures into scheduler inputs, and commands into Ray
calls and storage writes.

Every decision is the scheduler's (`resilient.runtime.scheduler`, where the exactly-once protocol and the
failure handling are written down). This module only does what the scheduler cannot: I/O. It never
blocks on one actor or one write while the job runs:

* actor operations (activation, calls, rollback, final save, a probe of a start that Ray reports as
  "unavailable") are refs waited on together in one ``ray.wait`` loop; every ref is kept until it
  resolves and is read once, so no Ray "unhandled error" is ever logged for it;
* storage writes (claiming an epoch before an activation, group commits, progress saves) run on
  threads; each finished one is put on a queue that the loop drains;
* time is the scheduler's timers: the loop waits at most until the next one is due.

A stateful call (`Worker.run`) has two returns: the answers, read when they come, and the newest snapshot
it took, never read here: its ref is the slot's hot snapshot (`resilient.runtime.hot`), kept by the
scheduler and handed to a replacement's activation.

Why an actor died is read from Ray's error (`death_cause`): the constructor's or a restore's exception,
preemption, a lost node, the memory monitor, or a plain process death.

Preemption notices: every ``DRAIN_POLL_S`` the loop asks Ray's GCS which nodes are draining
(``ray._private.state.state.get_draining_nodes()``: ``{node_id: deadline_ms}``, about 0.3 ms a call; Ray
marks a node draining when KubeRay, a managed platform, the autoscaler or ``ray drain-node`` announces its
end) and tells the scheduler of each new one (`NodeDraining`, the deadline moved to the scheduler's
clock; a drain with no deadline gets none). It is a private Ray API: where it is missing or fails, the
driver says so once, loudly, and preemptions are handled when the actors die. Each worker reports its
node when it comes up; each standby when it is built (`SpareUp`).

Graceful stop: `request_stop` (SIGTERM, Ctrl-C, ``ray job stop``: see `resilient.api`) is turned into
`StopRequested` with a deadline ``stop_timeout_seconds`` away; the scheduler's `StopJob` ends the run
with `JobStoppedError` once the progress record is saved. Ray actor options (`resilient.placement`) go
to every worker and standby; an actor with placement-group bundles gets its own group, removed with it.

At the start, the job record is checked (`resilient.runtime.records`), the progress record read, and
retry requests for dead letters taken; at the end the progress record is written last and the sink
marked complete. A failed job still writes its progress record (state "failed", with the error).
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from resilient.errors import NoCheckpointError, ResilientError
from resilient.retry import is_transient
from resilient.runtime import events as ev
from resilient.runtime import records
from resilient.runtime.calls import most_per_call
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
from resilient.runtime.reader import BatchReader
from resilient.runtime.scheduler import INF, SPARE_DELAY_S, DeadLetter, Policy, Scheduler
from resilient.runtime.worker import CONTROL_GROUP, JobSpec, Worker
from resilient.storage import CheckpointStore

__all__ = ["DeadLetter", "JobFailedError", "JobMismatchError", "JobResult", "JobStoppedError", "Supervisor",
           "death_cause"]

log = logging.getLogger("resilient.runtime")
_ = (INF, SPARE_DELAY_S)  # re-exported for callers of the driver


class JobFailedError(ResilientError):
    """The job stopped: a poison batch with ``on_poison="fail"``, a systematic error, a crash loop, or a
    storage failure. ``traceback`` holds the user's traceback when the pipeline raised."""

    def __init__(self, message: str, traceback: str = "") -> None:
        self.traceback = traceback
        super().__init__(message + (f"\n\nThe pipeline's traceback:\n{traceback.rstrip()}" if traceback else ""))


class JobStoppedError(JobFailedError):
    """The job stopped as asked (SIGTERM, Ctrl-C, ``ray job stop``): what had answered is committed, the
    slots' state and the progress are saved; running it again with the same job id resumes it."""


DRAIN_POLL_S = 0.05  # how often the driver asks Ray which nodes are draining (one GCS call: ~0.2 ms of driver CPU)
NO_DEADLINE_S = 1e9  # a drain announced without a deadline


def draining_nodes() -> dict[str, int]:
    """``{node_id: deadline_ms}`` of the nodes Ray is draining (deadline 0: none). Raises where the
    private API is missing."""
    from ray._private.state import state

    return dict(state.get_draining_nodes())


class JobMismatchError(ResilientError):
    """A job id was reused with a different pipeline, configuration or source; refused, not resumed."""


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


def death_cause(error: BaseException) -> Cause:
    """Why an actor died, from the error Ray raised for one of its calls.

    >>> class ActorDiedError(Exception):
    ...     actor_init_failed, preempted = False, False
    >>> death_cause(ActorDiedError("The actor died because its node has died. Node Id: 12ab"))
    <Cause.NODE: 'node'>
    >>> death_cause(ActorDiedError("...its worker process has died. Worker exit type: NODE_OUT_OF_MEMORY"))
    <Cause.OOM: 'oom'>
    >>> death_cause(ActorDiedError("The actor is dead because its worker process has died."))
    <Cause.PROCESS: 'process'>
    """
    if getattr(error, "actor_init_failed", False):
        return Cause.USER
    if getattr(error, "preempted", False):
        return Cause.PREEMPTED
    name, text = type(error).__name__, str(error)
    if name == "OutOfMemoryError" or "OUT_OF_MEMORY" in text or "low on memory" in text:
        return Cause.OOM
    if name in ("NodeDiedError", "LocalRayletDiedError") or "node has died" in text or "node was preempted" in text:
        return Cause.PREEMPTED if "preempted" in text else Cause.NODE
    return Cause.PROCESS


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _raised(text: str) -> str:
    r"""The exception line ("Type: message") at the end of a remote traceback's text.

    >>> _raised("Traceback ...\n  File \"p.py\", line 3, in f\nOSError: no weights\n")
    'OSError: no weights'
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


class Supervisor:
    """Runs one job to completion (or resumes it). Driver side; one per job run.

    Args:
        spec: the job (pipeline, sink, settings, slots).
        source: a replayable source (`resilient.io.sources`).
        clock: monotonic seconds (the scheduler's time).
        on_event: called with each `resilient.runtime.events.JobEvent`.
        rng: jitter of retry backoffs.
    """

    def __init__(
        self,
        spec: JobSpec,
        source: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[Any], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.source = source
        self.settings = spec.settings
        self.store = CheckpointStore(spec.settings)
        self.sink = spec.sink
        self.clock = clock
        self.on_event = on_event or (lambda event: None)
        self.rng = rng or random.Random()
        self.total = len(source)
        self.sched: Scheduler | None = None
        self.resumed_done = 0
        self._dead_before: dict[int, DeadLetter] = {}
        self._retry_seen = -1
        self._retried = False
        self._started_at = time.time()
        self._refs: dict[Any, tuple] = {}  # every ref not yet read: what it answers
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # inputs from finished storage futures
        self._futures = 0  # storage futures not finished yet
        self._incs: dict[int, Any] = {}  # incarnation -> actor handle
        self._spares: dict[int, Any] = {}
        self._epochs: dict[int, int] = {}
        self._actor_cls: Any = None
        self._reader: BatchReader | None = None
        self._replica_seen: dict[tuple[str, str], int] = {}
        self._replica_state: dict[str, list] = {}
        self._progress_future: Future | None = None
        self._outcome: str | None = None
        self._failure: FailJob | None = None
        self._pgs: dict[Any, Any] = {}  # actor id -> its placement group (placement_group_bundles)
        self._stop_asked: str | None = None
        self._stop_told = False
        self._stopped: StopJob | None = None
        self._drains_seen: dict[str, int] = {}
        self._next_drain_poll = 0.0
        self._drain_source: Callable[[], dict[str, int]] | None = draining_nodes
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resilient-io")
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resilient-commit")

    # ------------------------------------------------------------------ what the handle shows

    @property
    def restarts(self) -> int:
        return self.sched.restarts if self.sched else 0

    @property
    def retries(self) -> int:
        return self.sched.retries if self.sched else 0

    @property
    def calls(self) -> int:
        return self.sched.calls_sent if self.sched else 0

    @property
    def dead(self) -> dict[int, DeadLetter]:
        return self.sched.dead if self.sched else self._dead_before

    @property
    def spares(self) -> list[Any]:
        """The standby actors built and not used yet, oldest first."""
        return list(self._spares.values())

    def actors(self) -> list[dict]:
        """The worker actors now serving the job: slot, pid, node id, epoch."""
        return list(self.sched.progress_fields()["actors"]) if self.sched else []

    def request_stop(self, reason: str) -> None:
        """Stop the job gracefully (thread-safe; a signal handler may call it): see `JobStoppedError`."""
        if self._stop_asked is None:
            self._stop_asked = reason

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
        key = records.job_key(self.spec.job_id)
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

    def _resume(self) -> tuple[Ledger, set[int]]:
        s = self.settings
        window = max(64, 4 * self.spec.slots * s.queue_depth * most_per_call(s.batches_per_call))
        try:
            saved = self.store.load(records.progress_key(self.spec.job_id)).state
        except NoCheckpointError:
            saved = None
        resume = records.read_progress(saved)
        self._dead_before = {d["batch_id"]: DeadLetter(**d) for d in resume.dead}
        watermark = resume.watermark
        redo = set(resume.redo)
        self._retry_seen = resume.retry_generation
        for b in self._retry_requested():
            if self.spec.stateful:
                log.error("job %s: dead letters cannot be retried in a stateful pipeline (its slots' state "
                          "is past them); request for %s ignored", self.spec.job_id, b)
                break
            if self._dead_before.pop(b, None) is not None:
                self._retried = True
                if b < watermark:
                    redo.add(b)
        done = set(self.sink.committed_from(watermark))
        done |= {b for b in self._dead_before if b >= watermark}
        redo = {b for b in redo if not self.sink.is_committed(b)}  # a few ids: one marker read each
        return Ledger(self.total, window, watermark=watermark, done_above=done, redo=set(redo)), redo

    def _retry_requested(self) -> list[int]:
        """Dead letters a user asked to retry (``resilient dead-letters JOB --retry``), once per request."""
        try:
            request = self.store.load(records.retry_key(self.spec.job_id))
        except NoCheckpointError:
            return []
        if request.generation <= self._retry_seen:
            return []
        self._retry_seen = request.generation
        ids = sorted(int(b) for b in request.state.get("batch_ids", []))
        log.warning("job %s: retrying dead letters %s on request", self.spec.job_id, ids)
        return ids

    def _progress_record(self, fields: dict) -> dict:
        return records.progress_record(fields, started_at=self._started_at, now=time.time(),
                                       resumed_done=self.resumed_done, retry_generation=self._retry_seen)

    # ------------------------------------------------------------------ the loop

    def run(self) -> JobResult:
        import ray

        t0 = time.perf_counter()
        self._open_job()  # a mismatched job raises here, before anything of it is written
        ledger, redo = self._resume()
        resumed_from = ledger.watermark
        self.resumed_done = ledger.watermark + len(ledger.done_above)
        policy = Policy.from_settings(self.settings, self.spec.slots, self.spec.stateful)
        self.sched = Scheduler(policy, ledger, dead=self._dead_before, redo=redo, rng=self.rng, now=self.clock())
        self._reader = BatchReader(self.source, ledger.watermark)
        try:
            if ledger.finished and self.sink.is_complete() is not None:
                log.info("job %s is complete already: nothing to run", self.spec.job_id)
                return self._job_result(t0, resumed_from)
            self._apply(self.sched.start(self.clock()))
            while self._outcome is None:
                self._turn(ray)
            if self._outcome == "failed":
                assert self._failure is not None
                raise JobFailedError(self._failure.error, self._failure.traceback)
            if self._outcome == "stopped":
                raise self._stopped_error()
            summary = {"total": self.total, "dead_letters": sorted(self.dead), "restarts": self.restarts}
            self.sink.mark_complete(summary, replace=self._retried)
        except JobStoppedError:
            raise
        except BaseException as e:
            self._save_failed(e)
            raise
        finally:
            self._shutdown(ray)
        return self._job_result(t0, resumed_from)

    def _turn(self, ray: Any) -> None:
        """One turn of the loop: wait for a ref (or a storage future, or the next timer), feed what came
        in to the scheduler, carry out its commands."""
        sched = self.sched
        assert sched is not None
        now = self.clock()
        if self._stop_asked is not None and not self._stop_told:
            self._stop_told = True
            log.warning("job %s: %s; stopping: committing what has answered and saving the slots' state "
                        "(at most %gs)", self.spec.job_id, self._stop_asked, self.settings.stop_timeout_seconds)
            self._feed(StopRequested(now + self.settings.stop_timeout_seconds, self._stop_asked))
        if now >= self._next_drain_poll and self._drain_source is not None:
            self._next_drain_poll = now + DRAIN_POLL_S
            self._poll_drains(now)
        wake = sched.next_wakeup()
        wait = 0.05 if wake is None else min(0.05, max(0.0, wake - now))
        if self._futures:
            wait = min(wait, 0.005)  # a storage future may finish meanwhile: look again soon
        if self._refs:
            ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=wait)
            for ref in ready:
                self._on_ref(ref)
        elif not self._done.qsize():
            time.sleep(wait)
        while not self._done.empty() and self._outcome is None:
            self._futures -= 1
            item = self._done.get()
            if isinstance(item, tuple):  # an epoch claimed and the activation sent: wait for it
                _, c, epoch, ref = item
                self._refs[ref] = ("up", c.slot, c.inc, epoch)
            elif isinstance(item, FailJob):
                self._c_fail(item)
            else:
                self._feed(item)
        if self._outcome is None:
            self._apply(sched.tick(self.clock()))

    def _poll_drains(self, now: float) -> None:
        """Tell the scheduler of each node that started draining (or whose deadline moved)."""
        assert self._drain_source is not None
        try:
            draining = self._drain_source()
        except Exception as e:  # noqa: BLE001 - a private Ray API: degrade, loudly, once
            log.warning("job %s: this Ray cannot tell which nodes are draining (%s: %s): preemption notices are "
                        "not followed; a preempted actor is replaced when it dies (never charged to a batch)",
                        self.spec.job_id, type(e).__name__, e)
            self._drain_source = None
            return
        wall = time.time()
        for node, deadline_ms in draining.items():
            if self._drains_seen.get(node) == deadline_ms:
                continue
            self._drains_seen[node] = deadline_ms
            left = deadline_ms / 1000 - wall if deadline_ms else NO_DEADLINE_S
            log.warning("job %s: node %s is draining (%s); its actors are handed over", self.spec.job_id, node,
                        f"it goes in {left:.1f}s" if deadline_ms else "no deadline")
            self._feed(NodeDraining(node, now + left))
        for node in [n for n in self._drains_seen if n not in draining]:
            del self._drains_seen[node]  # gone, or no longer draining

    def _feed(self, item: Any) -> None:
        if item is None or self._outcome is not None:
            return
        assert self.sched is not None
        self._apply(self.sched.handle(item, self.clock()))

    # ------------------------------------------------------------------ refs -> inputs

    def _on_ref(self, ref: Any) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        tag = self._refs.pop(ref)
        kind, slot, inc = tag[0], tag[1], tag[2]
        if kind == "control":  # out of band (persist, wind down): a death shows in the calls, a failed save
            # in the next batch
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001
                pass
            return
        if kind == "spare":  # a standby is built: where (if it died, its activation will say)
            try:
                self._feed(SpareUp(inc, ray.get(ref)["node_id"]))
            except Exception:  # noqa: BLE001
                pass
            return
        try:
            value = ray.get(ref)
        except RayActorError as e:
            if kind == "up" and isinstance(e, ActorUnavailableError) and inc in self._incs:
                # Ray may report a constructor that raised as "unavailable" before it knows the actor died:
                # ask again; the dead actor's answer names the error (`_on_ref` of the probe)
                self._refs[self._incs[inc].ready.remote()] = ("probe", slot, inc, e)
                return
            cause = death_cause(e)
            if cause is Cause.USER:  # the constructor raised: its exception and traceback
                self._feed(ActorDown(slot, inc, cause, _raised(str(e)), str(e)))
            else:
                self._feed(ActorDown(slot, inc, cause, _first_line(str(e))))
            return
        except RayTaskError as e:
            self._feed(self._task_error(tag, e))
            return
        except Exception as e:  # noqa: BLE001 - lost objects, owner errors: the incarnation is not to be trusted
            self._feed(ActorDown(slot, inc, Cause.PROCESS, f"{type(e).__name__}: {e}"))
            return
        if kind == "call":
            hot = None
            if self.spec.stateful:  # `Worker.run`: the answers and the cursor of the snapshot in tag[6]
                value, cursor = value
                hot = None if cursor is None else (cursor, tag[6])
            self._worker_reports(slot, inc, value)
            self._feed(CallAnswered(tag[3], tuple(value), hot))
        elif kind == "up":
            self._checkpoint_events(slot, value.get("checkpoints", ()))
            self._feed(ActorUp(slot, inc, tag[3], value["pid"], value["node_id"], value["cursor"],
                               value.get("generation"), value.get("hot", False)))
        elif kind == "rollback":
            self._feed(RollbackDone(slot, inc, int(value)))
        elif kind == "finish":
            self._checkpoint_events(slot, value.get("checkpoints", ()))
            self._feed(FinishDone(slot, inc))
        elif kind == "probe":  # the actor answers after all: its activation was lost, start another
            self._feed(ActorDown(slot, inc, Cause.PROCESS, str(tag[3])))

    def _task_error(self, tag: tuple, e: Any) -> Any:
        """An actor method raised (the actor lives): what it means for the scheduler."""
        from resilient.runtime.worker import DirtyWorkerError

        kind, slot, inc = tag[0], tag[1], tag[2]
        cause = getattr(e, "cause", None)
        text = str(e)
        error = f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(text)
        if kind == "call":
            if isinstance(cause, DirtyWorkerError):
                return None  # queued behind a failed batch: the scheduler forgot this call at the rollback
            ids, epoch = tag[4], tag[5]
            return CallAnswered(tag[3], (Failure(ids[0], slot, epoch, error, text),))
        if kind in ("up", "rollback"):  # the restore raised: the user's state does not load
            return ActorDown(slot, inc, Cause.USER, error, text)
        return ActorDown(slot, inc, Cause.PROCESS, _first_line(text))  # the final save failed: try again

    # ------------------------------------------------------------------ commands -> Ray and storage

    def _apply(self, commands: list) -> None:
        for c in commands:
            handler = _COMMANDS[type(c)]
            handler(self, c)

    def _new_actor(self) -> Any:
        import ray

        from resilient.placement import actor_options, placement_bundles

        if self._actor_cls is None:
            self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0,
                                         concurrency_groups={CONTROL_GROUP: 1})(Worker)
        s = self.settings
        pg = None
        group = placement_bundles(s.ray_remote_args, s.actor_cpus, s.actor_gpus)
        if group is not None:
            from ray.util.placement_group import placement_group

            pg = placement_group(group[0], strategy=group[1])
        actor = self._actor_cls.options(**actor_options(s.ray_remote_args, s.actor_cpus, s.actor_gpus, pg)).remote(
            self.spec)
        if pg is not None:
            self._pgs[actor._actor_id] = pg
        return actor

    def _kill_actor(self, actor: Any) -> None:
        import ray

        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        pg = self._pgs.pop(actor._actor_id, None)
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass

    def _c_spare(self, c: StartSpare) -> None:
        actor = self._spares[c.spare] = self._new_actor()
        self._refs[actor.ready.remote()] = ("spare", None, c.spare)

    def _c_kill_spare(self, c: KillSpare) -> None:
        actor = self._spares.pop(c.spare, None)
        if actor is not None:
            self._kill_actor(actor)

    def _c_start(self, c: StartActor) -> None:
        actor = self._spares.pop(c.spare) if c.spare is not None and c.spare in self._spares else self._new_actor()
        self._incs[c.inc] = actor
        key = records.slot_key(self.spec.job_id, c.slot)

        def activate() -> Any:
            try:
                epoch = self.store.claim_epoch(key)
            except Exception as e:  # noqa: BLE001 - told to the scheduler as this start's failure
                if not is_transient(e):
                    return FailJob(f"slot {c.slot}: could not claim an epoch in the checkpoint store: {e}")
                return ActorDown(c.slot, c.inc, Cause.PROCESS, f"could not claim an epoch: {type(e).__name__}: {e}")
            self._epochs[c.inc] = epoch
            return ("activate", c, epoch, actor.activate.remote(c.slot, epoch, None if c.hot is None else [c.hot]))

        self._submit(self.io, activate)

    def _c_send(self, c: SendCall) -> None:
        actor = self._incs[c.inc]
        assert self._reader is not None
        ids = [b for b, _ in c.items]
        batches = self._reader.get(ids)
        work = [(b, batch, replay) for (b, replay), batch in zip(c.items, batches)]
        hot: list = []
        if self.spec.stateful:  # the answers, and the newest snapshot it took (a hot snapshot), kept unread
            ref, *hot = actor.run.options(num_returns=2).remote((c.floor, work))
        else:
            ref = actor.process.remote((c.floor, work))
        self._refs[ref] = ("call", c.slot, c.inc, c.call, tuple(ids), self._epochs.get(c.inc, -1), *hot)
        replays = [b for b, replay in c.items if replay]
        if replays:
            self._reader.drop(replays)  # sent for the last time (a later replay reads them again)

    def _c_kill(self, c: KillActor) -> None:
        actor = self._incs.pop(c.inc, None)
        self._epochs.pop(c.inc, None)
        for state in self._replica_state.values():  # the dead incarnation's view of the replicas goes
            state[1].pop(f"inc-{c.inc}", None)
        if actor is not None:
            self._kill_actor(actor)

    def _c_rollback(self, c: RollbackActor) -> None:
        self._refs[self._incs[c.inc].rollback.remote()] = ("rollback", c.slot, c.inc)

    def _c_finish(self, c: FinishActor) -> None:
        self._refs[self._incs[c.inc].finish.remote(INF)] = ("finish", c.slot, c.inc)

    def _c_wind_down(self, c: WindDown) -> None:
        actor = self._incs.get(c.inc)
        if actor is not None:
            ref = actor.wind_down.options(concurrency_group=CONTROL_GROUP).remote()
            self._refs[ref] = ("control", c.slot, c.inc)

    def _c_persist(self, c: PersistState) -> None:
        actor = self._incs.get(c.inc)
        if actor is not None:  # beside the calls in flight, not behind them
            ref = actor.persist_now.options(concurrency_group=CONTROL_GROUP).remote(c.floor)
            self._refs[ref] = ("control", c.slot, c.inc)

    def _c_commit(self, c: CommitGroup) -> None:
        outputs = list(c.outputs)

        def commit() -> Any:
            try:
                self.sink.commit_group(outputs)
            except Exception as e:  # noqa: BLE001 - told to the scheduler: retried or the job fails
                return CommitFailed(c.group, f"{type(e).__name__}: {e}", is_transient(e))
            return CommitDone(c.group)

        self._submit(self.committer, commit)

    def _c_progress(self, c: SaveProgress) -> None:
        key = records.progress_key(self.spec.job_id)
        record = self._progress_record(c.fields)
        if c.final:  # the last word of the run: after any save still in flight, and inline
            self._save_progress_now(record)
            return

        def save() -> Any:
            try:
                self.store.save_async(key, record, copy=False).wait()
            except Exception as e:  # noqa: BLE001 - told to the scheduler
                return ProgressFailed(c.seq, f"{type(e).__name__}: {e}", is_transient(e))
            self._driver_replica_events()
            return ProgressDone(c.seq)

        self._progress_future = self._submit(self.io, save)

    def _c_emit(self, c: Emit) -> None:
        e = c.event
        if isinstance(e, ev.BatchesCommitted):
            assert self._reader is not None and self.sched is not None
            self._reader.drop(e.batch_ids)
            self._reader.drop_below(self.sched.ledger.watermark)
        elif isinstance(e, ev.BatchDeadLettered):
            assert self._reader is not None
            self._reader.drop([e.batch_id])
            log.error("batch %d is a poison batch after %d attempts; dead-lettered: %s", e.batch_id, e.attempts,
                      e.error)
        elif isinstance(e, ev.BatchRetried):
            log.warning("batch %d failed (attempt %d): %s", e.batch_id, e.attempts, _first_line(e.error))
        elif isinstance(e, ev.ActorReplaced):
            log.warning("slot %d: actor %s; replacing it%s", e.slot, e.reason,
                        f"; redelivering {list(e.redelivered)}" if e.redelivered else "")
        elif isinstance(e, ev.SlotRolledBack):
            log.warning("slot %d: rolled back to its checkpoint at batch %d after batch %d raised", e.slot,
                        e.cursor, e.batch_id)
        elif (isinstance(e, ev.ActorStarted) and self.spec.stateful
              and (self.restarts or e.generation is not None or e.hot)):
            log.warning("slot %d: epoch %d running on pid %s, %s; replaying its batches from %d", e.slot, e.epoch,
                        e.pid, "resumed from its hot snapshot" if e.hot else
                        f"resumed from checkpoint generation {e.generation}" if e.generation is not None
                        else "no checkpoint yet (state rebuilt from the start)", e.cursor)
        self.on_event(e)

    def _c_fail(self, c: FailJob) -> None:
        self._outcome, self._failure = "failed", c

    def _c_complete(self, c: CompleteJob) -> None:
        self._outcome = "complete"

    def _c_stop(self, c: StopJob) -> None:
        self._outcome, self._stopped = "stopped", c

    def _stopped_error(self) -> JobStoppedError:
        c = self._stopped
        assert c is not None
        return JobStoppedError(
            f"job {self.spec.job_id!r} stopped ({c.reason}): {c.committed} of {c.total} batches committed, the "
            f"slots' state and the progress saved. To resume, run the same pipeline again with job id "
            f"{self.spec.job_id!r} (the same command, or `ray job submit` again); `resilient status "
            f"{self.spec.job_id}` shows where it stands")

    def _submit(self, pool: ThreadPoolExecutor, fn: Callable[[], Any]) -> Future:
        self._futures += 1

        def run() -> Any:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - a bug in I/O glue must not hang the loop
                result = FailJob(f"{type(e).__name__}: {e}")
            self._done.put(result)
            return result

        return pool.submit(run)

    def _save_progress_now(self, record: dict) -> None:
        """Save the progress record inline, after the save in flight (if any): the record never goes back.
        The background save never raises (its failure is an input of the scheduler)."""
        if self._progress_future is not None:
            self._progress_future.result()
            self._progress_future = None
        self.store.save(records.progress_key(self.spec.job_id), record)
        self._driver_replica_events()

    # ------------------------------------------------------------------ what workers report

    def _worker_reports(self, slot: int, inc: int, answers: list) -> None:
        for a in answers:
            if isinstance(a, Failure):
                continue
            self._checkpoint_events(slot, a.checkpoints)
            self._replica_events(f"inc-{inc}", a.replicas)

    def _checkpoint_events(self, slot: int, outcomes: Any) -> None:
        for c in outcomes:
            self.on_event(ev.CheckpointDone(slot, c["op"], c["seconds"], c.get("bytes"), c.get("generation")))

    def _driver_replica_events(self) -> None:
        self._replica_events("driver", [(h.url, h.degraded, h.failures) for h in self.store.health()])

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
                self.on_event(ev.ReplicaChanged(url, any(state[1].values()), state[0]))

    # ------------------------------------------------------------------ the end

    def _save_failed(self, error: BaseException) -> None:
        """A failed run still records where it stands (state "failed", with the error)."""
        if self.sched is None:
            return
        self.sched.state = "failed"
        self.sched.error = f"{type(error).__name__}: {_first_line(str(error))}"
        try:
            self._save_progress_now(self._progress_record(self.sched.progress_fields()))
        except Exception:  # noqa: BLE001 - the original error matters more
            pass

    def _shutdown(self, ray: Any) -> None:
        for actor in list(self._incs.values()) + list(self._spares.values()):
            self._kill_actor(actor)
        self._incs.clear()
        self._spares.clear()
        self.committer.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self._drain_refs(ray)
        self.store.close()

    def _drain_refs(self, ray: Any) -> None:
        """Read every ref still pending (its actor is killed: it resolves at once), so that Ray logs no
        "unhandled error" for it."""
        refs = list(self._refs)
        self._refs.clear()
        while not self._done.empty():
            item = self._done.get()
            if isinstance(item, tuple) and item and item[0] == "activate":
                refs.append(item[3])
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001
                    pass

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


_COMMANDS = {
    StartSpare: Supervisor._c_spare,
    StartActor: Supervisor._c_start,
    SendCall: Supervisor._c_send,
    KillActor: Supervisor._c_kill,
    KillSpare: Supervisor._c_kill_spare,
    RollbackActor: Supervisor._c_rollback,
    FinishActor: Supervisor._c_finish,
    PersistState: Supervisor._c_persist,
    WindDown: Supervisor._c_wind_down,
    CommitGroup: Supervisor._c_commit,
    SaveProgress: Supervisor._c_progress,
    Emit: Supervisor._c_emit,
    FailJob: Supervisor._c_fail,
    CompleteJob: Supervisor._c_complete,
    StopJob: Supervisor._c_stop,
}
