"""The fault fakes in `resilient.testing`, checked against real parts: moto, local files, tmpfs."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

import resilient.testing
from resilient.errors import ConfigError, ResilientError
from resilient.testing import (
    FlakyFileSystem,
    NoSpaceDirectory,
    NoSpaceUnavailable,
    S3Server,
    S3ServerError,
    kill_pid,
    kill_worker,
)


def _chain(exc: BaseException | None) -> list[BaseException]:
    """The exception and everything it was raised from or during."""
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return out


def _s3(storage_options: dict) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", skip_instance_cache=True, **storage_options)


def test_public_names_are_pinned_and_sorted():
    expected = [
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
    assert resilient.testing.__all__ == expected
    for name in expected:
        assert getattr(resilient.testing, name).__module__.startswith("resilient.testing")
    assert issubclass(resilient.testing.S3ServerError, ResilientError)
    assert issubclass(NoSpaceUnavailable, ResilientError)


# -- S3Server ---------------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as /proc shows them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_s3_server_writes_and_reads_on_loopback_only(s3_server, s3_bucket):
    fs = _s3(s3_bucket.storage_options)
    fs.pipe_file(f"{s3_bucket.url}/a/b.bin", b"payload")
    assert fs.cat_file(f"{s3_bucket.url}/a/b.bin") == b"payload"
    assert fs.ls(f"{s3_bucket.url}/a", detail=False) == [f"{s3_bucket.url[5:]}/a/b.bin"]
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.port}"
    if Path("/proc/net/tcp").exists():
        assert _listening_addresses(s3_server.port) == {"0100007F"}  # 127.0.0.1 only


def test_s3_buckets_are_fresh_and_unique(s3_server, s3_bucket):
    fs = _s3(s3_bucket.storage_options)
    assert fs.ls(s3_bucket.url) == []
    with pytest.raises(FileExistsError):
        s3_server.create_bucket(s3_bucket.url[len("s3://") :])


def test_s3_conditional_create_conflict_is_file_exists(s3_bucket):
    from botocore.exceptions import ClientError

    fs = _s3(s3_bucket.storage_options)
    path = f"{s3_bucket.url}/commit"
    fs.pipe_file(path, b"first", mode="create")
    with pytest.raises(FileExistsError) as by_pipe:
        fs.pipe_file(path, b"second", mode="create")
    with pytest.raises(FileExistsError):
        with fs.open(path, "xb") as f:  # the conditional PUT happens on close
            f.write(b"third")
    assert fs.cat_file(path) == b"first"
    cause = by_pipe.value.__cause__
    assert isinstance(cause, ClientError)
    assert cause.response["Error"]["Code"] == "PreconditionFailed"


@pytest.mark.timeout(30)  # the bound: storage_options make a dead endpoint fail in about a second
def test_s3_killed_server_fails_puts_then_restarts_empty(s3_server_private):
    from botocore.exceptions import EndpointConnectionError

    server = s3_server_private
    url = server.create_bucket("victim")
    fs = _s3(server.storage_options)
    fs.pipe_file(f"{url}/before", b"x")
    pid = server.pid

    server.kill()

    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    with pytest.raises(EndpointConnectionError) as info:
        fs.pipe_file(f"{url}/after", b"y")
    assert not isinstance(info.value, OSError)  # a botocore error, not an OSError
    assert any(isinstance(e, ConnectionRefusedError) for e in _chain(info.value))

    server.restart()  # same port, no data
    assert server.pid != pid
    assert _s3(server.storage_options).ls("") == []


def test_s3_server_stop_terminates_process():
    server = S3Server().start()
    pid = server.pid
    server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # idempotent


def test_s3_server_reports_a_port_it_cannot_bind():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = S3Server(port=busy.getsockname()[1])
        with pytest.raises(S3ServerError, match="did not come up"):
            server.start()
    assert not server.running


def test_s3_cut_upload_commits_nothing(s3_bucket):
    fs = _s3(s3_bucket.storage_options)
    flaky = FlakyFileSystem(fs, fail_after_write_bytes=10)
    path = f"{s3_bucket.url}/cut"
    with pytest.raises(ConnectionResetError):
        with flaky.open(path, "wb") as f:
            f.write(b"a" * 6)
            f.write(b"b" * 6)
    assert not fs.exists(path)
    assert flaky.failures == {"write": 1}


# -- FlakyFileSystem --------------------------------------------------------------------------------


def _pipe_many(fs, root: Path, n: int) -> list[int]:
    failed = []
    for i in range(n):
        try:
            fs.pipe_file(str(root / f"{i:04d}"), b"x")
        except ConnectionResetError as e:
            assert e.errno == errno.ECONNRESET
            failed.append(i)
    return failed


def test_flaky_fails_a_seeded_fraction_exactly(tmp_path):
    flaky = FlakyFileSystem(LocalFileSystem(), rate=0.25, seed=1234)
    failed = _pipe_many(flaky, tmp_path, 400)

    assert flaky.calls == {"pipe_file": 400}
    assert flaky.failures == {"pipe_file": len(failed)}
    # pinned for seed 1234: random.Random's sequence is stable across Python versions
    assert len(failed) == 93
    assert failed[:5] == [2, 7, 9, 10, 15]
    assert 0.15 * 400 < len(failed) < 0.35 * 400
    # every call is accounted for exactly once: written iff it did not fail
    written = sorted(int(p.name) for p in tmp_path.iterdir())
    assert written == sorted(set(range(400)) - set(failed))


def test_flaky_same_seed_same_failures(tmp_dirs):
    a, b, c = tmp_dirs(3)
    first = _pipe_many(FlakyFileSystem(LocalFileSystem(), rate=0.3, seed=7), a, 200)
    again = _pipe_many(FlakyFileSystem(LocalFileSystem(), rate=0.3, seed=7), b, 200)
    other = _pipe_many(FlakyFileSystem(LocalFileSystem(), rate=0.3, seed=8), c, 200)
    assert first == again
    assert first != other


def test_flaky_delegates_when_not_failing(tmp_path):
    local = LocalFileSystem()
    flaky = FlakyFileSystem(local, rate=0.0)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")

    flaky.pipe_file(src, b"hello")
    assert flaky.cat_file(src) == b"hello"
    assert flaky.cat_file(src, start=1, end=3) == b"el"
    assert flaky.info(src) == local.info(src)
    assert flaky.exists(src) and not flaky.exists(dst)
    flaky.mv(src, dst)
    assert flaky.ls(str(tmp_path), detail=False) == [dst]
    with flaky.open(dst, "ab") as f:
        f.write(b" world")
    with flaky.open(dst, "rb") as f:
        assert f.read() == b"hello world"
    assert flaky.read_text(dst) == "hello world"  # base-class helper, through the wrapper's open
    assert flaky.islink(dst) is False  # a LocalFileSystem extra, forwarded uncounted
    flaky.rm(dst)
    assert not local.exists(dst)

    assert flaky.failures == {}
    assert flaky.calls == {
        "pipe_file": 1,
        "cat_file": 2,
        "info": 1,
        "exists": 2,
        "mv": 1,
        "ls": 1,
        "open": 3,
        "write": 1,
        "close": 3,
        "read": 2,
        "rm": 1,
    }


def test_flaky_fail_next_is_exact_and_typed(tmp_path):
    flaky = FlakyFileSystem(LocalFileSystem(), rate=0.0)
    path = str(tmp_path / "f")
    flaky.pipe_file(path, b"v")
    flaky.fail_next(2, TimeoutError, methods={"cat_file"})

    assert flaky.ls(str(tmp_path), detail=False) == [path]  # other operations unaffected
    for _ in range(2):
        with pytest.raises(TimeoutError, match="cat_file"):
            flaky.cat_file(path)
    assert flaky.cat_file(path) == b"v"
    assert flaky.failures == {"cat_file": 2}
    assert flaky.calls["cat_file"] == 3


def test_flaky_error_may_be_a_factory(tmp_path):
    flaky = FlakyFileSystem(LocalFileSystem(), rate=1.0, methods={"info"}, error=lambda op: OSError(errno.EIO, op))
    with pytest.raises(OSError) as info:
        flaky.info(str(tmp_path))
    assert info.value.errno == errno.EIO and info.value.strerror == "info"


def test_flaky_file_write_failure_keeps_file_usable(tmp_path):
    path = str(tmp_path / "f")
    flaky = FlakyFileSystem(LocalFileSystem(), rate=1.0, methods={"write"})
    with flaky.open(path, "wb") as f:
        with pytest.raises(ConnectionResetError):
            f.write(b"lost")
        flaky.rate = 0.0
        f.write(b"kept")
    assert Path(path).read_bytes() == b"kept"
    assert flaky.failures == {"write": 1}


def test_flaky_close_failure_abandons_the_file(tmp_path):
    path = str(tmp_path / "f")
    flaky = FlakyFileSystem(LocalFileSystem(), rate=0.0)
    f = flaky.open(path, "wb")
    f.write(b"abc")
    flaky.fail_next(1, methods={"close"})
    with pytest.raises(ConnectionResetError):
        f.close()
    assert f.closed
    f.close()  # no second failure, no error
    assert flaky.failures == {"close": 1}
    assert Path(path).read_bytes() == b"abc"  # local files keep what was written


def test_flaky_partial_write_cuts_after_n_bytes(tmp_path):
    path = str(tmp_path / "f")
    flaky = FlakyFileSystem(LocalFileSystem(), fail_after_write_bytes=10)
    with pytest.raises(ConnectionResetError):
        with flaky.open(path, "wb") as f:
            assert f.write(b"x" * 6) == 6
            f.write(b"y" * 6)
    assert Path(path).read_bytes() == b"x" * 6 + b"y" * 4  # a truncated local file
    assert f.written == 10
    with pytest.raises(ValueError):
        f.write(b"z")
    assert flaky.failures == {"write": 1}


def test_flaky_rejects_bad_options():
    with pytest.raises(ConfigError, match="rate"):
        FlakyFileSystem(LocalFileSystem(), rate=1.5)
    with pytest.raises(ConfigError, match="methods"):
        FlakyFileSystem(LocalFileSystem(), methods={"pipe_file", "teleport"})
    with pytest.raises(ConfigError, match="fail_after_write_bytes"):
        FlakyFileSystem(LocalFileSystem(), fail_after_write_bytes=-1)


def test_flaky_pickles_with_fresh_counters_and_random_state(tmp_path):
    path = str(tmp_path / "f")
    LocalFileSystem().pipe_file(path, b"1")
    flaky = FlakyFileSystem(LocalFileSystem(), rate=0.5, seed=3, methods={"cat_file"})
    _cat_many(flaky, path, 5)  # advance the original's random state
    clone = pickle.loads(pickle.dumps(flaky))
    assert (clone.rate, clone.seed, clone.methods) == (0.5, 3, frozenset({"cat_file"}))
    assert clone.calls == {}
    fresh = FlakyFileSystem(LocalFileSystem(), rate=0.5, seed=3, methods={"cat_file"})
    assert _cat_many(clone, path, 30) == _cat_many(fresh, path, 30)


def _cat_many(fs, path: str, n: int) -> list[bool]:
    outcomes = []
    for _ in range(n):
        try:
            outcomes.append(fs.cat_file(path) == b"1")
        except ConnectionResetError:
            outcomes.append(False)
    return outcomes


# -- NoSpaceDirectory -------------------------------------------------------------------------------


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def test_no_space_directory_raises_enospc(no_space_dir):
    target = no_space_dir.path / "big"
    assert _mounted(no_space_dir.path)
    with pytest.raises(OSError) as info:
        with open(target, "wb") as f:
            f.write(b"\0" * (2 * no_space_dir.size))
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as through_fsspec:
        LocalFileSystem().pipe_file(str(no_space_dir.path / "big2"), b"\0" * (2 * no_space_dir.size))
    assert through_fsspec.value.errno == errno.ENOSPC


def test_no_space_directory_unmounts_and_cleans_up():
    directory = NoSpaceDirectory(64 * 1024)
    try:
        directory.__enter__()
    except NoSpaceUnavailable as e:
        pytest.skip(str(e))
    path = directory.path
    held = open(path / "open-file", "wb")  # a busy mount still goes away (lazily)
    try:
        directory.__exit__(None, None, None)
    finally:
        held.close()
    assert not _mounted(path)
    assert not path.exists()
    with pytest.raises(ConfigError):
        NoSpaceDirectory(0)


# -- kill_pid ---------------------------------------------------------------------------------------


def test_kill_pid_kills_and_reports_missing_processes():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert kill_pid(proc.pid) is True
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert kill_pid(proc.pid) is False  # reaped: no such process


class _Job:
    """What `kill_worker` reads of a job handle: a fake job over real processes, committing one batch a look."""

    def __init__(self, procs: list[subprocess.Popen], total: int) -> None:
        self.procs, self.total, self.looks = procs, total, 0

    def done(self) -> bool:
        return self.looks >= self.total

    def progress(self) -> dict:
        self.looks += 1
        return {"committed": self.looks}

    def actors(self) -> list[dict]:
        return [{"slot": i, "pid": p.pid} for i, p in enumerate(self.procs) if p.poll() is None]


def test_kill_worker_waits_for_progress_and_readiness_then_kills_by_pid():
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        job = _Job(procs, total=100)
        asked = []
        victim = kill_worker(job, after=5, ready=lambda a: asked.append(a["slot"]) or len(asked) >= 3,
                             sleep=lambda s: None)
        assert victim == {"slot": 0, "pid": procs[0].pid} and job.looks >= 7 and asked == [0, 0, 0]
        assert procs[0].wait(timeout=10) == -signal.SIGKILL and procs[1].poll() is None
        assert kill_worker(_Job(procs[1:], total=3), after=10, sleep=lambda s: None) is None  # the job ended
        assert procs[1].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_kill_pid_times_out_on_a_survivor():
    now = [0.0]
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(TimeoutError):
            # signal 0 delivers nothing: the process survives; the fake clock makes the wait instant
            kill_pid(proc.pid, 0, timeout=1.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    finally:
        proc.kill()
        proc.wait()
