"""What the scheduler decides with: its settings, its constants, and the pure rules it applies.

`Policy` is the plain-data view of `resilient.config.Settings` the scheduler needs; `backoff` is the
retry delay, `failure_signature` what makes two failures "the same error" (fail fast). No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COMMIT_ATTEMPTS",
    "DRAIN_MARGIN_S",
    "INF",
    "PROGRESS_EVERY_S",
    "STOP_MARGIN_S",
    "SPARE_DELAY_S",
    "DeadLetter",
    "Policy",
    "backoff",
    "failure_signature",
]

INF = 1 << 62
SPARE_DELAY_S = 1.0  # the longest a hand-over defers rebuilding the standby it used
PROGRESS_EVERY_S = 1.0  # progress saves, at most this often (and soon after a dead letter)
DRAIN_MARGIN_S = 2.0  # a slot on a draining node is handed over at the latest this long before it goes
STOP_MARGIN_S = 0.3  # a stopping job abandons what is left this long before its stop deadline
COMMIT_ATTEMPTS = 10  # a group whose commit fails (transiently) this many times in a row fails the job

@dataclass(frozen=True)
class DeadLetter:
    """A poison batch: its id, every attempt's error ("attempt 1: ...; attempt 2: ..."), the last user
    traceback, and how many attempts it had."""

    batch_id: int
    error: str
    traceback: str
    attempts: int


@dataclass(frozen=True)
class Policy:
    """The settings the scheduler decides with (`Policy.from_settings`); plain data."""

    slots: int
    stateful: bool
    queue_depth: int = 2
    batches_per_call: int | str = "auto"
    batch_timeout_seconds: float = 600.0
    start_timeout_seconds: float = 600.0
    max_attempts: int = 3
    on_poison: str = "dead-letter"
    start_deaths: int = 20
    fail_fast_after: int = 3
    standby: int = 1
    commit_group_size: int = 256
    commit_interval_seconds: float = 0.1
    backoff_seconds: float = 0.2
    backoff_max_seconds: float = 10.0
    preemptions: int | None = None  # preempted incarnations the job tolerates (None: no limit)

    @classmethod
    def from_settings(cls, settings: Any, slots: int, stateful: bool) -> Policy:
        s = settings
        return cls(
            slots=slots, stateful=stateful, queue_depth=s.queue_depth, batches_per_call=s.batches_per_call,
            batch_timeout_seconds=s.batch_timeout_seconds, start_timeout_seconds=s.start_timeout_seconds,
            max_attempts=s.max_attempts, on_poison=s.on_poison, start_deaths=s.start_deaths,
            fail_fast_after=s.fail_fast_after, standby=s.standby, commit_group_size=s.commit_group_size,
            commit_interval_seconds=s.commit_interval_seconds, backoff_seconds=s.retry_backoff_seconds,
            backoff_max_seconds=s.retry_backoff_max_seconds, preemptions=None if s.preemptions == "unlimited" else s.preemptions,
        )


def backoff(attempt: int, base: float, cap: float, u: float) -> float:
    """Seconds to wait after the `attempt`-th failure: exponential, capped, with "equal jitter" (half
    fixed, half scaled by ``u`` in [0, 1)).

    >>> [round(backoff(n, 0.2, 1.0, 0.0), 2) for n in (1, 2, 3, 4, 5)]
    [0.1, 0.2, 0.4, 0.5, 0.5]
    >>> backoff(1, 0.2, 1.0, 0.999) < 0.2
    True
    """
    delay = min(cap, base * 2 ** min(attempt - 1, 60))
    return delay / 2 + delay / 2 * u


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def failure_signature(error: str, traceback: str) -> tuple[str, str]:
    """What makes two failures "the same error": the exception type and the line that raised it (the
    message may name the batch).

    >>> tb = 'Traceback (most recent call last):\\n  File "p.py", line 9, in f\\nValueError: batch 3'
    >>> failure_signature("ValueError: batch 3", tb) == failure_signature("ValueError: batch 4", tb)
    True
    >>> failure_signature("KeyError: 'x'", "")
    ('KeyError', "KeyError: 'x'")
    """
    kind = error.split(":", 1)[0]
    frames = _FRAME.findall(traceback)
    return (kind, f"{frames[-1][0]}:{frames[-1][1]}") if frames else (kind, error)
