"""Keeping replicas honest: verify (scrub), repair, retention and garbage collection.

* `verify` reads every manifest and every stored piece of every generation on every replica, checks
  lengths and checksums, then puts the recovered object through a full decode dry run (and the signed
  SHA-256 when a key is set); it reports each problem with its replica URL and object path. A replica
  that does not answer is probed first and reported unreachable (`VerifyReport.unreachable`), and its
  objects as "unreachable", not "missing"; nothing waits on it (see `resilient.storage.deadlines`).
* `repair` rewrites missing or corrupt copies from a recovered object that passed those same checks
  (or, in parity and rs modes, from the other shards); an object that does not decode is never copied.
* `apply_retention` keeps the newest ``keep`` *proven* generations of a key and deletes older ones
  (see `resilient.storage.retention` for what proven means).
* `collect_garbage` also removes generation directories of failed writes (no manifest on any replica,
  older than the newest proven generation), pieces of losing or failed writers inside proven
  generations, and temporaries older than a grace period. It only plans unless ``dry_run=False``. Epoch
  claims are kept: they are what voids a fenced writer's late commit.

Each key is examined on its own: one that cannot be examined is reported (`VerifyReport.unexamined`, a
log line for repair and gc) and the others go on. What to delete is decided by pure functions
(`resilient.storage.retention`); deleting is at the edge, through replicas that never follow a symbolic
link nor leave their root (`resilient.storage.replica`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from resilient.storage import layout
from resilient.storage.claims import EpochClaims
from resilient.storage.examine import Examination, examine_checked, object_problem, repair_generation
from resilient.storage.problems import Problem
from resilient.storage.retention import plan_failed_writes, plan_retention

if TYPE_CHECKING:
    from resilient.storage.store import CheckpointStore

log = logging.getLogger("resilient.storage")

__all__ = ["VerifyReport", "apply_retention", "collect_garbage", "prove", "repair", "verify"]

T = TypeVar("T")


@dataclass
class VerifyReport:
    """The outcome of `verify`: every generation checked and every problem found (as `Problem` records)."""

    checked: list[tuple[str, int]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unrecoverable: list[tuple[str, int]] = field(default_factory=list)
    unexamined: list[tuple[str, str]] = field(default_factory=list)  # (key, why it could not be examined)
    unreachable: list[tuple[str, str]] = field(default_factory=list)  # (replica url, how it failed to answer)

    @property
    def ok(self) -> bool:
        return not self.problems


def _keys(store: "CheckpointStore", key: str | None) -> list[str]:
    return [layout.validate_key(key)] if key is not None else store.keys()


def _each_key(
    store: "CheckpointStore", key: str | None, what: str, work: Callable[[str], T]
) -> list[tuple[str, T | str]]:
    """``work(k)`` for every key; a key whose work fails is logged and yields ``(k, "why")`` instead."""
    out: list[tuple[str, T | str]] = []
    for k in _keys(store, key):
        try:
            out.append((k, work(k)))
        except Exception as e:  # noqa: BLE001 - one bad key must not stop the others; named in the result
            why = f"{type(e).__name__}: {e}"
            log.error("%s of key %r stopped: %s", what, k, why)
            out.append((k, why))
    return out


def _generations(store: "CheckpointStore", key: str) -> tuple[list[set[int]], list[int]]:
    listings = store.set.list_generations(key)
    return listings, sorted({g for gs in listings for g in gs})


def _checked(store: "CheckpointStore", key: str, g: int, listings: list[set[int]],
             claims: EpochClaims | None = None) -> Examination:
    """Every copy of generation `g` read, and its object put through `object_problem` (and, with
    `claims`, refused when a fenced writer wrote it)."""

    def accept(ex: Examination) -> str | None:
        m = ex.manifest
        assert m is not None
        if claims is not None and claims.voids(m):
            return f"written by a fenced writer (epoch {m.epoch}) after a newer epoch was claimed"
        return object_problem(store.set.keyring, ex)

    return examine_checked(store.set, key, g, listings, full=True, accept=accept)


def verify(store: "CheckpointStore", key: str | None = None) -> VerifyReport:
    report = VerifyReport()
    for probe in store.set.probe():  # first, so that a replica that does not answer is flagged at once
        if not probe.reachable:
            report.unreachable.append((probe.url, probe.detail))
            report.problems.append(Problem("unreachable", f"unreachable ({probe.detail})", url=probe.url))

    def one(k: str) -> list[Examination]:
        listings, gens = _generations(store, k)
        return [_checked(store, k, g, listings) for g in gens]

    for k, result in _each_key(store, key, "verify", one):
        if isinstance(result, str):
            report.unexamined.append((k, result))
            report.problems.append(Problem("unexamined", f"could not be examined: {result}", key=k))
            continue
        for ex in result:
            if ex.manifest is None and not ex.refused:
                continue  # an uncommitted write: gc's business, not a verification failure
            report.checked.append((k, ex.generation))
            report.problems.extend(ex.problems())
            if ex.object_bytes is None:
                report.unrecoverable.append((k, ex.generation))
    return report


def repair(store: "CheckpointStore", key: str | None = None) -> list[str]:
    def one(k: str) -> list[str]:
        listings, gens = _generations(store, k)
        done: list[str] = []
        for g in gens:
            done.extend(repair_generation(store.set, _checked(store, k, g, listings)))
        return done

    return [p for _, result in _each_key(store, key, "repair", one) if not isinstance(result, str) for p in result]


def prove(store: "CheckpointStore", key: str, g: int, listings: list[set[int]], claims: EpochClaims, *,
          trust: bool) -> Examination | None:
    """The examination that proves generation `g` (see `resilient.storage.retention`), or None.

    With ``trust``, a generation this store committed or proved before (its `ProofCache`) is proven by its
    manifests and piece names on a quorum, without reading its data; it is read in full otherwise.
    """
    cid = store.proofs.get(key, g) if trust else None
    if cid is not None and _still_held(store, key, g, listings, claims, cid):
        return Examination(key, g, [r.url for r in store.replicas])
    ex = _checked(store, key, g, listings, claims)
    if ex.manifest is None or len(ex.holders()) < store.quorum:
        return None
    store.proofs.record(key, g, ex.manifest.checkpoint_id)
    return ex


def _still_held(store: "CheckpointStore", key: str, g: int, listings: list[set[int]], claims: EpochClaims,
                cid: str) -> bool:
    """Whether a quorum of replicas still holds a valid manifest of checkpoint `cid` and lists its piece."""
    ours = {j: m for j, m in store.set.manifests(key, g, listings).items() if m.checkpoint_id == cid}
    if len(ours) < store.quorum or claims.voids(next(iter(ours.values()))):
        return False
    gdir = layout.gen_dir(key, g)
    order = sorted(ours)
    answers = store.set.listdir(gdir, order, generation=g)
    held = sum(isinstance(names, list) and ours[j].pieces[ours[j].held].name in names
               for j, names in zip(order, answers))
    return held >= store.quorum


def _proven_newest(store: "CheckpointStore", key: str, listings: list[set[int]], gens: list[int], *,
                   trust: bool) -> dict[int, Examination]:
    """The newest ``keep`` proven generations (fewer if fewer are), newest first, with their proofs."""
    claims = EpochClaims(store.set, key)
    proven: dict[int, Examination] = {}
    for g in sorted(gens, reverse=True):
        ex = prove(store, key, g, listings, claims, trust=trust)
        if ex is not None:
            proven[g] = ex
            if len(proven) == store.settings.keep:
                break
    return proven


def apply_retention(store: "CheckpointStore", key: str, *, dry_run: bool = False) -> list[str]:
    """Delete generations of `key` older than the newest ``keep`` proven ones (trusting the store's
    own commits and earlier proofs for the data, see `prove`)."""
    listings, gens = _generations(store, key)
    proven = _proven_newest(store, key, listings, gens, trust=True)
    victims = plan_retention(gens, proven, store.settings.keep)
    return _delete_generations(store, key, victims, dry_run)


def _delete_generations(store: "CheckpointStore", key: str, gens: list[int], dry_run: bool) -> list[str]:
    removed = []
    for g in sorted(gens):
        rel = layout.gen_dir(key, g)
        outcomes = [None] * len(store.replicas)
        if not dry_run:
            # the manifest goes first: a deletion cut short leaves an uncommitted write (gc's business),
            # never a committed generation with missing data
            manifest = f"{rel}/{layout.MANIFEST}"
            store.set.delete(manifest)
            outcomes = store.set.delete(rel, recursive=True)
        for r, out in zip(store.replicas, outcomes):
            if isinstance(out, BaseException):
                log.warning("could not delete %s/%s: %s: %s", r.url, rel, type(out).__name__, out)
            else:
                removed.append(f"{r.url}/{rel}")
    if not dry_run:
        store.proofs.forget(key, gens)
    return removed


def collect_garbage(
    store: "CheckpointStore", key: str | None = None, *, dry_run: bool = True, grace_s: float = 3600.0
) -> list[str]:
    """Apply retention and remove orphans; return what was (or, with `dry_run`, would be) removed.

    Every generation that counts toward ``keep`` is proven by reading it in full (no trust in memory)."""

    def one(k: str) -> list[str]:
        listings, gens = _generations(store, k)
        proven = _proven_newest(store, k, listings, gens, trust=False)
        victims = plan_retention(gens, proven, store.settings.keep)
        failed = plan_failed_writes(gens, _with_manifest(store, k, gens), proven, victims)
        removed = _delete_generations(store, k, victims + failed, dry_run)
        for g, ex in sorted(proven.items()):
            removed += _delete_losers(store, k, g, ex, dry_run)
        return removed

    removed = [p for _, result in _each_key(store, key, "gc", one) if not isinstance(result, str) for p in result]
    now = store.clock()
    for r in store.replicas:
        try:
            temporaries = list(r.backend.temporaries())
        except Exception as e:  # noqa: BLE001 - the other replicas go on
            log.error("gc: could not list temporaries of %s: %s: %s", r.url, type(e).__name__, e)
            continue
        for rel, mtime in temporaries:
            if now - mtime > grace_s:
                if not dry_run:
                    r.call(r.backend.delete, rel)
                removed.append(f"{r.url}/{rel}")
    return removed


def _with_manifest(store: "CheckpointStore", key: str, gens: list[int]) -> set[int]:
    """Generations that some replica lists a ``MANIFEST`` for, or that a replica could not list (unknown
    counts as committed: never deleted as a failed write)."""
    out = set()
    for g in gens:
        rel = layout.gen_dir(key, g)
        answers = store.set.listdir(rel)
        if any(not isinstance(a, list) or layout.MANIFEST in a for a in answers):
            out.add(g)
    return out


def _delete_losers(store: "CheckpointStore", key: str, g: int, ex: Examination, dry_run: bool) -> list[str]:
    """Objects of other checkpoints inside proven generation `g` (a losing or failed writer's pieces)."""
    m = ex.manifest
    if m is None:  # proven from memory: not examined, nothing to compare with
        return []
    keep_prefix = m.checkpoint_id + "."
    rel = layout.gen_dir(key, g)
    removed = []
    for r, names in zip(store.replicas, store.set.listdir(rel)):
        if not isinstance(names, list):
            continue
        for name in names:
            if not layout.object_name_ok(name) or name.startswith(keep_prefix):
                continue
            if not dry_run:
                r.call(r.backend.delete, f"{rel}/{name}")
            removed.append(f"{r.url}/{rel}/{name}")
    return removed
