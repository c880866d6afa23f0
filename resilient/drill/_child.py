"""A job's driver in a process of its own, so that a drill can SIGKILL it and run it again.

    python -m resilient.drill._child SPEC

`SPEC` is a file the drill wrote (cloudpickle): the pipeline, source, sink, settings, job id and the
Ray address to join. The driver runs the job (resuming it if it ran before) and reports on standard
output, one line each::

    s <wall seconds> <batches done>      every 20 ms while it runs (done = resumed + committed)
    o <batch id> <digest>                each output as it is committed (`resilient.drill.jobs.output_digest`)
    e <json>                             each failure or recovery event, at the end
    r <json>                             the job's result, at the end
    x <json>                             the error the job failed with, instead of r
"""

from __future__ import annotations

import json
import sys
import threading
import time


_LOCK = threading.Lock()


def say(line: str) -> None:
    """One whole line on standard output (the sampling loop and the output consumer both write)."""
    with _LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main(path: str) -> int:
    import ray
    from ray import cloudpickle

    with open(path, "rb") as f:
        spec = cloudpickle.load(f)
    ray.init(address=spec["address"], log_to_driver=False)
    from resilient.drill.jobs import output_digest

    handle = spec["pipeline"].run(spec["source"], spec["sink"], job_id=spec["job_id"], settings=spec["settings"],
                                  init_args=spec["init_args"], init_kwargs=spec["init_kwargs"], progress=False,
                                  stream=100_000)

    def consume() -> None:
        for b, out in handle.stream():
            say(f"o {b} {output_digest(out)}")

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    while not handle.done():
        p = handle.progress()
        say(f"s {time.time()!r} {p['committed'] + p['resumed']}")
        time.sleep(0.02)
    consumer.join()
    p = handle.progress()
    say(f"s {time.time()!r} {p['committed'] + p['resumed']}")
    for e in handle.events():
        say("e " + json.dumps({"kind": e.kind, **e.info()}, default=str))
    try:
        result = handle.wait()
    except Exception as e:  # noqa: BLE001 - reported to the drill, which judges it
        say("x " + json.dumps(f"{type(e).__name__}: {e}"))
        return 1
    say("r " + json.dumps({"retries": result.retries, "restarts": result.restarts,
                           "dead": [d.batch_id for d in result.dead_letters]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
