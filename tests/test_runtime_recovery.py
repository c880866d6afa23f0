"""Driver death and re-run, zombie incarnations: real processes, real signals, one shared Ray. (Node loss
runs on the multi-node cluster of tests/test_preemption.py.)"""

from __future__ import annotations

import collections
import json
import os
import signal

import pytest

import resilient
from resilient.errors import FencedError
from resilient.io.sinks import FileSink
from resilient.io.sources import RangeSource
from resilient.runtime.ledger import Ledger
from resilient.runtime.protocol import ActorDown, ActorUp, CallAnswered, Cause, CommitGroup, SendCall
from resilient.runtime.scheduler import INF, Policy, Scheduler
from resilient.runtime.worker import DirtyWorkerError, JobSpec, Result, Worker
from tests import procs
from tests.pipelines import simple
from tests.test_runtime import expected_running

pytestmark = pytest.mark.usefixtures("ray_session")


def run_driver(args: list[str], kill_after_commits: int | None):
    rc, lines, _, _ = procs.run_driver("tests.procs.driver", args, signal_after=kill_after_commits)
    return rc, lines


@pytest.mark.parametrize("stateful", [False, True])
def test_driver_killed_mid_run_and_rerun_resumes_exactly_once(tmp_path, ray_session, stateful):
    import ray

    address = ray.get_runtime_context().gcs_address
    sink = str(tmp_path / "out")
    args = [address, "drv", sink, str(tmp_path / "ckpt")] + (["stateful"] if stateful else [])
    rc, lines = run_driver(args, kill_after_commits=300)
    assert rc == -signal.SIGKILL, lines
    rc, lines = run_driver(args, kill_after_commits=None)
    assert rc == 0, lines
    done = json.loads(lines[-1].split(" ", 1)[1])
    assert done["resumed_from"] >= 250  # the progress record was written behind the commits
    seen = collections.Counter()
    got = {}
    for b, cols in FileSink(sink).read_all():
        seen[b] += 1
        got[b] = cols
    assert sorted(seen) == list(range(1000)) and set(seen.values()) == {1}
    if stateful:
        assert got == expected_running(3000, 3, 2)
    else:
        for b, cols in got.items():
            assert cols["id"] == [3 * b, 3 * b + 1, 3 * b + 2]
            assert cols["y"] == [i * i for i in cols["id"]]


def test_zombie_incarnation_can_commit_neither_output_nor_checkpoint(tmp_path):
    import ray

    settings = resilient.Settings.from_env({}, storage=[str(tmp_path / "a"), str(tmp_path / "b")], write_quorum=1,
                                           checkpoint_every=1)
    sink = FileSink(str(tmp_path / "out"))
    spec = JobSpec("zombie", simple.RunningSum, (), {}, True, sink, settings, 1)
    actor_cls = ray.remote(max_restarts=0)(Worker).options(num_cpus=0.25)
    batches = list(RangeSource(40, 10).read(0))
    with resilient.CheckpointStore(settings) as store:
        e1 = store.claim_epoch("zombie/slot-0")
        old = actor_cls.remote(spec, 0, e1)
        pid = ray.get(old.ready.remote())["pid"]
        assert ray.get(old.restore.remote()) == 0
        assert [type(a) for a in ray.get(old.process.remote((INF, [(*batches[0], False)])))] == [Result]
        os.kill(pid, signal.SIGSTOP)  # paused: the supervisor gives up on it and replaces it
        e2 = store.claim_epoch("zombie/slot-0")
        new = actor_cls.remote(spec, 0, e2)
        ray.get(new.ready.remote())
        assert ray.get(new.restore.remote()) == 0
        os.kill(pid, signal.SIGCONT)  # the zombie wakes up and carries on
        before = store.generations("zombie/slot-0")
        # encodes an output and tries to checkpoint (a fenced save answers the batch as a Failure, or
        # surfaces at the next wait for it); then flushes its checkpoint
        answers = ray.get(old.process.remote((INF, [(*batches[1], False)])))
        assert len(answers) == 1 and (isinstance(answers[0], Result) or answers[0].error.startswith("FencedError"))
        with pytest.raises(ray.exceptions.RayTaskError) as e:
            ray.get(old.finish.remote(INF))
        # fenced at the save; or, when the batch's own save was already refused (a Failure), its state is
        # suspect and it persists nothing at all
        refused = FencedError if isinstance(answers[0], Result) else DirtyWorkerError
        assert isinstance(e.value.cause, refused), e.value
        assert store.generations("zombie/slot-0") == before  # no checkpoint of the zombie landed
        # its answers never reach a commit: the scheduler drops answers from any epoch but the slot's
        sched = Scheduler(Policy(slots=1, stateful=True, standby=0), Ledger(4, 64))
        inc = sched.start(0.0)[0].inc
        call = next(c for c in sched.handle(ActorUp(0, inc, epoch=e2), 0.0) if isinstance(c, SendCall))
        encoded = sink.encode(call.items[0][0], {"id": [0], "running": [0], "n": [0]}, epoch=e1)
        out = sched.handle(CallAnswered(call.call, (Result(0, 0, e1, encoded, 0.0, 1),)), 1.0)
        assert sched.group == [] and not any(isinstance(c, CommitGroup) for c in out)
        # a call made to an incarnation that was replaced since: forgotten, whatever its answer says
        calls = [c for c in sched.handle(ActorDown(0, inc, Cause.PROCESS), 2.0) if isinstance(c, SendCall)]
        assert calls == [] and sched.slots[0].inc != inc
        out = sched.handle(CallAnswered(call.call, (Result(0, 0, e2, encoded, 0.0, 1),)), 3.0)
        assert sched.group == [] and not any(isinstance(c, CommitGroup) for c in out)
        assert not sink.is_committed(0)
        ray.kill(old)
        ray.kill(new)
