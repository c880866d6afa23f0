"""`CheckpointStore`: save and load checkpoint generations across redundant replicas.

Commit protocol (one ``save(key, state, epoch=e)``)
---------------------------------------------------
1. Fence. The highest epoch claimed for the key (``claim_epoch``) is read from every replica; a writer
   whose epoch is lower is refused with `FencedError` before it writes anything. The next generation is
   one past the highest generation directory seen on any replica, so generations only ever grow, and a
   number used by a failed write is never reused.
2. Data. The state is encoded once and streamed, in parallel, to every replica under a fresh random
   checkpoint id: the whole object (``replicate``) or one stripe shard (``parity``: k data shards plus
   one XOR parity shard over k+1 replicas, see `parity`; ``rs:K+M``: K data shards plus M Reed-Solomon
   parity shards over K+M replicas, see `erasure`). Each upload is atomic and durable on its own
   (see `replica`). If fewer uploads than the write quorum succeed, the save fails with `QuorumError`
   and no manifest is written: the data objects are orphans for `gc`.
3. Commit. A ``MANIFEST`` is created, create-only, beside each successful upload. It records the
   object's length and checksum and every piece's checksum. The save is committed when at least
   `quorum` manifests were created. A manifest that already exists means another writer took the same
   generation: if that leaves fewer than `quorum`, the save fails with `FencedError`.
4. Retention. Generations older than the newest `keep` *proven* ones (verified completely on a write
   quorum, see `retention`) are deleted, in the background after the save returns (best effort;
   `flush()` waits for it). A generation that does not verify never counts toward `keep`.

Readers ignore anything without a manifest, so a crash at any point leaves the previous generation
readable and nothing half-written visible.

Read protocol (``load(key)``)
----------------------------
Generations are tried newest first. For each, every replica's manifest is read and validated; the
manifest with the highest epoch (then the most copies) names the checkpoint. Its object is read from a
replica that holds it and checked (length and xxh3_64 of the whole object, hashed while it is read;
the codec re-checks every block of anything not covered that way) before anything is deserialized; a bad or missing copy moves on to the next replica (replicate)
or is rebuilt from the other shards (parity: any one lost; rs: any M lost). The object is then decoded; one that does not decode
(or fails its signed SHA-256) rules out its checkpoint, and the generation is examined again for
another replica's checkpoint. A manifest that is damaged, names unsafe objects or an impossible
geometry, and a special file or symbolic link in place of an object, only rule out that replica's copy.
If nothing at that generation verifies, the next older one is tried. After a successful load, replicas found missing, stale or corrupt for that generation are
rewritten from the good copy (read-repair).

Signing (``signing_key`` / ``RESILIENT_SIGNING_KEY``, see `manifest`)
---------------------------------------------------------------------
With a key, a save also hashes the encoded object with SHA-256 while it streams out, and every manifest
it creates carries that digest and an HMAC-SHA256 signature. Every manifest read (loads, `generations`,
`verify`, `repair`, `gc`) checks the signature before the manifest is parsed; one that fails counts as
a corrupt manifest (`SignatureError`), so a load skips its generation and falls back to an older one.
A load also checks the object's SHA-256 against the signed manifest before anything is decompressed or
decoded; a mismatch skips the generation the same way, and nothing is repaired from that object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from resilient import codec
from resilient.config import Settings, redact_url, redundancy_shape
from resilient.errors import FencedError, NoCheckpointError, QuorumError
from resilient.retry import RetryPolicy
from resilient.storage import layout, maintenance
from resilient.storage.claims import EpochClaims
from resilient.storage.examine import DECODE_FAILURES, Examination, examine_checked, repair_generation, \
    sha256_problem
from resilient.storage.erasure import RsStriper
from resilient.storage.fanout import Piece, Tape, produce
from resilient.storage.manifest import Keyring, Manifest, ShardInfo, choose_manifest
from resilient.storage.parity import Striper, placement
from resilient.storage.problems import Problem
from resilient.storage.maintenance import VerifyReport
from resilient.storage.replica import GuardedReplica, ReplicaHealth, open_backend
from resilient.storage.replicaset import ReplicaSet
from resilient.storage.retention import ProofCache

__all__ = ["CheckpointStore", "Commit", "Loaded", "PendingSave"]

log = logging.getLogger("resilient.storage")
PARITY_BLOCK = 1 << 20


@dataclass(frozen=True)
class Commit:
    """A committed save: where it went and what failed on the way."""

    key: str
    generation: int
    epoch: int
    checkpoint_id: str
    length: int
    acked: tuple[str, ...]
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    lagging: tuple[str, ...] = ()  # replicas the save did not wait for: filled in the background, or stale


@dataclass(frozen=True)
class Loaded:
    """A loaded checkpoint with where it came from."""

    state: Any
    key: str
    generation: int
    epoch: int
    checkpoint_id: str
    skipped: tuple[int, ...] = ()  # newer generations that did not verify anywhere
    repaired: tuple[str, ...] = ()  # "url: path" rewritten by read-repair
    length: int = 0  # bytes of the stored object


class CheckpointStore:
    """Checkpoints of many keys over the replicas named by ``settings.storage``.

    Args:
        settings: resolved settings; by default `Settings.from_env()` with `overrides` applied.
        sleep, clock: injectable for tests (backoff sleeps, timestamps).
        **overrides: keyword settings, e.g. ``storage=["/mnt/a", "s3://bucket/ckpt"]``.

    Example:
        >>> import tempfile, torch
        >>> d1, d2, d3 = (tempfile.mkdtemp() for _ in range(3))
        >>> store = CheckpointStore(storage=[d1, d2, d3])
        >>> store.save("demo", {"w": torch.ones(3), "step": 7}).generation
        1
        >>> store.load("demo").state["step"]
        7
        >>> store.close()
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        backends: list | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = Settings.from_env(**overrides)
        elif overrides:
            settings = settings.with_options(**overrides)
        self.settings = settings
        self.clock = clock  # wall-clock seconds: manifest timestamps, the age of temporaries (injectable)
        policy = RetryPolicy.from_settings(settings)
        if backends is None:
            backends = [
                open_backend(url, dict(settings.storage_options_for(url)), redact_url(url)) for url in settings.storage
            ]
        self.replicas = [
            GuardedReplica(b, policy, degraded_after=settings.degraded_after, sleep=sleep, clock=clock)
            for b in backends
        ]
        self.quorum = settings.quorum
        self._keyring = Keyring.from_setting(settings.signing_key)
        # every multi-replica operation, with deadlines; what examine, maintenance and claims are given
        self.set = ReplicaSet(self.replicas, self.quorum, keyring=self._keyring)
        self._shape = redundancy_shape(settings.redundancy)
        self.mode = self._shape[0]  # "replicate", "parity" or "rs" (settings.redundancy gives rs's K+M)
        self._bg = ThreadPoolExecutor(max_workers=4, thread_name_prefix="resilient-save")
        self._gc = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resilient-retention")
        self._retention: list[Future] = []
        self.proofs = ProofCache()  # generations known to verify on a quorum (see `retention`)
        self._owners: dict[str, _Owner] = {}
        self._owners_lock = threading.Lock()

    # ------------------------------------------------------------------ public API

    def save(self, key: str, state: Any, *, epoch: int = 0, generation: int | None = None) -> Commit:
        """Encode `state` and commit it as the next generation of `key`; return once committed.

        Raises:
            FencedError: `epoch` is below the key's highest claimed epoch, or `generation` is not newer
                than every existing one, or another writer took the generation.
            QuorumError: fewer replicas than the write quorum stored it.
        """
        layout.validate_key(key)
        t0 = time.perf_counter()
        claimed = self.current_epoch(key)
        if epoch < claimed:
            raise FencedError(f"epoch {epoch} of key {key!r} is stale: epoch {claimed} was claimed")
        newest = self._newest_dir(key)
        if generation is None:
            generation = newest + 1
        elif generation <= newest:
            raise FencedError(
                f"generation {generation} of key {key!r} is not newer than existing generation {newest}",
                generation=generation,
            )
        commit = self._write(key, state, epoch, generation)
        commit = Commit(**{**commit.__dict__, "seconds": time.perf_counter() - t0})
        with self._owners_lock:  # retention runs off the caller's path; keep only unfinished passes
            self._retention = [f for f in self._retention if not f.done()]
            self._retention.append(self._gc.submit(self._retain, key))
        return commit

    def save_async(self, key: str, state: Any, *, epoch: int = 0, copy: bool = True) -> "PendingSave":
        """Snapshot `state` into reused host buffers and save it in the background.

        Blocks only for the in-memory copy, and, when the key's previous save is still running, until that
        one ends (at most one pending save per key: back-pressure). An earlier save's error that nobody
        collected with `PendingSave.wait` is raised here rather than lost.

        With ``copy=False`` the state is saved as it is, without a snapshot: the caller hands over a
        state nobody changes until the save ends (for instance its own snapshot).
        """
        layout.validate_key(key)
        owner = self._owner(key)
        with owner.lock:
            if owner.pending is not None:
                prev, owner.pending = owner.pending, None
                prev.settle()  # back-pressure; raises an error nobody collected
            snapshot = owner.buffers.take(state) if copy else state
            fut = self._bg.submit(self.save, key, snapshot, epoch=epoch)
            owner.pending = PendingSave(fut)
            return owner.pending

    def flush(self) -> None:
        """Wait for every pending asynchronous save and retention pass; raise the first save error not
        yet collected (retention is best effort and only logs)."""
        for owner in list(self._owners.values()):
            with owner.lock:
                pending, owner.pending = owner.pending, None
            if pending is not None:
                pending.settle()
        with self._owners_lock:
            passes, self._retention = self._retention, []
        for f in passes:
            f.result()

    def load(
        self,
        key: str,
        *,
        generation: int | None = None,
        map_location: Any = None,
        repair: bool = True,
    ) -> Loaded:
        """Load the newest checkpoint of `key` that verifies (or exactly `generation`).

        Raises:
            NoCheckpointError: nothing committed for `key` verifies on any replica.
            UnsafeCheckpointError: the checkpoint needs pickle and it was not allowed.
            CodecError: a tensor's device is not available here (see `resilient.codec.decode`).

        A generation whose checkpoint does not load (a damaged, unsafe or impossible manifest, a special
        file in place of an object, an object that fails its checks or does not decode) is passed over
        for another replica's copy or checkpoint, then for the next older generation.
        """
        layout.validate_key(key)
        listings = self.set.list_generations(key)
        gens = sorted({g for gs in listings for g in gs}, reverse=True)
        if generation is not None:
            gens = [g for g in gens if g == generation]
        skipped: list[int] = []
        problems: list[Problem] = []
        claims = EpochClaims(self.set, key)
        for g in gens:
            decoded: list[Any] = []

            def accept(ex: Examination) -> str | None:
                m = ex.manifest
                assert m is not None
                if claims.voids(m):
                    return f"written by a fenced writer (epoch {m.epoch}) after a newer epoch was claimed"
                bad = sha256_problem(self._keyring, ex.object_bytes, m)
                if bad:
                    return bad
                try:
                    decoded.append(codec.decode(ex.object_bytes, map_location=map_location,
                                                allow_pickle=self.settings.allow_pickle,
                                                where=f"{key} generation {ex.generation}"))
                except DECODE_FAILURES as e:
                    return f"does not decode: {type(e).__name__}: {e}"
                return None

            exam = examine_checked(self.set, key, g, listings, full=False, accept=accept)
            if not decoded:
                if exam.manifest is not None or exam.refused:
                    skipped.append(g)
                problems.extend(exam.problems())
                continue
            m = exam.manifest
            assert m is not None
            repaired: list[str] = []
            if repair:
                repaired = repair_generation(self.set, exam)
            if skipped:
                log.warning("key %r: newest generations %s did not verify; loaded generation %d", key, skipped, g)
            return Loaded(decoded[0], key, g, m.epoch, m.checkpoint_id, tuple(skipped), tuple(repaired), m.length)
        detail = "; ".join(map(str, problems[:20])) or "no generation found on any replica"
        raise NoCheckpointError(f"no committed checkpoint of key {key!r} verifies ({detail})")

    def latest(self, key: str) -> int | None:
        """The newest generation of `key` with a valid manifest (its data is not read), or None."""
        return next(iter(self.generations(key)[::-1]), None)

    def generations(self, key: str) -> list[int]:
        """Generations of `key` with at least one valid manifest, oldest first (data not read)."""
        layout.validate_key(key)
        return self._committed_generations(key, apply_claims=True)

    def _committed_generations(self, key: str, *, apply_claims: bool) -> list[int]:
        listings = self.set.list_generations(key)
        claims = EpochClaims(self.set, key) if apply_claims else None
        out = []
        for g in sorted({g for gs in listings for g in gs}):
            m = choose_manifest(self.set.manifests(key, g, listings).values())
            if m is not None and not (claims and claims.voids(m)):
                out.append(g)
        return out

    def keys(self) -> list[str]:
        """Every key with at least one manifest on any replica."""
        found: set[str] = set()
        answers = self.set.gather(lambda r: r.call(lambda: list(r.backend.manifest_paths())), what="listing keys")
        for r, paths in zip(self.replicas, answers):
            if isinstance(paths, BaseException):
                continue
            for p in paths:
                parts = p.split("/")
                if len(parts) >= 3 and layout.parse_gen_name(parts[-2]) is not None:
                    key = "/".join(parts[:-2])
                    try:
                        found.add(layout.validate_key(key))
                    except ValueError:
                        log.warning("ignoring unexpected path %r on %s", p, r.url)
        return sorted(found)

    def current_epoch(self, key: str) -> int:
        """The highest epoch claimed for `key` on any replica (0 if none)."""
        best = 0
        for names in self.set.listdir(f"{key}/{layout.EPOCHS_DIR}"):
            if isinstance(names, BaseException):
                continue
            for n in names:
                e = layout.parse_epoch_name(n)
                if e is not None and e > best:
                    best = e
        return best

    def claim_epoch(self, key: str) -> int:
        """Claim a new, higher epoch for `key`: writers holding older epochs are refused from now on.

        Returns the new epoch (create-only on a quorum of replicas, so two claimers never share one).
        """
        layout.validate_key(key)
        epoch = self.current_epoch(key) + 1
        committed = max(self._committed_generations(key, apply_claims=False), default=0)
        for _ in range(100):
            rel = f"{key}/{layout.EPOCHS_DIR}/{layout.epoch_name(epoch)}"
            body = json.dumps(
                {"committed": committed, "writer": f"{socket.gethostname()}:{os.getpid()}", "nonce": uuid.uuid4().hex}
            ).encode()

            def create(r: GuardedReplica) -> None:
                try:
                    r.call(r.backend.create_exclusive, rel, body, path=rel)
                except FileExistsError:
                    if r.call(r.backend.read, rel, path=rel) != body:  # not our own retried create
                        raise

            results = self.set.gather(create, enough=self.quorum, what=f"claiming epoch {epoch} of {key}")
            acked = sum(1 for x in results if not isinstance(x, BaseException))
            taken = any(isinstance(x, FileExistsError) for x in results)
            if acked >= self.quorum:
                return epoch
            if not taken:
                failures = {r.url: x for r, x in zip(self.replicas, results) if isinstance(x, BaseException)}
                raise QuorumError(f"claiming epoch {epoch} of {key!r}", acked=acked, required=self.quorum, failures=failures)
            epoch += 1
        raise FencedError(f"could not claim an epoch for key {key!r}: too many concurrent claimers")

    def verify(self, key: str | None = None) -> "VerifyReport":
        """Read and check every manifest and stored piece of every generation (all keys by default)."""
        return maintenance.verify(self, key)

    def repair(self, key: str | None = None) -> list[str]:
        """Rewrite missing or corrupt copies from good ones; return ``url/path`` of each rewrite."""
        return maintenance.repair(self, key)

    def gc(self, key: str | None = None, *, dry_run: bool = True, grace_s: float = 3600.0) -> list[str]:
        """Apply retention and remove orphans (failed writes, losers' pieces, stale temporaries).

        Only reports what it would remove unless ``dry_run=False``.
        """
        return maintenance.collect_garbage(self, key, dry_run=dry_run, grace_s=grace_s)

    def health(self) -> list[ReplicaHealth]:
        """A copy of each replica's health, in storage order."""
        return [ReplicaHealth(**r.health.__dict__) for r in self.replicas]

    def close(self) -> None:
        """Wait for pending saves, then release threads. Pending errors are raised."""
        try:
            self.flush()
        finally:
            self._bg.shutdown(wait=True)
            self._gc.shutdown(wait=True)
            for r in self.replicas:  # calls left behind on an unresponsive replica end by their timeouts
                r.close(wait=not r.health.unresponsive)

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        urls = ", ".join(r.url for r in self.replicas)
        signed = f", signed by key id {self._keyring.ids[0]}" if self._keyring is not None else ""
        return f"CheckpointStore([{urls}], mode={self.settings.redundancy!r}, quorum={self.quorum}{signed})"

    # ------------------------------------------------------------------ internals

    def _owner(self, key: str) -> "_Owner":
        with self._owners_lock:
            if key not in self._owners:
                self._owners[key] = _Owner()
            return self._owners[key]

    def _index(self, replica: GuardedReplica) -> int:
        return next(j for j, r in enumerate(self.replicas) if r is replica)

    def _newest_dir(self, key: str) -> int:
        return max((g for gs in self.set.list_generations(key) for g in gs), default=0)

    def _write(self, key: str, state: Any, epoch: int, generation: int) -> Commit:
        s = self.settings
        n = len(self.replicas)
        cid = uuid.uuid4().hex
        gdir = layout.gen_dir(key, generation)
        if self.mode != "replicate":
            striper: Striper | None = (Striper(k=n - 1, block=PARITY_BLOCK) if self.mode == "parity"
                                       else RsStriper(k=self._shape[1], m=self._shape[2], block=PARITY_BLOCK))
            names = [layout.shard_name(cid, i) for i in range(n)]
            held = placement(generation, n)
        else:
            striper = None
            names = [layout.data_name(cid)]
            held = [0] * n
        pieces = [Piece(Tape()) for _ in names]

        def upload(r: GuardedReplica) -> int:
            j = self._index(r)
            rel = f"{gdir}/{names[held[j]]}"
            return r.call(r.backend.write_object, rel, pieces[held[j]].tape, path=rel, generation=generation)

        uploads = [r.submit(upload) for r in self.replicas]
        _release_when_done(uploads, pieces)  # a straggler replays its tape until its upload ends
        chunks = codec.encode(
            state,
            compression=s.compression,
            level=s.compression_level,
            allow_pickle=s.allow_pickle,
            threads=s.io_threads,
        )
        digest = hashlib.sha256() if self._keyring is not None else None
        if digest is not None:
            chunks = _hashing(chunks, digest)
        try:
            length, whole = produce(chunks, pieces, striper=striper)
        except BaseException:
            for f in uploads:  # the tapes are closed: the uploads end; nothing is committed
                _outcome(f)
            raise
        what = f"{key} generation {generation}"
        results = self.set.settle(uploads, range(n), enough=self.quorum, what=f"upload of {what}")
        failed = {self.replicas[j].url: e for j, e in enumerate(results) if isinstance(e, BaseException)}
        ok = [j for j, e in enumerate(results) if not isinstance(e, BaseException)]
        lagging = [j for j in range(n) if not uploads[j].done()]
        if len(ok) < self.quorum:
            raise QuorumError(
                f"storing generation {generation} of {key!r}",
                acked=len(ok),
                required=self.quorum,
                failures=failed,
                generation=generation,
            )
        manifest = Manifest(
            key=key,
            generation=generation,
            epoch=epoch,
            checkpoint_id=cid,
            mode=self.mode,
            length=length,
            xxh3=whole,
            pieces=tuple(ShardInfo(nm, p.length, p.xxh3) for nm, p in zip(names, pieces)),
            block=PARITY_BLOCK if striper else 0,
            created_at=self.clock(),
            info={"writer": f"{socket.gethostname()}:{os.getpid()}"},
            sha256=digest.hexdigest() if digest is not None else "",
            signer=self._keyring,
            parity=self._shape[2] if self.mode == "rs" else 0,
        )
        rel = f"{gdir}/{layout.MANIFEST}"
        claimed = self.current_epoch(key)  # fenced while uploading? (async saves upload for a while)
        if epoch < claimed:
            raise FencedError(
                f"epoch {epoch} of key {key!r} was fenced by epoch {claimed} during the save", generation=generation
            )

        def commit(r: GuardedReplica) -> None:
            j = self._index(r)
            try:
                r.call(r.backend.create_exclusive, rel, manifest.holding(held[j]).to_bytes(), path=rel, generation=generation)
            except FileExistsError:
                # a retried create whose first attempt landed finds its own manifest: that is an ack
                theirs = Manifest.from_bytes(
                    r.call(r.backend.read, rel, path=rel), where=f"{r.url}/{rel}", keyring=self._keyring,
                    key=key, generation=generation,
                )
                if theirs.checkpoint_id != cid:
                    raise

        commits = [self.replicas[j].submit(commit) for j in ok]
        outcomes = self.set.settle(commits, ok, enough=self.quorum, what=f"commit of {what}")
        acked = [j for j, e in zip(ok, outcomes) if not isinstance(e, BaseException)]
        for j, e in zip(ok, outcomes):
            if isinstance(e, BaseException):
                failed[self.replicas[j].url] = e
        if len(acked) < self.quorum:
            if any(isinstance(e, FileExistsError) for e in outcomes):
                raise FencedError(
                    f"generation {generation} of key {key!r} was committed by another writer",
                    generation=generation,
                )
            raise QuorumError(
                f"committing generation {generation} of {key!r}",
                acked=len(acked),
                required=self.quorum,
                failures=failed,
                generation=generation,
            )
        late = lagging + [j for j, f in zip(ok, commits) if not f.done()]
        if any(not f.done() for f in uploads):  # the caller may change its state once we return
            for p in pieces:
                p.tape.detach()
        for j in late:  # committed without them: fill them in the background, stale until then
            self.replicas[j].note_stale(what, "left behind by the save; filled in the background when it ends")
        for j in range(n):
            if j not in acked and j not in late:
                err = failed.get(self.replicas[j].url)
                self.replicas[j].note_stale(what, f"{type(err).__name__}: {err}" if err else "not written")
        for j in lagging:
            uploads[j].add_done_callback(lambda f, j=j: self._fill(j, f, commit, what))
        for j, f in zip(ok, commits):
            if j in late:
                f.add_done_callback(lambda f, j=j: self._filled(j, f, what))
        if failed:
            log.warning(
                "key %r generation %d committed on %d of %d replicas; not (yet) on: %s",
                key, generation, len(acked), n, {u: f"{type(e).__name__}: {e}" for u, e in failed.items()},
            )
        self.proofs.record(key, generation, cid)  # encoded here, committed on a quorum
        return Commit(
            key=key,
            generation=generation,
            epoch=epoch,
            checkpoint_id=cid,
            length=length,
            acked=tuple(self.replicas[j].url for j in acked),
            failed={u: f"{type(e).__name__}: {e}" for u, e in failed.items()},
            lagging=tuple(self.replicas[j].url for j in late),
        )

    def _fill(self, j: int, upload: Future, commit: Callable[[GuardedReplica], None], what: str) -> None:
        """A straggler's upload ended after its save committed: commit it there too (a background fill)."""
        r = self.replicas[j]
        if upload.exception() is not None:
            log.warning("%s stays stale for %s: its upload failed: %s", r.url, what, upload.exception())
            return
        try:
            fut = r.submit(commit)
        except RuntimeError:  # the store was closed meanwhile: repair fills it
            return
        fut.add_done_callback(lambda f: self._filled(j, f, what))

    def _filled(self, j: int, commit: Future, what: str) -> None:
        r = self.replicas[j]
        if commit.exception() is None:
            r.note_filled(what)
            log.info("%s filled in the background with %s", r.url, what)
        else:
            log.warning("%s stays stale for %s: %s", r.url, what, commit.exception())

    def _retain(self, key: str) -> None:
        try:
            maintenance.apply_retention(self, key)
        except Exception as e:  # noqa: BLE001 - retention is best effort; the save is committed
            log.warning("retention for key %r failed: %s: %s", key, type(e).__name__, e)


def _hashing(chunks: Iterable[Any], digest: Any) -> Iterable[Any]:
    """The chunks unchanged, each one fed to `digest` on its way out."""
    for c in chunks:
        digest.update(c)
        yield c


def _release_when_done(futures: list[Future], pieces: list[Piece]) -> None:
    """Release the pieces' tapes once every one of `futures` (the uploads replaying them) has ended."""
    left = [len(futures)]
    lock = threading.Lock()

    def one(_f: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            for p in pieces:
                p.tape.release()

    for f in futures:
        f.add_done_callback(one)


def _outcome(f: Future) -> Any:
    try:
        return f.result()
    except Exception as e:  # noqa: BLE001
        return e


class _Owner:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers = codec.SnapshotBuffers()
        self.pending: PendingSave | None = None


class PendingSave:
    """An asynchronous save in flight. `wait()` returns its `Commit` or raises its error."""

    def __init__(self, future: Future) -> None:
        self._future = future
        self.collected = False

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Commit:
        try:
            result = self._future.result(timeout)
        except FutureTimeout:
            raise
        except BaseException:
            self.collected = True  # the caller has now seen the save's error
            raise
        self.collected = True
        return result

    def settle(self) -> None:
        """Wait for the save to end; raise its error only if nobody has seen it yet."""
        try:
            self._future.result()
        except BaseException:
            if not self.collected:
                self.collected = True
                raise
        self.collected = True

