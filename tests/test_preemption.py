"""Spot preemption and graceful stops, on real clusters with real signals.

* A multi-node cluster (several raylets on this machine, `tests/procs/preemption.py`): nodes drained with
  reason PREEMPTION and a deadline, as KubeRay, managed platforms and ``ray drain-node`` do, then removed.
* The same cluster loses the node of a worker actor without notice (its raylet removed mid-job).
* A driver process sent SIGTERM (what ``ray job stop`` sends) and run again.

The decisions behind them run in tests/test_scheduler.py and, over many schedules, tests/test_simulation.py.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resilient.io.sinks import FileSink
from tests import procs
from tests.pipelines.spot import runs_per_batch

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}  # at call time: Ray's auth settings are in it by then


@pytest.fixture(scope="module")
def cluster_cases(tmp_path_factory) -> dict[str, dict]:
    workdir = tmp_path_factory.mktemp("preemption")
    proc = subprocess.run([sys.executable, "-m", "tests.procs.preemption", str(workdir)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    cases = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            facts = json.loads(line)
            cases[facts["case"]] = facts
    assert proc.returncode == 0 and len(cases) == 7, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return cases


def _finished_exactly_once(facts: dict) -> None:
    assert facts["exactly_once"] and facts["outputs_ok"], facts
    assert facts["final_state"] == facts["expected_state"], facts  # the same as a fault-free run
    assert facts["retries"] == 0 and facts["charged"] == [], facts


def test_actor_options_reach_every_worker_and_standby(cluster_cases):
    facts = cluster_cases["options"]
    _finished_exactly_once(facts)
    assert facts["worker_nodes"] == [facts["special_node"]]
    assert facts["active_node"] == facts["standby_node"] == facts["special_node"]


def test_a_draining_node_hands_its_stateful_slot_over_replaying_and_charging_nothing(cluster_cases):
    facts = cluster_cases["active"]
    _finished_exactly_once(facts)
    [(reason, cause, redelivered)] = facts["replaced"]
    assert reason.startswith("handed over") and cause == "preempted" and redelivered == []
    assert facts["runs_beyond_once"] == 0  # no batch ran twice anywhere: nothing replayed
    assert facts["preempted"] == 1 and facts["restarts"] == 1
    assert len(facts["worker_nodes"]) == 2 and facts["active_node"] in facts["worker_nodes"]


def test_a_standby_on_a_draining_node_is_replaced_and_the_slot_keeps_its_actor(cluster_cases):
    facts = cluster_cases["standby"]
    assert facts["standby_node"] != facts["active_node"], facts  # SPREAD placed them apart
    _finished_exactly_once(facts)
    assert facts["standby_moved"] and facts["replaced"] == [] and facts["runs_beyond_once"] == 0


def test_a_drain_shorter_than_the_margin_sends_the_calls_in_flight_again(cluster_cases):
    facts = cluster_cases["short"]
    _finished_exactly_once(facts)
    [(reason, cause, redelivered)] = facts["replaced"]
    assert cause == "preempted" and redelivered and facts["preempted"] == 1


def test_the_drills_preemption_class_drains_a_node_and_passes(cluster_cases):
    """`resilient drill` with --drain-nodes on the multi-node cluster: the node of a worker actor is drained
    with reason PREEMPTION; the slot is handed over, replaying and charging nothing."""
    report = cluster_cases["drill"]["report"]
    [row] = [r for r in report["rows"] if r["name"] == "preemption"]
    assert row["status"] == "PASS", cluster_cases["drill"]["table"]
    assert row["fault"].startswith("preemption notice") and row["replayed"] == 0 and row["attempts"] == 0
    assert row["recovery_s"] is not None


@pytest.mark.parametrize("stateful", [False, True])
def test_node_lost_mid_job_completes_exactly_once(cluster_cases, stateful):
    from tests.test_runtime import expected_running

    report = cluster_cases["node-loss-stateful" if stateful else "node-loss-stateless"]
    assert report["restarts"] >= 1 and report["committed"] == 600
    assert report["ids"] == list(range(600))  # every batch read back once: a multiset, no duplicates
    outputs = {int(b): cols for b, cols in report["outputs"].items()}
    if stateful:
        assert outputs == expected_running(1200, 2, 2)
    else:
        assert all(cols["y"] == [i * i for i in cols["id"]] for cols in outputs.values())
        assert sorted(i for cols in outputs.values() for i in cols["id"]) == list(range(1200))


def _driver(args: list[str], *, sigterm_after: int | None) -> tuple[int, list[str], str, float]:
    return procs.run_driver("tests.procs.stop_driver", args, signal_after=sigterm_after, sig=signal.SIGTERM)


def test_sigterm_stops_the_driver_gracefully_and_a_rerun_replays_nothing(tmp_path, ray_session):
    import ray

    logs = tmp_path / "logs"
    logs.mkdir()
    sink = str(tmp_path / "out")
    args = [ray.get_runtime_context().gcs_address, "stop", sink, str(tmp_path / "ckpt"), str(logs)]
    rc, lines, err, took = _driver(args, sigterm_after=300)
    assert rc == 1, (lines[-5:], err[-3000:])
    assert "JobStoppedError" in err and "stopped (the driver received SIGTERM)" in err and "To resume" in err
    assert took < 2.5 + 3.0, took  # the stop timeout, plus the process's own exit
    stopped_at = len(list(FileSink(sink).committed_from(0)))
    assert 300 <= stopped_at < 1000
    rc, lines, err, _ = _driver(args, sigterm_after=None)
    assert rc == 0, err[-3000:]
    done = json.loads(lines[-1].split(" ", 1)[1])
    assert stopped_at - 64 <= done["resumed_from"] <= stopped_at  # the watermark (the slots move apart a little)
    seen = collections.Counter(b for b, _ in FileSink(sink).read_all())
    assert sorted(seen) == list(range(1000)) and set(seen.values()) == {1}
    runs = runs_per_batch(str(logs), 2)
    assert sorted(runs) == list(range(1000)) and sum(n - 1 for n in runs.values()) == 0  # nothing ran twice


def test_ray_style_keywords_of_the_decorator_reach_the_actors(tmp_path, ray_session):
    import resilient
    from resilient.io.sources import RangeSource
    from tests.pipelines import simple

    settings = resilient.Settings.from_env({}, storage=[str(tmp_path / "a")], num_actors=1, standby=0)
    pipe = resilient.pipeline(simple.square, memory=64 << 20, runtime_env={"env_vars": {"SPOT_TEST": "1"}})
    handle = pipe.run(RangeSource(40, 4), str(tmp_path / "out"), job_id="opts", settings=settings)
    result = handle.wait(120)
    assert result.committed == 10
    assert dict(handle._supervisor.settings.ray_remote_args) == {
        "memory": 64 << 20, "runtime_env": {"env_vars": {"SPOT_TEST": "1"}}}
    with pytest.raises(resilient.ConfigError, match="max_restarts is resilient's own"):
        resilient.pipeline(simple.square, ray_remote_args={"max_restarts": 2}).run(
            RangeSource(4, 4), str(tmp_path / "out2"), job_id="opts2", settings=settings)


def test_without_drain_notices_the_driver_says_so_once_and_goes_on(tmp_path, caplog):
    import resilient
    from resilient.io.sinks import FileSink
    from resilient.io.sources import RangeSource
    from resilient.runtime.supervisor import Supervisor
    from resilient.runtime.worker import JobSpec
    from tests.pipelines import simple

    settings = resilient.Settings.from_env({}, storage=[str(tmp_path / "a")])
    spec = JobSpec("no-drains", simple.square, (), {}, False, FileSink(str(tmp_path / "out")), settings, 1)
    sup = Supervisor(spec, RangeSource(8, 4))
    calls = []

    def missing() -> dict:
        calls.append(1)
        raise AttributeError("module 'ray._private.state' has no attribute 'state'")

    sup._drain_source = missing
    with caplog.at_level("WARNING", logger="resilient.runtime"):
        sup._poll_drains(0.0)
        assert sup._drain_source is None  # asked once, never again
    [record] = [r for r in caplog.records if "cannot tell which nodes are draining" in r.getMessage()]
    assert "AttributeError" in record.getMessage() and len(calls) == 1
    sup.store.close()


def test_placement_group_bundles_give_each_actor_a_group_for_its_own_workers(tmp_path, ray_session):
    import ray
    from ray.util import placement_group_table

    import resilient
    from resilient.io.sources import RangeSource
    from tests.pipelines import spot

    settings = resilient.Settings.from_env({}, storage=[str(tmp_path / "a")], num_actors=2, standby=0)
    pipe = resilient.pipeline(spot.placement, placement_group_bundles=[{"CPU": 0.25}, {"CPU": 0.25}])
    handle = pipe.run(RangeSource(40, 4), str(tmp_path / "out"), job_id="bundles", settings=settings)
    assert handle.wait(120).committed == 10
    groups = {cols["pg"][0] for _, cols in handle.results()}
    children = {cols["child"][0] for _, cols in handle.results()}
    assert len(groups) == 2 and "" not in groups and children == groups  # one group per actor, children inside
    table = placement_group_table()
    assert all(table[g]["state"] == "REMOVED" for g in groups), {g: table[g]["state"] for g in groups}
    deadline = time.monotonic() + 30
    while any("_group_" in k for k in ray.available_resources()) and time.monotonic() < deadline:
        time.sleep(0.1)  # Ray returns a removed group's resources asynchronously
    assert not [k for k in ray.available_resources() if "_group_" in k]  # nothing left reserved
