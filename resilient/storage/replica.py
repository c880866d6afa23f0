"""One replica root: the only place that touches a filesystem, and how each backend commits atomically.

Two backends implement `resilient.storage.backend.Backend`; nothing above this module asks which:

* `LocalReplica` (``file://`` URLs and plain paths) uses the OS directly, because fsspec's local
  ``autocommit=False`` writes its temporary file in the system temp dir and never fsyncs:
  data objects are written to ``.tmp-*`` in their final directory, fsynced, renamed over the final name,
  and the directory fsynced; create-only objects (manifests, epoch claims) are written to a temporary,
  fsynced, then ``link()``-ed to their name, which fails if the name exists: an atomic
  create-if-absent with complete content. Many small create-only names with the same content (a
  group's commit markers, `create_pointers`) are all hard links to one such file: a directory entry
  each, no inode or data of their own.
* `FsspecReplica` (every other protocol) goes through fsspec. Object stores have no rename; an object
  upload becomes visible whole or not at all, so data objects are uploaded under their final,
  never-reused name, and a failed upload is discarded rather than closed. Create-only objects use
  ``pipe_file(mode="create")``, which s3fs sends with ``If-None-Match: *`` (atomic on S3 and moto);
  on protocols without a conditional put fsspec falls back to check-then-write, which is not atomic:
  concurrent writers of the same key are then not fenced reliably (a warning says so once).

A local replica never follows a symbolic link and never leaves its root: every path is checked before it
is used (each directory on the way below the root must be a real directory, not a symbolic link, and
``..`` is refused, with `PermanentStorageError`); a file is opened with ``O_NOFOLLOW |
O_NONBLOCK`` and read only if it is a regular file (a FIFO, device or socket in place of an object is
refused at once instead of blocking); a recursive delete removes a symbolic link itself, never what it
points to, and walks directories without following links (``shutil.rmtree``'s descriptor-based walk).

`GuardedReplica` wraps a backend with the retry policy and health accounting: transient errors are
retried with backoff, permanent ones are not, and a replica failing `degraded_after` operations in a
row is reported degraded and gets a single attempt per operation until it succeeds again. Its calls run
in threads of its own (`GuardedReplica.submit`), so a replica that hangs holds only its own threads; one
that an operation stopped waiting for is flagged unresponsive (reported degraded) and gets one call in
flight at a time until a call succeeds (see `resilient.storage.deadlines`). SDK retries and timeouts are
set in `resilient.storage.sdk` so that they do not multiply with the policy's.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from resilient.codec.buffer import ObjectBuffer
from resilient.errors import PermanentStorageError, StorageError, UnreachableError
from resilient.retry import RetryPolicy, classify
from resilient.storage.backend import Backend, Buffer
from resilient.storage.layout import MANIFEST, TMP_PREFIX
from resilient.storage.sdk import configure, precondition_failed, sdk_options

__all__ = ["FsspecReplica", "GuardedReplica", "LocalReplica", "ReplicaHealth", "open_backend"]

T = TypeVar("T")
_ATOMIC_CREATE = {"s3", "s3a"}
_warned: set[str] = set()
_WRITES = frozenset({"write_object", "create_exclusive", "overwrite", "delete"})


def _write_all(fd: int, data: Buffer) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(paths: Iterable[str]) -> None:
    """fsync each distinct directory holding one of `paths`, once."""
    for d in sorted({os.path.dirname(p) for p in paths}):
        _fsync_dir(d)


# link() errors that mean "no hard link here" (the filesystem has none, or the file's link count is full)
_NO_LINKS = frozenset({errno.EPERM, errno.EMLINK, errno.EXDEV, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})


def _link_or_refuse(src: str, dst: str) -> bool:
    """Hard-link ``dst`` to ``src``: True if linked, False if the filesystem cannot (see `_NO_LINKS`);
    FileExistsError if ``dst`` exists."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno in _NO_LINKS:
            return False
        raise


class LocalReplica:
    """A replica on a local (or locally mounted) filesystem."""

    protocol = "file"
    linked_pointers = True  # `create_pointers`: hard links to one file

    def __init__(self, root: str, url: str) -> None:
        self.root = os.path.abspath(root)
        self.url = url

    def probe(self) -> None:
        """List the root once (FileNotFoundError if it does not exist)."""
        os.listdir(self.root)

    def _abs_all(self, rels: Iterable[str]) -> dict[str, str]:
        """`_abs` of many names, each distinct directory checked once (a group's markers share a few)."""
        checked: dict[str, str] = {}
        out = {}
        for rel in rels:
            head, _, name = rel.rpartition("/")
            if head not in checked:
                checked[head] = os.path.dirname(self._abs(f"{head}/{name}" if head else name))
            if name in ("", ".", ".."):
                self._abs(rel)  # refuses it
            out[rel] = os.path.join(checked[head], name)
        return out

    def _abs(self, rel: str) -> str:
        """The absolute path of ``rel``, refused unless it stays under the root through real directories:
        no ``.``, ``..`` or empty segment, and no directory on the way (below the root) that is a symbolic
        link or not a directory. One ``lstat`` per directory level; a missing level ends the check
        (whatever is created there later is created as a real directory)."""
        if not rel:
            return self.root
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise PermanentStorageError("refused: the path leaves the replica root", url=self.url, path=rel)
        full = os.path.join(self.root, *parts)
        path = self.root
        for part in parts[:-1]:
            path = os.path.join(path, part)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                break
            if not stat.S_ISDIR(mode):
                raise PermanentStorageError(
                    f"refused: {part!r} on the way is {_kind(mode) or 'a regular file'}, not a directory",
                    url=self.url, path=rel,
                )
        return full

    def _open_regular(self, rel: str) -> int:
        """A blocking read descriptor of the regular file ``rel``; anything else is refused without
        blocking (a symbolic link, a FIFO, a device, a socket, a directory)."""
        path = self._abs(rel)
        kind = _kind(os.lstat(path).st_mode)
        if kind is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                kind = "a symbolic link"
            else:
                kind = _kind(os.fstat(fd).st_mode)
                if kind is None:
                    os.set_blocking(fd, True)
                    return fd
                os.close(fd)
        raise PermanentStorageError(f"refused: {kind}, not a regular file", url=self.url, path=rel)

    def _makedirs(self, path: str) -> None:
        missing = []
        p = path
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        os.makedirs(path, exist_ok=True)
        for d in reversed(missing):  # make the new directory entries durable too
            _fsync_dir(os.path.dirname(d))

    def write_object(self, rel: str, chunks: Iterable[Buffer]) -> int:
        """Write the chunks as one object, atomically and durably (temporary in the same directory, fsync,
        rename, directory fsync); return its length."""
        return self.write_objects([(rel, chunks)])[0]

    def write_objects(self, items: list[tuple[str, Iterable[Buffer]]]) -> list[int]:
        """Write several objects atomically and durably, sharing the syncs: every temporary is written and
        fsynced, then renamed, then each directory is fsynced once. Returns their lengths. An object is
        visible only whole; after a crash, any subset of them may be."""
        staged: list[tuple[str, str]] = []
        lengths = []
        try:
            for rel, chunks in items:
                path = self._abs(rel)
                self._makedirs(os.path.dirname(path))
                fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=os.path.dirname(path))
                staged.append((tmp, path))
                try:
                    n = 0
                    for c in chunks:
                        _write_all(fd, c)
                        n += memoryview(c).nbytes
                    os.fsync(fd)
                finally:
                    os.close(fd)
                lengths.append(n)
            for tmp, path in staged:
                os.replace(tmp, path)
            _fsync_dirs(path for _, path in staged)
            return lengths
        except BaseException:
            for tmp, _ in staged:
                _unlink_quietly(tmp)
            raise

    def _durable_temp(self, d: str, data: bytes) -> str:
        """A new ``.tmp-*`` file in directory ``d`` (made if missing) holding ``data``, fsynced; its path."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=d)
        except FileNotFoundError:
            self._makedirs(d)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=d)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)
        return tmp

    def create_exclusive(self, rel: str, data: bytes) -> None:
        path = self._abs(rel)
        d = os.path.dirname(path)
        tmp = self._durable_temp(d, data)
        try:
            os.link(tmp, path)  # FileExistsError if the name is taken
            _fsync_dir(d)
        finally:
            _unlink_quietly(tmp)

    def overwrite(self, rel: str, data: bytes) -> None:
        self.write_object(rel, [data])

    def create_pointer(self, rel: str, target: str) -> None:
        """Create-only name ``rel`` holding the short string ``target`` (as `create_pointers` makes it);
        FileExistsError if the name is taken. Not durable until `sync_dirs` covers its directory."""
        if not self.create_pointers([rel], target)[0]:
            raise FileExistsError(errno.EEXIST, "already exists", self._abs(rel))

    def create_pointers(self, rels: list[str], target: str) -> list[bool]:
        """Create-only names ``rels``, each holding the short string ``target``; per name, True if this call
        created it, False if the name was taken (it is left as it is).

        One temporary file holding ``target`` is written and fsynced, next to the first name; each name is
        then a hard link to it (``link()`` fails if the name exists: atomic and create-only), and the
        temporary's own name is removed. A name costs one directory entry: no inode of its own and no
        data to flush, so many pointers cost one small file. Where ``link()`` is refused (the file's link
        count is full; a filesystem without hard links, though `create_exclusive` needs them too), the
        remaining names are symbolic links holding ``target``. Not durable until `sync_dirs` covers their
        directories (the temporary's directory is the first name's). An interrupted call can leave the
        temporary (``.tmp-*``) behind."""
        if not rels:
            return []
        paths = self._abs_all(rels)
        tmp = self._durable_temp(os.path.dirname(paths[rels[0]]), target.encode())
        try:
            links = True

            def make(path: str) -> None:
                nonlocal links
                links = links and _link_or_refuse(tmp, path)
                if not links:
                    os.symlink(target, path)

            created = []
            for rel in rels:
                path = paths[rel]
                try:
                    try:
                        make(path)
                    except FileNotFoundError:  # the directory of another shard, not made yet
                        self._makedirs(os.path.dirname(path))
                        make(path)
                except FileExistsError:
                    created.append(False)
                    continue
                created.append(True)
            return created
        finally:
            _unlink_quietly(tmp)

    def sync_dirs(self, rels: Iterable[str]) -> None:
        """Make the entries created in these directories durable: one fsync per distinct directory."""
        _fsync_dirs(self._abs_all(rels).values())

    def read_pointer(self, rel: str) -> str:
        """What `create_pointer` stored; a regular file's text for names written by `create_exclusive`."""
        path = self._abs(rel)
        try:
            return os.readlink(path)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a regular file, not a pointer
                raise
        with os.fdopen(self._open_regular(rel), "rb") as f:
            return f.read().decode()

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from ``offset`` (fewer if it is shorter)."""
        with os.fdopen(self._open_regular(rel), "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)

    def read(self, rel: str, *, owned: bool = False) -> bytes | bytearray | ObjectBuffer:
        """The object's bytes; with ``owned``, in an `ObjectBuffer` (hashed while read, see its ``xxh3``)
        that the caller may hand over to `resilient.codec.decode`. Only a regular file is read."""
        with os.fdopen(self._open_regular(rel), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if owned:
                return ObjectBuffer.read(f, size)
            buf = bytearray(size)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            del view
            del buf[got:]
            return buf

    def listdir(self, rel: str) -> list[str]:
        """Names in directory ``rel`` ([] if it does not exist); a symbolic link in its place is refused."""
        path = self._abs(rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            kind = _kind(os.lstat(path).st_mode) or "a regular file"
            raise PermanentStorageError(f"refused: {kind}, not a directory", url=self.url, path=rel) from None
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        """Remove ``rel``: a file or a symbolic link (the link itself, never its target), or with
        ``recursive`` a directory and everything under it, without following any link inside."""
        path = self._abs(rel)
        try:
            if recursive and stat.S_ISDIR(os.lstat(path).st_mode):
                if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - every POSIX with openat
                    raise PermanentStorageError(
                        "refused: this platform has no descriptor-based recursive delete", url=self.url, path=rel
                    )
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def manifest_paths(self) -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(self.root):
            if MANIFEST in files:
                yield os.path.relpath(os.path.join(dirpath, MANIFEST), self.root).replace(os.sep, "/")

    def temporaries(self) -> Iterator[tuple[str, float]]:
        """Leftover temporaries of interrupted writes, with their modification time."""
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    p = os.path.join(dirpath, name)
                    try:
                        mtime = os.lstat(p).st_mtime
                    except FileNotFoundError:
                        continue
                    yield os.path.relpath(p, self.root).replace(os.sep, "/"), mtime


def _kind(mode: int) -> str | None:
    """None for a regular file, else what the file is, in words."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FsspecReplica:
    """A replica on any fsspec filesystem (S3, GCS, memory...)."""

    linked_pointers = False  # one conditional create per pointer

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.protocol = proto
        if proto not in _ATOMIC_CREATE and proto not in _warned:
            _warned.add(proto)
            warnings.warn(
                f"storage protocol {proto!r} has no conditional create known to resilient: manifests are "
                "created with check-then-write, so two writers racing on one key are not fenced atomically",
                RuntimeWarning,
                stacklevel=3,
            )

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def write_object(self, rel: str, chunks: Iterable[Buffer]) -> int:
        """Upload the chunks as one object under its final name; return its length."""
        path = self._abs(rel)
        n = 0
        f = self._with_parents(self.fs.open, path, "wb")
        try:
            for c in chunks:
                f.write(c)
                n += memoryview(c).nbytes
            f.close()  # inside: a failed close is discarded too, never closed again later by __del__
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None:
                try:
                    discard()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            raise
        return n

    def create_exclusive(self, rel: str, data: bytes) -> None:
        path = self._abs(rel)
        try:
            self._with_parents(self.fs.pipe_file, path, data, mode="create")
        except FileExistsError:
            raise
        except OSError as e:
            if precondition_failed(e):
                raise FileExistsError(errno.EEXIST, "already exists", path) from e
            raise
        finally:
            self.fs.invalidate_cache(path)

    def overwrite(self, rel: str, data: bytes) -> None:
        self._with_parents(self.fs.pipe_file, self._abs(rel), data)

    def write_objects(self, items: list[tuple[str, Iterable[Buffer]]]) -> list[int]:
        """Upload several objects (each visible whole when its upload returns); return their lengths."""
        return [self.write_object(rel, chunks) for rel, chunks in items]

    def create_pointer(self, rel: str, target: str) -> None:
        """Create-only small object ``rel`` holding ``target`` (a conditional create, as `create_exclusive`)."""
        self.create_exclusive(rel, target.encode())

    def create_pointers(self, rels: list[str], target: str) -> list[bool]:
        """`create_pointer` for each name, one after the other; per name, True if this call created it."""
        created = []
        for rel in rels:
            try:
                self.create_pointer(rel, target)
            except FileExistsError:
                created.append(False)
                continue
            created.append(True)
        return created

    def probe(self) -> None:
        """List the root once (FileNotFoundError if it does not exist)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.ls(self.root, detail=False)  # a failure to answer surfaces here, as it is
        except NotADirectoryError:
            found = []
        if not found and not self.fs.exists(self.root):
            raise FileNotFoundError(f"{self.url} does not exist")

    def sync_dirs(self, rels: Iterable[str]) -> None:
        """Object stores make each object durable when its upload returns: nothing to do."""

    def read_pointer(self, rel: str) -> str:
        return bytes(self.fs.cat_file(self._abs(rel))).decode()

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        return bytes(self.fs.cat_file(self._abs(rel), start=offset, end=offset + length))

    def _with_parents(self, op: Callable[..., T], path: str, *args: Any, **kwargs: Any) -> T:
        """Run a write; where the backend has real directories and the parent is missing, create it
        and run it again (object stores never need this, so they pay no extra request)."""
        try:
            return op(path, *args, **kwargs)
        except FileNotFoundError:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            return op(path, *args, **kwargs)

    def read(self, rel: str, *, owned: bool = False) -> bytes | ObjectBuffer:
        """The object's bytes; with ``owned``, copied into an `ObjectBuffer` (hashed, see its ``xxh3``) that
        the caller may hand over to `resilient.codec.decode` (which then needs no copy of its own)."""
        data = self.fs.cat_file(self._abs(rel))
        return ObjectBuffer.copy_of(data) if owned and data else data

    def listdir(self, rel: str) -> list[str]:
        path = self._abs(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return sorted(n for n in names if n)

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        try:
            self.fs.rm(self._abs(rel), recursive=recursive)
        except FileNotFoundError:
            pass
        finally:
            self.fs.invalidate_cache(self._abs(rel))

    def manifest_paths(self) -> Iterator[str]:
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return
        prefix = self.root + "/"
        for p in found:
            if p.startswith(prefix) and p.endswith("/" + MANIFEST):
                yield p[len(prefix) :]

    def temporaries(self) -> Iterator[tuple[str, float]]:
        return iter(())  # object stores never hold partial objects under a name


def open_backend(url: str, options: dict[str, Any], display_url: str) -> Backend:
    """Build the backend for one storage URL (in the process that uses it; never pickled)."""
    if "://" not in url or url.startswith("file://") or url.startswith("local://"):
        path = url.split("://", 1)[1] if "://" in url else url
        return LocalReplica(path, display_url)
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    fs, root = fsspec.core.url_to_fs(url, **sdk_options(protocol, options))
    return FsspecReplica(configure(fs), root, display_url)


@dataclass
class ReplicaHealth:
    """What one replica's recent operations looked like.

    ``unresponsive``: an operation stopped waiting for this replica (others answered) and none of its
    calls has succeeded since; it is reported ``degraded`` too. ``stale``: ``"key generation N"`` of
    committed generations this replica was left behind on and that no background fill has completed
    yet (the newest 100; `resilient repair` rewrites them).
    """

    url: str
    degraded: bool = False
    consecutive_failures: int = 0
    failures: int = 0
    operations: int = 0
    last_error: str | None = None
    last_success_at: float | None = None
    unresponsive: bool = False
    stale: tuple[str, ...] = ()


_STALE_SHOWN = 100
_WORKERS = 8


class GuardedReplica:
    """A backend behind the retry policy, with health accounting; raises only StorageError subclasses
    (and FileExistsError from `create_exclusive`, which is an answer, not a failure)."""

    def __init__(
        self,
        backend: Backend,
        policy: RetryPolicy,
        *,
        degraded_after: int,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.url = backend.url
        self.policy = policy
        self.degraded_after = degraded_after
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self.health = ReplicaHealth(url=backend.url)
        self._streaks = {"read": 0, "write": 0}
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self._unresponsive_why = "no answer"

    # -- calls in this replica's own threads (a replica that hangs holds only its own threads)

    def submit(self, fn: Callable[["GuardedReplica"], T]) -> "Future[T]":
        """Run ``fn(self)`` in this replica's own threads; its future.

        An unresponsive replica that still has a call in flight is not sent another: the future fails
        at once with `UnreachableError` (one probe at a time, and no piling up of threads on it).
        """
        with self._lock:
            if self.health.unresponsive and self._inflight > 0:
                fut: Future[T] = Future()
                fut.set_exception(UnreachableError(
                    f"not answering ({self._unresponsive_why}; a call is still in flight)", url=self.url))
                return fut
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="resilient-replica")
            self._inflight += 1
        try:
            fut = self._pool.submit(fn, self)
        except BaseException:
            with self._lock:
                self._inflight -= 1
            raise
        fut.add_done_callback(self._settled)
        return fut

    def _settled(self, _fut: Future) -> None:
        with self._lock:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        """Calls submitted and not yet ended."""
        return self._inflight

    def mark_unresponsive(self, why: str) -> None:
        """An operation stopped waiting for this replica: report it degraded until a call succeeds."""
        with self._lock:
            self.health.unresponsive = True
            self.health.degraded = True
            self.health.last_error = why
            self._unresponsive_why = why

    def note_stale(self, what: str, why: str) -> None:
        """A committed generation (``"key generation N"``) was left behind here."""
        with self._lock:
            h = self.health
            if what not in h.stale:
                h.stale = (h.stale + (what,))[-_STALE_SHOWN:]
            h.last_error = f"stale {what}: {why}"

    def note_filled(self, what: str) -> None:
        """A background fill of a generation this replica was left behind on completed."""
        with self._lock:
            self.health.stale = tuple(s for s in self.health.stale if s != what)

    def close(self, *, wait: bool = True) -> None:
        """Release this replica's threads; without ``wait``, calls still running are abandoned (they end
        by their own timeouts) and queued ones are cancelled."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=not wait)

    def call(
        self,
        op: Callable[..., T],
        *args: Any,
        path: str | None = None,
        generation: int | None = None,
        **kwargs: Any,
    ) -> T:
        policy = self.policy
        if self.health.degraded:  # one probe per operation until it answers again
            policy = dataclasses.replace(policy, attempts=1)
        try:
            result = policy.retrying(sleep=self._sleep)(op, *args, **kwargs)
        except FileExistsError:
            self._ok(op)
            raise
        except BaseException as e:
            if not isinstance(e, Exception):
                raise
            err = e if isinstance(e, StorageError) else classify(e, url=self.url, path=path, generation=generation)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                err = PermanentStorageError(f"no space left: {e}", url=self.url, path=path, generation=generation)
            self._failed(op, err)
            if err is e:
                raise
            raise err from e
        self._ok(op)
        return result

    def _ok(self, op: Callable[..., Any]) -> None:
        # a replica that still answers reads but fails every write is not healthy: only a successful
        # write clears a streak of write failures
        writes = getattr(op, "__name__", "") in _WRITES
        with self._lock:
            h = self.health
            h.operations += 1
            self._streaks["read"] = 0
            if writes:
                self._streaks["write"] = 0
            h.consecutive_failures = max(self._streaks.values())
            h.unresponsive = False
            h.degraded = h.consecutive_failures >= self.degraded_after
            h.last_success_at = self._clock()

    def _failed(self, op: Callable[..., Any], err: BaseException) -> None:
        kind = "write" if getattr(op, "__name__", "") in _WRITES else "read"
        with self._lock:
            h = self.health
            h.operations += 1
            h.failures += 1
            self._streaks[kind] += 1
            h.consecutive_failures = max(self._streaks.values())
            h.last_error = f"{type(err).__name__}: {err}"
            h.degraded = h.unresponsive or h.consecutive_failures >= self.degraded_after
