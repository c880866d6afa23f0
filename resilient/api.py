"""`@resilient.pipeline` and the job handle: what users write and what they get back.

Example:
    >>> import resilient
    >>> @resilient.pipeline(num_actors=2)
    ... class Doubler:
    ...     def __call__(self, batch):
    ...         return {"id": batch["id"], "y": batch["id"] * 2}
    >>> # handle = Doubler.run(range(10_000), sink="file:///tmp/out", job_id="double-1")
    >>> # handle.wait(); list(handle.results())
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from resilient.config import Settings
from resilient.errors import ConfigError
from resilient.metrics import JobMetrics
from resilient.progress import ProgressReporter
from resilient.runtime.events import BatchesCommitted, CheckpointDone, JobEvent
from resilient.runtime.supervisor import JobResult, Supervisor
from resilient.runtime.worker import JobSpec

__all__ = ["JobHandle", "Pipeline", "pipeline"]

T = TypeVar("T")


class JobHandle:
    """A running (or finished) job: wait on it, watch it, read its committed outputs in input order.

    Every event of the job is also recorded as a Ray metric (`resilient.metrics.JobMetrics`), and a
    progress line is drawn on standard error while the job runs (`resilient.progress.ProgressReporter`):
    by default only on a terminal outside CI; ``progress=True``/``False`` forces it on or off.

    SIGTERM and Ctrl-C (SIGINT) of the driver stop its running jobs gracefully (`stop`); a second one
    acts as it would have without resilient (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process).
    ``ray job stop`` sends SIGTERM. The handlers are installed when a job starts from the main thread.
    """

    def __init__(self, supervisor: Supervisor, *, progress: bool | None = None, stream: int = 0) -> None:
        self._supervisor = supervisor
        self.job_id = supervisor.spec.job_id
        self.sink = supervisor.sink
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        self._events: collections.deque = collections.deque(maxlen=10_000)
        self._committed = 0
        self._started = time.monotonic()
        self._metrics = JobMetrics(self.job_id)
        self._stream: queue.Queue | None = queue.Queue(maxsize=stream) if stream else None
        self._reporter = ProgressReporter(self.progress, enabled=progress)
        supervisor.on_event = self._on_event
        self._thread = threading.Thread(target=self._run, name=f"resilient-job-{self.job_id}", daemon=True)
        _LIVE.add(self)
        _install_stop_handlers()
        self._thread.start()
        self._reporter.start()

    def stop(self, reason: str = "stop() was called") -> None:
        """Stop the job gracefully: nothing more is sent to the actors; what has answered is committed, the
        slots' state and the progress are saved, within ``stop_timeout_seconds``; then `wait` raises
        `resilient.JobStoppedError`. Running the job again (same job id) resumes it."""
        self._supervisor.request_stop(reason)

    def _on_event(self, event: JobEvent) -> None:
        self._metrics.on_event(event)
        if isinstance(event, BatchesCommitted):
            # counted, not kept: a handle's memory does not grow with the job; a group commit counts each
            self._committed += len(event.batch_ids)
            if self._stream is not None and event.outputs:
                self._stream.put(event.outputs)  # blocks the job while the consumer is behind
        elif not isinstance(event, CheckpointDone):  # routine: kept out so failures stay in the window
            self._events.append(event)

    def progress(self) -> dict:
        """Committed batches (this run), total, rate, restarts, retries and dead letters so far, and
        ``resumed``: the batches already done when this run started."""
        sup = self._supervisor
        elapsed = max(1e-9, time.monotonic() - self._started)
        return {
            "job_id": self.job_id,
            "committed": self._committed,
            "total": sup.total,
            "rate_per_s": self._committed / elapsed,
            "restarts": sup.restarts,
            "retries": sup.retries,
            "dead_letters": len(sup.dead),
            "resumed": sup.resumed_done,
            "done": self.done(),
        }

    def _run(self) -> None:
        try:
            self._result = self._supervisor.run()
        except BaseException as e:  # noqa: BLE001 - surfaced by wait()
            self._error = e
        finally:
            if self._stream is not None:
                self._stream.put(None)
            err = self._error
            self._reporter.stop(note=f"failed: {type(err).__name__}" if err is not None else "done")

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends; return its `JobResult` or raise its error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"job {self.job_id!r} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def actors(self) -> list[dict]:
        """The worker actors now serving the job: slot, pid, node id, epoch."""
        return self._supervisor.actors()

    def events(self) -> list[JobEvent]:
        """Failures and recoveries seen so far (the last 10,000), as typed events
        (`resilient.runtime.events`): `ActorStarted`, `ActorReplaced`, `SlotRolledBack`, `BatchRetried`,
        `BatchDeadLettered`, `ReplicaChanged`. Commits are counted in `progress`; commits and checkpoints
        are recorded as metrics."""
        return list(self._events)

    def results(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        """Committed outputs as ``(batch_id, output)`` in input order (read back from the sink)."""
        return self.sink.read_all(start)

    def stream(self) -> Iterator[tuple[int, Any]]:
        """Outputs as ``(batch_id, output)`` as they are committed by this run (commit order, not input
        order), straight from the workers' answers: nothing is read back from the sink. Needs
        ``run(..., stream=N)``; the job waits whenever N groups of outputs are not consumed yet. Ends when
        the job does (then `wait` tells how). One consumer per handle."""
        if self._stream is None:
            raise ConfigError("stream", 0, "run(..., stream=N) with N >= 1 to stream outputs")
        return self._streamed(self._stream)

    def _streamed(self, q: queue.Queue) -> Iterator[tuple[int, Any]]:
        while True:
            outputs = q.get()
            if outputs is None:
                q.put(None)  # a second call ends at once too
                return
            for o in outputs:
                yield o.batch_id, self.sink.decode(o)


class Pipeline(Generic[T]):
    """A user class or function made resilient; ``run`` launches it as a job."""

    def __init__(self, target: T, options: dict[str, Any]) -> None:
        self.target = target
        self.options = dict(options)
        functools.update_wrapper(self, target, updated=())  # type: ignore[arg-type]
        self.stateful = isinstance(target, type) and callable(getattr(target, "state_dict", None))
        if self.stateful and not callable(getattr(target, "load_state_dict", None)):
            raise ConfigError(
                "pipeline", getattr(target, "__qualname__", target), "a class defining both state_dict and "
                "load_state_dict (or neither)",
            )

    def with_options(self, **options: Any) -> "Pipeline[T]":
        """A copy with more options (same names as the ``RESILIENT_*`` settings, lower case)."""
        return Pipeline(self.target, {**self.options, **options})

    def run(
        self,
        source: Any,
        sink: Any,
        *,
        job_id: str,
        init_args: tuple = (),
        init_kwargs: dict | None = None,
        sink_format: str = "jsonl",
        batch_size: int | None = None,
        settings: Settings | None = None,
        progress: bool | None = None,
        stream: int = 0,
    ) -> JobHandle:
        """Run (or resume) job `job_id`: every batch of `source` gets exactly one committed output in
        `sink`. Starts a local Ray instance if none is connected.

        Args:
            source: a `resilient.io.Source`, a sequence (each element a batch), a range (row ids batched
                by `batch_size`), a re-iterable or zero-argument callable, a file glob source or a Ray
                Dataset.
            sink: a `resilient.io.FileSink` or a URL (outputs written as `sink_format`).
            job_id: names the job; re-running with the same id resumes it.
            progress: draw a progress line on standard error while the job runs: True, False, or None
                (only on a terminal, and not where ``CI`` is set).
            stream: with N >= 1, outputs are also handed to `JobHandle.stream` as they are committed,
                at most N groups ahead of the consumer (the job waits for it beyond that).
        """
        from resilient.io.sinks import FileSink
        from resilient.io.sources import as_source
        from resilient.storage.layout import validate_key

        from resilient.placement import ACCEPTED

        validate_key(job_id)
        settings = settings or Settings.from_env()
        runtime = {k: v for k, v in self.options.items() if k not in ACCEPTED}
        ray_style = {k: v for k, v in self.options.items() if k in ACCEPTED}
        if ray_style:  # @resilient.pipeline(memory=..., resources=...): Ray's own keywords
            runtime["ray_remote_args"] = {**dict(runtime.get("ray_remote_args", settings.ray_remote_args)), **ray_style}
        if runtime:
            settings = settings.with_options(**runtime)
        src = as_source(source, batch_size=batch_size)
        if not isinstance(sink, FileSink):
            sink = FileSink(sink, format=sink_format, storage_options=settings.storage_options_for(sink))
        _refuse_in_code_secrets(settings, sink)
        _ensure_ray()
        spec = JobSpec(
            job_id=job_id,
            target=self.target,
            init_args=tuple(init_args),
            init_kwargs=dict(init_kwargs or {}),
            stateful=self.stateful,
            sink=sink,
            settings=settings,
            slots=settings.num_actors,
        )
        if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
            raise ConfigError("stream", stream, "an int >= 0 (0: no streaming)")
        return JobHandle(Supervisor(spec, src), progress=progress, stream=stream)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)  # type: ignore[operator]


_LIVE: weakref.WeakSet[JobHandle] = weakref.WeakSet()
_PREVIOUS: dict[int, Any] = {}  # signal -> the handler before ours


def _install_stop_handlers() -> None:
    """Route SIGTERM and SIGINT to `_on_stop_signal`, once per process (only the main thread may)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        if sig in _PREVIOUS:
            continue
        previous = signal.getsignal(sig)
        if previous is None:  # installed outside Python: leave it alone
            continue
        _PREVIOUS[sig] = previous
        signal.signal(sig, _on_stop_signal)


def _on_stop_signal(signum: int, frame: Any) -> None:
    """The first signal stops the running jobs gracefully; with none running, or at the second signal,
    the handler that was there before acts."""
    running = [h for h in list(_LIVE) if not h.done()]
    if running and not any(h._supervisor._stop_asked for h in running):
        for h in running:
            h.stop(f"the driver received {signal.Signals(signum).name}")
        return
    previous = _PREVIOUS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _refuse_in_code_secrets(settings: Settings, sink: Any) -> None:
    """Worker actors are other processes: a secret given in code cannot reach them (it never travels in
    pickled arguments), so refuse before any actor starts rather than fail in each one."""
    from resilient.config import seal_secrets, sink_resolver

    found = settings.in_code_secrets()
    _, refs = seal_secrets(sink.storage_options, sink_resolver(sink.url))
    if any(ref[0] == "local" for _, ref in refs):
        found.append(f"storage options of the sink {sink!r}")
    if found:
        raise ConfigError(
            "settings", ", ".join(found), "secrets taken from the environment (RESILIENT_STORAGE_OPTIONS, "
            "RESILIENT_SIGNING_KEY, AWS_* or your provider's chain), which worker actors read themselves",
            detail="secrets given in code never travel to other processes",
        )


def _ensure_ray(environ: Any = None) -> None:
    """Connect to Ray: the cluster this process runs in or points at (a Ray job's driver has
    ``RAY_ADDRESS``; a ``ray start`` cluster on this machine is found too), joined as it is configured;
    else a local instance started here, on which a dead actor is reported at once."""
    import os

    import ray

    if ray.is_initialized():
        return
    existing = (environ if environ is not None else os.environ).get("RAY_ADDRESS")
    if not existing:
        try:
            from ray._private.services import canonicalize_bootstrap_address

            existing = canonicalize_bootstrap_address(None)
        except Exception:  # noqa: BLE001 - a private helper: if it moves, start a local instance
            existing = None
    if existing:
        ray.init()  # an existing cluster refuses _system_config: it keeps its own
    else:
        ray.init(
            include_dashboard=False,
            _system_config={"timeout_ms_task_wait_for_death_info": 0},
            log_to_driver=False,
        )


@overload
def pipeline(target: T) -> Pipeline[T]: ...
@overload
def pipeline(*, num_actors: int = ..., **options: Any) -> Callable[[T], Pipeline[T]]: ...
def pipeline(target: Any = None, **options: Any) -> Any:
    """Make a class (stateful if it defines ``state_dict``/``load_state_dict``) or a function resilient.

    Works bare (``@resilient.pipeline``) or with options (``@resilient.pipeline(num_actors=4,
    checkpoint_every=100)``); options are the ``RESILIENT_*`` settings in lower case and win over the
    environment. Ray's actor options go to every worker actor, as ``ray_remote_args={...}`` or as
    ``@ray.remote``-style keywords (``memory=``, ``resources=``, ``accelerator_type=``,
    ``label_selector=``, ``runtime_env=``, ``scheduling_strategy=``, ``placement_group_bundles=``): see
    `resilient.placement` for what is accepted and what resilient keeps for itself.
    """
    if target is not None:
        return Pipeline(target, options)
    return lambda t: Pipeline(t, options)
