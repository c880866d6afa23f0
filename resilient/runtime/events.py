"""What a job tells its watchers: typed, frozen events.

The scheduler emits them (`resilient.runtime.protocol.Emit`); the driver adds what only it sees
(checkpoint saves and replica health reported by the workers). `JobHandle.events()` keeps the failures
and recoveries, `resilient.metrics.JobMetrics` records each as metrics, and the driver logs the failures
as one line each. Every event has a ``kind`` (a short name, also the metric's tag) and `info()`, its
fields as a dict.

Example:
    >>> e = BatchRetried(batch_id=7, attempts=1, error="ValueError: bad row")
    >>> e.kind, e.info()["attempts"]
    ('retry', 1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ActorReplaced",
    "ActorStarted",
    "BatchDeadLettered",
    "BatchRetried",
    "BatchesCommitted",
    "CheckpointDone",
    "JobEvent",
    "ReplicaChanged",
    "SlotRolledBack",
]


class JobEvent:
    """Base of every event a job emits."""

    __slots__ = ()
    kind: ClassVar[str] = "event"

    def info(self) -> dict[str, Any]:
        """The event's fields, as a dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ActorStarted(JobEvent):
    """An incarnation took its slot: its pid, epoch, and where its restored state stands."""

    kind: ClassVar[str] = "started"
    slot: int
    pid: int | None
    epoch: int
    cursor: int
    generation: int | None
    node_id: str | None = None
    hot: bool = False  # restored from a hot snapshot (driver memory), not from storage


@dataclass(frozen=True, slots=True)
class ActorReplaced(JobEvent):
    """A slot's actor died, hung or failed to start and is being replaced; ``cause`` is why it died
    (`resilient.runtime.protocol.Cause` value), ``redelivered`` the batches it had in flight."""

    kind: ClassVar[str] = "restart"
    slot: int
    reason: str
    cause: str
    redelivered: tuple = ()


@dataclass(frozen=True, slots=True)
class SlotRolledBack(JobEvent):
    """A stateful slot reloaded its last checkpoint after `batch_id` raised; it replays from `cursor`."""

    kind: ClassVar[str] = "rollback"
    slot: int
    batch_id: int
    cursor: int


@dataclass(frozen=True, slots=True)
class BatchRetried(JobEvent):
    """A batch failed an attempt (raised, killed its actor, hung) and will run again."""

    kind: ClassVar[str] = "retry"
    batch_id: int
    attempts: int
    error: str


@dataclass(frozen=True, slots=True)
class BatchDeadLettered(JobEvent):
    """A poison batch: recorded as a dead letter after `attempts` failed attempts."""

    kind: ClassVar[str] = "dead_letter"
    batch_id: int
    error: str
    attempts: int


@dataclass(frozen=True, slots=True)
class BatchesCommitted(JobEvent):
    """A group of outputs is durable in the sink."""

    kind: ClassVar[str] = "commit"
    batch_ids: tuple
    outputs: tuple = ()


@dataclass(frozen=True, slots=True)
class CheckpointDone(JobEvent):
    """A slot's checkpoint was saved or loaded (``op``), with its seconds, bytes and generation."""

    kind: ClassVar[str] = "checkpoint"
    slot: int
    op: str
    seconds: float
    bytes: int | None
    generation: int | None


@dataclass(frozen=True, slots=True)
class ReplicaChanged(JobEvent):
    """A storage replica's health changed, as the job's processes see it."""

    kind: ClassVar[str] = "replica"
    url: str
    degraded: bool
    errors: int
