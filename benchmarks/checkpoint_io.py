"""Checkpoint save/load cost of `resilient` next to baselines measured in the same run.

Builds a realistic state (fp32 weights, a bf16 block, int64 token buffers; ~512 MB by default) and
times, each as the median of several runs after a warm-up:

  raw        the state's bytes written to one file + fsync (what the disk allows)
  raw x2/x3  the same bytes to 2/3 files in parallel + fsync
  torch      torch.save to one file + fsync
  resilient  CheckpointStore.save to 1, 2 and 3 local targets (replicated)
  async      the time save_async blocks the caller (buffers reused), against a synchronous save
  load       CheckpointStore.load against torch.load(weights_only=True), both from the page cache
  dead       save and load with 3 replicas, one an S3 endpoint on 127.0.0.1 that accepts connections and
             never answers, against the same with 3 healthy local replicas (write quorum 2)
  coders     striping throughput on --coder-mb of random bytes in 1 MiB blocks: XOR parity (4+1) encode,
             Reed-Solomon RS(4+2) encode and decode with two data shards lost; storage overheads

The last line printed is one JSON object with the ratios (time / baseline time, lower is better, except
compression ratios and throughputs). Usage:

    python benchmarks/checkpoint_io.py [--size-mb 512] [--repeat 3] [--dir PATH] [--only dead]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import torch

from resilient import codec
from resilient.storage import CheckpointStore
from resilient.storage.erasure import RsStriper, rebuild
from resilient.storage.parity import Striper
from resilient.testing import SilentServer


def build_state(size_mb: int) -> dict:
    """~size_mb MB: 75% fp32 weights, 12.5% bf16, 12.5% int64 token ids."""
    g = torch.Generator().manual_seed(0)
    total = size_mb * 2**20
    fp32_elems = int(total * 0.75) // 4
    layers = max(1, fp32_elems // (2048 * 2048))
    per = fp32_elems // layers
    weights = {f"layer{i}.weight": torch.randn(per, generator=g) * 0.02 for i in range(layers)}
    bf16 = (torch.randn(int(total * 0.125) // 2, generator=g) * 0.02).bfloat16()
    ids = torch.randint(0, 50_000, (int(total * 0.125) // 8,), generator=g, dtype=torch.int64)
    return {"model": weights, "cache": {"kv": bf16}, "tokens": ids, "step": 12345}


def tensors(state: dict) -> list[torch.Tensor]:
    out = []
    for v in state.values():
        if isinstance(v, dict):
            out += tensors(v)
        elif isinstance(v, torch.Tensor):
            out.append(v)
    return out


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(state))


def write_raw(state: dict, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors(state):
            view = memoryview(t.view(torch.uint8).numpy()) if t.dtype == torch.bfloat16 else memoryview(t.numpy())
            view = view.cast("B")
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_raw_parallel(state: dict, paths: list[str]) -> None:
    threads = [threading.Thread(target=write_raw, args=(state, p)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def torch_save(state: dict, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def timed(fn: Callable[[], object], repeat: int, cleanup: Callable[[], None] | None = None) -> float:
    fn()  # warm-up (allocations, page cache of the code, buffers)
    if cleanup:
        cleanup()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if cleanup:
            cleanup()
    return statistics.median(times)


def fresh_dirs(base: str, n: int, tag: str) -> list[str]:
    out = []
    for i in range(n):
        d = os.path.join(base, f"{tag}-{i}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        out.append(d)
    return out


def compression_ratio(t: torch.Tensor, threads: int) -> tuple[float, float]:
    """(raw/stored ratio, MB/s of encoding) for one tensor under the default settings."""
    state = {"t": t}
    t0 = time.perf_counter()
    stored = sum(memoryview(c).nbytes for c in codec.encode(state, threads=threads))
    dt = time.perf_counter() - t0
    raw = t.numel() * t.element_size()
    return raw / stored, raw / dt / 1e6


def coder_speeds(size_mb: int, repeat: int) -> dict[str, float]:
    """MB/s of object bytes: XOR 4+1 encode, RS(4+2) encode, RS(4+2) rebuild of two lost data shards."""
    data = os.urandom(size_mb << 20)
    block = 1 << 20

    def encode(striper: Striper) -> list[list]:
        shards: list[list] = [[] for _ in range(6)]
        for stripe in list(striper.feed(data)) + list(striper.finish()):
            for i, b in enumerate(stripe):
                shards[i].append(b)
        return shards

    xor_s = timed(lambda: encode(Striper(k=4, block=block)), repeat)
    rs_s = timed(lambda: encode(RsStriper(k=4, m=2, block=block)), repeat)
    shards = [b"".join(bytes(b) for b in s) for s in encode(RsStriper(k=4, m=2, block=block))]
    lost = [None, None] + shards[2:]
    dec_s = timed(lambda: rebuild(lost, 4, 2, block, [0, 1]), repeat)
    mb = len(data) / 1e6
    return {"xor_encode_mb_s": mb / xor_s, "rs_encode_mb_s": mb / rs_s, "rs_decode_mb_s": mb / dec_s}


def dead_replica_ratios(state: dict, base: str, repeat: int) -> dict[str, float]:
    """Save and load times with one replica that never answers, over the same with all healthy."""
    res: dict[str, float] = {}
    healthy = CheckpointStore(storage=fresh_dirs(base, 3, "healthy"), keep=1)
    res["save_healthy_s"] = timed(lambda: healthy.save("bench", state), repeat)
    res["load_healthy_s"] = timed(lambda: healthy.load("bench", repair=False), repeat)
    healthy.close()
    with SilentServer() as silent:
        options = {"s3": {"endpoint_url": silent.url, "key": "bench", "secret": "bench",
                          "client_kwargs": {"region_name": "us-west-2"}}}
        dead = CheckpointStore(storage=fresh_dirs(base, 2, "dead") + ["s3://silent/ckpt"],
                               storage_options=options, keep=1)
        res["save_dead_replica_s"] = timed(lambda: dead.save("bench", state), repeat)
        res["load_dead_replica_s"] = timed(lambda: dead.load("bench", repair=False), repeat)
        dead.close()
    return {
        "save_with_dead_replica_vs_healthy": res["save_dead_replica_s"] / res["save_healthy_s"],
        "load_with_dead_replica_vs_healthy": res["load_dead_replica_s"] / res["load_healthy_s"],
        **{k: round(v, 4) for k, v in res.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under ./.resilient)")
    ap.add_argument("--coder-mb", type=int, default=64, help="bytes striped by the coder benchmark (MiB)")
    ap.add_argument("--only", choices=["dead"], default=None, help="run only the dead-replica benchmark")
    args = ap.parse_args()
    os.makedirs(".resilient", exist_ok=True)
    base = tempfile.mkdtemp(prefix="bench-io-", dir=args.dir or ".resilient")
    try:
        state = build_state(args.size_mb)
        size = nbytes(state)
        mb = size / 1e6
        print(f"state: {mb:.0f} MB in {len(tensors(state))} tensors; writing under {base}")
        r = args.repeat
        if args.only == "dead":
            dead = dead_replica_ratios(state, base, r)
            print(json.dumps({k: round(v, 3) for k, v in dead.items()}))
            return
        res: dict[str, float] = {}

        res["raw_s"] = timed(lambda: write_raw(state, os.path.join(base, "raw.bin")), r)
        for n in (2, 3):
            paths = [os.path.join(base, f"raw{n}-{i}.bin") for i in range(n)]
            res[f"raw_x{n}_s"] = timed(lambda p=paths: write_raw_parallel(state, p), r)
        res["torch_save_s"] = timed(lambda: torch_save(state, os.path.join(base, "torch.pt")), r)

        for n in (1, 2, 3):
            dirs = fresh_dirs(base, n, f"res{n}")
            store = CheckpointStore(storage=dirs, write_quorum=n, keep=1)
            res[f"resilient_{n}_s"] = timed(lambda s=store: s.save("bench", state), r)
            if n == 1:
                def stall(s: CheckpointStore = store) -> None:
                    s.save_async("bench", state)

                res["async_stall_s"] = timed(stall, r, cleanup=store.flush)
                res["load_s"] = timed(lambda s=store: s.load("bench"), r)
            store.close()
        torch_path = os.path.join(base, "torch.pt")
        res["torch_load_s"] = timed(lambda: torch.load(torch_path, weights_only=True), r)

        fp32 = state["model"][next(iter(state["model"]))]
        ratios = {
            "fp32": compression_ratio(fp32, 2),
            "bf16": compression_ratio(state["cache"]["kv"], 2),
            "int64": compression_ratio(state["tokens"], 2),
        }
        coders = coder_speeds(args.coder_mb, r)
        dead = dead_replica_ratios(state, base, r)
        for name, sec in res.items():
            print(f"{name:>16}: {sec:7.3f} s  ({mb / sec:7.0f} MB/s of state)")
        for dt, (ratio, speed) in ratios.items():
            print(f"{dt:>16}: x{ratio:.3f} at {speed:.0f} MB/s")
        for name, speed in coders.items():
            print(f"{name:>16}: {speed:7.0f} MB/s")
        summary = {
            "state_mb": round(mb),
            "save_1_vs_raw": res["resilient_1_s"] / res["raw_s"],
            "save_2_vs_raw_parallel": res["resilient_2_s"] / res["raw_x2_s"],
            "save_3_vs_raw_parallel": res["resilient_3_s"] / res["raw_x3_s"],
            "save_1_vs_torch_save": res["resilient_1_s"] / res["torch_save_s"],
            "async_stall_vs_sync": res["async_stall_s"] / res["resilient_1_s"],
            "load_vs_torch_load": res["load_s"] / res["torch_load_s"],
            "fp32_ratio": ratios["fp32"][0],
            "bf16_ratio": ratios["bf16"][0],
            "bf16_mb_s": ratios["bf16"][1],
            "int64_ratio": ratios["int64"][0],
            **coders,
            **dead,
            "overhead_replicas_3": 3.0,
            "overhead_rs_4_2": 6 / 4,
            "overhead_xor_4_1": 5 / 4,
            **{k: round(v, 4) for k, v in res.items()},
        }
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
