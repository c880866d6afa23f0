"""Pipelines the drill tests run (importable by worker actors), one of them broken on purpose."""

from __future__ import annotations

import time

import numpy as np

import resilient
from tests.pipelines import simple

square = resilient.pipeline(simple.square, num_actors=2)
running = resilient.pipeline(simple.RunningSum, num_actors=2, checkpoint_every=10)

_SEEN = {"batches": 0}  # per process: what the checkpoint does not cover


class CountsInAGlobal(simple.RunningSum):
    """A running sum that also numbers its batches in a module global: ``state_dict`` leaves it out, so a
    replacement restored from a checkpoint numbers them from zero again."""

    def __call__(self, batch: dict) -> dict:
        time.sleep(0.002)  # long enough a job for a kill to land with batches left after it
        out = super().__call__(batch)
        _SEEN["batches"] += 1
        return {**out, "seen": [_SEEN["batches"]] * len(out["id"])}


broken = resilient.pipeline(CountsInAGlobal, num_actors=2, checkpoint_every=5)


def sensor_windows(sensors: int = 8, steps: int = 6000, window: int = 50) -> list[dict]:
    """The streaming example's batches (its ``--short`` size by default), as a source for the drill."""
    from examples.streaming_anomaly import make_batches

    return make_batches(sensors, steps, window)[0]


def noisy(batch: dict) -> dict:
    """Not deterministic: a random value per row."""
    ids = np.asarray(batch["id"])
    return {"id": ids.tolist(), "r": np.random.default_rng().random(len(ids)).tolist()}


noisy_pipeline = resilient.pipeline(noisy, num_actors=2)
