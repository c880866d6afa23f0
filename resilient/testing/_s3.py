"""`S3Server`: a real S3-protocol server (moto) in its own process on 127.0.0.1.

A separate process, not an in-process mock, so that tests can kill it (``SIGKILL`` by PID) in the
middle of a write and watch the client fail the way it would against a lost endpoint.

Facts the options below rely on (s3fs 2026.9 / aiobotocore 3.10):

* A dead endpoint raises ``botocore.exceptions.EndpointConnectionError`` (not an ``OSError``),
  chained to aiohttp's ``ClientConnectorError`` and ``ConnectionRefusedError``. s3fs does not retry
  it itself; botocore does, by its ``retries`` config (5 attempts with back-off by default, about
  4 s). `S3Server.storage_options` allow a single attempt, so a call fails within about a second.
* s3fs's own retry count for errors it considers retryable (timeouts, dropped connections) is the
  class attribute ``S3FileSystem.retries`` (5); it is not a constructor option.
* A conditional create (``pipe_file(..., mode="create")`` or ``open(..., "xb")``) sends
  ``If-None-Match: *``; when the key exists, s3fs raises ``FileExistsError`` caused by the
  ``PreconditionFailed`` ``ClientError``.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from typing import IO, Any

from resilient.errors import ResilientError
from resilient.testing._process import kill_pid

__all__ = ["S3Server", "S3ServerError"]

HOST = "127.0.0.1"
_KEY = "testing"  # moto accepts any credentials; these are not secrets
# Not us-east-1: s3fs `mkdir` sends the client region as LocationConstraint, which S3 (and moto)
# refuse for us-east-1.
_REGION = "us-west-2"


class S3ServerError(ResilientError):
    """The S3 test server did not start, or was used while not started."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _server_environment(environ: dict[str, str]) -> dict[str, str]:
    """The server's environment: no AWS settings of this machine, fixed fake credentials."""
    env = {k: v for k, v in environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=_KEY,
        AWS_SECRET_ACCESS_KEY=_KEY,
        AWS_DEFAULT_REGION=_REGION,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


def _stop_process(proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reap; close the log. Safe to call twice."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


class S3Server:
    """A moto S3 server in a child process, listening on 127.0.0.1 only.

    Use it as a context manager, or call `start` and `stop`. moto keeps everything in memory: a
    `restart` (or `kill` and `start`) comes back on the same port with **no buckets or objects**.
    A server that is never stopped is terminated when this object is garbage collected or the
    interpreter exits.

    Args:
        port: port to listen on; default: a free one chosen at `start`.
        start_timeout: seconds `start` waits for the server to answer.
        python: interpreter that runs ``-m moto.server``; default: ``sys.executable``.

    Example:
        >>> import fsspec
        >>> with S3Server() as server:  # doctest: +SKIP
        ...     url = server.create_bucket("demo")
        ...     fs = fsspec.filesystem("s3", **server.storage_options)
        ...     fs.pipe_file(f"{url}/a", b"x")
        ...     fs.cat_file(f"{url}/a")
        b'x'
    """

    def __init__(self, *, port: int | None = None, start_timeout: float = 30.0, python: str | None = None) -> None:
        self._fixed_port = port
        self._port: int | None = port
        self.start_timeout = start_timeout
        self._python = python or sys.executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._fs: Any = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> S3Server:
        """Start the server and wait until it answers HTTP requests; a no-op if it is running.

        Raises:
            S3ServerError: the process exited, or did not answer within ``start_timeout``.
        """
        if self.running:
            return self
        self._reap()
        attempts_left = 1 if self._port is not None else 3  # an auto-picked port can be taken meanwhile
        while True:
            try:
                self._launch(self._port if self._port is not None else _free_port())
                return self
            except S3ServerError:
                attempts_left -= 1
                if attempts_left == 0:
                    raise

    def _launch(self, port: int) -> None:
        log = tempfile.TemporaryFile(prefix="resilient-moto-")
        proc = subprocess.Popen(
            [self._python, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_environment(dict(os.environ)),
        )
        self._proc, self._log, self._port = proc, log, port
        self._finalizer = weakref.finalize(self, _stop_process, proc, log, 5.0)
        deadline = time.monotonic() + self.start_timeout
        while not self._answers(port):
            if proc.poll() is not None or time.monotonic() >= deadline:
                output = self._log_tail()
                self._reap()
                if self._fixed_port is None:
                    self._port = None
                raise S3ServerError(f"moto server on {HOST}:{port} did not come up; its output:\n{output}")
            time.sleep(0.05)

    @staticmethod
    def _answers(port: int) -> bool:
        conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def _log_tail(self, limit: int = 4000) -> str:
        if self._log is None or self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:]

    def _reap(self) -> None:
        """Forget the current process (stopping it if still alive)."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_process once
            self._finalizer = None
        self._proc = None
        self._log = None
        self._fs = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds. A no-op if not started."""
        if self._proc is not None and self._log is not None and self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
            _stop_process(self._proc, self._log, timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server by PID, as a crash would, and reap it; the endpoint stays reserved.

        Requests in flight are cut; later requests find nothing listening. `start` or `restart`
        brings up an empty server on the same port.
        """
        if self._proc is None:
            raise S3ServerError("kill() on an S3Server that was not started")
        kill_pid(self._proc.pid)
        self._proc.wait()
        self._reap()

    def restart(self) -> S3Server:
        """Stop (if running) and start again on the same port. moto loses all its data."""
        self.stop()
        return self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- properties -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """PID of the server process, while it runs."""
        if self._proc is None:
            raise S3ServerError("the S3Server is not running")
        return self._proc.pid

    @property
    def port(self) -> int:
        """The port; kept across `kill`, `stop` and `restart`."""
        if self._port is None:
            raise S3ServerError("the S3Server has no port yet; call start()")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{HOST}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (a new dict on each access).

        Explicit fake credentials and region (nothing read from this machine's AWS configuration
        except what botocore always reads), path-style addressing, short timeouts, a single
        attempt per request so that a dead server surfaces within about a second instead of after
        botocore's back-off, and no listings cache so that every process sees the server's state.
        """
        return {
            "endpoint_url": self.endpoint_url,
            "key": _KEY,
            "secret": _KEY,
            "client_kwargs": {"region_name": _REGION},
            "config_kwargs": {
                "connect_timeout": 2,
                "read_timeout": 10,
                "retries": {"max_attempts": 1, "mode": "standard"},
                "s3": {"addressing_style": "path"},
            },
            "use_listings_cache": False,
        }

    # -- helpers --------------------------------------------------------------------------------

    def filesystem(self, **overrides: Any) -> Any:
        """A new, uncached ``s3fs.S3FileSystem`` for this server (``storage_options`` + overrides)."""
        import s3fs  # optional dependency: the ``s3`` extra

        return s3fs.S3FileSystem(**{**self.storage_options, **overrides}, skip_instance_cache=True)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its URL, ``s3://<name>``.

        Raises:
            FileExistsError: the bucket exists already.
        """
        if not self.running:
            raise S3ServerError("create_bucket() on an S3Server that is not running")
        if self._fs is None:
            self._fs = self.filesystem()
        try:
            self._fs.mkdir(name)
        except FileExistsError as e:
            raise FileExistsError(f"bucket {name!r} exists already") from e
        return f"s3://{name}"

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self.running and self._proc is not None else "stopped"
        where = self.endpoint_url if self._port is not None else "no port"
        return f"S3Server({where}, {state})"
