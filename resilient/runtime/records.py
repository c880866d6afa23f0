"""The records a job keeps in the checkpoint store: their keys and their schemas, in one place.

The driver (`resilient.runtime.supervisor`), the workers, the CLI and `resilient.jobs` all read and
write them through this module.

Keys (under the job id, which may itself contain ``/``):

* ``<job>/job``: the job record, written once when the job first starts:
  ``{"job": {pipeline, stateful, slots, sink, total}, "source": <the source's fingerprint>}``. A re-run
  with the same id must match it (else `JobMismatchError`).
* ``<job>/progress``: the progress record, rewritten while the job runs and when it ends:

  - ``watermark``: every batch below is done; ``done_above``: done ids at or above it; ``total``;
  - ``redo``: retried dead letters below the watermark, not committed yet;
  - ``dead``: dead letters, each ``{batch_id, error, traceback, attempts}``;
  - ``committed``: batches with a committed output (all runs); ``rate_per_s``: commits per second in
    this run; ``restarts``, ``retries``: this run;
  - ``actors``: ``{slot, pid, node_id, epoch}`` of each running slot;
  - ``started_at``, ``updated_at``: Unix times of this run's start and of this record;
  - ``state``: ``"running"``, ``"complete"``, ``"failed"`` or ``"stopped"`` (asked to stop: SIGTERM, Ctrl-C);
    ``error``: why it failed, or None;
  - ``retry_generation``: the last retry request acted on.

  Records written by older versions lack some fields; readers use `read_progress`.
* ``<job>/slot-<n>``: the checkpoints of a stateful job's slot ``n``: ``{"user": <state_dict>,
  "cursor": <next batch id of the slot>}``.
* ``<job>/retry``: a request to process dead letters again on the next run: ``{"batch_ids": [...],
  "requested_at": <Unix time>}``; its generation says whether a run acted on it already.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "JOB",
    "PROGRESS",
    "RETRY",
    "Resume",
    "job_key",
    "progress_key",
    "progress_record",
    "read_progress",
    "retry_key",
    "retry_request",
    "slot_index",
    "slot_key",
]

JOB = "job"
PROGRESS = "progress"
RETRY = "retry"
_SLOT = re.compile(r"slot-(\d+)")


def job_key(job_id: str) -> str:
    """The job record's key.

    >>> job_key("score-v1")
    'score-v1/job'
    """
    return f"{job_id}/{JOB}"


def progress_key(job_id: str) -> str:
    return f"{job_id}/{PROGRESS}"


def retry_key(job_id: str) -> str:
    return f"{job_id}/{RETRY}"


def slot_key(job_id: str, slot: int) -> str:
    """The key of a slot's checkpoints.

    >>> slot_key("score-v1", 3)
    'score-v1/slot-3'
    """
    return f"{job_id}/slot-{slot}"


def slot_index(name: str) -> int | None:
    """The slot a key's last segment names, or None.

    >>> slot_index("slot-12"), slot_index("progress")
    (12, None)
    """
    m = _SLOT.fullmatch(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Resume:
    """Where a re-run starts, read from a progress record."""

    watermark: int = 0
    done_above: tuple[int, ...] = ()
    redo: tuple[int, ...] = ()
    dead: tuple[dict, ...] = ()
    retry_generation: int = -1


def read_progress(record: dict[str, Any] | None) -> Resume:
    """The resume point of a progress record (None: a first run).

    >>> read_progress(None).watermark
    0
    >>> r = read_progress({"watermark": 5, "dead": [{"batch_id": 7, "error": "e", "traceback": "", "attempts": 3}]})
    >>> r.watermark, [d["batch_id"] for d in r.dead]
    (5, [7])
    """
    if not record:
        return Resume()
    return Resume(
        watermark=int(record.get("watermark", 0)),
        done_above=tuple(int(b) for b in record.get("done_above", ())),
        redo=tuple(int(b) for b in record.get("redo", ())),
        dead=tuple(dict(d) for d in record.get("dead", ())),
        retry_generation=int(record.get("retry_generation", -1)),
    )


def progress_record(fields: dict[str, Any], *, started_at: float, now: float, resumed_done: int,
                    retry_generation: int) -> dict[str, Any]:
    """The progress record to save: the scheduler's fields (`Scheduler.progress_fields`) with the
    run's times, its rate and the retry generation.

    >>> r = progress_record({"watermark": 10, "done_above": [12], "dead": [], "total": 20}, started_at=100.0,
    ...                     now=102.0, resumed_done=4, retry_generation=-1)
    >>> r["committed"], r["rate_per_s"], r["updated_at"]
    (11, 3.5, 102.0)
    """
    done = int(fields["watermark"]) + len(fields.get("done_above", ()))
    return {
        **fields,
        "committed": done - len(fields.get("dead", ())),
        "rate_per_s": round((done - resumed_done) / max(1e-9, now - started_at), 3),
        "started_at": started_at,
        "updated_at": now,
        "retry_generation": retry_generation,
    }


def retry_request(batch_ids: list[int], requested_at: float) -> dict[str, Any]:
    """A request to retry dead letters on the next run (``resilient dead-letters JOB --retry``)."""
    return {"batch_ids": sorted(int(b) for b in batch_ids), "requested_at": requested_at}
