"""`FlakyFileSystem`: an fsspec filesystem that makes a seeded fraction of calls fail.

It wraps any filesystem instance and forwards every call to it unchanged, except that before an
operation listed in ``methods`` it draws one number from its own ``random.Random(seed)`` and raises a
transient error (``ConnectionResetError`` by default) with probability ``rate``. The same seed gives
the same failures for the same sequence of calls, so a test can assert exact counts.

File objects returned by `FlakyFileSystem.open` fail the same way on ``read``, ``write``, ``flush``
and ``close``, and can simulate a connection cut in the middle of an upload
(``fail_after_write_bytes``). A file whose upload fails is *abandoned*, as a client whose connection
dropped would leave it: a buffered remote file (any fsspec ``AbstractBufferedFile``, e.g. s3fs) is
discarded, so nothing is committed and any multipart upload is aborted; a local file, which writes
straight through, keeps the bytes already written (a truncated file).
"""

from __future__ import annotations

import errno
import io
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from resilient.errors import ConfigError

__all__ = ["FlakyFileSystem"]

ErrorSpec = BaseException | type[BaseException] | Callable[[str], BaseException]

# Operations of the wrapped filesystem that go through the wrapper, counted in `calls`. Aliases the
# base class defines in terms of these (`delete` -> `rm`, `stat` -> `info`, `read_bytes` -> `cat_file`,
# `write_text` -> `open`...) are counted under the operation they call.
_FS_OPERATIONS = (
    "cat",
    "cat_file",
    "cat_ranges",
    "checksum",
    "copy",
    "cp_file",
    "created",
    "du",
    "exists",
    "expand_path",
    "find",
    "get",
    "get_file",
    "glob",
    "info",
    "isdir",
    "isfile",
    "lexists",
    "ls",
    "makedirs",
    "mkdir",
    "modified",
    "mv",
    "pipe",
    "pipe_file",
    "put",
    "put_file",
    "rm",
    "rm_file",
    "rmdir",
    "sign",
    "size",
    "sizes",
    "touch",
    "ukey",
    "walk",
)
_FILE_OPERATIONS = ("close", "flush", "read", "write")
_ALL_OPERATIONS = frozenset(_FS_OPERATIONS) | {"open"} | frozenset(_FILE_OPERATIONS)


def _default_error(operation: str) -> BaseException:
    return ConnectionResetError(errno.ECONNRESET, f"fault injected by FlakyFileSystem in {operation}")


def _make_error(spec: ErrorSpec | None, operation: str) -> BaseException:
    if spec is None:
        return _default_error(operation)
    if isinstance(spec, BaseException):
        return spec
    if isinstance(spec, type) and issubclass(spec, BaseException):
        return spec(f"fault injected by FlakyFileSystem in {operation}")
    return spec(operation)


def _forward(name: str) -> Any:
    def operation(self: FlakyFileSystem, *args: Any, **kwargs: Any) -> Any:
        self._enter(name)
        return getattr(self.fs, name)(*args, **kwargs)

    operation.__name__ = name
    operation.__qualname__ = f"FlakyFileSystem.{name}"
    operation.__doc__ = f"Forward `{name}` to the wrapped filesystem; may fail if listed in ``methods``."
    return operation


class FlakyFileSystem(AbstractFileSystem):
    """Wrap a filesystem so that a seeded fraction of its operations raise a transient error.

    Every operation is counted in `calls`; every injected failure in `failures` (both
    `collections.Counter` keyed by operation name). One random draw is made per call of an operation
    listed in ``methods``; forced failures (`fail_next`) are decided first and make no draw. Methods
    the wrapper does not know (backend extras such as s3fs's ``get_tags``) reach the wrapped
    filesystem uncounted.

    Instances are never cached by fsspec. Pickling ships the wrapped filesystem and the options;
    counters and the random state start afresh in the receiving process.

    Args:
        fs: the filesystem instance to wrap.
        rate: probability, from 0 to 1, that a call of an operation in ``methods`` fails.
        seed: seed of the private ``random.Random`` that decides the failures.
        methods: operations that may fail; defaults to `DEFAULT_METHODS`. Names of file-object
            operations (``read``, ``write``, ``flush``, ``close``) apply to files from `open`.
        error: what to raise: an exception instance, an exception class (called with a message) or
            a callable taking the operation name. Default: ``ConnectionResetError(ECONNRESET, ...)``.
        fail_after_write_bytes: if set, every file opened for writing accepts this many bytes, then
            the write that goes past it passes the bytes up to the limit on, abandons the file and
            raises (a connection cut mid-upload).

    Raises:
        ConfigError: a rate outside 0..1, an unknown operation name or a negative byte limit.

    Example:
        >>> import fsspec
        >>> flaky = FlakyFileSystem(fsspec.filesystem("memory"), rate=0.0)
        >>> flaky.pipe_file("/doc/a", b"x")
        >>> flaky.fail_next(1)
        >>> try:
        ...     flaky.cat_file("/doc/a")
        ... except ConnectionResetError:
        ...     print("failed")
        failed
        >>> flaky.cat_file("/doc/a"), flaky.calls["cat_file"], flaky.failures["cat_file"]
        (b'x', 2, 1)
    """

    protocol = "flaky"
    cachable = False

    #: Operations that may fail unless ``methods`` says otherwise: the ones that move data or
    #: metadata to or from the store (not directory creation, listings walks or path expansion).
    DEFAULT_METHODS: frozenset[str] = frozenset(
        {
            "cat",
            "cat_file",
            "cat_ranges",
            "close",
            "copy",
            "cp_file",
            "exists",
            "find",
            "flush",
            "get",
            "get_file",
            "glob",
            "info",
            "isdir",
            "isfile",
            "ls",
            "mv",
            "open",
            "pipe",
            "pipe_file",
            "put",
            "put_file",
            "read",
            "rm",
            "rm_file",
            "size",
            "touch",
            "write",
        }
    )
    #: Every operation name ``methods`` and `fail_next` accept.
    OPERATIONS: frozenset[str] = _ALL_OPERATIONS

    def __init__(
        self,
        fs: AbstractFileSystem,
        *,
        rate: float = 0.0,
        seed: int = 0,
        methods: Iterable[str] | None = None,
        error: ErrorSpec | None = None,
        fail_after_write_bytes: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= rate <= 1.0:
            raise ConfigError("rate", rate, "a probability from 0 to 1")
        if fail_after_write_bytes is not None and fail_after_write_bytes < 0:
            raise ConfigError("fail_after_write_bytes", fail_after_write_bytes, "None or a byte count >= 0")
        self.fs = fs
        self.rate = rate
        self.seed = seed
        self.methods = self._check_methods(methods, "methods", self.DEFAULT_METHODS)
        self.error = error
        self.fail_after_write_bytes = fail_after_write_bytes
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._forced_left = 0
        self._forced_error: ErrorSpec | None = None
        self._forced_methods: frozenset[str] = frozenset()

    @staticmethod
    def _check_methods(methods: Iterable[str] | None, name: str, default: frozenset[str]) -> frozenset[str]:
        if methods is None:
            return default
        if isinstance(methods, str):
            methods = [methods]
        chosen = frozenset(methods)
        unknown = sorted(chosen - _ALL_OPERATIONS)
        if unknown:
            raise ConfigError(name, unknown, "operation names from FlakyFileSystem.OPERATIONS")
        return chosen

    def fail_next(
        self, n: int = 1, error: ErrorSpec | None = None, *, methods: Iterable[str] | None = None
    ) -> None:
        """Make the next ``n`` calls of ``methods`` fail, whatever the rate; replaces any earlier plan.

        Args:
            n: how many calls fail (0 cancels the plan).
            error: what they raise (same forms as the constructor's ``error``); default: ``error``.
            methods: operations concerned; default: this filesystem's ``methods``.
        """
        if n < 0:
            raise ConfigError("n", n, "a count >= 0")
        chosen = self._check_methods(methods, "methods", self.methods)
        with self._lock:
            self._forced_left = n
            self._forced_error = error if error is not None else self.error
            self._forced_methods = chosen

    def reset_counts(self) -> None:
        """Zero `calls` and `failures` (the random sequence and any `fail_next` plan continue)."""
        with self._lock:
            self.calls.clear()
            self.failures.clear()

    def _enter(self, operation: str) -> None:
        """Count a call of ``operation`` and raise if a fault is due."""
        with self._lock:
            self.calls[operation] += 1
            spec: ErrorSpec | None
            if self._forced_left and operation in self._forced_methods:
                self._forced_left -= 1
                spec = self._forced_error
            elif operation in self.methods and self._rng.random() < self.rate:
                spec = self.error
            else:
                return
            self.failures[operation] += 1
        raise _make_error(spec, operation)

    def _cut(self, operation: str) -> BaseException:
        """Record a partial-write failure and return the error to raise."""
        with self._lock:
            self.failures[operation] += 1
        return _make_error(self.error, operation)

    # -- forwarding (the operations in _FS_OPERATIONS are added below the class) ---------------

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> _FlakyFile:  # type: ignore[override]
        """Open ``path`` on the wrapped filesystem; the file fails like the filesystem does."""
        self._enter("open")
        return _FlakyFile(self, self.fs.open(path, mode, **kwargs), writing=any(c in mode for c in "wax+"))

    def invalidate_cache(self, path: str | None = None) -> None:
        """Forward to the wrapped filesystem (never fails, not counted)."""
        self.fs.invalidate_cache(path)

    def unstrip_protocol(self, name: str) -> str:
        """The wrapped filesystem's full URL for ``name``."""
        return self.fs.unstrip_protocol(name)

    @property
    def sep(self) -> str:  # type: ignore[override]
        return self.fs.sep

    @property
    def fsid(self) -> str:
        return f"flaky-{self.fs.fsid}"

    @property
    def transaction(self) -> Any:
        """The wrapped filesystem's transaction (files opened through the wrapper join it)."""
        return self.fs.transaction

    def start_transaction(self) -> Any:
        return self.fs.start_transaction()

    def end_transaction(self) -> None:
        self.fs.end_transaction()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper does not define: backend-specific extras.
        if name.startswith("__") or name == "fs":
            raise AttributeError(name)
        return getattr(self.fs, name)

    def __repr__(self) -> str:
        return f"FlakyFileSystem({self.fs!r}, rate={self.rate}, seed={self.seed})"


for _name in _FS_OPERATIONS:
    setattr(FlakyFileSystem, _name, _forward(_name))
del _name


class _FlakyFile:
    """A file from `FlakyFileSystem.open`: forwards to the real file, failing like its filesystem."""

    def __init__(self, owner: FlakyFileSystem, f: Any, *, writing: bool) -> None:
        self._owner = owner
        self._f = f
        self._writing = writing
        self._written = 0
        self._dead = False  # closed by us, or abandoned after a failure

    # counted operations

    def read(self, *args: Any, **kwargs: Any) -> Any:
        self._owner._enter("read")
        return self._f.read(*args, **kwargs)

    def readinto(self, buffer: Any) -> Any:
        self._owner._enter("read")
        return self._f.readinto(buffer)

    def write(self, data: Any) -> int:
        self._check_alive("write")
        self._owner._enter("write")
        limit = self._owner.fail_after_write_bytes
        if limit is None:
            n = self._f.write(data)
            self._written += len(data) if n is None else n
            return len(data) if n is None else n
        chunk = data if isinstance(data, str) else memoryview(data).cast("B")
        room = limit - self._written
        if len(chunk) <= room:
            self._f.write(data)
            self._written += len(chunk)
            return len(chunk)
        if room > 0:
            self._f.write(chunk[:room])
            self._written += room
        self._abandon()
        raise self._owner._cut("write")

    def flush(self, *args: Any, **kwargs: Any) -> None:
        self._check_alive("flush")
        self._owner._enter("flush")
        self._f.flush(*args, **kwargs)

    def close(self) -> None:
        if self._dead:
            return
        try:
            self._owner._enter("close")
        except BaseException:
            self._abandon()
            raise
        self._dead = True
        self._f.close()

    # state

    @property
    def closed(self) -> bool:
        return self._dead or bool(self._f.closed)

    @property
    def written(self) -> int:
        """Bytes (characters in text mode) passed on to the real file so far."""
        return self._written

    def _check_alive(self, operation: str) -> None:
        if self._dead:
            raise ValueError(f"{operation} on a closed or abandoned file")

    def _abandon(self) -> None:
        """Drop the file as a cut connection would: buffered uploads discarded, others closed as they are."""
        self._dead = True
        raw = self._f.buffer if isinstance(self._f, io.TextIOWrapper) else self._f
        if self._writing and isinstance(raw, AbstractBufferedFile) and not raw.closed:
            raw.discard()
            raw.closed = True
        else:
            self._f.close()

    # plumbing

    def __enter__(self) -> _FlakyFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Any:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_f", "_owner"):
            raise AttributeError(name)
        return getattr(self._f, name)

    def __repr__(self) -> str:
        return f"<flaky {self._f!r}>"
