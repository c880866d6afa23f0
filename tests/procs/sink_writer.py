"""A process that stages outputs to a FileSink (as a worker) and may commit them (as a driver), and can
SIGKILL itself at a chosen point, the way a crash would.

Usage: python -m tests.procs.sink_writer SPEC_JSON
SPEC: {"url", "format", "options", "rows", "batches", "epoch", "kill": null | "staging" | "publish:N" |
"delta:before" | "delta:after", "commit": bool}.
Prints one JSON line per staged output (its `StagedOutput` fields), flushed, then "committed <json list>".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from resilient.io import FileSink, _publish


def output(b: int, rows: int, epoch: int) -> dict[str, Any]:
    """Batch ``b``'s rows: ids ``b * rows ...``, and the epoch that made them."""
    return {"id": list(range(b * rows, (b + 1) * rows)), "epoch": [epoch] * rows,
            "emb": [[float(b), 0.5, -1.0, 2.0] for _ in range(rows)]}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill: str | None) -> None:
    if kill == "staging":  # half of the first output's bytes are written (or its upload started), then death
        real = _publish._hashed

        def half(chunks: Any) -> Any:
            for c, view in real(chunks):
                if len(view) > 1:
                    yield c[: len(view) // 2], view[: len(view) // 2]
                    die()
                yield c, view

        _publish._hashed = half
        stage = _publish.S3Publisher.stage

        def started(self: Any, final: str, chunks: Any, **kw: Any) -> Any:
            call = self.backend.fs.call_s3

            def calls(method: str, **kwargs: Any) -> Any:
                if method == "upload_part":
                    die()
                return call(method, **kwargs)

            self.backend.fs.call_s3 = calls
            return stage(self, final, list(chunks), **kw)

        _publish.S3Publisher.stage = started
    elif kill and kill.startswith("publish:"):  # the driver dies once N publishes of a group have landed
        n = int(kill.split(":")[1])
        started, landed, lock = [0], [0], threading.Lock()
        for cls in (_publish.Publisher, _publish.LocalPublisher, _publish.S3Publisher):
            real_publish = cls.publish

            def publish(self: Any, final: str, token: str, _real: Any = real_publish) -> bool:
                with lock:
                    started[0] += 1
                    mine = started[0]
                if mine > n:  # publishes run concurrently on object stores: wait for the first N to land
                    while landed[0] < n:
                        time.sleep(0.005)
                    die()
                out = _real(self, final, token)
                with lock:
                    landed[0] += 1
                return out

            cls.publish = publish
    elif kill and kill.startswith("delta:"):  # the driver dies just before or just after the transaction
        from deltalake import DeltaTable

        real_commit = DeltaTable.create_write_transaction

        def commit(self: Any, *args: Any, **kwargs: Any) -> None:
            if kill == "delta:before":
                die()
            real_commit(self, *args, **kwargs)
            die()

        DeltaTable.create_write_transaction = commit


def main() -> None:
    spec = json.loads(sys.argv[1])
    sink = FileSink(spec["url"], format=spec["format"], storage_options=spec["options"])
    staged = []
    kill = spec.get("kill")
    if kill == "staging":
        arm(kill)
    for b in spec["batches"]:
        s = sink.encode(b, output(b, spec["rows"], spec["epoch"]), epoch=spec["epoch"])
        staged.append(s)
        print(json.dumps(asdict(s)), flush=True)
    if spec.get("commit"):
        arm(kill)
        print("committed " + json.dumps(sink.commit_group(staged)), flush=True)


if __name__ == "__main__":
    main()
