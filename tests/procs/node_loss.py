"""Node loss: a job on a 3-raylet cluster on this machine loses the node running a worker actor.

Usage: python -m tests.procs.node_loss WORKDIR [stateful]
Prints one JSON line: {"removed_node": ..., "restarts": ..., "committed": ..., "ok": ...}.
"""

from __future__ import annotations

import json
import sys
import time

import ray
from ray.cluster_utils import Cluster

import resilient
from resilient.io.sinks import FileSink
from resilient.io.sources import RangeSource
from tests.pipelines import simple


def main() -> None:
    workdir = sys.argv[1]
    stateful = len(sys.argv) > 2 and sys.argv[2] == "stateful"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": {"timeout_ms_task_wait_for_death_info": 0}},
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        settings = resilient.Settings.from_env(
            {}, storage=[f"{workdir}/ckpt-a", f"{workdir}/ckpt-b", f"{workdir}/ckpt-c"],
            num_actors=2, actor_cpus=0.25, checkpoint_every=10,
        )
        target = simple.SlowSum if stateful else simple.SlowSquare
        handle = resilient.pipeline(target).run(
            RangeSource(1200, 2), f"{workdir}/out", job_id="node-loss", settings=settings, init_args=(0.004,)
        )
        while handle.progress()["committed"] < 150:
            time.sleep(0.05)
        victim_node = handle.actors()[0]["node_id"]
        node = next(n for n in nodes if n.node_id == victim_node)
        cluster.remove_node(node)
        result = handle.wait(300)
        got = {b: cols for b, cols in FileSink(f"{workdir}/out").read_all()}
        print(json.dumps({
            "removed_node": victim_node, "restarts": result.restarts, "committed": result.committed,
            "ids": sorted(got), "outputs": {str(b): c for b, c in got.items()},
        }), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
