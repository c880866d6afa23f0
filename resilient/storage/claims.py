"""Epoch claims of one key, read lazily: whether a manifest was written by a fenced writer.

A claim (``<key>/epochs/e<epoch>``) records the newest committed generation when it was made. A manifest
whose epoch is older than some claim and whose generation is newer than what that claim saw committed
was written after the claim, by a writer the claim fenced: it is void, whatever it contains.
"""

from __future__ import annotations

import json

from resilient.storage import layout
from resilient.storage.manifest import Manifest
from resilient.storage.replicaset import ReplicaSet

__all__ = ["EpochClaims"]


class EpochClaims:
    """Epoch claims of one key, read lazily: decides whether a manifest was written by a fenced writer.

    A claim records the newest committed generation when it was made. A manifest whose epoch is older
    than some claim and whose generation is newer than what that claim saw committed was written after
    the claim, by a writer the claim fenced: it is void, whatever it contains.
    """

    def __init__(self, replicas: ReplicaSet, key: str) -> None:
        self.replicas, self.key = replicas, key
        self._epochs: list[int] | None = None
        self._floors: dict[int, int | None] = {}

    def voids(self, m: Manifest) -> bool:
        if self._epochs is None:
            names = self.replicas.listdir(f"{self.key}/{layout.EPOCHS_DIR}")
            found = {layout.parse_epoch_name(n) for ns in names if isinstance(ns, list) for n in ns}
            self._epochs = sorted(e for e in found if e is not None)
        later = [e for e in self._epochs if e > m.epoch]
        if not later:
            return False
        floor = self._floor(later[0])
        return floor is not None and m.generation > floor

    def _floor(self, epoch: int) -> int | None:
        if epoch not in self._floors:
            rel = f"{self.key}/{layout.EPOCHS_DIR}/{layout.epoch_name(epoch)}"
            self._floors[epoch] = None
            for body in self.replicas.read(rel):
                try:
                    self._floors[epoch] = int(json.loads(bytes(body))["committed"])
                    break
                except (TypeError, ValueError, KeyError):
                    continue  # unreadable here (missing, older format): try another replica
        return self._floors[epoch]
