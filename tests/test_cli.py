"""The `resilient` command, run in-process (`resilient.cli.main` with injected env and streams) and as
the installed console script.

Job data comes from one real stateful job on a local Ray (a gate holds it half-way so `status` is seen
while it runs; one poison batch becomes a dead letter). Storage maintenance runs on checkpoints made
with `CheckpointStore` on local directories and damaged for real (a flipped byte, a deleted object).
"""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import resilient
from resilient.cli import main
from resilient.io import FileSink, RangeSource
from resilient.storage import layout
from tests.pipelines import simple

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
JOB = "scored"
TOTAL, BATCH, HOLD_FROM, POISON = 200, 10, 120, 50  # 20 batches; held from batch 12; batch 5 is poison


class GatedSum(simple.FaultySum):
    """The running sum, holding every batch from `hold_from` on until the `gate` file exists."""

    def __init__(self, faults: dict, markers: str, gate: str, hold_from: int) -> None:
        super().__init__(faults, markers)
        self.gate, self.hold_from = gate, hold_from

    def __call__(self, batch: dict) -> dict:
        first = int(np.asarray(batch["id"])[0])
        while first >= self.hold_from and not os.path.exists(self.gate):
            time.sleep(0.01)
        return super().__call__(batch)


def run_cli(*argv: str, env: dict[str, str] | None = None, clock=time.time) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), environ={} if env is None else env, stdout=out, stderr=err, clock=clock)
    return code, out.getvalue(), err.getvalue()


def storage_env(dirs: list[Any], **extra: str) -> dict[str, str]:
    return {"RESILIENT_STORAGE": ",".join(str(d) for d in dirs), **extra}


def wait_for(predicate, what: str, timeout: float = 120.0):
    """Poll until `predicate()` is truthy (bounded so a broken runtime fails the test, not hangs it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory) -> dict[str, Any]:
    """One stateful job: status captured while it is held half-way, then run to completion."""
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    tmp = tmp_path_factory.mktemp("cli-job")
    dirs = [tmp / "ckpt-a", tmp / "ckpt-b"]
    markers, gate = tmp / "markers", tmp / "gate"
    markers.mkdir()
    settings = resilient.Settings.from_env(
        {}, storage=[str(d) for d in dirs], write_quorum=1, num_actors=2, actor_cpus=0.25, checkpoint_every=2,
        max_attempts=2, retry_backoff_seconds=0.01, retry_backoff_max_seconds=0.05,
        batches_per_call=1,  # every batch before the gate answers on its own (a call would wait for all of its)
    )
    handle = resilient.pipeline(GatedSum).run(
        RangeSource(TOTAL, BATCH), str(tmp / "out"), job_id=JOB, settings=settings,
        init_args=({POISON: "raise-always"}, str(markers), str(gate), HOLD_FROM),
    )
    env = storage_env(dirs)
    with resilient.CheckpointStore(settings) as store:

        def held() -> dict | None:
            try:
                p = store.load(f"{JOB}/progress", repair=False).state
            except resilient.NoCheckpointError:
                return None
            # batches 0..11 but the poison one are committed; the slots then wait at the gate
            return p if p["committed"] == 11 and len(p["dead"]) == 1 and len(p["actors"]) == 2 else None

        wait_for(held, "the job to reach the gate")
        running = {"json": run_cli("status", JOB, "--json", env=env), "text": run_cli("status", JOB, env=env),
                   "actors": handle.actors()}
    gate.touch()
    result = handle.wait(240)
    return {"env": env, "dirs": dirs, "settings": settings, "result": result, "running": running,
            "sink": str(tmp / "out")}


# ------------------------------------------------------------------------------------------ help, usage


def test_help_lists_every_command_and_exit_codes():
    code, out, err = run_cli("--help")
    assert code == 0 and err == ""
    for command in ("config", "status", "ls", "verify", "repair", "gc", "dead-letters"):
        assert command in out
    assert "2 usage or configuration" in out
    code, out, _ = run_cli("gc", "--help")
    assert code == 0 and "--delete" in out and "--dry-run" in out and "--grace-seconds" in out and "--sink" in out


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["gc", "--delete", "--dry-run"], ["gc", "--grace-seconds", "-1"],
    ["dead-letters", "j", "--retry", "x"], ["verify", "bad key!"], ["status", "../escape"],
])
def test_usage_errors_exit_2(argv, tmp_dirs):
    code, out, err = run_cli(*argv, env=storage_env(tmp_dirs(2)))
    assert code == 2, (argv, out, err)
    assert err.strip()


def test_installed_console_script_and_module(tmp_path):
    script = VENV_BIN / "resilient"
    assert script.exists(), "reinstall with: .venv/bin/pip install -e '.[dev]' --no-deps"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_")}
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "dead-letters" in done.stdout
    bad = subprocess.run([str(script), "config"], capture_output=True, text=True, timeout=120,
                         env={**env, "RESILIENT_CHECKPOINT_EVERY": "-3", "RESILIENT_STORAGE": str(tmp_path)})
    assert bad.returncode == 2
    assert "RESILIENT_CHECKPOINT_EVERY" in bad.stderr and "'-3'" in bad.stderr and bad.stdout == ""
    mod = subprocess.run([sys.executable, "-m", "resilient.cli", "config", "--json", "--storage", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert mod.returncode == 0, mod.stderr
    rows = {r["variable"]: r for r in json.loads(mod.stdout)}
    assert rows["RESILIENT_STORAGE"] == {"variable": "RESILIENT_STORAGE", "value": f"file://{tmp_path}",
                                         "source": "command line"}


# ------------------------------------------------------------------------------------------ config


def test_config_shows_every_setting_value_and_source_with_secrets_masked():
    options = {"s3": {"key": "AKIAEXAMPLEKEYID", "secret": "wJalr-very-secret", "endpoint_url": "http://h:1"}}
    env = {"RESILIENT_STORAGE": "s3://USER:PASSWORD@bucket/run,/mnt/b", "RESILIENT_KEEP": "5",
           "RESILIENT_STORAGE_OPTIONS": json.dumps(options)}
    code, out, err = run_cli("config", env=env)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {f.env for f in resilient.config.FIELDS}
    assert "5" in lines["RESILIENT_KEEP"].split() and lines["RESILIENT_KEEP"].endswith("(environment)")
    assert lines["RESILIENT_IO_THREADS"].endswith("(default)")
    assert "s3://***@bucket/run" in lines["RESILIENT_STORAGE"]
    assert "http://h:1" in lines["RESILIENT_STORAGE_OPTIONS"]
    for secret in ("USER", "PASSWORD", "AKIAEXAMPLEKEYID", "wJalr-very-secret"):
        assert secret not in out + err


def test_config_json_and_command_line_storage():
    code, out, _ = run_cli("config", "--json", "--storage", "memory://a", "--storage", "memory://b",
                           env={"RESILIENT_STORAGE": "memory://ignored", "RESILIENT_KEEP": "4"})
    assert code == 0
    rows = {r["variable"]: (r["value"], r["source"]) for r in json.loads(out)}
    assert rows["RESILIENT_STORAGE"] == ("memory://a,memory://b", "command line")
    assert rows["RESILIENT_KEEP"] == ("4", "environment")
    assert rows["RESILIENT_REDUNDANCY"] == ("replicate", "default")


@pytest.mark.parametrize("env, name", [
    ({"RESILIENT_CHECKPOINT_EVERY": "-3"}, "RESILIENT_CHECKPOINT_EVERY"),
    ({"RESILIENT_REDUNDANCY": "mirror"}, "RESILIENT_REDUNDANCY"),
    ({"RESILIENT_KEPP": "3"}, "RESILIENT_KEPP"),
])
def test_config_bad_value_exits_2_naming_the_variable(env, name):
    code, out, err = run_cli("config", env={"RESILIENT_STORAGE": "memory://a", **env})
    assert code == 2 and out == ""
    assert name in err and "configuration error" in err


def test_default_storage_warning_goes_to_stderr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("config")
    assert code == 0
    assert "warning" in err and "RESILIENT_STORAGE is not set" in err
    assert f"file://{tmp_path}/.resilient/store" in out


# ------------------------------------------------------------------------------------------ status


def test_status_while_the_job_runs(job):
    code, out, err = job["running"]["json"]
    assert code == 0, err
    view = json.loads(out)
    assert view["state"] == "running"
    assert (view["committed"], view["total"], view["remaining"]) == (11, 20, 8)
    assert view["dead_letters"] == 1 and view["dead_letter_ids"] == [5]
    assert view["stateful"] is True and view["slots"] == 2 and view["pipeline"].endswith("GatedSum")
    assert view["rate_per_s"] > 0 and view["eta_s"] == pytest.approx(8 / view["rate_per_s"], abs=0.1)
    live = {a["pid"] for a in job["running"]["actors"]}
    assert {a["pid"] for a in view["actors"]} == live and sorted(a["slot"] for a in view["actors"]) == [0, 1]
    assert all(isinstance(a["epoch"], int) and a["epoch"] >= 1 and a["node_id"] for a in view["actors"])
    assert [r["ok"] for r in view["replicas"]] == [True, True]
    code, text, _ = job["running"]["text"]
    assert code == 0
    assert f"job {JOB}: running" in text and "11 / 20 batches committed" in text
    for pid in live:
        assert f"pid {pid}" in text


def test_status_after_the_job(job):
    result = job["result"]
    assert result.committed == 19 and [d.batch_id for d in result.dead_letters] == [5]
    code, out, err = run_cli("status", JOB, "--json", env=job["env"])
    assert code == 0, err
    view = json.loads(out)
    assert view["state"] == "complete" and view["error"] is None
    assert (view["committed"], view["total"], view["remaining"], view["eta_s"]) == (19, 20, 0, 0.0)
    assert view["retries"] >= 2 and view["restarts"] == 0
    with resilient.CheckpointStore(job["settings"]) as store:
        want = {str(s): store.latest(f"{JOB}/slot-{s}") for s in range(2)}
    assert all(g is not None and g >= 1 for g in want.values())
    assert view["checkpoints"] == want
    code, text, _ = run_cli("status", JOB, env=job["env"])
    assert code == 0
    assert f"job {JOB}: complete" in text
    assert f"slot 0: generation {want['0']}; slot 1: generation {want['1']}" in text
    assert "dead letters 1: 5" in text
    for d in job["dirs"]:
        assert f"file://{d}: ok" in text


def test_status_unknown_job_lists_known_jobs(job):
    code, out, err = run_cli("status", "nope", env=job["env"])
    assert code == 1 and out == ""
    assert "no job 'nope'" in err and f"known jobs: {JOB}" in err


def test_status_reports_an_unreachable_replica(job, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = storage_env([*job["dirs"], blocker / "ckpt"], RESILIENT_RETRY_ATTEMPTS="1", RESILIENT_WRITE_QUORUM="1")
    code, out, err = run_cli("status", JOB, env=env)
    assert code == 1, err
    assert f"file://{blocker}/ckpt: UNREACHABLE: NotADirectoryError" in out
    assert f"file://{job['dirs'][0]}: ok" in out
    assert f"job {JOB}: complete" in out  # the job is still read from the good replicas


def test_status_of_an_older_progress_record_shows_unknown(tmp_dirs):
    dirs = tmp_dirs(2)
    with resilient.CheckpointStore(storage=[str(d) for d in dirs]) as store:
        store.save("old/job", {"job": {"pipeline": "m.f", "stateful": False, "slots": None, "sink": "FileSink('/o')",
                                       "total": 10}, "source": {}})
        store.save("old/progress", {"watermark": 4, "done_above": [6], "total": 10, "dead": []})
    code, out, err = run_cli("status", "old", env=storage_env(dirs))
    assert code == 0, err
    assert "job old: unknown" in out
    assert "unknown / 10 batches committed" in out and "rate unknown" in out
    assert "restarts     unknown" in out and "actors       unknown" in out
    code, out, _ = run_cli("status", "old", "--json", env=storage_env(dirs))
    view = json.loads(out)
    assert view["state"] is None and view["committed"] is None and view["actors"] is None and view["watermark"] == 4


def test_status_of_a_failed_job_exits_1(tmp_dirs):
    dirs = tmp_dirs(2)
    with resilient.CheckpointStore(storage=[str(d) for d in dirs]) as store:
        store.save("broken/job", {"job": {"pipeline": "m.f", "stateful": False, "slots": None, "sink": "x",
                                          "total": 4}, "source": {}})
        store.save("broken/progress", {"watermark": 1, "done_above": [], "total": 4, "dead": [], "committed": 1,
                                       "rate_per_s": 0.5, "restarts": 0, "retries": 0, "actors": [],
                                       "started_at": 1000.0, "updated_at": 1010.0, "state": "failed",
                                       "error": "JobFailedError: batch 1 failed 3 times (poison)"})
    code, out, _ = run_cli("status", "broken", env=storage_env(dirs), clock=lambda: 1070.0)
    assert code == 1
    assert "job broken: failed" in out and "error: JobFailedError: batch 1 failed 3 times" in out
    assert "(60s ago)" in out


# ------------------------------------------------------------------------------------------ ls


def test_ls_groups_keys_by_job(job):
    with resilient.CheckpointStore(job["settings"]) as store:
        store.save("notes/extra", {"x": 1})
        store.save("notes/extra", {"x": 2})
        latest = {k: store.latest(k) for k in store.keys()}
    code, out, err = run_cli("ls", "--json", env=job["env"])
    assert code == 0, err
    listing = json.loads(out)
    assert listing["keys"] == {"notes/extra": 2}
    (entry,) = listing["jobs"]
    assert entry["job"] == JOB and entry["state"] == "complete"
    assert (entry["committed"], entry["total"], entry["dead_letters"]) == (19, 20, 1)
    assert {f"{JOB}/job", f"{JOB}/progress", f"{JOB}/slot-0", f"{JOB}/slot-1"} <= set(entry["keys"])
    assert entry["keys"] == {k: g for k, g in latest.items() if k.startswith(JOB + "/")}
    code, text, _ = run_cli("ls", env=job["env"])
    assert code == 0 and f"{JOB}  complete  19/20 committed, 1 dead" in text
    assert "other keys:" in text and "notes/extra  generation 2" in text


def test_ls_empty_storage(tmp_dirs):
    dirs = tmp_dirs(2)
    code, out, _ = run_cli("ls", env=storage_env(dirs))
    assert code == 0 and "no checkpoints" in out
    code, out, _ = run_cli("ls", "--json", env=storage_env(dirs))
    assert json.loads(out) == {"jobs": [], "keys": {}, "unreachable": []}


# ------------------------------------------------------------------------------------------ dead letters


def test_dead_letters_listed_with_errors_and_tracebacks(job):
    code, out, err = run_cli("dead-letters", JOB, env=job["env"])
    assert code == 0, err
    assert f"job {JOB}: 1 dead letter" in out
    assert "batch 5 (2 attempts): attempt 1: ValueError: poison batch starting 50" in out
    (letter,) = job["result"].dead_letters
    shown = ["    " + line for line in letter.traceback.rstrip("\n").splitlines()]
    assert shown and not set(shown) & set(out.splitlines())
    code, out, _ = run_cli("dead-letters", JOB, "--traceback", env=job["env"])
    assert code == 0 and "\n".join(shown) in out and "ValueError: poison batch starting 50" in shown[-1]
    code, out, _ = run_cli("dead-letters", JOB, "--json", env=job["env"])
    (letter,) = json.loads(out)
    assert letter["batch_id"] == 5 and letter["attempts"] == 2 and "traceback" not in letter
    code, out, _ = run_cli("dead-letters", JOB, "--json", "--traceback", env=job["env"])
    assert json.loads(out)[0]["traceback"] == job["result"].dead_letters[0].traceback
    assert letter["error"].count("ValueError: poison batch starting 50") == 2


@pytest.fixture(scope="module")
def stateless_job(ray_session, tmp_path_factory) -> dict[str, Any]:
    """A stateless job whose batch 3 fails until its cause is fixed (a marker file): one dead letter."""
    tmp = tmp_path_factory.mktemp("cli-retry")
    dirs = [tmp / "ckpt-a", tmp / "ckpt-b"]
    markers = tmp / "markers"
    markers.mkdir()
    settings = resilient.Settings.from_env(
        {}, storage=[str(d) for d in dirs], write_quorum=1, num_actors=2, actor_cpus=0.25, max_attempts=2,
        retry_backoff_seconds=0.01, retry_backoff_max_seconds=0.05,
    )

    def run():
        return resilient.pipeline(simple.FaultySquare).run(
            RangeSource(100, 10), str(tmp / "out"), job_id="squares", settings=settings,
            init_args=({30: "raise-until-fixed"}, str(markers)),
        ).wait(240)

    result = run()
    assert [d.batch_id for d in result.dead_letters] == [3]
    return {"env": storage_env(dirs), "settings": settings, "run": run, "markers": markers}


def test_dead_letters_retry_refused_for_a_stateful_job(job):
    code, out, err = run_cli("dead-letters", JOB, "--retry", "5", env=job["env"])
    assert code == 2 and out == "" and "is stateful" in err
    with resilient.CheckpointStore(job["settings"]) as store:
        assert store.latest(f"{JOB}/retry") is None


def test_dead_letters_retry_refuses_ids_that_are_not_dead_letters(stateless_job):
    env = stateless_job["env"]
    with resilient.CheckpointStore(stateless_job["settings"]) as store:
        before = store.latest("squares/retry")
    for ids in (["4"], ["3", "6"], ["99"]):
        code, out, err = run_cli("dead-letters", "squares", "--retry", *ids, env=env)
        assert code == 2 and out == ""
        bad = [i for i in ids if i != "3"]
        assert f"batch {', '.join(bad)} is not a dead letter of job 'squares'" in err and "its dead letters: 3" in err
    with resilient.CheckpointStore(stateless_job["settings"]) as store:
        assert store.latest("squares/retry") == before
    code, _, err = run_cli("dead-letters", "nope", "--retry", env=env)
    assert code == 1 and "no job 'nope'" in err


def test_dead_letters_retry_records_the_request_and_the_next_run_takes_it(stateless_job):
    env = stateless_job["env"]
    code, out, err = run_cli("dead-letters", "squares", "--retry", "3", env=env, clock=lambda: 1234.5)
    assert code == 0, err
    assert "recorded a retry of batches [3]" in out
    code, out, err = run_cli("dead-letters", "squares", "--retry", "--json", env=env, clock=lambda: 2000.0)
    assert code == 0, err
    assert json.loads(out)["batch_ids"] == [3]
    with resilient.CheckpointStore(stateless_job["settings"]) as store:
        loaded = store.load("squares/retry")
    assert loaded.state == {"batch_ids": [3], "requested_at": 2000.0} and loaded.generation == 2
    code, out, _ = run_cli("status", "squares", "--json", env=env)
    assert json.loads(out)["retry_requested"] == [3]
    (stateless_job["markers"] / "fixed-30").touch()  # the cause is fixed; the next run processes batch 3
    result = stateless_job["run"]()
    assert result.dead_letters == []
    code, out, _ = run_cli("status", "squares", "--json", env=env)
    view = json.loads(out)
    assert view["retry_requested"] is None and view["committed"] == 10
    code, out, _ = run_cli("dead-letters", "squares", env=env)
    assert code == 0 and "0 dead letters" in out and "retry requested" not in out


# ------------------------------------------------------------------------------------------ verify, repair


def make_checkpoints(dirs: list[Path], mode: str = "replicate", key: str = "model/w", n: int = 3) -> None:
    with resilient.CheckpointStore(storage=[str(d) for d in dirs], redundancy=mode) as store:
        for i in range(n):
            store.save(key, {"w": torch.arange(4000, dtype=torch.float32) + i, "step": i})
        store.flush()


def objects(d: Path, key: str, generation: int) -> list[Path]:
    gdir = d / key / layout.gen_name(generation)
    return sorted(p for p in gdir.iterdir() if p.name != layout.MANIFEST)


def test_verify_names_each_damaged_object_and_repair_fixes_it(tmp_dirs):
    dirs = tmp_dirs(3)
    make_checkpoints(dirs)
    env = storage_env(dirs)
    code, out, err = run_cli("verify", env=env)
    assert code == 0 and "checked 3 generations of 1 key on 3 replicas" in out and "PROBLEM" not in out
    (flipped,) = objects(dirs[0], "model/w", 3)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(data)
    (deleted,) = objects(dirs[1], "model/w", 2)
    deleted.unlink()
    manifest = dirs[2] / "model/w" / layout.gen_name(1) / layout.MANIFEST
    manifest.unlink()
    code, out, err = run_cli("verify", "model/w", env=env)
    assert code == 1, out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert sorted(problems) == sorted([
        f"PROBLEM file://{flipped}: checksum mismatch",
        f"PROBLEM file://{deleted}: missing",
        f"PROBLEM file://{manifest}: missing",
    ])
    code, out, _ = run_cli("verify", "--json", env=env)
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["unrecoverable"] == []
    assert {p["object"] for p in report["problems"]} == {f"file://{p}" for p in (flipped, deleted, manifest)}
    code, out, err = run_cli("repair", env=env)
    assert code == 0, out + err
    assert {line for line in out.splitlines() if line.startswith("rewrote")} == {
        f"rewrote file://{p}" for p in (flipped, deleted, manifest)}
    assert "3 objects rewritten" in out and "REMAINS" not in out
    assert deleted.exists() and manifest.exists()
    code, out, _ = run_cli("verify", env=env)
    assert code == 0 and "PROBLEM" not in out


def test_verify_parity_names_the_shard_object(tmp_dirs):
    dirs = tmp_dirs(3)
    make_checkpoints(dirs, mode="parity", n=1)
    env = storage_env(dirs, RESILIENT_REDUNDANCY="parity")
    (lost,) = objects(dirs[0], "model/w", 1)
    lost.unlink()
    (flipped,) = objects(dirs[2], "model/w", 1)
    data = bytearray(flipped.read_bytes())
    data[10] ^= 1
    flipped.write_bytes(data)
    code, out, _ = run_cli("verify", env=env)
    assert code == 1
    assert f"PROBLEM file://{lost}: missing" in out
    assert f"PROBLEM file://{flipped}: checksum mismatch" in out
    assert "UNRECOVERABLE model/w generation 1" in out  # two of three shards lost: beyond parity
    code, out, _ = run_cli("repair", env=env)
    assert code == 1 and "0 objects rewritten" in out and f"REMAINS file://{lost}: missing" in out


def test_verify_of_an_unknown_key_exits_1(tmp_dirs):
    dirs = tmp_dirs(2)
    make_checkpoints(dirs)
    code, _, err = run_cli("verify", "no/such", env=storage_env(dirs))
    assert code == 1 and "no committed generation of key 'no/such'" in err


# ------------------------------------------------------------------------------------------ gc


def test_gc_dry_run_lists_then_delete_removes(tmp_dirs):
    dirs = tmp_dirs(3)
    make_checkpoints(dirs, n=3)
    # an uncommitted write older than the newest commit: a generation directory with no manifest anywhere
    for d in dirs:
        (d / "model/w" / layout.gen_name(2) / layout.MANIFEST).unlink()
    failed = dirs[0] / "model/w" / layout.gen_name(2)
    stale = dirs[1] / "model/w" / layout.gen_name(3) / ".tmp-leftover"
    stale.write_bytes(b"half written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    env = storage_env(dirs, RESILIENT_KEEP="1")
    code, out, err = run_cli("gc", env=env)
    assert code == 0, err
    listed = {line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("would remove ")}
    want = {f"file://{d}/model/w/{layout.gen_name(g)}" for d in dirs for g in (1, 2)} | {f"file://{stale}"}
    assert listed == want and "(dry run; pass --delete to remove them)" in out
    assert failed.exists() and stale.exists()
    code, out, _ = run_cli("gc", "model/w", "--dry-run", "--grace-seconds", "99999", env=env)
    assert f"file://{stale}" not in out and code == 0  # younger than the grace period
    code, out, _ = run_cli("gc", "model/w", "--delete", env=env)
    assert code == 0 and {line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("removed ")} == want
    assert not failed.exists() and not stale.exists()
    assert all(not (d / "model/w" / layout.gen_name(1)).exists() for d in dirs)
    code, out, _ = run_cli("verify", env=env)
    assert code == 0 and "checked 1 generation of 1 key" in out


def test_gc_sink_refused_until_complete_then_collects_staged_orphans(tmp_dirs, tmp_path):
    dirs = tmp_dirs(2)
    sink_url = str(tmp_path / "out")
    sink = FileSink(sink_url, format="parquet")  # gc reads the format from the sink's _sink.json
    kept = sink.stage(0, {"id": [0]}, epoch=1)
    assert sink.commit(kept)
    orphan = sink.stage(1, {"id": [1]}, epoch=1)  # staged, never committed
    env = storage_env(dirs)
    code, out, err = run_cli("gc", "--sink", sink_url, "--delete", env=env)
    assert code == 1 and out == "" and "is not complete" in err
    assert (Path(sink_url) / orphan.staged).exists()
    sink.mark_complete({"total": 2})
    code, out, err = run_cli("gc", "--sink", sink_url, env=env)
    assert code == 0, err
    assert f"would remove {sink_url}/{orphan.staged}" in out.splitlines()
    assert (Path(sink_url) / orphan.staged).exists()
    code, out, _ = run_cli("gc", "--sink", sink_url, "--delete", "--json", env=env)
    assert code == 0
    report = json.loads(out)
    assert report == {"deleted": True, "storage": [], "sink": [f"{sink_url}/{orphan.staged}"]}
    assert not (Path(sink_url) / orphan.staged).exists() and (Path(sink_url) / kept.name).exists()
    assert sink.read(0)["id"].tolist() == [0]


# ------------------------------------------------------------------------------------------ S3


def test_status_on_s3_never_shows_credentials(job, s3_bucket):
    """The job's real records, copied onto S3 (written in this process: secrets given in code stay here)."""
    key_id, secret = "AKIACLITESTKEYID0001", "cli-test-secret-Zq8x"
    options = {**s3_bucket.storage_options, "key": key_id, "secret": secret}
    env = {
        "RESILIENT_STORAGE": f"{s3_bucket.url}/ckpt-a,{s3_bucket.url}/ckpt-b",
        "RESILIENT_STORAGE_OPTIONS": json.dumps({"s3": options}),
        "AWS_ACCESS_KEY_ID": "AKIAENVKEYID00000002", "AWS_SECRET_ACCESS_KEY": "env-secret-Lp3w",
    }
    with resilient.CheckpointStore(job["settings"]) as local, \
            resilient.CheckpointStore(resilient.Settings.from_env(env)) as s3:
        for key in local.keys():
            if key.startswith(JOB + "/") and not key.endswith("/retry"):
                s3.save(key, local.load(key, repair=False).state)
    outputs = []
    for argv in (["status", JOB], ["status", JOB, "--json"], ["ls"], ["config"], ["config", "--json"],
                 ["verify"], ["dead-letters", JOB, "--traceback"], ["status", "missing-job"]):
        code, out, err = run_cli(*argv, env=env)
        outputs.append(out + err)
        assert code == (1 if "missing-job" in argv else 0), (argv, out, err)
    view = json.loads(outputs[1])
    assert view["state"] == "complete" and (view["committed"], view["dead_letter_ids"]) == (19, [5])
    assert view["checkpoints"] == {"0": 1, "1": 1}
    assert [(r["url"], r["ok"]) for r in view["replicas"]] == [(f"{s3_bucket.url}/ckpt-a", True),
                                                              (f"{s3_bucket.url}/ckpt-b", True)]
    assert f"{s3_bucket.url}/ckpt-a: ok" in outputs[0] and "checked 4 generations" in outputs[5]
    assert f"known jobs: {JOB}" in outputs[-1]
    everything = "\n".join(outputs)
    for secret_value in (key_id, secret, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]):
        assert secret_value not in everything


def test_status_on_s3_reports_a_missing_bucket(s3_bucket):
    env = {"RESILIENT_STORAGE": f"{s3_bucket.url}/ckpt,s3://no-such-bucket-cli/ckpt",
           "RESILIENT_STORAGE_OPTIONS": json.dumps({"s3": s3_bucket.storage_options}),
           "RESILIENT_WRITE_QUORUM": "1", "RESILIENT_RETRY_ATTEMPTS": "1"}
    with resilient.CheckpointStore(resilient.Settings.from_env(env)) as s3:
        s3.save("j/job", {"job": {"pipeline": "m.f", "stateful": False, "slots": None, "sink": "x", "total": 1},
                          "source": {}})
    code, out, err = run_cli("status", "j", env=env)
    assert code == 1, err
    assert f"{s3_bucket.url}/ckpt: ok" in out
    assert "s3://no-such-bucket-cli/ckpt: UNREACHABLE: FileNotFoundError" in out


def test_keys_group_under_the_longest_job_id():
    from resilient.jobs import group_keys

    jobs, other = group_keys(["a/job", "a/progress", "a/b/job", "a/b/slot-0", "a/x/model", "ab/c", "model"])
    assert jobs == {"a": ["a/job", "a/progress", "a/x/model"], "a/b": ["a/b/job", "a/b/slot-0"]}
    assert other == ["ab/c", "model"]
