"""Running a drill: the reference runs, one run per fault class, and the judgement of each.

Every run is a real job of the user's pipeline on the same sample of their source, on the Ray this
process is connected to (a local one is started if none is), with a sink and a checkpoint store of
its own under a scratch directory that the drill creates and removes. The user's storage settings are
replaced; every other setting (``RESILIENT_*`` variables, the pipeline's options) is theirs, except the
batch timeout of the hang classes (shortened, or a hang would take the default ten minutes to notice).

While a job runs (`resilient.drill.jobs`), its committed count is sampled every 20 ms (the timeline
the figures and the picture come from) and the fault's injector (`resilient.drill.faults`) waits for
its moment and strikes. Afterwards the sink is read back (ids as a multiset, a digest per output) and,
for a stateful pipeline, each slot's final checkpoint; the checks of `resilient.drill.checks` compare
them with the fault-free reference. The reference runs twice: if the two differ, the pipeline is not deterministic,
and then only the ids are checked.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from resilient.api import Pipeline, _ensure_ray
from resilient.config import Settings
from resilient.drill import checks
from resilient.drill._inject import Faulty, FaultyStateful
from resilient.drill._procs import local_node
from resilient.drill.faults import FAULTS, Cluster, Fault, Live
from resilient.drill.jobs import Job, Observed, read_back, run_as_driver, run_here
from resilient.drill.report import DrillReport, Row
from resilient.errors import ConfigError
from resilient.io._base import digest
from resilient.io.sinks import FileSink
from resilient.io.sources import as_source

__all__ = ["DEFAULT_BATCHES", "Sample", "drill"]

DEFAULT_BATCHES = 2000


class Sample:
    """The first `n` batches of a source (a source itself)."""

    def __init__(self, source: Any, n: int) -> None:
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def read(self, start: int = 0) -> Any:
        for b, batch in self.source.read(start):
            if b >= self.n:
                return
            yield b, batch

    def fingerprint(self) -> dict:
        return {**self.source.fingerprint(), "sample": self.n}

    def __repr__(self) -> str:
        return f"first {self.n} batches of {self.source!r}"


def _sampled(source: Any, batches: int | None) -> Any:
    n = len(source)
    if batches is None:
        batches = min(n, DEFAULT_BATCHES)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError("batches", batches, "an int >= 1")
    if batches > n:
        raise ConfigError("batches", batches, f"at most {n}, the number of batches in the source {source!r}",
                          detail="the sample cannot be larger than the source")
    return Sample(source, batches)


def _check_replayable(source: Any) -> None:
    """Read the first and middle batches twice: a source that gives other batches the second time cannot
    be replayed after a failure."""
    for start in sorted({0, len(source) // 2}):
        first = [digest(b) for b in itertools.islice(source.read(start), 1)]
        again = [digest(b) for b in itertools.islice(source.read(start), 1)]
        if first != again or not first:
            raise ConfigError("source", repr(source), "a source that gives the same batches each time it is read",
                              detail=f"batch {start} differed between two reads, so a failed batch could not be "
                              "replayed")


class _Progress:
    """The drill's progress line on `stream`: redrawn in place on a terminal, a line per run otherwise."""

    def __init__(self, stream: TextIO, enabled: bool | None, runs: int) -> None:
        self.stream, self.runs, self.index = stream, runs, 0
        self.live = stream.isatty() if enabled is None else enabled
        self.name = ""

    def begin(self, name: str) -> None:
        self.index += 1
        self.name = name
        if not self.live:
            self.stream.write(f"drill [{self.index}/{self.runs}] {name} ...\n")
            self.stream.flush()

    def update(self, done: int, total: int) -> None:
        if self.live:
            self.stream.write(f"\rdrill [{self.index}/{self.runs}] {self.name}: {done}/{total} batches   ")
            self.stream.flush()

    def end(self, verdict: str) -> None:
        self.stream.write(("\r" if self.live else "") + f"drill [{self.index}/{self.runs}] {self.name}: {verdict}"
                          + " " * 20 + "\n")
        self.stream.flush()


class _Drill:
    """One drill: the sample, the user's pipeline and settings, and the scratch directory its runs use."""

    def __init__(self, pipeline: Pipeline, source: Any, *, init_args: tuple, init_kwargs: dict, sink_format: str,
                 environ: Mapping[str, str] | None, scratch: str, progress: _Progress, trigger: float,
                 timeout: float, drain_nodes: bool = False) -> None:
        self.pipeline, self.source = pipeline, source
        self.drain_nodes = drain_nodes
        self.init_args, self.init_kwargs = init_args, init_kwargs
        self.sink_format, self.environ, self.scratch = sink_format, environ, scratch
        self.progress, self.trigger, self.timeout = progress, trigger, timeout
        self.n = len(source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the user's storage is not used: its warnings do not apply
            base = Settings.from_env(environ)
        self.replicas = max(2, len(base.storage))
        self.slots = int(pipeline.options.get("num_actors", base.num_actors))
        self.on_poison = pipeline.options.get("on_poison", base.on_poison)
        self.hang_timeout: float | None = None  # set from the first reference

    # ------------------------------------------------------------------ one job

    def _paths(self, name: str) -> tuple[str, list[str], str]:
        root = os.path.join(self.scratch, name)
        stores = [os.path.join(root, f"store-{i}") for i in range(self.replicas)]
        markers = os.path.join(root, "markers")
        os.makedirs(markers)
        return os.path.join(root, "sink"), stores, markers

    def _target(self, fault: Fault | None, markers: str) -> tuple[Pipeline, tuple, dict]:
        """The pipeline to run, and its constructor arguments: the user's, or wrapped to raise."""
        p = self.pipeline
        if fault is not None and fault.hangs and self.hang_timeout is not None:
            p = p.with_options(batch_timeout_seconds=self.hang_timeout)
        if fault is None or fault.raises is None:
            return p, self.init_args, self.init_kwargs
        wrapper = FaultyStateful if p.stateful else Faulty
        batch = next(iter(self.source.read(self.trigger_batch)))[1]
        args = (p.target, self.init_args, self.init_kwargs, digest(batch), fault.raises, markers)
        return Pipeline(wrapper, p.options), args, {}

    @property
    def trigger_batch(self) -> int:
        return min(self.n - 1, int(self.n * self.trigger))

    def job(self, name: str, fault: Fault | None = None, cluster: Cluster | None = None) -> Observed:
        """Run the job once (with `fault`, or fault-free) on a scratch sink and store of its own."""
        self.progress.begin(name)
        sink_url, stores, markers = self._paths(name)
        pipeline, args, kwargs = self._target(fault, markers)
        cluster = cluster or Cluster(0, local_node())
        trigger = self.trigger_batch if fault is not None and fault.raises else max(1, int(self.n * self.trigger))
        live = functools.partial(Live, trigger=trigger, late=max(trigger, int(self.n * min(0.9, 2 * self.trigger))),
                                 cluster=cluster, replicas=stores, markers=markers, timeout=self.timeout)
        job = Job(f"drill-{name}", pipeline, self.source, FileSink(sink_url, format=self.sink_format),
                  Settings.from_env(self.environ, storage=stores), args, kwargs, self.timeout, live,
                  on_progress=lambda done: self.progress.update(done, self.n))
        if fault is not None and fault.kills_driver:
            seen = run_as_driver(job, fault, markers)
        else:
            seen = run_here(job, fault, cluster)
        if seen.struck is not None and seen.struck.cleanup is not None:
            seen.struck.cleanup()
        read_back(seen, job, self.slots)
        return seen

    # ------------------------------------------------------------------ the drill

    def run(self, faults: Sequence[Fault]) -> DrillReport:
        started = time.time()
        refs = []
        for i in (1, 2):
            refs.append(self.job(f"reference-{i}"))
            self.progress.end("done" if refs[-1].error is None else f"failed: {refs[-1].error}")
        a, b = refs
        report = DrillReport(pipeline=_name(self.pipeline), source=repr(self.source), batches=self.n,
                             stateful=self.pipeline.stateful, deterministic=a.outputs == b.outputs,
                             state_deterministic=a.states == b.states)
        report.rows.extend(_reference_row(f"reference-{i}", r, self.n) for i, r in enumerate(refs, 1))
        if any(r.error for r in refs) or checks.exactly_once(a.ids, range(self.n)):
            report.seconds = time.time() - started
            return report  # judged FAIL from the reference rows; fault runs would say nothing more
        calls = max(1, a.calls)
        self.hang_timeout = checks.hang_timeout(a.seconds, calls, self.slots)
        report.hang_timeout = self.hang_timeout
        import ray

        raylets = frozenset(p for r in refs for p in r.workers.values() if p)
        cluster = Cluster(nodes=sum(1 for n in ray.nodes() if n.get("Alive")), here=local_node(), raylets=raylets,
                          may_drain=self.drain_nodes)
        rate = self.n / max(1e-9, _commit_span(a.samples))
        report.reference_rate = round(rate, 1)
        for fault in faults:
            reason = fault.unavailable(cluster)
            if reason is not None:
                self.progress.index += 1
                report.rows.append(Row(fault.name, fault.title, "SKIPPED", skipped=reason))
                continue
            seen = self.job(fault.name, fault, cluster)
            row = self._judge(fault, seen, a, report, rate)
            self.progress.end(row.status + (f" ({'; '.join(row.failed)})" if row.failed else ""))
            report.rows.append(row)
        report.seconds = time.time() - started
        return report

    def _judge(self, fault: Fault, seen: Observed, ref: Observed, report: DrillReport, rate: float) -> Row:
        failed = []
        notes = []
        poison = self.trigger_batch if fault.raises == "always" else None
        expect_fail = poison is not None and self.on_poison == "fail"
        if seen.struck is None:
            failed.append("injected: the job ended before the fault could be injected")
        if expect_fail:
            if seen.error is None:
                failed.append(f"finished: on_poison=fail, but the job did not fail on poison batch {poison}")
        elif seen.error is not None:
            failed.append(f"finished: {seen.error}")
        expected = [b for b in range(self.n) if b != poison] if poison is not None else range(self.n)
        if not expect_fail:
            problem = checks.exactly_once(seen.ids, expected)
            if problem:
                failed.append(f"exactly-once: {problem}")
        if poison is not None and not expect_fail and poison not in seen.dead:
            failed.append(f"dead-letter: poison batch {poison} is not a dead letter")
        compare = list(expected) if poison is not None else None
        if poison is not None and self.pipeline.stateful:
            compare = [b for b in range(self.n) if b < poison or b % self.slots != poison % self.slots]
            notes.append("its slot's later outputs and final state differ by design")
        if not report.deterministic:
            notes.append("non-deterministic pipeline: only ids checked")
        elif not expect_fail:
            problem = checks.same_outputs(seen.outputs, ref.outputs, compare)
            if problem:
                failed.append(f"outputs: {problem}")
        if self.pipeline.stateful and report.state_deterministic and poison is None:
            problem = checks.same_state(seen.states, ref.states)
            if problem:
                failed.append(f"state: {problem}")
        at = seen.struck.at if seen.struck else None
        recovery = None
        if at is not None:
            recovery = checks.recovery_seconds(seen.samples, at, checks.back_at(seen.events, at))
        if seen.struck is not None and fault.confirm is not None:
            notes.extend(filter(None, [fault.confirm(seen.events)]))
        restarts = sum(e["kind"] == "restart" for e in seen.events)
        return Row(
            fault.name, fault.title, "FAIL" if failed else "PASS", failed=failed, notes=notes,
            fault=seen.struck.what if seen.struck else None, fault_at=at, recovery_s=recovery,
            replayed=checks.batches_replayed(seen.events, self.slots, self.pipeline.stateful),
            attempts=sum(e["kind"] in ("retry", "dead_letter") for e in seen.events),
            restarts=restarts,
            dip=checks.dip(seen.samples, at, min(at + (recovery or 0.0) + 1.0, _last_commit(seen.samples)), rate)
            if at is not None else None,
            extra_s=round(seen.seconds - ref.seconds, 2), seconds=round(seen.seconds, 2), samples=seen.samples,
            incidents=_incidents(seen.events),
        )


def _incidents(events: Sequence[dict]) -> list[str]:
    """The failures and recoveries of a run, one line each (time seen, what, why)."""
    lines = []
    for e in events:
        if e["kind"] in ("restart", "rollback", "retry", "dead_letter", "started"):
            why = e.get("reason") or e.get("error") or ""
            where = f"slot {e['slot']}" if "slot" in e else f"batch {e.get('batch_id')}"
            extra = f" cursor {e['cursor']}" if e["kind"] in ("started", "rollback") else ""
            lines.append(f"{e.get('t', 0.0):.2f}s {e['kind']} {where}{extra} {why}".rstrip())
    return lines


def _name(p: Pipeline) -> str:
    t = p.target
    return f"{getattr(t, '__module__', '?')}:{getattr(t, '__qualname__', repr(t))}"


def _commit_span(samples: Sequence[tuple[float, int]]) -> float:
    """Seconds from the first commit to the last."""
    rising = [t for (_, a), (t, b) in zip(samples, samples[1:]) if b > a]
    return (rising[-1] - rising[0]) if len(rising) > 1 else 1.0


def _last_commit(samples: Sequence[tuple[float, int]]) -> float:
    rising = [t for (_, a), (t, b) in zip(samples, samples[1:]) if b > a]
    return rising[-1] if rising else 0.0


def _reference_row(name: str, seen: Observed, n: int) -> Row:
    failed = [f"finished: {seen.error}"] if seen.error else []
    problem = checks.exactly_once(seen.ids, range(n))
    if problem:
        failed.append(f"exactly-once: {problem}")
    return Row(name, "fault-free reference", "FAIL" if failed else "REF", failed=failed, seconds=round(seen.seconds, 2),
               samples=seen.samples, restarts=sum(e["kind"] == "restart" for e in seen.events))


def drill(
    pipeline: Any,
    source: Any,
    *,
    batches: int | None = None,
    faults: Sequence[str] | None = None,
    report: str | None = None,
    init_args: tuple = (),
    init_kwargs: dict | None = None,
    batch_size: int | None = None,
    sink_format: str = "jsonl",
    scratch: str | None = None,
    environ: Mapping[str, str] | None = None,
    progress: bool | None = None,
    stream: TextIO | None = None,
    trigger: float = 0.3,
    timeout: float = 600.0,
    drain_nodes: bool = False,
) -> DrillReport:
    """Run a fault drill of `pipeline` on the first `batches` batches of `source`.

    Two fault-free reference runs, then one run per fault class (`resilient.drill.FAULTS`, all by
    default), each judged against the reference: every batch committed exactly once, the same outputs
    (deterministic pipelines), the same final state (stateful pipelines). Jobs run on the Ray this
    process is connected to, or the one ``RAY_ADDRESS`` names, or a local one started here.

    Args:
        pipeline: a `@resilient.pipeline` class or function.
        source: anything `resilient.io.as_source` takes; it must give the same batches on every read.
        batches: the sample's size (default: 2,000, or the whole source when smaller).
        faults: fault class names (default: every registered class).
        report: a directory to write ``drill.json`` and ``drill.png`` into (None: write nothing).
        init_args, init_kwargs: the pipeline class's constructor arguments.
        batch_size: rows per batch for a ``range`` or a Ray dataset.
        sink_format: the scratch sink's format.
        scratch: where scratch sinks and stores go (a new directory under it, removed at the end).
        environ: where ``RESILIENT_*`` settings are read (``os.environ`` when None).
        progress: a progress line on `stream` (default: only on a terminal); one line per run otherwise.
        stream: where progress goes (standard error by default).
        trigger: the fraction of the sample committed when a fault strikes.
        timeout: seconds one run may take before it is judged unfinished.
        drain_nodes: let the preemption class drain a node of the cluster (Ray then keeps the node out of
            service until it is restarted: a test cluster, or one whose autoscaler replaces drained nodes).

    Returns:
        The `DrillReport` (``report.ok`` is False when a check failed).

    Raises:
        ConfigError: a target that is not a pipeline, a source that cannot be replayed, a sample larger
            than the source, an unknown fault class.
    """
    if not isinstance(pipeline, Pipeline):
        raise ConfigError("pipeline", pipeline, "a @resilient.pipeline (a class or function decorated with it)")
    chosen = _faults(faults)
    source = _sampled(as_source(source, batch_size=batch_size), batches)
    _check_replayable(source)
    if not 0 < trigger < 1:
        raise ConfigError("trigger", trigger, "a fraction between 0 and 1")
    _ensure_ray()
    work = tempfile.mkdtemp(prefix="resilient-drill-", dir=scratch)
    shown = _Progress(stream or sys.stderr, progress, runs=2 + len(chosen))
    quiet = logging.getLogger("resilient.runtime")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the drill's own faults: told in its report, not as warnings
    try:
        result = _Drill(pipeline, source, init_args=tuple(init_args), init_kwargs=dict(init_kwargs or {}),
                        sink_format=sink_format, environ=environ, scratch=work, progress=shown, trigger=trigger,
                        timeout=timeout, drain_nodes=drain_nodes).run(chosen)
    finally:
        quiet.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)
    if report is not None:
        result.write(report)
    return result


def _faults(names: Sequence[str] | None) -> list[Fault]:
    if names is None:
        return list(FAULTS.values())
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        raise ConfigError("faults", ",".join(unknown) if unknown else "", "fault classes among: " + ", ".join(FAULTS))
    return [FAULTS[n] for n in dict.fromkeys(names)]
