"""How many batches one actor call carries.

Every Ray actor call has a fixed cost on both sides, whatever it carries: the driver serializes and
submits it, waits for it and fetches the reply (about 0.6 ms of driver CPU per call on a 2-core machine,
next to a few ms of compute for a short batch), and the worker schedules and answers it. Several batches
per call share that cost. What a call of ``k`` batches trades for it:

* latency: a batch's output comes back when its whole call ends, up to ``k - 1`` batches later;
* hang detection: a call has one deadline, ``batch_timeout_seconds`` from its start, so a hung batch is
  still detected within its timeout; the batches of one call must together finish well inside it;
* attribution: when an actor dies or hangs in a call of several batches, which one did it is unknown.
  Each of them is then retried alone (as when several calls are in flight), so the next failure names
  its batch, and only named batches count attempts towards the poison limit.

How long a call ``"auto"`` aims at depends on the pipeline:

* stateless: about 0.2 s (`AUTO_CALL_SECONDS`). Besides Ray's fixed cost, a call answers only once its
  outputs are durable, so each call ends waiting for the fsync of its last output (a millisecond or more,
  while that core may idle). Measured on 2 cores with 20 ms batches (`benchmarks/pipeline_overhead.py`):
  the driver spent about 1.5 ms of CPU per batch with calls of 2 batches (a 0.05 s aim), 1.1 with 4, 0.9
  with 8; plain Ray actors, one batch per call, 1.5. What longer calls cost is latency (a batch's output
  waits for its call, at most about 0.2 s more) and, after a death, more batches to retry alone.
* stateful: about 0.05 s (`AUTO_CALL_SECONDS_STATEFUL`). A slot's snapshot is persisted only once the
  outputs it covers are committed, and they come back when their call ends: every batch a call runs after
  the snapshot delays its persist, and the persisted state trails the slot by that much more, replayed
  after a crash (about 28 ms a batch in `benchmarks/recovery.py`). Calls of 8 batches instead of 2 make
  that up to 6 more batches, 3 on average. Five kills per run cannot show it apart from where the kills
  land in the checkpoint cycle: hot failover took 0.30 s (median; replaying 5 to 13) with calls of 8, and
  0.22 s and 0.32 s in two runs (replaying 2 to 7, and 2 to 10) with calls of 2.

`AUTO_MAX` bounds a call for short batches either way.

Exceptions need no guessing: the worker runs a call's batches in order and answers each with its result
or its error (a stateful slot stops at the first error, since its state is rolled back).

`batches_per_call` is the decision, a pure function of the setting and the measured seconds per batch:
a fixed setting is taken as it is; ``"auto"`` starts at 1 and, once batches have been timed, carries as
many as fit in its aim (above) and a quarter of the batch timeout, at most `AUTO_MAX`.
"""

from __future__ import annotations

__all__ = ["AUTO_CALL_SECONDS", "AUTO_CALL_SECONDS_STATEFUL", "AUTO_MAX", "BatchTimer", "batches_per_call",
           "most_per_call"]

AUTO_CALL_SECONDS = 0.2  # auto, stateless: a call's batches together take about this long at most
AUTO_CALL_SECONDS_STATEFUL = 0.05  # auto, stateful (shorter: see the module docstring)
AUTO_MAX = 8  # auto: never more batches per call than this


def batches_per_call(setting: int | str, seconds_per_batch: float | None, timeout: float, *,
                     stateful: bool = False) -> int:
    """Batches the next call may carry.

    >>> batches_per_call(4, None, 600.0), batches_per_call("auto", None, 600.0)
    (4, 1)
    >>> batches_per_call("auto", 0.03, 600.0), batches_per_call("auto", 0.001, 600.0)
    (6, 8)
    >>> batches_per_call("auto", 0.15, 600.0), batches_per_call("auto", 0.002, 0.02)
    (1, 2)
    >>> batches_per_call("auto", 0.018, 600.0), batches_per_call("auto", 0.018, 600.0, stateful=True)
    (8, 2)
    """
    if setting != "auto":
        return int(setting)
    if seconds_per_batch is None:
        return 1
    per = max(seconds_per_batch, 1e-6)
    aim = AUTO_CALL_SECONDS_STATEFUL if stateful else AUTO_CALL_SECONDS
    return max(1, min(AUTO_MAX, int(aim / per), int(timeout / (4 * per))))


def most_per_call(setting: int | str) -> int:
    """The most batches any call may carry under `setting` (sizes read-ahead and back-pressure)."""
    return AUTO_MAX if setting == "auto" else int(setting)


class BatchTimer:
    """A running estimate of the seconds one batch takes on a worker (an exponentially weighted mean).

    >>> t = BatchTimer(); t.seconds is None
    True
    >>> t.add(0.01); t.add(0.02); round(t.seconds, 4)
    0.012
    """

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.seconds: float | None = None

    def add(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds is None else self.seconds + self.weight * (seconds - self.seconds)
