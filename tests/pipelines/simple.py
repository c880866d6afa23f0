"""Pipelines the runtime tests run (importable by Ray workers)."""

from __future__ import annotations

import os
import time

import numpy as np


def square(batch: dict) -> dict:
    ids = np.asarray(batch["id"])
    return {"id": ids.tolist(), "y": (ids * ids).tolist()}


def expected_square(ids) -> dict:
    return {int(i): int(i) * int(i) for i in ids}


class RunningSum:
    """Stateful: the output of each batch depends on every earlier batch of its slot."""

    def __init__(self) -> None:
        self.total = 0
        self.batches = 0

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["id"])
        self.total += int(ids.sum())
        self.batches += 1
        return {"id": ids.tolist(), "running": [self.total] * len(ids), "n": [self.batches] * len(ids)}

    def state_dict(self) -> dict:
        return {"total": self.total, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"]
        self.batches = state["batches"]


def first_time(markers: str, key: int) -> bool:
    """True the first time any process asks about this key (a file created exclusively)."""
    try:
        fd = os.open(os.path.join(markers, f"m-{key}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def fault(first: int, faults: dict, markers: str) -> str | None:
    """Act out the fault configured for the batch starting at `first`; return the mode for the caller."""
    mode = faults.get(first)
    if mode == "raise-always":
        raise ValueError(f"poison batch starting {first}")
    if mode == "raise-until-fixed" and not os.path.exists(os.path.join(markers, f"fixed-{first}")):
        raise ValueError(f"bad input in batch starting {first}")
    if mode == "crash-always":
        os._exit(17)
    if mode == "crash-once" and first_time(markers, first):
        os._exit(17)
    if mode == "hang-once" and first_time(markers, first):
        time.sleep(3600)
    if mode == "raise-once" and first_time(markers, first):
        raise RuntimeError(f"transient failure on batch starting {first}")
    if mode == "raise-base-once" and first_time(markers, first):
        raise Interrupted(f"interrupted on batch starting {first}")
    return mode


class Interrupted(BaseException):
    """Raised by user code that is not an `Exception` (like `KeyboardInterrupt`, but not Ray's)."""


class FaultySquare:
    """Stateless square with faults keyed by a batch's first id."""

    def __init__(self, faults: dict, markers: str) -> None:
        self.faults, self.markers = faults, markers

    def __call__(self, batch: dict) -> dict:
        fault(int(np.asarray(batch["id"])[0]), self.faults, self.markers)
        return square(batch)


class FaultySum(RunningSum):
    """Stateful running sum with faults; "raise-once-after-mutating" half-applies the batch first."""

    def __init__(self, faults: dict, markers: str) -> None:
        super().__init__()
        self.faults, self.markers = faults, markers

    def __call__(self, batch: dict) -> dict:
        first = int(np.asarray(batch["id"])[0])
        if self.faults.get(first) == "raise-once-after-mutating" and first_time(self.markers, first):
            self.total += 10**9  # a half-applied batch: must never leak into the state
            raise RuntimeError(f"transient failure on batch starting {first}")
        fault(first, self.faults, self.markers)
        return super().__call__(batch)


class SlowSquare:
    """Stateless square taking a few milliseconds per batch (chaos tests)."""

    def __init__(self, seconds: float = 0.003) -> None:
        self.seconds = seconds

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.seconds)
        return square(batch)


class SlowSum(RunningSum):
    def __init__(self, seconds: float = 0.003) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.seconds)
        return super().__call__(batch)


class BrokenInit:
    """A pipeline whose model never loads."""

    def __init__(self) -> None:
        raise OSError("model weights not found at /models/missing.pt")

    def __call__(self, batch: dict) -> dict:
        return square(batch)


class TensorSum(RunningSum):
    """Stateful, with tensors in its state (float32 and bfloat16), changed in place by every batch."""

    def __init__(self) -> None:
        import torch

        super().__init__()
        self.acc = torch.zeros(4)
        self.half = torch.zeros(4, dtype=torch.bfloat16)

    def __call__(self, batch: dict) -> dict:
        out = super().__call__(batch)
        self.acc += len(batch["id"])
        self.half.copy_(self.acc)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "acc": self.acc, "half": self.half}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.acc = state["acc"]  # kept as given: it must be writable memory of its own
        self.half = state["half"]
