"""The Delta Lake log of a ``FileSink(url, format="delta")``: each group commit is one Delta transaction.

Workers write each batch's output as a parquet file directly into the table directory, under a fresh name
``part-<batch:012d>-e<epoch>-<8 hex>.parquet`` (`resilient.io.sinks.FileSink.encode`): a file the log does
not name is invisible to every Delta reader. The driver commits a group as **one** Delta transaction of
``add`` actions (path, size, row count), with an application transaction ``(app id, version)``:

1. The committer's app id is ``resilient-<16 hex>``, drawn once per driver-side sink; each distinct group
   it commits gets the next version, and a retry of the same group keeps its version. Before committing,
   ``transaction_version(app id) >= version`` means an earlier attempt of this group landed (its answer
   was lost): nothing is committed again.
2. Batches the table holds already (read from its ``add`` actions: the batch id is in each file name) are
   left out: a resumed run, or a batch answered twice, never adds a second file for a batch. Their staged
   files are deleted.
3. The transaction is the commit: readers see all of the group's rows or none.

A crash anywhere leaves the log committed up to some transaction; files written and never committed are
`orphans` (Delta's own ``vacuum`` also removes them). One committer at a time (the job's driver): two
concurrent committers could each add the same batch (Delta blind appends do not conflict).

deltalake needs credentials as its own options: `delta_options` maps the fsspec/s3fs ones (endpoint, key,
secret, region) to ``AWS_*`` names, with ``AWS_ALLOW_HTTP`` for an ``http://`` endpoint.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from resilient.storage.backend import Backend

__all__ = ["DeltaLog", "delta_options"]

_FILE = re.compile(r"part-(\d{12})-e(\d+)-[0-9a-f]{8}\.parquet")


def delta_options(storage_options: dict[str, Any]) -> dict[str, str]:
    """deltalake's storage options for fsspec/s3fs ones (S3 only; local paths need none).

    >>> delta_options({"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s",
    ...                "client_kwargs": {"region_name": "us-east-1"}})["AWS_ALLOW_HTTP"]
    'true'
    """
    o = storage_options
    out = {}
    for theirs, ours in (("endpoint_url", "AWS_ENDPOINT_URL"), ("key", "AWS_ACCESS_KEY_ID"),
                         ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
        if o.get(theirs):
            out[ours] = str(o[theirs])
    region = (o.get("client_kwargs") or {}).get("region_name") or o.get("region_name")
    if region:
        out["AWS_REGION"] = str(region)
    if str(o.get("endpoint_url", "")).startswith("http://"):
        out["AWS_ALLOW_HTTP"] = "true"
    return out


class DeltaLog:
    """The table of one sink URL, as the sink's driver commits and reads it."""

    def __init__(self, url: str, storage_options: dict[str, Any], backend: Backend,
                 call: Callable[..., Any]) -> None:
        self.uri = url if "://" in url and not url.startswith("file://") else url.split("://", 1)[-1]
        self.options = delta_options(storage_options) if "://" in url else {}
        self.backend = backend
        self._call = call
        self._dt: Any = None
        self._files: dict[int, str] | None = None  # batch -> file, as of `_seen`
        self._seen = -1  # table version `_files` reflects
        self.app_id = f"resilient-{secrets.token_hex(8)}"
        self._versions: dict[tuple[tuple[int, str], ...], int] = {}

    def _table(self) -> Any:
        """The table at its latest version; None if it does not exist yet (no retries: callers have them)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if self._dt is None:
            try:
                self._dt = DeltaTable(self.uri, storage_options=self.options)
            except TableNotFoundError:
                return None
        else:
            self._dt.update_incremental()
        return self._dt

    def _files_now(self) -> dict[int, str]:
        import pyarrow as pa

        dt = self._table()
        if dt is None:
            return {}
        if self._files is None or dt.version() != self._seen:
            files: dict[int, str] = {}
            for path in pa.table(dt.get_add_actions()).column("path").to_pylist():
                m = _FILE.fullmatch(path)
                if m is not None:
                    files.setdefault(int(m[1]), path)
            self._files, self._seen = files, dt.version()
        return dict(self._files)

    def committed(self) -> dict[int, str]:
        """Batch id -> data file, for every file the table holds."""
        return self._call(self._files_now, path="_delta_log")

    def _create(self, first: Any) -> Any:
        """Create the table with the schema of the group's first file (deltalake's own create-if-absent)."""
        import pyarrow.parquet as pq
        from deltalake import DeltaTable

        fs = getattr(self.backend, "fs", None)
        if fs is None:
            schema = pq.read_schema(f"{self.uri}/{first.name}")
        else:
            with fs.open(f"{self.backend.root}/{first.name}", "rb") as f:  # type: ignore[attr-defined]
                schema = pq.read_schema(f)
        DeltaTable.create(self.uri, schema, mode="ignore", storage_options=self.options)
        self._dt = None
        return self._table()

    def commit(self, outputs: list[Any]) -> list[bool]:
        """Commit one group as one transaction (see the module docstring); per output, True if its file is
        in the table by this group's transaction (or an earlier attempt of it)."""
        key = tuple(sorted((o.batch_id, o.name) for o in outputs))
        version = self._versions.setdefault(key, len(self._versions) + 1)
        mine, held = self._call(lambda: self._attempt(outputs, version), path="_delta_log")
        for o in outputs:
            if o.name not in mine and o.name not in held:  # another attempt of the batch is in the table
                try:
                    self.backend.delete(o.name)
                except Exception:  # noqa: BLE001 - an orphan, collected later
                    pass
        return [o.name in mine for o in outputs]

    def _attempt(self, outputs: list[Any], version: int) -> tuple[set[str], set[str]]:
        """One try: the names this group's transaction holds, and every name the table holds."""
        from deltalake import CommitProperties, Transaction
        from deltalake.transaction import AddAction

        dt = self._table() or self._create(outputs[0])
        have = self._files_now()
        held = set(have.values())
        if (dt.transaction_version(self.app_id) or 0) >= version:  # an earlier try landed: its answer was lost
            return {o.name for o in outputs} & held, held
        new = [o for o in outputs if o.batch_id not in have]
        if new:
            now = int(time.time() * 1000)
            actions = [AddAction(o.name, o.length, {}, now, True, json.dumps({"numRecords": o.rows}))
                       for o in new]
            props = CommitProperties(app_transactions=[Transaction(self.app_id, version)],
                                     custom_metadata={"resilient.batches": f"{len(new)} from {new[0].batch_id}"})
            dt.create_write_transaction(actions, mode="append", schema=dt.schema(), commit_properties=props)
        return {o.name for o in new}, held

    def orphans(self) -> list[str]:
        """Data files in the table directory that the table does not hold."""
        held = set(self.committed().values())
        return sorted(n for n in self._call(self.backend.listdir, "", path="")
                      if _FILE.fullmatch(n) and n not in held)
