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

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resilient.config import redact_url
from resilient.errors import NoCheckpointError
from resilient.runtime import records
from resilient.storage import layout
from resilient.storage.manifest import Manifest, choose_manifest
from resilient.storage.parity import placement

if TYPE_CHECKING:
    from resilient.storage import CheckpointStore
    from resilient.storage.replica import GuardedReplica

__all__ = [
    "JOB_RECORD",
    "Problem",
    "group_keys",
    "load_record",
    "locate_problems",
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


@dataclass(frozen=True)
class Problem:
    """One verification problem: the object it is about (``url/key/g.../name``) and what is wrong."""

    object: str
    detail: str

    def __str__(self) -> str:
        return f"{self.object}: {self.detail}"


# "<url>/<key>/g<20 digits>[/MANIFEST]: <detail>" or "<key>/g<20 digits>: <detail>" (see Examination)
_LINE = re.compile(r"^(?P<where>.*?/g\d{20})(?P<manifest>/MANIFEST)?: (?P<detail>.*)$", re.DOTALL)
_PIECE = re.compile(r"^(?P<name>[0-9a-f]{32}\.(?:data|s\d+)): (?P<detail>.*)$", re.DOTALL)
_SHARD = re.compile(r"^shard (?P<index>\d+): (?P<detail>.*)$", re.DOTALL)
_CORRUPT_PREFIX = re.compile(r"^CorruptionError: \S+: ")


def locate_problems(store: "CheckpointStore", lines: list[str]) -> list[Problem]:
    """Turn `VerifyReport.problems` lines into problems naming the exact object on its replica.

    A parity shard named only by index (``shard 1``), or missing, is resolved to its object name from
    the generation's manifest (the replica's own, else the shard placement rule).
    """
    urls = [r.url for r in store.replicas]
    manifests: dict[str, tuple[Manifest | None, dict[str, Manifest]]] = {}
    out: list[Problem] = []
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            out.append(Problem("", line))
            continue
        where, detail = m["where"], m["detail"]
        if m["manifest"]:
            out.append(Problem(f"{where}/{layout.MANIFEST}", detail))
            continue
        url = next((u for u in sorted(urls, key=len, reverse=True) if where.startswith(u + "/")), None)
        if url is None:  # "<key>/g...: no verifying copy could be assembled": the generation as a whole
            out.append(Problem(where, detail))
            continue
        piece = _PIECE.match(detail)
        if piece is not None:
            out.append(Problem(f"{where}/{piece['name']}", _CORRUPT_PREFIX.sub("", piece["detail"])))
            continue
        gdir = where[len(url) + 1 :]
        if gdir not in manifests:
            manifests[gdir] = _read_manifests(store, gdir)
        chosen, own = manifests[gdir]
        shard = _SHARD.match(detail)
        index: int | None = int(shard["index"]) if shard else None
        if chosen is not None and index is None:
            own_m = own.get(url)
            index = own_m.held if own_m is not None else placement(chosen.generation, len(urls))[urls.index(url)]
        if chosen is not None and index is not None and index < len(chosen.pieces):
            out.append(Problem(f"{where}/{chosen.pieces[index].name}", shard["detail"] if shard else detail))
        else:
            out.append(Problem(where, detail))
    return out


def _read_manifests(store: "CheckpointStore", gdir: str) -> tuple[Manifest | None, dict[str, Manifest]]:
    rel = f"{gdir}/{layout.MANIFEST}"
    own: dict[str, Manifest] = {}
    for r in store.replicas:
        try:
            own[r.url] = Manifest.from_bytes(bytes(r.backend.read(rel)), where=f"{r.url}/{rel}")
        except Exception:  # noqa: BLE001 - missing or unreadable here: another replica's may do
            continue
    return choose_manifest(own.values()), own
