"""Job metrics through Ray's metrics system: counters, histograms and gauges tagged with the job id.

The job reports what happens to it as typed events (`resilient.runtime.events`, each with a ``kind``
and its fields); `JobMetrics.on_event` turns each event into measurements and records
them with `ray.util.metrics`. Ray exports them, with its own ``ray_`` prefix, from every node's metrics
agent in Prometheus text format (``ray.init(_metrics_export_port=...)`` or ``ray start
--metrics-export-port``); a counter gets the ``_total`` suffix:

==========================================  =========  ===========================  ===================
exported as                                  type       event                        extra tags
==========================================  =========  ===========================  ===================
``ray_resilient_batches_committed_total``    counter    commit (one or a group)
``ray_resilient_batches_redelivered_total``  counter    restart (its lost batches)
``ray_resilient_actor_restarts_total``       counter    restart                      ``reason``
``ray_resilient_rollbacks_total``            counter    rollback
``ray_resilient_retries_total``              counter    retry
``ray_resilient_poison_batches_total``       counter    dead_letter
``ray_resilient_checkpoint_seconds``         histogram  checkpoint (save/load)       ``op``
``ray_resilient_checkpoint_bytes_total``     counter    checkpoint                   ``op``
``ray_resilient_replica_errors_total``       counter    replica (growth of errors)   ``replica``
``ray_resilient_replicas_degraded``          gauge      replica (degraded now)
==========================================  =========  ===========================  ===================

Histogram counts and buckets are exact; Ray 2.60 rebuilds a histogram's ``_sum`` from bucket midpoints
(the core worker ships bucket counts, not sums), so the sum is an estimate. Every series carries
``job_id``; ``reason`` is the first word of the restart reason ("died", "hung"),
never the full text (which names batch ids), so series stay few.

Where they are recorded: in the driver, which runs the supervisor. Ray 2.60 exports metrics recorded
in a driver like any worker's (the driver's core worker pushes them to its node's metrics agent over
OpenTelemetry every ``metrics_report_interval_ms``, at least 1 s; ``tests/test_metrics.py`` reads
them back from the endpoint). Values recorded before ``ray.init`` are dropped by Ray, so nothing is
recorded until Ray is initialized. Ray's metric objects are created once per process, on first use,
and shared by every job of the process (series differ by ``job_id``); they stay valid across
``ray.shutdown()`` / ``ray.init()``.

Deciding what to record is a pure function (`measurements`) over the event and the replica error
counts seen so far; `JobMetrics` applies its result. A failure to record is logged once per kind and
never reaches the job.

Example:
    >>> m = JobMetrics("score-v1")
    >>> m.record("commit", {"batch_ids": [7, 8, 9]})   # no-op until Ray is initialized
    >>> [x.metric for x in measurements("commit", {"batch_id": 7}, {})[0]]
    ['resilient_batches_committed']
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["METRICS", "JobMetrics", "Measurement", "MetricSpec", "measurements"]

log = logging.getLogger("resilient.metrics")


class MetricSpec(NamedTuple):
    """One metric: its kind ("counter" | "histogram" | "gauge"), description and tags besides job_id."""

    kind: str
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

METRICS: dict[str, MetricSpec] = {
    "resilient_batches_committed": MetricSpec("counter", "Batches whose output was committed."),
    "resilient_batches_redelivered": MetricSpec("counter", "Batches redelivered after their actor died."),
    "resilient_actor_restarts": MetricSpec("counter", "Worker actors replaced (died or hung).", ("reason",)),
    "resilient_rollbacks": MetricSpec("counter", "Stateful slots rolled back to their last checkpoint."),
    "resilient_retries": MetricSpec("counter", "Batch attempts retried after an exception."),
    "resilient_poison_batches": MetricSpec("counter", "Batches given up on (dead letters)."),
    "resilient_checkpoint_seconds": MetricSpec(
        "histogram", "Checkpoint save or load time in seconds.", ("op",), SECONDS_BUCKETS
    ),
    "resilient_checkpoint_bytes": MetricSpec("counter", "Checkpoint bytes saved or loaded.", ("op",)),
    "resilient_replica_errors": MetricSpec("counter", "Errors from a storage replica.", ("replica",)),
    "resilient_replicas_degraded": MetricSpec("gauge", "Storage replicas degraded now."),
}


class Measurement(NamedTuple):
    """One value to record: counters add it, histograms observe it, gauges are set to it."""

    metric: str
    value: float
    tags: dict[str, str]


Replicas = Mapping[str, tuple[int, bool]]  # url -> (errors so far, degraded)


def measurements(kind: str, info: Mapping[str, Any], replicas: Replicas) -> tuple[list[Measurement], dict]:
    """What to record for one event (tags other than job_id), and the replica tally after it.

    Args:
        kind: the event kind ("commit", "restart", "rollback", "retry", "dead_letter", "checkpoint",
            "replica"; others record nothing).
        info: the event's fields.
        replicas: per replica URL, the error count and degraded flag seen so far (not modified).

    Returns:
        The measurements (counter increments are always > 0) and the new replica tally.
    """
    tally = dict(replicas)
    out: list[Measurement] = []

    def add(metric: str, value: float, **tags: str) -> None:
        if value > 0 or METRICS[metric].kind != "counter":
            out.append(Measurement(metric, float(value), tags))

    if kind == "commit":
        ids = info.get("batch_ids")
        add("resilient_batches_committed", len(ids) if ids is not None else 1)
    elif kind == "restart":
        reason = str(info.get("reason") or "unknown").split(maxsplit=1)[0]
        add("resilient_actor_restarts", 1, reason=reason)
        add("resilient_batches_redelivered", len(info.get("redelivered") or ()))
    elif kind == "rollback":
        add("resilient_rollbacks", 1)
    elif kind == "retry":
        add("resilient_retries", 1)
    elif kind == "dead_letter":
        add("resilient_poison_batches", 1)
    elif kind == "checkpoint":
        op = str(info.get("op", "unknown"))
        if info.get("seconds") is not None:
            add("resilient_checkpoint_seconds", float(info["seconds"]), op=op)
        add("resilient_checkpoint_bytes", int(info.get("bytes") or 0), op=op)
    elif kind == "replica":
        url = str(info["url"])
        errors = int(info.get("errors") or 0)
        before, _ = tally.get(url, (0, False))
        # `errors` is a running total; one that went down comes from a new store: count it afresh.
        add("resilient_replica_errors", errors - before if errors >= before else errors, replica=url)
        tally[url] = (errors, bool(info.get("degraded")))
        add("resilient_replicas_degraded", sum(1 for _, degraded in tally.values() if degraded))
    return out, tally


_lock = threading.Lock()
_instruments: dict[str, Any] | None = None


def _get_instruments() -> dict[str, Any]:
    """Ray's metric objects, created on first use, once per process."""
    global _instruments
    with _lock:
        if _instruments is None:
            from ray.util import metrics as ray_metrics

            made: dict[str, Any] = {}
            for name, spec in METRICS.items():
                tag_keys = ("job_id", *spec.tags)
                if spec.kind == "counter":
                    made[name] = ray_metrics.Counter(name, spec.description, tag_keys)
                elif spec.kind == "histogram":
                    made[name] = ray_metrics.Histogram(name, spec.description, list(spec.boundaries), tag_keys)
                else:
                    made[name] = ray_metrics.Gauge(name, spec.description, tag_keys)
            _instruments = made
        return _instruments


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


class JobMetrics:
    """Records one job's events as Ray metrics tagged ``job_id``; does nothing while Ray is not initialized.

    Args:
        job_id: the job's id (the ``job_id`` tag).
        ray_ready: says whether Ray is initialized (injectable for tests).

    Example:
        >>> metrics = JobMetrics("score-v1")
        >>> from resilient.runtime.events import CheckpointDone
        >>> metrics.on_event(CheckpointDone(slot=0, op="save", seconds=0.2, bytes=4096, generation=3))
    """

    def __init__(self, job_id: str, *, ray_ready: Callable[[], bool] = _ray_initialized) -> None:
        self.job_id = job_id
        self._ray_ready = ray_ready
        self._replicas: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def on_event(self, event: Any) -> None:
        """Record what a job event (`resilient.runtime.events.JobEvent`) means for the job's metrics.
        Never raises."""
        self.record(event.kind, event.info())

    def record(self, kind: str, info: Mapping[str, Any]) -> None:
        """Record what an event of `kind` with fields `info` means for the job's metrics. Never raises."""
        try:
            with self._lock:
                found, self._replicas = measurements(kind, info, self._replicas)
            if not found or not self._ray_ready():
                return
            instruments = _get_instruments()
            for m in found:
                self._record(instruments[m.metric], METRICS[m.metric].kind, m)
        except Exception:  # noqa: BLE001 - metrics must never stop a job
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("job %r: could not record metrics for a %r event", self.job_id, kind, exc_info=True)

    def _record(self, instrument: Any, kind: str, m: Measurement) -> None:
        tags = {"job_id": self.job_id, **m.tags}
        if kind == "counter":
            instrument.inc(m.value, tags=tags)
        elif kind == "histogram":
            instrument.observe(m.value, tags=tags)
        else:
            instrument.set(m.value, tags=tags)
