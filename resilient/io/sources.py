"""Replayable inputs: batches with ids ``0..n-1`` that can be read again from any id.

Resume is offset-based: a restarted job knows that every batch id below a watermark is committed and
calls ``source.read(watermark)``. So a source must give the same batches under the same ids in every
run and every process, and says so with a `fingerprint` that a resumed run compares to the one its
first run recorded (`check_fingerprint` raises `SourceChangedError` naming what differs).

================================  ================================================================
`as_source` given                  becomes
================================  ================================================================
a `Source`                         itself
``range(a, b, step)``              `RangeSource`: row ids in batches of ``batch_size`` (default 1024)
a list, tuple, other Sequence,     `SequenceSource`: each element is one batch
a NumPy array
a zero-argument callable           `IterableSource`: called again for each replay
a re-iterable (``iter(x)`` is      `IterableSource` over ``x``
not ``x``)
a ``ray.data.Dataset``             `RayDatasetSource` with ``batch_size`` (default 1024)
a generator or other iterator,     refused: it cannot be replayed
a str, bytes, a mapping
================================  ================================================================

Files are read by `FileSource` (jsonl, parquet, npy; local or any fsspec URL).

Example:
    >>> src = as_source(range(10), batch_size=4)
    >>> [(i, b["id"].tolist()) for i, b in src.read(1)]
    [(1, [4, 5, 6, 7]), (2, [8, 9])]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from resilient.errors import ConfigError
from resilient.io._base import Source, SourceChangedError, check_fingerprint, check_start, digest
from resilient.io._files import FileSource
from resilient.io._raydata import RayDatasetSource, is_ray_dataset

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FileSource",
    "IterableSource",
    "RangeSource",
    "RayDatasetSource",
    "SequenceSource",
    "Source",
    "SourceChangedError",
    "as_source",
    "check_fingerprint",
]

DEFAULT_BATCH_SIZE = 1024
_ACCEPTED = "a sequence, a range, a re-iterable, or a zero-argument callable returning an iterable"


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(name, value, "an int >= 1")
    return int(value)


class SequenceSource:
    """Each element of a sequence is one batch; its id is its position.

    The fingerprint hashes the length and the first, middle and last elements (arrays and tensors by
    their bytes), so it is cheap but does not notice a change to other elements.

    Example:
        >>> list(SequenceSource(["a", "b", "c"]).read(1))
        [(1, 'b'), (2, 'c')]
    """

    def __init__(self, seq: Sequence[Any]) -> None:
        self.seq = seq

    def __len__(self) -> int:
        return len(self.seq)

    def read(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        n = len(self.seq)
        for i in range(check_start(start, n), n):
            yield i, self.seq[i]

    def fingerprint(self) -> dict:
        n = len(self.seq)
        sample = sorted({0, n // 2, n - 1}) if n else []
        return {"kind": "sequence", "length": n, "sample": digest(*(self.seq[i] for i in sample))}

    def __repr__(self) -> str:
        return f"SequenceSource({type(self.seq).__name__} of {len(self.seq)})"


class RangeSource:
    """Row ids ``start, start + step, ...`` (``n_rows`` of them) in batches of ``batch_size``.

    Batch ``i`` is ``{"id": <int64 array of the ids of rows i*batch_size .. (i+1)*batch_size - 1>}``;
    the last batch may be shorter.

    Example:
        >>> [b["id"].tolist() for _, b in RangeSource(5, 2, start=10).read()]
        [[10, 11], [12, 13], [14]]
    """

    def __init__(self, n_rows: int, batch_size: int, start: int = 0, *, step: int = 1) -> None:
        if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < 0:
            raise ConfigError("n_rows", n_rows, "an int >= 0")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step == 0:
            raise ConfigError("step", step, "a non-zero int")
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
            raise ConfigError("start", start, "an int")
        self.n_rows = int(n_rows)
        self.batch_size = _positive("batch_size", batch_size)
        self.start = int(start)
        self.step = int(step)

    def __len__(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def read(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        for i in range(check_start(start, len(self)), len(self)):
            lo = i * self.batch_size
            hi = min(lo + self.batch_size, self.n_rows)
            first = self.start + lo * self.step
            yield i, {"id": np.arange(first, first + (hi - lo) * self.step, self.step, dtype=np.int64)}

    def fingerprint(self) -> dict:
        return {"kind": "range", "rows": self.n_rows, "batch_size": self.batch_size, "start": self.start,
                "step": self.step, "length": len(self)}

    def __repr__(self) -> str:
        return f"RangeSource({self.n_rows}, {self.batch_size}, start={self.start}, step={self.step})"


class IterableSource:
    """Batches from ``factory()``, a fresh iterable on every call; replay re-iterates and skips.

    ``read(start)`` calls the factory and discards the first ``start`` items, so resuming costs the
    iteration of everything before ``start``. Unless ``length`` is given, ``len()`` iterates once over
    the whole input to count it (the count is kept, and travels with the object when it is pickled).
    The iterable must yield the same items in the same order on every call: the fingerprint holds only
    the length and a digest of the first item. A pass that yields a different number of items than the
    length raises `SourceChangedError`.

    The factory must pickle to be shipped to other processes (Ray pickles functions and lambdas by value).

    Example:
        >>> src = IterableSource(lambda: (x * x for x in range(4)))
        >>> len(src), list(src.read(2))
        (4, [(2, 4), (3, 9)])
    """

    def __init__(self, factory: Callable[[], Iterable[Any]], *, length: int | None = None) -> None:
        if not callable(factory):
            raise ConfigError("factory", factory, "a zero-argument callable returning an iterable")
        if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer))
                                   or length < 0):
            raise ConfigError("length", length, "None (count by iterating once) or an int >= 0")
        self.factory = factory
        self._length = None if length is None else int(length)

    def _iterate(self) -> Iterator[Any]:
        return iter(self.factory())

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(1 for _ in self._iterate())
        return self._length

    def read(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        start = check_start(start, self._length)
        n = self._length
        count = 0
        for i, item in enumerate(self._iterate()):
            count = i + 1
            if n is not None and i >= n:
                raise SourceChangedError([f"length {n} -> more than {n} (the iterable yielded more items)"])
            if i >= start:
                yield i, item
        if n is None:
            self._length = count
        elif count < n:
            raise SourceChangedError([f"length {n} -> {count} (the iterable ended early)"])

    def fingerprint(self) -> dict:
        first = next(iter(self._iterate()), None)
        return {"kind": "iterable", "length": len(self), "first": digest(first)}

    def __repr__(self) -> str:
        name = getattr(self.factory, "__qualname__", None) or repr(self.factory)
        return f"IterableSource({name}, length={self._length})"


class _Reiterate:
    """A picklable factory returning ``iter(obj)`` (a lambda would not pickle with plain pickle)."""

    def __init__(self, obj: Iterable[Any]) -> None:
        self.obj = obj

    def __call__(self) -> Iterator[Any]:
        return iter(self.obj)

    def __repr__(self) -> str:
        return f"iter(<{type(self.obj).__name__}>)"


def as_source(obj: Any, *, batch_size: int | None = None) -> Source:
    """Adapt user input to a `Source` (the table in this module's docstring says how).

    Args:
        obj: the input.
        batch_size: rows per batch, for a ``range`` or a Ray dataset (default 1024). Other inputs are
            already batches, so giving it for them is refused.

    Raises:
        ConfigError: an input that cannot be replayed (a generator, an iterator), a str, bytes or a
            mapping, or ``batch_size`` given for an input that is already batches.

    Example:
        >>> len(as_source([{"x": 1}, {"x": 2}]))
        2
        >>> as_source(x for x in range(3))
        Traceback (most recent call last):
        ...
        resilient.errors.ConfigError: source=<generator> is not accepted: ...
    """
    if batch_size is not None:
        _positive("batch_size", batch_size)
    if isinstance(obj, range):
        return RangeSource(len(obj), batch_size or DEFAULT_BATCH_SIZE, start=obj.start, step=obj.step)
    if is_ray_dataset(obj):
        return RayDatasetSource(obj, batch_size or DEFAULT_BATCH_SIZE)
    if isinstance(obj, Source) and not isinstance(obj, type):
        _no_batch_size(batch_size, obj)
        return obj
    if isinstance(obj, (str, bytes, bytearray, memoryview)) or isinstance(obj, Mapping):
        raise ConfigError("source", _short(obj), _ACCEPTED,
                          detail=f"a {type(obj).__name__} is not a collection of batches")
    if type(obj).__module__.startswith("pandas"):
        raise ConfigError("source", _short(obj), _ACCEPTED,
                          detail="for a DataFrame pass a list of DataFrames, or a Ray dataset (ray.data.from_pandas)")
    if isinstance(obj, (Sequence, np.ndarray)):
        _no_batch_size(batch_size, obj)
        return SequenceSource(obj)
    if callable(obj):
        _no_batch_size(batch_size, obj)
        return IterableSource(obj)
    try:
        it = iter(obj)
    except TypeError:
        raise ConfigError("source", _short(obj), _ACCEPTED) from None
    if it is obj:
        raise ConfigError("source", _short(obj), _ACCEPTED,
                          detail="a generator or iterator can be read only once, so it cannot be replayed after a "
                          "failure; pass the function that creates it instead, e.g. lambda: gen()")
    _no_batch_size(batch_size, obj)
    return IterableSource(_Reiterate(obj))


def _no_batch_size(batch_size: int | None, obj: Any) -> None:
    if batch_size is not None:
        raise ConfigError("batch_size", batch_size, "None for this input",
                          detail=f"a {type(obj).__name__} already yields batches; batch_size applies to a range "
                          "or a Ray dataset")


class _Shown:
    """A value as errors show it: its type, never its (possibly huge) contents."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _short(obj: Any) -> _Shown:
    return _Shown(f"<{type(obj).__name__}>")
