"""Throughput of a `resilient` pipeline next to plain Ray actors and Ray Data, measured in the same run.

The workload: a small MLP (random weights, seeded; 1 torch thread per actor) scores synthetic rows. Batch
``i`` holds the row ids ``i*batch_rows .. (i+1)*batch_rows - 1`` (what `resilient.io.RangeSource` yields);
each row's features are ``sin(id * f + p)`` for seeded frequencies ``f`` and phases ``p``, so every
system computes exactly the same thing from the ids alone. The output of a batch is four columns (id,
label, score, t_done), encoded as Parquet by every system; ``t_done`` is the wall-clock time at which the
actor finished computing the batch.

Systems, all in one process on one ``ray.init(num_cpus=2)``, run one after another and interleaved over
``--repeat`` rounds (the order reversed every other round). Between two systems the page cache's dirty
data is written out (``os.sync``) and the machine left idle for a moment, so that no system pays for the
writes of the one before it (the plain baselines write without fsync: the kernel would flush their files
during the next run):

  plain          N plain Ray actors (``num_cpus`` = resilient's default ``actor_cpus``). The driver makes
                 each batch (the same dict of ids RangeSource gives), sends it round-robin to an actor with
                 room, at most ``queue_depth`` (resilient's default, 2) calls in flight per actor. Each
                 actor computes and writes the batch's Parquet bytes to one file per batch (open, write,
                 close: no fsync). No checkpoint, no retry, no exactly-once: the baseline for overhead.
  plain_durable  the same, but each file is written the way resilient stages it: temporary in the same
                 directory, fsync, rename, fsync of the directory. Separates the cost of durable writes
                 from the cost of the rest of the protocol.
  resilient      ``resilient.pipeline`` with default settings (num_actors=N, standby=1, queue_depth=2,
                 actor_cpus=0.25, batches_per_call="auto"; the environment is ignored), a local Parquet
                 `FileSink` and one local checkpoint directory. Workers encode each output and send it
                 back; the driver commits them in groups (one part file and its index, fsynced, then a
                 marker per batch) at most every 0.1 s, and saves the progress record every second (in
                 the background). With "auto", once the first batches are timed, one actor call carries
                 as many batches as take about 50 ms together (4 of ~12 ms here), while plain sends one
                 batch per call.
  resilient_1    the same with ``batches_per_call=1``: one batch per actor call, as plain does. Shows how
                 much of resilient's figure comes from sharing the cost of a call.
  ray_data       ``ray.data.range -> map_batches(actor pool of N, num_cpus=0.5) -> write_parquet``, with
                 Ray Data's own checkpointing on (``DataContext.checkpoint_config = CheckpointConfig(
                 id_column="id", checkpoint_path=..., delete_checkpoint_on_success=False)``: checkpoint
                 files are kept, like resilient's commit markers). Blocks hold whole batches (8 per block
                 when ``--batches`` divides by 8), so each ``map_batches`` call gets ``batch_rows`` rows; Ray
                 Data writes one output file and one checkpoint file per block, not per batch, and no fsync.

Two figures per run:

  e2e     rows / (job end - job start): includes actor start-up (importing torch, building the model),
          which dominates short runs.
  steady  the rows whose batch finished after the first ``max(2N, batches/10)`` batches, divided by the time
          from that batch's ``t_done`` to the job's end (outputs all written and, for resilient and Ray Data,
          committed). Excludes start-up; includes the commit and finalisation tail. The ratios use this.

Ratios are paired: resilient's steady rate over the other system's in the same round, and the median of
those per-round ratios is reported, so that drift over the run (the machine, the page cache, Ray's own
background work) cancels out. The last line is one JSON object: ``throughput_vs_plain_ray`` (resilient /
plain), ``throughput_vs_ray_data`` (resilient / ray_data), the same against plain_durable and for e2e,
every per-round ratio (``rounds``), the ratio of the median rates (``*_of_medians``) and the raw figures.
Targets: >= 1.0 and >= 1.2. Timings on a shared or loaded machine are noisy: check ``load_avg``.

Usage:
    python benchmarks/pipeline_overhead.py [--batches 1000] [--batch-rows 256] [--actors 2] [--repeat 7]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

SYSTEMS = ("plain", "plain_durable", "resilient", "resilient_1", "ray_data")


class Scorer:
    """The model every system runs: features from row ids, an MLP, argmax and its probability."""

    def __init__(self, features: int, hidden: int, seed: int) -> None:
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        self.torch = torch
        self.freq = (torch.rand(features, generator=g, dtype=torch.float64) * 0.05).unsqueeze(0)
        self.phase = (torch.rand(features, generator=g, dtype=torch.float64) * 6.283).unsqueeze(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, 16),
        ).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        torch = self.torch
        ids = np.asarray(batch["id"], dtype=np.int64)
        with torch.inference_mode():
            x = torch.sin(torch.from_numpy(ids).to(torch.float64).unsqueeze(1) * self.freq + self.phase).float()
            prob, label = self.model(x).softmax(-1).max(-1)
        return {
            "id": ids,
            "label": label.numpy().astype(np.int64),
            "score": prob.numpy(),
            "t_done": np.full(len(ids), time.time(), dtype=np.float64),
        }


def to_parquet(out: dict[str, np.ndarray]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({k: pa.array(v) for k, v in out.items()}), buf)
    return buf.getvalue().to_pybytes()


class PlainWorker:
    """The baseline actor: compute, then write the Parquet bytes to one file per batch."""

    def __init__(self, out_dir: str, durable: bool, features: int, hidden: int, seed: int) -> None:
        self.scorer = Scorer(features, hidden, seed)
        self.out_dir = out_dir
        self.durable = durable

    def ready(self) -> int:
        return os.getpid()

    def process(self, batch_id: int, batch: dict) -> tuple[int, int, float]:
        out = self.scorer(batch)
        data = to_parquet(out)
        path = os.path.join(self.out_dir, f"{batch_id:012d}.parquet")
        if not self.durable:
            with open(path, "wb") as f:
                f.write(data)
        else:
            tmp = f"{path}.tmp-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return batch_id, len(out["id"]), float(out["t_done"][0])


# ------------------------------------------------------------------------------------------------ runs


def make_batch(i: int, batch_rows: int) -> dict[str, np.ndarray]:
    """Batch ``i``, exactly as ``RangeSource(batches * batch_rows, batch_rows)`` yields it."""
    return {"id": np.arange(i * batch_rows, (i + 1) * batch_rows, dtype=np.int64)}


def run_plain(args: argparse.Namespace, work: str, durable: bool, actor_cpus: float, depth: int) -> dict:
    import ray

    out_dir = os.path.join(work, "out")
    os.makedirs(out_dir)
    t0 = time.time()
    cls = ray.remote(max_restarts=0)(PlainWorker).options(num_cpus=actor_cpus)
    actors = [cls.remote(out_dir, durable, args.features, args.hidden, args.seed) for _ in range(args.actors)]
    inflight: dict[int, collections.deque] = {i: collections.deque() for i in range(args.actors)}
    owner: dict[Any, int] = {}
    done_t: list[float] = []
    done_rows: list[int] = []
    seen: set[int] = set()
    nxt, turn = 0, 0
    while nxt < args.batches or owner:
        while nxt < args.batches and any(len(q) < depth for q in inflight.values()):
            a = turn % args.actors  # round-robin over the actors with room
            turn += 1
            if len(inflight[a]) < depth:
                ref = actors[a].process.remote(nxt, make_batch(nxt, args.batch_rows))
                inflight[a].append(ref)
                owner[ref] = a
                nxt += 1
        ready, _ = ray.wait(list(owner), num_returns=1)
        for ref in ready:
            a = owner.pop(ref)
            inflight[a].remove(ref)
            b, rows, t = ray.get(ref)
            seen.add(b)
            done_t.append(t)
            done_rows.append(rows)
    t_end = time.time()
    for a in actors:
        ray.kill(a)
    assert seen == set(range(args.batches)), "plain baseline lost batches"
    return figures(np.array(done_t), np.array(done_rows), t0, t_end, args)


def run_resilient(args: argparse.Namespace, work: str, rep: int, per_call: int | str = "auto") -> dict:
    import resilient
    from resilient.io import FileSink, RangeSource

    settings = resilient.Settings.from_env({}, storage=[os.path.join(work, "ckpt")], num_actors=args.actors,
                                           batches_per_call=per_call)
    sink = FileSink(os.path.join(work, "out"), format="parquet")
    pipe = resilient.pipeline(Scorer)
    t0 = time.time()
    handle = pipe.run(RangeSource(args.batches * args.batch_rows, args.batch_rows), sink, job_id=f"overhead-{rep}-{per_call}",
                      settings=settings, init_args=(args.features, args.hidden, args.seed))
    result = handle.wait()
    t_end = time.time()
    assert result.committed == args.batches and not result.dead_letters, result
    ts, rows, ids = [], [], set()
    for b, out in handle.results():
        ids.add(b)
        ts.append(float(out["t_done"][0]))
        rows.append(len(out["id"]))
    assert ids == set(range(args.batches)), "resilient output is missing batches"
    return {**figures(np.array(ts), np.array(rows), t0, t_end, args), "calls": result.calls}


def run_ray_data(args: argparse.Namespace, work: str) -> dict:
    import pyarrow.parquet as pq
    import ray
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=os.path.join(work, "ckpt"),
                                             delete_checkpoint_on_success=False)
    n_rows = args.batches * args.batch_rows
    per = next(p for p in list(range(8, args.batches + 1)) + [1] if args.batches % p == 0)  # batches per block
    out_dir = os.path.join(work, "out")
    t0 = time.time()
    try:
        ds = ray.data.range(n_rows, override_num_blocks=args.batches // per)
        ds = ds.map_batches(Scorer, fn_constructor_args=(args.features, args.hidden, args.seed),
                            batch_size=args.batch_rows, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=args.actors), num_cpus=0.5)
        ds.write_parquet(out_dir)
        t_end = time.time()
    finally:
        ctx.checkpoint_config = None
    table = pq.read_table(out_dir, columns=["id", "t_done"])
    ids = table.column("id").to_numpy()
    assert len(ids) == n_rows and len(np.unique(ids)) == n_rows, "Ray Data output is not every row once"
    t, counts = np.unique(table.column("t_done").to_numpy(), return_counts=True)
    return figures(t, counts, t0, t_end, args)


def figures(t_done: np.ndarray, rows: np.ndarray, t0: float, t_end: float, args: argparse.Namespace) -> dict:
    """e2e and steady rates from per-batch completion times (see the module docstring)."""
    order = np.argsort(t_done, kind="stable")
    t_done, rows = t_done[order], rows[order]
    k = min(len(t_done) - 1, max(2 * args.actors, len(t_done) // 10))
    steady_rows = float(rows[k:].sum())
    steady_s = max(1e-9, t_end - t_done[k - 1]) if k > 0 else t_end - t0
    total = float(rows.sum())
    return {
        "e2e_s": t_end - t0,
        "e2e_rows_per_s": total / (t_end - t0),
        "steady_s": steady_s,
        "steady_rows_per_s": steady_rows / steady_s,
        "steady_batches_per_s": steady_rows / steady_s / args.batch_rows,
    }


def settle(seconds: float = 1.0) -> None:
    """Between two systems: write out dirty pages, collect garbage, let background work finish."""
    gc.collect()
    os.sync()
    time.sleep(seconds)


def per_batch_ms(args: argparse.Namespace) -> float:
    """Compute time of one batch in this process (1 thread), for the report."""
    s = Scorer(args.features, args.hidden, args.seed)
    s(make_batch(0, args.batch_rows))
    times = []
    for i in range(20):
        t = time.perf_counter()
        s(make_batch(i, args.batch_rows))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--batch-rows", type=int, default=256)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=float, default=2)
    p.add_argument("--dir", default=None, help="parent of the temporary work directory")
    args = p.parse_args()
    if args.batches < 2 or args.batch_rows < 1 or args.actors < 1 or args.repeat < 1:
        p.error("need --batches >= 2 and --batch-rows, --actors, --repeat >= 1")

    from _bytecode import compile_resilient

    compile_resilient()  # as installed from a wheel: workers do not compile it at start

    import ray
    import torch

    import resilient

    torch.set_num_threads(1)
    np.random.seed(args.seed)
    import ray.data  # configures its loggers on import: quiet them after

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    defaults = resilient.Settings.from_env({}, storage=[tempfile.gettempdir()])
    ms = per_batch_ms(args)
    print(f"model: {args.features}->{args.hidden}->{args.hidden}->16 MLP, {args.batch_rows} rows/batch: "
          f"{ms:.1f} ms/batch (1 thread, driver); {args.batches} batches x {args.actors} actors", flush=True)

    root = tempfile.mkdtemp(prefix="resilient-overhead-", dir=args.dir)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    try:
        for rep in range(args.repeat):
            order = SYSTEMS if rep % 2 == 0 else tuple(reversed(SYSTEMS))  # alternate to spread drift
            for system in order:
                work = tempfile.mkdtemp(prefix=f"{system}-{rep}-", dir=root)
                if system == "plain":
                    r = run_plain(args, work, False, defaults.actor_cpus, defaults.queue_depth)
                elif system == "plain_durable":
                    r = run_plain(args, work, True, defaults.actor_cpus, defaults.queue_depth)
                elif system == "resilient":
                    r = run_resilient(args, work, rep)
                elif system == "resilient_1":
                    r = run_resilient(args, work, rep, per_call=1)
                else:
                    r = run_ray_data(args, work)
                shutil.rmtree(work, ignore_errors=True)
                settle()
                runs[system].append(r)
                print(f"  round {rep + 1}: {system:14s} steady {r['steady_batches_per_s']:8.1f} batches/s "
                      f"{r['steady_rows_per_s']:10.0f} rows/s | e2e {r['e2e_s']:6.2f} s "
                      f"{r['e2e_rows_per_s']:10.0f} rows/s" + (f" | {r['calls']} calls" if "calls" in r else ""),
                      flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0] if k != "calls"} for s in SYSTEMS}
    for s in SYSTEMS:
        m = med[s]
        print(f"{s:14s} steady {m['steady_batches_per_s']:8.1f} batches/s {m['steady_rows_per_s']:10.0f} rows/s"
              f" | e2e {m['e2e_rows_per_s'] / args.batch_rows:8.1f} batches/s {m['e2e_rows_per_s']:10.0f} rows/s"
              f" (median of {args.repeat})")

    def rounds(a: str, b: str, key: str = "steady_rows_per_s") -> list[float]:
        return [round(x[key] / y[key], 4) for x, y in zip(runs[a], runs[b])]

    def ratio(a: str, b: str, key: str = "steady_rows_per_s") -> float:
        """The median of the per-round ratios (paired: both systems measured in the same round)."""
        return round(statistics.median(rounds(a, b, key)), 4)

    def of_medians(a: str, b: str, key: str = "steady_rows_per_s") -> float:
        return round(med[a][key] / med[b][key], 4)

    report = {
        "throughput_vs_plain_ray": ratio("resilient", "plain"),
        "throughput_vs_ray_data": ratio("resilient", "ray_data"),
        "throughput_vs_plain_ray_durable": ratio("resilient", "plain_durable"),
        "throughput_vs_plain_ray_one_per_call": ratio("resilient_1", "plain"),
        "e2e_vs_plain_ray": ratio("resilient", "plain", "e2e_rows_per_s"),
        "e2e_vs_ray_data": ratio("resilient", "ray_data", "e2e_rows_per_s"),
        "targets": {"throughput_vs_plain_ray": 1.0, "throughput_vs_ray_data": 1.2},
        "rounds": {"throughput_vs_plain_ray": rounds("resilient", "plain"),
                   "throughput_vs_ray_data": rounds("resilient", "ray_data"),
                   "throughput_vs_plain_ray_durable": rounds("resilient", "plain_durable"),
                   "throughput_vs_plain_ray_one_per_call": rounds("resilient_1", "plain")},
        "calls": {s: [r["calls"] for r in runs[s]] for s in ("resilient", "resilient_1")},
        "throughput_vs_plain_ray_of_medians": of_medians("resilient", "plain"),
        "throughput_vs_ray_data_of_medians": of_medians("resilient", "ray_data"),
        "steady_rows_per_s": {s: round(med[s]["steady_rows_per_s"], 1) for s in SYSTEMS},
        "steady_batches_per_s": {s: round(med[s]["steady_batches_per_s"], 2) for s in SYSTEMS},
        "e2e_rows_per_s": {s: round(med[s]["e2e_rows_per_s"], 1) for s in SYSTEMS},
        "e2e_s": {s: round(med[s]["e2e_s"], 3) for s in SYSTEMS},
        "all_steady_rows_per_s": {s: [round(r["steady_rows_per_s"], 1) for r in runs[s]] for s in SYSTEMS},
        "compute_ms_per_batch": round(ms, 2),
        "batches": args.batches,
        "batch_rows": args.batch_rows,
        "actors": args.actors,
        "repeat": args.repeat,
        "num_cpus": args.num_cpus,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
