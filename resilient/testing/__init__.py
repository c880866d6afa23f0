"""Fault fakes for testing code that uses `resilient`, or `resilient` itself.

Real parts where possible, small counting objects where not:

* `S3Server`: a moto S3 server in its own process on 127.0.0.1 that a test can kill by PID.
* `FlakyFileSystem`: wraps any fsspec filesystem; a seeded fraction of calls (and of file reads,
  writes, flushes, closes) raise a transient error; uploads can be cut after N bytes.
* `SilentServer`: a TCP server on 127.0.0.1 that accepts connections and never answers (a hung endpoint).
* `NoSpaceDirectory`: a tiny tmpfs mount, a real ``ENOSPC`` source (needs root).
* `kill_pid`: ``SIGKILL`` a process by PID and wait until it is gone.
* `kill_worker`: ``SIGKILL`` a worker actor of a running job by PID, once it has made some progress.
* `announce_preemption`: mark a Ray node draining with reason PREEMPTION and a deadline.

Example:
    >>> import fsspec
    >>> from resilient.testing import FlakyFileSystem
    >>> fs = FlakyFileSystem(fsspec.filesystem("memory"), rate=0.5, seed=1)
    >>> outcomes = []
    >>> for i in range(4):
    ...     try:
    ...         fs.pipe_file(f"/flaky-doc/{i}", b"x")
    ...         outcomes.append("ok")
    ...     except ConnectionResetError:
    ...         outcomes.append("reset")
    >>> fs.calls["pipe_file"], fs.failures["pipe_file"] == outcomes.count("reset")
    (4, True)

``S3Server.filesystem`` needs s3fs (the ``s3`` extra); nothing here imports it until then.
"""

from __future__ import annotations

from resilient.testing._drain import announce_preemption
from resilient.testing._flaky import FlakyFileSystem
from resilient.testing._nospace import NoSpaceDirectory, NoSpaceUnavailable
from resilient.testing._process import kill_pid, kill_worker
from resilient.testing._s3 import S3Server, S3ServerError
from resilient.testing._silent import SilentServer

__all__ = [
    "FlakyFileSystem",
    "NoSpaceDirectory",
    "NoSpaceUnavailable",
    "S3Server",
    "S3ServerError",
    "SilentServer",
    "announce_preemption",
    "kill_pid",
    "kill_worker",
]
