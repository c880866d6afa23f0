"""Examine one generation across replicas, recover its object, and repair the replicas that lack it.

`examine_generation` reads manifests and pieces and records, per replica, what it found; it returns the
verified object bytes when any combination of good copies yields them. With ``full=False`` (loads) it
stops at the first good copy; with ``full=True`` (verify/scrub) it reads and checks every copy.
`repair_generation` then rewrites what was found missing or bad from the recovered bytes: data first,
manifest last, as in a save.

Objects are read into a `resilient.codec.ObjectBuffer` where the backend can (local and fsspec replicas):
a local read hashes the object while reading it, so the whole-object check against the manifest (length and
xxh3_64) costs no time after the read, and a load then hands the buffer to `resilient.codec.decode`, which
builds raw tensors on it without a copy. The whole-object check is the one kept: it binds the object to
its manifest and lets a load skip a corrupt copy for a good one instead of failing. A buffer that passed it
is marked (`ObjectBuffer.matches`), and decode skips its own per-block checksums on it, so each byte is
hashed once per load and still checked before anything is built from it. Objects that come back as plain
bytes (parity reassembly, other backends) are checked by decode block by block as before.

A checksum only says the object is the one its manifest describes, not that it is a checkpoint.
`examine_checked` therefore hands each recovered object to an ``accept`` check (a load decodes it;
`verify`, `repair` and retention run `object_problem`: the signed SHA-256 when a key is set, then a
full decode dry run). An object that fails rules out its checkpoint id: the generation is examined again
without it, so another replica's manifest (another writer's checkpoint) still gets its turn, and the
refusal is named in `Examination.problems` for every replica that holds it. A manifest that names an
unsafe object, or an impossible geometry, counts as a bad manifest on its replica, like any other.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import xxhash

from resilient import codec
from resilient.codec.buffer import ObjectBuffer
from resilient.errors import CodecError, CorruptionError, UnreachableError
from resilient.retry import is_transient
from resilient.storage import layout
from resilient.storage.erasure import RsStriper, rebuild
from resilient.storage.backend import Backend
from resilient.storage.manifest import Keyring, Manifest, choose_manifest
from resilient.storage.parity import Striper, assemble, placement, reconstruct
from resilient.storage.problems import Problem
from resilient.storage.replicaset import ReplicaSet

__all__ = [
    "DECODE_FAILURES",
    "Examination",
    "examine_checked",
    "examine_generation",
    "object_problem",
    "repair_generation",
    "sha256_problem",
]

log = logging.getLogger("resilient.storage")

#: what decoding a damaged or crafted object can raise (a pickle refusal or a missing device is not one)
DECODE_FAILURES: tuple[type[Exception], ...] = (CorruptionError, ValueError, TypeError, KeyError, IndexError,
                                                OverflowError)


@dataclass
class Examination:
    """What one generation looks like on every replica."""

    key: str
    generation: int
    urls: list[str]
    listed: set[int] = field(default_factory=set)  # replicas whose key directory lists the generation
    manifests: dict[int, Manifest] = field(default_factory=dict)  # valid manifests by replica index
    manifest_errors: dict[int, Problem] = field(default_factory=dict)  # missing/corrupt manifest by replica
    manifest: Manifest | None = None  # the chosen one
    piece_ok: dict[int, int] = field(default_factory=dict)  # replica -> piece index verified there
    piece_errors: dict[int, Problem] = field(default_factory=dict)  # replica -> what was wrong with its piece
    object_bytes: bytes | bytearray | ObjectBuffer | None = None  # verified; a load hands it to decode
    refused: list[Problem] = field(default_factory=list)  # one per copy of each checkpoint refused
    refused_ids: frozenset[str] = frozenset()  # their checkpoint ids

    def problems(self) -> list[Problem]:
        """Every problem found, each naming its replica and object where it has one."""
        out = [self.manifest_errors[j] for j in sorted(self.manifest_errors)]
        out += [self.piece_errors[j] for j in sorted(self.piece_errors)]
        out += self.refused
        whole = {"key": self.key, "generation": self.generation}
        if self.manifest is None and not out:
            out.append(Problem("uncommitted", "no manifest on any replica (an uncommitted write)", **whole))
        elif self.manifest is not None and self.object_bytes is None:
            out.append(Problem("unrecoverable", "no verifying copy could be assembled", **whole))
        elif self.manifest is None and self.refused:
            out.append(Problem("unrecoverable", "no checkpoint of this generation decodes", **whole))
        return out

    def problem(self, j: int, kind: str, detail: str, name: str = "") -> Problem:
        """A problem of replica ``j``'s copy of this generation (``name``: the object, if one)."""
        return Problem(kind, detail, url=self.urls[j], key=self.key, generation=self.generation, name=name)

    def holders(self) -> list[int]:
        """Replicas holding, beside a manifest of the chosen checkpoint, the piece it names, verified."""
        m = self.manifest
        if m is None or self.object_bytes is None:
            return []
        return sorted(j for j, mm in self.manifests.items()
                      if mm.checkpoint_id == m.checkpoint_id and self.piece_ok.get(j) == mm.held)


def examine_generation(
    rs: ReplicaSet,
    key: str,
    g: int,
    listings: Sequence[set[int]],
    *,
    full: bool,
    exclude: frozenset[str] = frozenset(),
) -> Examination:
    """Read generation `g`'s manifests and the pieces of the checkpoint they name (not one in `exclude`)."""
    ex = Examination(key, g, rs.urls)
    ex.listed = {j for j, gs in enumerate(listings) if g in gs}
    unlisted = getattr(listings, "errors", {})
    for j in range(len(rs)):
        if j not in ex.listed:
            kind, detail = _describe(unlisted[j]) if j in unlisted else ("missing", "missing (generation absent)")
            ex.manifest_errors[j] = ex.problem(j, kind, detail, layout.MANIFEST)
    for j, res in rs.manifest_outcomes(key, g, listings).items():
        if isinstance(res, Manifest):
            ex.manifests[j] = res
        else:
            ex.manifest_errors[j] = ex.problem(j, *_describe(res), layout.MANIFEST)
    ex.manifest = choose_manifest(m for m in ex.manifests.values() if m.checkpoint_id not in exclude)
    if ex.manifest is None:
        return ex
    if ex.manifest.mode == "replicate":
        _recover_replicated(rs, ex, full)
    else:
        _recover_parity(rs, ex, full)
    return ex


def examine_checked(
    rs: ReplicaSet,
    key: str,
    g: int,
    listings: Sequence[set[int]],
    *,
    full: bool,
    accept: Callable[[Examination], str | None],
) -> Examination:
    """`examine_generation`, and each recovered object put to ``accept`` (None: accepted, else why not).

    A refused object rules out its checkpoint id and the generation is examined again without it, until
    one is accepted or no checkpoint is left. The result holds the accepted object (or none) and names
    every refusal in `Examination.problems`.
    """
    refused: list[str] = []
    excluded: set[str] = set()
    while True:
        ex = examine_generation(rs, key, g, listings, full=full, exclude=frozenset(excluded))
        if ex.manifest is None or ex.object_bytes is None:
            break
        why = accept(ex)
        if why is None:
            break
        refused.extend(_refusal_lines(ex, why))
        excluded.add(ex.manifest.checkpoint_id)
        log.warning("key %r generation %d: checkpoint %s refused: %s", key, g, ex.manifest.checkpoint_id, why)
    ex.refused = refused
    ex.refused_ids = frozenset(excluded)
    return ex


def _refusal_lines(ex: Examination, why: str) -> list[Problem]:
    m = ex.manifest
    assert m is not None
    lines = [ex.problem(j, "refused", why, m.pieces[i].name) for j, i in sorted(ex.piece_ok.items())]
    return lines or [Problem("refused", f"checkpoint {m.checkpoint_id}: {why}", key=ex.key,
                             generation=ex.generation)]


def object_problem(keyring: Keyring | None, ex: Examination) -> str | None:
    """Why a recovered object is not a checkpoint its manifest vouches for (None when it is): the SHA-256
    bound by a signed manifest when a key is configured, then a full decode dry run (`codec.verify` with
    every compressed block inflated; nothing is built and no pickle is loaded)."""
    m, obj = ex.manifest, ex.object_bytes
    assert m is not None and obj is not None
    unbound = sha256_problem(keyring, obj, m)
    if unbound:
        return unbound
    try:
        codec.verify(obj, where=f"{ex.key} generation {ex.generation}", inflate=True)
    except (CodecError, *DECODE_FAILURES) as e:
        return f"does not decode: {type(e).__name__}: {e}"
    return None


def sha256_problem(keyring: Keyring | None, obj: Any, m: Manifest) -> str | None:
    """Why a verified object is not the one its signed manifest binds (None when it is, or when no key is
    configured: ``keyring`` is None)."""
    if keyring is None:
        return None
    if not m.sha256:  # unreachable: a verified signed manifest always binds one
        return "signed manifest binds no sha256"
    if hashlib.sha256(obj).hexdigest() != m.sha256:
        return "object's sha256 differs from the signed manifest's (a substituted object)"
    return None


def _describe(e: BaseException) -> tuple[str, str]:
    """A replica's failure: its kind (see `resilient.storage.problems.KINDS`) and, in words, "missing",
    "unreachable (...)" for a replica that did not answer or could not be connected to (a transient
    failure), else the error."""
    if isinstance(e, FileNotFoundError) or isinstance(e.__cause__, FileNotFoundError):
        return "missing", "missing"
    if isinstance(e, UnreachableError) or is_transient(e):
        return "unreachable", f"unreachable ({type(e).__name__}: {e})"
    return "corrupt", f"{type(e).__name__}: {e}"


def _describe_piece(e: BaseException) -> tuple[str, str]:
    """`_describe` of a piece's failure; a failed check is named by its reason alone (the problem names
    the object already)."""
    if type(e) is CorruptionError:
        return "corrupt", e.reason
    return _describe(e)


def _read_object(backend: Backend, rel: str) -> bytes | bytearray | ObjectBuffer:
    """An object (or shard), in an `ObjectBuffer` where the backend can read into one."""
    return backend.read(rel, owned=True)


def _check(data: bytes | bytearray | ObjectBuffer, length: int, digest: str) -> str | None:
    if len(data) != length:
        return f"length {len(data)}, manifest says {length}"
    if isinstance(data, ObjectBuffer) and data.xxh3 is not None:  # hashed while it was read
        ok = data.matches(int(digest, 16))
    else:
        ok = xxhash.xxh3_64_hexdigest(data) == digest
    return None if ok else "checksum mismatch"


def _recover_replicated(rs: ReplicaSet, ex: Examination, full: bool) -> None:
    m = ex.manifest
    assert m is not None
    piece = m.pieces[0]
    rel = f"{layout.gen_dir(ex.key, ex.generation)}/{piece.name}"
    agree = [j for j, mm in ex.manifests.items() if mm.checkpoint_id == m.checkpoint_id]
    others = [j for j in sorted(ex.listed) if j not in agree]
    order = sorted(agree, key=lambda j: _preference(rs[j].health)) + others

    def read_piece(r):  # noqa: ANN001
        data = r.call(_read_object, r.backend, rel, path=rel, generation=ex.generation)
        bad = _check(data, piece.length, piece.xxh3)
        if bad:
            raise CorruptionError(f"{r.url}/{rel}", bad)
        return data

    if full:
        outcomes = dict(zip(order, rs.gather(read_piece, order, enough=len(order), what=f"reading {rel}")))
    else:  # one good copy: hedged, the next replica asked when the current one is slow
        _, outcomes = rs.hedged(read_piece, order, delay=rs.policy.hedge_delay(piece.length))
    for j, res in sorted(outcomes.items()):
        if isinstance(res, BaseException):
            ex.piece_errors[j] = ex.problem(j, *_describe_piece(res), piece.name)
        else:
            ex.piece_ok[j] = 0
            if ex.object_bytes is None:
                ex.object_bytes = res


def _preference(h: Any) -> tuple[bool, bool]:
    """Replicas to read from first: responsive, then not degraded."""
    return (h.unresponsive, h.degraded)


def _recover_parity(rs: ReplicaSet, ex: Examination, full: bool) -> None:
    m = ex.manifest
    assert m is not None
    gdir = layout.gen_dir(ex.key, ex.generation)
    prefix = f"{m.checkpoint_id}.s"

    def read_pieces(r):  # noqa: ANN001
        found = {}
        for name in r.call(r.backend.listdir, gdir, path=gdir, generation=ex.generation):
            if name.startswith(prefix) and layout.object_name_ok(name):
                i = int(name[len(prefix) :])
                if i < len(m.pieces):
                    rel = f"{gdir}/{name}"
                    data = r.call(_read_object, r.backend, rel, path=rel, generation=ex.generation)
                    bad = _check(data, m.pieces[i].length, m.pieces[i].xxh3)
                    found[i] = data if bad is None else CorruptionError(f"{r.url}/{rel}", bad)
        return found

    listed = sorted(ex.listed)
    good: dict[int, bytes] = {}
    need = len(listed) if full else min(len(listed), m.k)
    answers = rs.gather(read_pieces, listed, enough=need, what=f"reading shards of {gdir}")
    where = placement(ex.generation, len(rs))

    def expected(j: int) -> str:
        """The shard replica ``j`` should hold: its own manifest says which, else the placement rule."""
        own = ex.manifests.get(j)
        i = own.held if own is not None and own.checkpoint_id == m.checkpoint_id else where[j]
        return m.pieces[i].name if i < len(m.pieces) else ""

    for j, res in zip(listed, answers):
        if isinstance(res, BaseException):
            ex.piece_errors[j] = ex.problem(j, *_describe(res), expected(j))
            continue
        if not res:
            ex.piece_errors[j] = ex.problem(j, "missing", "missing (no shard of this checkpoint)", expected(j))
        for i, data in res.items():
            if isinstance(data, BaseException):
                ex.piece_errors[j] = ex.problem(j, "corrupt", data.reason, m.pieces[i].name)
            else:
                ex.piece_ok[j] = i
                good.setdefault(i, data)
    k = m.k
    missing = [i for i in range(len(m.pieces)) if i not in good]
    if len(missing) > m.m:
        return
    lost_data = [i for i in missing if i < k]
    if lost_data and m.mode == "parity":
        good[lost_data[0]] = reconstruct([good.get(i) for i in range(k + 1)])
    elif lost_data:
        good.update(rebuild([good.get(i) for i in range(len(m.pieces))], k, m.m, m.block, lost_data))
    data = assemble([good[i] for i in range(k)], m.block, m.length)
    if _check(data, m.length, m.xxh3) is None:
        ex.object_bytes = data


def repair_generation(rs: ReplicaSet, ex: Examination) -> list[str]:
    """Rewrite missing or bad copies of a recovered generation; return ``"url/path"`` of each rewrite."""
    m = ex.manifest
    if m is None or ex.object_bytes is None:
        return []
    gdir = layout.gen_dir(ex.key, ex.generation)
    n = len(rs)
    pieces = _pieces_of(ex.object_bytes, m)
    # which piece each replica should hold: its own manifest says so, else fill the gaps in placement order
    holds: dict[int, int] = {j: mm.held for j, mm in ex.manifests.items() if mm.checkpoint_id == m.checkpoint_id}
    if m.mode != "replicate":
        free = [i for i in range(len(m.pieces)) if i not in holds.values()]
        pref = placement(ex.generation, n)
        for j in sorted(range(n), key=lambda j: pref[j]):
            if j not in holds and free:
                want = pref[j] if pref[j] in free else free[0]
                holds[j] = want
                free.remove(want)
    else:
        holds.update({j: 0 for j in range(n) if j not in holds})
    done: list[str] = []
    for j, i in sorted(holds.items()):
        r = rs[j]
        other = ex.manifests.get(j)
        refused = other is not None and other.checkpoint_id in ex.refused_ids
        if other is not None and other.checkpoint_id != m.checkpoint_id and not refused:
            log.warning("%s/%s holds another writer's checkpoint; left for gc", r.url, gdir)
            continue
        altered = other is not None and other.holding(0) != m.holding(0)  # refused, or changed on this replica
        piece_bad = ex.piece_ok.get(j) != i and (j in ex.piece_errors or j not in ex.listed or other is None
                                                 or altered)
        manifest_bad = other is None or altered
        if not (piece_bad or manifest_bad):
            continue
        rel_p = f"{gdir}/{m.pieces[i].name}"
        rel_m = f"{gdir}/{layout.MANIFEST}"
        try:
            if piece_bad:
                r.call(r.backend.write_object, rel_p, [pieces[i]], path=rel_p, generation=ex.generation)
                done.append(f"{r.url}/{rel_p}")
            if manifest_bad:
                body = m.holding(i).to_bytes()
                found = ex.manifest_errors.get(j)
                if other is not None or (found is not None and found.kind != "missing"):
                    r.call(r.backend.overwrite, rel_m, body, path=rel_m, generation=ex.generation)
                else:
                    try:
                        r.call(r.backend.create_exclusive, rel_m, body, path=rel_m, generation=ex.generation)
                    except FileExistsError:
                        continue
                done.append(f"{r.url}/{rel_m}")
        except Exception as e:  # noqa: BLE001 - repair is best effort, the load already succeeded
            log.warning("repair of %s/%s failed: %s: %s", r.url, gdir, type(e).__name__, e)
    if done:
        log.info("repaired %s generation %d: %s", ex.key, ex.generation, done)
    return done


def _pieces_of(obj: bytes | bytearray, m: Manifest) -> list[bytes | bytearray | memoryview]:
    if m.mode == "replicate":
        return [obj]
    s = Striper(k=m.k, block=m.block) if m.mode == "parity" else RsStriper(k=m.k, m=m.m, block=m.block)
    parts: list[list] = [[] for _ in range(len(m.pieces))]
    for stripe in list(s.feed(obj)) + list(s.finish()):
        for i, b in enumerate(stripe):
            parts[i].append(b)
    return [b"".join(bytes(x) for x in p) for p in parts]
