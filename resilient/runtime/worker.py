"""The worker actor: runs the user's pipeline on batches, stages outputs, checkpoints slot state.

One worker incarnation serves one slot with one *epoch* (claimed by the supervisor before the actor is
created). It never commits anything visible itself:

* outputs are *encoded* for the sink and sent back to the supervisor, which alone commits them, in
  groups — after checking the answer came from the slot's current epoch, so a zombie incarnation can
  never make an output visible;
* slot state (stateful pipelines) is snapshotted in memory every `checkpoint_every` batches or
  `checkpoint_interval_seconds`, and the snapshot is persisted only once the supervisor reports every
  output it covers as committed (``commit_floor``): a checkpoint is never ahead of committed outputs, so a
  restore never skips a batch whose output was lost. Saves are fenced by the epoch in the store. The
  floor comes with each call and, out of band, through `persist_now` (Ray runs it in the actor's
  ``control`` concurrency group, beside a call in progress): each answer names the snapshot waiting
  (``Result.snapshot``), and the supervisor calls `persist_now` once the commit covering it lands.
  `wind_down` (same group) is for a leaving incarnation: from then on each call stops before its next
  batch and answers what ran, so the calls queued behind the running batch answer at once. The
  snapshot, the save in flight and their outcomes are guarded by one lock; `persist_now` runs no user
  code, so ``state_dict``/``load_state_dict`` under the lock (the call's own thread) cannot deadlock it.

One call carries one batch or several (`resilient.runtime.calls`); the worker runs them in order and
answers each with a `Result` or, if it raised, a `Failure` (error and traceback). After an exception the
state of a stateful slot may be half-updated: the worker stops the call there, turns *dirty* and refuses
further calls until `rollback()` reloads the last persisted checkpoint; the supervisor then replays the
slot's batches from that checkpoint's cursor. A stateless worker goes on with the call's next batch.

A stateful call goes through `run` (two returns): its answers, and the newest snapshot it took, packed for
the Ray object store, which the driver keeps as the slot's *hot snapshot*; `activate` restores from one when
given it, else (or if it is lost) from storage (`resilient.runtime.hot`).

Outputs are staged with ``settle_later`` (`FileSink.encode`): a local file's fsync runs in the background
while the next batch computes, and the call waits for all of them (`FileSink.settle`) before it answers,
so the driver never publishes a file that is not durable. An output whose background write failed is
answered as that batch's `Failure` (stateful: the call stops there and the slot is rolled back).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from resilient.codec import SnapshotBuffers
from resilient.config import Settings
from resilient.errors import ResilientError
from resilient.runtime.hot import HOT_READ_TIMEOUT_S, pack, unpack
from resilient.runtime.protocol import Failure, Result
from resilient.runtime.records import slot_key
from resilient.storage import CheckpointStore

__all__ = ["CONTROL_GROUP", "DirtyWorkerError", "Failure", "JobSpec", "Result", "Worker"]

log = logging.getLogger("resilient.worker")
CONTROL_GROUP = "control"  # the actor's concurrency group for `persist_now`: runs beside a call


class DirtyWorkerError(ResilientError):
    """The worker's state is suspect after an exception; it processes nothing until rolled back."""


@dataclass(frozen=True)
class JobSpec:
    """What every worker of a job needs; plain data, pickled to the actors (URLs and options, no handles)."""

    job_id: str
    target: Any  # the user's class or function
    init_args: tuple
    init_kwargs: dict
    stateful: bool
    sink: Any  # a FileSink (pickles without live handles)
    settings: Settings
    slots: int


class Worker:
    """Wrapped as a Ray actor by the supervisor (``ray.remote(Worker)``); usable in-process for tests."""

    def __init__(self, spec: JobSpec, slot: int | None = None, epoch: int = 0) -> None:
        self.spec = spec
        self.slot = slot if slot is not None else -1  # a standby serves no slot until activated
        self.epoch = epoch
        self.store = CheckpointStore(spec.settings)
        target = spec.target
        if isinstance(target, type):
            self.fn = target(*spec.init_args, **spec.init_kwargs)
        else:
            self.fn = target
        self.cursor = 0
        self.dirty = False
        self._leaving = False  # set by `wind_down`: run no further batch
        self._lock = threading.RLock()  # _snapshot, _saving, _outcomes: `persist_now` runs on another thread
        self._buffers = SnapshotBuffers()
        self._snapshot: dict | None = None  # taken in memory, waiting for its outputs to be committed
        self._hot: dict | None = None  # the newest snapshot taken in the current call, to ship (`run`)
        self._hot_limit = spec.settings.hot_snapshot_max_mb * (1 << 20)
        self._saving = None
        self._since = 0
        self._last_snapshot_at = time.monotonic()
        self.key = slot_key(spec.job_id, self.slot)
        self._loaded_generation: int | None = None
        self._loaded_bytes: int | None = None
        self._reported: Any = None  # the last save whose outcome is in _outcomes
        self._outcomes: list[dict] = []  # finished saves, not yet reported to the supervisor
        self._replicas_seen: tuple = tuple((h.url, h.degraded, h.failures) for h in self.store.health())

    # -- liveness and identity
    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "epoch": self.epoch}

    def activate(self, slot: int, epoch: int, hot: list | None = None) -> dict:
        """Take over `slot` as incarnation `epoch` (a standby built ahead, or a fresh actor): restore the
        slot's state and report where it stands. ``hot``: ``[ref]`` of the slot's hot snapshot (in a list,
        so that Ray passes the ref, not its value), restored instead of the persisted checkpoint if it
        arrives and loads."""
        self.slot, self.epoch = slot, epoch
        self.key = slot_key(self.spec.job_id, slot)
        if hot and self.spec.stateful:
            cursor = self._restore_hot(hot[0])
            if cursor is not None:
                return {**self.ready(), "cursor": cursor, "generation": None, "hot": True, "checkpoints": ()}
        t0 = time.perf_counter()
        cursor = self.restore()
        load = {"op": "load", "seconds": time.perf_counter() - t0, "bytes": self._loaded_bytes,
                "generation": self._loaded_generation}
        return {**self.ready(), "cursor": cursor, "generation": self._loaded_generation,
                "checkpoints": (load,) if self._loaded_generation is not None else ()}

    def _restore_hot(self, ref: Any) -> int | None:
        """Load the hot snapshot behind `ref`; its cursor, or None (lost, late or not loading: the caller
        restores from storage)."""
        import ray

        try:
            state = unpack(ray.get(ref, timeout=HOT_READ_TIMEOUT_S))
            with self._lock:
                return self._load(state, None, None)
        except Exception as e:  # noqa: BLE001 - the persisted checkpoint is restored instead
            log.warning("slot %d: its hot snapshot did not load (%s: %s); restoring its checkpoint from storage",
                        self.slot, type(e).__name__, e)
            return None

    # -- state
    def restore(self) -> int:
        """Load the slot's newest checkpoint (if any) into the user object; return its cursor."""
        if not self.spec.stateful:
            return 0
        with self._lock:
            return self._restore()

    def _restore(self) -> int:
        from resilient.errors import NoCheckpointError

        try:
            loaded = self.store.load(self.key)
        except NoCheckpointError:
            if self.dirty and isinstance(self.spec.target, type):  # no checkpoint yet: start afresh
                self.fn = self.spec.target(*self.spec.init_args, **self.spec.init_kwargs)
            self.dirty = False
            self._snapshot = None
            self._loaded_generation = self._loaded_bytes = None
            self.cursor = self.slot
            return self.cursor
        return self._load(loaded.state, loaded.generation, loaded.length)

    def _load(self, state: dict, generation: int | None, length: int | None) -> int:
        """Take a slot state (``{"user", "cursor"}``: a checkpoint's, or a hot snapshot's) into the user
        object; return its cursor."""
        self.fn.load_state_dict(state["user"])
        self._loaded_generation, self._loaded_bytes = generation, length
        self.cursor = int(state["cursor"])
        self.dirty = False
        self._snapshot = None
        return self.cursor

    def rollback(self) -> int:
        """Throw away in-memory state changes since the last persisted checkpoint; return its cursor."""
        with self._lock:
            if self._saving is not None:
                try:
                    self._saving.wait()
                except Exception:  # noqa: BLE001 - a failed save just means an older checkpoint is restored
                    pass
                self._saving = None
            return self.restore()

    def run(self, work: tuple[int, list]) -> tuple[tuple[list, int | None], Any]:
        """A stateful call from the driver (Ray ``num_returns=2``): `process`, then the newest snapshot
        taken during it, packed (`resilient.runtime.hot`), with its cursor beside the answers; ``None``
        when it took none, when the snapshot is past the call's first failure (it holds that batch's half
        or a lost output) or larger than ``hot_snapshot_max_mb``."""
        self._hot = None
        answers = self.process(work)
        hot, self._hot = self._hot, None
        if hot is not None:
            failed = next((a.batch_id for a in answers if type(a) is Failure), None)
            if failed is None or hot["cursor"] <= failed:
                try:
                    return (answers, int(hot["cursor"])), pack(hot)
                except Exception as e:  # noqa: BLE001 - not shipped: a replacement restores from storage
                    log.warning("slot %d: snapshot not kept in memory (%s: %s)", self.slot, type(e).__name__, e)
        return (answers, None), None

    def process(self, work: tuple[int, list]) -> list[Result | Failure]:
        """Apply the pipeline to the batches of one call, in order: ``work = (commit_floor, items)`` with
        items ``(batch_id, batch, replay)``; an output is encoded unless `replay` (already committed).

        Answers one `Result` or `Failure` per batch run. An exception in user code (or in encoding the
        output, or in a checkpoint save) is that batch's `Failure`; a stateless worker goes on with the next
        batch, a stateful one stops there (its state is rolled back and replayed). One argument: Ray
        serializes each argument of a call on its own."""
        import ray

        commit_floor, items = work
        if self.dirty:
            raise DirtyWorkerError(f"slot {self.slot} epoch {self.epoch} needs rollback before batch {items[0][0]}")
        answers: list[Result | Failure] = []
        for batch_id, batch, replay in items:
            if self._leaving:
                break  # unrun: the next incarnation (or the next run) takes them
            try:
                if isinstance(batch, ray.ObjectRef):  # Ray resolves a ref passed as an argument, not inside one
                    batch = ray.get(batch)
                answers.append(self._one(batch_id, batch, replay, commit_floor))
            except BaseException as e:  # the supervisor retries the batch or dead-letters it
                if self.spec.stateful:
                    self.dirty = True  # until rollback(): the state may hold half of this batch
                if isinstance(e, (SystemExit, KeyboardInterrupt)):
                    raise  # the actor exits, or Ray cancels the call: not an answer
                answers.append(Failure(batch_id, self.slot, self.epoch, f"{type(e).__name__}: {e}",
                                       "".join(traceback.format_exception(e))))
                if self.spec.stateful:
                    break
        unsettled = self.spec.sink.settle()  # every output answered is durable first
        return self._settled(answers, unsettled) if unsettled else answers

    def _settled(self, answers: list, failed: dict[int, str]) -> list:
        """The answers with each output whose background write failed turned into that batch's `Failure`; a
        stateful call stops there, as if the batch had raised (its state already holds it: rolled back)."""
        out: list[Result | Failure] = []
        for a in answers:
            if type(a) is Result and a.batch_id in failed:
                out.append(Failure(a.batch_id, self.slot, self.epoch, failed[a.batch_id], ""))
                if self.spec.stateful:
                    self.dirty = True
                    break
            else:
                out.append(a)
        return out

    def _one(self, batch_id: int, batch: Any, replay: bool, commit_floor: int) -> Result:
        t0 = time.perf_counter()
        out = self.fn(batch)
        encoded = None
        if not replay:
            encoded = self.spec.sink.encode(batch_id, out, epoch=self.epoch, settle_later=True)
        snapshot = None
        with self._lock:
            if self.spec.stateful:
                self.cursor = batch_id + self.spec.slots
                self._since += 1
                self._maybe_checkpoint(commit_floor)
                snapshot = None if self._snapshot is None else int(self._snapshot["cursor"])
            saves = self._finished_saves()
        return Result(batch_id, self.slot, self.epoch, encoded, time.perf_counter() - t0, self.cursor,
                      saves, self.replica_changes(), snapshot)

    def wind_down(self) -> None:
        """Out of band: this incarnation is leaving; each call answers before its next batch."""
        self._leaving = True

    def persist_now(self, commit_floor: int) -> int | None:
        """Out of band (the ``control`` group, beside a call in progress): persist the pending snapshot if
        its outputs are all committed; return its cursor (or None). A failed earlier save is left for the
        next batch to report, as a `persist` from a call would."""
        with self._lock:
            try:
                return self.persist(commit_floor)
            except Exception:  # noqa: BLE001 - the failed save stays in `_saving`: the next batch raises it
                return None

    def persist(self, commit_floor: int) -> int | None:
        """Persist a pending snapshot whose outputs are all committed; return its cursor (or None)."""
        snap = self._snapshot
        if snap is None or snap["cursor"] > commit_floor:
            return None
        if self._saving is not None:
            self._wait_save()  # back-pressure: one save in flight per slot; raises its error
        self._saving = self.store.save_async(self.key, snap, epoch=self.epoch, copy=False)
        self._snapshot = None
        return int(snap["cursor"])

    def finish(self, commit_floor: int) -> dict:
        """End of job: snapshot the final state and persist it; return the final cursor and the outcomes
        of the saves finished since the last answer. Also persists the state before a hand-over (every
        output it made is committed by then). Refused while the state is suspect (`rollback` first)."""
        if self.dirty:
            raise DirtyWorkerError(f"slot {self.slot} epoch {self.epoch}: its state is suspect; not persisted")
        with self._lock:
            if self.spec.stateful:
                self._take_snapshot()
                self.persist(commit_floor)
                if self._saving is not None:
                    self._wait_save()
                    self._saving = None
            return {"cursor": self.cursor, "checkpoints": self._finished_saves()}

    def replica_changes(self) -> tuple:
        """This worker's replica health, when it changed since the last call (for the job's metrics)."""
        now = tuple((h.url, h.degraded, h.failures) for h in self.store.health())
        if now == self._replicas_seen:
            return ()
        self._replicas_seen = now
        return now

    def _wait_save(self) -> None:
        """Wait for the save in flight (raising its error) and note its outcome for the job's metrics."""
        saving = self._saving
        commit = saving.wait()
        if saving is not self._reported:
            self._reported = saving
            self._outcomes.append({"op": "save", "seconds": commit.seconds, "bytes": commit.length,
                                   "generation": commit.generation})

    def _finished_saves(self) -> tuple:
        """Outcomes of the checkpoint saves finished since the last call."""
        if self._saving is not None and self._saving.done():
            self._wait_save()
        out, self._outcomes = tuple(self._outcomes), []
        return out

    def _maybe_checkpoint(self, commit_floor: int) -> None:
        s = self.spec.settings
        due = self._since >= s.checkpoint_every or (
            time.monotonic() - self._last_snapshot_at >= s.checkpoint_interval_seconds
        )
        if due and self._snapshot is None:
            self._take_snapshot()
        self.persist(commit_floor)

    def _take_snapshot(self) -> None:
        if self._saving is not None and not self._saving.done():
            self._wait_save()  # the previous save still reads the buffers we are about to reuse
        self._snapshot = self._buffers.take({"user": self.fn.state_dict(), "cursor": self.cursor})
        self._hot = self._snapshot if 0 < self._hot_limit and self._buffers.nbytes <= self._hot_limit else None
        self._since = 0
        self._last_snapshot_at = time.monotonic()
