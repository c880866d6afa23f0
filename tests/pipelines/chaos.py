"""Pipelines of the chaos tests (importable by worker actors)."""

from __future__ import annotations

import time

import numpy as np

from tests.pipelines import simple


class FlakySum(simple.RunningSum):
    """A running sum that raises a transient error, half-applied, once on about 1% of its batches."""

    def __init__(self, markers: str, batch_size: int) -> None:
        super().__init__()
        self.markers, self.batch_size = markers, batch_size

    def __call__(self, batch: dict) -> dict:
        b = int(np.asarray(batch["id"])[0]) // self.batch_size
        if b % 100 == 37 and simple.first_time(self.markers, b):
            self.total += 10**9  # half-applied: must never reach the state
            raise ConnectionError(f"transient failure on batch {b}")
        return super().__call__(batch)


class SlowStart(simple.RunningSum):
    """A running sum whose constructor takes a while (a model load)."""

    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)
        super().__init__()


def scalar_score(batch: dict) -> dict:
    """A user mistake: one value for the whole batch where a column needs one per row."""
    return {"id": np.asarray(batch["id"]).tolist(), "score": 0.5}
