"""One drill run: a real job of the pipeline, watched while a fault strikes, then read back.

A job runs in this process (`run_here`) or, for the driver class, in a driver process of its own that
is SIGKILLed and started again (`run_as_driver`, `resilient.drill._child`). Either way the run leaves an
`Observed`: its commit timeline (sampled every 20 ms), its events (timestamped when seen), the digest of
every output it committed (handed over by the job as it commits, `JobHandle.stream`), and then, read back
from the sink and store (`read_back`): the committed ids from the sink's commit markers, a spread of
outputs checked against what was committed, and each slot's final state.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from resilient.api import Pipeline
from resilient.config import Settings
from resilient.drill._procs import parent_pid, starting_workers
from resilient.drill.faults import Cluster, Fault, Live, Struck
from resilient.errors import NoCheckpointError
from resilient.io._base import digest
from resilient.io.sinks import FileSink
from resilient.runtime import records
from resilient.storage import CheckpointStore
from resilient.testing import kill_pid

__all__ = ["Job", "Observed", "output_digest", "read_back", "run_as_driver", "run_here"]

_SAMPLE_S = 0.02
_STREAM_GROUPS = 100_000  # outputs handed over as they are committed: never let the job wait for the drill
_READ_BACK = 50  # outputs read back from the sink per run, evenly spread


def output_digest(output: Any) -> str:
    """A digest of an output as read from a sink: through JSON when it is plain data (fast), else
    `resilient.io.sources` digest (arrays by their bytes).

    >>> output_digest({"id": [1, 2], "y": [0.5, 1.5]}) == output_digest({"y": [0.5, 1.5], "id": [1, 2]})
    True
    """
    try:
        text = json.dumps(output, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError):
        return digest(output)
    return xxhash.xxh3_64_hexdigest(text.encode())


@dataclass
class Job:
    """What one run executes, and how its fault is set up: `live` builds the injector's view of the job
    from the callables each way of running provides; `on_progress` is told the batches done."""

    job_id: str
    pipeline: Pipeline
    source: Any
    sink: FileSink
    settings: Settings
    init_args: tuple
    init_kwargs: dict
    timeout: float
    live: Callable[..., Live]
    on_progress: Callable[[int], None] = lambda done: None


@dataclass
class Observed:
    """What one run left behind: its timeline (seconds since launch, batches done), events, the outputs
    it committed, and what was read back from its sink and store."""

    samples: list[tuple[float, int]]
    seconds: float
    events: list[dict] = field(default_factory=list)
    ids: collections.Counter = field(default_factory=collections.Counter)  # commit markers, and repeats
    commits: collections.Counter = field(default_factory=collections.Counter)  # batches the job reported committed
    outputs: dict[int, str] = field(default_factory=dict)  # digests of the outputs it committed
    states: list[str | None] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    calls: int = 0
    error: str | None = None
    struck: Struck | None = None
    workers: dict[int, int | None] = field(default_factory=dict)  # actor pid -> its parent (a raylet)


def _event(e: Any, t: float) -> dict:
    """An event as plain data, with `t`: when it was seen (seconds since launch, to the sampling step)."""
    return {"kind": e.kind, "t": t, **e.info()}


def run_here(job: Job, fault: Fault | None, cluster: Cluster) -> Observed:
    """Run the job in this process; the fault (if any) strikes from this thread while it runs."""
    known = starting_workers(set(cluster.raylets)) if cluster.raylets else set()
    t0 = time.time()
    handle = job.pipeline.run(job.source, job.sink, job_id=job.job_id, settings=job.settings,
                              init_args=job.init_args, init_kwargs=job.init_kwargs, progress=False,
                              stream=_STREAM_GROUPS)
    commits: collections.Counter = collections.Counter()
    outputs: dict[int, str] = {}
    samples: list[tuple[float, int]] = [(t0, 0)]
    events: list[dict] = []
    workers: dict[int, int | None] = {}
    stop = threading.Event()

    def consume() -> None:
        for b, out in handle.stream():
            commits[b] += 1
            outputs[b] = output_digest(out)

    def sample() -> None:
        while True:
            finished = handle.done()
            now = time.time()
            samples.append((now, handle.progress()["committed"]))
            events.extend(_event(e, now - t0) for e in handle.events()[len(events):])
            for a in handle.actors():
                if a["pid"] not in workers and a.get("node_id") in (None, cluster.here):
                    workers[a["pid"]] = parent_pid(a["pid"])
            job.on_progress(samples[-1][1])
            if finished or stop.wait(_SAMPLE_S):
                return

    threads = [threading.Thread(target=consume, name="resilient-drill-outputs", daemon=True),
               threading.Thread(target=sample, name="resilient-drill-sampler", daemon=True)]
    for t in threads:
        t.start()
    struck = None
    if fault is not None:
        with CheckpointStore(job.settings) as store:
            saved: set[int] = set()

            def checkpointed(actor: dict) -> bool:  # a stateful slot is struck once it has a checkpoint
                if actor["slot"] not in saved and store.latest(records.slot_key(job.job_id, actor["slot"])) is not None:
                    saved.add(actor["slot"])
                return actor["slot"] in saved

            live = job.live(committed=lambda: samples[-1][1], done=handle.done, actors=handle.actors,
                            events=lambda: list(events), known_workers=known,
                            ready=checkpointed if job.pipeline.stateful else lambda actor: True)
            struck = fault.inject(live)
    error, result = None, None
    try:
        result = handle.wait(job.timeout)
    except Exception as e:  # noqa: BLE001 - judged: the job did not finish
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    stop.set()
    for t in threads:
        t.join(job.timeout)
    seen = Observed(samples=[(t - t0, n) for t, n in samples], seconds=time.time() - t0, events=events,
                    error=error, workers=workers, commits=commits, outputs=outputs)
    if struck is not None:
        seen.struck = Struck(struck.at - t0, struck.what, struck.cleanup)
    if result is not None:
        seen.dead = [d.batch_id for d in result.dead_letters]
        seen.calls = result.calls
    return seen


def run_as_driver(job: Job, fault: Fault, scratch: str) -> Observed:
    """Run the job from a driver process of its own; the fault kills that process, and the job is then
    run again by a new one (same job id: it resumes)."""
    import ray
    from ray import cloudpickle

    spec = os.path.join(scratch, "driver.spec")
    with open(spec, "wb") as f:
        cloudpickle.dump({"pipeline": job.pipeline, "source": job.source, "sink": job.sink, "settings": job.settings,
                          "job_id": job.job_id, "init_args": job.init_args, "init_kwargs": job.init_kwargs,
                          "address": ray.get_runtime_context().gcs_address}, f)
    paths = [os.getcwd(), *(p for p in sys.path if p)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    t0 = time.time()
    state: dict[str, Any] = {"samples": [(t0, 0)], "events": [], "result": None, "error": None,
                             "commits": collections.Counter(), "outputs": {}}

    def launch(log: str) -> tuple[subprocess.Popen, threading.Thread]:
        with open(os.path.join(scratch, log), "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "resilient.drill._child", spec], stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=env)
        reader = threading.Thread(target=_read_child, args=(proc, state, job.on_progress), daemon=True)
        reader.start()
        return proc, reader

    def finish(proc: subprocess.Popen, reader: threading.Thread) -> None:
        try:
            proc.wait(job.timeout)
        except subprocess.TimeoutExpired:
            kill_pid(proc.pid)
            proc.wait()
            state["error"] = f"the driver did not finish within {job.timeout:g}s"
        reader.join()

    first, reader = launch("driver-1.log")
    live = job.live(committed=lambda: state["samples"][-1][1], done=lambda: first.poll() is not None,
                    actors=lambda: [], events=lambda: [], kill_driver=lambda: first.poll() is None and kill_pid(first.pid))
    struck = fault.inject(live)
    finish(first, reader)
    if struck is not None:
        state["events"], state["error"] = [], None
        finish(*launch("driver-2.log"))
    result = state["result"] or {}
    if state["error"] is None and not result:
        with open(os.path.join(scratch, "driver-2.log" if struck else "driver-1.log")) as f:
            state["error"] = "the driver ended without a result: " + f.read()[-500:]
    seen = Observed(samples=[(t - t0, n) for t, n in state["samples"]], seconds=time.time() - t0,
                    events=state["events"], error=state["error"], dead=list(result.get("dead", [])),
                    commits=state["commits"], outputs=state["outputs"])
    if struck is not None:
        seen.struck = Struck(struck.at - t0, struck.what)
    return seen


def _read_child(proc: subprocess.Popen, state: dict, on_progress: Callable[[int], None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            _child_line(line, state, on_progress)
        except (ValueError, json.JSONDecodeError):  # a line cut short by the kill
            pass


def _child_line(line: str, state: dict, on_progress: Callable[[int], None]) -> None:
    """Fold one line of the driver process's report (`resilient.drill._child`) into `state`."""
    kind, _, rest = line.strip().partition(" ")
    if kind == "s":
        t, n = rest.split()
        state["samples"].append((float(t), int(n)))
        on_progress(int(n))
    elif kind == "o":
        b, d = rest.split()
        state["commits"][int(b)] += 1
        state["outputs"][int(b)] = d
    elif kind == "e":
        state["events"].append(json.loads(rest))
    elif kind == "r":
        state["result"] = json.loads(rest)
    elif kind == "x":
        state["error"] = json.loads(rest).splitlines()[0]


def read_back(seen: Observed, job: Job, slots: int) -> None:
    """Ids from the sink's committed files, each counted once more for every time the job reported it
    committed beyond the first; a spread of outputs read back and compared with what was committed
    (outputs a killed driver committed without reporting are read back); each slot's final state."""
    sink = job.sink
    try:
        seen.ids.update(sink.committed_from(0))
        seen.ids.update({b: n - 1 for b, n in seen.commits.items() if n > 1})
        ids = sorted(seen.ids)
        for b in ids:
            if b not in seen.outputs:
                seen.outputs[b] = output_digest(sink.read(b))
        for b in ids[:: max(1, len(ids) // _READ_BACK)]:
            if output_digest(sink.read(b)) != seen.outputs[b]:
                seen.error = seen.error or f"the sink holds another output for batch {b} than was committed"
    except Exception as e:  # noqa: BLE001 - an unreadable sink fails the run
        seen.error = seen.error or f"reading the sink back failed: {type(e).__name__}: {e}"
    if not job.pipeline.stateful:
        return
    with CheckpointStore(job.settings) as store:
        for s in range(slots):
            try:
                seen.states.append(digest(store.load(records.slot_key(job.job_id, s)).state["user"]))
            except NoCheckpointError:
                seen.states.append(None)
