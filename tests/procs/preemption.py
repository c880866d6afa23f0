"""Preemption on a real multi-node cluster: several raylets on this machine, drained the way KubeRay, a
managed platform or ``ray drain-node`` drains them (reason PREEMPTION, with a deadline), then removed.

Usage: python -m tests.procs.preemption WORKDIR
Runs the cases below on one cluster and prints one JSON line per case.

* ``options``: ``resources={"special": 1}`` reach the actors: every worker and standby runs on the only
  node that has it.
* ``active``: the node of the active stateful actor drains (60 s ahead), then goes once it is handed
  over.
* ``standby``: the standby's node drains, then goes.
* ``short``: the active actor's node drains with a 1 s deadline (less than the margin: its calls in
  flight are sent again), then goes.
* ``drill``: `resilient drill`'s preemption class, allowed to drain a node (``drain_nodes=True``).
* ``node-loss-stateless``, ``node-loss-stateful``: a job loses the node of a worker actor without notice
  (the raylet removed mid-job): the slot is rebuilt elsewhere and the job completes exactly once.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import ray
from ray.cluster_utils import Cluster

import resilient
from resilient.drill import drill
from resilient.io.sinks import FileSink
from resilient.io.sources import RangeSource
from resilient.runtime import events as ev
from resilient.testing import announce_preemption
from tests.pipelines import simple
from tests.pipelines.spot import LoggedSum, runs_per_batch

ROWS, BATCHES = 2, 400


def expected_outputs() -> dict[int, list[int]]:
    total, out = 0, {}
    for b in range(BATCHES):
        total += sum(range(b * ROWS, (b + 1) * ROWS))
        out[b] = [total] * ROWS
    return out


def spares_away(sup, node: str) -> bool:
    """Every standby of the job is built, and none is on `node` (one being killed meanwhile: not yet)."""
    try:
        spares = list(sup.spares)
        return bool(spares) and all(ray.get(s.ready.remote())["node_id"] != node for s in spares)
    except ray.exceptions.RayActorError:
        return False


def run(cluster: Cluster, workdir: str, case: str, nodes: dict, **options) -> dict:
    logs = os.path.join(workdir, case, "logs")
    os.makedirs(logs)
    settings = resilient.Settings.from_env(
        {}, storage=[f"{workdir}/{case}/ckpt-a", f"{workdir}/{case}/ckpt-b"], write_quorum=1, num_actors=1,
        actor_cpus=0.25, standby=1, checkpoint_every=50, checkpoint_interval_seconds=3600, **options)
    sink = f"{workdir}/{case}/out"
    # the standby case lasts long enough after the drain for a standby to be built elsewhere
    seconds = 0.02 if case == "standby" else 0.004
    handle = resilient.pipeline(LoggedSum).run(RangeSource(BATCHES * ROWS, ROWS), sink, job_id=case,
                                               settings=settings, init_args=(logs, seconds))
    sup = handle._supervisor
    while handle.progress()["committed"] < 100 or not sup.spares:
        time.sleep(0.02)
    active = handle.actors()[0]["node_id"]
    spare_node = ray.get(sup.spares[0].ready.remote())["node_id"]
    facts: dict = {"case": case, "active_node": active, "standby_node": spare_node}
    victim = {"active": active, "short": active, "standby": spare_node}.get(case)
    if victim is not None:
        t0 = time.monotonic()
        facts["standby_moved"] = False
        announce_preemption(victim, 1.0 if case == "short" else 60.0, address=cluster.address)
        while time.monotonic() - t0 < 20:
            handed = any(isinstance(e, ev.ActorReplaced) for e in handle.events())
            moved = case == "standby" and spares_away(sup, victim)
            if handed or moved:
                facts["standby_moved"] = bool(moved)
                break
            time.sleep(0.01)
        facts["handed_over_s"] = time.monotonic() - t0
        if case == "short":
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        cluster.remove_node(nodes.pop(victim))
    result = handle.wait(300)
    got: dict[int, list] = {}
    seen: dict[int, int] = {}
    for b, cols in FileSink(sink).read_all():
        seen[b] = seen.get(b, 0) + 1
        got[b] = cols["running"]
    runs = runs_per_batch(logs, ROWS)
    with resilient.CheckpointStore(settings) as store:
        final = store.load(f"{case}/slot-0").state["user"]
    events = handle.events()
    facts.update({
        "exactly_once": sorted(seen) == list(range(BATCHES)) and set(seen.values()) == {1},
        "outputs_ok": got == expected_outputs(),
        "final_state": final, "expected_state": {"total": sum(range(BATCHES * ROWS)), "batches": BATCHES},
        "retries": result.retries, "restarts": result.restarts,
        "runs_beyond_once": sum(n - 1 for n in runs.values()),
        "replaced": [(e.reason, e.cause, list(e.redelivered)) for e in events if isinstance(e, ev.ActorReplaced)],
        "charged": [e.batch_id for e in events if isinstance(e, (ev.BatchRetried, ev.BatchDeadLettered))],
        "preempted": sup.sched.preempted if sup.sched else None,
        "worker_nodes": sorted({line.split()[2] for name in os.listdir(logs)
                                for line in open(os.path.join(logs, name))}),
    })
    return facts


def drill_case() -> dict:
    pipe = resilient.pipeline(simple.SlowSum, num_actors=2, actor_cpus=0.25, scheduling_strategy="SPREAD",
                              checkpoint_every=20)
    report = drill(pipe, RangeSource(600, 2), batches=300, faults=["preemption"], drain_nodes=True,
                   init_args=(0.004,), progress=False, stream=io.StringIO(), environ={})
    return {"case": "drill", "table": report.table(), "report": report.to_dict()}


def node_loss_case(cluster: Cluster, workdir: str, stateful: bool, nodes: dict) -> dict:
    """A job of 600 batches loses, after 150 commits, the node running its first actor (no drain notice)."""
    case = "node-loss-" + ("stateful" if stateful else "stateless")
    settings = resilient.Settings.from_env(
        {}, storage=[f"{workdir}/{case}/ckpt-a", f"{workdir}/{case}/ckpt-b", f"{workdir}/{case}/ckpt-c"],
        num_actors=2, actor_cpus=0.25, checkpoint_every=10,
    )
    target = simple.SlowSum if stateful else simple.SlowSquare
    sink = f"{workdir}/{case}/out"
    handle = resilient.pipeline(target).run(RangeSource(1200, 2), sink, job_id=case, settings=settings,
                                            init_args=(0.004,))
    while handle.progress()["committed"] < 150:
        time.sleep(0.05)
    victim = handle.actors()[0]["node_id"]
    cluster.remove_node(nodes.pop(victim))
    result = handle.wait(300)
    ids: list[int] = []
    got: dict[int, dict] = {}
    for b, cols in FileSink(sink).read_all():
        ids.append(b)
        got[b] = cols
    return {"case": case, "removed_node": victim, "restarts": result.restarts, "committed": result.committed,
            "ids": sorted(ids), "outputs": {str(b): c for b, c in got.items()}}


def main() -> None:
    workdir = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"timeout_ms_task_wait_for_death_info": 0}})
    try:
        # connected before the other raylets exist: the driver is on the head's raylet, never on a node
        # the test removes (every raylet here shares one IP address)
        ray.init(address=cluster.address, log_to_driver=False)
        special = cluster.add_node(num_cpus=1, resources={"special": 2})
        nodes = {n.node_id: n for n in [special] + [cluster.add_node(num_cpus=1) for _ in range(3)]}
        cluster.wait_for_nodes()
        facts = run(cluster, workdir, "options", nodes, ray_remote_args={"resources": {"special": 1}})
        facts["special_node"] = special.node_id
        print(json.dumps(facts), flush=True)
        for case in ("active", "standby", "short"):
            print(json.dumps(run(cluster, workdir, case, nodes, ray_remote_args={"scheduling_strategy": "SPREAD"})),
                  flush=True)
            fresh = cluster.add_node(num_cpus=1)  # the cloud gives the capacity back
            nodes[fresh.node_id] = fresh
            cluster.wait_for_nodes()
        print(json.dumps(drill_case()), flush=True)
        for stateful in (False, True):
            # two nodes left in service after each (the drill's drained one is not): room for the job
            print(json.dumps(node_loss_case(cluster, workdir, stateful, nodes)), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
