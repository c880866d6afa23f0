"""The scheduler under deterministic simulation: thousands of seeded fault schedules, and proof that the
simulation catches a broken scheduler.

A failing seed is a bug: its assertion message carries a one-line reproduction.
"""

from __future__ import annotations

import pytest

from resilient.runtime import scheduler as scheduler_module
from resilient.runtime.protocol import Cause
from resilient.testing.simulation import Scenario, random_scenario, simulate, sweep

SEEDS = 4000  # varied sizes (1-300 batches, 1-5 slots), settings and faults; about 20 s on 2 cores


def _report(bad: list) -> str:
    return "\n".join(f"{o.violations[:3]}\n    {o.scenario.repro}" for o in bad[:10])


@pytest.mark.parametrize("part", range(4))
def test_every_guarantee_holds_over_thousands_of_fault_schedules(part):
    n = SEEDS // 4
    bad = sweep(range(part * n, (part + 1) * n))
    assert not bad, f"{len(bad)} seeds broke a guarantee:\n{_report(bad)}"


def test_the_sweep_injects_every_kind_of_fault():
    """The faults are not just configured but happen: deaths of every cause, hangs, zombies, exceptions,
    poison and crashing batches, failed commits and progress saves, driver crashes and re-runs; slots
    restored from hot snapshots, from storage after losing one with its node, and with them off."""
    outcomes = [simulate(random_scenario(seed)) for seed in range(300)]
    assert sum(o.runs > 1 for o in outcomes) > 50  # driver crashes and re-runs
    assert sum(o.restarts for o in outcomes) > 500
    assert any(o.scenario.poison for o in outcomes) and any(o.scenario.crashers for o in outcomes)
    assert any(o.scenario.zombie_rate for o in outcomes) and any(o.scenario.hang_rate for o in outcomes)
    assert sum(o.hot_restores for o in outcomes) > 50 and sum(o.hot_lost for o in outcomes) > 5
    assert any(o.scenario.stateful and not o.scenario.hot and o.restarts for o in outcomes)  # storage only


def test_a_large_job_with_many_actors_and_faults_everywhere():
    out = simulate(Scenario(seed=11, batches=20_000, slots=200, stateful=True, kill_rate=0.005, hang_rate=0.002,
                            zombie_rate=0.3, transient_rate=0.01, poison=(77, 15_000), crashers=(4242,),
                            commit_fail_rate=0.02, progress_fail_rate=0.05, driver_crashes=2, fault_window=1e9))
    assert out.violations == [] and out.completed, out.scenario.repro
    assert out.runs == 3 and out.restarts > 20


def test_stateless_job_under_heavy_faults_finishes_once_they_stop():
    out = simulate(Scenario(seed=5, batches=2_000, slots=8, kill_rate=0.05, hang_rate=0.02, zombie_rate=0.5,
                            transient_rate=0.05, commit_fail_rate=0.1, fault_window=60.0))
    assert out.violations == [] and out.completed, out.scenario.repro


def test_preemption_notices_hand_slots_over_without_charging_anyone():
    out = simulate(Scenario(seed=8, batches=3_000, slots=4, stateful=True, kill_rate=0.02, notice_share=1.0,
                            fault_window=1e9))
    assert out.violations == [] and out.completed, out.scenario.repro
    assert out.handovers >= 5 and out.charged_external == 0


def _notice_only(seed: int) -> Scenario:
    """Preemption notices as the only fault, each far enough ahead for the hand-over to fit (the deadline
    minus DRAIN_MARGIN_S leaves at least a second); some hit a standby's node."""
    import random

    r = random.Random(seed)
    return Scenario(seed=seed, batches=r.randint(20, 300), slots=r.randint(1, 4), stateful=True,
                    standby=r.choice([0, 1, 2]), queue_depth=r.choice([1, 2, 3]),
                    batches_per_call=r.choice(["auto", 1, 3]), checkpoint_every=r.choice([3, 10]),
                    kill_rate=0.02, external_share=0.0, notice_share=1.0, notice_seconds=(3.0, 10.0),
                    fault_window=r.choice([5.0, 30.0]))


def _stops_only(seed: int) -> Scenario:
    import random

    r = random.Random(seed)
    return Scenario(seed=seed, batches=r.randint(20, 300), slots=r.randint(1, 4), stateful=r.random() < 0.7,
                    standby=r.choice([0, 1]), batches_per_call=r.choice(["auto", 1, 3]), stops=r.choice([1, 2, 3]),
                    stop_seconds=(3.0, 6.0))


def test_a_handed_over_slot_replays_nothing():
    """Ahead of a preemption, a stateful slot commits its outputs and persists its state before the next
    incarnation takes over: nothing is replayed and nothing charged, over 400 schedules."""
    outcomes = [simulate(_notice_only(seed)) for seed in range(400)]
    bad = [o for o in outcomes if o.violations or o.replayed or o.charged_external]
    assert not bad, f"{[(o.replayed, o.violations[:2]) for o in bad[:3]]}\n{_report(bad) if bad else ''}" + "".join(
        f"\n    {o.scenario.repro}" for o in bad[:3])
    assert sum(o.handovers for o in outcomes) > 300


def test_a_stopped_job_resumes_replaying_nothing():
    """A stop given the time it needs commits what answered and persists every slot: the re-run replays
    nothing, over 300 schedules of one to three stops each."""
    outcomes = [simulate(_stops_only(seed)) for seed in range(300)]
    bad = [o for o in outcomes if o.violations or o.replayed_after_stop]
    assert not bad, "".join(f"\n{o.replayed_after_stop} {o.violations[:2]} {o.scenario.repro}" for o in bad[:3])
    assert sum(o.stops for o in outcomes) >= 300


def test_a_stop_too_short_for_the_calls_in_flight_still_loses_nothing():
    outcomes = [simulate(Scenario(seed=seed, batches=200, slots=3, stateful=seed % 2 == 0, stops=2,
                                  stop_seconds=(0.0, 0.4), batches_per_call=4)) for seed in range(100)]
    assert not [o for o in outcomes if o.violations], [o.scenario.repro for o in outcomes if o.violations][:3]
    assert sum(o.stops for o in outcomes) > 150  # (a stop drawn late may come after the last commit)


def test_the_preemption_budget_fails_the_job_past_its_limit():
    from resilient.runtime.ledger import Ledger
    from resilient.runtime.protocol import ActorDown, ActorUp, FailJob
    from resilient.runtime.scheduler import Policy, Scheduler

    s = Scheduler(Policy(slots=1, stateful=False, standby=0, preemptions=2), Ledger(10, 64), now=0.0)
    [start] = s.start(0.0)
    inc, failed = start.inc, []
    for t in range(3):
        s.handle(ActorUp(0, inc, epoch=t + 1), t)
        out = s.handle(ActorDown(0, inc, Cause.PREEMPTED, "preempted"), t + 0.5)
        failed += [c for c in out if isinstance(c, FailJob)]
        inc = s.slots[0].inc
    assert s.preempted == 3 and s.state == "failed" and len(failed) == 1
    assert "more than the 2 allowed" in failed[0].error and s.ledger.attempts == {}


def test_systematic_errors_fail_the_job_fast_without_dead_lettering_the_rest():
    out = simulate(Scenario(seed=2, batches=500, slots=2, poison=tuple(range(500)), fail_fast_after=3))
    assert out.failed is not None and "raised the same error and none succeeded" in out.failed
    assert not out.completed and out.batches_done <= 3  # a few dead letters at most, not 500


def test_a_constructor_that_always_raises_fails_the_job_with_its_error():
    out = simulate(Scenario(seed=4, batches=50, slots=2, standby=0, broken_starts=100, max_attempts=3))
    assert out.failed is not None and "constructor or restore raised 3 times in a row" in out.failed
    assert "OSError: no weights" in out.failed


def test_actors_killed_while_starting_never_fail_the_job_by_themselves():
    # every actor dies often, also while building and restoring (which takes 0.5-2 s here)
    out = simulate(Scenario(seed=9, batches=300, slots=2, stateful=True, kill_rate=0.05, external_share=0.0,
                            fault_window=120.0))
    assert out.violations == [] and out.completed, out.scenario.repro
    assert out.start_deaths >= 5 and out.restarts > 20, (out.start_deaths, out.restarts)


def test_a_crash_loop_while_starting_still_ends():
    """Under a kill storm that no start survives, the start budget (20 in a row per slot) ends the job
    instead of retrying forever."""
    out = simulate(Scenario(seed=9, batches=300, slots=2, stateful=True, kill_rate=1.0, external_share=0.0,
                            fault_window=1e9))
    assert out.failed is not None and "actors in a row died while starting" in out.failed


# ------------------------------------------------------------------ the simulation catches broken schedulers


def _broken(monkeypatch, name, replacement, seeds=range(400)):
    monkeypatch.setattr(scheduler_module.Scheduler, name, replacement)
    return sweep(seeds)


def test_it_catches_a_scheduler_that_charges_external_deaths(monkeypatch):
    original = scheduler_module.Scheduler._on_down

    def charge_everything(self, e, now):
        original(self, type(e)(e.slot, e.inc, Cause.PROCESS, e.error, e.traceback), now)

    bad = _broken(monkeypatch, "_on_down", charge_everything)
    assert any("external death" in v for o in bad for v in o.violations)


def test_it_catches_a_scheduler_that_finishes_before_replaying(monkeypatch):
    original = scheduler_module.Scheduler._maybe_finish

    def early(self, now):
        reading, read = self.reading, self.read_pos
        self.reading, self.read_pos = True, self.total  # finish as soon as every batch is done
        try:
            original(self, now)
        finally:
            self.reading, self.read_pos = reading, read

    bad = _broken(monkeypatch, "_maybe_finish", early)
    assert any("final state" in v for o in bad for v in o.violations)


def test_it_catches_a_scheduler_that_replays_from_the_wrong_cursor(monkeypatch):
    original = scheduler_module.Scheduler._on_rolled

    def stale_cursor(self, e, now):
        # one batch past where the reloaded checkpoint stands: that batch is never applied again
        original(self, type(e)(e.slot, e.inc, e.cursor + self.policy.slots), now)

    bad = _broken(monkeypatch, "_on_rolled", stale_cursor)
    assert any("final state" in v or "did not" in v for o in bad for v in o.violations)


def test_it_catches_a_scheduler_that_forgets_lost_batches(monkeypatch):
    original = scheduler_module.Scheduler._replace

    def forget(self, slot, reason, cause, culprit, now, error=""):
        for call in slot.inflight:
            self.calls.pop(call.id, None)
        slot.inflight.clear()  # the lost batches are dropped instead of sent again
        original(self, slot, reason, cause, culprit, now, error)

    bad = _broken(monkeypatch, "_replace", forget)
    assert any("did not" in v or "stalled" in v or "committed wrong" in v for o in bad for v in o.violations)


def test_it_catches_a_scheduler_that_persists_a_snapshot_before_its_outputs_commit(monkeypatch):
    """`PersistState` as soon as a worker reports its snapshot, without waiting for the commit of the
    outputs below it: the checkpoint runs ahead of the sink, which the save-time check names."""
    from resilient.runtime.protocol import PersistState

    def eager(self, slot):
        self._out.append(PersistState(slot.index, slot.inc, slot.snapshot))
        slot.told, slot.snapshot = slot.snapshot, -1

    bad = _broken(monkeypatch, "_persist_if_covered", eager, seeds=range(100))
    assert any("saved before batch" in v for o in bad for v in o.violations)


def test_it_catches_a_hand_over_that_does_not_persist_the_slot_first(monkeypatch):
    """Hand over at once, without the final commit and save: the replacement replays from an older
    checkpoint, which the hand-over test counts."""
    original = scheduler_module.Scheduler._drain_check

    def hasty(self, slot, now, *, arm=False):
        if self._leaving_at(slot) is not None and slot.phase == "running" and not slot.inflight:
            self._leave(slot, now)
            return
        original(self, slot, now, arm=arm)

    monkeypatch.setattr(scheduler_module.Scheduler, "_drain_check", hasty)
    outcomes = [simulate(_notice_only(seed)) for seed in range(100)]
    assert sum(o.replayed for o in outcomes) > 0


def _hot_case(seed: int, hot: bool) -> Scenario:
    return Scenario(seed=seed, batches=200, slots=3, stateful=True, kill_rate=0.01, checkpoint_every=10,
                    zombie_rate=0.1, transient_rate=0.01, hot=hot)


def test_hot_snapshots_shorten_replays_and_a_lost_one_falls_back_to_storage():
    """Replacements start from the slots' hot snapshots (checked against the answers at each start), fewer
    batches are replayed than from storage alone, and snapshots lost with their node fall back to it."""
    with_hot = [simulate(_hot_case(seed, True)) for seed in range(150)]
    without = [simulate(_hot_case(seed, False)) for seed in range(150)]
    bad = [o for o in with_hot + without if o.violations or not o.completed]
    assert not bad, _report(bad)
    assert sum(o.hot_restores for o in with_hot) > 50 and sum(o.hot_lost for o in with_hot) > 5
    assert sum(o.hot_restores for o in without) == 0
    assert sum(o.replayed for o in with_hot) < 0.95 * sum(o.replayed for o in without)


def test_it_catches_a_scheduler_that_starts_a_slot_from_the_wrong_hot_snapshot(monkeypatch):
    """Hand each replacement the next slot's hot snapshot: its batches below that cursor were not all
    answered, and its state is not the slot's, which the start-time check and the final state name."""
    original = scheduler_module.Scheduler._start

    def mixed_up(self, slot, now, *, spare_ok=True):
        own = slot.hot
        slot.hot = self.slots[(slot.index + 1) % len(self.slots)].hot
        try:
            original(self, slot, now, spare_ok=spare_ok)
        finally:
            slot.hot = own

    monkeypatch.setattr(scheduler_module.Scheduler, "_start", mixed_up)
    outcomes = [simulate(_hot_case(seed, True)) for seed in range(100)]
    assert any("hot snapshot" in v for o in outcomes for v in o.violations)
    assert any("final state" in v for o in outcomes for v in o.violations)


def test_a_failing_seed_prints_a_one_line_reproduction():
    line = Scenario(seed=123, batches=7, stateful=True).repro
    assert line.startswith("from resilient.testing.simulation import *; simulate(Scenario(seed=123,")
    assert "\n" not in line and "batches=7" in line and "stateful=True" in line
    exec(line, {})  # noqa: S102 - it runs
