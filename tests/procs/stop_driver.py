"""A driver process running a stateful job on an existing Ray cluster, for graceful-stop tests.

Usage: python -m tests.procs.stop_driver RAY_ADDRESS JOB_ID SINK CKPT_DIR LOG_DIR
Prints "committed <n>" lines as outputs commit and "done <json>" at the end; a stopped job ends with
`resilient.JobStoppedError` (exit status 1, its message on standard error).
"""

from __future__ import annotations

import json
import sys

import ray

import resilient
from resilient.io.sources import RangeSource
from tests.pipelines.spot import LoggedSum


def main() -> None:
    address, job_id, sink, ckpt, logs = sys.argv[1:6]
    ray.init(address=address, log_to_driver=False)
    settings = resilient.Settings.from_env(
        {}, storage=[ckpt + "-a", ckpt + "-b"], write_quorum=1, num_actors=2, actor_cpus=0.25,
        checkpoint_every=50, checkpoint_interval_seconds=3600, standby=0,
    )
    handle = resilient.pipeline(LoggedSum).run(RangeSource(2000, 2), sink, job_id=job_id, settings=settings,
                                               init_args=(logs, 0.004))
    commits = 0
    while not handle.done():
        n = handle.progress()["committed"]
        if n // 20 > commits // 20:
            print(f"committed {n}", flush=True)
        commits = n
        try:
            handle.wait(0.05)
        except TimeoutError:
            pass
    result = handle.wait()
    print("done " + json.dumps({"resumed_from": result.resumed_from, "committed": result.committed}), flush=True)


if __name__ == "__main__":
    main()
