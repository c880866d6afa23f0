"""Keeping replicas honest: verify (scrub), repair, retention and garbage collection.

* `verify` reads every manifest and every stored piece of every retained generation on every replica,
  checks lengths and checksums, and reports each problem with its replica URL and object path.
* `repair` rewrites missing or corrupt copies from a good one (or, in parity mode, from the others).
* `apply_retention` keeps the newest ``keep`` committed generations of a key and deletes older ones.
* `collect_garbage` also removes generation directories of failed writes (no manifest anywhere, older
  than the newest commit), pieces of losing or failed writers inside committed generations, and
  temporaries older than a grace period. It only plans unless ``dry_run=False``. Epoch claims are kept:
  they are what voids a fenced writer's late commit.

What to delete is decided by pure functions over listings (`plan_generation_gc`); deleting is at the
edge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from resilient.storage import layout
from resilient.storage.examine import examine_generation, repair_generation
from resilient.storage.manifest import retention_victims

if TYPE_CHECKING:
    from resilient.storage.store import CheckpointStore

log = logging.getLogger("resilient.storage")

__all__ = ["VerifyReport", "apply_retention", "collect_garbage", "plan_generation_gc", "repair", "verify"]


@dataclass
class VerifyReport:
    """The outcome of `verify`: every generation checked and every problem found."""

    checked: list[tuple[str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unrecoverable: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _keys(store: "CheckpointStore", key: str | None) -> list[str]:
    return [layout.validate_key(key)] if key is not None else store.keys()


def verify(store: "CheckpointStore", key: str | None = None) -> VerifyReport:
    report = VerifyReport()
    for k in _keys(store, key):
        listings = store._list_generations(k)
        for g in sorted({g for gs in listings for g in gs}):
            ex = examine_generation(store, k, g, listings, full=True)
            if ex.manifest is None:
                continue  # an uncommitted write: gc's business, not a verification failure
            report.checked.append((k, g))
            report.problems.extend(ex.problems())
            if ex.object_bytes is None:
                report.unrecoverable.append((k, g))
    return report


def repair(store: "CheckpointStore", key: str | None = None) -> list[str]:
    done: list[str] = []
    for k in _keys(store, key):
        listings = store._list_generations(k)
        for g in sorted({g for gs in listings for g in gs}):
            ex = examine_generation(store, k, g, listings, full=True)
            done.extend(repair_generation(store, ex))
    return done


def plan_generation_gc(
    generations: Sequence[int], committed: Sequence[int], keep: int
) -> tuple[list[int], list[int]]:
    """Split a key's generation directories into (superseded commits, failed writes) to delete.

    Failed writes are directories with no manifest anywhere that are older than the newest commit
    (a newer one may still be in flight).

    >>> plan_generation_gc([1, 2, 3, 4, 5, 6], committed=[1, 2, 4, 5], keep=2)
    ([1, 2], [3])
    """
    victims = retention_victims(committed, keep)
    newest = max(committed, default=0)
    failed = [g for g in generations if g not in committed and g < newest and g not in victims]
    return victims, sorted(failed)


def _committed(store: "CheckpointStore", key: str, gens: list[int]) -> list[int]:
    def has_manifest(g: int) -> bool:
        rel = layout.gen_dir(key, g)
        return any(
            isinstance(names, list) and layout.MANIFEST in names
            for names in store._parallel(lambda r: r.call(r.backend.listdir, rel, path=rel))
        )

    return [g for g in gens if has_manifest(g)]


def apply_retention(store: "CheckpointStore", key: str, *, dry_run: bool = False) -> list[str]:
    """Delete generations of `key` older than the newest ``keep`` committed ones."""
    keep = store.settings.keep
    gens = sorted({g for gs in store._list_generations(key) for g in gs}, reverse=True)
    committed: list[int] = []
    for g in gens:  # newest first: stop listing once `keep` commits are found
        if _committed(store, key, [g]):
            committed.append(g)
        if len(committed) == keep:
            break
    if len(committed) < keep:
        return []
    oldest_kept = committed[-1]
    victims = [g for g in gens if g < oldest_kept]
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
            store._parallel(lambda r: r.call(r.backend.delete, manifest, path=manifest))
            outcomes = store._parallel(lambda r: r.call(r.backend.delete, rel, recursive=True, path=rel))
        for r, out in zip(store.replicas, outcomes):
            if isinstance(out, BaseException):
                log.warning("could not delete %s/%s: %s: %s", r.url, rel, type(out).__name__, out)
            else:
                removed.append(f"{r.url}/{rel}")
    return removed


def collect_garbage(
    store: "CheckpointStore", key: str | None = None, *, dry_run: bool = True, grace_s: float = 3600.0
) -> list[str]:
    """Apply retention and remove orphans; return what was (or, with `dry_run`, would be) removed."""
    removed: list[str] = []
    for k in _keys(store, key):
        listings = store._list_generations(k)
        gens = sorted({g for gs in listings for g in gs})
        committed = _committed(store, k, gens)
        victims, failed = plan_generation_gc(gens, committed, store.settings.keep)
        removed += _delete_generations(store, k, victims + failed, dry_run)
        for g in committed:
            if g in victims:
                continue
            ex = examine_generation(store, k, g, listings, full=False)
            if ex.manifest is None:
                continue
            keep_prefix = ex.manifest.checkpoint_id + "."
            rel = layout.gen_dir(k, g)
            for r, names in zip(store.replicas, store._parallel(lambda r: r.call(r.backend.listdir, rel))):
                if not isinstance(names, list):
                    continue
                for name in names:
                    if name == layout.MANIFEST or name.startswith(keep_prefix) or name.startswith(layout.TMP_PREFIX):
                        continue
                    if not dry_run:
                        r.call(r.backend.delete, f"{rel}/{name}")
                    removed.append(f"{r.url}/{rel}/{name}")
    now = store._clock()
    for r in store.replicas:
        for rel, mtime in r.backend.temporaries():
            if now - mtime > grace_s:
                if not dry_run:
                    r.call(r.backend.delete, rel)
                removed.append(f"{r.url}/{rel}")
    return removed
