"""Pure bookkeeping of a job's batches: what is done, what the watermark is, what may be read next.

Batch ids are the source's positions ``0..total-1``. A batch is *done* once its output is committed or it
is recorded as a dead letter. The *watermark* is the smallest id not yet done: everything below it is
done. Ids at or above the watermark that are already done sit in `done_above`, which stays small because
reading stops `window` ids past the watermark (back-pressure behind a slow or failing batch). That is
what makes resume offset-based: a restarted driver needs the watermark and the few done ids above it,
never the set of everything done.

`redo` holds the few ids below the watermark that must be done again (dead letters a user asked to retry):
they are not done until committed, and the job is not finished while any is left.

No I/O and no clock here: the supervisor feeds events in and acts on the answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Ledger", "SlotCursor", "slot_of"]


def slot_of(batch_id: int, slots: int) -> int:
    """The slot a stateful pipeline routes a batch to: the same batch always goes to the same slot.

    >>> [slot_of(b, 3) for b in range(7)]
    [0, 1, 2, 0, 1, 2, 0]
    """
    return batch_id % slots


@dataclass
class Ledger:
    """Which batches are done, and how far ahead of the watermark reading may go."""

    total: int
    window: int
    watermark: int = 0
    done_above: set[int] = field(default_factory=set)
    attempts: dict[int, int] = field(default_factory=dict)
    redo: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window={self.window!r} is not accepted: expected an int >= 1")
        self._advance()

    @property
    def finished(self) -> bool:
        return self.watermark >= self.total and not self.redo

    def is_done(self, batch_id: int) -> bool:
        return (batch_id < self.watermark and batch_id not in self.redo) or batch_id in self.done_above

    def may_read(self, batch_id: int) -> bool:
        """Back-pressure: read `batch_id` only while it is within `window` of the watermark."""
        return batch_id < self.total and batch_id < self.watermark + self.window

    def mark_done(self, batch_id: int) -> bool:
        """Record a batch as done; False if it already was (a duplicate answer, ignored)."""
        if not 0 <= batch_id < self.total:
            raise ValueError(f"batch id {batch_id} is outside 0..{self.total - 1}")
        if self.is_done(batch_id):
            return False
        if batch_id in self.redo:
            self.redo.discard(batch_id)
            self.attempts.pop(batch_id, None)
            return True
        self.done_above.add(batch_id)
        self.attempts.pop(batch_id, None)
        self._advance()
        return True

    def failed_attempt(self, batch_id: int) -> int:
        """Count one failed attempt of a batch; return how many it has had."""
        n = self.attempts.get(batch_id, 0) + 1
        self.attempts[batch_id] = n
        return n

    def _advance(self) -> None:
        while self.watermark in self.done_above:
            self.done_above.discard(self.watermark)
            self.watermark += 1

    def snapshot(self) -> dict:
        """What to persist so a restarted driver resumes here."""
        return {"watermark": self.watermark, "done_above": sorted(self.done_above), "total": self.total,
                "redo": sorted(self.redo)}


@dataclass
class SlotCursor:
    """Where a stateful slot's restored state stands: every batch of the slot below `cursor` is applied.

    Replaying from `cursor` rebuilds the state; batches already committed are applied again without
    committing their output a second time.
    """

    slot: int
    slots: int
    cursor: int = 0

    def owns(self, batch_id: int) -> bool:
        return slot_of(batch_id, self.slots) == self.slot

    def needs(self, batch_id: int) -> bool:
        """True if the slot's state does not include `batch_id` yet."""
        return self.owns(batch_id) and batch_id >= self.cursor
