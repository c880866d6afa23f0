"""The commit marker of one checkpoint generation on one replica, and the pure choices made from them.

Stored form (``MANIFEST``)::

    b"RSLMANI1" | u32 little-endian JSON length | 8-byte xxh3_64 of the JSON | JSON (utf-8)

The JSON names the checkpoint (key, generation, epoch, a random checkpoint id), the stored object
(length and xxh3_64 of the whole object) and, in parity mode, the stripe geometry and every shard's
name, length and checksum plus which shard *this* replica holds. Any one valid manifest is therefore
enough to check and reassemble the checkpoint from the replicas that hold its pieces.

A manifest is validated completely (types, ranges, names that stay inside their generation directory)
before anything it points to is read; a bad one raises `CorruptionError` or `UnsafeCheckpointError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import xxhash

from resilient.errors import CorruptionError, UnsafeCheckpointError
from resilient.storage.layout import object_name_ok, validate_key

__all__ = ["Manifest", "ShardInfo", "choose_manifest", "retention_victims"]

_MAGIC = b"RSLMANI1"
_HEAD = struct.Struct("<8sI8s")
_MAX_JSON = 1 << 20
FORMAT = 1
MODES = ("replicate", "parity")


@dataclass(frozen=True)
class ShardInfo:
    """One stored piece of a checkpoint: the whole object (replicate) or one shard (parity)."""

    name: str
    length: int
    xxh3: str


@dataclass(frozen=True)
class Manifest:
    """What one replica records when a checkpoint generation commits there."""

    key: str
    generation: int
    epoch: int
    checkpoint_id: str
    mode: str
    length: int  # the whole stored object
    xxh3: str  # of the whole stored object
    pieces: tuple[ShardInfo, ...]  # replicate: one entry; parity: k data shards then the parity shard
    held: int = 0  # index into `pieces` of the piece stored beside this manifest
    block: int = 0  # parity stripe block size in bytes
    created_at: float = 0.0
    info: dict = field(default_factory=dict, compare=False)

    @property
    def k(self) -> int:
        """Number of data shards (parity mode)."""
        return len(self.pieces) - 1

    def holding(self, index: int) -> "Manifest":
        """The same manifest as written beside piece `index`."""
        return Manifest(**{**self.__dict__, "held": index})

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["format"] = FORMAT
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return _HEAD.pack(_MAGIC, len(body), xxhash.xxh3_64_digest(body)) + body

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> "Manifest":
        """Parse and fully validate a stored manifest; raise CorruptionError/UnsafeCheckpointError."""
        if len(data) < _HEAD.size:
            raise CorruptionError(where, f"manifest truncated ({len(data)} bytes)")
        magic, n, digest = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise CorruptionError(where, "not a resilient manifest (bad magic)")
        body = bytes(data[_HEAD.size :])
        if n > _MAX_JSON or len(body) != n:
            raise CorruptionError(where, f"manifest length {len(body)} does not match header {n}")
        if xxhash.xxh3_64_digest(body) != digest:
            raise CorruptionError(where, "manifest checksum mismatch")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise CorruptionError(where, f"manifest is not JSON: {e}") from None
        return _validate(doc, where)


def _validate(doc: object, where: str) -> Manifest:
    def bad(reason: str) -> CorruptionError:
        return CorruptionError(where, f"invalid manifest: {reason}")

    def nat(v: object, what: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{what}={v!r}")
        return v

    def hexdigest(v: object, what: str) -> str:
        if not (isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)):
            raise bad(f"{what}={v!r}")
        return v

    if not isinstance(doc, dict):
        raise bad("not an object")
    if doc.get("format") != FORMAT:
        raise bad(f"format {doc.get('format')!r}; this version of resilient reads format {FORMAT}")
    try:
        key = validate_key(doc["key"])
        raw_pieces = doc["pieces"]
        if not isinstance(raw_pieces, list) or not raw_pieces or len(raw_pieces) > 256:
            raise bad("pieces")
        pieces = []
        for p in raw_pieces:
            if not isinstance(p, dict):
                raise bad("piece")
            if not object_name_ok(p.get("name")):
                raise UnsafeCheckpointError(
                    f"{where}: manifest names object {p.get('name')!r}, which is not a plain object name "
                    "inside its generation directory; refused"
                )
            pieces.append(ShardInfo(p["name"], nat(p["length"], "length"), hexdigest(p["xxh3"], "xxh3")))
        mode = doc["mode"]
        if mode not in MODES:
            raise bad(f"mode={mode!r}")
        if mode == "replicate" and len(pieces) != 1:
            raise bad("replicate manifest with several pieces")
        if mode == "parity" and len(pieces) < 3:
            raise bad("parity manifest with fewer than 3 pieces")
        cid = doc["checkpoint_id"]
        if not (isinstance(cid, str) and len(cid) == 32 and all(c in "0123456789abcdef" for c in cid)):
            raise bad(f"checkpoint_id={cid!r}")
        held = nat(doc["held"], "held")
        if held >= len(pieces):
            raise bad(f"held={held}")
        info = doc.get("info", {})
        created = doc.get("created_at", 0.0)
        if not isinstance(info, dict) or not isinstance(created, (int, float)):
            raise bad("info/created_at")
        return Manifest(
            key=key,
            generation=nat(doc["generation"], "generation"),
            epoch=nat(doc["epoch"], "epoch"),
            checkpoint_id=cid,
            mode=mode,
            length=nat(doc["length"], "length"),
            xxh3=hexdigest(doc["xxh3"], "xxh3"),
            pieces=tuple(pieces),
            held=held,
            block=nat(doc.get("block", 0), "block"),
            created_at=float(created),
            info=info,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptionError):
            raise
        raise bad(f"{type(e).__name__}: {e}") from None


def choose_manifest(manifests: Iterable[Manifest]) -> Manifest | None:
    """Pick the checkpoint a generation stands for, from the manifests its replicas hold.

    Two writers can only meet on one generation when one of them is stale; the higher epoch is the
    current owner, so it wins. Among equal epochs the checkpoint recorded on more replicas wins (it is
    the one that reached its quorum), then the smaller id, so every reader picks the same one.

    >>> choose_manifest([]) is None
    True
    """
    votes: dict[str, list[Manifest]] = {}
    for m in manifests:
        votes.setdefault(m.checkpoint_id, []).append(m)
    if not votes:
        return None
    best = max(votes.values(), key=lambda ms: (ms[0].epoch, len(ms), _neg(ms[0].checkpoint_id)))
    return best[0]


def _neg(s: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in s)


def retention_victims(committed: Sequence[int], keep: int) -> list[int]:
    """Generations to delete so that the newest `keep` committed ones remain.

    >>> retention_victims([1, 2, 3, 5, 8], keep=2)
    [1, 2, 3]
    """
    if keep < 1:
        raise ValueError(f"keep={keep!r} is not accepted: expected an int >= 1")
    ordered = sorted(set(committed))
    return ordered[: max(0, len(ordered) - keep)]
