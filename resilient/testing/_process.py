"""Killing processes by PID, the way a crash or the OOM killer would."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

__all__ = ["kill_pid", "kill_worker"]


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie waiting to be reaped (it runs no more code either way)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc here: fall back to a signal-0 probe (zombies count as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    # the state letter follows the parenthesised command name, which may itself contain ')'
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


def kill_pid(
    pid: int,
    sig: int = signal.SIGKILL,
    *,
    wait: bool = True,
    timeout: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Send ``sig`` to process ``pid`` and, by default, wait until it has stopped running.

    The process is not reaped: its parent (a `subprocess.Popen`, Ray...) still collects its status.
    Use ``wait=False`` for signals that do not end a process (``SIGSTOP``, ``SIGUSR1``...).

    Args:
        pid: the process to signal.
        sig: the signal; ``SIGKILL`` by default, which the process cannot catch or clean up after.
        wait: return only once the process has exited (or is a zombie).
        timeout: seconds to wait before giving up.
        clock: monotonic clock, injectable for tests.
        sleep: sleep function, injectable for tests.

    Returns:
        True if the signal was delivered, False if no such process existed.

    Raises:
        TimeoutError: ``wait`` was set and the process still ran after ``timeout`` seconds.

    Example:
        >>> import subprocess, sys
        >>> p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        >>> kill_pid(p.pid)
        True
        >>> p.wait()
        -9
    """
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    if not wait:
        return True
    deadline = clock() + timeout
    while not _exited(pid):
        if clock() >= deadline:
            raise TimeoutError(f"process {pid} still running {timeout} s after signal {sig}")
        sleep(0.005)
    return True


def kill_worker(
    handle: Any,
    *,
    after: int = 0,
    ready: Callable[[dict], bool] = lambda actor: True,
    poll: float = 0.02,
    sleep: Callable[[float], None] = time.sleep,
) -> dict | None:
    """SIGKILL a worker actor of a running job by PID, the way a crash would, and return it.

    Waits until `after` batches are committed and the first worker actor of ``handle.actors()`` passes
    `ready` (e.g. its slot has a checkpoint), then kills it with `kill_pid`. An actor that is gone by the
    time the signal is sent (replaced, or the job ended) is not counted: it looks again.

    Args:
        handle: a `resilient.JobHandle` (anything with ``done()``, ``progress()`` and ``actors()``).
        after: committed batches to wait for.
        ready: whether this actor (a dict with ``slot``, ``pid``, ...) may be killed now.
        poll: seconds between looks.
        sleep: sleep function, injectable for tests.

    Returns:
        The killed actor's ``{"slot", "pid", ...}``, or None if the job ended first.
    """
    while not handle.done():
        actors = handle.actors()
        if actors and handle.progress()["committed"] >= after and ready(actors[0]):
            if kill_pid(actors[0]["pid"]):
                return actors[0]
        sleep(poll)
    return None
