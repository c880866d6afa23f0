"""Exceptions injected into the user's pipeline: a wrapper that runs it and raises on one batch.

The batch is named by the digest of its content (`resilient.io.sources` hashes batches the same way in
every process), because a pipeline is called with the batch alone. ``mode="once"`` raises the first
time any process meets the batch (a marker file created exclusively); ``mode="always"`` raises every
time (a poison batch). Each raise appends its wall-clock time to ``<markers>/raised``, which is how the
drill learns when the fault happened.
"""

from __future__ import annotations

import os
import time
from typing import Any

from resilient.io._base import digest

__all__ = ["DrillFault", "Faulty", "FaultyStateful", "first_raise"]


class DrillFault(Exception):
    """The exception a drill injects into the pipeline."""


class Faulty:
    """The user's pipeline (a class, built here with its arguments, or a function), raising on one batch."""

    def __init__(self, target: Any, init_args: tuple, init_kwargs: dict, batch_digest: str, mode: str,
                 markers: str) -> None:
        self.inner = target(*init_args, **init_kwargs) if isinstance(target, type) else target
        self.batch_digest, self.mode, self.markers = batch_digest, mode, markers

    def __call__(self, batch: Any) -> Any:
        if digest(batch) == self.batch_digest and self._raise_now():
            with open(os.path.join(self.markers, "raised"), "a") as f:
                f.write(f"{time.time()!r}\n")
            raise DrillFault(f"fault injected by the drill ({self.mode})")
        return self.inner(batch)

    def _raise_now(self) -> bool:
        if self.mode == "always":
            return True
        try:
            fd = os.open(os.path.join(self.markers, "once"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True


class FaultyStateful(Faulty):
    """`Faulty` for a stateful pipeline: its state is the user's."""

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


def first_raise(markers: str) -> float | None:
    """When the injected exception was first raised (wall-clock seconds), or None if not yet."""
    try:
        with open(os.path.join(markers, "raised")) as f:
            first = f.readline().strip()
    except FileNotFoundError:
        return None
    return float(first) if first else None
