"""Processes the tests run and kill: drivers, writers, clusters. `run_driver` runs one of the driver modules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def run_driver(module: str, args: list[str], *, signal_after: int | None,
               sig: int = signal.SIGKILL) -> tuple[int, list[str], str, float]:
    """Run ``python -m <module> *args``; once it prints ``committed <n>`` with ``n >= signal_after``, send it
    `sig` (SIGKILL: stop reading there). Returns its exit status, its stdout lines, its stderr, and the
    seconds from the signal to its exit (0.0 when none was sent)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # at call time: Ray's auth settings are in it by then
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty stderr never blocks it
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        lines: list[str] = []
        sent = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.strip())
                if signal_after is not None and sent is None and line.startswith("committed"):
                    if int(line.split()[1]) >= signal_after:
                        sent = time.monotonic()
                        os.kill(proc.pid, sig)
                        if sig == signal.SIGKILL:
                            break
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return proc.returncode, lines, err.read(), (time.monotonic() - sent if sent is not None else 0.0)
