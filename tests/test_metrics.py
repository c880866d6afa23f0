"""Job metrics: what each event records, and the values read back from a real Ray metrics endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resilient.metrics import METRICS, JobMetrics, Measurement, measurements

ROOT = Path(__file__).resolve().parent.parent


def only(kind, info, replicas=None):
    found, _ = measurements(kind, info, replicas or {})
    return found


def test_commit_counts_one_batch_or_every_batch_of_a_group():
    assert only("commit", {"batch_id": 4}) == [Measurement("resilient_batches_committed", 1.0, {})]
    assert only("commit", {"batch_ids": [5, 6, 7]}) == [Measurement("resilient_batches_committed", 3.0, {})]
    assert only("commit", {"batch_ids": []}) == []  # Ray refuses a counter increment of 0


def test_restart_counts_the_restart_by_coarse_reason_and_its_redelivered_batches():
    found = only("restart", {"slot": 1, "reason": "hung on batch 9 for > 3s", "redelivered": [9, 11],
                             "generation": 4})
    assert found == [
        Measurement("resilient_actor_restarts", 1.0, {"reason": "hung"}),
        Measurement("resilient_batches_redelivered", 2.0, {}),
    ]
    found = only("restart", {"slot": 0, "reason": "died while starting (RayActorError)", "redelivered": []})
    assert found == [Measurement("resilient_actor_restarts", 1.0, {"reason": "died"})]


@pytest.mark.parametrize(
    ("kind", "info", "metric"),
    [
        ("retry", {"batch_id": 3, "attempts": 1, "error": "ValueError: x"}, "resilient_retries"),
        ("rollback", {"slot": 0, "batch_id": 3, "cursor": 2}, "resilient_rollbacks"),
        ("dead_letter", {"batch_id": 3, "error": "boom", "attempts": 3}, "resilient_poison_batches"),
    ],
)
def test_one_count_per_failure_event(kind, info, metric):
    assert only(kind, info) == [Measurement(metric, 1.0, {})]


def test_checkpoint_observes_seconds_and_counts_bytes_per_op():
    found = only("checkpoint", {"slot": 0, "op": "load", "seconds": 0.125, "bytes": 2048, "generation": 7})
    assert found == [
        Measurement("resilient_checkpoint_seconds", 0.125, {"op": "load"}),
        Measurement("resilient_checkpoint_bytes", 2048.0, {"op": "load"}),
    ]


def test_replica_errors_count_the_growth_of_the_running_total_and_degraded_is_a_count():
    tally: dict = {}
    steps = [
        ({"url": "s3://a", "degraded": False, "errors": 2}, 2, 0),
        ({"url": "s3://a", "degraded": True, "errors": 5}, 3, 1),
        ({"url": "s3://b", "degraded": True, "errors": 1}, 1, 2),
        ({"url": "s3://a", "degraded": False, "errors": 5}, None, 1),  # no new errors: no increment
        ({"url": "s3://b", "degraded": True, "errors": 1}, None, 1),
        ({"url": "s3://a", "degraded": False, "errors": 1}, 1, 1),  # went down: a new store, counted afresh
    ]
    for info, errors, degraded in steps:
        found, tally = measurements("replica", info, tally)
        want = [Measurement("resilient_replicas_degraded", float(degraded), {})]
        if errors is not None:
            want.insert(0, Measurement("resilient_replica_errors", float(errors), {"replica": info["url"]}))
        assert found == want, info


def test_unknown_kinds_and_started_record_nothing():
    assert only("started", {"slot": 0, "pid": 1, "epoch": 1, "cursor": 0}) == []
    assert only("something-new", {}) == []


def test_every_metric_is_prefixed_and_counters_do_not_end_in_total():
    for name, spec in METRICS.items():
        assert name.startswith("resilient_")
        assert not (spec.kind == "counter" and name.endswith("_total"))  # Ray appends _total itself


def test_without_ray_nothing_is_recorded_and_nothing_raises():
    calls = []

    def ray_ready():
        calls.append(1)
        return False

    m = JobMetrics("j", ray_ready=ray_ready)
    m.record("commit", {"batch_id": 1})
    m.record("started", {"slot": 0})  # nothing to record: Ray is not even asked
    assert calls == [1]


# --------------------------------------------------------------------------- real Ray, real endpoint

SCRIPT = r'''
import json, re, socket, sys, time, urllib.request

import ray

import resilient
from resilient.io.sources import RangeSource
from resilient.metrics import JobMetrics
from tests.pipelines import simple

tmp, events, expected = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
metrics = JobMetrics("synthetic")
metrics.record("commit", {"batch_id": 0})  # before ray.init: recorded nowhere, and no error
assert not ray.is_initialized()

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
port = sock.getsockname()[1]
sock.close()
ray.init(
    num_cpus=1, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
    _system_config={"metrics_report_interval_ms": 200, "timeout_ms_task_wait_for_death_info": 0},
)
for kind, info in events:
    metrics.record(kind, info)

settings = resilient.Settings.from_env(
    {}, storage=[tmp + "/ckpt-a", tmp + "/ckpt-b"], write_quorum=1, num_actors=2, actor_cpus=0.25,
)
handle = resilient.pipeline(simple.square).run(
    RangeSource(200, 10), tmp + "/out", job_id="e2e", settings=settings, progress=False,
)
result = handle.wait(240)

LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
KEEP = ("job_id", "reason", "op", "replica", "le")


def scrape():
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    series = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or "resilient_" not in m.group(1):
            continue
        labels = dict(LABEL.findall(m.group(2)))
        key = m.group(1) + "{" + ",".join(f"{k}={labels[k]}" for k in KEEP if k in labels) + "}"
        series[key] = float(m.group(3))
    return series


def matches(series):
    return all(k in series and abs(series[k] - v) < 1e-9 for k, v in expected.items())


series, deadline = {}, time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        series = scrape()
    except OSError:
        series = {}
    if matches(series):
        break
    time.sleep(0.25)
print("RESULT " + json.dumps({"series": series, "batches": result.total, "committed": result.committed}))
ray.shutdown()
'''

EVENTS = [
    ("started", {"slot": 0, "pid": 1, "epoch": 1, "cursor": 0}),
    ("commit", {"batch_id": 1}),
    ("commit", {"batch_ids": [2, 3, 4]}),
    ("restart", {"slot": 0, "reason": "died", "redelivered": [5, 6], "generation": None}),
    ("restart", {"slot": 1, "reason": "hung on batch 9 for > 3s", "redelivered": [9], "generation": 2}),
    ("restart", {"slot": 0, "reason": "died while starting (RayActorError)", "redelivered": []}),
    ("rollback", {"slot": 1, "batch_id": 9, "cursor": 7}),
    ("retry", {"batch_id": 9, "attempts": 1, "error": "RuntimeError: x"}),
    ("retry", {"batch_id": 9, "attempts": 2, "error": "RuntimeError: x"}),
    ("dead_letter", {"batch_id": 9, "error": "RuntimeError: x", "attempts": 3}),
    ("checkpoint", {"slot": 0, "op": "save", "seconds": 0.2, "bytes": 1000, "generation": 1}),
    ("checkpoint", {"slot": 1, "op": "save", "seconds": 3.0, "bytes": 500, "generation": 1}),
    ("checkpoint", {"slot": 0, "op": "load", "seconds": 0.02, "bytes": 250, "generation": 1}),
    ("replica", {"url": "s3://bucket-a/run", "degraded": False, "errors": 1}),
    ("replica", {"url": "s3://bucket-a/run", "degraded": True, "errors": 3}),
    ("replica", {"url": "file:///mnt/b", "degraded": True, "errors": 2}),
    ("replica", {"url": "file:///mnt/b", "degraded": False, "errors": 2}),
]

J = "job_id=synthetic"
EXPECTED = {
    f"ray_resilient_batches_committed_total{{{J}}}": 4,
    f"ray_resilient_actor_restarts_total{{{J},reason=died}}": 2,
    f"ray_resilient_actor_restarts_total{{{J},reason=hung}}": 1,
    f"ray_resilient_batches_redelivered_total{{{J}}}": 3,
    f"ray_resilient_rollbacks_total{{{J}}}": 1,
    f"ray_resilient_retries_total{{{J}}}": 2,
    f"ray_resilient_poison_batches_total{{{J}}}": 1,
    f"ray_resilient_checkpoint_seconds_count{{{J},op=save}}": 2,
    f"ray_resilient_checkpoint_seconds_bucket{{{J},op=save,le=0.25}}": 1,
    f"ray_resilient_checkpoint_seconds_bucket{{{J},op=save,le=5.0}}": 2,
    f"ray_resilient_checkpoint_seconds_count{{{J},op=load}}": 1,
    f"ray_resilient_checkpoint_seconds_bucket{{{J},op=load,le=0.01}}": 0,
    f"ray_resilient_checkpoint_seconds_bucket{{{J},op=load,le=0.025}}": 1,
    f"ray_resilient_checkpoint_bytes_total{{{J},op=save}}": 1500,
    f"ray_resilient_checkpoint_bytes_total{{{J},op=load}}": 250,
    f"ray_resilient_replica_errors_total{{{J},replica=s3://bucket-a/run}}": 3,
    f"ray_resilient_replica_errors_total{{{J},replica=file:///mnt/b}}": 2,
    f"ray_resilient_replicas_degraded{{{J}}}": 1,
    "ray_resilient_batches_committed_total{job_id=e2e}": 20,  # RangeSource(200, 10): 20 batches
}


@pytest.mark.timeout(400)
def test_metrics_reach_the_ray_metrics_endpoint_from_events_and_from_a_real_job(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(EVENTS), json.dumps(EXPECTED)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=360,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert (out["batches"], out["committed"]) == (20, 20)
    got = {k: out["series"].get(k) for k in EXPECTED}
    assert got == EXPECTED
