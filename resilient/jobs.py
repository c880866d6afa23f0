"""Read-only views of what a checkpoint store holds: jobs, their progress, replica reachability.

The ``resilient`` command (`resilient.cli`) shows these; nothing here writes to storage. A job run by
the runtime leaves these keys in the checkpoint store (their schemas: `resilient.runtime.records`):

* ``<job>/job``: the job record, ``{"job": {pipeline, stateful, slots, sink, total}, "source": ...}``,
  written once, when the job first starts;
* ``<job>/progress``: the progress record, rewritten while the job runs and when it ends (its fields
  are documented in `resilient.runtime.records`; records written by older versions lack some);
* ``<job>/slot-<n>``: the checkpoints of a stateful job's slots;
* ``<job>/retry``: a request to process dead-lettered batches again on the next run.

Reading is split the usual way: the store is read at the edges (`load_record`, `slot_generations`,
`probe`), and what is shown is computed by pure functions over plain data (`group_keys`,
`status_view`), so they are tested without storage. Records are loaded without read-repair: looking
at a job never rewrites anything, also while the job runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient.config import redact_url
from resilient.errors import NoCheckpointError
from resilient.runtime import records
from resilient.storage.problems import Problem

if TYPE_CHECKING:
    from resilient.storage import CheckpointStore
    from resilient.storage.replica import GuardedReplica

__all__ = [
    "JOB_RECORD",
    "Problem",
    "group_keys",
    "load_record",
    "probe",
    "slot_generations",
    "status_view",
]

JOB_RECORD = records.JOB
PROGRESS = records.PROGRESS
RETRY = records.RETRY


def group_keys(keys: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split checkpoint keys into jobs (a job is a prefix with a ``<job>/job`` key) and other keys.

    A key belongs to the job with the longest id it starts with.

    >>> group_keys(["a/job", "a/progress", "a/slot-0", "model", "a/b/job", "a/b/progress"])
    ({'a': ['a/job', 'a/progress', 'a/slot-0'], 'a/b': ['a/b/job', 'a/b/progress']}, ['model'])
    """
    suffix = "/" + JOB_RECORD
    jobs: dict[str, list[str]] = {k[: -len(suffix)]: [] for k in keys if k.endswith(suffix)}
    by_length = sorted(jobs, key=len, reverse=True)
    other: list[str] = []
    for key in sorted(keys):
        owner = next((j for j in by_length if key.startswith(j + "/")), None)
        (jobs[owner] if owner is not None else other).append(key)
    return dict(sorted(jobs.items())), other


def load_record(store: "CheckpointStore", key: str) -> dict[str, Any] | None:
    """The newest verifying checkpoint of `key` (no read-repair), or None when there is none."""
    try:
        state = store.load(key, repair=False).state
    except NoCheckpointError:
        return None
    return state if isinstance(state, dict) else {"value": state}


def slot_generations(store: "CheckpointStore", job: str, keys: list[str], slots: int | None) -> dict[int, int | None]:
    """Newest checkpoint generation of each slot of `job` (None: no checkpoint yet).

    Slots come from the job record (``slots``) and from the ``<job>/slot-<n>`` keys found.
    """
    found = {i for k in keys if k.startswith(job + "/") and (i := records.slot_index(k[len(job) + 1 :])) is not None}
    wanted = sorted(found | set(range(slots or 0)))
    return {s: store.latest(records.slot_key(job, s)) for s in wanted}


def _get(record: dict[str, Any] | None, name: str) -> Any:
    return None if record is None else record.get(name)


def status_view(
    job: str,
    record: dict[str, Any],
    progress: dict[str, Any] | None,
    checkpoints: dict[int, int | None],
    replicas: list[dict[str, Any]],
    retry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``resilient status`` shows, as plain JSON-ready data; a field a record lacks is None.

    >>> v = status_view("j", {"job": {"total": 10, "stateful": False}}, {"committed": 4, "dead": [],
    ...                 "rate_per_s": 2.0, "state": "running"}, {}, [])
    >>> v["committed"], v["remaining"], v["eta_s"], v["restarts"]
    (4, 6, 3.0, None)
    """
    fp = record.get("job", {}) if isinstance(record.get("job"), dict) else {}
    total = _get(progress, "total") if _get(progress, "total") is not None else fp.get("total")
    dead = _get(progress, "dead") or []
    dead_ids = sorted(int(d["batch_id"]) for d in dead if isinstance(d, dict) and "batch_id" in d)
    committed = _get(progress, "committed")
    remaining = None
    if total is not None and committed is not None:
        remaining = max(0, int(total) - int(committed) - len(dead_ids))
    rate = _get(progress, "rate_per_s")
    state = _get(progress, "state")
    if progress is None:
        state = "starting"  # the job record exists; no progress was recorded yet
    eta = None
    if state == "running" and remaining is not None and rate:
        eta = round(remaining / float(rate), 1)
    elif state == "complete":
        eta = 0.0
    return {
        "job": job,
        "pipeline": fp.get("pipeline"),
        "stateful": fp.get("stateful"),
        "slots": fp.get("slots"),
        "sink": redact_url(fp["sink"]) if isinstance(fp.get("sink"), str) else None,
        "state": state,
        "error": redact_url(e) if isinstance(e := _get(progress, "error"), str) else e,
        "total": total,
        "committed": committed,
        "remaining": remaining,
        "rate_per_s": rate,
        "eta_s": eta,
        "restarts": _get(progress, "restarts"),
        "retries": _get(progress, "retries"),
        "actors": _get(progress, "actors"),
        "started_at": _get(progress, "started_at"),
        "updated_at": _get(progress, "updated_at"),
        "watermark": _get(progress, "watermark"),
        "dead_letters": len(dead_ids),
        "dead_letter_ids": dead_ids,
        "retry_requested": sorted(retry.get("batch_ids", [])) if isinstance(retry, dict) else None,
        "checkpoints": {str(s): g for s, g in sorted(checkpoints.items())},
        "replicas": replicas,
    }


def probe(replica: "GuardedReplica") -> dict[str, Any]:
    """List one replica's root, once, without retries: ``{"url", "ok", "detail"}``.

    A root that does not exist is reported as not ok: a job's storage root disappears only when the
    replica was lost (an unmounted disk, a deleted bucket).
    """
    try:
        replica.backend.probe()
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return {"url": replica.url, "ok": False, "detail": redact_url(f"{type(e).__name__}: {e}")}
    return {"url": replica.url, "ok": True, "detail": "reachable"}
