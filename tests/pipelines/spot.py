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


def placement(batch: dict) -> dict:
    """Which placement group the actor runs in, and whether a child task lands in the group's bundle 1."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    child = ""
    if pg is not None:
        @ray.remote(num_cpus=0.25)
        def where() -> str:
            g = get_current_placement_group()
            return g.id.hex() if g is not None else ""

        child = ray.get(where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=1)).remote())
    ids = [int(i) for i in batch["id"]]
    return {"id": ids, "pg": [pg.id.hex() if pg is not None else ""] * len(ids), "child": [child] * len(ids)}
