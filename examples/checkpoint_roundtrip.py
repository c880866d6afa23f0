"""Save a model's state to redundant storage, destroy a replica, and restore it intact.

Runs offline on local directories (a small torch model with random weights):

    python examples/checkpoint_roundtrip.py [--root DIR] [--mode replicate|parity]

1. Builds a model plus optimizer state and saves three generations to three replica directories.
2. Deletes one replica directory entirely (a lost disk).
3. Loads the newest checkpoint: it verifies from the surviving copies and read-repair rewrites the lost
   replica; `verify()` then finds every copy sound again.
4. Checks the restored model gives the same outputs as the original, bit for bit.

Storage comes from RESILIENT_STORAGE when set (comma-separated URLs), else from --root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch
from torch import nn

import resilient


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    x = torch.randn(32, 64)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="directory for the replicas (default: a new temp dir)")
    ap.add_argument("--mode", default="replicate", choices=["replicate", "parity"])
    args = ap.parse_args()

    root = args.root or tempfile.mkdtemp(prefix="resilient-example-")
    replicas = [os.path.join(root, f"replica-{i}") for i in range(3)]
    if os.environ.get("RESILIENT_STORAGE"):
        store = resilient.CheckpointStore(redundancy=args.mode)
    else:
        store = resilient.CheckpointStore(storage=replicas, redundancy=args.mode)
    print(f"store: {store}")

    model = build_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with store:
        for step in range(1, 4):
            loss = train_step(model, opt)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "loss": loss}
            commit = store.save("example/model", state)
            print(f"saved generation {commit.generation} (step {step}, {commit.length / 1e6:.2f} MB stored, "
                  f"{len(commit.acked)} replicas)")

        lost = store.replicas[1].url
        shutil.rmtree(replicas[1], ignore_errors=True)
        print(f"destroyed replica {lost}")

        loaded = store.load("example/model")
        print(f"loaded generation {loaded.generation}; read-repair rewrote {len(loaded.repaired)} objects")
        restored = build_model(seed=123)
        restored.load_state_dict(loaded.state["model"])
        probe = torch.randn(8, 64)
        same = torch.equal(restored(probe), model(probe))
        steps_ok = loaded.state["step"] == 3 and loaded.state["optimizer"]["state"][0]["step"] == 3
        store.repair()
        report = store.verify()
        print(f"outputs identical: {same}; optimizer state restored: {steps_ok}; "
              f"verify: {'ok' if report.ok else [str(p) for p in report.problems]}")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if same and steps_ok and report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
