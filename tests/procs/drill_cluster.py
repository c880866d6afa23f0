"""The drill's preemption class on a multi-node cluster (several raylets on this machine).

Usage: python -m tests.procs.drill_cluster
Prints the drill's table, then one JSON line: the report (`DrillReport.to_dict`).
"""

from __future__ import annotations

import io
import json

import ray
from ray.cluster_utils import Cluster

import resilient
from resilient.drill import drill
from resilient.io.sources import RangeSource
from tests.pipelines import simple


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"timeout_ms_task_wait_for_death_info": 0}})
    try:
        ray.init(address=cluster.address, log_to_driver=False)  # on the head's raylet, never drained
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        pipe = resilient.pipeline(simple.SlowSum, num_actors=2, actor_cpus=0.25,
                                  scheduling_strategy="SPREAD", checkpoint_every=20)
        report = drill(pipe, RangeSource(600, 2), batches=300, faults=["preemption"], drain_nodes=True,
                       init_args=(0.004,), progress=False, stream=io.StringIO(), environ={})
        print(report.table(), flush=True)
        print(json.dumps(report.to_dict()), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
