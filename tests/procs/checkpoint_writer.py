"""A separate process that saves checkpoint after checkpoint until it is killed.

Usage: python -m tests.procs.checkpoint_writer KEY DIR [DIR ...]
Prints "committed <generation> <step>" after each commit, flushed, so the parent can time its kill.
"""

from __future__ import annotations

import sys

import torch

from resilient.storage import CheckpointStore


def state_for(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(2_000_000, generator=g), "ids": torch.full((500_000,), step), "step": step}


def main() -> None:
    key, dirs = sys.argv[1], sys.argv[2:]
    with CheckpointStore(storage=dirs, keep=3) as store:
        latest = store.latest(key) or 0
        step = 1000 * latest
        while True:
            step += 1
            commit = store.save(key, state_for(step))
            print(f"committed {commit.generation} {step}", flush=True)


if __name__ == "__main__":
    main()
