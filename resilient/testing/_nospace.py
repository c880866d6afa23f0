"""`NoSpaceDirectory`: a directory on a tiny tmpfs, a real source of ``ENOSPC``.

Mounting needs root (or ``CAP_SYS_ADMIN``) and the ``mount`` command, as in most CI containers.
Where that is not allowed, entering the context raises `NoSpaceUnavailable`, which test suites turn
into a skip. A user-namespace mount (``unshare -Urm``) is no substitute: other processes, Ray workers
included, would not see it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from resilient.errors import ConfigError, ResilientError

__all__ = ["NoSpaceDirectory", "NoSpaceUnavailable"]


class NoSpaceUnavailable(ResilientError):
    """A size-limited tmpfs cannot be mounted here (not root, no ``mount``, not Linux...)."""


class NoSpaceDirectory:
    """A directory that holds at most ``size`` bytes: writes beyond fail with ``OSError(ENOSPC)``.

    On enter, a tmpfs of ``size`` bytes (rounded up to whole pages by the kernel) is mounted on
    ``path`` (a new temporary directory by default); on exit it is unmounted, lazily if files are
    still open, and the directory is removed if this object created it. Everything written there is
    lost on exit.

    Args:
        size: capacity in bytes, at least 1.
        path: where to mount; must be an existing empty directory. Default: a new temporary one.

    Raises:
        ConfigError: ``size`` below 1 (tmpfs would read 0 as "no limit").
        NoSpaceUnavailable: on enter, when the tmpfs cannot be mounted.

    Example:
        >>> import errno
        >>> with NoSpaceDirectory(64 * 1024) as d:  # doctest: +SKIP
        ...     try:
        ...         (d.path / "big").write_bytes(b"x" * 10**6)
        ...     except OSError as e:
        ...         print(e.errno == errno.ENOSPC)
        True
    """

    def __init__(self, size: int = 1 << 20, path: str | os.PathLike[str] | None = None) -> None:
        if size < 1:
            raise ConfigError("size", size, "a capacity in bytes >= 1")
        self.size = size
        self._given = Path(path) if path is not None else None
        self._path: Path | None = None
        self._created = False

    @property
    def path(self) -> Path:
        """The mount point (only while mounted)."""
        if self._path is None:
            raise ValueError("NoSpaceDirectory is not mounted; use it as a context manager")
        return self._path

    def __fspath__(self) -> str:
        return str(self.path)

    def __enter__(self) -> NoSpaceDirectory:
        mount = shutil.which("mount")
        if mount is None:
            raise NoSpaceUnavailable("no `mount` command on this system")
        if self._given is None:
            target = Path(tempfile.mkdtemp(prefix="resilient-nospace-"))
            self._created = True
        else:
            target = self._given
        try:
            done = subprocess.run(
                [mount, "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(target)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            self._remove_dir(target)
            raise NoSpaceUnavailable(f"cannot run mount: {e}") from e
        if done.returncode != 0:
            self._remove_dir(target)
            detail = (done.stderr or done.stdout).strip()
            raise NoSpaceUnavailable(f"cannot mount a tmpfs on {target} (exit {done.returncode}): {detail}")
        self._path = target
        return self

    def __exit__(self, *exc_info: object) -> None:
        target = self._path
        if target is None:
            return
        self._path = None
        umount = shutil.which("umount") or "umount"
        done = subprocess.run([umount, str(target)], stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if done.returncode != 0:  # busy: detach now, the kernel frees it when the last file closes
            subprocess.run([umount, "-l", str(target)], stdin=subprocess.DEVNULL, capture_output=True, check=True)
        self._remove_dir(target)

    def _remove_dir(self, target: Path) -> None:
        if self._created:
            self._created = False
            target.rmdir()

    def __repr__(self) -> str:
        where = self._path if self._path is not None else "unmounted"
        return f"NoSpaceDirectory(size={self.size}, path={where})"
