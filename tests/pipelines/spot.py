"""Pipelines of the preemption tests: each records every batch it runs, so replays can be counted."""

from __future__ import annotations

import os
import time

import ray

from tests.pipelines.simple import RunningSum


class LoggedSum(RunningSum):
    """A running sum that appends ``<pid> <first id>`` to ``<log_dir>/<pid>.log`` for every batch it runs
    (replays included), and reports its node."""

    def __init__(self, log_dir: str, seconds: float = 0.004) -> None:
        super().__init__()
        self.seconds = seconds
        self.path = os.path.join(log_dir, f"{os.getpid()}.log")

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.seconds)
        out = super().__call__(batch)
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {int(batch['id'][0])} {ray.get_runtime_context().get_node_id()}\n")
        return out


def runs_per_batch(log_dir: str, rows: int) -> dict[int, int]:
    """How many times each batch ran, over every process (a batch of `rows` rows is keyed by its index)."""
    counts: dict[int, int] = {}
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                b = int(line.split()[1]) // rows
                counts[b] = counts.get(b, 0) + 1
    return counts
