"""The scheduler's decisions, one at a time, without Ray or storage; and the runtime modules' doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

from resilient.runtime import events as ev
from resilient.runtime.ledger import Ledger
from resilient.runtime.protocol import (
    ActorDown,
    ActorUp,
    CallAnswered,
    Cause,
    CommitDone,
    Emit,
    FailJob,
    Failure,
    KillActor,
    NodeDraining,
    Result,
    RollbackActor,
    RollbackDone,
    SendCall,
    StartActor,
)
from resilient.runtime.scheduler import Policy, Scheduler

MODULES = ["calls", "events", "hot", "ledger", "policy", "protocol", "reader", "records", "scheduler", "supervisor"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_of_the_runtime(name):
    module = importlib.import_module(f"resilient.runtime.{name}")
    result = doctest.testmod(module)
    assert result.failed == 0


def test_doctests_of_placement():
    from resilient import placement

    result = doctest.testmod(placement)
    assert result.failed == 0 and result.attempted >= 5


def test_ray_actor_options_are_checked_before_any_actor_starts():
    import warnings

    from resilient.config import Settings
    from resilient.errors import ConfigError

    warnings.simplefilter("ignore")
    env = {"RESILIENT_STORAGE": "memory://a"}
    ok = Settings.from_env({**env, "RESILIENT_RAY_REMOTE_ARGS": '{"resources": {"special": 1}, "memory": 1e9, '
                                   '"scheduling_strategy": "spread", "label_selector": {"zone": "a"}}'})
    assert ok.ray_remote_args["scheduling_strategy"] == "SPREAD" and ok.preemptions == "unlimited"
    refused = {
        '{"max_restarts": 2}': "resilient's own", '{"num_gpus": 1}': "RESILIENT_ACTOR_GPUS",
        '{"memroy": 1}': "accepted: accelerator_type", '{"memory": -1}': "memory must be a number > 0",
        '{"resources": {"CPU": 2}}': "may not name", '{"scheduling_strategy": "PACK"}': "DEFAULT",
        '{"placement_group_strategy": "PACK"}': "needs placement_group_bundles", "[1]": "mapping",
        '{"placement_group_bundles": [{"CPU": 1}], "scheduling_strategy": "SPREAD"}': "exclude each other",
        '{"placement_group_bundles": [{"GPU": 1}]}': "must hold the actor itself",
    }
    for raw, says in refused.items():
        with pytest.raises(ConfigError, match="RESILIENT_RAY_REMOTE_ARGS") as info:
            Settings.from_env({**env, "RESILIENT_RAY_REMOTE_ARGS": raw})
        assert says in str(info.value), (raw, str(info.value))
    with pytest.raises(ConfigError, match="RESILIENT_PREEMPTIONS"):
        Settings.from_env({**env, "RESILIENT_PREEMPTIONS": "some"})
    with pytest.raises(ConfigError, match="RESILIENT_STOP_TIMEOUT_SECONDS"):
        Settings.from_env({**env, "RESILIENT_STOP_TIMEOUT_SECONDS": "-1"})
    assert Policy.from_settings(Settings.from_env({**env, "RESILIENT_PREEMPTIONS": "4"}), 1, False).preemptions == 4


def test_doctests_of_the_simulation():
    from resilient.testing import simulation

    assert doctest.testmod(simulation).failed == 0


def up(s: Scheduler, now: float = 0.0, **policy) -> list:
    """Start every slot and bring each incarnation up; return the commands of the last one."""
    cmds = []
    for c in s.start(now):
        if isinstance(c, StartActor):
            cmds = s.handle(ActorUp(c.slot, c.inc, epoch=c.inc, node=f"n{c.slot}", cursor=c.slot), now)
    return cmds


def tick_until(s: Scheduler, kind: type, limit: float = 120.0) -> list:
    """Fire timers in order until one leads to a command of `kind`; return those commands."""
    while (t := s.next_wakeup()) is not None and t < limit:
        cmds = s.tick(t)
        if any(isinstance(c, kind) for c in cmds):
            return cmds
    return []


def sends(cmds: list) -> list[SendCall]:
    return [c for c in cmds if isinstance(c, SendCall)]


def emitted(cmds: list, kind: type) -> list:
    return [c.event for c in cmds if isinstance(c, Emit) and isinstance(c.event, kind)]


def make(n: int = 10, **kw) -> Scheduler:
    return Scheduler(Policy(**{"slots": 1, "stateful": False, "standby": 0, "batches_per_call": 1, **kw}),
                     Ledger(n, 64), now=0.0)


def test_a_plain_death_with_one_batch_in_flight_charges_it_and_an_external_one_never_does():
    s = make(queue_depth=1)
    [call] = sends(up(s))
    cmds = s.handle(ActorDown(0, call.inc, Cause.PROCESS, "killed"), 1.0)
    assert [e.batch_id for e in emitted(cmds, ev.BatchRetried)] == [0]
    start = next(c for c in cmds if isinstance(c, StartActor))
    [call] = sends(s.handle(ActorUp(0, start.inc, epoch=9), 2.0))
    for cause in (Cause.NODE, Cause.PREEMPTED, Cause.OOM):
        cmds = s.handle(ActorDown(0, call.inc, cause, "gone"), 3.0)
        assert emitted(cmds, ev.BatchRetried) == [] and emitted(cmds, ev.BatchDeadLettered) == []
        start = next(c for c in cmds if isinstance(c, StartActor))
        [call] = sends(s.handle(ActorUp(0, start.inc, epoch=start.inc), 4.0))
    assert s.ledger.attempts == {0: 1}


def test_deaths_while_starting_are_retried_after_a_backoff_and_the_users_exception_is_not():
    s = make(max_attempts=2, start_deaths=3)
    [start] = s.start(0.0)
    cmds = s.handle(ActorDown(0, start.inc, Cause.PROCESS, "killed while starting"), 0.0)
    assert not any(isinstance(c, StartActor) for c in cmds)  # not at once: after a backoff (a timer)
    again = [c for c in tick_until(s, StartActor) if isinstance(c, StartActor)]
    assert len(again) == 1
    for _ in range(3):  # its own budget: 3 in a row pass, the 4th fails the job
        cmds = s.handle(ActorDown(0, again[0].inc, Cause.OOM, "oom"), 60.0)
        if any(isinstance(c, FailJob) for c in cmds):
            break
        again = [c for c in tick_until(s, StartActor, limit=1e9) if isinstance(c, StartActor)]
    assert any(isinstance(c, FailJob) and "died while starting" in c.error for c in cmds)
    user = make(max_attempts=2)
    [start] = user.start(0.0)
    user.handle(ActorDown(0, start.inc, Cause.USER, "OSError: no weights", "Traceback..."), 0.0)
    [start] = [c for c in tick_until(user, StartActor) if isinstance(c, StartActor)]
    cmds = user.handle(ActorDown(0, start.inc, Cause.USER, "OSError: no weights", "Traceback..."), 5.0)
    [fail] = [c for c in cmds if isinstance(c, FailJob)]
    assert "raised 2 times in a row" in fail.error and "OSError: no weights" in fail.error
    assert fail.traceback == "Traceback..."


def test_a_stateful_exception_rolls_back_without_waiting_and_replays_after_the_backoff():
    s = Scheduler(Policy(slots=1, stateful=True, standby=0, batches_per_call=1, queue_depth=1), Ledger(5, 64))
    [call] = sends(up(s))
    tb = 'Traceback:\n  File "p.py", line 3, in f\nValueError: x'
    cmds = s.handle(CallAnswered(call.call, (Failure(0, 0, call.inc, "ValueError: x", tb),)), 1.0)
    assert [type(c) for c in cmds if isinstance(c, RollbackActor)] == [RollbackActor]  # a command, at once
    cmds = s.handle(RollbackDone(0, call.inc, 0), 1.01)
    assert emitted(cmds, ev.SlotRolledBack) and sends(cmds) == []  # the backoff has not passed yet
    [replay] = sends(tick_until(s, SendCall))
    assert replay.items == ((0, False),)


def test_the_first_batches_failing_alike_fail_the_job_and_different_errors_do_not():
    tb = 'Traceback:\n  File "p.py", line {}, in f\nValueError: bad'

    def run(lines):
        s = make(n=10, queue_depth=3, fail_fast_after=3)
        calls = sends(up(s))
        out = []
        for call, line in zip(calls, lines):
            b = call.items[0][0]
            out += s.handle(CallAnswered(call.call, (Failure(b, 0, call.inc, f"ValueError: bad {b}",
                                                             tb.format(line)),)), 1.0)
        return [c for c in out if isinstance(c, FailJob)]

    [fail] = run([7, 7, 7])
    assert "the first 3 batches that ran (0, 1, 2) all raised the same error" in fail.error
    assert run([7, 8, 7]) == []


def test_a_draining_node_hands_its_slot_over_once_its_call_answers_and_charges_nothing():
    s = make(queue_depth=1)
    [call] = sends(up(s))
    cmds = s.handle(NodeDraining("n0", deadline=30.0), 1.0)
    assert not any(isinstance(c, (KillActor, SendCall)) for c in cmds)  # the call in flight may finish
    cmds = s.handle(CallAnswered(call.call, (Result(0, 0, call.inc, "out-0", 0.01, 0),)), 2.0)
    [replaced] = emitted(cmds, ev.ActorReplaced)
    assert replaced.reason.startswith("handed over") and replaced.cause == "preempted"
    assert any(isinstance(c, KillActor) for c in cmds) and s.ledger.attempts == {}


def test_a_stateful_hand_over_commits_then_persists_then_takes_a_standby_off_the_draining_node():
    from resilient.runtime.protocol import CommitDone, CommitGroup, FinishActor, FinishDone, KillSpare, SpareUp

    s = Scheduler(Policy(slots=1, stateful=True, standby=2, batches_per_call=1, queue_depth=1), Ledger(6, 64))
    first = s.start(0.0)
    [start] = [c for c in first if isinstance(c, StartActor)]
    spares = [c.spare for c in first if type(c).__name__ == "StartSpare"]
    s.handle(SpareUp(spares[0], "n0"), 0.0)  # the first standby shares the active actor's node
    s.handle(SpareUp(spares[1], "n9"), 0.0)
    [call] = sends(s.handle(ActorUp(0, start.inc, epoch=1, node="n0", cursor=0), 0.0))
    cmds = s.handle(NodeDraining("n0", deadline=60.0), 1.0)
    assert [c.spare for c in cmds if isinstance(c, KillSpare)] == [spares[0]]  # replaced elsewhere
    assert not any(isinstance(c, (KillActor, SendCall, FinishActor)) for c in cmds)
    cmds = s.handle(CallAnswered(call.call, (Result(0, 0, 1, "out-0", 0.01, 1),)), 1.1)
    [commit] = [c for c in cmds if isinstance(c, CommitGroup)]  # at once: the hand-over waits for it
    assert commit.batch_ids == (0,) and not any(isinstance(c, (FinishActor, KillActor, SendCall)) for c in cmds)
    cmds = s.handle(CommitDone(commit.group), 1.2)
    assert [type(c) for c in cmds if isinstance(c, (FinishActor, KillActor))] == [FinishActor]
    cmds = s.handle(FinishDone(0, start.inc), 1.3)
    [kill] = [c for c in cmds if isinstance(c, KillActor)]
    [again] = [c for c in cmds if isinstance(c, StartActor)]
    assert kill.inc == start.inc and again.spare == spares[1]  # the standby on a healthy node
    assert emitted(cmds, ev.ActorReplaced)[0].redelivered == ()
    cmds = s.handle(ActorUp(0, again.inc, epoch=2, node="n9", cursor=1), 1.4)
    [nxt] = sends(cmds)
    assert nxt.items == ((1, False),)  # the persisted cursor: nothing replayed
    assert s.ledger.attempts == {} and s.preempted == 1
    assert not [c for c in cmds if type(c).__name__ == "StartSpare"]  # not while the replacement's first batch runs
    [commit] = [c for c in s.handle(CallAnswered(nxt.call, (Result(1, 0, 2, "out-1", 0.01, 2),)), 1.5)
                if isinstance(c, CommitGroup)]  # committed at once
    assert [type(c).__name__ for c in s.handle(CommitDone(commit.group), 1.6)].count("StartSpare") == 1


def test_a_drain_too_close_to_its_deadline_hands_over_at_once_and_sends_the_calls_again():
    s = make(queue_depth=2, n=4)
    calls = sends(up(s))
    cmds = s.handle(NodeDraining("n0", deadline=2.5), 1.0)  # within DRAIN_MARGIN_S: no time to wait
    [replaced] = emitted(cmds, ev.ActorReplaced)
    assert replaced.redelivered == tuple(c.items[0][0] for c in calls) and s.ledger.attempts == {}


def test_a_death_on_a_draining_node_is_a_preemption_whatever_ray_says():
    s = make(queue_depth=1)
    [call] = sends(up(s))
    s.handle(NodeDraining("n0", deadline=60.0), 1.0)
    cmds = s.handle(ActorDown(0, call.inc, Cause.PROCESS, "worker died"), 1.5)
    assert emitted(cmds, ev.ActorReplaced)[0].cause == "preempted" and emitted(cmds, ev.BatchRetried) == []
    assert s.ledger.attempts == {} and s.preempted == 1


def test_a_stop_commits_what_answered_persists_the_slots_and_ends_with_stop_job():
    from resilient.runtime.protocol import (CommitDone, CommitGroup, FinishActor, FinishDone, SaveProgress, StopJob,
                                            StopRequested)

    s = Scheduler(Policy(slots=2, stateful=True, standby=0, batches_per_call=1, queue_depth=1), Ledger(8, 64))
    calls = []
    for c in s.start(0.0):
        calls += sends(s.handle(ActorUp(c.slot, c.inc, epoch=c.inc, node=f"n{c.slot}", cursor=c.slot), 0.0))
    cmds = s.handle(StopRequested(deadline=10.0, reason="SIGTERM"), 1.0)
    assert not any(isinstance(c, (SendCall, KillActor, StartActor)) for c in cmds)
    out = []
    for call in calls:
        b = call.items[0][0]
        out += s.handle(CallAnswered(call.call, (Result(b, call.slot, call.inc, f"o{b}", 0.01, b + 2),)), 1.1)
    assert not sends(out)
    done = set()
    while todo := [c for c in out if isinstance(c, CommitGroup) and c.group not in done]:
        done.add(todo[0].group)
        out += s.handle(CommitDone(todo[0].group), 1.2)
    finish = [c for c in out if isinstance(c, FinishActor)]
    assert len(finish) == 2
    for f in finish:
        out += s.handle(FinishDone(f.slot, f.inc), 1.3)
    [stop] = [c for c in out if isinstance(c, StopJob)]
    assert stop.committed == 2 and stop.total == 8 and "SIGTERM" in stop.reason
    [final] = [c for c in out if isinstance(c, SaveProgress) and c.final]
    assert final.fields["state"] == "stopped" and final.fields["watermark"] == 2
    assert sum(isinstance(c, KillActor) for c in out) == 2 and s.handle(ActorDown(0, 1, Cause.PROCESS), 2.0) == []


def test_a_stop_past_its_deadline_abandons_the_calls_in_flight():
    from resilient.runtime.protocol import StopJob, StopRequested

    s = make(queue_depth=2, n=4)
    sends(up(s))
    assert not any(isinstance(c, StopJob) for c in s.handle(StopRequested(deadline=3.0, reason="SIGINT"), 1.0))
    [stop] = [c for c in tick_until(s, StopJob) if isinstance(c, StopJob)]
    assert stop.committed == 0 and s.ledger.attempts == {}


def test_inputs_of_another_kind_are_refused():
    with pytest.raises(TypeError, match="takes inputs of resilient.runtime.protocol"):
        make().handle(("answer", {}), 0.0)


def test_a_stateless_call_that_fails_as_a_whole_sends_its_other_batches_again():
    s = make(n=6, batches_per_call=3, queue_depth=1)
    [call] = sends(up(s))
    assert [b for b, _ in call.items] == [0, 1, 2]
    # what escaped the worker is put on the call's first batch; nothing was answered for 1 and 2
    cmds = s.handle(CallAnswered(call.call, (Failure(0, 0, call.inc, "RaySystemError: lost", ""),)), 1.0)
    [again] = sends(cmds)
    assert [b for b, _ in again.items] == [1, 2, 3] and s.ledger.attempts == {0: 1}


def test_an_answer_under_a_fenced_epoch_replaces_the_incarnation_and_sends_its_batches_again():
    s = make(n=4, batches_per_call=2, queue_depth=1)
    [call] = sends(up(s))
    cmds = s.handle(CallAnswered(call.call, (Result(0, 0, call.inc + 100, "zombie", 0.01, 0),
                                             Result(1, 0, call.inc + 100, "zombie", 0.01, 0))), 1.0)
    assert any(isinstance(c, KillActor) for c in cmds) and s.group == [] and s.ledger.attempts == {}
    [start] = [c for c in cmds if isinstance(c, StartActor)]
    [again] = sends(s.handle(ActorUp(0, start.inc, epoch=start.inc), 2.0))
    assert [b for b, _ in again.items] == [0, 1]


def test_a_reported_snapshot_commits_its_outputs_at_once_then_is_persisted_out_of_band():
    """An answer saying the worker holds a snapshot (at cursor 3) makes the group go now, not after the
    commit interval; once that commit lands the worker is told to persist it (bounded by the snapshot's own
    cursor), once, while its next calls are in flight."""
    from resilient.runtime.protocol import CommitDone, CommitGroup, PersistState

    s = Scheduler(Policy(slots=1, stateful=True, standby=0, batches_per_call=1, queue_depth=2,
                         commit_interval_seconds=10.0), Ledger(8, 64))
    [start] = [c for c in s.start(0.0) if isinstance(c, StartActor)]
    calls = sends(s.handle(ActorUp(0, start.inc, epoch=1, node="n0", cursor=0), 0.0))

    def answer(b, now, snapshot=None):
        call = calls.pop(0)
        assert call.items == ((b, False),)
        cmds = s.handle(CallAnswered(call.call, (Result(b, 0, 1, f"out-{b}", 0.01, b + 1, snapshot=snapshot),)), now)
        calls.extend(sends(cmds))
        return cmds

    [first] = [c for c in answer(0, 0.1) if isinstance(c, CommitGroup)]  # the job's first commit goes at once
    s.handle(CommitDone(first.group), 0.15)
    assert not [c for c in answer(1, 0.2) if isinstance(c, CommitGroup)]  # then the interval holds them
    cmds = answer(2, 0.3, snapshot=3)
    [commit] = [c for c in cmds if isinstance(c, CommitGroup)]  # a snapshot waits: at once
    assert commit.batch_ids == (1, 2) and not [c for c in cmds if isinstance(c, PersistState)]
    cmds = s.handle(CommitDone(commit.group), 0.35)
    assert [c for c in cmds if isinstance(c, PersistState)] == [PersistState(0, start.inc, 3)]
    assert calls  # the worker goes on meanwhile
    cmds = answer(3, 0.4, snapshot=3)  # answered before the worker read it: not told again
    assert not [c for c in cmds if isinstance(c, (PersistState, CommitGroup))]


def test_a_slot_on_a_draining_node_takes_no_new_batch_while_its_calls_finish():
    """Batches read for a draining slot wait for the next incarnation: only the calls already in flight
    run on the old one, so the hand-over is not put off by new work (reading ahead marks a slot idle)."""
    s = Scheduler(Policy(slots=2, stateful=True, standby=0, batches_per_call=1, queue_depth=2), Ledger(40, 8))
    starts = [c for c in s.start(0.0) if isinstance(c, StartActor)]
    inflight: dict[int, list] = {0: [], 1: []}
    for c in starts:  # reading starts once every slot is up
        for call in sends(s.handle(ActorUp(c.slot, c.inc, epoch=c.inc, node=f"n{c.slot}", cursor=c.slot), 0.0)):
            inflight[call.slot].append(call)
    assert not sends(s.handle(NodeDraining("n0", deadline=60.0), 0.5))
    t, sent = 0.5, []

    def answer(slot):
        nonlocal t
        call = inflight[slot].pop(0)
        b = call.items[0][0]
        t += 0.01
        cmds = s.handle(CallAnswered(call.call, (Result(b, slot, starts[slot].inc, f"out-{b}", 0.01, b + 2),)), t)
        for c in cmds:
            if type(c).__name__ == "CommitGroup":
                cmds += s.handle(CommitDone(c.group), t)
        for c in sends(cmds):
            inflight[c.slot].append(c)
            sent.append(c)

    answer(0)  # batch 0 commits: the window moves on and more is read, for slot 0 too
    while inflight[1] and t < 1.0:
        answer(1)
    assert sent and all(c.slot == 1 for c in sent), [c for c in sent if c.slot == 0]
    assert s.read_pos > 8  # batches of slot 0 were read meanwhile (4 and 6 were already queued: 8 is new)


def test_a_replacement_starts_from_the_newest_hot_snapshot_of_an_accepted_answer():
    """The hot snapshot a call ships rides on `StartActor` after a death; an older one never replaces a
    newer one, a forgotten call's (its incarnation replaced) is ignored, and a slot started from storage
    at a later cursor drops it."""
    s = Scheduler(Policy(slots=1, stateful=True, standby=0, batches_per_call=1, queue_depth=2), Ledger(40, 64))
    [start] = [c for c in s.start(0.0) if isinstance(c, StartActor)]
    assert start.hot is None
    c0, c1 = sends(s.handle(ActorUp(0, start.inc, epoch=1, node="n0", cursor=0), 0.0))
    s.handle(CallAnswered(c0.call, (Result(0, 0, 1, "out-0", 0.01, 1),), hot=(1, "token-1")), 0.1)
    cmds = s.handle(CallAnswered(c1.call, (Result(1, 0, 1, "out-1", 0.01, 2),), hot=(1, "older")), 0.2)
    [c2] = sends(cmds)
    cmds = s.handle(ActorDown(0, start.inc, Cause.NODE, "node lost"), 0.3)
    [again] = [c for c in cmds if isinstance(c, StartActor)]
    assert again.hot == "token-1"
    # the dead incarnation's call answers late with a newer snapshot: forgotten, not trusted
    s.handle(CallAnswered(c2.call, (Result(2, 0, 1, "out-2", 0.01, 3),), hot=(3, "zombie")), 0.35)
    assert s.slots[0].hot == (1, "token-1")
    [replay, new] = sends(s.handle(ActorUp(0, again.inc, epoch=2, node="n1", cursor=1, hot=True), 0.4))
    assert replay.items == ((1, True),) and new.items == ((2, False),)
    cmds = s.handle(ActorDown(0, again.inc, Cause.NODE, "node lost"), 0.5)
    [third] = [c for c in cmds if isinstance(c, StartActor)]
    assert third.hot == "token-1"
    s.handle(ActorUp(0, third.inc, epoch=3, node="n2", cursor=2, generation=4), 0.6)  # storage was newer
    assert s.slots[0].hot is None


def test_a_hand_over_drops_the_hot_snapshot_its_persisted_state_supersedes():
    from resilient.runtime.protocol import CommitDone, CommitGroup, FinishDone

    s = Scheduler(Policy(slots=1, stateful=True, standby=0, batches_per_call=1, queue_depth=1), Ledger(6, 64))
    [start] = [c for c in s.start(0.0) if isinstance(c, StartActor)]
    [call] = sends(s.handle(ActorUp(0, start.inc, epoch=1, node="n0", cursor=0), 0.0))
    s.handle(NodeDraining("n0", deadline=60.0), 1.0)
    cmds = s.handle(CallAnswered(call.call, (Result(0, 0, 1, "out-0", 0.01, 1),), hot=(1, "token")), 1.1)
    [commit] = [c for c in cmds if isinstance(c, CommitGroup)]
    s.handle(CommitDone(commit.group), 1.2)
    cmds = s.handle(FinishDone(0, start.inc), 1.3)
    [again] = [c for c in cmds if isinstance(c, StartActor)]
    assert again.hot is None and s.slots[0].hot is None
