"""The progress line: its text, when it shows itself, redrawing in place, and a real job drawing it."""

from __future__ import annotations

import io
import threading

import pytest

from resilient.progress import ProgressReporter, format_duration, format_line, should_show


class Tty(io.StringIO):
    """A terminal, as far as the reporter can tell."""

    def isatty(self) -> bool:
        super().isatty()  # raises ValueError once closed, as a real terminal's file does
        return True


def snapshot(**kw):
    base = {"job_id": "score", "committed": 250, "total": 1000, "rate_per_s": 50.0, "restarts": 1,
            "retries": 2, "dead_letters": 0, "resumed": 0, "done": False}
    base.update(kw)
    return base


def test_line_shows_done_total_percent_rate_eta_and_failure_counts():
    assert format_line(snapshot()) == (
        "score: 250/1000 batches (25.0%) | 50.0/s | ETA 15s | restarts 1 | retries 2 | dead letters 0"
    )


def test_line_counts_resumed_batches_as_done():
    line = format_line(snapshot(committed=100, resumed=800, rate_per_s=10.0))
    assert line.startswith("score: 900/1000 batches (90.0%) | 10.0/s | ETA 10s |")


def test_line_leaves_eta_out_without_a_rate_or_when_complete_and_takes_a_note():
    assert "ETA" not in format_line(snapshot(rate_per_s=0.0))
    assert "ETA" not in format_line(snapshot(committed=1000))
    assert format_line(snapshot(committed=1000), note="done").endswith("| dead letters 0 | done")
    assert format_line(snapshot(total=None)).startswith("score: 250 batches | 50.0/s | restarts 1")


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (45, "45s"), (192, "3m12s"), (7500, "2h05m")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_shown_only_on_a_terminal_outside_ci():
    assert should_show(Tty(), {}) is True
    assert should_show(Tty(), {"CI": ""}) is True
    assert should_show(Tty(), {"CI": "true"}) is False
    assert should_show(io.StringIO(), {}) is False
    closed = Tty()
    closed.close()
    assert should_show(closed, {}) is False


def test_explicit_enabled_overrides_the_rule():
    assert ProgressReporter(snapshot, stream=Tty(), environ={"CI": "1"}, enabled=True).enabled is True
    assert ProgressReporter(snapshot, stream=Tty(), environ={}, enabled=False).enabled is False
    assert ProgressReporter(snapshot, stream=Tty(), environ={}).enabled is True
    assert ProgressReporter(snapshot, stream=io.StringIO(), environ={}).enabled is False


def test_redraws_in_place_padding_a_shorter_line_and_ends_with_a_newline():
    states = iter([snapshot(committed=250, restarts=12), snapshot(committed=260), snapshot(committed=1000)])
    out = Tty()
    r = ProgressReporter(lambda: next(states), stream=out, environ={})
    first = r.render()
    second = r.render()
    assert len(second) == len(first) - 1  # "restarts 12" -> "restarts 0"
    r.stop(note="done")
    r.stop(note="again")  # once only
    text = out.getvalue()
    third = format_line(snapshot(committed=1000), note="done")
    pad = " " * max(0, len(second) - len(third))
    assert text == "\r" + first + "\r" + second + " " + "\r" + third + pad + "\n"


@pytest.mark.parametrize(("stream", "environ"), [(io.StringIO(), {}), (Tty(), {"CI": "true"})])
def test_quiet_where_nobody_watches(stream, environ):
    calls = []

    def progress():
        calls.append(1)
        return snapshot()

    r = ProgressReporter(progress, stream=stream, environ=environ, interval=0.001).start()
    r.stop(note="done")
    assert stream.getvalue() == ""
    assert r._thread is None  # no thread was started for nothing


def test_the_thread_redraws_every_interval_until_stopped():
    drawn = threading.Event()
    calls = []

    def progress():
        calls.append(1)
        if len(calls) >= 3:
            drawn.set()
        return snapshot(committed=len(calls))

    out = Tty()
    r = ProgressReporter(progress, stream=out, environ={}, interval=0.001).start()
    assert drawn.wait(60)
    r.stop(note="done")
    n = len(calls)
    text = out.getvalue()
    assert text.count("\r") == n >= 3 and text.endswith("| done\n") and text.count("\n") == 1
    assert r._thread is not None and not r._thread.is_alive()


def test_start_after_stop_draws_nothing_more():
    out = Tty()
    r = ProgressReporter(snapshot, stream=out, environ={}, interval=0.001)
    r.stop()
    r.start()
    assert r._thread is None and out.getvalue().count("\r") == 1


@pytest.mark.usefixtures("ray_session")
def test_a_real_job_draws_its_progress_to_stderr(tmp_path, capsys):
    import resilient
    from resilient.io.sources import RangeSource
    from tests.pipelines import simple

    settings = resilient.Settings.from_env(
        {}, storage=[str(tmp_path / "ckpt-a"), str(tmp_path / "ckpt-b")], write_quorum=1, num_actors=2,
        actor_cpus=0.25,
    )
    handle = resilient.pipeline(simple.square).run(
        RangeSource(100, 10), str(tmp_path / "out"), job_id="progress", settings=settings, progress=True,
    )
    handle.wait(120)
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\r")[-1].rstrip()
    assert last.startswith("progress: 10/10 batches (100.0%) |") and last.endswith("| dead letters 0 | done")
    assert err.endswith("\n") and handle.progress()["committed"] == 10
