"""Which generations retention and gc may delete: only those that newer, *proven* generations replace.

A generation is proven when the checkpoint a load would return for it verifies completely on at least a
write quorum of replicas: on each of them a manifest that parses, checksums and (with a signing key)
carries a valid signature, beside the piece it names, whose length and checksum match; and the object
itself passes `resilient.storage.examine.object_problem` (the signed SHA-256, then a full decode dry
run); and no epoch claim voids it. Only the newest ``keep`` proven generations count: every generation
older than the oldest of them may go, and nothing else. A generation that does not verify (junk or
forged manifests, rotten or undecodable objects, a symbolic link in its place) never counts toward
``keep``, so it can never push out the checkpoints a load would fall back to.

Proving reads every copy of the newest generations. The automatic retention after each save would then
read ``keep`` whole checkpoints per save; instead a store remembers (`ProofCache`) the generations it
committed itself on a quorum (their bytes came from its own encoder) and those it proved by reading, and
for those it only checks, on every pass, that a quorum of replicas still holds their manifest and lists
their piece. `gc` trusts no memory: it proves by reading, every time.

`plan_retention` and `plan_failed_writes` are the decisions, pure functions over plain data; reading and
deleting are in `resilient.storage.maintenance`.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

__all__ = ["ProofCache", "plan_failed_writes", "plan_retention"]


def plan_retention(generations: Sequence[int], proven: Collection[int], keep: int) -> list[int]:
    """Generations to delete: those older than the ``keep``-th newest proven generation (none while
    fewer than ``keep`` are proven).

    >>> plan_retention([1, 2, 3, 4, 5, 6], proven=[1, 2, 3], keep=3)  # 4-6 do not verify: keep 1-3
    []
    >>> plan_retention([1, 2, 3, 4, 5, 6, 7], proven=[2, 3, 7], keep=3)
    [1]
    >>> plan_retention([1, 2, 3, 4, 5], proven=[1, 2, 3, 4, 5], keep=2)
    [1, 2, 3]
    """
    if keep < 1:
        raise ValueError(f"keep={keep!r} is not accepted: expected an int >= 1")
    newest = sorted(set(proven), reverse=True)[:keep]
    if len(newest) < keep:
        return []
    return sorted(g for g in set(generations) if g < newest[-1])


def plan_failed_writes(
    generations: Sequence[int], with_manifest: Collection[int], proven: Collection[int], doomed: Collection[int]
) -> list[int]:
    """Failed writes to delete: generation directories with no manifest on any replica (every replica
    answered), older than the newest proven generation (a newer one may still be in flight), and not
    already planned for deletion (``doomed``).

    >>> plan_failed_writes([1, 2, 3, 4, 5, 6], with_manifest=[1, 2, 4, 5], proven=[4, 5], doomed=[1, 2])
    [3]
    >>> plan_failed_writes([1, 2, 3], with_manifest=[1], proven=[], doomed=[])
    []
    """
    newest = max(proven, default=0)
    return sorted(g for g in set(generations) if g not in with_manifest and g < newest and g not in doomed)


class ProofCache:
    """Generations this process committed or proved, by ``(key, generation)`` -> checkpoint id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[tuple[str, int], str] = {}

    def record(self, key: str, generation: int, checkpoint_id: str) -> None:
        with self._lock:
            self._ids[(key, generation)] = checkpoint_id

    def get(self, key: str, generation: int) -> str | None:
        with self._lock:
            return self._ids.get((key, generation))

    def forget(self, key: str, generations: Collection[int]) -> None:
        with self._lock:
            for g in generations:
                self._ids.pop((key, g), None)
