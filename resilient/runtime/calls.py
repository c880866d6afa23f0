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

Why ``"auto"`` aims at calls of about 0.2 s (`AUTO_CALL_SECONDS`) and not shorter: besides Ray's fixed
cost, a call answers only once its outputs are durable, so each call ends waiting for the fsync of its
last output (a millisecond or more, while that core may idle). Measured on 2 cores with 20 ms batches
(`benchmarks/pipeline_overhead.py`): the driver spent about 1.5 ms of CPU per batch with calls of 2
batches (a 0.05 s aim), 1.1 with 4, 0.9 with 8; plain Ray actors, one batch per call, 1.5. What longer
calls cost is latency (a batch's output waits for its call, at most about 0.2 s more) and, after a death,
more batches to retry alone; `AUTO_MAX` bounds both for short batches.

Exceptions need no guessing: the worker runs a call's batches in order and answers each with its result
or its error (a stateful slot stops at the first error, since its state is rolled back).

`batches_per_call` is the decision, a pure function of the setting and the measured seconds per batch:
a fixed setting is taken as it is; ``"auto"`` starts at 1 and, once batches have been timed, carries as
many as fit in `AUTO_CALL_SECONDS` and a quarter of the batch timeout, at most `AUTO_MAX`.
"""

from __future__ import annotations

__all__ = ["AUTO_CALL_SECONDS", "AUTO_MAX", "BatchTimer", "batches_per_call", "most_per_call"]

AUTO_CALL_SECONDS = 0.2  # auto: a call's batches together take about this long at most (see below)
AUTO_MAX = 8  # auto: never more batches per call than this


def batches_per_call(setting: int | str, seconds_per_batch: float | None, timeout: float) -> int:
    """Batches the next call may carry.

    >>> batches_per_call(4, None, 600.0), batches_per_call("auto", None, 600.0)
    (4, 1)
    >>> batches_per_call("auto", 0.03, 600.0), batches_per_call("auto", 0.001, 600.0)
    (6, 8)
    >>> batches_per_call("auto", 0.15, 600.0), batches_per_call("auto", 0.002, 0.02)
    (1, 2)
    """
    if setting != "auto":
        return int(setting)
    if seconds_per_batch is None:
        return 1
    per = max(seconds_per_batch, 1e-6)
    return max(1, min(AUTO_MAX, int(AUTO_CALL_SECONDS / per), int(timeout / (4 * per))))


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
