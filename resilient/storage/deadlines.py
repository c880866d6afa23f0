"""How long to wait for a replica: the pure decisions behind quorum waits and hedged reads.

No I/O and no clock here: `resilient.storage.replicaset` asks these functions and does the waiting.

Quorum waits
------------
An operation sent to every replica (a listing, the manifests of a generation, an upload, a commit)
needs some number of answers (``enough``: the write quorum for writes; for reads, enough replicas
that any write quorum meets one of them). Once ``enough`` have answered successfully, the others get
a grace period in proportion to how long that took (`WaitPolicy.grace`): a replica that is merely a
little slower still counts, one that does not answer is left behind. Its call goes on in the
background (an upload is then committed there when it ends: a background fill), and the replica is
flagged unresponsive, which `wait_more` never waits for again while enough others answer, until one of
its calls succeeds.

While fewer than ``enough`` have succeeded, every pending replica is waited for (flagged or not): the
operation cannot succeed without it, and the SDK's own timeouts bound that wait (see
`resilient.storage.sdk`). When so many have failed that ``enough`` successes are impossible, the
outcome is known just the same: the others get the same grace, so that the failure names who answered.

Hedged reads
------------
An object needs only one good copy. Replicas are asked one at a time in order of preference (healthy
first); when the current one has not delivered within `WaitPolicy.hedge_delay` of the object's size,
the next one is asked too, and the first good answer wins. A replica that fails is followed by the
next one at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WaitPolicy", "decided", "read_enough", "wait_more"]


@dataclass(frozen=True)
class WaitPolicy:
    """How long stragglers and slow reads are given.

    Attributes:
        grace_factor: a straggler gets this fraction of the time ``enough`` answers took...
        grace_floor: ...but at least this many seconds...
        cold_floor: ...or this many for a replica that has never answered yet (its first call builds
            its client: sessions, credentials, connections)...
        grace_ceiling: ...and at most this many.
        hedge_floor: seconds before a read is hedged, whatever the object's size...
        hedge_rate: ...plus the object's bytes at this many bytes per second (a slow disk's pace).

    Example:
        >>> p = WaitPolicy()
        >>> p.grace(0.01), p.grace(0.01, cold=True), p.grace(3.0), p.grace(600.0)
        (0.5, 2.0, 1.5, 10.0)
        >>> round(p.hedge_delay(0), 3), round(p.hedge_delay(100_000_000), 3)
        (0.2, 1.2)
    """

    grace_factor: float = 0.5
    grace_floor: float = 0.5
    cold_floor: float = 2.0
    grace_ceiling: float = 10.0
    hedge_floor: float = 0.2
    hedge_rate: float = 100e6

    def grace(self, to_decided_s: float, *, cold: bool = False) -> float:
        """Seconds a straggler is waited for once the outcome is known, which took ``to_decided_s``."""
        floor = self.cold_floor if cold else self.grace_floor
        return min(self.grace_ceiling, max(floor, self.grace_factor * to_decided_s))

    def hedge_delay(self, length: int) -> float:
        """Seconds a read of ``length`` bytes runs alone before the next replica is asked too."""
        return self.hedge_floor + max(0, length) / self.hedge_rate


def read_enough(n: int, quorum: int) -> int:
    """Answers a read waits for so that it meets every write quorum: ``n - quorum + 1`` (1 to ``n``).

    >>> read_enough(3, 2), read_enough(3, 3), read_enough(3, 1), read_enough(5, 3)
    (2, 1, 3, 3)
    """
    return max(1, min(n, n - quorum + 1))


def decided(*, ok: int, pending: int, enough: int) -> bool:
    """Whether an operation's outcome is known: ``enough`` successes, or too many failures for them.

    >>> decided(ok=2, pending=1, enough=2), decided(ok=0, pending=1, enough=2), decided(ok=1, pending=1, enough=2)
    (True, True, False)
    """
    return ok >= enough or ok + pending < enough


def wait_more(
    *,
    ok: int,
    pending: int,
    flagged: int,
    enough: int,
    since_decided: float | None,
    grace: float,
) -> float | None:
    """Seconds still worth waiting for pending answers; ``math.inf`` to wait for the next answer,
    None to stop now (pending replicas are then left behind).

    Args:
        ok: successful answers so far.
        pending: replicas that have not answered; flagged: how many of those are flagged unresponsive.
        enough: successful answers the operation needs.
        since_decided: seconds since the outcome became known (`decided`; None while it is not).
        grace: what a straggler is given after that (`WaitPolicy.grace`).

    >>> wait_more(ok=2, pending=0, flagged=0, enough=2, since_decided=0.0, grace=0.1)  # all in
    >>> wait_more(ok=1, pending=2, flagged=1, enough=2, since_decided=None, grace=0.1)
    inf
    >>> wait_more(ok=2, pending=1, flagged=0, enough=2, since_decided=0.04, grace=0.1)
    0.06
    >>> wait_more(ok=2, pending=1, flagged=0, enough=2, since_decided=0.2, grace=0.1)  # left behind
    >>> wait_more(ok=2, pending=1, flagged=1, enough=2, since_decided=0.0, grace=0.1)  # known unresponsive
    >>> wait_more(ok=0, pending=1, flagged=0, enough=3, since_decided=0.0, grace=0.1)  # failed: a grace too
    0.1
    """
    if pending <= 0:
        return None
    if not decided(ok=ok, pending=pending, enough=enough) or since_decided is None:
        return math.inf
    if flagged >= pending:
        return None
    left = grace - since_decided
    return round(left, 9) if left > 0 else None
