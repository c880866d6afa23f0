"""The real launch path: `examples/ray_job.py` submitted with ``ray job submit`` to a cluster started
with ``ray start --head``, one worker actor SIGKILLed by PID from outside while the job runs.

The cluster is the test's own and isolated from any other Ray instance on the machine (the session's
in-process Ray, other people's test runs):

* every port it opens is chosen free (GCS, dashboard, dashboard agent, runtime-env agent, metrics,
  Ray client; worker ports are left to the OS) and the dashboard listens on 127.0.0.1 only;
* it has its own ``--temp-dir`` (a short one: Ray puts Unix sockets under it, and a pytest ``tmp_path``
  makes their paths longer than the 107 bytes a socket path may have);
* token authentication is on, with a token of the test's own: ``RAY_AUTH_MODE=token`` and
  ``RAY_AUTH_TOKEN_PATH`` pointing at a file in the temp dir. Ray reads ``RAY_AUTH_TOKEN``, then
  ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``; a user's ``~/.ray/auth_token`` is never read nor
  written (the test checks it is unchanged);
* it is started in a new session (``start_new_session=True``): all its daemons and workers keep that
  session id, and the job's driver (which Ray starts in a session of its own) descends from them. The
  test stops exactly those processes by PID — ``ray stop`` would kill every Ray process on the machine.

The job gets its configuration only through the runtime environment's ``env_vars`` (``RESILIENT_*``)
and its code through ``working_dir`` (the examples folder) and ``py_modules`` (the ``resilient``
package, about 0.5 MB): nothing depends on the checkout being on the cluster's ``PYTHONPATH``.
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from resilient.io import FileSink

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RAY = Path(sys.executable).with_name("ray")

ROWS, BATCH = 30_000, 50  # 600 batches
WORK_MS = 20  # per batch: the job runs for several seconds, so the kill lands mid-job
KILL_AFTER = 30  # committed batches seen before the kill


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free on every interface right now (held together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    state: str
    title: str


def _processes() -> dict[int, _Proc]:
    """Every process on the machine, read from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session
        out[int(entry)] = _Proc(int(entry), int(fields[1]), int(fields[3]), fields[0], title)
    return out


def _session_tree(sid: int) -> dict[int, _Proc]:
    """Live processes of session `sid` and all their descendants (zombies left out).

    The kernel keeps a session id reserved while any member lives, so no unrelated process joins it.
    """
    procs = _processes()
    tree = {p.pid: p for p in procs.values() if p.sid == sid}
    grew = True
    while grew:
        grew = False
        for p in procs.values():
            if p.pid not in tree and p.ppid in tree:
                tree[p.pid] = p
                grew = True
    return {pid: p for pid, p in tree.items() if p.state != "Z"}


def _kill_tree(sid: int, grace: float = 3.0) -> dict[int, _Proc]:
    """SIGTERM the processes of session `sid`, SIGKILL what is left after `grace` seconds; return what
    still lives after that."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in _session_tree(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session_tree(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _session_tree(sid)


@dataclass
class LocalCluster:
    """A ``ray start --head`` cluster of the test's own: free ports, own temp dir, own auth token."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    sid: int | None = None
    dashboard: str = ""

    @property
    def token(self) -> str:
        return (self.root / "auth_token").read_text()

    def start(self) -> None:
        token_file = self.root / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "RESILIENT_")) and k != "PYTHONPATH"}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        # As in an activated virtualenv: the job's `python` is this interpreter.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.env = env
        gcs, dash, agent_http, agent_grpc, runtime_env, metrics, client = _free_ports(7)
        cmd = [
            str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--ray-client-server-port", str(client), "--min-worker-port", "0", "--max-worker-port", "0",
            "--num-cpus", "2", "--temp-dir", str(self.root / "ray"), "--disable-usage-stats",
        ]
        proc = subprocess.Popen(cmd, env=env, cwd=self.root, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sid = proc.pid
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-4000:]}")
        self.dashboard = f"http://127.0.0.1:{dash}"

    def ray(self, *args: str, timeout: float = 120) -> str:
        """Run the ``ray`` CLI as a user with the cluster's token would; return its output."""
        env = dict(self.env, RAY_API_SERVER_ADDRESS=self.dashboard)
        out = subprocess.run([str(RAY), *args], env=env, cwd=self.root, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args[:2])} failed ({out.returncode}):\n{out.stderr[-4000:]}")
        return out.stdout + out.stderr

    def api(self, path: str, token: str | None = None) -> tuple[int, str]:
        """GET the dashboard's REST API, with the cluster's token unless another is given."""
        token = self.token if token is None else token
        req = urllib.request.Request(self.dashboard + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def processes(self) -> dict[int, _Proc]:
        assert self.sid is not None
        return _session_tree(self.sid)

    def stop(self) -> dict[int, _Proc]:
        """Stop this cluster's processes only (by PID); return any that survived."""
        return {} if self.sid is None else _kill_tree(self.sid)


def _home_token() -> bytes | None:
    path = Path.home() / ".ray" / "auth_token"
    return path.read_bytes() if path.exists() else None


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="rjob-", dir="/tmp"))
    home_token = _home_token()
    c = LocalCluster(root)
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"cluster processes still running: {left}"
        assert _home_token() == home_token, "~/.ray/auth_token was changed"


def _lines(logs: str, kind: str) -> list[dict]:
    return [json.loads(line[len(kind) + 1:]) for line in logs.splitlines() if line.startswith(kind + " ")]


def _job(cluster: LocalCluster, job: str) -> tuple[str, str]:
    """(status, logs) of a submitted job, read through the REST API with the token."""
    code, info = cluster.api(f"/api/jobs/{job}")
    assert code == 200, info
    code, logs = cluster.api(f"/api/jobs/{job}/logs")
    assert code == 200, logs
    return json.loads(info)["status"], json.loads(logs)["logs"]


def _count_ids(url: str) -> collections.Counter:
    ids: collections.Counter = collections.Counter()
    for _, out in FileSink(url, format="jsonl").read_all():
        ids.update(out["id"])
    return ids


@pytest.mark.slow
def test_ray_job_survives_worker_sigkill(cluster: LocalCluster, tmp_path: Path) -> None:
    # Token auth is on: the API refuses a request with no token or a wrong one.
    assert cluster.api("/api/jobs/", token="")[0] == 401
    assert cluster.api("/api/jobs/", token=secrets.token_hex(32))[0] == 403

    sink = f"file://{tmp_path}/scores"
    runtime_env = {
        "py_modules": [str(ROOT / "resilient")],
        "env_vars": {
            "RESILIENT_STORAGE": f"{tmp_path}/ckpt-a,{tmp_path}/ckpt-b",
            "RESILIENT_NUM_ACTORS": "3",
            "RESILIENT_CHECKPOINT_EVERY": "25",
        },
    }
    job = f"resilient-{secrets.token_hex(4)}"
    cluster.ray(
        "job", "submit", "--no-wait", "--submission-id", job, "--working-dir", str(EXAMPLES),
        "--runtime-env-json", json.dumps(runtime_env), "--", "python", "ray_job.py", sink, "--rows",
        str(ROWS), "--batch", str(BATCH), "--work-ms", str(WORK_MS), "--job-id", "ray-job-test",
    )

    # Wait for some committed batches, then kill a worker serving a slot (not the standby).
    victim = None
    while victim is None:
        status, logs = _job(cluster, job)
        assert status in ("PENDING", "RUNNING"), f"job {status} before the kill:\n{logs[-4000:]}"
        progress = _lines(logs, "progress")
        if progress and progress[-1]["committed"] >= KILL_AFTER:
            last = progress[-1]
            assert last["committed"] < last["total"], "the job ended before the kill"
            ours = cluster.processes()
            for actor in last["actors"]:
                p = ours.get(actor["pid"])
                # The PID the job reports is a worker actor process of this cluster.
                if p is not None and p.title.startswith("ray::Worker"):
                    victim = p
                    break
        time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)

    while (state := _job(cluster, job))[0] in ("PENDING", "RUNNING"):
        time.sleep(0.5)
    status, logs = state
    assert status == "SUCCEEDED", logs[-4000:]
    assert victim.pid not in cluster.processes()
    result = _lines(logs, "result")[-1]
    assert result["restarts"] >= 1, result
    assert result["dead_letters"] == [] and result["committed"] == result["total"] == ROWS // BATCH

    ids = _count_ids(sink)
    assert sorted(ids) == list(range(ROWS)) and set(ids.values()) == {1}
    # The settings came from the runtime environment: three slots, checkpoints on both replicas.
    assert max(len(p["actors"]) for p in _lines(logs, "progress")) == 3
    for replica in ("ckpt-a", "ckpt-b"):
        assert (tmp_path / replica / "ray-job-test" / "slot-2").is_dir()
    # The CLI sees the same job with the same token.
    assert f"Job '{job}' succeeded" in re.sub(r"\x1b\[[0-9;]*m", "", cluster.ray("job", "status", job))


@pytest.mark.slow
def test_same_script_runs_with_plain_python(tmp_path: Path) -> None:
    """No cluster given: `run()` starts a local Ray for the script and it goes away with the script."""
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RESILIENT_"))}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), PYTHONPATH=str(ROOT),
        RESILIENT_STORAGE=f"{tmp_path}/ckpt-a,{tmp_path}/ckpt-b", RESILIENT_NUM_ACTORS="1",
        RESILIENT_STANDBY="0",
    )
    sink = f"file://{tmp_path}/scores"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "ray_job.py"), sink, "--rows", "1000", "--batch", "100"],
        env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    home_token = _home_token()
    try:
        out, _ = proc.communicate(timeout=180)
        # Ray shuts the local instance down as the script exits; give its processes time to go.
        deadline = time.monotonic() + 30
        while _session_tree(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _session_tree(proc.pid)
    finally:
        _kill_tree(proc.pid, grace=0.5)
    assert proc.returncode == 0, out[-4000:]
    assert _home_token() == home_token, "~/.ray/auth_token was changed"
    result = _lines(out, "result")[-1]
    assert result["committed"] == result["total"] == 10 and result["dead_letters"] == []
    ids = _count_ids(sink)
    assert sorted(ids) == list(range(1000)) and set(ids.values()) == {1}
    assert not left, f"the script's local Ray left processes behind: {left}"


@pytest.mark.slow
def test_ray_job_stop_stops_gracefully_and_a_resubmission_resumes(cluster: LocalCluster, tmp_path: Path) -> None:
    """`ray job stop` sends the driver SIGTERM: it commits what answered, saves the slots and the progress
    within RESILIENT_STOP_TIMEOUT_SECONDS (under Ray's 3 s before SIGKILL), and says how to resume; the
    same submission again finishes the job, every row once."""
    sink = f"file://{tmp_path}/scores"
    runtime_env = {"py_modules": [str(ROOT / "resilient")],
                   "env_vars": {"RESILIENT_STORAGE": f"{tmp_path}/ckpt-a,{tmp_path}/ckpt-b",
                                "RESILIENT_CHECKPOINT_EVERY": "25"}}

    def submit(job: str) -> None:
        cluster.ray("job", "submit", "--no-wait", "--submission-id", job, "--working-dir", str(EXAMPLES),
                    "--runtime-env-json", json.dumps(runtime_env), "--", "python", "ray_job.py", sink, "--rows",
                    str(ROWS), "--batch", str(BATCH), "--work-ms", str(WORK_MS), "--job-id", "ray-job-stop")

    first = f"resilient-{secrets.token_hex(4)}"
    submit(first)
    while True:
        status, logs = _job(cluster, first)
        assert status in ("PENDING", "RUNNING"), logs[-4000:]
        progress = _lines(logs, "progress")
        if progress and progress[-1]["committed"] >= KILL_AFTER:
            assert progress[-1]["committed"] < progress[-1]["total"], "the job ended before the stop"
            break
        time.sleep(0.3)
    t0 = time.monotonic()
    cluster.ray("job", "stop", first)
    while (state := _job(cluster, first))[0] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        time.sleep(0.2)
    status, logs = state
    assert status == "STOPPED" and time.monotonic() - t0 < 30, logs[-4000:]
    assert "JobStoppedError" in logs and "the driver received SIGTERM" in logs and "To resume" in logs, logs[-4000:]
    stopped_at = sum(_count_ids(sink).values()) // BATCH
    assert KILL_AFTER <= stopped_at < ROWS // BATCH

    second = f"resilient-{secrets.token_hex(4)}"
    submit(second)
    while (state := _job(cluster, second))[0] in ("PENDING", "RUNNING"):
        time.sleep(0.5)
    status, logs = state
    assert status == "SUCCEEDED", logs[-4000:]
    result = _lines(logs, "result")[-1]
    assert result["resumed_from"] >= stopped_at - 64 and result["committed"] == result["total"]
    ids = _count_ids(sink)
    assert sorted(ids) == list(range(ROWS)) and set(ids.values()) == {1}
