"""A driver process running a job on an existing Ray cluster, for driver-kill tests.

Usage: python -m tests.procs.driver RAY_ADDRESS JOB_ID SINK CKPT_DIR [stateful]
Prints "committed <n>" lines as outputs commit, and "done <json>" at the end.
"""

from __future__ import annotations

import json
import sys

import ray

import resilient
from resilient.io.sources import RangeSource
from tests.pipelines import simple


def main() -> None:
    address, job_id, sink, ckpt = sys.argv[1:5]
    stateful = len(sys.argv) > 5 and sys.argv[5] == "stateful"
    ray.init(address=address, log_to_driver=False)
    settings = resilient.Settings.from_env(
        {}, storage=[ckpt + "-a", ckpt + "-b"], write_quorum=1, num_actors=2, actor_cpus=0.25,
        checkpoint_every=10,
    )
    target = simple.SlowSum if stateful else simple.SlowSquare
    handle = resilient.pipeline(target).run(
        RangeSource(3000, 3), sink, job_id=job_id, settings=settings, init_args=(0.003,)
    )
    commits = 0
    while not handle.done():
        n = handle.progress()["committed"]
        if n // 50 > commits // 50:
            print(f"committed {n}", flush=True)
        commits = n
        handle._thread.join(0.05)
    result = handle.wait()
    print("done " + json.dumps({"resumed_from": result.resumed_from, "committed": result.committed}), flush=True)


if __name__ == "__main__":
    main()
