"""The runtime on a real local Ray: exactly-once outputs through crashes, exceptions, hangs and poison."""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time

import pytest

import resilient
from resilient.io.sources import RangeSource
from resilient.runtime.supervisor import JobMismatchError
from tests.pipelines import simple

pytestmark = pytest.mark.usefixtures("ray_session")


def settings_for(tmp_path, **kw):
    base = dict(
        storage=[str(tmp_path / "ckpt-a"), str(tmp_path / "ckpt-b")],
        write_quorum=1,
        num_actors=2,
        actor_cpus=0.25,
        retry_backoff_seconds=0.01,
        retry_backoff_max_seconds=0.05,
        max_attempts=3,
    )
    base.update(kw)
    return resilient.Settings.from_env({}, **base)


def outputs(handle) -> dict[int, dict]:
    seen = collections.Counter()
    out = {}
    for b, rows in handle.results():
        seen[b] += 1
        out[b] = rows
    assert all(n == 1 for n in seen.values())
    return out


def expected_running(n_rows: int, batch_size: int, slots: int) -> dict[int, dict]:
    totals = [0] * slots
    counts = [0] * slots
    out = {}
    for b, lo in enumerate(range(0, n_rows, batch_size)):
        ids = list(range(lo, min(lo + batch_size, n_rows)))
        s = b % slots
        totals[s] += sum(ids)
        counts[s] += 1
        out[b] = {"id": ids, "running": [totals[s]] * len(ids), "n": [counts[s]] * len(ids)}
    return out


def square_rows(out: dict[int, dict]) -> dict[int, int]:
    rows = collections.Counter()
    values = {}
    for cols in out.values():
        for i, y in zip(cols["id"], cols["y"]):
            rows[i] += 1
            values[i] = y
    assert all(n == 1 for n in rows.values())
    return values


def test_stateless_function_exactly_once(tmp_path):
    job = resilient.pipeline(simple.square)
    handle = job.run(RangeSource(1000, 10), str(tmp_path / "out"), job_id="plain", settings=settings_for(tmp_path))
    result = handle.wait(120)
    assert (result.total, result.committed, result.dead_letters) == (100, 100, [])
    values = square_rows(outputs(handle))
    assert values == simple.expected_square(range(1000))
    assert handle.sink.is_complete() is not None
    again = job.run(RangeSource(1000, 10), str(tmp_path / "out"), job_id="plain", settings=settings_for(tmp_path))
    rerun = again.wait(60)  # complete already: no actor is started, nothing is redone
    assert (rerun.committed, rerun.resumed_from, rerun.restarts) == (100, 100, 0) and again.events() == []


def test_batches_given_as_object_refs_reach_the_pipeline_as_values(tmp_path):
    import ray

    refs = [ray.put({"id": list(range(i * 4, i * 4 + 4))}) for i in range(6)]
    handle = resilient.pipeline(simple.square).run(refs, str(tmp_path / "out"), job_id="refs",
                                                  settings=settings_for(tmp_path))
    assert handle.wait(120).committed == 6
    assert square_rows(outputs(handle)) == simple.expected_square(range(24))


@pytest.mark.timeout(900)
def test_chaos_stateless_sigkill_every_few_hundred_ms(tmp_path):
    # three slots of 10 ms batches: at least 5 s of work, so even at the slowest kill period (0.6 s) and
    # no recovery time at all, 8 kills land; each kill costs a standby build, which sets the length
    n_batches = 1500
    job = resilient.pipeline(simple.SlowSquare, num_actors=3, max_attempts=50, standby=3)
    handle = job.run(
        RangeSource(n_batches * 4, 4), str(tmp_path / "out"), job_id="chaos", settings=settings_for(tmp_path),
        init_args=(0.01,),
    )
    kills = chaos(handle, period=0.4, slots=3)
    result = handle.wait(600)
    assert kills[0] >= 5, kills
    assert result.restarts >= 1 and result.dead_letters == [], result
    values = square_rows(outputs(handle))
    assert values == simple.expected_square(range(n_batches * 4))


def test_standby_takes_over_and_is_rebuilt_once_recovery_is_done(tmp_path):
    """A killed worker's slot goes to the standby (model built, so it starts at once), and a new standby
    is built; by then the redelivered batches are committed, or SPARE_DELAY_S has passed (building a
    standby takes a core for a second, which the replacement needs first)."""
    import ray

    from resilient.runtime.supervisor import SPARE_DELAY_S
    from resilient.testing import kill_worker

    n_batches = 400
    job = resilient.pipeline(simple.SlowSquare, num_actors=2, standby=1)
    handle = job.run(RangeSource(n_batches * 4, 4), str(tmp_path / "out"), job_id="standby",
                     settings=settings_for(tmp_path), init_args=(0.01,))
    sup = handle._supervisor
    deadline = time.monotonic() + 60
    while not sup.spares and time.monotonic() < deadline:
        time.sleep(0.02)
    spare = sup.spares[0]
    spare_pid = ray.get(spare.ready.remote(), timeout=60)["pid"]  # built: the model is loaded
    victim = kill_worker(handle, after=20)
    assert victim is not None
    started = None
    while started is None and time.monotonic() < deadline:
        started = next((e for e in handle.events() if e.kind == "started" and e.pid == spare_pid), None)
        time.sleep(0.01)
    assert started is not None and started.slot == victim["slot"], handle.events()
    seen_started = time.monotonic()
    redelivered = next(e.redelivered for e in handle.events() if e.kind == "restart")
    while not (sup.spares and sup.spares[0] is not spare) and time.monotonic() < deadline:
        time.sleep(0.005)
    waited = time.monotonic() - seen_started
    assert sup.spares and sup.spares[0] is not spare, "no new standby was built"
    # rebuilt once every redelivered batch was committed, or when the deferral ran out
    assert all(handle.sink.is_committed(b) for b in redelivered) or waited >= SPARE_DELAY_S - 0.1, (
        redelivered, waited)
    result = handle.wait(120)
    assert result.restarts == 1 and result.dead_letters == []
    assert square_rows(outputs(handle)) == simple.expected_square(range(n_batches * 4))


def chaos(handle, period: float, slots: int, min_progress: int = 0) -> list[int]:
    """SIGKILL a random worker actor process by PID every `period` seconds (0.5x-1.5x) until the job
    ends. A kill waits until every slot is serving again, so kills never pile onto a recovery (on two
    cores a fresh actor takes seconds to build: the kill rate adapts to what the machine can recover),
    and, with `min_progress`, until that many more batches were committed since the last kill (spreading
    the kills through the whole job)."""
    kills = [0]
    rng = random.Random(5)

    def loop():
        last = 0
        while not handle.done():
            time.sleep(period * rng.uniform(0.5, 1.5))
            while handle.progress()["committed"] < last + min_progress and not handle.done():
                time.sleep(0.02)
            last = handle.progress()["committed"]
            actors = handle.actors()
            while len(actors) < slots and not handle.done():
                time.sleep(0.05)
                actors = handle.actors()
            if actors and not handle.done():
                try:
                    os.kill(rng.choice(actors)["pid"], signal.SIGKILL)
                    kills[0] += 1
                except ProcessLookupError:
                    pass

    threading.Thread(target=loop, daemon=True).start()
    return kills


@pytest.mark.timeout(900)
def test_chaos_stateful_final_state_and_outputs_match_failure_free(tmp_path):
    """Kills spread through the job (one per 100 batches at most, each once every slot serves again), with
    two standbys; tests/test_chaos.py kills far more often, with user exceptions besides. Each kill costs a
    standby build (seconds on two cores): the kill count, not the batch count, sets the test's length."""
    n_batches, bs, slots = 1500, 2, 2
    job = resilient.pipeline(simple.SlowSum, num_actors=slots, checkpoint_every=20, max_attempts=50, standby=2)
    settings = settings_for(tmp_path)
    handle = job.run(RangeSource(n_batches * bs, bs), str(tmp_path / "out"), job_id="chaos-state",
                     settings=settings, init_args=(0.002,))
    kills = chaos(handle, period=0.4, slots=slots, min_progress=100)
    result = handle.wait(600)
    assert kills[0] >= 3 and result.restarts >= 1, (kills, result)
    assert outputs(handle) == expected_running(n_batches * bs, bs, slots)
    want = expected_running(n_batches * bs, bs, slots)
    with resilient.CheckpointStore(settings) as store:
        for s in range(slots):
            last = max(b for b in want if b % slots == s)
            final = store.load(f"chaos-state/slot-{s}").state
            assert final["user"] == {"total": want[last]["running"][0], "batches": want[last]["n"][0]}


def test_outputs_streamed_to_the_driver_as_committed(tmp_path):
    job = resilient.pipeline(simple.square)
    handle = job.run(RangeSource(500, 5), str(tmp_path / "out"), job_id="stream",
                     settings=settings_for(tmp_path), stream=4)
    streamed = collections.Counter()
    values = {}
    for b, cols in handle.stream():
        streamed[b] += 1
        values[b] = cols
    result = handle.wait(60)
    assert result.committed == 100 and sorted(streamed) == list(range(100)) and set(streamed.values()) == {1}
    assert values == outputs(handle)  # what was streamed is what the sink holds
    assert list(handle.stream()) == []
    other = job.run(RangeSource(5, 5), str(tmp_path / "o2"), job_id="s2", settings=settings_for(tmp_path))
    with pytest.raises(resilient.ConfigError, match="stream"):
        other.stream()
    other.wait(60)


def test_exceptions_retried_poison_dead_lettered(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = {30: "raise-once", 130: "raise-always", 170: "crash-always", 250: "crash-once"}
    job = resilient.pipeline(simple.FaultySquare)
    handle = job.run(RangeSource(400, 10), str(tmp_path / "out"), job_id="faults",
                     settings=settings_for(tmp_path), init_args=(faults, str(markers)))
    result = handle.wait(300)
    dead = {d.batch_id: d for d in result.dead_letters}
    assert sorted(dead) == [13, 17]
    assert "ValueError: poison batch starting 130" in dead[13].error and dead[13].attempts == 3
    assert "ValueError" in dead[13].traceback
    assert dead[17].attempts == 3
    values = square_rows(outputs(handle))
    assert values == simple.expected_square(i for i in range(400) if i // 10 not in (13, 17))
    assert result.restarts >= 4  # three crashes of the poison batch, one of the crash-once batch


def test_dead_letters_retried_on_request_by_the_next_run(tmp_path):
    """A dead letter whose cause was fixed is processed again by the next run of the job, once per request;
    nothing else is redone."""
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = {20: "raise-until-fixed", 330: "raise-until-fixed"}
    job = resilient.pipeline(simple.FaultySquare)
    settings = settings_for(tmp_path, max_attempts=2)

    def run():
        return job.run(RangeSource(400, 10), str(tmp_path / "out"), job_id="retry", settings=settings,
                       init_args=(faults, str(markers)))

    first = run().wait(300)
    assert sorted(d.batch_id for d in first.dead_letters) == [2, 33]
    (markers / "fixed-20").touch()  # batch 2's cause is fixed; batch 33 still fails
    with resilient.CheckpointStore(settings) as store:
        store.save("retry/retry", {"batch_ids": [2, 33]})
    handle = run()
    second = handle.wait(300)
    assert [d.batch_id for d in second.dead_letters] == [33]
    values = square_rows(outputs(handle))
    assert values == simple.expected_square(i for i in range(400) if i // 10 != 33)
    third = run().wait(300)  # the request was taken: batch 33 stays a dead letter, nothing is redone
    assert [d.batch_id for d in third.dead_letters] == [33] and third.retries == 0


def test_actors_that_never_start_fail_the_job_with_their_error(tmp_path):
    job = resilient.pipeline(simple.BrokenInit)
    handle = job.run(RangeSource(100, 10), str(tmp_path / "out"), job_id="broken",
                     settings=settings_for(tmp_path, standby=0, max_attempts=2))
    with pytest.raises(resilient.runtime.supervisor.JobFailedError, match="constructor or restore raised 2 times") as e:
        handle.wait(300)
    # the user's error in the message, and the user's traceback (their file and line) with it
    assert "the last time: OSError: model weights not found at /models/missing.pt" in str(e.value)
    assert 'tests/pipelines/simple.py", line' in e.value.traceback


def test_secrets_given_in_code_are_refused_before_any_actor_starts(tmp_path):
    settings = settings_for(tmp_path, signing_key="k" * 32)  # given in code: cannot reach the actors
    with pytest.raises(resilient.ConfigError, match="keyword 'signing_key'") as e:
        resilient.pipeline(simple.square).run(RangeSource(10, 10), str(tmp_path / "out"), job_id="secret",
                                               settings=settings)
    assert "k" * 32 not in str(e.value)


def test_poison_batch_fails_the_job_when_configured(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    job = resilient.pipeline(simple.FaultySquare, on_poison="fail", max_attempts=2)
    handle = job.run(RangeSource(200, 10), str(tmp_path / "out"), job_id="fail-fast",
                     settings=settings_for(tmp_path), init_args=({40: "raise-always"}, str(markers)))
    with pytest.raises(resilient.JobFailedError, match="batch 4 failed 2 times"):
        handle.wait(120)
    assert handle.sink.is_complete() is None


def test_stateful_exception_rolls_back_half_applied_state(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = {100: "raise-once-after-mutating", 310: "crash-once"}
    job = resilient.pipeline(simple.FaultySum, checkpoint_every=5)
    handle = job.run(RangeSource(600, 10), str(tmp_path / "out"), job_id="rollback",
                     settings=settings_for(tmp_path), init_args=(faults, str(markers)))
    result = handle.wait(300)
    # the exception is a counted retry; the crash, with two batches in flight, is not charged to either
    assert result.dead_letters == [] and result.retries >= 1 and result.restarts >= 1
    assert outputs(handle) == expected_running(600, 10, 2)


def test_hang_detected_and_actor_replaced(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    job = resilient.pipeline(simple.FaultySquare, batch_timeout_seconds=3)
    t0 = time.monotonic()
    handle = job.run(RangeSource(200, 10), str(tmp_path / "out"), job_id="hang",
                     settings=settings_for(tmp_path), init_args=({50: "hang-once"}, str(markers)))
    result = handle.wait(120)
    assert time.monotonic() - t0 < 60
    assert result.restarts == 1 and result.dead_letters == []
    assert any(e.kind == "restart" and "hung" in e.reason for e in handle.events())
    assert square_rows(outputs(handle)) == simple.expected_square(range(200))


def test_calls_of_several_batches_keep_failures_per_batch(tmp_path):
    """Four batches per call: exceptions are charged to their own batch, a crash or hang in a call of
    several makes each of them run alone until the next failure names its batch."""
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = {300: "raise-once", 1300: "raise-always", 1700: "crash-always", 1010: "crash-once", 450: "hang-once",
              610: "raise-base-once"}
    job = resilient.pipeline(simple.FaultySquare, batches_per_call=4, batch_timeout_seconds=3)
    handle = job.run(RangeSource(2000, 10), str(tmp_path / "out"), job_id="per-call", settings=settings_for(tmp_path),
                     init_args=(faults, str(markers)))
    result = handle.wait(300)
    dead = {d.batch_id: d for d in result.dead_letters}
    assert sorted(dead) == [130, 170]
    assert "ValueError: poison batch starting 1300" in dead[130].error and dead[130].attempts == 3
    assert "ValueError" in dead[130].traceback and dead[170].attempts == 3
    assert square_rows(outputs(handle)) == simple.expected_square(i for i in range(2000) if i // 10 not in (130, 170))
    # 200 batches, 4 per call, some alone after a crash or hang; with one batch per call it is 200 or more
    assert 200 / 4 <= result.calls < 150, result.calls
    events = handle.events()
    assert any(e.kind == "restart" and "hung" in e.reason for e in events)
    retried = {e.batch_id: e.error for e in events if e.kind == "retry"}
    assert retried[30].startswith("RuntimeError: transient failure") and retried[61].startswith("Interrupted")


def test_one_batch_per_call_when_configured(tmp_path):
    handle = resilient.pipeline(simple.square, batches_per_call=1).run(
        RangeSource(400, 10), str(tmp_path / "out"), job_id="one-per-call", settings=settings_for(tmp_path))
    result = handle.wait(120)
    assert result.calls == 40 and square_rows(outputs(handle)) == simple.expected_square(range(400))


def test_stateful_calls_of_several_batches_roll_back_and_replay_exactly(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = {1000: "raise-once-after-mutating", 2330: "crash-once", 3010: "raise-once"}
    job = resilient.pipeline(simple.FaultySum, checkpoint_every=5, batches_per_call=4)
    handle = job.run(RangeSource(4000, 10), str(tmp_path / "out"), job_id="per-call-state",
                     settings=settings_for(tmp_path), init_args=(faults, str(markers)))
    result = handle.wait(300)
    assert result.dead_letters == [] and result.retries >= 2 and result.restarts >= 1
    assert outputs(handle) == expected_running(4000, 10, 2)
    assert result.calls < 400 / 2


def test_call_size_decisions():
    import doctest

    from resilient.runtime import calls

    assert doctest.testmod(calls).failed == 0
    assert calls.batches_per_call(3, 100.0, 1.0) == 3  # a fixed setting is taken as it is
    assert calls.batches_per_call("auto", None, 600.0) == 1  # nothing timed yet
    assert calls.batches_per_call("auto", 0.0, 600.0) == calls.AUTO_MAX
    assert calls.batches_per_call("auto", calls.AUTO_CALL_SECONDS / 3.5, 600.0) == 3
    assert calls.batches_per_call("auto", calls.AUTO_CALL_SECONDS_STATEFUL / 2.5, 600.0, stateful=True) == 2
    assert calls.batches_per_call("auto", 0.001, 0.014) == 3  # a quarter of the timeout: 3.5 ms
    assert calls.batches_per_call("auto", 10.0, 1.0) == 1  # slower than the timeout: still one
    assert [calls.most_per_call(s) for s in ("auto", 1, 5)] == [calls.AUTO_MAX, 1, 5]


def fail_sync_of_batch(monkeypatch, batch_id: int) -> None:
    """The background fsync of batch `batch_id`'s staged output fails (EIO), and the file is gone."""
    import resilient.io._publish as publish

    real = publish._sync_and_close

    def failing(fd, path):
        if os.path.basename(path).startswith(f"{batch_id:012d}-"):
            os.close(fd)
            os.unlink(path)
            raise OSError(5, "Input/output error")
        real(fd, path)

    monkeypatch.setattr(publish, "_sync_and_close", failing)


def test_worker_answers_each_batch_of_a_call(tmp_path):
    """In process: a stateless worker goes on after a batch raises; a stateful one stops there, refuses
    the next call until rolled back, and its state holds nothing of the failed batch."""
    from resilient.io.sinks import FileSink
    from resilient.runtime.supervisor import INF
    from resilient.runtime.worker import DirtyWorkerError, Failure, JobSpec, Result, Worker

    batches = list(RangeSource(60, 10).read(0))
    settings = settings_for(tmp_path, checkpoint_every=1)
    items = [(b, batch, False) for b, batch in batches]
    stateless = Worker(JobSpec("w", simple.FaultySquare, ({20: "raise-always"}, str(tmp_path)), {}, False,
                               FileSink(str(tmp_path / "o1")), settings, 1), 0, 1)
    answers = stateless.process((INF, items[:4]))
    assert [type(a) for a in answers] == [Result, Result, Failure, Result]
    assert [a.batch_id for a in answers] == [0, 1, 2, 3]
    assert answers[2].error == "ValueError: poison batch starting 20" and "fault" in answers[2].traceback

    stateful = Worker(JobSpec("w", simple.FaultySum, ({30: "raise-always"}, str(tmp_path)), {}, True,
                              FileSink(str(tmp_path / "o2")), settings, 1), 0, 1)
    assert stateful.restore() == 0
    answers = stateful.process((INF, items[:5]))
    assert [type(a) for a in answers] == [Result, Result, Result, Failure]  # batch 4 was not run
    with pytest.raises(DirtyWorkerError):
        stateful.process((INF, items[4:5]))
    stateful.rollback()
    assert stateful.cursor == 3 and stateful.fn.total == sum(range(30))
    stateful.store.close()
    stateless.store.close()


def test_an_output_whose_background_sync_fails_is_that_batchs_failure(tmp_path, monkeypatch):
    """A call answers once its outputs are durable; a staged file whose background fsync failed is never
    answered as a result: a stateless worker answers that batch as failed and goes on, a stateful one
    stops there and turns dirty (rolled back, then replayed), as if the batch had raised."""
    from resilient.io.sinks import FileSink
    from resilient.runtime.supervisor import INF
    from resilient.runtime.worker import DirtyWorkerError, Failure, JobSpec, Result, Worker

    fail_sync_of_batch(monkeypatch, 2)
    items = [(b, batch, False) for b, batch in RangeSource(50, 10).read(0)]
    settings = settings_for(tmp_path, checkpoint_every=1)
    stateless = Worker(JobSpec("w", simple.square, (), {}, False, FileSink(str(tmp_path / "o1")), settings, 1), 0, 1)
    answers = stateless.process((INF, items[:4]))
    assert [type(a) for a in answers] == [Result, Result, Failure, Result]
    assert "Input/output error" in answers[2].error
    stateful = Worker(JobSpec("w", simple.RunningSum, (), {}, True, FileSink(str(tmp_path / "o2")), settings, 1), 0, 1)
    assert stateful.restore() == 0
    answers = stateful.process((INF, items[:4]))
    assert [type(a) for a in answers] == [Result, Result, Failure]  # batch 3 ran, but is not answered
    with pytest.raises(DirtyWorkerError):
        stateful.process((INF, items[3:4]))
    for w in (stateless, stateful):
        w.store.close()


def test_a_snapshot_is_persisted_out_of_band_only_once_its_outputs_are_committed(tmp_path):
    """The worker names the snapshot it holds in its answers; `persist_now` saves it only when the bound
    reaches its cursor. On a real actor built as the supervisor builds it, `persist_now` in the control
    group answers while a long call is still running on the same actor, and the save lands."""
    import ray

    from resilient.io.sinks import FileSink
    from resilient.runtime.supervisor import INF
    from resilient.runtime.worker import CONTROL_GROUP, JobSpec, Worker

    batches = list(RangeSource(60, 10).read(0))
    items = [(b, batch, False) for b, batch in batches]
    settings = settings_for(tmp_path, checkpoint_every=2, checkpoint_interval_seconds=3600.0)
    spec = JobSpec("oob", simple.RunningSum, (), {}, True, FileSink(str(tmp_path / "o1")), settings, 1)
    w = Worker(spec, 0, 1)
    assert w.restore() == 0
    answers = w.process((0, items[:3]))  # floor 0: nothing committed, nothing may be persisted
    assert [a.snapshot for a in answers] == [None, 2, 2]
    assert w.persist_now(1) is None and w.store.generations("oob/slot-0") == []
    assert w.persist_now(2) == 2
    w.store.flush()
    [g] = w.store.generations("oob/slot-0")
    assert w.store.load("oob/slot-0").state["cursor"] == 2
    assert w.process((INF, items[3:4]))[0].snapshot is None  # persisted: none held
    w.store.close()

    spec = JobSpec("oob2", simple.SlowSum, (1.0,), {}, True, FileSink(str(tmp_path / "o2")), settings, 1)
    actor = ray.remote(max_restarts=0, concurrency_groups={CONTROL_GROUP: 1})(Worker).options(
        num_cpus=0.25).remote(spec, 0, 1)
    assert ray.get(actor.restore.remote()) == 0
    [_, a1] = ray.get(actor.process.remote((0, items[:2])))
    assert a1.snapshot == 2
    slow = actor.process.remote((INF, items[2:4]))  # 2 s of work
    assert ray.get(actor.persist_now.options(concurrency_group=CONTROL_GROUP).remote(2)) == 2
    assert not ray.wait([slow], timeout=0)[0]  # answered beside the call, not behind it
    assert [a.batch_id for a in ray.get(slow)] == [2, 3]
    ray.get(actor.finish.remote(INF))
    with resilient.CheckpointStore(settings) as store:
        cursors = [store.load("oob2/slot-0", generation=g).state["cursor"] for g in store.generations("oob2/slot-0")]
    assert cursors[0] == 2 and cursors[-1] == 4
    ray.kill(actor)


def test_a_call_ships_its_newest_snapshot_unless_past_a_failed_output(tmp_path, monkeypatch):
    """In process: `Worker.run` returns the cursor and packed copy of the newest snapshot the call took; not
    one taken after a batch whose output then failed to sync (it holds a lost output); none at all with
    ``hot_snapshot_max_mb=0``."""
    from resilient.io.sinks import FileSink
    from resilient.runtime.hot import unpack
    from resilient.runtime.supervisor import INF
    from resilient.runtime.worker import Failure, JobSpec, Worker

    items = [(b, batch, False) for b, batch in RangeSource(80, 10).read(0)]
    settings = settings_for(tmp_path, checkpoint_every=2, checkpoint_interval_seconds=3600.0)
    w = Worker(JobSpec("hot", simple.TensorSum, (), {}, True, FileSink(str(tmp_path / "o0")), settings, 1), 0, 1)
    assert w.restore() == 0
    (answers, cursor), packed = w.run((INF, items[:5]))  # all committed: each snapshot persisted at once
    state = unpack(packed)
    assert len(answers) == 5 and cursor == 4 and state["cursor"] == 4
    assert state["user"]["total"] == sum(range(40)) and state["user"]["acc"].tolist() == [40.0] * 4
    assert state["user"]["half"].dtype.is_floating_point and state["user"]["half"].tolist() == [40.0] * 4
    assert w.run((INF, items[5:6]))[0][1] == 6  # due again after two batches
    (answers, cursor), packed = w.run((INF, items[6:7]))  # took none
    assert len(answers) == 1 and cursor is None and packed is None
    w.store.close()

    fail_sync_of_batch(monkeypatch, 2)
    every = settings_for(tmp_path, checkpoint_every=1, checkpoint_interval_seconds=3600.0)
    w = Worker(JobSpec("hot2", simple.TensorSum, (), {}, True, FileSink(str(tmp_path / "o1")), every, 1), 0, 1)
    w.restore()
    (answers, cursor), packed = w.run((INF, items[:4]))
    assert [type(a).__name__ for a in answers] == ["Result", "Result", "Failure"] and cursor is None
    assert packed is None and isinstance(answers[2], Failure)
    w.store.close()
    off = settings_for(tmp_path, checkpoint_every=1, hot_snapshot_max_mb=0)
    w = Worker(JobSpec("hot3", simple.TensorSum, (), {}, True, FileSink(str(tmp_path / "o2")), off, 1), 0, 1)
    w.restore()
    assert w.run((INF, items[:2]))[1] is None
    w.store.close()


def test_a_replacement_starts_from_the_hot_snapshot_of_a_killed_worker(tmp_path):
    """On real actors built as the supervisor builds them: a call's snapshot stays in the object store
    after its worker is SIGKILLed by PID; a standby activated with it takes the slot at its cursor with
    the killed worker's state (nothing was persisted: floor 0) and goes on changing it in place. Given a
    ref that does not load, a standby restores from storage instead."""
    import ray

    from resilient.io.sinks import FileSink
    from resilient.runtime.supervisor import INF
    from resilient.runtime.worker import CONTROL_GROUP, JobSpec, Worker

    items = [(b, batch, False) for b, batch in RangeSource(60, 10).read(0)]
    settings = settings_for(tmp_path, checkpoint_every=2, checkpoint_interval_seconds=3600.0)
    spec = JobSpec("hot", simple.TensorSum, (), {}, True, FileSink(str(tmp_path / "o")), settings, 1)
    actor_cls = ray.remote(max_restarts=0, concurrency_groups={CONTROL_GROUP: 1})(Worker)
    first = actor_cls.options(num_cpus=0.25).remote(spec, 0, 1)
    assert ray.get(first.restore.remote()) == 0
    ref, hot = first.run.options(num_returns=2).remote((0, items[:5]))
    answers, cursor = ray.get(ref)
    assert cursor == 2 and len(answers) == 5  # the snapshot at 2 waits for its commit: none taken after it
    os.kill(ray.get(first.ready.remote())["pid"], signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(first.ready.remote(), timeout=60)

    standby = actor_cls.options(num_cpus=0.25).remote(spec)
    up = ray.get(standby.activate.remote(0, 2, [hot]), timeout=60)
    assert up["hot"] is True and up["cursor"] == 2 and up["generation"] is None
    state = ray.get(standby.__ray_call__.remote(lambda w: w.fn.state_dict()))
    assert state["total"] == sum(range(20)) and state["acc"].tolist() == [20.0] * 4
    [answer] = ray.get(standby.process.remote((INF, items[2:3])))  # replayed from the snapshot's cursor
    assert answer.batch_id == 2 and answer.cursor == 3
    state = ray.get(standby.__ray_call__.remote(lambda w: w.fn.state_dict()))
    assert state["total"] == sum(range(30)) and state["half"].tolist() == [30.0] * 4

    other = actor_cls.options(num_cpus=0.25).remote(spec)
    up = ray.get(other.activate.remote(0, 3, [ray.put({"not": "a snapshot"})]), timeout=60)
    assert not up.get("hot") and up["cursor"] == 0  # storage holds nothing yet: from the start
    for a in (standby, other):
        ray.kill(a)


def test_same_job_id_different_pipeline_is_refused(tmp_path):
    settings = settings_for(tmp_path)
    resilient.pipeline(simple.square).run(RangeSource(50, 10), str(tmp_path / "out"), job_id="j1",
                                          settings=settings).wait(120)
    with pytest.raises(JobMismatchError):
        resilient.pipeline(simple.SlowSquare).run(RangeSource(50, 10), str(tmp_path / "out"), job_id="j1",
                                                  settings=settings).wait(120)
    again = resilient.pipeline(simple.square).run(RangeSource(50, 10), str(tmp_path / "out"), job_id="j1",
                                                  settings=settings).wait(120)
    assert again.resumed_from == 5  # everything was done: nothing redone


def test_failed_background_progress_save_stops_the_job_and_is_recorded(tmp_path, monkeypatch):
    """The periodic progress save runs in the background; its permanent failure (here: no replica
    acknowledged it) stops the job with that error, and the failed state is still recorded by the final
    save."""
    from concurrent.futures import Future

    from resilient.errors import QuorumError
    from resilient.storage.store import CheckpointStore, PendingSave

    original = CheckpointStore.save_async
    failed = []

    def save_async(self, key, state, **kw):
        if key.endswith("/progress"):
            failed.append(key)
            future: Future = Future()
            future.set_exception(QuorumError("progress lost", acked=0, required=1, failures={}))
            return PendingSave(future)
        return original(self, key, state, **kw)

    monkeypatch.setattr(CheckpointStore, "save_async", save_async)
    job = resilient.pipeline(simple.SlowSquare, num_actors=2)
    settings = settings_for(tmp_path)
    handle = job.run(RangeSource(4000, 4), str(tmp_path / "out"), job_id="progress-lost", settings=settings,
                     init_args=(0.01,))
    with pytest.raises(resilient.runtime.supervisor.JobFailedError, match="progress could not be saved: QuorumError: "
                       "progress lost"):
        handle.wait(120)
    assert failed, "no periodic progress save was attempted"
    with resilient.CheckpointStore(settings) as store:
        record = store.load("progress-lost/progress").state
    assert record["state"] == "failed" and "progress lost" in record["error"]
    assert record["committed"] < 1000
