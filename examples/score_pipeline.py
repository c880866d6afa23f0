"""Score a million rows with a small torch model, exactly once, through a worker crash.

    python examples/score_pipeline.py [--rows 200000] [--out DIR]

Runs on a local Ray started on demand: a stateful pipeline (it counts the rows it scored) over
`RangeSource` batches, outputs to a jsonl sink. Halfway through, one worker actor process is SIGKILLed;
the job finishes anyway, and the script checks every row was scored exactly once and that the counts
kept in the slots' state add up to the number of rows.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile

import numpy as np
import torch

import resilient
from resilient.testing import kill_worker


@resilient.pipeline(num_actors=2, checkpoint_every=50)
class Scorer:
    def __init__(self) -> None:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        self.rows = 0

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["id"])
        x = torch.as_tensor(ids, dtype=torch.float32)[:, None] / 1e6 * torch.arange(1, 17)
        with torch.no_grad():
            score = self.model(x).squeeze(1)
        self.rows += len(ids)
        return {"id": ids.tolist(), "score": score.tolist(), "rows_so_far": [self.rows] * len(ids)}

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="resilient-score-")
    settings = resilient.Settings.from_env(storage=[f"{work}/ckpt-a", f"{work}/ckpt-b"], write_quorum=1)
    handle = Scorer.run(resilient.io.RangeSource(args.rows, args.batch), f"{work}/scores", job_id="score",
                        settings=settings)
    total = -(-args.rows // args.batch)
    killed = kill_worker(handle, after=total // 2, poll=0.01)  # SIGKILL by PID, from outside the job
    result = handle.wait()
    if killed is None:
        print("the job finished before a worker could be killed: run it with more --rows")
        return 2
    print(f"killed worker pid {killed['pid']} (slot {killed['slot']}) halfway through")
    rows = collections.Counter()
    for _, out in handle.results():
        rows.update(out["id"])
    exactly_once = sorted(rows) == list(range(args.rows)) and set(rows.values()) == {1}
    with resilient.CheckpointStore(settings) as store:
        counted = sum(store.load(f"score/slot-{s}").state["user"]["rows"] for s in range(2))
    print(f"batches {result.committed}/{result.total}, restarts {result.restarts}, dead letters "
          f"{len(result.dead_letters)}; every row scored exactly once: {exactly_once}; "
          f"rows counted in slot state: {counted} of {args.rows}")
    return 0 if exactly_once and counted == args.rows else 1


if __name__ == "__main__":
    sys.exit(main())
