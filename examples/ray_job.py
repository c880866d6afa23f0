"""Score rows exactly once, launched as a Ray job (or run directly: the same script does both).

    ray job submit --address http://127.0.0.1:8265 --working-dir examples --runtime-env-json \\
        '{"py_modules": ["resilient"], "env_vars": {"RESILIENT_STORAGE": "/data/ckpt-a,/data/ckpt-b"}}' \\
        -- python ray_job.py file:///data/scores [--rows 30000] [--batch 100] [--job-id ID]
    python examples/ray_job.py file:///data/scores        # a local Ray is started on demand

(from the repository root; README "Launching as a Ray job" has the cluster set-up, token included.)

A plain user script: a stateful `@resilient.pipeline` (a small numpy model that counts the rows it
scored) over `RangeSource` batches, outputs committed to the sink URL given as first argument. Every
`resilient` setting (storage replicas, number of actors, checkpoint cadence...) comes from the
``RESILIENT_*`` environment variables, which ``ray job submit`` passes in its runtime environment; the
decorator sets none, so nothing here overrides them.

While the job runs, the script prints one ``progress {json}`` line per second (committed batches,
total, restarts, and the worker actors' slots and PIDs); at the end it prints ``result {json}`` (the
`JobResult`) and exits 0 only when every batch committed and none was dead-lettered. Submitting it again
with the same ``--job-id`` resumes the job: committed batches are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

import resilient


@resilient.pipeline
class Scorer:
    """A fixed random two-layer model over 16 features derived from each row id."""

    def __init__(self, work_seconds: float = 0.0) -> None:
        rng = np.random.default_rng(0)
        self.w1 = rng.standard_normal((16, 32))
        self.w2 = rng.standard_normal(32)
        self.work_seconds = work_seconds
        self.rows = 0

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["id"])
        x = (ids[:, None] / 1e6) * np.arange(1, 17)
        score = np.maximum(x @ self.w1, 0.0) @ self.w2
        if self.work_seconds:
            time.sleep(self.work_seconds)  # stands for a real model's latency
        self.rows += len(ids)
        return {"id": ids.tolist(), "score": score.tolist()}

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"]


def _line(kind: str, data: dict) -> None:
    print(f"{kind} {json.dumps(data, sort_keys=True)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sink", help="fsspec URL the outputs are committed to (jsonl)")
    ap.add_argument("--rows", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--job-id", default="ray-job-example", help="re-running with the same id resumes")
    ap.add_argument("--work-ms", type=float, default=0.0, help="simulated model latency per batch")
    args = ap.parse_args(argv)

    handle = Scorer.run(
        resilient.io.RangeSource(args.rows, args.batch), args.sink, job_id=args.job_id,
        init_args=(args.work_ms / 1000,),
    )
    while True:
        p = handle.progress()
        _line("progress", {"committed": p["committed"], "total": p["total"], "restarts": p["restarts"],
                           "actors": handle.actors()})
        try:
            result = handle.wait(timeout=1.0)
            break
        except TimeoutError:
            continue
    _line("result", dataclasses.asdict(result))
    return 0 if result.committed == result.total and not result.dead_letters else 1


if __name__ == "__main__":
    sys.exit(main())
