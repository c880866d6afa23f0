"""`resilient drill` on real pipelines: the examples in a short mode, a pipeline broken on purpose, and bad
input. Real local Ray (the session's), real SIGKILL/SIGSTOP by PID, a real driver process killed."""

from __future__ import annotations

import doctest
import io
import json

import pytest

import resilient
from examples.score_pipeline import Scorer
from examples.streaming_anomaly import monitor
from resilient import cli
from resilient.drill import FAULTS, Fault, drill, register
from resilient.drill import checks, command, jobs, report
from resilient.errors import ConfigError
from resilient.io import RangeSource
from tests.pipelines import drill as pipelines


@pytest.mark.parametrize("module", [checks, command, jobs, report])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def rows(rep) -> dict:
    return {r.name: r for r in rep.rows}


def assert_passed(rep, names):
    got = rows(rep)
    assert [n for n in names if got[n].status != "PASS"] == [], rep.table()
    for n in names:
        assert got[n].fault and got[n].fault_at is not None and got[n].samples[-1][1] >= rep.batches - 1, got[n]


# ---------------------------------------------------------------------------------------------- bad input


def test_a_target_that_is_not_a_pipeline_is_refused():
    with pytest.raises(ConfigError, match="@resilient.pipeline"):
        drill(pipelines.simple.square, range(10), batch_size=1)
    err = io.StringIO()
    assert cli.main(["drill", "tests.pipelines.simple:square", "--source", "range:10"], stderr=err,
                    stdout=io.StringIO()) == cli.EXIT_USAGE
    assert "pipeline='tests.pipelines.simple:square'" in err.getvalue() and "function" in err.getvalue()


def test_a_sample_larger_than_the_source_is_refused():
    with pytest.raises(ConfigError, match=r"batches=50 is not accepted: expected at most 10"):
        drill(pipelines.square, RangeSource(100, 10), batches=50)


def test_a_source_that_cannot_be_replayed_is_refused():
    with pytest.raises(ConfigError, match="generator"):
        drill(pipelines.square, (b for b in [{"id": [1]}]))
    draws = iter(range(1000))
    changing = resilient.io.IterableSource(lambda: ({"id": [next(draws)]} for _ in range(4)), length=4)
    with pytest.raises(ConfigError, match="batch 0 differed between two reads"):
        drill(pipelines.square, changing)


def test_an_unknown_fault_class_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="fault classes among: kill, kill-starting, hang"):
        drill(pipelines.square, RangeSource(100, 10), faults=["kill", "meteor"])


# ---------------------------------------------------------------------------------------------- drills


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_score_example_passes_its_drill(tmp_path):
    names = ["kill", "poison", "replica-lost"]
    rep = drill(Scorer, RangeSource(20_000, 10), batches=120, faults=names, report=str(tmp_path / "r"),
                progress=False, stream=io.StringIO())
    assert rep.stateful and rep.deterministic and rep.ok and rep.exit_code == 0
    assert_passed(rep, names)
    got = rows(rep)
    assert got["poison"].attempts == 3 and got["kill"].restarts >= 1
    saved = json.loads((tmp_path / "r" / "drill.json").read_text())
    assert saved["ok"] and [r["name"] for r in saved["rows"]] == ["reference-1", "reference-2", *names]
    png = (tmp_path / "r" / "drill.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_streaming_example_passes_its_drill():
    names = ["kill-starting", "hang", "exception", "zombie", "replica-corrupt"]
    shown = io.StringIO()
    rep = drill(monitor, pipelines.sensor_windows(steps=3000), faults=names, init_kwargs={"n_sensors": 8},
                progress=True, stream=shown)
    assert rep.stateful and rep.batches == 120 and rep.ok
    assert_passed(rep, names)
    got = rows(rep)
    assert any(" hung " in line for line in got["hang"].incidents), got["hang"].incidents  # by the batch timeout
    assert got["zombie"].restarts >= 1 and got["hang"].restarts >= 1 and got["exception"].attempts == 1
    assert "\rdrill [3/7] kill-starting: " in shown.getvalue() and "batches" in shown.getvalue()


@pytest.mark.usefixtures("ray_session")
def test_a_pipeline_with_state_outside_its_checkpoint_fails_naming_the_check():
    rep = drill(pipelines.broken, RangeSource(4000, 10), batches=120, faults=["kill", "exception"],
                progress=False, stream=io.StringIO())
    assert not rep.ok and rep.exit_code == 1 and rep.deterministic
    got = rows(rep)
    for name in ("kill", "exception"):
        assert got[name].status == "FAIL", rep.table()
        assert [f.split(":")[0] for f in got[name].failed] == ["outputs"], got[name].failed
        assert "differ from the reference" in got[name].failed[0]
    assert "FAIL" in rep.table() and "outputs: output of batches" in rep.table()


@pytest.mark.usefixtures("ray_session")
def test_cli_drill_kills_the_driver_skips_what_the_cluster_cannot_do_and_detects_non_determinism(tmp_path):
    register(Fault("meteor", "meteor strike", lambda live: None, unavailable=lambda c: "no meteors here"))
    try:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["drill", "tests.pipelines.drill:noisy_pipeline", "--source", "range:10000:10", "--batches",
                         "300", "--faults", "driver,preemption,meteor", "--report", str(tmp_path / "r")],
                        stdout=out, stderr=err)
    finally:
        FAULTS.pop("meteor")
    text = out.getvalue()
    assert code == cli.EXIT_OK, text + err.getvalue()
    assert "NOT deterministic" in text and "only ids checked" in text
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "PASS" in lines["driver killed, job re-run"]
    assert "SKIPPED" in lines["node preemption notice"] and "allow it with --drain-nodes" in text
    assert "SKIPPED" in lines["meteor strike"] and "no meteors here" in text
    assert "drill [3/5] driver ..." in err.getvalue()
    saved = json.loads((tmp_path / "r" / "drill.json").read_text())
    driver = next(r for r in saved["rows"] if r["name"] == "driver")
    assert driver["fault"] and driver["recovery_s"] > 0 and driver["samples"][-1][1] == 300

