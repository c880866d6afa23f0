"""What flows between the scheduler and the world: inputs, commands, and the workers' answers.

The scheduler (`resilient.runtime.scheduler`) is a pure state machine. A driver feeds it *inputs* (what
happened: an actor started or died, a call answered, a commit landed, time passed) and carries out the
*commands* it returns (start an actor, send a call, kill, roll back, commit a group, save progress). The
Ray driver (`resilient.runtime.supervisor`) turns Ray refs and futures into inputs and commands into Ray
calls and storage writes; the simulation (`resilient.testing.simulation`) does the same against
simulated actors, disks and a virtual clock. Nothing here imports Ray or does I/O.

Identities
----------
* A *slot* is a position of the job's worker pool (``0..slots-1``); a stateful pipeline routes batch
  ``b`` to slot ``b % slots``.
* An *incarnation* (``inc``) is one actor serving one slot, numbered by the scheduler, unique within a
  driver run. Every command and input about an actor names its slot and incarnation; an input from an
  incarnation that is no longer the slot's is stale and ignored (fencing within a run).
* An *epoch* is the storage-side fence (`CheckpointStore.claim_epoch`), claimed by the driver before the
  actor is activated and reported in `ActorUp`; every worker answer carries it, and an answer whose
  epoch is not its incarnation's is a zombie's and is dropped (fencing across runs).
* A *call* is one actor call carrying one batch or several; the scheduler numbers calls.
* A *spare* is a standby actor built ahead (model loaded) and numbered by the scheduler.
* A *hot snapshot* (stateful) is a copy of a slot's state that a call ships back beside its answers
  (`CallAnswered.hot`): ``(cursor, token)``, the token opaque here (a Ray object ref owned by the driver).
  Every batch of the slot below its cursor answered in that call or an earlier one, so a replacement may
  start from it (`StartActor.hot`) instead of the slot's last persisted checkpoint; one whose token is
  lost (its node died) falls back to that checkpoint. See `resilient.runtime.hot`.

Why an actor died (`Cause`)
---------------------------
``USER``: the pipeline's constructor or restore raised (the user's error, with its traceback).
``PROCESS``: the worker process died (killed, crashed, exited); a batch in flight may have caused it.
``NODE``, ``PREEMPTED``, ``OOM``: Ray reports the node lost, the node preempted, or the process killed
by the memory monitor: never a batch's fault. ``TIMEOUT``: the scheduler gave up on an actor start.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ActorDown",
    "ActorUp",
    "Answer",
    "CallAnswered",
    "Cause",
    "Command",
    "CommitDone",
    "CommitFailed",
    "CommitGroup",
    "CompleteJob",
    "Emit",
    "Failure",
    "FailJob",
    "FinishActor",
    "FinishDone",
    "Input",
    "KillActor",
    "KillSpare",
    "NodeDraining",
    "PersistState",
    "ProgressDone",
    "ProgressFailed",
    "Result",
    "RollbackActor",
    "RollbackDone",
    "SaveProgress",
    "SendCall",
    "SpareUp",
    "StartActor",
    "StartSpare",
    "StopJob",
    "StopRequested",
    "WindDown",
]


class Cause(enum.Enum):
    """Why an actor died, as far as Ray can tell (see the module docstring)."""

    USER = "user"
    PROCESS = "process"
    NODE = "node"
    PREEMPTED = "preempted"
    OOM = "oom"
    TIMEOUT = "timeout"

    @property
    def external(self) -> bool:
        """Ray said it was not the process's own doing: never charged to a batch."""
        return self in (Cause.NODE, Cause.PREEMPTED, Cause.OOM)


# ---------------------------------------------------------------------------------- workers' answers


@dataclass(frozen=True, slots=True)
class Result:
    """A worker's answer for one batch that ran."""

    batch_id: int
    slot: int
    epoch: int
    output: Any  # the sink's encoded output, or None for a replayed batch
    seconds: float
    cursor: int
    checkpoints: tuple = ()  # {"op", "seconds", "bytes", "generation"} of checkpoint saves finished since
    replicas: tuple = ()  # (url, degraded, failures so far) of this worker's replicas, when they changed
    snapshot: int | None = None  # stateful: the cursor of a snapshot taken and waiting for its outputs' commit


@dataclass(frozen=True, slots=True)
class Failure:
    """A worker's answer for a batch that raised: the error ("Type: message") and its traceback."""

    batch_id: int
    slot: int
    epoch: int
    error: str
    traceback: str


Answer = Result | Failure


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ActorUp:
    """Incarnation `inc` of `slot` is activated: its state restored up to `cursor` (stateful), from checkpoint
    `generation` or from the hot snapshot it was given (`hot`)."""

    slot: int
    inc: int
    epoch: int
    pid: int | None = None
    node: str | None = None
    cursor: int = 0
    generation: int | None = None
    hot: bool = False  # restored from the hot snapshot it was given (`StartActor.hot`), not from storage


@dataclass(frozen=True, slots=True)
class ActorDown:
    """Incarnation `inc` of `slot` is gone (or its restore raised, `Cause.USER`)."""

    slot: int
    inc: int
    cause: Cause
    error: str = ""
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class CallAnswered:
    """Call `call` came back with one answer per batch it ran (a stateful worker stops at a failure)."""

    call: int
    answers: tuple
    hot: tuple[int, Any] | None = None  # stateful: (cursor, token) of the newest snapshot the call took


@dataclass(frozen=True, slots=True)
class RollbackDone:
    """Incarnation `inc` of `slot` reloaded its last persisted checkpoint, which stands at `cursor`."""

    slot: int
    inc: int
    cursor: int


@dataclass(frozen=True, slots=True)
class FinishDone:
    """Incarnation `inc` of `slot` persisted its final state."""

    slot: int
    inc: int


@dataclass(frozen=True, slots=True)
class CommitDone:
    """Group `group` is durable in the sink."""

    group: int


@dataclass(frozen=True, slots=True)
class CommitFailed:
    """Group `group` could not be committed; `retryable` when the storage error is transient."""

    group: int
    error: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class ProgressDone:
    """The progress save `seq` is durable."""

    seq: int


@dataclass(frozen=True, slots=True)
class ProgressFailed:
    """The progress save `seq` failed; `retryable` when the storage error is transient."""

    seq: int
    error: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class NodeDraining:
    """Node `node` is draining (preemption notice): it goes at `deadline` (the scheduler's clock)."""

    node: str
    deadline: float


@dataclass(frozen=True, slots=True)
class SpareUp:
    """Standby `spare` is built (its model loaded) on node `node`."""

    spare: int
    node: str | None


@dataclass(frozen=True, slots=True)
class StopRequested:
    """Stop the job gracefully (SIGTERM, Ctrl-C, ``ray job stop``): dispatch nothing more, commit what has
    answered, persist the slots' state and the progress, and stop by `deadline` (the scheduler's clock)
    whatever is left; `reason` says why, for the log and the error."""

    deadline: float
    reason: str


Input = (ActorUp | ActorDown | CallAnswered | RollbackDone | FinishDone | CommitDone | CommitFailed
         | ProgressDone | ProgressFailed | NodeDraining | SpareUp | StopRequested)


# ---------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class StartSpare:
    """Build standby actor `spare` (construct the pipeline, load the model); it serves no slot yet."""

    spare: int


@dataclass(frozen=True, slots=True)
class StartActor:
    """Give `slot` incarnation `inc`: standby `spare` if given (else a new actor), claim a new epoch for
    the slot, activate it (restore); answer `ActorUp` or `ActorDown`."""

    slot: int
    inc: int
    spare: int | None
    hot: Any = None  # stateful: the token of the slot's newest hot snapshot, restored instead if it loads


@dataclass(frozen=True, slots=True)
class SendCall:
    """Send call `call` to incarnation `inc` of `slot`: ``items`` are ``(batch_id, replay)``; a replayed
    batch rebuilds state and its output is not encoded. ``floor``: the slot's smallest batch id whose
    output is not committed yet (a checkpoint may be persisted only below it)."""

    slot: int
    inc: int
    call: int
    items: tuple
    floor: int


@dataclass(frozen=True, slots=True)
class KillActor:
    """Kill incarnation `inc` of `slot` (it may be dead already): every call of it is dropped."""

    slot: int
    inc: int


@dataclass(frozen=True, slots=True)
class KillSpare:
    """Kill standby `spare` (its node is draining): it will never serve."""

    spare: int


@dataclass(frozen=True, slots=True)
class RollbackActor:
    """Incarnation `inc` of `slot` reloads its last persisted checkpoint; answer `RollbackDone`."""

    slot: int
    inc: int


@dataclass(frozen=True, slots=True)
class FinishActor:
    """Incarnation `inc` of `slot` persists its state now (every output it made is committed: the
    checkpoint is exact); answer `FinishDone`. Sent at the end of the job, before a hand-over off a
    draining node, and when the job stops."""

    slot: int
    inc: int


@dataclass(frozen=True, slots=True)
class WindDown:
    """Incarnation `inc` of `slot` is leaving (its node drains, the job stops): it finishes the batch it is
    running and answers its calls in flight without running their other batches, which the next incarnation
    (or the next run) takes. Out of band, like `PersistState`; nothing answers it."""

    slot: int
    inc: int


@dataclass(frozen=True, slots=True)
class PersistState:
    """Incarnation `inc` of `slot` persists its pending snapshot now if the snapshot's cursor is at or below
    `floor`: the cursor of the snapshot it reported, whose outputs were just committed. Out of band: it
    does not wait behind the calls in flight, and nothing answers it (a failed save surfaces with the
    slot's next batch)."""

    slot: int
    inc: int
    floor: int


@dataclass(frozen=True, slots=True)
class CommitGroup:
    """Commit these outputs in the sink as group `group` (idempotent: create-only markers); answer
    `CommitDone` or `CommitFailed`."""

    group: int
    batch_ids: tuple
    outputs: tuple


@dataclass(frozen=True, slots=True)
class SaveProgress:
    """Persist the job's progress (`resilient.runtime.records`) as save `seq`; answer `ProgressDone` or
    `ProgressFailed`. ``final``: the last save of the run (the driver may write it inline)."""

    seq: int
    fields: dict
    final: bool = False


@dataclass(frozen=True, slots=True)
class Emit:
    """Tell the job's watchers (`resilient.runtime.events`): metrics, the log, the handle."""

    event: Any


@dataclass(frozen=True, slots=True)
class FailJob:
    """The job cannot go on: stop it with this error (and the user's traceback, when there is one)."""

    error: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class CompleteJob:
    """Every batch is done and every slot's final state persisted: mark the job complete."""


@dataclass(frozen=True, slots=True)
class StopJob:
    """The job stopped as asked (`StopRequested`): its progress is saved; a re-run resumes it."""

    reason: str
    committed: int
    total: int


Command = (StartSpare | StartActor | SendCall | KillActor | KillSpare | RollbackActor | FinishActor
           | WindDown | PersistState | CommitGroup | SaveProgress | Emit | FailJob | CompleteJob | StopJob)
