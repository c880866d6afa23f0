"""Batches by id, for the driver: read in order once, kept until done, read again by offset when needed.

The scheduler deals in batch ids only; the driver fetches a call's batches here when it sends the call.
Reading goes forward through one iterator of the source (``source.read(start)``), keeping what it
passes, since those are the batches sent next. A batch asked for again after it was dropped (a retry,
a redelivery, a stateful replay below the read position) is read again from the source by offset:
sources are replayable. Memory stays bounded by what the scheduler has read ahead and not done.

Example:
    >>> from resilient.io.sources import as_source
    >>> r = BatchReader(as_source(["a", "b", "c", "d"]))
    >>> r.get([1, 2]), r.get([0]), len(r)
    (['b', 'c'], ['a'], 3)
    >>> r.drop([0, 1, 2]); len(r)
    0
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from resilient.errors import ResilientError

__all__ = ["BatchReader", "SourceError"]

AHEAD = 4096  # a missing batch this far past the forward reader is read by moving it forward


class SourceError(ResilientError):
    """The source did not give the batch asked for (a source that changed or is broken)."""


class BatchReader:
    """Batches of a replayable source by id."""

    def __init__(self, source: Any, start: int = 0) -> None:
        self.source = source
        self._cache: dict[int, Any] = {}
        self._it: Iterator[tuple[int, Any]] | None = None
        self._pos = start  # the id the forward iterator yields next

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, ids: Iterable[int]) -> list[Any]:
        """The batches with these ids, in order."""
        ids = list(ids)
        cache = self._cache
        missing = [b for b in ids if b not in cache]
        if missing:
            self._load(missing)
        return [cache[b] for b in ids]

    def drop(self, ids: Iterable[int]) -> None:
        """Forget batches that are done (or sent for the last time)."""
        for b in ids:
            self._cache.pop(b, None)

    def drop_below(self, watermark: int) -> None:
        """Forget every batch below `watermark` (done, or skipped by the scheduler)."""
        for b in [b for b in self._cache if b < watermark]:
            del self._cache[b]

    def _load(self, missing: list[int]) -> None:
        lo, hi = min(missing), max(missing)
        if self._pos <= lo <= self._pos + AHEAD:
            self._forward(hi)
        else:
            want = set(missing)
            for b, batch in self.source.read(lo):
                if b in want:
                    self._cache[b] = batch
                if b >= hi:
                    break
        absent = [b for b in missing if b not in self._cache]
        if absent:
            raise SourceError(f"the source has no batch {absent[0]} (it has {len(self.source)})")

    def _forward(self, hi: int) -> None:
        if self._it is None:
            self._it = iter(self.source.read(self._pos))
        while self._pos <= hi:
            try:
                b, batch = next(self._it)
            except StopIteration:
                return
            if b != self._pos:
                raise SourceError(f"the source yielded batch {b} where {self._pos} was expected")
            self._cache.setdefault(b, batch)
            self._pos += 1
