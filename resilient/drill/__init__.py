"""Fault drills: run a pipeline through every fault class it must survive, and report what happened.

``resilient drill MODULE:PIPELINE --source ...`` (or `drill` from Python) runs the user's own
pipeline on a sample of their source: two fault-free reference runs, then one run per fault class
(an actor SIGKILLed mid-call or while it starts, a hang, an exception raised once, a poison batch, a
zombie, a storage replica lost or corrupted, the driver killed and the job re-run; a node preemption
notice where the cluster can send one). Each run is judged against the reference: every batch
committed exactly once (a multiset of ids), the same outputs for a deterministic pipeline, the same
final state for a stateful one. Recovery time, replayed batches, charged attempts and the throughput
dip are measured on each run.

The parts, each in one place:

* `resilient.drill.faults`: the fault classes, a registry (`register`), and their injectors;
* `resilient.drill.checks`: the checks and measurements, pure functions over plain data;
* `resilient.drill.run`: the drill itself (sample, scratch directories, references, judgement);
* `resilient.drill.jobs`: one run of the job, in this process or as a driver process that is killed;
* `resilient.drill.report`: the table, the JSON file and the picture.

Example:
    >>> from resilient.drill import FAULTS
    >>> list(FAULTS)[:3]
    ['kill', 'kill-starting', 'hang']
"""

from resilient.drill.faults import FAULTS, Cluster, Fault, Live, Struck, register
from resilient.drill.report import DrillReport, Row
from resilient.drill.run import DEFAULT_BATCHES, drill

__all__ = ["DEFAULT_BATCHES", "FAULTS", "Cluster", "DrillReport", "Fault", "Live", "Row", "Struck", "drill", "register"]
