"""Output-heavy throughput: `resilient` writing ~1 MB per batch next to plain Ray actors writing their own
files, measured in the same run; and what the driver and the object store carry per batch.

The workload: batch ``i`` holds row ids ``i*rows .. (i+1)*rows - 1`` (what `resilient.io.RangeSource`
yields); each row's output is a ``dim``-float32 embedding drawn from a generator seeded with the batch's first
id (incompressible, 1 MiB per batch at the defaults 256 x 1024), its id, and ``t_done``, the wall-clock time
at which the actor finished computing the batch. Every system computes exactly the same thing.

Systems, in one process on one ``ray.init(num_cpus=2)``, interleaved over ``--repeat`` rounds (the order
reversed every other round: keep ``--repeat`` even, as the system that runs second in a round is often
the slower here), with the page cache written out (``os.sync``) between two systems:

  plain      N plain Ray actors (``num_cpus=0.25``, resilient's default ``actor_cpus``), each batch sent
             round-robin with at most 2 calls in flight per actor. Each actor writes its batch's Parquet
             file itself (open, write, fsync, close; one file per batch). No checkpoint, no retry, no
             exactly-once: the baseline.
  resilient  ``resilient.pipeline`` with default settings (num_actors=N, the environment ignored) into a
             local ``FileSink(format="parquet")``: each worker writes its batch's file under ``_staging/``
             (write, fsync) and answers a ~250-byte record; the driver publishes a group's files with
             ``link()`` and one directory fsync and records the group in ``_commit/``.

Figures:

  throughput_vs_plain_writers  median over rounds of resilient's steady rate over plain's in the same
               round. Steady: the rows whose batch finished after the first ``max(2N, batches/10)``
               batches, over the time from that batch's ``t_done`` to the job's end (for resilient, every
               output committed). Excludes actor start-up. Goal: >= 0.95.
  driver_bytes_per_batch  what a worker's answer for one batch weighs on its way to the driver: the
               `resilient.runtime.protocol.Result` holding the run's real `StagedOutput` of a batch, as Ray
               serializes it (cloudpickle). Goal: <= 1000.
  requests_per_batch  S3 requests the moto server logged while a resilient job of ``--s3-batches`` batches
               wrote to an ``s3://`` sink (checkpoints local), over the committed batches; by kind too.

The last line is one JSON object with these figures and the raw ones.

Usage:
    python benchmarks/output_heavy.py [--batches 300] [--rows 256] [--dim 1024] [--actors 2] [--repeat 4]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


class Embedder:
    """The model every system runs: a seeded float32 embedding per row, from the batch's ids alone."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"])
        rng = np.random.default_rng(int(ids[0]))
        emb = rng.standard_normal((len(ids), self.dim), dtype=np.float32)
        return {"id": ids, "emb": emb, "t_done": np.full(len(ids), time.time())}


class PlainWriter:
    """The baseline actor: compute, then write the batch's own Parquet file (fsynced)."""

    def __init__(self, out_dir: str, dim: int) -> None:
        self.model = Embedder(dim)
        self.out_dir = out_dir

    def ready(self) -> int:
        return os.getpid()

    def process(self, batch_id: int, batch: dict) -> tuple[int, int]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = self.model(batch)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(out["emb"].reshape(-1)), out["emb"].shape[1])
        table = pa.table({"id": out["id"], "emb": emb, "t_done": out["t_done"]})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue()
        fd = os.open(os.path.join(self.out_dir, f"part-{batch_id:012d}.parquet"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, memoryview(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        return batch_id, len(out["id"])


def make_batch(i: int, rows: int) -> dict[str, np.ndarray]:
    return {"id": np.arange(i * rows, (i + 1) * rows, dtype=np.int64)}


def steady(out_dir: str, t_end: float, args: argparse.Namespace) -> dict:
    """Rows per second after the first batches, from the ``t_done`` column of the files readers see."""
    import pyarrow.dataset as ds

    table = ds.dataset(out_dir, format="parquet").to_table(columns=["id", "t_done"])
    assert sorted(table.column("id").to_pylist()) == list(range(args.batches * args.rows)), "rows lost or repeated"
    done = np.sort(np.unique(table.column("t_done").to_numpy()))
    skip = max(2 * args.actors, args.batches // 10)
    return {"steady_rows_per_s": (len(done) - skip) * args.rows / (t_end - done[skip - 1])}


def run_plain(args: argparse.Namespace, work: str) -> dict:
    import ray

    out_dir = os.path.join(work, "out")
    os.makedirs(out_dir)
    actors = [ray.remote(max_restarts=0)(PlainWriter).options(num_cpus=0.25).remote(out_dir, args.dim)
              for _ in range(args.actors)]
    ray.get([a.ready.remote() for a in actors])
    inflight: dict[Any, int] = {}
    per_actor = collections.Counter()
    nxt = 0
    while nxt < args.batches or inflight:
        for a in range(args.actors):
            while nxt < args.batches and per_actor[a] < 2:
                inflight[actors[a].process.remote(nxt, make_batch(nxt, args.rows))] = a
                per_actor[a] += 1
                nxt += 1
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            per_actor[inflight.pop(ref)] -= 1
            ray.get(ref)
    t_end = time.time()
    for a in actors:
        ray.kill(a)
    return steady(out_dir, t_end, args)


def run_resilient(args: argparse.Namespace, work: str, rep: int, url: str | None = None,
                  batches: int | None = None) -> tuple[dict, Any]:
    import resilient
    from resilient.io import FileSink, RangeSource

    n = batches or args.batches
    settings = resilient.Settings.from_env({}, storage=[os.path.join(work, "ckpt")], num_actors=args.actors)
    sink = FileSink(url or os.path.join(work, "out"), format="parquet",
                    storage_options=args.s3_options if url else None)
    handle = resilient.pipeline(Embedder).run(RangeSource(n * args.rows, args.rows), sink, job_id=f"heavy-{rep}",
                                              settings=settings, init_args=(args.dim,))
    result = handle.wait()
    t_end = time.time()
    assert result.committed == n and not result.dead_letters, result
    return ({} if url else steady(os.path.join(work, "out"), t_end, args)), sink


def driver_bytes(sink: Any, args: argparse.Namespace) -> int:
    """The pickled size of one batch's answer as a worker sends it: the Result around a real StagedOutput."""
    from ray import cloudpickle

    from resilient.runtime.protocol import Result

    staged = sink.encode(args.batches + 1, Embedder(args.dim)(make_batch(args.batches + 1, args.rows)), epoch=3)
    return len(cloudpickle.dumps(Result(staged.batch_id, 0, 3, staged, 0.0123, staged.batch_id + 1)))


_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')


def s3_requests(args: argparse.Namespace, work: str) -> dict:
    """Run a resilient job into an ``s3://`` sink on a moto server of our own; count its logged requests."""
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = os.path.join(work, "moto.log")
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        args.s3_options = {"endpoint_url": endpoint, "client_kwargs": {"region_name": "eu-west-1"},
                           "config_kwargs": {"s3": {"addressing_style": "path"}}}
        deadline = time.monotonic() + 60
        while True:
            try:
                s3fs.S3FileSystem(**args.s3_options, skip_instance_cache=True).mkdir("heavy")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        before = len(open(log_path, "rb").read().splitlines())
        run_resilient(args, work, 99, url="s3://heavy/out", batches=args.s3_batches)
        time.sleep(0.5)  # the server writes its log line after the answer
        lines = open(log_path, "rb").read().decode(errors="replace").splitlines()[before:]
    finally:
        server.terminate()
        server.wait(10)
    kinds: collections.Counter = collections.Counter()
    for line in lines:
        m = _REQUEST.search(line)
        if m:
            query = m[2].partition("?")[2]
            keys = ",".join(sorted(k.split("=")[0] for k in query.split("&") if k and not k.startswith("x-id")))
            kinds[f"{m[1]} {keys}".strip()] += 1
    return {"requests_per_batch": round(sum(kinds.values()) / args.s3_batches, 2), "requests": dict(kinds)}


def settle() -> None:
    gc.collect()
    os.sync()
    time.sleep(1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--s3-batches", type=int, default=40)
    p.add_argument("--dir", default=None, help="parent of the temporary work directory")
    args = p.parse_args()
    import ray

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # the benchmark's own moto server takes any key
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    logging.getLogger("resilient").setLevel(logging.WARNING)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    root = tempfile.mkdtemp(prefix="output-heavy-", dir=args.dir)
    runs: dict[str, list[dict]] = {"plain": [], "resilient": []}
    sink = None
    try:
        for rep in range(args.repeat):
            order = ("plain", "resilient") if rep % 2 == 0 else ("resilient", "plain")
            for system in order:
                work = os.path.join(root, f"{system}-{rep}")
                os.makedirs(work)
                settle()
                if system == "plain":
                    runs[system].append(run_plain(args, work))
                else:
                    fig, sink = run_resilient(args, work, rep)
                    runs[system].append(fig)
                print(system, rep, json.dumps(runs[system][-1]), flush=True)
                shutil.rmtree(work)
        assert sink is not None
        bytes_per_batch = driver_bytes(sink, args)
        os.makedirs(os.path.join(root, "s3"))
        s3 = s3_requests(args, os.path.join(root, "s3"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    ratios = [r["steady_rows_per_s"] / p_["steady_rows_per_s"] for r, p_ in zip(runs["resilient"], runs["plain"])]
    report = {
        "throughput_vs_plain_writers": round(statistics.median(ratios), 3),
        "driver_bytes_per_batch": bytes_per_batch,
        "requests_per_batch": s3["requests_per_batch"],
        "rounds": [round(r, 3) for r in ratios],
        "plain_rows_per_s": [round(r["steady_rows_per_s"]) for r in runs["plain"]],
        "resilient_rows_per_s": [round(r["steady_rows_per_s"]) for r in runs["resilient"]],
        "mb_per_batch": round(args.rows * args.dim * 4 / 2**20, 2),
        "s3_requests": s3["requests"], "s3_batches": args.s3_batches,
        "batches": args.batches, "actors": args.actors, "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
