"""`ReplicaSet`: the replicas of one store, asked together, with deadlines.

Every operation that involves several replicas goes through here: `gather` (one call per replica,
waiting as `resilient.storage.deadlines.wait_more` decides), `hedged` (one good answer from any
replica, asking the next one when the current one is slow) and `probe` (is each replica answering?).
On top of them, what the store, `resilient.storage.examine`, `resilient.storage.maintenance` and
`resilient.storage.claims` ask of all replicas at once: `listdir`, `read` and `delete` of one name,
`list_generations` of a key and `manifest_outcomes` of one generation (validated against ``keyring``).
Each replica is reached through its `resilient.storage.backend.Backend`, whatever its class.
Each replica's calls run in its own threads (`GuardedReplica.submit`), so a replica that hangs never
holds up the others, and a call left behind goes on in the background: its outcome is still recorded
in the replica's health when it ends.

A replica that was left behind is flagged unresponsive (`GuardedReplica.mark_unresponsive`): reported
degraded, never waited for again while enough others answer, sent one call at a time, and cleared by
its next successful call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from resilient.errors import CorruptionError, UnreachableError
from resilient.retry import classify, is_transient
from resilient.storage import layout
from resilient.storage.deadlines import WaitPolicy, decided, read_enough, wait_more
from resilient.storage.manifest import Keyring, Manifest
from resilient.storage.replica import GuardedReplica

__all__ = ["Listings", "Reachability", "ReplicaSet", "describe_unreachable"]

T = TypeVar("T")


@dataclass(frozen=True)
class Reachability:
    """Whether one replica answered a probe: ``detail`` says how it failed when it did not."""

    url: str
    reachable: bool
    detail: str = "reachable"


class Listings(list):
    """Generation numbers listed by each replica (a set per replica, in storage order), and ``errors``:
    the replicas that could not list (by index), so that "not listed" and "not answering" differ."""

    def __init__(self, sets: Sequence[set[int]] = (), errors: dict[int, BaseException] | None = None) -> None:
        super().__init__(sets)
        self.errors: dict[int, BaseException] = dict(errors or {})


class ReplicaSet:
    """The replicas of a store and its write quorum.

    Args:
        replicas: the guarded replicas, in storage order.
        quorum: the write quorum.
        keyring: the signing keys manifests read through this set must be signed with (None: unsigned).
        policy: grace and hedging delays (`WaitPolicy`).
        clock: monotonic seconds (injectable).
    """

    def __init__(
        self,
        replicas: Sequence[GuardedReplica],
        quorum: int,
        *,
        keyring: Keyring | None = None,
        policy: WaitPolicy = WaitPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = list(replicas)
        self.quorum = quorum
        self.keyring = keyring
        self.policy = policy
        self._clock = clock

    def __len__(self) -> int:
        return len(self.replicas)

    def __iter__(self) -> Iterator[GuardedReplica]:
        return iter(self.replicas)

    def __getitem__(self, j: int) -> GuardedReplica:
        return self.replicas[j]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def read_enough(self) -> int:
        """Answers a read of every replica waits for (see `resilient.storage.deadlines.read_enough`)."""
        return read_enough(len(self.replicas), self.quorum)

    def gather(
        self,
        fn: Callable[[GuardedReplica], Any],
        indices: Sequence[int] | None = None,
        *,
        enough: int | None = None,
        what: str = "operation",
        grace_floor: float | None = None,
    ) -> list[Any]:
        """``fn(replica)`` on each replica (all, or those at ``indices``) concurrently; the results in
        order, an exception in place of a result for a call that failed, and `UnreachableError` for one
        left behind (still running: see the module docstring).

        ``enough``: successes the caller needs (default: `read_enough`, at most the replicas asked).
        """
        idx = list(range(len(self.replicas))) if indices is None else list(indices)
        futures = [self.replicas[j].submit(fn) for j in idx]
        return self.settle(futures, idx, enough=enough, what=what, grace_floor=grace_floor)

    def settle(
        self,
        futures: Sequence[Future],
        indices: Sequence[int],
        *,
        enough: int | None = None,
        what: str = "operation",
        grace_floor: float | None = None,
    ) -> list[Any]:
        """Wait for `futures` (one per replica at `indices`) as `gather` does; their outcomes."""
        need = min(len(futures), self.read_enough if enough is None else enough)
        policy = self.policy
        t0 = self._clock()
        t_decided: float | None = None
        while True:
            ok = sum(1 for f in futures if f.done() and f.exception() is None)
            pending = [i for i, f in enumerate(futures) if not f.done()]
            flagged = sum(1 for i in pending if self.replicas[indices[i]].health.unresponsive)
            now = self._clock()
            if t_decided is None and decided(ok=ok, pending=len(pending), enough=need):
                t_decided = now
            cold = any(self.replicas[indices[i]].health.last_success_at is None for i in pending)
            grace = policy.grace(t_decided - t0, cold=cold) if t_decided is not None else 0.0
            if grace_floor is not None:
                grace = max(grace, grace_floor)
            left = wait_more(ok=ok, pending=len(pending), flagged=flagged, enough=need,
                             since_decided=None if t_decided is None else now - t_decided, grace=grace)
            if left is None:
                break
            wait([futures[i] for i in pending], timeout=None if math.isinf(left) else left,
                 return_when=FIRST_COMPLETED)
        out: list[Any] = []
        elapsed = self._clock() - t0
        for f, j in zip(futures, indices):
            if f.done():
                e = f.exception()
                out.append(f.result() if e is None else e)
                continue
            r = self.replicas[j]
            why = f"no answer within {elapsed:.2f} s ({what}) while other replicas answered"
            r.mark_unresponsive(why)
            out.append(UnreachableError(why, url=r.url))
        return out

    def hedged(
        self,
        fn: Callable[[GuardedReplica], T],
        order: Sequence[int],
        *,
        delay: float,
    ) -> tuple[int | None, dict[int, Any]]:
        """One good answer of ``fn`` from the replicas in ``order``: the first is asked alone; the next is
        asked too when no answer came within ``delay`` seconds, or at once when one failed.

        Returns the index of the replica that answered (None if none did) and the outcomes received (the
        answer, and the exception of every replica that failed first). Calls still running are left to
        end in the background.
        """
        futures: dict[int, Future] = {}
        outcomes: dict[int, Any] = {}
        queue = list(order)
        started_at = self._clock()
        while True:
            for j, f in list(futures.items()):
                if f.done() and j not in outcomes:
                    e = f.exception()
                    outcomes[j] = f.result() if e is None else e
                    if e is None:
                        return j, outcomes
            pending = [f for j, f in futures.items() if j not in outcomes]
            if queue and (not pending or self._clock() - started_at >= delay):
                j = queue.pop(0)
                futures[j] = self.replicas[j].submit(fn)
                started_at = self._clock()
                continue
            if not pending:
                return None, outcomes
            timeout = max(0.0, delay - (self._clock() - started_at)) if queue else None
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    # -- one name on every replica

    def listdir(self, rel: str, indices: Sequence[int] | None = None, *,
                generation: int | None = None) -> list[list[str] | BaseException]:
        """The names in directory ``rel`` on each replica (all, or those at ``indices``), or its error."""
        return self.gather(lambda r: r.call(r.backend.listdir, rel, path=rel, generation=generation), indices,
                           what=f"listing {rel}")

    def read(self, rel: str, indices: Sequence[int] | None = None, *,
             generation: int | None = None) -> list[Any]:
        """The bytes of object ``rel`` on each replica (all, or those at ``indices``), or its error."""
        return self.gather(lambda r: r.call(r.backend.read, rel, path=rel, generation=generation), indices,
                           what=f"reading {rel}")

    def delete(self, rel: str, *, recursive: bool = False) -> list[Any]:
        """Delete ``rel`` on every replica (see `Backend.delete`): None, or the error, per replica."""
        return self.gather(lambda r: r.call(r.backend.delete, rel, recursive=recursive, path=rel),
                           what=f"deleting {rel}")

    # -- a key's generations and their manifests

    def list_generations(self, key: str) -> Listings:
        """The generation numbers each replica lists for ``key`` (an empty set, and the error in
        ``errors``, for one that could not list)."""
        out = Listings()
        for j, names in enumerate(self.gather(lambda r: r.call(r.backend.listdir, key, path=key),
                                              what=f"listing {key}")):
            if isinstance(names, BaseException):
                out.append(set())
                out.errors[j] = names
                continue
            out.append({g for g in map(layout.parse_gen_name, names) if g is not None})
        return out

    def manifest_outcomes(self, key: str, g: int, listings: Sequence[set[int]]) -> dict[int, Manifest | Exception]:
        """Read and validate generation ``g``'s manifest on every replica that lists it: the manifest, or
        the error that replica gave (missing, corrupt, meant for another key or generation), by index."""
        rel = f"{layout.gen_dir(key, g)}/{layout.MANIFEST}"
        keyring = self.keyring

        def read(r: GuardedReplica) -> Manifest:
            m = Manifest.from_bytes(
                r.call(r.backend.read, rel, path=rel, generation=g),
                where=f"{r.url}/{rel}", keyring=keyring, key=key, generation=g,
            )
            if m.key != key or m.generation != g:
                raise CorruptionError(f"{r.url}/{rel}", f"manifest is for {m.key!r} generation {m.generation}")
            return m

        holders = [j for j, gs in enumerate(listings) if g in gs]
        answers = self.gather(read, holders, enough=min(len(holders), self.read_enough),
                              what=f"reading manifests of {key} generation {g}")
        return dict(zip(holders, answers))

    def manifests(self, key: str, g: int, listings: Sequence[set[int]]) -> dict[int, Manifest]:
        """The valid manifests of generation ``g``, by replica index."""
        return {j: m for j, m in self.manifest_outcomes(key, g, listings).items() if isinstance(m, Manifest)}

    def probe(self, *, grace_floor: float = 1.0) -> list[Reachability]:
        """Whether each replica answers a listing of its root (`Backend.probe`; a missing root answers too), without
        retries and without waiting for one that does not answer while the others do. One that fails
        to connect or does not answer is flagged unresponsive, so that what follows does not wait on it."""

        def listing(r: GuardedReplica) -> None:
            try:
                r.backend.probe()
            except FileNotFoundError:
                return  # it answered: a root nothing was written to yet
            except Exception as e:  # noqa: BLE001 - the answer, with credentials masked
                raise classify(e, url=r.url) from e

        answers = self.gather(listing, enough=self.read_enough, what="probe", grace_floor=grace_floor)
        out = []
        for r, a in zip(self.replicas, answers):
            if isinstance(a, BaseException):
                out.append(Reachability(r.url, False, describe_unreachable(a)))
                if not isinstance(a, UnreachableError) and is_transient(a):  # refused, reset, timed out
                    r.mark_unresponsive(f"probe: {describe_unreachable(a)}")
            else:
                out.append(Reachability(r.url, True))
        return out


def describe_unreachable(e: BaseException) -> str:
    """One line for a replica that could not be reached."""
    return f"{type(e).__name__}: {e}"
