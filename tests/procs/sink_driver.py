"""A driver process running a job into a sink of a given format on an existing Ray cluster, for
driver-kill tests of what readers see.

Usage: python -m tests.procs.sink_driver RAY_ADDRESS JOB_ID SINK_URL FORMAT CKPT_DIR ROWS
Prints "committed <n>" lines as outputs commit, and "done <json>" at the end.
"""

from __future__ import annotations

import json
import sys

import ray

import resilient
from resilient.io import FileSink
from resilient.io.sources import RangeSource
from tests.pipelines import simple


def main() -> None:
    address, job_id, url, fmt, ckpt, rows = sys.argv[1:7]
    ray.init(address=address, log_to_driver=False)
    settings = resilient.Settings.from_env(
        {}, storage=[ckpt + "-a", ckpt + "-b"], write_quorum=1, num_actors=2, actor_cpus=0.25,
        commit_group_size=16,
    )
    handle = resilient.pipeline(simple.SlowSquare).run(
        RangeSource(int(rows), 3), FileSink(url, format=fmt), job_id=job_id, settings=settings, init_args=(0.01,)
    )
    seen = 0
    while not handle.done():
        n = handle.progress()["committed"]
        if n // 10 > seen // 10:
            print(f"committed {n}", flush=True)
        seen = n
        handle._thread.join(0.05)
    result = handle.wait()
    print("done " + json.dumps({"resumed_from": result.resumed_from, "committed": result.committed}), flush=True)


if __name__ == "__main__":
    main()
