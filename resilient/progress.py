"""A one-line progress display for a running job, redrawn in place on a terminal.

`ProgressReporter` runs a daemon thread that, every ``interval`` seconds, calls a ``progress()``
callable (`resilient.JobHandle.progress`), renders one line with `format_line` and writes it to a
stream (standard error by default) after a carriage return, padded so a shorter line covers a longer
one. `stop()` draws the line a last time, with an optional note ("done", "failed: ..."), and ends it with
a newline. Failures and recoveries are logged by the supervisor (``logging``), not shown here.

It shows itself only where a person watches: the stream is a terminal and the ``CI`` environment
variable is unset or empty. ``enabled=True`` or ``False`` overrides that rule. The stream, the
environment and the clock are arguments, so tests pass fakes.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> p = {"job_id": "j", "committed": 5, "total": 10, "rate_per_s": 2.5, "restarts": 0,
    ...      "retries": 1, "dead_letters": 0}
    >>> r = ProgressReporter(lambda: p, stream=out, enabled=True)
    >>> r.stop(note="done")
    >>> out.getvalue()
    '\\rj: 5/10 batches (50.0%) | 2.5/s | ETA 2s | restarts 0 | retries 1 | dead letters 0 | done\\n'
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

__all__ = ["ProgressReporter", "format_duration", "format_line", "should_show"]


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_line(progress: Mapping[str, Any], note: str = "") -> str:
    """One line of progress: done/total (%), rate, ETA, restarts, retries, dead letters [, note].

    Done counts the batches of this run (``committed``) plus those already done when it started
    (``resumed``, when given). The ETA is left out while the rate is 0 or the total unknown.
    """
    done = int(progress.get("committed", 0)) + int(progress.get("resumed", 0) or 0)
    total = progress.get("total")
    rate = float(progress.get("rate_per_s") or 0.0)
    parts = []
    if total:
        parts.append(f"{done}/{total} batches ({100.0 * done / total:.1f}%)")
    else:
        parts.append(f"{done} batches")
    parts.append(f"{rate:.1f}/s")
    if total and rate > 0 and done < total:
        parts.append(f"ETA {format_duration((total - done) / rate)}")
    parts.append(f"restarts {progress.get('restarts', 0)}")
    parts.append(f"retries {progress.get('retries', 0)}")
    parts.append(f"dead letters {progress.get('dead_letters', 0)}")
    if note:
        parts.append(note)
    head = f"{progress['job_id']}: " if progress.get("job_id") else ""
    return head + " | ".join(parts)


def should_show(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True where a person watches: `stream` is a terminal and ``CI`` is unset or empty."""
    if environ.get("CI"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressReporter:
    """Redraws a job's progress line every `interval` seconds until stopped.

    Args:
        progress: returns the job's progress (`JobHandle.progress`'s fields).
        stream: where to draw (default: ``sys.stderr`` at construction).
        environ: the environment the ``CI`` rule reads (default: ``os.environ``).
        enabled: True or False to force; None: `should_show`.
        interval: seconds between redraws.
    """

    def __init__(
        self,
        progress: Callable[[], Mapping[str, Any]],
        *,
        stream: TextIO | None = None,
        environ: Mapping[str, str] | None = None,
        enabled: bool | None = None,
        interval: float = 0.5,
    ) -> None:
        self._progress = progress
        self.stream = stream if stream is not None else sys.stderr
        environ = os.environ if environ is None else environ
        self.enabled = should_show(self.stream, environ) if enabled is None else bool(enabled)
        self.interval = interval
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._width = 0

    def start(self) -> "ProgressReporter":
        """Start redrawing (nothing when disabled or already stopped); returns self."""
        with self._lock:
            if self.enabled and not self._stopped and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="resilient-progress", daemon=True)
                self._thread.start()
        return self

    def render(self, note: str = "") -> str:
        """Draw the line once (when enabled) and return it."""
        line = format_line(self._progress(), note)
        if self.enabled:
            with self._lock:
                pad = max(0, self._width - len(line))
                self._width = len(line)
                self.stream.write("\r" + line + " " * pad)
                self.stream.flush()
        return line

    def stop(self, note: str = "") -> None:
        """Stop redrawing, draw the line a last time with `note` and end it; later calls do nothing."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self.enabled:
            try:
                self.render(note)
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):  # the stream went away: nothing left to show
                pass

    def _loop(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                self.render()
            except Exception:  # noqa: BLE001 - a display must never disturb the job: stop drawing
                return

    def __enter__(self) -> "ProgressReporter":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
