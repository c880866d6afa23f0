"""How fast a `resilient` job recovers: actor failover next to a bare Ray restart, and resume at 1M batches.

1. Failover. A stateful pipeline (an MLP with random, seeded weights, 1 torch thread; its state is the
   model's weights plus two running counters, so a replacement restores a model-sized checkpoint) runs
   over synthetic rows on ``--actors`` slots with ``checkpoint_every`` batches per slot checkpoint. Once
   slot 0 has ``--kill-after / actors`` + *k* of its own batches committed, in order (read from the
   sink's commit markers; and, with a standby, once the standby answers a call: its model is built), the
   worker actor of slot 0 is SIGKILLed by PID (from ``handle.actors()``). A crash comes at any point of
   the slot's checkpoint cycle (``checkpoint_every`` of its batches), and a fixed count always lands at
   the same point of it (*k* = 0: right as the slot's snapshot at cursor ``--kill-after`` is being
   persisted), so *k* varies over the jobs: spread evenly over the cycle (``--kill-phase spread``, the
   default: job *r* of *R* kills at ``r * checkpoint_every // R``), drawn at random (``random``, seeded)
   or 0 (``fixed``). (The phase is counted in slot 0's own batches: counted over all slots' commits, as
   earlier versions did, it lands unevenly in slot 0's cycle, because the slots do not keep pace.)
   The script then polls ``handle.events()`` and the sink's commit markers every 2 ms:

     detect_s        kill -> the supervisor's ("restart", {...}) event (it saw the death)
     started_s       kill -> ("started", {"slot": 0, ...}): the replacement restored the slot checkpoint
     failover_s      kill -> the commit marker of the first redelivered batch (the lowest batch that was
                     in flight on the killed actor, from the restart event): the first output the
                     replacement makes visible. It includes replaying the slot's batches from the restored
                     checkpoint's cursor up to that batch (reported as ``replayed``; at most
                     ``checkpoint_every`` + in-flight batches).
     all_redelivered_s  kill -> every redelivered batch committed.

   Measured with the default ``standby=1`` (hot: a spare actor, model built, takes over) as
   ``failover_s``, with ``standby=0`` (cold: a fresh actor imports torch and builds the model) as
   ``failover_cold_s``, and with the standby but hot snapshots off (``hot_snapshot_max_mb=0``: the
   replacement restores the persisted checkpoint from storage) as ``failover_stored_s``, the three
   interleaved; medians over ``--repeat`` jobs each. ``failover_from_hot`` counts the hot runs whose
   replacement started from the slot's hot snapshot. Each job then runs to completion and every batch
   must be committed exactly once (counted from the commit markers). ``failover_hot_target_met``:
   ``failover_s <= 0.25``.

   Next to it, in the same Ray instance: a bare Ray actor (``max_restarts=1``) that imports torch and
   builds the same model; SIGKILL by PID, time until it answers a call again (``bare_ray_restart_s``).
   The restarted actor reports its own ``torch_import_s`` and ``model_init_s`` (building the model, torch
   already imported). ``state_load_s``: a fresh `CheckpointStore` loading a slot checkpoint of the same
   state from a local directory, plus ``load_state_dict``. Target: ``failover_s <= bare_ray_restart_s +
   model_init_s + state_load_s + 0.5``, checked for both modes (``failover_target_met``).
   Ray is started with ``timeout_ms_task_wait_for_death_info=0``, as `resilient` starts it itself.

2. Resume at 1M. A job directory as the runtime leaves it after committing batches ``0..999,999`` of a
   1M-batch job and dying before its last progress save: the job record (written by the supervisor's own
   ``_open_job``), a progress record with the watermark ``--resume-lag`` batches behind (written by the
   driver's own ``_progress_record``), the sink's layout record and one real committed output (through
   ``FileSink.commit_group``), and the committed data files ``part-<b:012d>.parquet`` (hard links to the
   real one: resume lists names, never reads them). By default only the files past the watermark are
   written (``--resume-all-markers`` writes all 1M, slow; locally resume passes over every name of the
   root once, holding only those past the watermark). Then a fresh subprocess imports `resilient`
   (which loads torch), records its peak RSS, and times ``Supervisor._open_job()`` and
   ``Supervisor._resume()``; ``resume_1m_rss_mb`` is its peak RSS after resuming minus its peak RSS right
   after the imports, ``resume_1m_rss_abs_mb`` the absolute peak. With ``--resume-full-run`` it then also
   runs ``Supervisor.run()`` on the finished job (joining this script's Ray instance).

3. What hot snapshots cost (``--skip-hot-cost`` skips it). The same stateful job (standby 1, no kills,
   ``--hot-cost-batches``, ``--hot-cost-checkpoint-every``) with hot snapshots on and off, in alternating
   order over ``--hot-cost-rounds`` rounds; throughput from the 100th committed batch to the end.
   ``hot_snapshot_throughput_ratio``: the median of the rounds' on/off ratios (each snapshot is also
   copied into the object store).

4. Preemption. In a child process, a multi-node cluster on this machine (a head with no CPUs, three
   raylets of one CPU; `ray.cluster_utils.Cluster`) runs the same stateful job with a standby, actors
   spread over the nodes (``scheduling_strategy="SPREAD"``). Once ``--kill-after`` batches are
   committed and the standby is built, the node of slot 0's actor is drained the way KubeRay, a managed
   platform or ``ray drain-node`` drains it (reason PREEMPTION, 30 s deadline); once the slot is handed
   over the node is removed, and a fresh node joins for the next round:

     preemption_handover_s    drain request -> the commit marker of the first batch run by the new
                              incarnation (it includes the driver's drain polling, ``DRAIN_POLL_S``)
     preemption_replayed      batches of slot 0 the new incarnation ran again (committed before it took
                              over): 0 when the hand-over persisted the slot exactly
     preemption_attempts_charged  failed attempts counted in the job (retries): 0

   Medians over ``--repeat`` drains; every job must commit each batch exactly once.

The last line printed is one JSON object with at least ``failover_s``, ``failover_cold_s``,
``failover_stored_s``, ``bare_ray_restart_s``, ``model_init_s``, ``state_load_s``, ``resume_1m_s``,
``resume_1m_rss_mb``, ``resume_1m_rss_abs_mb``, ``hot_snapshot_throughput_ratio``,
``preemption_handover_s``, ``preemption_replayed`` and ``preemption_attempts_charged``. Timings on a
shared or loaded machine are noisy: check ``load_avg``.

Usage:
    python benchmarks/recovery.py [--batches 600] [--batch-rows 256] [--actors 2] [--repeat 5]
                                  [--batches-per-call auto|N]

``--batches-per-call`` sets ``RESILIENT_BATCHES_PER_CALL`` for the failover jobs (default ``auto``, as
resilient's default): with calls of several batches a slot's persisted checkpoint trails further behind,
and ``failover_replayed`` grows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

JOB_1M = "resume-1m"


class StatefulScorer:
    """The pipeline: features from row ids, an MLP, running counters; its state includes the weights."""

    def __init__(self, features: int, hidden: int, seed: int) -> None:
        t0 = time.perf_counter()
        import torch

        t1 = time.perf_counter()
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(seed)
        self.torch = torch
        self.freq = (torch.rand(features, generator=g, dtype=torch.float64) * 0.05).unsqueeze(0)
        self.phase = (torch.rand(features, generator=g, dtype=torch.float64) * 6.283).unsqueeze(0)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, 16),
        ).eval()
        self.seen = 0
        self.score_sum = 0.0
        self.timing = {"torch_import_s": t1 - t0, "model_init_s": time.perf_counter() - t1}

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        torch = self.torch
        ids = np.asarray(batch["id"], dtype=np.int64)
        with torch.inference_mode():
            x = torch.sin(torch.from_numpy(ids).to(torch.float64).unsqueeze(1) * self.freq + self.phase).float()
            prob, label = self.model(x).softmax(-1).max(-1)
        self.seen += len(ids)
        self.score_sum += float(prob.sum())
        return {"id": ids, "label": label.numpy().astype(np.int64), "score": prob.numpy()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "seen": self.seen, "score_sum": self.score_sum}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.seen = int(state["seen"])
        self.score_sum = float(state["score_sum"])


class BareModel:
    """The bare Ray baseline: an actor that imports torch and builds the same model, nothing else."""

    def __init__(self, features: int, hidden: int, seed: int) -> None:
        self.scorer = StatefulScorer(features, hidden, seed)

    def ping(self) -> tuple[int, dict]:
        return os.getpid(), self.scorer.timing


def settings_for(ckpt: str, **options: Any):
    import resilient

    return resilient.Settings.from_env({}, storage=[ckpt], **options)  # the environment is ignored


def start_job(args: argparse.Namespace, work: str, job_id: str, batches: int, *, standby: int, hot: bool = True,
              checkpoint_every: int | None = None, **options: Any) -> tuple[Any, str]:
    """Run the stateful pipeline over `batches` synthetic batches into ``<work>/out`` (checkpoints under
    ``<work>/ckpt``); ``hot=False`` turns hot snapshots off. Returns the job's handle and the sink's path."""
    import resilient
    from resilient.io import FileSink, RangeSource

    out = os.path.join(work, "out")
    settings = settings_for(os.path.join(work, "ckpt"), num_actors=args.actors, standby=standby,
                            checkpoint_every=checkpoint_every or args.checkpoint_every,
                            batches_per_call=args.batches_per_call,
                            **options, **({} if hot else {"hot_snapshot_max_mb": 0}))
    handle = resilient.pipeline(StatefulScorer).run(
        RangeSource(batches * args.batch_rows, args.batch_rows), FileSink(out, format="parquet"),
        job_id=job_id, settings=settings, init_args=(args.features, args.hidden, args.seed))
    return handle, out


# ------------------------------------------------------------------------------------------- failover


def finish_exactly_once(handle: Any, probe: Any, args: argparse.Namespace, after: str) -> Any:
    """Wait for the job; raise unless every batch is committed exactly once (counted from the markers)."""
    result = handle.wait(timeout=600)
    committed = list(probe.committed_from(0))
    if committed != list(range(args.batches)) or result.committed != args.batches:
        raise RuntimeError(f"not exactly once after {after}: {len(committed)} markers, {result}")
    return result


def measure_preemption_round(args: argparse.Namespace, root: str, cluster: Any, nodes: dict, rep: int) -> dict:
    import ray

    from resilient.io import FileSink
    from resilient.runtime import events as ev
    from resilient.testing import announce_preemption

    work = tempfile.mkdtemp(prefix=f"preempt-{rep}-", dir=root)
    handle, out = start_job(args, work, f"preempt-{rep}", args.batches, standby=1,
                            ray_remote_args={"scheduling_strategy": "SPREAD"})
    probe = FileSink(out, format="parquet")
    try:
        while handle.progress()["committed"] < args.kill_after or not handle._supervisor.spares:
            if handle.done():
                handle.wait()
                raise RuntimeError("the job ended before the drain: raise --batches")
            time.sleep(0.005)
        ray.get([a.ready.remote() for a in list(handle._supervisor.spares)])  # the standby is built
        victim = next(a for a in handle.actors() if a["slot"] == 0)
        base = len(handle.events())
        t0 = time.monotonic()
        announce_preemption(victim["node_id"], 30.0, address=cluster.address)
        r: dict[str, Any] = {}
        first: int | None = None
        while time.monotonic() - t0 < args.failover_timeout:
            for event in handle.events()[base:]:
                base += 1
                if getattr(event, "slot", None) != 0:
                    continue
                if isinstance(event, ev.ActorReplaced) and "replaced_s" not in r:
                    r["replaced_s"] = time.monotonic() - t0
                    r["reason"] = event.reason
                elif isinstance(event, ev.ActorStarted) and "replaced_s" in r and first is None:
                    r["started_s"] = time.monotonic() - t0
                    b = first = event.cursor
                    while b < args.batches and probe.is_committed(b):  # committed before: run again
                        b += args.actors
                    r["replayed"] = (b - first) // args.actors
                    first = b
            if first is not None and (first >= args.batches or probe.is_committed(first)):
                r["handover_s"] = time.monotonic() - t0
                break
            time.sleep(0.002)
        else:
            raise RuntimeError(f"no hand-over within {args.failover_timeout}s: {r}")
        cluster.remove_node(nodes.pop(victim["node_id"]))
        result = finish_exactly_once(handle, probe, args, "the hand-over")
        r["exactly_once"], r["attempts_charged"] = True, result.retries
        return r
    finally:
        if not handle.done():
            handle.wait(timeout=600)
        shutil.rmtree(work, ignore_errors=True)


def preemption_child(args: argparse.Namespace) -> None:
    """The preemption rounds on a cluster of this process's own; prints one JSON line."""
    import ray
    from ray.cluster_utils import Cluster

    root = tempfile.mkdtemp(prefix="resilient-preempt-", dir=args.dir)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"timeout_ms_task_wait_for_death_info": 0}})
    try:
        ray.init(address=cluster.address, log_to_driver=False)  # on the head's raylet, never removed
        nodes = {}
        for _ in range(3):
            n = cluster.add_node(num_cpus=1)
            nodes[n.node_id] = n
        cluster.wait_for_nodes()
        rounds = []
        for rep in range(args.repeat):
            rounds.append(measure_preemption_round(args, root, cluster, nodes, rep))
            n = cluster.add_node(num_cpus=1)  # the capacity comes back
            nodes[n.node_id] = n
            cluster.wait_for_nodes()
            r = rounds[-1]
            print(f"  preemption: handed over {r['replaced_s']:.3f} s, started {r['started_s']:.3f} s, first commit "
                  f"of the new incarnation {r['handover_s']:.3f} s (replayed {r['replayed']}, charged "
                  f"{r['attempts_charged']})", file=sys.stderr, flush=True)
        print(json.dumps(rounds))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def measure_preemption(args: argparse.Namespace) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--preemption-child", "1", *sys.argv[1:]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the preemption rounds failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kill_phase(args: argparse.Namespace, standby: int, rep: int) -> int:
    """How many of slot 0's batches past ``--kill-after / actors`` job `rep` kills at, within one
    checkpoint cycle of the slot: evenly spread over the jobs (``--kill-phase spread``), seeded at random
    (``random``), or 0 (``fixed``)."""
    cycle = args.checkpoint_every
    if args.kill_phase == "fixed":
        return 0
    if args.kill_phase == "spread":
        return rep * cycle // args.repeat
    return random.Random(f"{args.seed}-{standby}-{rep}").randrange(cycle)


def measure_failover(args: argparse.Namespace, root: str, standby: int, rep: int, *, hot: bool = True) -> dict:
    import ray

    from resilient.io import FileSink

    name = f"failover-s{standby}{'' if hot else '-stored'}-{rep}"
    work = tempfile.mkdtemp(prefix=f"{name}-", dir=root)
    handle, out = start_job(args, work, name, args.batches, standby=standby, hot=hot)
    probe = FileSink(out, format="parquet")  # a second reader of the same sink: only reads markers
    try:
        kill_at = (args.kill_after // args.actors + kill_phase(args, standby, rep)) * args.actors  # a slot-0 id
        frontier = 0  # slot 0's lowest batch not committed
        while frontier < kill_at:
            while frontier < kill_at and probe.is_committed(frontier):
                frontier += args.actors
            if handle.done():
                handle.wait()
                raise RuntimeError("the job ended before the kill: raise --batches")
            time.sleep(0.005)
        if standby:
            # The public API does not show standbys: wait until each answers a call (model built), so the
            # kill meets the hot path. A read-only call on the supervisor's spares; nothing is changed.
            ray.get([a.ready.remote() for a in list(handle._supervisor.spares)])
        victim = next(a for a in handle.actors() if a["slot"] == 0)
        base = len(handle.events())
        t_kill = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        r: dict[str, Any] = {"killed_pid": victim["pid"]}
        redelivered: list[int] | None = None
        pending: list[int] = []
        deadline = t_kill + args.failover_timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            for event in handle.events()[base:]:
                base += 1
                if getattr(event, "slot", None) != 0:
                    continue
                if event.kind == "restart" and "detect_s" not in r:
                    r["detect_s"] = now - t_kill
                    redelivered = sorted(event.redelivered)
                    r["redelivered"] = redelivered
                elif event.kind == "started" and "started_s" not in r:
                    r["started_s"] = now - t_kill
                    r["cursor"] = event.cursor
                    r["new_pid"] = event.pid
                    r["from_hot"] = event.hot
                    if not redelivered:  # nothing was in flight: the slot's first batch not yet committed
                        b = event.cursor
                        while b < args.batches and probe.is_committed(b):
                            b += args.actors
                        redelivered = [b] if b < args.batches else []
                    pending = list(redelivered)
            if redelivered is not None and "started_s" in r:
                while pending and probe.is_committed(pending[0]):
                    if "failover_s" not in r:
                        r["failover_s"] = time.monotonic() - t_kill
                    pending.pop(0)
                if not pending:
                    r["all_redelivered_s"] = time.monotonic() - t_kill
                    break
            time.sleep(0.002)
        else:
            raise RuntimeError(f"no recovery within {args.failover_timeout}s: {r}")
        if redelivered:
            r["replayed"] = max(0, (redelivered[0] - r["cursor"]) // args.actors)
        result = finish_exactly_once(handle, probe, args, "failover")
        r["exactly_once"], r["restarts"] = True, result.restarts
        return r
    finally:
        if not handle.done():
            handle.wait(timeout=600)
        shutil.rmtree(work, ignore_errors=True)


def measure_hot_cost(args: argparse.Namespace, root: str) -> dict:
    """The same stateful job (standby 1, no kills) with hot snapshots on and off, in alternating order over
    ``--hot-cost-rounds`` rounds: steady throughput from the 100th committed batch to the end."""
    n, skip = args.hot_cost_batches, 100
    rates: dict[bool, list[float]] = {True: [], False: []}
    for rnd in range(args.hot_cost_rounds):
        for hot in (True, False) if rnd % 2 == 0 else (False, True):
            work = tempfile.mkdtemp(prefix=f"hot-cost-{rnd}-{hot}-", dir=root)
            handle, _ = start_job(args, work, f"hot-cost-{rnd}-{hot}", n, standby=1, hot=hot,
                                  checkpoint_every=args.hot_cost_checkpoint_every)
            while handle.progress()["committed"] < skip and not handle.done():
                time.sleep(0.005)
            t0 = time.monotonic()
            result = handle.wait(timeout=600)
            if result.committed != n:
                raise RuntimeError(f"hot cost job: {result}")
            rates[hot].append((n - skip) / (time.monotonic() - t0))
            shutil.rmtree(work, ignore_errors=True)
        print(f"  hot snapshots cost, round {rnd}: {rates[True][-1]:.1f} batches/s on, {rates[False][-1]:.1f} off",
              flush=True)
    ratios = [a / b for a, b in zip(rates[True], rates[False])]
    return {"hot_snapshot_throughput_ratio": round(statistics.median(ratios), 3),
            "hot_snapshot_throughput_rounds": [round(r, 3) for r in ratios]}


def measure_bare_restart(args: argparse.Namespace) -> dict:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    cls = ray.remote(max_restarts=1, max_task_retries=0)(BareModel).options(num_cpus=settings_for("/tmp").actor_cpus)
    actor = cls.remote(args.features, args.hidden, args.seed)
    pid, _ = ray.get(actor.ping.remote())
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while True:
        try:
            new_pid, timing = ray.get(actor.ping.remote(), timeout=args.failover_timeout)
        except (RayActorError, GetTimeoutError):  # the call met the death: ask again
            if time.monotonic() - t_kill > args.failover_timeout:
                raise
            time.sleep(0.002)
            continue
        if new_pid != pid:
            break
        time.sleep(0.002)  # the death is not seen yet
    restart_s = time.monotonic() - t_kill
    ray.kill(actor)
    return {"bare_ray_restart_s": restart_s, **timing}


def measure_state_load(args: argparse.Namespace, root: str) -> float:
    """A fresh store loading a slot checkpoint ({"user": state_dict, "cursor"}, as a worker saves it) and
    the model taking it: what a replacement does in `Worker.restore`."""
    import resilient

    work = tempfile.mkdtemp(prefix="state-", dir=root)
    try:
        settings = settings_for(work)
        scorer = StatefulScorer(args.features, args.hidden, args.seed)
        with resilient.CheckpointStore(settings) as store:
            store.save("bench/slot-0", {"user": scorer.state_dict(), "cursor": 1234})
        times = []
        for _ in range(max(3, args.repeat)):
            t0 = time.perf_counter()
            with resilient.CheckpointStore(settings) as store:
                loaded = store.load("bench/slot-0")
            scorer.load_state_dict(loaded.state["user"])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compute_ms(args: argparse.Namespace) -> float:
    """One batch's compute in this process (1 thread): what each replayed batch costs a replacement."""
    scorer = StatefulScorer(args.features, args.hidden, args.seed)
    times = []
    for i in range(21):
        batch = {"id": np.arange(i * args.batch_rows, (i + 1) * args.batch_rows, dtype=np.int64)}
        t0 = time.perf_counter()
        scorer(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


# ------------------------------------------------------------------------------------------- resume


def resume_parts(job_dir: str, total: int, args: argparse.Namespace):
    """The spec and source of the 1M-batch job, the same in the builder and the measuring subprocess."""
    from resilient.io import FileSink, RangeSource
    from resilient.runtime.worker import JobSpec

    settings = settings_for(os.path.join(job_dir, "ckpt"), num_actors=args.actors)
    sink = FileSink(os.path.join(job_dir, "out"), format="parquet")
    spec = JobSpec(JOB_1M, StatefulScorer, (args.features, args.hidden, args.seed), {}, True, sink, settings,
                   settings.num_actors)
    return spec, RangeSource(total * args.batch_rows, args.batch_rows)


def build_resume_dir(job_dir: str, total: int, args: argparse.Namespace) -> dict:
    from resilient.runtime import records
    from resilient.runtime.ledger import Ledger
    from resilient.runtime.supervisor import Supervisor

    t0 = time.perf_counter()
    watermark = max(0, total - args.resume_lag)
    spec, source = resume_parts(job_dir, total, args)
    sup = Supervisor(spec, source)
    try:
        sup._open_job()  # the job record, as the first run writes it
        sink = spec.sink
        last = total - 1  # one real output through the sink's own group commit (also writes _sink.json)
        sink.commit_group([sink.encode(last, {"id": np.arange(3, dtype=np.int64)}, epoch=1)])
        first = 0 if args.resume_all_markers else watermark
        real = os.path.join(sink.url, f"part-{last:012d}.parquet")
        written = 0
        for b in range(first, last):
            # committed outputs as the runtime leaves them: one published file per batch (here hard links
            # to the real one: resume lists names, never reads them)
            os.link(real, os.path.join(sink.url, f"part-{b:012d}.parquet"))
            written += 1
        # the last progress record the runtime saved before it died: the watermark lags the markers
        ledger = Ledger(total, max(64, 4 * spec.slots * spec.settings.queue_depth), watermark=watermark)
        fields = {**ledger.snapshot(), "dead": [], "restarts": 0, "retries": 0, "actors": [], "state": "running",
                  "error": None}
        sup.store.save(records.progress_key(spec.job_id), sup._progress_record(fields))
    finally:
        sup.store.close()
        sup.committer.shutdown()
    return {"markers_written": written + 1, "markers_represented": total, "watermark": watermark,
            "build_s": time.perf_counter() - t0}


def resume_child(args: argparse.Namespace) -> None:
    """In a fresh process: imports, then `_open_job` and `_resume` on the 1M job; prints one JSON line."""
    t0 = time.perf_counter()
    import torch  # noqa: F401 - resilient loads it; import it here so that it counts as an import

    import resilient  # noqa: F401
    from resilient.runtime.supervisor import Supervisor

    imports_s = time.perf_counter() - t0
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    spec, source = resume_parts(args.resume_child, args.resume_total, args)
    t1 = time.perf_counter()
    sup = Supervisor(spec, source)
    t2 = time.perf_counter()
    sup._open_job()
    t3 = time.perf_counter()
    ledger, _ = sup._resume()
    t4 = time.perf_counter()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sup.store.close()
    sup.committer.shutdown()
    out = {
        "imports_s": imports_s, "supervisor_init_s": t2 - t1, "open_job_s": t3 - t2, "resume_s": t4 - t3,
        "watermark_after": ledger.watermark, "finished": ledger.finished,
        "rss_after_imports_mb": rss_imports, "rss_peak_mb": rss_peak,
    }
    if args.ray_address:
        import ray

        ray.init(address=args.ray_address, log_to_driver=False)
        t5 = time.perf_counter()
        result = Supervisor(spec, source).run()
        out["full_run_s"] = time.perf_counter() - t5
        out["full_run_resumed_from"] = result.resumed_from
        ray.shutdown()
    print(json.dumps(out))


def measure_resume(args: argparse.Namespace, root: str) -> dict:
    import ray

    job_dir = tempfile.mkdtemp(prefix="resume-1m-", dir=root)
    try:
        built = build_resume_dir(job_dir, args.resume_total, args)
        cmd = [sys.executable, os.path.abspath(__file__), "--resume-child", job_dir,
               "--resume-total", str(args.resume_total), "--batch-rows", str(args.batch_rows),
               "--actors", str(args.actors), "--features", str(args.features), "--hidden", str(args.hidden),
               "--seed", str(args.seed)]
        if args.resume_full_run:
            cmd += ["--ray-address", ray.get_runtime_context().gcs_address]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"resume subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        if not child["finished"] or child["watermark_after"] != args.resume_total:
            raise RuntimeError(f"resume did not find the job done: {child}")
        return {**built, **child}
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=600, help="batches per failover job")
    p.add_argument("--batch-rows", type=int, default=256)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5, help="failover jobs, bare restarts and drains per mode (median)")
    p.add_argument("--kill-after", type=int, default=100, help="committed batches before the kill")
    p.add_argument("--kill-phase", choices=("spread", "random", "fixed"), default="spread",
                   help="where in the checkpoint cycle past --kill-after each job kills: evenly spread, "
                        "seeded at random, or exactly at --kill-after")
    p.add_argument("--checkpoint-every", type=int, default=10, help="slot checkpoint every N batches")
    p.add_argument("--batches-per-call", default="auto", help="RESILIENT_BATCHES_PER_CALL of the failover jobs")
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=float, default=2)
    p.add_argument("--failover-timeout", type=float, default=120.0)
    p.add_argument("--resume-total", type=int, default=1_000_000, help="committed batches in the resume job")
    p.add_argument("--resume-lag", type=int, default=1_000,
                   help="batches the saved progress watermark lags behind the markers")
    p.add_argument("--resume-all-markers", action="store_true", help="write all markers, not only those read")
    p.add_argument("--resume-full-run", action="store_true", help="also time Supervisor.run() on the done job")
    p.add_argument("--skip-failover", action="store_true")
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--skip-preemption", action="store_true")
    p.add_argument("--skip-hot-cost", action="store_true")
    p.add_argument("--hot-cost-rounds", type=int, default=4, help="rounds of the hot snapshot cost (on, off)")
    p.add_argument("--hot-cost-batches", type=int, default=1000, help="batches per job of the hot snapshot cost")
    p.add_argument("--hot-cost-checkpoint-every", type=int, default=None,
                   help="checkpoint_every of the hot snapshot cost jobs (default: --checkpoint-every)")
    p.add_argument("--preemption-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help="parent of the temporary work directory")
    p.add_argument("--resume-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ray-address", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.resume_child:
        resume_child(args)
        return
    if args.preemption_child:
        preemption_child(args)
        return
    if args.kill_after % args.actors or args.kill_after // args.actors % args.checkpoint_every:
        p.error("--kill-after must be a multiple of --actors x --checkpoint-every (a slot snapshot point)")
    if args.kill_after + args.checkpoint_every * args.actors >= args.batches // 2:
        p.error("--kill-after plus one checkpoint cycle (--checkpoint-every x --actors) must be under half of "
                "--batches (the job must outlive the recovery)")

    from _bytecode import compile_resilient

    compile_resilient()  # as installed from a wheel: workers do not compile it at start

    import ray
    import torch

    torch.set_num_threads(1)
    np.random.seed(args.seed)
    root = tempfile.mkdtemp(prefix="resilient-recovery-", dir=args.dir)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             _system_config={"timeout_ms_task_wait_for_death_info": 0})
    report: dict[str, Any] = {}
    try:
        if not args.skip_failover:
            bare, hot, cold, stored = [], [], [], []
            for rep in range(args.repeat):
                bare.append(measure_bare_restart(args))
                print(f"  bare Ray restart: {bare[-1]['bare_ray_restart_s']:.3f} s (torch import "
                      f"{bare[-1]['torch_import_s']:.3f} s, model init {bare[-1]['model_init_s']:.3f} s)", flush=True)
                for standby, runs, from_hot in ((1, hot, True), (0, cold, True), (1, stored, False)):
                    runs.append(measure_failover(args, root, standby, rep, hot=from_hot))
                    r = runs[-1]
                    print(f"  failover standby={standby}{'' if from_hot else ', hot snapshots off'}: detect "
                          f"{r['detect_s']:.3f} s, started {r['started_s']:.3f} s, first redelivered commit "
                          f"{r['failover_s']:.3f} s, all {r['all_redelivered_s']:.3f} s (redelivered {r['redelivered']}"
                          f", replayed {r.get('replayed')}, from {'hot snapshot' if r['from_hot'] else 'storage'})",
                          flush=True)
            state_load = measure_state_load(args, root)
            report["compute_ms_per_batch"] = round(compute_ms(args), 2)

            def med(runs: list[dict], key: str) -> float:
                return round(statistics.median(r[key] for r in runs), 4)

            report.update({
                "failover_s": med(hot, "failover_s"),
                "failover_cold_s": med(cold, "failover_s"),
                "bare_ray_restart_s": med(bare, "bare_ray_restart_s"),
                "model_init_s": med(bare, "model_init_s"),
                "state_load_s": round(state_load, 4),
                "torch_import_s": med(bare, "torch_import_s"),
                "failover_detect_s": med(hot, "detect_s"),
                "failover_started_s": med(hot, "started_s"),
                "failover_all_redelivered_s": med(hot, "all_redelivered_s"),
                "failover_cold_detect_s": med(cold, "detect_s"),
                "failover_cold_started_s": med(cold, "started_s"),
                "failover_stored_s": med(stored, "failover_s"),
                "failover_stored_runs": [round(r["failover_s"], 3) for r in stored],
                "failover_stored_replayed": [r.get("replayed") for r in stored],
                "failover_from_hot": sum(bool(r["from_hot"]) for r in hot),
                "failover_replayed": [r.get("replayed") for r in hot],
                "failover_cold_replayed": [r.get("replayed") for r in cold],
                "failover_runs": [round(r["failover_s"], 3) for r in hot],
                "failover_cold_runs": [round(r["failover_s"], 3) for r in cold],
                "bare_ray_restart_runs": [round(r["bare_ray_restart_s"], 3) for r in bare],
                "exactly_once": all(r["exactly_once"] for r in hot + cold + stored),
            })
            target = report["bare_ray_restart_s"] + report["model_init_s"] + report["state_load_s"] + 0.5
            report["failover_target_s"] = round(target, 4)
            report["failover_target_met"] = report["failover_s"] <= target
            report["failover_cold_target_met"] = report["failover_cold_s"] <= target
            report["failover_hot_target_met"] = report["failover_s"] <= 0.25
        if not args.skip_hot_cost:
            report.update(measure_hot_cost(args, root))
        if not args.skip_preemption:
            ray.shutdown()  # the rounds run on a cluster of their own, in a child process
            rounds = measure_preemption(args)
            report.update({
                "preemption_handover_s": round(statistics.median(r["handover_s"] for r in rounds), 4),
                "preemption_replayed": max(r["replayed"] for r in rounds),
                "preemption_attempts_charged": sum(r["attempts_charged"] for r in rounds),
                "preemption_handover_runs": [round(r["handover_s"], 3) for r in rounds],
                "preemption_replaced_runs": [round(r["replaced_s"], 3) for r in rounds],
                "preemption_started_runs": [round(r["started_s"], 3) for r in rounds],
                "preemption_exactly_once": all(r["exactly_once"] for r in rounds),
            })
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                     _system_config={"timeout_ms_task_wait_for_death_info": 0})
        if not args.skip_resume:
            r = measure_resume(args, root)
            print(f"  resume at {args.resume_total}: built in {r['build_s']:.1f} s ({r['markers_written']} markers "
                  f"written), imports {r['imports_s']:.2f} s, open_job {r['open_job_s']:.3f} s, "
                  f"_resume {r['resume_s']:.3f} s, RSS {r['rss_after_imports_mb']:.0f} -> {r['rss_peak_mb']:.0f} MB",
                  flush=True)
            report.update({
                "resume_1m_s": round(r["resume_s"], 4),
                "resume_1m_open_job_s": round(r["open_job_s"], 4),
                "resume_1m_rss_mb": round(r["rss_peak_mb"] - r["rss_after_imports_mb"], 2),
                "resume_1m_rss_abs_mb": round(r["rss_peak_mb"], 1),
                "resume_1m_rss_after_imports_mb": round(r["rss_after_imports_mb"], 1),
                "resume_1m_imports_s": round(r["imports_s"], 3),
                "resume_1m_batches": args.resume_total,
                "resume_1m_watermark": r["watermark"],
                "resume_1m_markers_written": r["markers_written"],
                "resume_1m_markers_note": "all markers written" if args.resume_all_markers else
                "only the committed files past the watermark (those resume keeps)",
            })
            if "full_run_s" in r:
                report["resume_1m_full_run_s"] = round(r["full_run_s"], 3)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    report.update({"batches": args.batches, "batch_rows": args.batch_rows, "actors": args.actors,
                   "repeat": args.repeat, "checkpoint_every": args.checkpoint_every,
                   "hot_cost_checkpoint_every": args.hot_cost_checkpoint_every or args.checkpoint_every,
                   "batches_per_call": args.batches_per_call, "kill_after": args.kill_after,
                   "kill_phase": args.kill_phase,
                   "num_cpus": args.num_cpus, "load_avg": [round(x, 2) for x in os.getloadavg()]})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
