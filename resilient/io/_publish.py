"""How a sink's data file is staged by a worker and published by the driver, per storage.

A data file is written whole by the worker that produced it, out of readers' sight, and published by the
driver under its final name with a **create-only** operation: the first publish of a name wins, a later
one (another attempt of the same batch) is refused and its staged bytes are discarded. The driver
handles names and a few fields only, never the bytes.

==============  ============================================  ============================================
storage         stage (worker)                                publish (driver), create-only
==============  ============================================  ============================================
local           ``_staging/<id>.staged``: ``O_EXCL`` create,  ``link()`` to the final name (fails if it
                write, fsync (no rename: the inode is         exists), one fsync of the directory per
                durable, and only the final name must be)     group, then the staged name is removed
S3              a multipart upload of the final key: create   ``CompleteMultipartUpload`` with
                + one part (2 requests); nothing is visible   ``If-None-Match: *`` (1 request)
other fsspec    an object under ``_staging/``                 existence check, then copy (not atomic: a
                                                              warning says so once per protocol)
==============  ============================================  ============================================

Deferred sync (local): `stage` and `put` take ``later``; given one, the file is written and its fsync (and
close) handed to a small per-process pool, its future passed to ``later``. The caller must wait for that
future before anyone publishes the file: the worker waits for the futures of a call's outputs before it
answers the call (`FileSink.settle`), so the fsync of one batch overlaps the computing of the next. A
failed fsync removes the staged file and fails the future.

A publish that is retried after its first attempt landed is recognised as its own: locally the final name
is the staged file's inode; on S3 the object's ETag is the one the completed upload gives (``md5`` of the
part's MD5 digest, ``-1``).

Leftovers (`Publisher.leftovers`): staged files of workers killed while staging or whose outputs lost to
another attempt, and, on S3, multipart uploads never completed. Collect them only when no batch is
between stage and publish (the job is complete): an output awaiting its commit is a leftover too.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import xxhash

from resilient.storage.backend import Backend, Buffer
from resilient.storage.replica import FsspecReplica, LocalReplica
from resilient.storage.sdk import precondition_failed

__all__ = ["STAGING", "Publisher", "publisher_for"]

STAGING = "_staging"
_MPU = "mpu:"  # a staged token on S3: "mpu:<upload id>:<part ETag>"
SYNCERS = 2  # threads per process running deferred fsyncs

Later = Callable[[Future], None]  # takes the future of a deferred fsync


class ProcessPool:
    """A thread pool of the process, made on first use (a pickled sink carries none)."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads, self.name = threads, name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            return self._pool


_SYNCERS = ProcessPool(SYNCERS, "resilient-fsync")


def _hashed(chunks: Iterable[Buffer]) -> Iterator[tuple[Buffer, Any]]:
    for c in chunks:
        yield c, memoryview(c).cast("B") if isinstance(c, memoryview) else c


def staging_name(batch_id: int, epoch: int, ext: str) -> str:
    return f"{STAGING}/{batch_id:012d}-e{epoch}-{secrets.token_hex(4)}.{ext}.staged"


class Publisher:
    """Stage and publish on a backend (any fsspec protocol; see the table in the module docstring)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # -- worker side
    def put(self, rel: str, chunks: Iterable[Buffer], *, later: Later | None = None) -> tuple[int, str]:
        """Write a new object ``rel`` whole and durably; ``(length, xxh3)``. ``later``: see the module
        docstring (only a local publisher defers; elsewhere the object is durable on return)."""
        h = xxhash.xxh3_64()

        def hashed() -> Iterator[Buffer]:
            for c, view in _hashed(chunks):
                h.update(view)
                yield c

        return self.backend.write_object(rel, hashed()), h.hexdigest()

    def stage(self, final: str, chunks: Iterable[Buffer], *, batch_id: int, epoch: int,
              ext: str, later: Later | None = None) -> tuple[int, str, str]:
        """Write the bytes of future object ``final`` out of readers' sight; ``(length, xxh3, token)``, the
        token naming what `publish` makes visible."""
        staged = staging_name(batch_id, epoch, ext)
        length, digest = self.put(staged, chunks, later=later)
        return length, digest, staged

    # -- driver side
    def publish(self, final: str, token: str) -> bool:
        """Make the staged ``token`` visible as ``final`` unless the name exists: True if this call (or an
        earlier attempt of it) made it."""
        fs, root = self.backend.fs, self.backend.root  # type: ignore[attr-defined]
        if fs.exists(f"{root}/{final}"):
            return False
        fs.copy(f"{root}/{token}", f"{root}/{final}")
        return True

    def sync(self, finals: list[str]) -> None:
        """Make the published names durable (local: one fsync per directory)."""

    def exists(self, rel: str) -> bool:
        fs, path = self.backend.fs, self.backend._abs(rel)  # type: ignore[attr-defined]
        fs.invalidate_cache(path)
        return bool(fs.exists(path))

    def discard(self, final: str, token: str) -> None:
        """Remove the staged ``token`` of ``final`` (after its publish, or when it lost to another)."""
        self.backend.delete(token)

    def is_staged_token(self, token: str, batch_id: int, epoch: int, ext: str) -> bool:
        """Whether ``token`` is what `stage` gives for this batch, epoch and extension."""
        pattern = rf"{STAGING}/{batch_id:012d}-e{epoch}-[0-9a-f]{{8}}\.{re.escape(ext)}\.staged"
        return isinstance(token, str) and re.fullmatch(pattern, token) is not None

    def names_from(self, first: str) -> Iterator[str]:
        """Names in the root directory that sort at or after ``first`` (any order); for a resume, which
        needs the few names past its watermark, without holding the rest."""
        return (n for n in self.backend.listdir("") if n >= first)

    # -- maintenance
    def leftovers(self) -> list[str]:
        """Staged objects (and unfinished uploads) still here, by name."""
        return [f"{STAGING}/{n}" for n in self.backend.listdir(STAGING)]

    def remove(self, name: str) -> None:
        self.backend.delete(name)


class LocalPublisher(Publisher):
    """Stage to an exclusive file, publish with ``link()``."""

    backend: LocalReplica

    def put(self, rel: str, chunks: Iterable[Buffer], *, later: Later | None = None) -> tuple[int, str]:
        path = self.backend._abs(rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            self.backend._makedirs(os.path.dirname(path))
            fd = os.open(path, flags, 0o644)
        h, n = xxhash.xxh3_64(), 0
        try:
            for c, view in _hashed(chunks):
                h.update(view)
                mv = memoryview(c).cast("B")
                while mv:
                    mv = mv[os.write(fd, mv):]
                n += memoryview(c).nbytes
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        if later is None:
            _sync_and_close(fd, path)
        else:
            later(_SYNCERS.get().submit(_sync_and_close, fd, path))
        return n, h.hexdigest()

    def publish(self, final: str, token: str) -> bool:
        src, dst = self.backend._abs(token), self.backend._abs(final)
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            try:
                return os.path.samestat(os.lstat(src), os.lstat(dst))
            except FileNotFoundError:
                return False
        except FileNotFoundError:  # no staged file: removed after an earlier publish (the batch is taken)
            if os.path.lexists(dst):
                return False
            if not os.path.lexists(os.path.dirname(dst)):
                self.backend._makedirs(os.path.dirname(dst))
                return self.publish(final, token)
            raise
        return True

    def sync(self, finals: list[str]) -> None:
        self.backend.sync_dirs(finals)

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.backend._abs(rel))

    def names_from(self, first: str) -> Iterator[str]:
        try:
            entries = os.scandir(self.backend._abs(""))
        except FileNotFoundError:  # nothing committed yet
            return
        with entries:  # one pass, nothing below ``first`` kept
            yield from (e.name for e in entries if e.name >= first)


class S3Publisher(Publisher):
    """Stage as a multipart upload of the final key, publish by completing it (create-only)."""

    backend: FsspecReplica

    def _key(self, rel: str) -> tuple[str, str]:
        bucket, key, _ = self.backend.fs.split_path(self.backend._abs(rel))
        return bucket, key

    def stage(self, final: str, chunks: Iterable[Buffer], *, batch_id: int, epoch: int,
              ext: str, later: Later | None = None) -> tuple[int, str, str]:
        h = xxhash.xxh3_64()
        data = bytearray()
        for c, view in _hashed(chunks):
            h.update(view)
            data += view
        bucket, key = self._key(final)
        fs = self.backend.fs
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        try:
            part = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=bytes(data))
        except BaseException:
            self._abort(bucket, key, upload)
            raise
        return len(data), h.hexdigest(), f"{_MPU}{upload}:{part['ETag'].strip(chr(34))}"

    def _abort(self, bucket: str, key: str, upload: str) -> None:
        try:
            self.backend.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
        except Exception:  # noqa: BLE001 - a leftover upload is collected later
            pass

    def publish(self, final: str, token: str) -> bool:
        upload, etag = token[len(_MPU):].rsplit(":", 1)
        bucket, key = self._key(final)
        fs = self.backend.fs
        try:
            fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload, IfNoneMatch="*",
                       MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": f'"{etag}"'}]})
            return True
        except Exception as e:  # noqa: BLE001 - taken, or an earlier attempt of ours completed it
            taken = precondition_failed(e) or "NoSuchUpload" in str(e) or isinstance(e, FileNotFoundError)
            if not taken:
                raise
        finally:
            fs.invalidate_cache(self.backend._abs(final))
        try:
            info = fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        mine = hashlib.md5(bytes.fromhex(etag), usedforsecurity=False).hexdigest() + "-1"
        return str(info.get("ETag", "")).strip('"') == mine

    def discard(self, final: str, token: str) -> None:
        if token.startswith(_MPU):
            bucket, key = self._key(final)
            self._abort(bucket, key, token[len(_MPU):].rsplit(":", 1)[0])

    def is_staged_token(self, token: str, batch_id: int, epoch: int, ext: str) -> bool:
        return isinstance(token, str) and re.fullmatch(r"mpu:[^:/?&]+:[0-9a-f]{32}", token) is not None

    def names_from(self, first: str) -> Iterator[str]:
        bucket, prefix = self._key("")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        kw: dict[str, Any] = {"StartAfter": prefix + first[:-1]} if first else {}
        while True:  # S3 lists in key order: a listing from ``first`` skips everything below it
            page = self.backend.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", **kw)
            for o in page.get("Contents", []):
                if o["Key"][len(prefix):] >= first:
                    yield o["Key"][len(prefix):]
            if not page.get("IsTruncated"):
                return
            kw = {"ContinuationToken": page["NextContinuationToken"]}

    def leftovers(self) -> list[str]:
        bucket, prefix = self._key("")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out, kw = [], {}
        while True:
            page = self.backend.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **kw)
            for u in page.get("Uploads", []):
                out.append(f"{u['Key'][len(prefix):]}?uploadId={u['UploadId']}")
            if not page.get("IsTruncated"):
                break
            kw = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        return sorted(out) + super().leftovers()

    def remove(self, name: str) -> None:
        if "?uploadId=" in name:
            rel, upload = name.split("?uploadId=", 1)
            bucket, key = self._key(rel)
            self._abort(bucket, key, upload)
        else:
            super().remove(name)


def _sync_and_close(fd: int, path: str) -> None:
    """Sync (inline, or deferred on the pool) and close: the file is durable when this returns; if the
    sync fails, the file is removed."""
    try:
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def publisher_for(backend: Backend) -> Publisher:
    if isinstance(backend, LocalReplica):
        return LocalPublisher(backend)
    if isinstance(backend, FsspecReplica) and backend.protocol in ("s3", "s3a"):
        return S3Publisher(backend)
    return Publisher(backend)

