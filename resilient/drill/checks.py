"""What a drill run is judged by, and what is measured on it: pure functions over plain data.

No Ray, no files and no clock here. A run is described by what was read back after it (a multiset of
committed batch ids, a digest per output, a digest per slot state), by its commit timeline (samples of
``(seconds, committed batches)``) and by its job events (as dicts: ``kind`` plus the event's fields).
Each check returns ``None`` when it holds, else one line saying what broke: the drill names the check
and prints the line.

Example:
    >>> import collections
    >>> exactly_once(collections.Counter([0, 1, 1, 3]), expected=range(4))
    'batch 1 committed 2 times; batch 2 missing'
    >>> exactly_once(collections.Counter([0, 1, 2]), expected=range(3)) is None
    True
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "back_at",
    "batches_replayed",
    "commit_rates",
    "dip",
    "exactly_once",
    "hang_timeout",
    "recovery_seconds",
    "same_outputs",
    "same_state",
]

_SHOWN = 5


def _listed(items: Sequence[str], more: int) -> str:
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")


def exactly_once(ids: Mapping[int, int], expected: Iterable[int]) -> str | None:
    """Every expected batch id committed exactly once and nothing else, counting `ids` as a multiset.

    >>> exactly_once({0: 1, 1: 1, 7: 1}, expected=[0, 1])
    'batch 7 committed but not expected'
    """
    want = set(expected)
    problems = []
    for b in sorted(set(ids) | want):
        n = ids.get(b, 0)
        if b not in want:
            problems.append(f"batch {b} committed but not expected")
        elif n == 0:
            problems.append(f"batch {b} missing")
        elif n > 1:
            problems.append(f"batch {b} committed {n} times")
    if not problems:
        return None
    return _listed(problems[:_SHOWN], len(problems) - _SHOWN)


def same_outputs(got: Mapping[int, str], want: Mapping[int, str], ids: Iterable[int] | None = None) -> str | None:
    """The outputs (digests by batch id) equal the reference's, over `ids` (default: the reference's ids).

    >>> same_outputs({0: "a", 1: "x"}, {0: "a", 1: "b"})
    'output of batch 1 differs from the reference'
    >>> same_outputs({0: "a", 1: "x"}, {0: "a", 1: "b"}, ids=[0]) is None
    True
    """
    wrong = [b for b in sorted(want if ids is None else ids) if b in want and got.get(b) != want[b]]
    if not wrong:
        return None
    shown = ", ".join(str(b) for b in wrong[:_SHOWN]) + (f" and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else "")
    return f"output of batch{'es' if len(wrong) > 1 else ''} {shown} differ{'' if len(wrong) > 1 else 's'} from the reference"


def same_state(got: Sequence[str | None], want: Sequence[str | None]) -> str | None:
    """Each slot's final state (a digest; None when the slot has no checkpoint) equals the reference's.

    >>> same_state(["a", "b"], ["a", "c"])
    'final state of slot 1 differs from the reference'
    >>> same_state(["a", None], ["a", "c"])
    'slot 1 has no final checkpoint'
    """
    for s, (g, w) in enumerate(zip(got, want)):
        if g is None and w is not None:
            return f"slot {s} has no final checkpoint"
        if g != w:
            return f"final state of slot {s} differs from the reference"
    if len(got) != len(want):
        return f"{len(got)} slots, the reference had {len(want)}"
    return None


def recovery_seconds(samples: Sequence[tuple[float, int]], fault_at: float, back_at: float | None = None) -> float | None:
    """Seconds from the fault to the first commit after it: the first sample after `fault_at` (and after
    `back_at`, when the struck actor's replacement took its slot) whose count rose since the sample
    before. None if nothing was committed after the fault.

    >>> samples = [(0.0, 0), (1.0, 10), (2.0, 10), (3.5, 20), (4.0, 30)]
    >>> recovery_seconds(samples, fault_at=1.5)
    2.0
    >>> recovery_seconds(samples, fault_at=1.5, back_at=3.6)  # other slots committed meanwhile
    2.5
    >>> recovery_seconds([(0.0, 0), (1.0, 10)], fault_at=1.5) is None
    True
    """
    since = fault_at if back_at is None else max(fault_at, back_at)
    highest = samples[0][1] if samples else 0
    for t, n in samples[1:]:
        if t > since and n > highest:
            return t - fault_at
        highest = max(highest, n)
    return None


def back_at(events: Iterable[Mapping[str, Any]], fault_at: float) -> float | None:
    """When an actor replaced after the fault took its slot: the first ``started`` event after a
    ``restart`` event, both after `fault_at` (events carry ``t``, seconds). None without a replacement.

    >>> events = [{"kind": "started", "t": 0.5}, {"kind": "restart", "t": 2.0}, {"kind": "started", "t": 3.0}]
    >>> back_at(events, fault_at=1.0)
    3.0
    >>> back_at(events[:2], fault_at=1.0) is None
    True
    """
    replaced = False
    for e in events:
        if e.get("t", 0.0) < fault_at:
            continue
        if e["kind"] == "restart":
            replaced = True
        elif e["kind"] == "started" and replaced:
            return e["t"]
    return None


def commit_rates(samples: Sequence[tuple[float, int]], bin_s: float = 0.25) -> list[tuple[float, float]]:
    """Committed batches per second in bins of `bin_s` seconds: ``(bin start, rate)``. Only a count
    above the highest so far is new: a re-run that starts at its resume point adds nothing.

    >>> commit_rates([(0.0, 0), (0.1, 5), (0.3, 10), (0.6, 10)], bin_s=0.25)
    [(0.0, 20.0), (0.25, 20.0), (0.5, 0.0)]
    >>> commit_rates([(0.0, 0), (0.1, 5), (0.2, 0), (0.3, 5), (0.4, 6)], bin_s=0.25)  # killed, re-run
    [(0.0, 20.0), (0.25, 4.0)]
    """
    if not samples:
        return []
    bins: dict[int, float] = collections.defaultdict(float)
    highest = samples[0][1]
    for t, n in samples[1:]:
        bins[int(t // bin_s)] += max(0, n - highest)
        highest = max(highest, n)
    last = int(samples[-1][0] // bin_s)
    return [(round(i * bin_s, 6), bins[i] / bin_s) for i in range(int(samples[0][0] // bin_s), last + 1)]


def dip(samples: Sequence[tuple[float, int]], fault_at: float, until: float, reference_rate: float,
        window_s: float = 0.5) -> float | None:
    """How far throughput fell after the fault: 1 - (lowest rate over any `window_s` window between
    `fault_at` and `until`, shorter if the span is) / `reference_rate`, clamped to 0..1. None without a
    reference rate or a span.

    >>> samples = [(float(t), 10 * t) for t in range(5)] + [(5.0, 40), (6.0, 40), (7.0, 50)]
    >>> dip(samples, fault_at=4.0, until=7.0, reference_rate=10.0, window_s=1.0)
    1.0
    >>> dip(samples, fault_at=0.0, until=3.0, reference_rate=10.0, window_s=1.0)
    0.0
    """
    window_s = min(window_s, until - fault_at)
    if reference_rate <= 0 or window_s <= 0:
        return None
    times = [t for t, _ in samples]
    lowest = None
    start = fault_at
    while start + window_s <= until + 1e-9:
        rate = (_count_at(samples, times, start + window_s) - _count_at(samples, times, start)) / window_s
        lowest = rate if lowest is None else min(lowest, rate)
        start += window_s / 4
    if lowest is None:
        return None
    return round(min(1.0, max(0.0, 1.0 - lowest / reference_rate)), 3)


def _count_at(samples: Sequence[tuple[float, int]], times: list[float], t: float) -> float:
    """The committed count at time `t`, the highest seen so far (a re-run restarting its count does not
    take commits back)."""
    import bisect

    i = bisect.bisect_right(times, t)
    return max((n for _, n in samples[:i]), default=0)


def batches_replayed(events: Iterable[Mapping[str, Any]], slots: int, stateful: bool) -> int:
    """Batches run more than once, from a job's events: those in flight when their actor was replaced
    or that raised and were retried; for a stateful slot, also those between the checkpoint it restored
    (or rolled back to) and the last batch it had reached.

    >>> events = [{"kind": "restart", "slot": 0, "redelivered": (4, 6)},
    ...           {"kind": "started", "slot": 0, "cursor": 0}, {"kind": "started", "slot": 0, "cursor": 2}]
    >>> batches_replayed(events, slots=2, stateful=False)
    2
    >>> batches_replayed(events, slots=2, stateful=True)  # 2, 4 and 6 run again
    3
    >>> batches_replayed([{"kind": "retry", "batch_id": 5}, {"kind": "rollback", "slot": 1, "batch_id": 5,
    ...                    "cursor": 1}], slots=2, stateful=True)  # 1, 3, 5
    3
    """
    again: set[int] = set()
    reached: dict[int, int] = {}  # slot -> highest batch it had in flight when replaced
    started: set[int] = set()
    for e in events:
        kind = e.get("kind")
        if kind == "restart":
            lost = list(e.get("redelivered") or ())
            again.update(lost)
            if lost:
                reached[e["slot"]] = max(lost)
        elif kind == "retry":
            again.add(e["batch_id"])
        elif stateful and kind == "rollback":
            again.update(range(e["cursor"], e["batch_id"] + 1, slots))
        elif stateful and kind == "started":
            slot = e["slot"]
            if slot in started and slot in reached:
                again.update(range(e["cursor"], reached.pop(slot) + 1, slots))
            started.add(slot)
    return len(again)


def hang_timeout(seconds: float, calls: int, slots: int, *, floor: float = 2.0, factor: float = 10.0) -> float:
    """The batch timeout a hang drill uses: `factor` times the reference's mean seconds per actor call
    (its run time spread over its slots' calls), and at least `floor` seconds.

    >>> hang_timeout(10.0, calls=100, slots=2)  # 0.2 s per call
    2.0
    >>> hang_timeout(60.0, calls=20, slots=2)  # 6 s per call
    60.0
    """
    per_call = seconds * slots / max(1, calls)
    return round(max(floor, factor * per_call), 1)
