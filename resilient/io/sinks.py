"""Idempotent output: workers stage each batch's output, the driver alone commits it, at most once.

The commit protocol, in order:

1. **Stage** (worker). The output is serialized and written durably and atomically under a fresh,
   never-reused name ``data/<shard>/<batch:012d>-e<epoch>-<8 random hex>.<ext>``: a local file is
   written to a temporary in its directory, fsynced and renamed; an object store upload is visible
   whole or not at all. A staged object is invisible: nothing reads it until a marker names it. The
   worker returns a small `StagedOutput` (name, length, xxh3, epoch, rows) to the driver.
2. **Commit** (driver). A create-only marker ``commit/<shard>/<batch:012d>`` holding the staged
   object's name, length, xxh3, epoch and rows: ``link()`` on local files, ``If-None-Match: *`` on
   S3. The first marker wins; a batch is never committed twice, and a marker is never overwritten.
   The driver fences stale workers (epochs) before it commits, so only the current incarnation's output
   becomes visible.
3. **Read**: only through markers; the object's length and xxh3 are checked against the marker.
4. **Complete**: a create-only ``_SUCCESS`` marker with the job's summary, written after every commit.
5. **Collect**: staged objects no marker names (outputs of retried or fenced attempts) are `orphans`;
   delete them only once the job is complete (an object staged but not yet committed is an orphan too).
   After that, ``data/`` holds exactly the committed outputs, one object per batch.

``<shard>`` is ``batch_id // shard_width`` (10000), zero-padded to 6 digits: resume lists marker shards
from the watermark's upward (`committed_from`), holding one shard's listing at a time. ``_sink.json``,
created with the first commit, records the format and shard width, and a sink opened on the same URL
with other values is refused.

Example:
    >>> import tempfile
    >>> sink = FileSink(tempfile.mkdtemp(), format="jsonl")
    >>> staged = sink.stage(7, {"y": [1, 2]}, epoch=0)      # on a worker
    >>> sink.commit(staged), sink.commit(staged)            # on the driver
    (True, False)
    >>> sink.read(7), list(sink.committed_from(0))
    ({'y': [1, 2]}, [7])
"""

from __future__ import annotations

import json
import numbers
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import xxhash

from resilient.config import redact_url
from resilient.errors import (
    ConfigError,
    CorruptionError,
    FencedError,
    PermanentStorageError,
    ResilientError,
)
from resilient.io._formats import EXTENSIONS, decode_output, encode_output
from resilient.retry import RetryPolicy, classify
from resilient.storage.layout import TMP_PREFIX
from resilient.storage.replica import open_backend

__all__ = ["DEFAULT_RETRY", "SHARD_WIDTH", "FileSink", "NotCommittedError", "StagedOutput"]

T = TypeVar("T")
SHARD_WIDTH = 10_000
DEFAULT_RETRY = RetryPolicy(attempts=4, max_seconds=30.0, backoff_seconds=0.1, backoff_max_seconds=2.0)
DATA, COMMIT, SUCCESS, LAYOUT = "data", "commit", "_SUCCESS", "_sink.json"
_MAX_BATCH = 10**12 - 1
_DATA_NAME = re.compile(r"data/(\d{6,})/(\d{12})-e(\d+)-[0-9a-f]{8}\.(" + "|".join(EXTENSIONS.values()) + ")")
_MARKER = re.compile(r"\d{12}")
_FORMAT_OF = {ext: fmt for fmt, ext in EXTENSIONS.items()}


@dataclass(frozen=True)
class StagedOutput:
    """A staged (durable, invisible) output, returned by a worker to the driver for `FileSink.commit`."""

    batch_id: int
    name: str
    length: int
    xxh3: str
    epoch: int
    rows: int | None


class NotCommittedError(ResilientError, LookupError):
    """No commit marker exists for the batch."""

    def __init__(self, batch_id: int, url: str) -> None:
        self.batch_id = batch_id
        self.url = url
        super().__init__(f"batch {batch_id} is not committed in {url}")


def _check_int(name: str, value: Any, hi: int, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ConfigError(name, value, f"an int from {lo} to {hi}")
    return int(value)


class FileSink:
    """Batch outputs as files under one URL (local path, ``file://``, ``s3://``...), committed at most once.

    Args:
        url: the sink's root.
        format: "jsonl" (a dict of equal-length columns or a list of row dicts; read back as a dict of
            column lists; strict JSON, so NaN and infinities are refused), "parquet" (the same; read back
            as a dict of NumPy arrays, N-D columns kept N-D) or "tensors" (any state
            `resilient.codec.encode` takes; read back decoded). pyarrow Tables and pandas DataFrames are
            taken by jsonl and parquet too.
        storage_options: fsspec options, kept (and pickled) to build the filesystem in each process.
        retry: policy for transient storage failures; `DEFAULT_RETRY` by default.
        shard_width: batches per directory shard; the same for every run over one URL (checked).
        sleep: called with each retry backoff (inject a fake in tests).

    The object pickles without any open filesystem (rebuilt lazily per process); its repr shows the
    URL without credentials and never the storage options.
    """

    def __init__(self, url: str, *, format: str = "jsonl", storage_options: dict[str, Any] | None = None,
                 retry: RetryPolicy | None = None, shard_width: int = SHARD_WIDTH,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if format not in EXTENSIONS:
            raise ConfigError("format", format, ", ".join(f'"{f}"' for f in EXTENSIONS))
        # a local path is made absolute here, on the driver: workers may run in another directory
        self.url = (url.rstrip("/") or url) if "://" in url else os.path.abspath(url)
        self.format = format
        self.storage_options = dict(storage_options or {})
        self.retry = retry or DEFAULT_RETRY
        self.shard_width = _check_int("shard_width", shard_width, _MAX_BATCH, lo=1)
        self._sleep = sleep
        self._display = redact_url(self.url)
        self._backend: Any = None
        self._layout_checked = False  # a layout record, if any, matches ours
        self._layout_recorded = False  # ours is recorded (needed before the first commit)

    def __getstate__(self) -> dict[str, Any]:
        """The sink without open filesystems and without secret values: credentials in ``url`` or
        ``storage_options`` travel as references (`resilient.config.seal_secrets`): the variable
        (``RESILIENT_STORAGE_OPTIONS``) when this process's environment holds the same value, which the
        receiving process reads from its own environment; else a token only this process can resolve."""
        from resilient.config import seal_secrets, sink_resolver

        state = self.__dict__.copy()
        state["_backend"] = None
        state["_layout_checked"] = state["_layout_recorded"] = False
        state["url"], url_refs = seal_secrets(self.url, sink_resolver(self.url, part="url"))
        state["storage_options"], option_refs = seal_secrets(self.storage_options, sink_resolver(self.url))
        state["_sealed"] = (url_refs, option_refs)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from resilient.config import sink_resolver, unseal_secrets

        state = dict(state)
        url_refs, option_refs = state.pop("_sealed", ((), ()))
        self.__dict__.update(state)
        if url_refs:
            self.url = unseal_secrets(self.url, list(url_refs), sink_resolver(self._display, part="url"))
        if option_refs:
            self.storage_options = unseal_secrets(self.storage_options, list(option_refs), sink_resolver(self.url))

    def __repr__(self) -> str:
        return f"FileSink({self._display!r}, format={self.format!r})"

    # -- plumbing ------------------------------------------------------------------------------------

    def _store(self) -> Any:
        if self._backend is None:
            self._backend = open_backend(self.url, dict(self.storage_options), self._display)
        return self._backend

    def _call(self, op: Callable[..., T], *args: Any, path: str) -> T:
        """``op(*args)`` with retries; FileNotFoundError and FileExistsError are answers and pass through,
        every other failure comes out as a StorageError."""
        try:
            return self.retry.retrying(sleep=self._sleep)(op, *args)
        except (FileNotFoundError, FileExistsError, ResilientError):
            raise
        except Exception as e:
            raise classify(e, url=self._display, path=path) from e

    def _shard(self, batch_id: int) -> str:
        return f"{batch_id // self.shard_width:06d}"

    def _marker(self, batch_id: int) -> str:
        return f"{COMMIT}/{self._shard(batch_id)}/{batch_id:012d}"

    def _layout(self, *, create: bool) -> None:
        """Refuse a URL written with another format or shard width; record ours with the first commit."""
        if self._layout_recorded or (self._layout_checked and not create):
            return
        mine = {"format": self.format, "shard_width": self.shard_width, "version": 1}
        if create:
            try:
                self._call(self._store().create_exclusive, LAYOUT, json.dumps(mine).encode(), path=LAYOUT)
                self._layout_checked = self._layout_recorded = True
                return
            except FileExistsError:
                pass
        try:
            theirs = json.loads(self._call(self._store().read, LAYOUT, path=LAYOUT))
        except FileNotFoundError:
            self._layout_checked = True  # nothing committed yet (the first commit records ours)
            return
        for key in ("format", "shard_width"):
            if theirs.get(key) != mine[key]:
                raise ConfigError(key, mine[key], f"{theirs.get(key)!r}, what {self._display} was written with")
        self._layout_checked = self._layout_recorded = True

    def _record(self, batch_id: int) -> dict[str, Any] | None:
        """The commit marker of ``batch_id``, validated; None when there is none."""
        rel = self._marker(batch_id)
        try:
            raw = self._call(self._store().read, rel, path=rel)
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(raw)
            m = _DATA_NAME.fullmatch(rec["name"])
            ok = m is not None and int(m[2]) == batch_id and isinstance(rec["length"], int) and isinstance(
                rec["xxh3"], str)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise CorruptionError(f"{self._display}/{rel}", "not a valid commit marker for this batch")
        return rec

    # -- worker side -----------------------------------------------------------------------------------

    def stage(self, batch_id: int, output: Any, *, epoch: int) -> StagedOutput:
        """Serialize ``output`` and write it durably under a fresh name; nothing reads it until committed.

        Raises:
            CodecError: the output does not fit the format (UnsupportedTypeError for a value's type).
            StorageError: the write failed (after retries, for transient failures).
        """
        batch_id = _check_int("batch_id", batch_id, _MAX_BATCH)
        epoch = _check_int("epoch", epoch, 10**18)
        make, rows = encode_output(self.format, output, f"{self._display} batch {batch_id}")
        name = f"{DATA}/{self._shard(batch_id)}/{batch_id:012d}-e{epoch}-{secrets.token_hex(4)}.{EXTENSIONS[self.format]}"

        def put() -> tuple[int, str]:
            h = xxhash.xxh3_64()

            def chunks() -> Iterator[Any]:
                for c in make():
                    h.update(memoryview(c).cast("B") if isinstance(c, memoryview) else c)
                    yield c

            return self._store().write_object(name, chunks()), h.hexdigest()

        length, digest = self._call(put, path=name)
        return StagedOutput(batch_id, name, length, digest, epoch, rows)

    # -- driver side -----------------------------------------------------------------------------------

    def commit(self, staged: StagedOutput) -> bool:
        """Make ``staged`` the batch's output, unless the batch is committed already.

        Returns:
            True if this call committed it (also when a retried create finds that its own earlier
            attempt landed); False if the batch was already committed (the marker is left as it is).
        """
        m = _DATA_NAME.fullmatch(staged.name) if isinstance(staged.name, str) else None
        if m is None or int(m[2]) != staged.batch_id or m[1] != self._shard(staged.batch_id) or int(
                m[3]) != staged.epoch or m[4] != EXTENSIONS[self.format]:
            raise ConfigError("staged.name", redact_url(str(staged.name)),
                              f"a name staged by this sink for batch {staged.batch_id}, epoch {staged.epoch}")
        self._layout(create=True)
        rel = self._marker(staged.batch_id)
        body = json.dumps(asdict(staged), sort_keys=True).encode()
        attempts = 0

        def create() -> None:
            nonlocal attempts
            attempts += 1
            self._store().create_exclusive(rel, body)

        try:
            self._call(create, path=rel)
            return True
        except FileExistsError:
            if attempts > 1:  # an earlier attempt of this call failed: it may have landed
                rec = self._record(staged.batch_id)
                return rec is not None and rec["name"] == staged.name
            return False

    def is_committed(self, batch_id: int) -> bool:
        batch_id = _check_int("batch_id", batch_id, _MAX_BATCH)
        self._layout(create=False)
        return self._record(batch_id) is not None

    def committed_from(self, start: int) -> Iterator[int]:
        """Committed batch ids >= ``start``, ascending; lists one marker shard at a time, from
        ``start // shard_width`` up (memory: one shard's listing)."""
        start = _check_int("start", start, _MAX_BATCH + 1)
        self._layout(create=False)
        for shard in self._shards(COMMIT, start // self.shard_width):
            rel = f"{COMMIT}/{shard:06d}"
            ids = sorted(int(n) for n in self._call(self._store().listdir, rel, path=rel) if _MARKER.fullmatch(n))
            for b in ids:
                if b // self.shard_width != shard:
                    raise CorruptionError(f"{self._display}/{rel}/{b:012d}", "a marker in the wrong shard")
                if b >= start:
                    yield b

    def _shards(self, top: str, first: int) -> list[int]:
        names = self._call(self._store().listdir, top, path=top)
        return sorted(s for s in (int(n) for n in names if n.isdigit()) if s >= first)

    def read(self, batch_id: int) -> Any:
        """The committed output of ``batch_id``, verified against its marker.

        Raises:
            NotCommittedError: the batch has no commit marker.
            CorruptionError: the object's length or xxh3 differs from the marker's.
            PermanentStorageError: the committed object is missing.
        """
        batch_id = _check_int("batch_id", batch_id, _MAX_BATCH)
        self._layout(create=False)
        rec = self._record(batch_id)
        if rec is None:
            raise NotCommittedError(batch_id, self._display)
        name = rec["name"]
        where = f"{self._display}/{name}"
        try:
            data = self._call(self._store().read, name, path=name)
        except FileNotFoundError:
            raise PermanentStorageError("committed output missing", url=self._display, path=name) from None
        if len(data) != rec["length"]:
            raise CorruptionError(where, f"length {len(data)}, the commit marker says {rec['length']}")
        if xxhash.xxh3_64_hexdigest(data) != rec["xxh3"]:
            raise CorruptionError(where, "xxh3 checksum differs from the commit marker's")
        return decode_output(_FORMAT_OF[name.rsplit(".", 1)[1]], data, where)

    def read_all(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(batch_id, output)`` of every committed batch >= ``start``, in batch-id order."""
        for b in self.committed_from(start):
            yield b, self.read(b)

    def mark_complete(self, summary: dict[str, Any]) -> None:
        """Create the ``_SUCCESS`` marker holding ``summary`` (JSON); repeating it with the same summary is
        fine, with another raises FencedError."""
        try:
            body = json.dumps(summary, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise ConfigError("summary", type(summary).__name__, "a JSON-serializable dict", detail=str(e)) from None
        try:
            self._call(self._store().create_exclusive, SUCCESS, body, path=SUCCESS)
        except FileExistsError:
            if self.is_complete() != json.loads(body):
                raise FencedError("already marked complete with another summary", url=self._display,
                                  path=SUCCESS) from None

    def is_complete(self) -> dict[str, Any] | None:
        """The summary of `mark_complete`, or None if the sink is not complete."""
        try:
            return json.loads(self._call(self._store().read, SUCCESS, path=SUCCESS))
        except FileNotFoundError:
            return None

    # -- garbage collection ----------------------------------------------------------------------------

    def orphans(self) -> list[str]:
        """Staged objects that no commit marker names (and leftover temporaries of interrupted local writes).

        Call it only when no batch is between stage and commit (after the job completed): a staged
        output awaiting its commit is an orphan too. Reads a marker only for a committed batch staged
        more than once.
        """
        out: list[str] = []
        for shard in self._shards(DATA, 0):
            d = f"{DATA}/{shard:06d}"
            staged: dict[int, list[str]] = {}
            for n in self._call(self._store().listdir, d, path=d):
                m = _DATA_NAME.fullmatch(f"{d}/{n}")
                if m is not None:
                    staged.setdefault(int(m[2]), []).append(f"{d}/{n}")
                elif n.startswith(TMP_PREFIX):
                    out.append(f"{d}/{n}")
            c = f"{COMMIT}/{shard:06d}"
            committed = {int(n) for n in self._call(self._store().listdir, c, path=c) if _MARKER.fullmatch(n)}
            for b, names in sorted(staged.items()):
                if b not in committed:
                    out.extend(names)
                elif len(names) > 1:
                    live = self._record(b)
                    out.extend(n for n in names if live is None or n != live["name"])
        return out

    def delete(self, names: list[str]) -> None:
        """Delete staged objects by name (as `orphans` gives them); refuses anything else, and any object
        a commit marker names."""
        for name in names:
            m = _DATA_NAME.fullmatch(name)
            tmp = re.fullmatch(r"data/\d{6,}/" + re.escape(TMP_PREFIX) + r"[^/]+", name)
            if m is None and tmp is None:
                raise ConfigError("names", redact_url(name), "staged object names under data/ (see orphans())")
            if m is not None:
                rec = self._record(int(m[2]))
                if rec is not None and rec["name"] == name:
                    raise ConfigError("names", name, "objects no commit marker names",
                                      detail=f"it is the committed output of batch {int(m[2])}")
        for name in names:
            self._call(self._store().delete, name, path=name)
