"""Idempotent output as a standard dataset: workers write the bytes, the driver commits names.

Layout 2 (``<ext>`` is the format's: ``jsonl``, ``parquet``, ``tensors``)::

    <url>/part-<batch:012d>.<ext>        one complete file per committed batch: what every reader reads
    <url>/_sink.json                     {"format", "layout": 2}, created with the first commit
    <url>/_SUCCESS                       the job's summary, created after every commit
    <url>/_commit/<first>-<tag>.json     per group: name, length, xxh3, epoch, rows of what it published
    <url>/_staging/...                   staged files, not yet published (local and non-S3 storage)

Readers (pandas, ``pyarrow.dataset``, Ray Data, Polars) skip names starting with ``_`` or ``.``, so
pointing them at ``<url>`` reads the committed rows and nothing else; with DuckDB, glob
``<url>/*.parquet`` (or ``*.jsonl``). A parquet file holds one batch (one row group or more); a jsonl file
is plain jsonl.

**Protocol: data first, the commit is the publish.**

1. *Stage* (worker, `encode`): the worker serializes its output and writes it out of readers' sight:
   locally a new file under ``_staging/``, fsynced; on S3 a multipart upload of the final key, started
   and its one part uploaded (nothing is visible until completed). It answers a `StagedOutput`: the
   names, length, xxh3, epoch and row count: about 250 bytes whatever the output's size.
2. *Publish* (driver, `commit_group`): per output, a **create-only** publish of the final name
   ``part-<batch>.<ext>``: locally ``link()`` of the staged file (fails if the name exists), then one
   fsync of the directory per group; on S3 ``CompleteMultipartUpload`` with ``If-None-Match: *``
   (`resilient.io._publish`). A batch is committed when its file is published: the data file is its own
   commit marker, so a batch is committed at most once (another attempt of it, a retried commit, a zombie
   epoch's late output all find the name taken, and their staged bytes are discarded) and readers never
   see uncommitted bytes. A retried publish that finds its own earlier attempt landed (same inode; same
   multipart ETag) counts as its own.
3. *Record* (driver): the group's published records are written to ``_commit/`` (one object per group),
   then the staged names are removed. ``read`` verifies a file's length and xxh3 against its record.

Recovery needs no log to replay: after a crash each batch is published (committed: resume skips it) or
not (the scheduler redelivers it); a group interrupted halfway leaves some of each, both right. What
remains is staging leftovers (outputs of killed workers, of attempts that lost, of fenced epochs that the
scheduler never committed, unfinished multipart uploads): `orphans`, deleted by `delete` or
``resilient gc --sink`` once the job is complete. Fencing is the scheduler's (it commits only answers of
a slot's current epoch); the create-only publish makes a late commit of a fenced output a no-op.

Cost per batch: locally one fsync by the worker, in the background while its next batch computes
(``settle_later``: the call answers once its outputs are durable), and none extra by the driver but one
directory fsync per group; on S3 three requests (create, part, complete) plus one per group. One
committer at a time (the job's driver); concurrent committers of one batch are still fenced by the
create-only publish.

``format="delta"``: a Delta Lake table (`resilient.io.delta`): workers write parquet files into the table
directory, the driver commits each group as one Delta transaction.

Layout 1 (``data/`` parts and ``commit/`` markers, resilient 0.1.0) is refused with a message saying so.

Example:
    >>> import tempfile
    >>> sink = FileSink(tempfile.mkdtemp(), format="jsonl")
    >>> staged = [sink.encode(b, {"y": [b]}, epoch=0) for b in (7, 8)]   # on workers
    >>> sink.commit_group(staged), sink.commit_group(staged[:1])         # on the driver
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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import xxhash

from resilient.config import redact_url
from resilient.errors import ConfigError, CorruptionError, FencedError, PermanentStorageError, ResilientError
from resilient.io._formats import EXTENSIONS, decode_output, encode_output
from resilient.io._publish import STAGING, ProcessPool, Publisher, publisher_for
from resilient.retry import RetryPolicy, classify
from resilient.storage.backend import Backend
from resilient.storage.replica import open_backend

__all__ = ["DEFAULT_RETRY", "FORMATS", "LAYOUT_VERSION", "FileSink", "NotCommittedError", "StagedOutput"]

T = TypeVar("T")
DEFAULT_RETRY = RetryPolicy(attempts=4, max_seconds=30.0, backoff_seconds=0.1, backoff_max_seconds=2.0)
FORMATS = (*EXTENSIONS, "delta")
LAYOUT_VERSION = 2
COMMIT, SUCCESS, LAYOUT = "_commit", "_SUCCESS", "_sink.json"
_MAX_BATCH = 10**12 - 1
_FILE = re.compile(r"part-(\d{12})\.(" + "|".join(EXTENSIONS.values()) + ")")
_DELTA_FILE = re.compile(r"part-(\d{12})-e(\d+)-[0-9a-f]{8}\.parquet")
_INDEX = re.compile(r"\d{12}-[0-9a-f]{8}\.json")
PUBLISHERS = 16  # a group's publishes in flight at once, on object stores
_PUBLISHERS = ProcessPool(PUBLISHERS, "resilient-publish")  # the process's pool for those, made on first use


@dataclass(frozen=True)
class StagedOutput:
    """A batch's output written by a worker, out of readers' sight; what the driver commits.

    ``name`` is the data file it becomes; ``staged`` says where its bytes wait (a name under
    ``_staging/``, or an S3 multipart upload); ``length``, ``xxh3`` and ``rows`` describe the bytes."""

    batch_id: int
    epoch: int
    name: str
    staged: str
    length: int
    xxh3: str
    rows: int | None


class NotCommittedError(ResilientError, LookupError):
    """The batch has no committed output."""

    def __init__(self, batch_id: int, url: str) -> None:
        self.batch_id = batch_id
        self.url = url
        super().__init__(f"batch {batch_id} is not committed in {url}")


def _check_int(name: str, value: Any, hi: int, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ConfigError(name, value, f"an int from {lo} to {hi}")
    return int(value)


def file_name(batch_id: int, fmt: str) -> str:
    """The data file of a committed batch (formats other than delta)."""
    return f"part-{batch_id:012d}.{EXTENSIONS[fmt]}"


class FileSink:
    """Batch outputs as a dataset of files under one URL (local path, ``file://``, ``s3://``...), each
    batch committed at most once (the protocol is in the module docstring).

    Args:
        url: the sink's root.
        format: "jsonl" (a dict of equal-length columns or a list of row dicts; read back as a dict of
            column lists; strict JSON, so NaN and infinities are refused), "parquet" (the same; read back
            as a dict of NumPy arrays, N-D columns kept N-D), "delta" (as parquet, in a Delta Lake table:
            `resilient.io.delta`) or "tensors" (any state `resilient.codec.encode` takes; read back
            decoded). pyarrow Tables and pandas DataFrames are taken by jsonl, parquet and delta too.
        storage_options: fsspec options, kept (and pickled) to build the filesystem in each process.
        retry: policy for transient storage failures; `DEFAULT_RETRY` by default.
        sleep: called with each retry backoff (inject a fake in tests).

    The object pickles without any open filesystem (rebuilt lazily per process); its repr shows the
    URL without credentials and never the storage options.
    """

    def __init__(self, url: str, *, format: str = "jsonl", storage_options: dict[str, Any] | None = None,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if format not in FORMATS:
            raise ConfigError("format", format, ", ".join(f'"{f}"' for f in FORMATS))
        # a local path is made absolute here, on the driver: workers may run in another directory
        self.url = (url.rstrip("/") or url) if "://" in url else os.path.abspath(url)
        self.format = format
        self.storage_options = dict(storage_options or {})
        self.retry = retry or DEFAULT_RETRY
        self._sleep = sleep
        self._display = redact_url(self.url)
        self._reset()

    def _reset(self) -> None:
        self._backend: Backend | None = None
        self._layout_checked = False  # a layout record, if any, matches ours
        self._layout_recorded = False  # ours is recorded (needed before the first commit)
        self._records: dict[int, dict[str, Any]] | None = None  # batch -> published record (_commit/)
        self._table: Any = None  # delta: the table log, on the driver
        self._unsettled: list[tuple[int, Future]] = []  # worker: (batch, fsync) of outputs staged with `settle_later`

    @classmethod
    def open(cls, url: str, *, storage_options: dict[str, Any] | None = None, **kw: Any) -> "FileSink":
        """The sink at ``url`` with the format it was written with (``_sink.json``); "jsonl" if none."""
        probe = cls(url, storage_options=storage_options, **kw)
        recorded = probe._read_layout()
        fmt = recorded.get("format") if recorded else None
        return probe if fmt in (None, probe.format) or fmt not in FORMATS else cls(
            url, format=fmt, storage_options=storage_options, **kw)

    def __getstate__(self) -> dict[str, Any]:
        """The sink without open filesystems and without secret values: credentials in ``url`` or
        ``storage_options`` travel as references (`resilient.config.seal_secrets`): the variable
        (``RESILIENT_STORAGE_OPTIONS``) when this process's environment holds the same value, which the
        receiving process reads from its own environment; else a token only this process can resolve."""
        from resilient.config import seal_secrets, sink_resolver

        state = {k: v for k, v in self.__dict__.items() if k in ("url", "format", "storage_options", "retry",
                                                                  "_sleep", "_display")}
        state["url"], url_refs = seal_secrets(self.url, sink_resolver(self.url, part="url"))
        state["storage_options"], option_refs = seal_secrets(self.storage_options, sink_resolver(self.url))
        state["_sealed"] = (url_refs, option_refs)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from resilient.config import sink_resolver, unseal_secrets

        state = dict(state)
        url_refs, option_refs = state.pop("_sealed", ((), ()))
        self.__dict__.update(state)
        self._reset()
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

    def _publisher(self) -> Publisher:
        return publisher_for(self._store())

    def _delta(self) -> Any:
        if self._table is None:
            from resilient.io.delta import DeltaLog

            self._table = DeltaLog(self.url, self.storage_options, self._store(), self._call)
        return self._table

    def _call(self, op: Callable[..., T], *args: Any, path: str) -> T:
        """``op(*args)`` with retries; FileNotFoundError and FileExistsError are answers and pass through,
        every other failure comes out as a StorageError."""
        try:
            return self.retry.retrying(sleep=self._sleep)(op, *args)
        except (FileNotFoundError, FileExistsError, ResilientError):
            raise
        except Exception as e:
            raise classify(e, url=self._display, path=path) from e

    def _read_layout(self) -> dict[str, Any] | None:
        try:
            raw = self._call(self._store().read, LAYOUT, path=LAYOUT)
        except FileNotFoundError:
            return None
        try:
            theirs = json.loads(raw)
            assert isinstance(theirs, dict)
        except (ValueError, AssertionError):
            raise CorruptionError(f"{self._display}/{LAYOUT}", "not a sink layout record") from None
        return theirs

    def _layout(self, *, create: bool) -> None:
        """Refuse a URL written with another format or layout; record ours with the first commit."""
        if self._layout_recorded or (self._layout_checked and not create):
            return
        mine = {"format": self.format, "layout": LAYOUT_VERSION}
        if create:
            try:
                self._call(self._store().create_exclusive, LAYOUT, json.dumps(mine).encode(), path=LAYOUT)
                self._layout_checked = self._layout_recorded = True
                return
            except FileExistsError:
                pass
        theirs = self._read_layout()
        if theirs is None:
            self._layout_checked = True  # nothing committed yet (the first commit records ours)
            return
        if theirs.get("layout") != LAYOUT_VERSION:
            version = theirs.get("layout", theirs.get("version", 1))
            raise ConfigError("url", self._display, f"a sink of layout {LAYOUT_VERSION}", detail=(
                f"it was written with sink layout {version} (data/ parts and commit/ markers, resilient 0.1.0), "
                "which pandas, pyarrow and DuckDB cannot read: read it with resilient 0.1.0's FileSink.read_all, "
                "or run the job again into a new URL"))
        if theirs.get("format") != self.format:
            raise ConfigError("format", self.format, f"{theirs.get('format')!r}, what {self._display} was written "
                              "with (or FileSink.open, which reads it)")
        self._layout_checked = self._layout_recorded = True

    # -- worker side -----------------------------------------------------------------------------------

    def encode(self, batch_id: int, output: Any, *, epoch: int, settle_later: bool = False) -> StagedOutput:
        """Serialize ``output`` and write it, durably and out of readers' sight; return what the driver
        needs to commit it (`commit_group`), a few hundred bytes.

        With ``settle_later``, the write may return before it is durable (a local fsync runs in the
        background, overlapping the caller's next work): `settle` must be called, and what it reports
        handled, before the output goes to the driver. A worker settles each call's outputs at its end.

        Raises:
            CodecError: the output does not fit the format (UnsupportedTypeError for a value's type).
            StorageError: the write failed (after retries, for transient failures).
        """
        batch_id = _check_int("batch_id", batch_id, _MAX_BATCH)
        epoch = _check_int("epoch", epoch, 10**18)
        fmt = "parquet" if self.format == "delta" else self.format
        make, rows = encode_output(self.format, output, f"{self._display} batch {batch_id}")
        pub = self._publisher()
        later = (lambda f: self._unsettled.append((batch_id, f))) if settle_later else None
        if self.format == "delta":
            name = f"part-{batch_id:012d}-e{epoch}-{secrets.token_hex(4)}.parquet"
            length, digest = self._call(lambda: pub.put(name, make(), later=later), path=name)
            return StagedOutput(batch_id, epoch, name, name, length, digest, rows)
        name = file_name(batch_id, self.format)
        length, digest, staged = self._call(
            lambda: pub.stage(name, make(), batch_id=batch_id, epoch=epoch, ext=EXTENSIONS[fmt], later=later),
            path=name)
        return StagedOutput(batch_id, epoch, name, staged, length, digest, rows)

    def settle(self) -> dict[int, str]:
        """Wait until every output staged with ``settle_later`` is durable; ``{batch_id: error}`` of those
        whose write failed (their files are removed: they must not go to the driver)."""
        failed: dict[int, str] = {}
        pending, self._unsettled = self._unsettled, []
        for batch_id, future in pending:
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - told per batch: the worker answers it as failed
                where = file_name(batch_id, self.format) if self.format != "delta" else f"batch {batch_id}"
                err = classify(e, url=self._display, path=where)
                failed[batch_id] = f"{type(err).__name__}: {err}"
        return failed

    stage = encode  # the same: every output is staged by the worker that made it

    def decode(self, staged: StagedOutput) -> Any:
        """The committed output of ``staged``'s batch (read back: committed, it may be another attempt's)."""
        return self.read(staged.batch_id)

    # -- driver side -----------------------------------------------------------------------------------

    def _check(self, outputs: list[StagedOutput]) -> None:
        ids = [o.batch_id for o in outputs]
        if len(set(ids)) != len(ids):
            raise ConfigError("outputs", sorted(ids), "each batch at most once per group")
        pub = None if self.format == "delta" else self._publisher()
        for o in outputs:
            if not isinstance(o, StagedOutput):
                raise ConfigError("outputs", type(o).__name__, "StagedOutput records made by FileSink.encode")
            _check_int("batch_id", o.batch_id, _MAX_BATCH)
            if self.format == "delta":
                m = _DELTA_FILE.fullmatch(o.name) if isinstance(o.name, str) else None
                ok = m is not None and int(m[1]) == o.batch_id and int(m[2]) == o.epoch and o.staged == o.name
            else:
                ok = o.name == file_name(o.batch_id, self.format) and pub.is_staged_token(  # type: ignore[union-attr]
                    o.staged, o.batch_id, o.epoch, EXTENSIONS[self.format])
            if not ok:
                raise ConfigError("outputs", redact_url(str(o.name)),
                                  f"a name staged by this sink for batch {o.batch_id}, epoch {o.epoch}")

    def commit(self, staged: StagedOutput) -> bool:
        """`commit_group` of one output: True if this call committed it, False if the batch was committed
        already (its file is left as it is)."""
        return self.commit_group([staged])[0]

    def commit_group(self, outputs: list[StagedOutput]) -> list[bool]:
        """Publish staged outputs together and record them (the protocol is in the module docstring).

        Returns:
            Per output, True if this call (or an earlier attempt of it) committed it, False if the batch was
            committed already by another output (whose file is left as it is; this one's bytes are discarded).

        Raises:
            ConfigError: an output is listed twice, or is not a record made by `encode` for this sink.
            StorageError: a publish failed (after retries); outputs may be committed or not: a later call
                (or `is_committed`) tells.
        """
        if not outputs:
            return []
        self._check(outputs)
        self._layout(create=True)
        if self.format == "delta":
            return self._delta().commit(outputs)
        pub = self._publisher()

        def publish(o: StagedOutput) -> bool:
            return self._call(pub.publish, o.name, o.staged, path=o.name)

        if len(outputs) > 1 and self._store().protocol != "file":
            created = list(_PUBLISHERS.get().map(publish, outputs))
        else:
            created = [publish(o) for o in outputs]
        self._call(pub.sync, [o.name for o in outputs], path=outputs[0].name)
        mine = [asdict(o) for o, c in zip(outputs, created) if c]
        if mine:
            for r in mine:
                del r["staged"]
            first = min(o.batch_id for o in outputs)
            rel = f"{COMMIT}/{first:012d}-{secrets.token_hex(4)}.json"
            self._call(self._store().write_object, rel, [json.dumps({"batches": mine}, sort_keys=True).encode()],
                       path=rel)
            if self._records is not None:
                self._records.update((r["batch_id"], r) for r in mine)
        for o, c in zip(outputs, created):
            if not (c and o.staged.startswith("mpu:")):  # a completed upload is the published object
                try:
                    pub.discard(o.name, o.staged)
                except Exception:  # noqa: BLE001 - a staged leftover is an orphan, collected later
                    pass
        return created

    def is_committed(self, batch_id: int) -> bool:
        batch_id = _check_int("batch_id", batch_id, _MAX_BATCH)
        self._layout(create=False)
        return self._name_of(batch_id) is not None

    def _name_of(self, batch_id: int) -> str | None:
        if self.format == "delta":
            return self._delta().committed().get(batch_id)
        name = file_name(batch_id, self.format)
        return name if self._call(self._publisher().exists, name, path=name) else None

    def committed_from(self, start: int) -> Iterator[int]:
        """Committed batch ids >= ``start``, ascending. Holds only those: locally one pass over the root's
        entries, on S3 a listing that starts at ``part-<start>`` (key order); for delta, the table's files."""
        start = _check_int("start", start, _MAX_BATCH + 1)
        self._layout(create=False)
        return iter(sorted(self._committed(start)))

    def _committed(self, start: int = 0) -> dict[int, str]:
        """Batch id -> data file of the committed batches >= ``start``."""
        if self.format == "delta":
            return {b: n for b, n in self._delta().committed().items() if b >= start}
        first = f"part-{start:012d}"
        names = self._call(lambda: list(self._publisher().names_from(first)), path="")
        out = {}
        for n in names:
            m = _FILE.fullmatch(n)
            if m is not None and m[2] == EXTENSIONS[self.format]:
                out[int(m[1])] = n
        return out

    def _load_records(self) -> dict[int, dict[str, Any]]:
        """Published records by batch, from ``_commit/`` (read once per instance, then kept up to date)."""
        if self._records is None:
            records: dict[int, dict[str, Any]] = {}
            for n in self._call(self._store().listdir, COMMIT, path=COMMIT):
                if not _INDEX.fullmatch(n):
                    continue
                rel = f"{COMMIT}/{n}"
                try:
                    for r in json.loads(self._call(self._store().read, rel, path=rel))["batches"]:
                        records.setdefault(int(r["batch_id"]), r)
                except (ValueError, KeyError, TypeError):
                    raise CorruptionError(f"{self._display}/{rel}", "not a valid group record") from None
            self._records = records
        return self._records

    def read(self, batch_id: int) -> Any:
        """The committed output of ``batch_id``, verified against its record (length, xxh3) when there is one.

        Raises:
            NotCommittedError: the batch has no committed output.
            CorruptionError: the file's length or xxh3 differs from its record.
        """
        batch_id = _check_int("batch_id", batch_id, _MAX_BATCH)
        self._layout(create=False)
        name = self._name_of(batch_id)
        if name is None:
            raise NotCommittedError(batch_id, self._display)
        return self._read_file(batch_id, name)

    def _read_file(self, batch_id: int, name: str) -> Any:
        where = f"{self._display}/{name}"
        try:
            data = self._call(self._store().read, name, path=name)
        except FileNotFoundError:
            raise PermanentStorageError("committed output missing", url=self._display, path=name) from None
        rec = None if self.format == "delta" else self._load_records().get(batch_id)
        if rec is not None and rec["name"] == name:
            if len(data) != rec["length"]:
                raise CorruptionError(where, f"length {len(data)}, its commit record says {rec['length']}")
            if xxhash.xxh3_64_hexdigest(data) != rec["xxh3"]:
                raise CorruptionError(where, "xxh3 checksum differs from its commit record's")
        return decode_output(self.format, data, where)

    def read_all(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(batch_id, output)`` of every committed batch >= ``start``, in batch-id order."""
        start = _check_int("start", start, _MAX_BATCH + 1)
        self._layout(create=False)
        committed = self._committed(start)
        for b in sorted(committed):
            yield b, self._read_file(b, committed[b])

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
        """What no commit refers to: staged files and unfinished multipart uploads (of killed workers, of
        attempts that lost, of fenced epochs); for delta, data files the table does not hold.

        Call it only when no batch is between stage (`encode`) and commit, i.e. after the job completed: an
        output awaiting its commit is an orphan too.
        """
        self._layout(create=False)
        if self.format == "delta":
            return self._delta().orphans()
        return self._call(self._publisher().leftovers, path=STAGING)

    def delete(self, names: list[str]) -> None:
        """Delete orphans by name, as `orphans` gives them; refuses anything else."""
        allowed = set(self.orphans())
        for name in names:
            if name not in allowed:
                raise ConfigError("names", redact_url(name), "names orphans() gives (staged files, unfinished "
                                  "uploads, data files no commit holds)")
        pub = self._publisher()
        for name in names:
            self._call(pub.remove, name, path=name)
