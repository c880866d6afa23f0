"""Idempotent output: each batch's output becomes visible once committed, and at most once.

Two ways to commit, one layout (``<shard>`` is ``batch_id // shard_width``, zero-padded to 6 digits):

**Grouped (the runtime's path).** Workers encode outputs (`encode`) and send the bytes to the driver, which
commits them in groups (`commit_group`), in this order:

1. **Part**: the group's encoded outputs concatenated into one object
   ``data/<shard>/<first:012d>-g<count>-<8 hex>.<ext>`` (temporary + fsync + rename + directory fsync
   locally; one upload on object stores). Each slice is a complete object of the format (a jsonl part is
   itself valid jsonl; a parquet part is a sequence of complete Parquet files).
2. **Index**: ``data/<shard>/<first:012d>-<8 hex>.json``, next to the part, naming it and, per batch,
   its offset, length, xxh3, epoch and rows; written with the part (both fsynced, renamed, then one
   fsync of their directory).
3. **Markers**: per batch, a create-only pointer ``commit/<shard>/<batch:012d>`` whose content is the
   index's id (``<first:012d>-<8 hex>``). Locally, one small file holding the id is written and
   fsynced, each marker is a hard link to it (``link()`` is create-only and atomic; a name costs a
   directory entry, no inode), its temporary name is removed, and the commit directories are fsynced
   once per group (symbolic links holding the id where ``link()`` is refused, e.g. past the file's
   link limit; sinks written with symbolic-link markers are read the same way). On S3, an
   ``If-None-Match: *`` upload per marker (a group's uploads are sent concurrently, `MARKER_WRITERS` at
   a time). The first marker wins: a
   batch is never committed twice and a marker is never overwritten. A batch is committed once its
   marker is durable; the driver reports it done only then. A crash before a marker leaves the part
   and index unreferenced: invisible, collected as orphans (with the markers' temporary, locally).

So a group of any size costs two fsynced files (three locally, with the markers' file) and one fsync per
directory it touches, instead of two fsynced objects per batch.

**Per batch.** A worker may also stage one output durably itself (`stage`, under a fresh, never-reused name
``data/<shard>/<batch:012d>-e<epoch>-<8 hex>.<ext>``) and the driver commit it (`commit`) with a
create-only marker file holding the staged object's name, length, xxh3, epoch and rows.

**Read**: only through markers; each output's length and xxh3 are checked against its record before it is
decoded. **Complete**: a create-only ``_SUCCESS`` marker with the job's summary, written after every
commit. **Collect**: staged objects, parts and indexes no marker refers to (outputs of retried or fenced
attempts, groups interrupted before their markers) are `orphans`; delete them only once the job is
complete. ``_sink.json``, created with the first commit, records the format and shard width, and a sink
opened on the same URL with other values is refused. Resume lists marker shards from the watermark's
upward (`committed_from`), holding one shard's listing at a time.

Example:
    >>> import tempfile
    >>> sink = FileSink(tempfile.mkdtemp(), format="jsonl")
    >>> encoded = [sink.encode(b, {"y": [b]}, epoch=0) for b in (7, 8)]   # on workers
    >>> sink.commit_group(encoded), sink.commit_group(encoded[:1])         # on the driver
    ([True, True], [False])
    >>> sink.read(8), list(sink.committed_from(0))
    ({'y': [8]}, [7, 8])
"""

from __future__ import annotations

import json
import numbers
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from resilient.storage.backend import Backend
from resilient.storage.layout import TMP_PREFIX
from resilient.storage.replica import open_backend

__all__ = ["DEFAULT_RETRY", "SHARD_WIDTH", "EncodedOutput", "FileSink", "NotCommittedError", "StagedOutput"]

T = TypeVar("T")
SHARD_WIDTH = 10_000
DEFAULT_RETRY = RetryPolicy(attempts=4, max_seconds=30.0, backoff_seconds=0.1, backoff_max_seconds=2.0)
DATA, COMMIT, SUCCESS, LAYOUT = "data", "commit", "_SUCCESS", "_sink.json"
_MAX_BATCH = 10**12 - 1
_EXT = "(" + "|".join(EXTENSIONS.values()) + ")"
_DATA_NAME = re.compile(r"data/(\d{6,})/(\d{12})-e(\d+)-[0-9a-f]{8}\." + _EXT)
_PART_NAME = re.compile(r"data/(\d{6,})/(\d{12})-g(\d+)-([0-9a-f]{8})\." + _EXT)
_GROUP_ID = re.compile(r"(\d{12})-([0-9a-f]{8})")
_INDEX_NAME = re.compile(r"data/(\d{6,})/(\d{12}-[0-9a-f]{8})\.json")
_CACHED_INDEXES = 16
_MARKER = re.compile(r"\d{12}")
MARKER_WRITERS = 16  # a group's marker uploads in flight at once, on object stores
_marker_pool: ThreadPoolExecutor | None = None
_marker_pool_lock = threading.Lock()
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


@dataclass(frozen=True)
class EncodedOutput:
    """One batch's output encoded by a worker (`FileSink.encode`), sent to the driver for `commit_group`."""

    batch_id: int
    epoch: int
    data: bytes
    xxh3: str
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


def _markers() -> ThreadPoolExecutor:
    """The process's pool for marker uploads to object stores (`MARKER_WRITERS` threads, made on first use)."""
    global _marker_pool
    with _marker_pool_lock:
        if _marker_pool is None:
            _marker_pool = ThreadPoolExecutor(MARKER_WRITERS, thread_name_prefix="resilient-markers")
        return _marker_pool


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
        self._backend: Backend | None = None
        self._layout_checked = False  # a layout record, if any, matches ours
        self._layout_recorded = False  # ours is recorded (needed before the first commit)
        self._indexes: dict[str, dict[str, Any]] = {}  # group id -> index, the last few read

    def __getstate__(self) -> dict[str, Any]:
        """The sink without open filesystems and without secret values: credentials in ``url`` or
        ``storage_options`` travel as references (`resilient.config.seal_secrets`): the variable
        (``RESILIENT_STORAGE_OPTIONS``) when this process's environment holds the same value, which the
        receiving process reads from its own environment; else a token only this process can resolve."""
        from resilient.config import seal_secrets, sink_resolver

        state = self.__dict__.copy()
        state["_backend"] = None
        state["_layout_checked"] = state["_layout_recorded"] = False
        state["_indexes"] = {}
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

    def _store(self) -> Backend:
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
        """The commit record of ``batch_id`` (name, offset, length, xxh3, epoch, rows), validated; None when
        the batch has no marker."""
        rel = self._marker(batch_id)
        try:
            pointer = self._call(self._store().read_pointer, rel, path=rel)
        except FileNotFoundError:
            return None
        if _GROUP_ID.fullmatch(pointer):
            rec = self._group_index(pointer).get(str(batch_id))
            if rec is None:
                raise CorruptionError(f"{self._display}/{rel}", f"group {pointer} does not hold this batch")
            return rec
        try:
            rec = json.loads(pointer)
            m = _DATA_NAME.fullmatch(rec["name"])
            ok = m is not None and int(m[2]) == batch_id and isinstance(rec["length"], int) and isinstance(
                rec["xxh3"], str)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise CorruptionError(f"{self._display}/{rel}", "not a valid commit marker for this batch")
        return {**rec, "offset": None}

    def _index_path(self, gid: str) -> str:
        return f"{DATA}/{self._shard(int(gid[:12]))}/{gid}.json"

    def _group_index(self, gid: str) -> dict[str, dict[str, Any]]:
        """A group's records by batch id (as str), validated; the last few are cached."""
        cached = self._indexes.get(gid)
        if cached is not None:
            return cached
        rel = self._index_path(gid)
        try:
            raw = self._call(self._store().read, rel, path=rel)
        except FileNotFoundError:
            raise CorruptionError(f"{self._display}/{rel}", "a commit marker names this group index, "
                                  "which is missing") from None
        try:
            index = json.loads(raw)
            part = index["part"]
            m = _PART_NAME.fullmatch(part)
            ok = m is not None and f"{m[2]}-{m[4]}" == gid
            recs = {}
            for r in index["batches"]:
                ok = ok and all(isinstance(r[k], int) for k in ("batch_id", "offset", "length", "epoch"))
                recs[str(r["batch_id"])] = {**r, "name": part}
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise CorruptionError(f"{self._display}/{rel}", "not a valid group index")
        if len(self._indexes) >= _CACHED_INDEXES:
            self._indexes.pop(next(iter(self._indexes)))
        self._indexes[gid] = recs
        return recs

    # -- worker side -----------------------------------------------------------------------------------

    def encode(self, batch_id: int, output: Any, *, epoch: int) -> EncodedOutput:
        """Serialize ``output`` for `commit_group` (nothing is written).

        Raises:
            CodecError: the output does not fit the format (UnsupportedTypeError for a value's type).
        """
        batch_id = _check_int("batch_id", batch_id, _MAX_BATCH)
        epoch = _check_int("epoch", epoch, 10**18)
        make, rows = encode_output(self.format, output, f"{self._display} batch {batch_id}")
        chunks = list(make())
        data = chunks[0] if len(chunks) == 1 and isinstance(chunks[0], bytes) else b"".join(chunks)
        return EncodedOutput(batch_id, epoch, data, xxhash.xxh3_64_hexdigest(data), rows)

    def decode(self, encoded: EncodedOutput) -> Any:
        """The output `encode` made ``encoded`` from (as `read` returns it), checked against its xxh3."""
        where = f"{self._display} batch {encoded.batch_id} (streamed)"
        if xxhash.xxh3_64_hexdigest(encoded.data) != encoded.xxh3:
            raise CorruptionError(where, "xxh3 checksum differs from the one computed at encoding")
        return decode_output(self.format, encoded.data, where)

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

        def ours() -> bool:
            rec = self._record(staged.batch_id)
            return rec is not None and rec["name"] == staged.name

        return self._create_once(rel, lambda: self._store().create_exclusive(rel, body), ours)

    def commit_group(self, outputs: list[EncodedOutput]) -> list[bool]:
        """Commit encoded outputs together: one part object, one group index, one marker per batch (the
        protocol is in the module docstring).

        Returns:
            Per output, True if this call committed it, False if the batch was committed already (by an
            earlier call or another writer; that marker is left as it is).

        Raises:
            ConfigError: an output is listed twice, or its checksum does not match its bytes.
            StorageError: a write failed (after retries); outputs whose markers were not all written may
                be committed or not: a later call (or `is_committed`) tells.
        """
        if not outputs:
            return []
        ids = [o.batch_id for o in outputs]
        if len(set(ids)) != len(ids):
            raise ConfigError("outputs", sorted(ids), "each batch at most once per group")
        for o in outputs:
            _check_int("batch_id", o.batch_id, _MAX_BATCH)
            if xxhash.xxh3_64_hexdigest(o.data) != o.xxh3:
                raise ConfigError("outputs", o.batch_id, "outputs made by FileSink.encode (checksum differs)")
        self._layout(create=True)
        first = min(ids)
        tag = secrets.token_hex(4)
        gid = f"{first:012d}-{tag}"
        part = f"{DATA}/{self._shard(first)}/{first:012d}-g{len(outputs)}-{tag}.{EXTENSIONS[self.format]}"
        records, offset = [], 0
        for o in outputs:
            records.append({"batch_id": o.batch_id, "offset": offset, "length": len(o.data), "xxh3": o.xxh3,
                            "epoch": o.epoch, "rows": o.rows})
            offset += len(o.data)
        index = json.dumps({"part": part, "batches": records}, sort_keys=True).encode()
        self._call(self._store().write_objects, [(part, [o.data for o in outputs]), (self._index_path(gid), [index])],
                   path=part)
        markers = [self._marker(b) for b in ids]
        if self._store().linked_pointers:  # hard links to one file: see the module docstring
            created = self._point_all(markers, gid)
        elif len(markers) == 1:
            created = [self._point(markers[0], gid)]
        else:  # one request per marker on an object store: send them concurrently
            created = list(_markers().map(lambda rel: self._point(rel, gid), markers))
        self._call(self._store().sync_dirs, markers, path=f"{COMMIT}/")
        return created

    def _point_all(self, markers: list[str], gid: str) -> list[bool]:
        """Create markers pointing to group `gid` together (`Backend.create_pointers`), with retries;
        per marker, True if this call made it. A retry skips the markers made already, and a marker that
        an interrupted attempt may have made is this call's if it names `gid` (a fresh id)."""
        store = self._store()
        made: dict[str, bool] = {}
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            todo = [rel for rel in markers if rel not in made]
            made.update(zip(todo, store.create_pointers(todo, gid)))

        self._call(attempt, path=markers[0])
        return [made[rel] or (attempts > 1 and self._call(store.read_pointer, rel, path=rel) == gid)
                for rel in markers]

    def _point(self, rel: str, gid: str) -> bool:
        """Create marker `rel` pointing to group `gid` (see `_create_once`)."""
        store = self._store()
        return self._create_once(rel, lambda: store.create_pointer(rel, gid),
                                 lambda: self._call(store.read_pointer, rel, path=rel) == gid)

    def _create_once(self, rel: str, create: Callable[[], None], ours: Callable[[], bool]) -> bool:
        """Run the create-only write `create` of marker `rel` with retries: True if this call made it,
        False if the name was taken already. When an attempt failed and a retry then finds the name taken,
        the failed attempt may have landed: `ours` tells whether the marker there is this call's."""
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            create()

        try:
            self._call(attempt, path=rel)
            return True
        except FileExistsError:
            return attempts > 1 and ours()

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
        where = f"{self._display}/{name}" + ("" if rec["offset"] is None else f" (batch {batch_id})")
        try:
            if rec["offset"] is None:
                data = self._call(self._store().read, name, path=name)
            else:
                data = self._call(self._store().read_range, name, rec["offset"], rec["length"], path=name)
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

    def mark_complete(self, summary: dict[str, Any], *, replace: bool = False) -> None:
        """Create the ``_SUCCESS`` marker holding ``summary`` (JSON); repeating it with the same summary is
        fine, with another raises FencedError unless ``replace`` (a run that retried dead letters changes
        the job's summary)."""
        try:
            body = json.dumps(summary, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise ConfigError("summary", type(summary).__name__, "a JSON-serializable dict", detail=str(e)) from None
        try:
            self._call(self._store().create_exclusive, SUCCESS, body, path=SUCCESS)
        except FileExistsError:
            if replace:
                self._call(self._store().overwrite, SUCCESS, body, path=SUCCESS)
            elif self.is_complete() != json.loads(body):
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
        """Objects no commit marker refers to: staged outputs, parts and group indexes of interrupted or
        superseded commits, and leftover temporaries of interrupted local writes (under data/ and
        commit/).

        Call it only when no batch is between stage (or encode) and commit, i.e. after the job completed:
        an output awaiting its commit is an orphan too. Reads a marker only for a committed batch staged
        more than once, and the markers of each group until one names it.
        """
        out: list[str] = []
        parts: dict[str, str] = {}  # group id -> part name
        indexes: dict[str, str] = {}  # group id -> index name
        for shard in self._shards(DATA, 0):
            d = f"{DATA}/{shard:06d}"
            staged: dict[int, list[str]] = {}
            for n in self._call(self._store().listdir, d, path=d):
                m = _DATA_NAME.fullmatch(f"{d}/{n}")
                p = _PART_NAME.fullmatch(f"{d}/{n}")
                if m is not None:
                    staged.setdefault(int(m[2]), []).append(f"{d}/{n}")
                elif p is not None:
                    parts[f"{p[2]}-{p[4]}"] = f"{d}/{n}"
                elif (x := _INDEX_NAME.fullmatch(f"{d}/{n}")) is not None:
                    indexes[x[2]] = f"{d}/{n}"
                elif n.startswith(TMP_PREFIX):
                    out.append(f"{d}/{n}")
            c = f"{COMMIT}/{shard:06d}"
            names = self._call(self._store().listdir, c, path=c)
            committed = {int(n) for n in names if _MARKER.fullmatch(n)}
            out.extend(f"{c}/{n}" for n in names if n.startswith(TMP_PREFIX))  # of an interrupted commit
            for b, names in sorted(staged.items()):
                if b not in committed:
                    out.extend(names)
                else:
                    live = self._record(b)
                    out.extend(n for n in names if live is None or n != live["name"])
        live = {gid for gid in indexes if self._group_live(gid)}
        out.extend(name for gid, name in sorted(indexes.items()) if gid not in live)
        out.extend(name for gid, name in sorted(parts.items()) if gid not in live)
        return out

    def _group_live(self, gid: str) -> bool:
        """True if a commit marker names group ``gid`` (its part and index hold committed outputs)."""
        for b in self._group_index(gid):
            rel = self._marker(int(b))
            try:
                if self._call(self._store().read_pointer, rel, path=rel) == gid:
                    return True
            except FileNotFoundError:
                continue
        return False

    def delete(self, names: list[str]) -> None:
        """Delete objects by name, as `orphans` gives them; refuses anything else, and any object a commit
        marker refers to."""
        for name in names:
            m = _DATA_NAME.fullmatch(name)
            part = _PART_NAME.fullmatch(name)
            index = _INDEX_NAME.fullmatch(name)
            tmp = re.fullmatch(r"(data|commit)/\d{6,}/" + re.escape(TMP_PREFIX) + r"[^/]+", name)
            if m is None and part is None and index is None and tmp is None:
                raise ConfigError("names", redact_url(name),
                                  "object names under data/, and temporaries under commit/ (see orphans())")
            if m is not None:
                rec = self._record(int(m[2]))
                if rec is not None and rec["name"] == name:
                    raise ConfigError("names", name, "objects no commit marker names",
                                      detail=f"it is the committed output of batch {int(m[2])}")
            gid = f"{part[2]}-{part[4]}" if part is not None else index[2] if index is not None else None
            if gid is not None:
                try:
                    live = self._group_live(gid)
                except CorruptionError:  # no (valid) index: nothing can refer to the part
                    live = False
                if live:
                    raise ConfigError("names", name, "objects no commit marker names",
                                      detail=f"group {gid} holds committed outputs")
        for name in names:
            self._call(self._store().delete, name, path=name)
