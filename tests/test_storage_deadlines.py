"""Deadlines and quorum with a dead replica: one S3 replica on an endpoint that refuses connections
(127.0.0.1:1) or on a server that accepts them and never answers (`SilentServer`), beside local ones.

Saves return once their write quorum is durable, loads do not wait on the dead replica, and `verify` and
`ls` name it unreachable. The time bounds below are liveness guards only (before these deadlines, the
same operations took from 16 s to minutes: every layer's retries multiplied); speed is measured in
`benchmarks/checkpoint_io.py`.
"""

from __future__ import annotations

import json
import threading
import time
import warnings

import fsspec
import pytest
import torch

from resilient.cli import main
from resilient.storage import CheckpointStore
from resilient.storage.replica import LocalReplica, open_backend
from resilient.testing import SilentServer
from tests.test_storage import assert_state, make_state

LIVENESS_S = 30.0
REFUSED = "http://127.0.0.1:1"


@pytest.fixture
def silent():
    with SilentServer() as server:
        yield server


def dead_s3_options(endpoint: str) -> dict:
    """Options of a user who set only the endpoint and fake credentials: resilient's SDK defaults apply."""
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-west-2"}, "skip_instance_cache": True}


def settings_for(dirs, endpoint: str) -> dict:
    return {"storage": [str(d) for d in dirs] + ["s3://dead-bucket/ckpt"],
            "storage_options": {"s3": dead_s3_options(endpoint)}}


def run_cli(*argv: str, env: dict) -> tuple[int, str]:
    import io

    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), environ=env, stdout=out, stderr=err)
    return code, out.getvalue() + err.getvalue()


def cli_env(dirs, endpoint: str) -> dict:
    return {"RESILIENT_STORAGE": ",".join([str(d) for d in dirs] + ["s3://dead-bucket/ckpt"]),
            "RESILIENT_STORAGE_OPTIONS": json.dumps({"s3": dead_s3_options(endpoint)})}


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_dead_s3_replica_does_not_stall_save_load_verify_ls(tmp_dirs, silent, endpoint):
    url = REFUSED if endpoint == "refused" else silent.url
    dirs = tmp_dirs(2)
    store = CheckpointStore(**settings_for(dirs, url))
    try:
        for step in (1, 2, 3):
            commit, took = timed(lambda: store.save("k", make_state(step)))
            assert took < LIVENESS_S
            assert len(commit.acked) == 2 and store.replicas[2].url not in commit.acked
        dead = store.health()[2]
        assert dead.degraded and "k generation 3" in dead.stale  # reported: events and metrics read this
        assert [h.degraded for h in store.health()[:2]] == [False, False]
        loaded, took = timed(lambda: store.load("k", repair=False))
        assert took < LIVENESS_S and loaded.generation == 3
        assert_state(loaded.state, 3)
        report, took = timed(store.verify)
        assert took < LIVENESS_S
        assert [u for u, _ in report.unreachable] == [store.replicas[2].url]
        dead = [p for p in report.problems if p.url == store.replicas[2].url]
        assert dead and all(p.kind == "unreachable" and "missing" not in str(p) for p in dead)
        assert report.unrecoverable == []
    finally:
        store.close()
    (code, out), took = timed(lambda: run_cli("ls", env=cli_env(dirs, url)))
    assert took < LIVENESS_S and code == 1
    assert "UNREACHABLE s3://dead-bucket/ckpt" in out and "k  generation 3" in out
    (code, out), took = timed(lambda: run_cli("verify", "--json", env=cli_env(dirs, url)))
    assert took < LIVENESS_S and code == 1
    body = json.loads(out)
    assert [u["url"] for u in body["unreachable"]] == ["s3://dead-bucket/ckpt"]
    assert not any("missing" in p["detail"] for p in body["problems"] if p["object"].startswith("s3://"))
    if endpoint == "silent":
        assert silent.accepted >= 1  # the calls did reach the server that never answers


class GatedReplica(LocalReplica):
    """A local replica whose data writes or reads wait until `gate` is set (a replica that lags)."""

    def __init__(self, root: str, url: str, *, gate_writes: bool = False, gate_reads: bool = False) -> None:
        super().__init__(root, url)
        self.gate = threading.Event()
        self.gate_writes, self.gate_reads = gate_writes, gate_reads

    def write_object(self, rel, chunks):
        if self.gate_writes and not rel.endswith("MANIFEST"):
            self.gate.wait(LIVENESS_S)  # reads the tape only after the save returned
        return super().write_object(rel, chunks)

    def read(self, rel, *, owned=False):
        if self.gate_reads and not rel.endswith("MANIFEST"):
            self.gate.wait(LIVENESS_S)
        return super().read(rel, owned=owned)


def test_lagging_replica_is_filled_in_the_background(tmp_dirs):
    dirs = [str(d) for d in tmp_dirs(3)]
    slow = GatedReplica(dirs[2], dirs[2], gate_writes=True)
    backends = [LocalReplica(d, d) for d in dirs[:2]] + [slow]
    store = CheckpointStore(storage=dirs, backends=backends)
    try:
        state = {"w": torch.rand(1_000_000).mul_(2**31).to(torch.int32), "step": 1}  # raw blocks: views of w
        expected = state["w"].clone()
        commit, took = timed(lambda: store.save("k", state))
        assert took < LIVENESS_S and commit.lagging == (dirs[2],)
        assert store.health()[2].stale == ("k generation 1",)
        state["w"].add_(100)  # the caller owns its state again once save returns
        slow.gate.set()
        deadline = time.monotonic() + LIVENESS_S
        while store.health()[2].stale and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.health()[2].stale == ()
    finally:
        store.close()
    alone = CheckpointStore(storage=[dirs[2]], write_quorum=1)  # the filled copy, read on its own
    with alone:
        assert torch.equal(alone.load("k").state["w"], expected)


def test_read_is_hedged_past_a_replica_that_does_not_answer(tmp_dirs):
    dirs = [str(d) for d in tmp_dirs(3)]
    with CheckpointStore(storage=dirs) as writer:
        writer.save("k", make_state(5))
    hung = GatedReplica(dirs[0], dirs[0], gate_reads=True)
    store = CheckpointStore(storage=dirs, backends=[hung] + [LocalReplica(d, d) for d in dirs[1:]])
    try:
        loaded, took = timed(lambda: store.load("k", repair=False))
        assert took < LIVENESS_S / 2  # well before the gate would open by itself
        assert_state(loaded.state, 5)
    finally:
        hung.gate.set()
        store.close()


def test_s3_replicas_make_one_sdk_attempt_per_call():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend = open_backend("s3://b/ckpt", {"endpoint_url": REFUSED, "skip_instance_cache": True}, "s3://b/ckpt")
    fs = backend.fs
    assert fs.retries == 1  # s3fs's own loop
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 1, "mode": "standard"}  # botocore's
    assert fs.config_kwargs["connect_timeout"] == 5 and fs.config_kwargs["read_timeout"] == 15
    mine = open_backend("s3://b/ckpt", {"endpoint_url": REFUSED, "skip_instance_cache": True,
                                        "config_kwargs": {"retries": {"total_max_attempts": 4}}}, "s3://b/ckpt")
    assert mine.fs.config_kwargs["retries"] == {"total_max_attempts": 4}  # the user's choice wins
    assert fsspec.filesystem("s3", skip_instance_cache=True).retries == 5  # the class is left alone
