"""Real faults under a store of mixed replicas: a real S3 server (moto, on 127.0.0.1) beside local
directories, a server killed mid-write, 30% of storage calls failing, a full disk."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from resilient.errors import QuorumError
from resilient.storage import CheckpointStore
from resilient.storage.replica import FsspecReplica
from resilient.testing import FlakyFileSystem
from tests.test_storage import assert_state, make_state

FAST_RETRY = {"retry_attempts": 3, "retry_backoff_seconds": 0.01, "retry_backoff_max_seconds": 0.05}


def mixed_store(local_dirs, bucket, mode="replicate", **kw) -> CheckpointStore:
    urls = [str(d) for d in local_dirs] + [f"{bucket.url}/ckpt"]
    return CheckpointStore(
        storage=urls, redundancy=mode, storage_options={"s3": bucket.storage_options}, **{**FAST_RETRY, **kw}
    )


def s3_objects(bucket, server) -> list[str]:
    fs = server.filesystem()
    return [p for p in fs.find(bucket.url) if "/ckpt/" in p]


@pytest.mark.parametrize("mode", ["replicate", "parity"])
def test_mixed_local_and_s3_replicas_survive_losing_the_s3_copy(tmp_dirs, s3_bucket, s3_server, mode):
    with mixed_store(tmp_dirs(2), s3_bucket, mode) as store:
        store.save("job/slot-1", make_state(1))
        store.save("job/slot-1", make_state(2))
        objects = s3_objects(s3_bucket, s3_server)
        assert any(p.endswith("g00000000000000000002/MANIFEST") for p in objects)
        fs = s3_server.filesystem()
        for p in objects:
            if "g00000000000000000002" in p:
                fs.rm(p)
        loaded = store.load("job/slot-1")
        assert loaded.generation == 2
        assert_state(loaded.state, 2)
        assert any(r.startswith("s3://") for r in loaded.repaired)
        assert store.verify("job/slot-1").ok


def test_s3_server_killed_mid_write_commits_on_the_local_quorum(tmp_dirs, s3_server_private):
    server = s3_server_private
    bucket_url = server.create_bucket("killed")

    class B:
        url = bucket_url
        storage_options = server.storage_options

    big = {"w": torch.randn(6_000_000), "step": 1}  # 24 MB: a few hundred ms into moto
    with mixed_store(tmp_dirs(2), B, retry_max_seconds=5) as store:
        store.save("k", {"w": torch.zeros(4), "step": 0})  # a first generation everywhere
        killer = threading.Timer(0.05, server.kill)
        killer.start()
        commit = store.save("k", big)
        killer.join()
        assert commit.generation == 2 and len(commit.acked) == 2
        assert [u for u in commit.failed] == [store.replicas[2].url]
        health = store.health()[2]  # the save did not wait for the dead endpoint: stale, reported degraded
        assert health.degraded and health.stale == ("k generation 2",) and health.last_error
        loaded = store.load("k", repair=False)
        assert loaded.generation == 2 and torch.equal(loaded.state["w"], big["w"])


def test_thirty_percent_of_storage_calls_failing_transiently(tmp_path):
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    flaky = [FlakyFileSystem(LocalFileSystem(), rate=0.3, seed=i) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no conditional create on a wrapped local fs
        backends = [FsspecReplica(fs, str(d), f"flaky://{d}") for fs, d in zip(flaky, dirs)]
    sleeps: list[float] = []
    store = CheckpointStore(
        storage=[str(d) for d in dirs],
        backends=backends,
        retry_attempts=12,
        retry_backoff_seconds=0.001,
        retry_backoff_max_seconds=0.002,
        degraded_after=1000,
        sleep=sleeps.append,
    )
    with store:
        for step in range(1, 11):
            store.save("k", make_state(step))
            loaded = store.load("k", repair=False)
            assert loaded.generation == step
            assert_state(loaded.state, step)
    injected = sum(sum(fs.failures.values()) for fs in flaky)
    calls = sum(sum(fs.calls.values()) for fs in flaky)
    # every injected fault was retried after a backoff, except the last of a call that ran out of
    # attempts (an upload of many chunks fails an attempt more often than not; the quorum carries it)
    gave_up = sum(h.failures for h in store.health())
    assert injected > 0.2 * calls and len(sleeps) >= injected - gave_up
    with CheckpointStore(storage=[str(d) for d in dirs]) as clean:  # what landed on disk is sound
        assert clean.verify().ok
        assert_state(clean.load("k").state, 10)


def test_no_space_left_on_one_replica(tmp_dirs, no_space_dir):
    local = [str(d) for d in tmp_dirs(2)]
    sleeps: list[float] = []
    state = {"w": torch.randn(1_000_000), "step": 3}  # 4 MB into a 1 MiB filesystem
    with CheckpointStore(storage=local + [no_space_dir.path], sleep=sleeps.append, **FAST_RETRY) as store:
        commit = store.save("k", state)
        assert len(commit.acked) == 2
        (err,) = commit.failed.values()
        assert "no space" in err.lower()
        assert sleeps == []  # a full disk is permanent: not retried
        assert torch.equal(store.load("k").state["w"], state["w"])
    with CheckpointStore(storage=local + [no_space_dir.path], write_quorum="all", **FAST_RETRY) as store:
        with pytest.raises(QuorumError) as e:
            store.save("k", state)
        assert e.value.acked == 2 and e.value.required == 3
        assert store.load("k").generation == 1  # the failed save left the committed one untouched


def test_degraded_replica_is_reported_and_probed_once(tmp_path, tmp_dirs):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    sleeps: list[float] = []
    urls = [str(d) for d in tmp_dirs(2)] + [str(blocker / "sub")]
    with CheckpointStore(storage=urls, degraded_after=2, sleep=sleeps.append, **FAST_RETRY) as store:
        for step in range(1, 4):
            store.save("k", make_state(step))
        health = store.health()
        assert [h.degraded for h in health] == [False, False, True]
        assert health[2].consecutive_failures >= 2 and "sub" in (health[2].last_error or "")
        t0 = time.perf_counter()
        store.save("k", make_state(4))
        assert time.perf_counter() - t0 < 5
