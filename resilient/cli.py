"""The ``resilient`` command: look at jobs and keep checkpoint storage honest.

Sub-commands::

    resilient config                      the effective settings, where each came from (secrets masked)
    resilient status JOB                  progress, state, actors, checkpoints, dead letters, replicas
    resilient ls                          jobs and other checkpoint keys in the storage
    resilient verify [KEY]                read, check and dry-run decode every copy of every checkpoint
    resilient repair [KEY]                rewrite missing or corrupt copies from good ones
    resilient gc [KEY] [--delete]         retention and orphans (dry run unless --delete)
    resilient dead-letters JOB [--retry]  poison batches; ask the next run to process them again
    resilient drill MODULE:PIPELINE ...   a fault drill of a pipeline (`resilient.drill`)

Storage comes from the environment (``RESILIENT_STORAGE`` and the other ``RESILIENT_*`` variables,
through `resilient.Settings.from_env`); a repeated ``--storage URL`` replaces ``RESILIENT_STORAGE``.

Exit status: 0 when all is well; 1 when problems were found (a failed job, an unreachable replica, a
damaged checkpoint, an unknown job, a refused request, a malformed file); 2 for a usage or configuration
error; 141 (128 + SIGPIPE, as other commands end) when the reader of the output went away (``resilient
config | head -1``), quietly.

Secrets never reach the output: URLs go through `resilient.config.redact_url`, settings through
`Settings.describe`, and storage options are never printed. `main` takes its arguments, environment,
streams and clock as parameters, so tests run it in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, NoReturn, TextIO, TypeVar

from resilient import __version__
from resilient.config import Settings, redact_url
from resilient.errors import ConfigError, ResilientError
from resilient.runtime import records
from resilient.jobs import JOB_RECORD, PROGRESS, RETRY, group_keys, load_record, probe, \
    slot_generations, status_view
from resilient.storage import CheckpointStore, layout

__all__ = ["EXIT_OK", "EXIT_PIPE", "EXIT_PROBLEMS", "EXIT_USAGE", "main"]

T = TypeVar("T")

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 128 + int(getattr(signal, "SIGPIPE", 13))
_SOURCE_NAMES = {"keyword": "command line", "environment": "environment", "default": "default"}
_IDS_SHOWN = 20


class _Exit(Exception):
    """Stop with an exit status and a message for stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        """argparse writing to the injected streams and raising instead of exiting."""

        def _print_message(self, message: str, file: Any = None) -> None:
            if message:
                (stderr if file is sys.stderr else stdout).write(message)

        def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
            if message:
                stderr.write(message)
            raise _Exit(status)

    storage = Parser(add_help=False)
    storage.add_argument(
        "--storage", action="append", metavar="URL",
        help="a storage replica URL or path; repeat for each replica (replaces RESILIENT_STORAGE)",
    )
    as_json = Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of text")

    top = Parser(
        prog="resilient",
        description="Inspect resilient jobs and maintain their checkpoint storage. Storage comes from "
        "RESILIENT_STORAGE and the other RESILIENT_* variables, or from --storage.",
        epilog="Exit status: 0 ok, 1 problems found or job failed, 2 usage or configuration error.",
    )
    top.add_argument("--version", action="version", version=f"resilient {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("config", parents=[storage, as_json], help="show the effective settings and their sources",
                   description="Every RESILIENT_* setting, its value (credentials masked) and where it came "
                   "from: command line, environment or default.")
    p = sub.add_parser("status", parents=[storage, as_json], help="progress and health of one job",
                       description="Progress, state, actors, restarts, retries, slot checkpoints, dead letters "
                       "and replica reachability of a job, while it runs or after. Exits 1 when the job failed "
                       "or a replica is unreachable.")
    p.add_argument("job", metavar="JOB", help="the job id given to run()")
    sub.add_parser("ls", parents=[storage, as_json], help="list jobs and checkpoint keys",
                   description="Jobs (with state and progress) and other checkpoint keys, each with its newest "
                   "generation.")
    p = sub.add_parser("verify", parents=[storage, as_json], help="check every copy of every checkpoint",
                       description="Read every manifest and stored object of every retained generation on every "
                       "replica, check lengths, checksums and signatures, and decode each checkpoint as a dry "
                       "run (nothing is built, no pickle is loaded). Exits 1 on any problem.")
    p.add_argument("key", nargs="?", metavar="KEY", help="one checkpoint key (default: every key)")
    p = sub.add_parser("repair", parents=[storage, as_json], help="rewrite missing or corrupt copies",
                       description="Rewrite missing or corrupt copies from good ones (only from a checkpoint that "
                       "decodes), then verify again. Exits 1 when problems remain.")
    p.add_argument("key", nargs="?", metavar="KEY", help="one checkpoint key (default: every key)")
    p = sub.add_parser("gc", parents=[storage, as_json], help="remove superseded generations and orphans",
                       description="Apply retention (RESILIENT_KEEP) and find orphans: failed writes, losing "
                       "writers' objects, stale temporaries, and with --sink a finished job's staged outputs "
                       "that were never committed. Lists them (dry run) unless --delete is given.")
    p.add_argument("key", nargs="?", metavar="KEY", help="one checkpoint key (default: every key)")
    mode = p.add_mutually_exclusive_group()
    # both write `delete`; argparse takes the default of the first: keep it False on both (dry run)
    mode.add_argument("--dry-run", dest="delete", action="store_false", default=False, help="only list (the default)")
    mode.add_argument("--delete", dest="delete", action="store_true", default=False, help="delete what is listed")
    p.add_argument("--grace-seconds", type=_seconds, default=3600.0, metavar="S",
                   help="leave temporaries younger than this (default 3600)")
    p.add_argument("--sink", metavar="URL", help="also the staged orphans of this complete job output")
    p = sub.add_parser("dead-letters", parents=[storage, as_json], help="list a job's poison batches, or retry them",
                       description="Poison batches of a job: id, attempts, errors. With --retry, record a request "
                       "that the next run of the job (same job id) processes them again.")
    p.add_argument("job", metavar="JOB", help="the job id given to run()")
    p.add_argument("--traceback", action="store_true", help="show each batch's last traceback")
    p.add_argument("--retry", nargs="*", type=_batch_id, metavar="ID",
                   help="retry these dead-lettered batch ids (all of them when none is given)")
    p = sub.add_parser("drill", parents=[as_json], help="run a pipeline through every fault class and judge it",
                       description="Run MODULE:PIPELINE on a sample of a source: two fault-free references, then "
                       "one run per fault class (kills, hangs, exceptions, poison, zombie, storage, driver), each "
                       "checked for exactly-once outputs, equal outputs and equal final state, with recovery "
                       "figures. Local Ray, or the cluster RAY_ADDRESS names. Exits 1 when a check fails.")
    p.add_argument("pipeline", metavar="MODULE:PIPELINE", help="a @resilient.pipeline, e.g. examples.score_pipeline:Scorer")
    p.add_argument("--source", required=True, metavar="SOURCE",
                   help="range:ROWS[:BATCH], MODULE:NAME (an object or, with --source-kwargs, a function), or a file glob")
    p.add_argument("--source-kwargs", metavar="JSON", help="call the MODULE:NAME source with these keyword arguments")
    p.add_argument("--init-kwargs", metavar="JSON", help="the pipeline class's constructor keyword arguments")
    p.add_argument("--batch-size", type=_batch_id, metavar="N", help="rows per batch of a range or of files (1024)")
    p.add_argument("--batches", type=_batch_id, metavar="N", help="the sample: the first N batches (default 2000)")
    p.add_argument("--faults", metavar="A,B", help="fault classes to run (default: all)")
    p.add_argument("--report", metavar="DIR", default="drill-report",
                   help="where drill.json and drill.png go (default ./drill-report)")
    p.add_argument("--scratch", metavar="DIR", help="where the scratch sinks and stores go (default: temp dir)")
    p.add_argument("--drain-nodes", action="store_true",
                   help="let the preemption class drain a node (Ray keeps it out of service until it is restarted)")
    return top


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected a finite number >= 0")
    return value


def _batch_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch id {text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"batch id {text!r} is not accepted: expected an integer >= 0")
    return value


class _Context:
    """One invocation: parsed arguments, environment, streams, clock, and the store opened on demand."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str], out: TextIO, err: TextIO,
                 clock: Callable[[], float]) -> None:
        self.args, self.environ, self.out, self.err, self.clock = args, environ, out, err, clock
        self._settings: Settings | None = None
        self._store: CheckpointStore | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            overrides = {"storage": self.args.storage} if self.args.storage else {}
            self._settings = self._warned(lambda: Settings.from_env(self.environ, **overrides))
        return self._settings

    def store(self) -> CheckpointStore:
        if self._store is None:
            settings = self.settings()
            self._store = self._warned(lambda: CheckpointStore(settings))
        return self._store

    def _warned(self, make: Callable[[], Any]) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = make()
        for w in caught:
            self.err.write(f"resilient: warning: {redact_url(str(w.message))}\n")
        return value

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def json(self, value: Any) -> None:
        self.out.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def main(
    argv: list[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run the ``resilient`` command; return its exit status (0 ok, 1 problems found, 2 usage error).

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` when None).
        environ: where ``RESILIENT_*`` settings are read (``os.environ`` when None).
        stdout, stderr: output streams (``sys.stdout`` / ``sys.stderr`` when None).
        clock: the current Unix time (ages and ETAs; a retry request's timestamp).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> main(["config", "--storage", "memory://a"], environ={}, stdout=out)
        0
        >>> "RESILIENT_STORAGE" in out.getvalue()
        True
    """
    environ = os.environ if environ is None else environ
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("resilient: %(levelname)s: %(message)s"))
    logger = logging.getLogger("resilient")
    logger.addHandler(handler)
    ctx: _Context | None = None
    try:
        try:
            args = _parser(out, err).parse_args(sys.argv[1:] if argv is None else argv)
            ctx = _Context(args, environ, out, err, clock)
            code = _COMMANDS[args.command](ctx)
        except _Exit as e:
            if e.message:
                err.write(f"resilient: {e.message}\n")
            code = e.code
        except ConfigError as e:
            err.write(f"resilient: configuration error: {e}\n")
            code = EXIT_USAGE
        except ResilientError as e:
            err.write(f"resilient: {type(e).__name__}: {redact_url(str(e))}\n")
            code = EXIT_PROBLEMS
        except KeyboardInterrupt:
            err.write("resilient: interrupted\n")
            code = 130
        finally:
            try:
                if ctx is not None:
                    ctx.close()
            finally:
                logger.removeHandler(handler)
        out.flush()
    except BrokenPipeError:  # the reader of the output went away (`resilient config | head -1`)
        return _pipe_closed(out)
    return code


def _pipe_closed(out: TextIO) -> int:
    """The reader of ``out`` went away: point its descriptor at /dev/null so that nothing (the
    interpreter's own flush at exit included) writes to the closed pipe again; the exit status."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream
        return EXIT_PIPE
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    return EXIT_PIPE


# ---------------------------------------------------------------------------------------------- config


def _config(ctx: _Context) -> int:
    rows = [(var, value, _SOURCE_NAMES.get(src, src)) for var, value, src in ctx.settings().describe()]
    if ctx.args.json:
        ctx.json([{"variable": v, "value": val, "source": s} for v, val, s in rows])
        return EXIT_OK
    width = max(len(v) for v, _, _ in rows)
    vwidth = min(60, max(len(val) for _, val, _ in rows))
    for var, value, source in rows:
        ctx.print(f"{var:<{width}}  {value:<{vwidth}}  ({source})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- jobs


def _key(text: str, what: str) -> str:
    try:
        return layout.validate_key(text)
    except ValueError as e:
        raise _Exit(EXIT_USAGE, f"{what}: {e}") from None


def _job_record(ctx: _Context, job: str) -> dict[str, Any]:
    """The job record of `job`; an unknown job stops with status 1 naming the jobs there are."""
    _key(job, "job id")
    store = ctx.store()
    record = load_record(store, f"{job}/{JOB_RECORD}")
    if record is not None:
        return record
    jobs, _ = group_keys(store.keys())
    where = ", ".join(r.url for r in store.replicas)
    known = f"known jobs: {', '.join(jobs)}" if jobs else "no job has been run with this storage"
    raise _Exit(EXIT_PROBLEMS, f"no job {job!r} in {where}; {known}")


def _status(ctx: _Context) -> int:
    job = ctx.args.job
    record = _job_record(ctx, job)
    store = ctx.store()
    progress = load_record(store, f"{job}/{PROGRESS}")
    retry = _pending_retry(store, job, progress)
    fp = record.get("job") if isinstance(record.get("job"), dict) else {}
    slots = fp.get("slots") if fp.get("stateful") else None
    checkpoints = slot_generations(store, job, [], slots) if slots else {}
    replicas = [probe(r) for r in store.replicas]
    view = status_view(job, record, progress, checkpoints, replicas, retry)
    code = EXIT_PROBLEMS if view["state"] == "failed" or not all(r["ok"] for r in replicas) else EXIT_OK
    if ctx.args.json:
        ctx.json(view)
        return code
    now = ctx.clock()
    unknown = "unknown"

    def shown(value: Any) -> str:
        return unknown if value is None else str(value)

    kind = {True: f"stateful, {view['slots']} slots", False: "stateless"}.get(view["stateful"], unknown)
    ctx.print(f"job {job}: {view['state'] or unknown}")
    if view["state"] == "running" and view["updated_at"] is not None and now - view["updated_at"] > 30:
        ctx.print(f"  note: no progress recorded for {_age(now - view['updated_at'])}: the driver may have stopped")
    if view["error"]:
        ctx.print(f"  error: {view['error']}")
    ctx.print(f"  pipeline     {shown(view['pipeline'])} ({kind})")
    if view["sink"]:
        ctx.print(f"  sink         {view['sink']}")
    total, committed = view["total"], view["committed"]
    pct = f" ({100 * committed / total:.1f}%)" if total and committed is not None else ""
    rate = f"{view['rate_per_s']:g} batches/s" if view["rate_per_s"] is not None else unknown
    eta = _age(view["eta_s"]) if view["eta_s"] is not None else unknown
    ctx.print(f"  progress     {shown(committed)} / {shown(total)} batches committed{pct}; "
              f"{view['dead_letters']} dead; rate {rate}; ETA {eta}")
    ctx.print(f"  started      {_when(view['started_at'], now)}")
    ctx.print(f"  updated      {_when(view['updated_at'], now)}")
    ctx.print(f"  restarts     {shown(view['restarts'])} (this run); retries {shown(view['retries'])} (this run)")
    actors = view["actors"]
    if actors is None:
        ctx.print(f"  actors       {unknown}")
    elif view["state"] == "running":
        ctx.print(f"  actors       {len(actors)} running")
    else:
        ctx.print("  actors       none running" + (" (the last ones:)" if actors else ""))
    for a in actors or []:
        ctx.print(f"    slot {a.get('slot')}: pid {a.get('pid')} on node {a.get('node_id')}, epoch {a.get('epoch')}")
    if view["stateful"]:
        parts = [f"slot {s}: " + (f"generation {g}" if g is not None else "none yet") for s, g in
                 view["checkpoints"].items()]
        ctx.print("  checkpoints  " + ("; ".join(parts) or "none"))
    ids = view["dead_letter_ids"]
    more = f" ... (+{len(ids) - _IDS_SHOWN} more)" if len(ids) > _IDS_SHOWN else ""
    ctx.print(f"  dead letters {len(ids)}" + (": " + ", ".join(map(str, ids[:_IDS_SHOWN])) + more if ids else ""))
    if view["retry_requested"]:
        ctx.print(f"  retry        requested for batches {view['retry_requested']} (on the next run)")
    ctx.print("  replicas")
    for r in replicas:
        ctx.print(f"    {r['url']}: {'ok' if r['ok'] else 'UNREACHABLE: ' + r['detail']}")
    return code


def _ls(ctx: _Context) -> int:
    store = ctx.store()
    unreachable = [p for p in store.set.probe() if not p.reachable]  # flagged first: nothing waits on them
    code = EXIT_PROBLEMS if unreachable else EXIT_OK
    jobs, other = group_keys(store.keys())
    gens = {k: store.latest(k) for keys in jobs.values() for k in keys} | {k: store.latest(k) for k in other}
    listed = []
    for job, keys in jobs.items():
        progress = load_record(store, f"{job}/{PROGRESS}") if f"{job}/{PROGRESS}" in keys else None
        listed.append({
            "job": job,
            "state": (progress or {}).get("state") if progress is not None else "starting",
            "committed": (progress or {}).get("committed"),
            "total": (progress or {}).get("total"),
            "dead_letters": len((progress or {}).get("dead") or []),
            "keys": {k: gens[k] for k in keys},
        })
    if ctx.args.json:
        ctx.json({"jobs": listed, "keys": {k: gens[k] for k in other},
                  "unreachable": [{"url": p.url, "detail": p.detail} for p in unreachable]})
        return code
    for p in unreachable:
        ctx.print(f"UNREACHABLE {p.url}: {p.detail}")
    if not listed and not other:
        ctx.print(f"no checkpoints in {', '.join(r.url for r in store.replicas)}")
        return code
    if listed:
        ctx.print("jobs:")
        for j in listed:
            state = j["state"] or "unknown"
            done = "/".join("?" if j[f] is None else str(j[f]) for f in ("committed", "total"))
            ctx.print(f"  {j['job']}  {state}  {done} committed, {j['dead_letters']} dead")
            for k, g in j["keys"].items():
                ctx.print(f"    {k}  generation {g if g is not None else '-'}")
    if other:
        ctx.print("other keys:")
        for k in other:
            ctx.print(f"  {k}  generation {gens[k] if gens[k] is not None else '-'}")
    return code


def _pending_retry(store: Any, job: str, progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's retry request, unless a run already acted on it (its progress record says so)."""
    retry = load_record(store, f"{job}/{RETRY}")
    if retry is None:
        return None
    seen = (progress or {}).get("retry_generation", -1)
    latest = store.latest(f"{job}/{RETRY}")
    return retry if latest is None or latest > seen else None


def _dead_letters(ctx: _Context) -> int:
    job = ctx.args.job
    record = _job_record(ctx, job)
    store = ctx.store()
    progress = load_record(store, f"{job}/{PROGRESS}") or {}
    dead = sorted((d for d in progress.get("dead") or [] if isinstance(d, dict)), key=lambda d: d["batch_id"])
    if ctx.args.retry is not None:
        if (record.get("job") or {}).get("stateful"):
            raise _Exit(EXIT_USAGE, f"job {job!r} is stateful: its slots' state has moved past its dead letters, "
                                    "so they cannot be processed again in it; nothing recorded")
        return _retry(ctx, job, dead)
    if ctx.args.json:
        keep = ("batch_id", "attempts", "error") + (("traceback",) if ctx.args.traceback else ())
        ctx.json([{k: redact_url(v) if isinstance(v, str) else v for k, v in d.items() if k in keep} for d in dead])
        return EXIT_OK
    ctx.print(f"job {job}: {len(dead)} dead letter{'s' if len(dead) != 1 else ''}")
    for d in dead:
        ctx.print(f"batch {d['batch_id']} ({d.get('attempts', '?')} attempts): {redact_url(str(d.get('error', '')))}")
        if ctx.args.traceback and d.get("traceback"):
            for line in redact_url(str(d["traceback"])).rstrip("\n").splitlines():
                ctx.print(f"    {line}")
    retry = _pending_retry(store, job, progress)
    if retry and retry.get("batch_ids"):
        ctx.print(f"retry requested for batches {sorted(retry['batch_ids'])} (on the next run of {job})")
    return EXIT_OK


def _retry(ctx: _Context, job: str, dead: list[dict[str, Any]]) -> int:
    known = {int(d["batch_id"]) for d in dead}
    asked = sorted(set(ctx.args.retry)) if ctx.args.retry else sorted(known)
    bad = [b for b in asked if b not in known]
    if bad:
        have = ", ".join(map(str, sorted(known))) or "none"
        raise _Exit(EXIT_USAGE, f"batch {', '.join(map(str, bad))} is not a dead letter of job {job!r} "
                                f"(its dead letters: {have}); nothing recorded")
    if not asked:
        ctx.print(f"job {job} has no dead letters: nothing to retry")
        return EXIT_OK
    commit = ctx.store().save(records.retry_key(job), records.retry_request(asked, ctx.clock()))
    if ctx.args.json:
        ctx.json({"job": job, "batch_ids": asked, "key": commit.key, "generation": commit.generation})
    else:
        ctx.print(f"recorded a retry of batches {asked} (key {commit.key}, generation {commit.generation}); "
                  f"run job {job} again with the same job id to process them")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- storage


def _optional_key(ctx: _Context) -> str | None:
    return _key(ctx.args.key, "key") if ctx.args.key is not None else None


def _verify(ctx: _Context) -> int:
    key = _optional_key(ctx)
    store = ctx.store()
    report = store.verify(key)
    problems = report.problems
    keys = sorted({k for k, _ in report.checked})
    if ctx.args.json:
        ctx.json({
            "ok": report.ok and bool(report.checked or key is None),
            "unreachable": [{"url": u, "detail": d} for u, d in report.unreachable],
            "checked": [{"key": k, "generation": g} for k, g in report.checked],
            "problems": [p.to_dict() for p in problems],
            "unrecoverable": [{"key": k, "generation": g} for k, g in report.unrecoverable],
        })
    else:
        ctx.print(f"checked {len(report.checked)} generation{'s' if len(report.checked) != 1 else ''} "
                  f"of {len(keys)} key{'s' if len(keys) != 1 else ''} on {len(store.replicas)} replicas")
        for url, detail in report.unreachable:
            ctx.print(f"UNREACHABLE {url}: {detail}")
        for p in problems:
            ctx.print(f"PROBLEM {p}")
        for k, g in report.unrecoverable:
            ctx.print(f"UNRECOVERABLE {k} generation {g}: no verifying copy on any replica")
        if problems:
            ctx.print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}; `resilient repair` rewrites "
                      "what can be rebuilt from good copies")
    if key is not None and not report.checked:
        ctx.err.write(f"resilient: no committed generation of key {key!r} found\n")
        return EXIT_PROBLEMS
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _repair(ctx: _Context) -> int:
    key = _optional_key(ctx)
    store = ctx.store()
    rewritten = store.repair(key)
    report = store.verify(key)
    remaining = report.problems
    if ctx.args.json:
        ctx.json({"rewritten": rewritten, "remaining": [p.to_dict() for p in remaining]})
    else:
        for path in rewritten:
            ctx.print(f"rewrote {path}")
        ctx.print(f"{len(rewritten)} object{'s' if len(rewritten) != 1 else ''} rewritten")
        for p in remaining:
            ctx.print(f"REMAINS {p}")
    return EXIT_PROBLEMS if remaining else EXIT_OK


def _gc(ctx: _Context) -> int:
    from resilient.io import FileSink

    key = _optional_key(ctx)
    delete = bool(ctx.args.delete)
    sink = None
    if ctx.args.sink:
        sink = _sink_read(ctx.args.sink, "its _sink.json", lambda: FileSink.open(
            ctx.args.sink, storage_options=ctx.settings().storage_options_for(ctx.args.sink)))
        summary = _sink_read(sink.url, "its _SUCCESS marker", sink.is_complete)
        if summary is None:
            raise _Exit(EXIT_PROBLEMS, f"sink {redact_url(sink.url)} is not complete (no _SUCCESS marker): its job "
                                       "may still be staging outputs, so nothing is collected; run gc --sink once "
                                       "the job has finished")
        if not isinstance(summary, dict):
            raise _Exit(EXIT_PROBLEMS, f"sink {redact_url(sink.url)}: its _SUCCESS marker: malformed, not what "
                                       f"resilient writes (a JSON {type(summary).__name__}, expected an object); "
                                       "nothing collected")
    store = ctx.store()
    removed = store.gc(key, dry_run=not delete, grace_s=ctx.args.grace_seconds)
    sink_orphans: list[str] = []
    if sink is not None:
        names = _sink_read(sink.url, "its staging area or table log", sink.orphans)
        if delete and names:
            sink.delete(names)
        sink_orphans = [f"{redact_url(sink.url)}/{n}" for n in names]
    if ctx.args.json:
        ctx.json({"deleted": delete, "storage": removed, "sink": sink_orphans})
        return EXIT_OK
    everything = removed + sink_orphans
    verb = "removed" if delete else "would remove"
    for path in everything:
        ctx.print(f"{verb} {path}")
    if not everything:
        ctx.print("nothing to remove")
    elif delete:
        ctx.print(f"{len(everything)} removed")
    else:
        ctx.print(f"{len(everything)} would be removed (dry run; pass --delete to remove them)")
    return EXIT_OK


def _sink_read(url: str, what: str, read: Callable[[], T]) -> T:
    """``read()``; a sink file that does not parse stops the command with one line naming it."""
    try:
        return read()
    except (ResilientError, OSError):
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, shapes, text encodings
        raise _Exit(EXIT_PROBLEMS, f"sink {redact_url(url)}: {what}: malformed, not what resilient writes "
                                   f"({type(e).__name__}: {redact_url(str(e))}); nothing collected") from None


# ---------------------------------------------------------------------------------------------- helpers


def _when(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)):
        return "unknown"
    stamp = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({_age(now - ts)} ago)"


def _age(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------------------------- drill


def _drill(ctx: _Context) -> int:
    from resilient.drill import drill
    from resilient.drill.command import parse_json, parse_source, parse_target

    a = ctx.args
    pipeline = parse_target(a.pipeline)
    source = parse_source(a.source, parse_json(a.source_kwargs, "source-kwargs"), a.batch_size)
    faults = [f.strip() for f in a.faults.split(",") if f.strip()] if a.faults is not None else None
    report = drill(pipeline, source, batches=a.batches, faults=faults, report=a.report,
                   init_kwargs=parse_json(a.init_kwargs, "init-kwargs"), scratch=a.scratch, environ=ctx.environ,
                   stream=ctx.err, drain_nodes=a.drain_nodes)
    if a.json:
        ctx.json(report.to_dict())
    else:
        ctx.print(report.summary())
        ctx.print()
        ctx.print(report.table())
        ctx.print()
        ctx.print(f"report: {os.path.join(a.report, 'drill.json')}, picture: {os.path.join(a.report, 'drill.png')}")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


_COMMANDS: dict[str, Callable[[_Context], int]] = {
    "config": _config,
    "status": _status,
    "ls": _ls,
    "verify": _verify,
    "repair": _repair,
    "gc": _gc,
    "dead-letters": _dead_letters,
    "drill": _drill,
}


if __name__ == "__main__":
    sys.exit(main())
