"""Chaos on a real local Ray: workers SIGKILLed from outside while user code raises, actors killed while
they start, and user errors that are systematic. Real processes, real signals, one shared Ray."""

from __future__ import annotations

import collections
import gc
import os
import random
import signal
import threading
import time

import pytest

import resilient
from resilient.io.sources import RangeSource
from resilient.runtime.supervisor import JobFailedError
from tests.pipelines.chaos import FlakySum, SlowStart, scalar_score
from tests.test_runtime import expected_running, settings_for

pytestmark = pytest.mark.usefixtures("ray_session")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state


def worker_pids() -> set[int]:
    """PIDs of this session's worker actor processes (their title is ``ray::Worker...``): those whose
    raylet this test process started (worker -> raylet -> us), never another Ray's on the machine."""
    pids, me = set(), os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::Worker") and _parent(_parent(int(name))) == me:
                        pids.add(int(name))
            except (OSError, ValueError):
                pass
    return pids


class Killer(threading.Thread):
    """SIGKILLs a random worker actor every `low`..`high` seconds until stopped."""

    def __init__(self, low: float, high: float, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.low, self.high, self.rng = low, high, random.Random(seed)
        self.stopped = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stopped.wait(self.rng.uniform(self.low, self.high)):
            pids = sorted(worker_pids())
            if pids:
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


def test_stateful_job_finishes_exactly_once_under_kills_and_transient_exceptions(tmp_path, capfd):
    """5,000 batches of a stateful pipeline; user code raises on 1% of them (once each, half-applied);
    a worker is SIGKILLed every 0.5-1 s from outside, also while it starts or rolls back. The job
    finishes on its own, every batch exactly once, and outputs and state equal a fault-free run."""
    n, size, slots = 5000, 2, 2
    markers = tmp_path / "markers"
    markers.mkdir()
    # a checkpoint every 20 batches and calls as "auto" makes them: the job must last long enough for the
    # killer's 20 kills (with calls of 64 batches it ended after 19 in a clean-clone run)
    settings = settings_for(tmp_path, checkpoint_every=20, standby=1, max_attempts=5)
    job = resilient.pipeline(FlakySum, num_actors=slots)
    killer = Killer(0.5, 1.0, seed=7)
    handle = job.run(RangeSource(n * size, size), str(tmp_path / "out"), job_id="chaos", settings=settings,
                     init_args=(str(markers), size), progress=False)
    killer.start()
    try:
        result = handle.wait(900)
    finally:
        killer.stopped.set()
        killer.join()
    assert killer.kills >= 20, killer.kills
    assert result.dead_letters == [] and result.committed == n and result.restarts >= 10, result
    seen = collections.Counter()
    got = {}
    for b, cols in handle.results():
        seen[b] += 1
        got[b] = cols
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}
    assert got == expected_running(n * size, size, slots)
    with resilient.CheckpointStore(settings) as store:
        final = [store.load(f"chaos/slot-{s}").state["user"] for s in range(slots)]
    want = expected_running(n * size, size, slots)
    assert [f["total"] for f in final] == [want[n - slots + s]["running"][0] for s in range(slots)]
    assert sum(f["batches"] for f in final) == n
    raised = len(list(markers.iterdir()))
    assert raised == n // 100  # every flaky batch raised once, and was retried
    gc.collect()
    assert "Unhandled error" not in capfd.readouterr().err


def test_actors_killed_while_starting_do_not_fail_the_job(tmp_path):
    """Each new actor takes 2 s to build; the first three are SIGKILLed while they build, more than
    `max_attempts` in a row. Deaths that are not the pipeline's exception use their own budget."""
    settings = settings_for(tmp_path, num_actors=1, standby=0, max_attempts=2)
    job = resilient.pipeline(SlowStart, num_actors=1)
    killed: set[int] = worker_pids()  # actors of earlier tests still going away: never this job's
    before = len(killed)
    handle = job.run(RangeSource(40, 4), str(tmp_path / "out"), job_id="start-kills", settings=settings,
                     init_args=(2.0,), progress=False)
    deadline = time.monotonic() + 120
    while len(killed) < before + 3 and time.monotonic() < deadline:
        fresh = worker_pids() - killed
        if fresh:
            pid = fresh.pop()
            time.sleep(0.5)  # inside its 2 s constructor
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    result = handle.wait(300)
    assert len(killed) == before + 3 and result.committed == 10 and result.restarts >= 3
    reasons = [e.reason for e in handle.events() if e.kind == "restart"]
    assert sum(r.startswith("died while starting") for r in reasons) >= 3, reasons
    assert all(e.cause == "process" for e in handle.events() if e.kind == "restart")


def test_a_systematic_user_error_fails_the_job_fast_with_its_traceback(tmp_path, caplog):
    """Every batch fails the same way (a scalar where a column needs a value per row): the job fails after
    the first few batches with that error and the user's traceback, instead of dead-lettering them all."""
    settings = settings_for(tmp_path, max_attempts=3)
    handle = resilient.pipeline(scalar_score).run(RangeSource(4000, 10), str(tmp_path / "out"), job_id="scalar",
                                                  settings=settings, progress=False)
    with pytest.raises(JobFailedError, match="raised the same error and none succeeded") as e:
        handle.wait(300)
    assert "score" in str(e.value) and e.value.traceback
    assert handle.progress()["dead_letters"] <= 3 and handle.progress()["committed"] == 0
    per_batch = [r for r in caplog.records if r.name == "resilient.runtime" and "failed (attempt" in r.message]
    assert per_batch and all("\n" not in r.getMessage() for r in per_batch)  # one clear line each
