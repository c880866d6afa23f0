"""The commit marker of one checkpoint generation on one replica, and the pure choices made from them.

Stored form (``MANIFEST``)::

    b"RSLMANI1" | u32 little-endian JSON length | 8-byte xxh3_64 of the JSON | JSON (utf-8)

The JSON names the checkpoint (key, generation, epoch, a random checkpoint id), the stored object
(length and xxh3_64 of the whole object) and, in parity and rs modes, the stripe geometry (in rs mode,
how many parity shards) and every shard's name, length and checksum plus which shard *this* replica
holds. Any one valid manifest is therefore
enough to check and reassemble the checkpoint from the replicas that hold its pieces.

A manifest is validated completely (types, ranges, names that stay inside their generation directory)
before anything it points to is read; a bad one raises `CorruptionError` or `UnsafeCheckpointError`.

Signed manifests (``RESILIENT_SIGNING_KEY``)
--------------------------------------------
With a signing key configured, every manifest written is signed::

    b"RSLMANS1" | u32 length | 8-byte xxh3_64 of the JSON | JSON | 8-byte key id | 32-byte HMAC-SHA256

The HMAC-SHA256, under the signing key, covers every byte before it (magic, header, JSON, key id): the
manifest's canonical bytes exactly as stored, so nothing is re-encoded to be checked. The key id is the
first 8 bytes of ``sha256(b"resilient-signing-key-id\\0" + key)`` (`resilient.config.signing_key_ids`): it
names the key without revealing it, so a reader tells a rotated key from a forgery. The JSON of a signed
manifest also carries ``sha256``, the SHA-256 of the whole stored object: the signature binds the data
through it (xxh3 detects accidents, not a crafted object), and a load checks it before the object is
decompressed or decoded. Keys are configured as ``new`` or, while rotating, ``new,old,...``: the first
one signs, any one verifies; read-repair re-signs with the first.

A reader with keys configured checks a manifest's signature first, before its checksum, JSON or
anything it names is looked at, and refuses with `SignatureError` (a `CorruptionError`, so a load falls
back to an older generation that verifies):

* an unsigned manifest (``RSLMANI1``: written without a key, or its signature stripped);
* a manifest signed with a key id that is not configured (rotated away, or foreign);
* a manifest whose bytes do not match their HMAC (any field changed after signing).

Every other check follows as for unsigned manifests: the key and generation a manifest records must
be the ones it is read for (a signed manifest copied to another key or generation is refused), and every
piece's length and checksum and the object's SHA-256 must match what the manifest binds (a data
object swapped for another valid one is refused).

A reader without a key reads signed manifests and does not check their signature (it has nothing to
check it with); it logs a warning once per key id. Refusing them would make signing a one-way door: every
maintenance tool and every reader would need the key just to see a checkpoint, while a reader that wants
authenticity only gets it by holding the key anyway. Runtimes ship `Settings` with the key by reference,
so a worker missing the key fails to start rather than reading unchecked.

What signing does not prevent: an attacker who can write the storage can still delete generations
(loads then fall back to an older, genuinely signed one) or write epoch claims; it cannot make a load
return state that a key holder did not save.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import xxhash

from resilient.config import signing_key_ids
from resilient.errors import CorruptionError, SignatureError, UnsafeCheckpointError
from resilient.storage.layout import object_name_ok, validate_key

__all__ = ["MAX_BLOCK", "Keyring", "Manifest", "ShardInfo", "choose_manifest", "geometry_problem", "retention_victims"]

log = logging.getLogger("resilient.storage")

_MAGIC = b"RSLMANI1"
_SIGNED = b"RSLMANS1"
_KEY_ID = 8
_MAC = 32
_HEAD = struct.Struct("<8sI8s")
_unchecked_warned: set[str] = set()
_warn_lock = threading.Lock()


class Keyring:
    """The manifest signing keys of one process: the first signs, every one verifies.

    Built from the ``signing_key`` setting; its repr shows key ids only, and it refuses to pickle
    (ship `resilient.Settings`, which carries keys by reference).

    Example:
        >>> ring = Keyring.from_setting("0123456789abcdef-new,0123456789abcdef-old")
        >>> body = b"manifest bytes"
        >>> kid, mac = ring.sign(body)
        >>> ring.check(kid, body, mac), kid.hex() == ring.ids[0]
        (True, True)
        >>> Keyring.from_setting(None) is None
        True
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self.ids = signing_key_ids(",".join(keys))
        self._keys = {bytes.fromhex(i): k.encode() for i, k in zip(self.ids, keys)}
        self._first = bytes.fromhex(self.ids[0])

    @classmethod
    def from_setting(cls, value: str | None) -> "Keyring | None":
        """The keyring of a ``signing_key`` setting, or None when no key is configured."""
        return cls(value.split(",")) if value else None

    def sign(self, data: bytes) -> tuple[bytes, bytes]:
        """(key id, HMAC-SHA256 of ``data + key id``) under the first key."""
        kid = self._first
        return kid, hmac.digest(self._keys[kid], data + kid, "sha256")

    def knows(self, kid: bytes) -> bool:
        return kid in self._keys

    def check(self, kid: bytes, data: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is the HMAC of ``data + kid`` under the key named ``kid`` (constant time)."""
        key = self._keys.get(kid)
        return key is not None and hmac.compare_digest(hmac.digest(key, data + kid, "sha256"), mac)

    def __repr__(self) -> str:
        return f"Keyring(ids={list(self.ids)})"

    def __reduce__(self) -> tuple:
        raise TypeError("a signing Keyring does not pickle; ship resilient.Settings (keys travel by reference)")
_MAX_JSON = 1 << 20
MAX_BLOCK = 1 << 30  # the largest parity block a manifest may name
FORMAT = 1
MODES = ("replicate", "parity", "rs")


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
    pieces: tuple[ShardInfo, ...]  # replicate: one entry; parity/rs: k data shards then the parity shard(s)
    held: int = 0  # index into `pieces` of the piece stored beside this manifest
    block: int = 0  # parity stripe block size in bytes
    created_at: float = 0.0
    info: dict = field(default_factory=dict, compare=False)
    sha256: str = ""  # of the whole stored object; written (and then required) when signed
    #: signs `to_bytes` when set (the writer's keyring, or the one that verified this manifest)
    signer: Keyring | None = field(default=None, compare=False, repr=False)
    key_id: str = field(default="", compare=False)  # the key id that signed it, as read ("" unsigned)
    parity: int = 0  # rs mode: number of Reed-Solomon parity shards (stored only in that mode)

    @property
    def m(self) -> int:
        """Number of parity shards: 1 in parity mode, `parity` in rs mode, 0 when replicated."""
        return {"replicate": 0, "parity": 1}.get(self.mode, self.parity)

    @property
    def k(self) -> int:
        """Number of data shards (parity and rs modes)."""
        return len(self.pieces) - self.m

    def holding(self, index: int) -> "Manifest":
        """The same manifest as written beside piece `index`."""
        return Manifest(**{**self.__dict__, "held": index})

    def to_bytes(self) -> bytes:
        """The stored form: signed by `signer` when it is set (see the module docstring)."""
        doc = asdict(dataclasses.replace(self, signer=None))
        del doc["signer"], doc["key_id"]
        if not doc["sha256"]:
            del doc["sha256"]  # unsigned manifests stay byte for byte what earlier versions wrote
        if self.mode != "rs":
            del doc["parity"]
        doc["format"] = FORMAT
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if self.signer is None:
            return _HEAD.pack(_MAGIC, len(body), xxhash.xxh3_64_digest(body)) + body
        if not _is_hex(self.sha256, 64):
            raise ValueError("a signed manifest needs the sha256 of its object")
        head = _HEAD.pack(_SIGNED, len(body), xxhash.xxh3_64_digest(body)) + body
        kid, mac = self.signer.sign(head)
        return head + kid + mac

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        where: str,
        keyring: Keyring | None = None,
        key: str | None = None,
        generation: int | None = None,
    ) -> "Manifest":
        """Check the signature (when `keyring` is given), then parse and fully validate a stored manifest.

        Args:
            data: the stored bytes.
            where: the manifest's URL, for errors.
            keyring: the configured signing keys; None reads signed manifests without checking them.
            key, generation: what the manifest is read for, named in signature errors.

        Raises:
            SignatureError: `keyring` is given and the manifest is unsigned, signed by an unknown key, or
                altered.
            CorruptionError, UnsafeCheckpointError: the manifest is damaged or names unsafe objects.
        """
        data = bytes(data)
        if len(data) < _HEAD.size:
            raise CorruptionError(where, f"manifest truncated ({len(data)} bytes)")
        magic = data[:8]
        kid = b""

        def refuse(reason: str, found: bytes = b"") -> SignatureError:
            return SignatureError(where, reason, key=key, generation=generation, key_id=found.hex(),
                                  configured=keyring.ids if keyring else ())

        if magic == _SIGNED:
            if len(data) < _HEAD.size + _KEY_ID + _MAC:
                raise CorruptionError(where, f"signed manifest truncated ({len(data)} bytes)")
            signed, kid, mac = data[: -_KEY_ID - _MAC], data[-_KEY_ID - _MAC : -_MAC], data[-_MAC:]
            if keyring is not None:
                if not keyring.knows(kid):
                    raise refuse(f"manifest signed with key id {kid.hex()}, which is not configured "
                                 "(rotated away or foreign: list the old key after the new one in "
                                 "RESILIENT_SIGNING_KEY to keep reading it)", kid)
                if not keyring.check(kid, signed, mac):
                    raise refuse(f"manifest signature (key id {kid.hex()}) does not match its contents: "
                                 "altered after it was signed; refused", kid)
            else:
                _warn_unchecked(kid.hex(), where)
            data = signed
        elif magic == _MAGIC:
            if keyring is not None:
                raise refuse("manifest is not signed and a signing key is configured: refused (written "
                             "without a key, or its signature was removed)")
        else:
            raise CorruptionError(where, "not a resilient manifest (bad magic)")
        _, n, digest = _HEAD.unpack_from(data)
        body = bytes(data[_HEAD.size :])
        if n > _MAX_JSON or len(body) != n:
            raise CorruptionError(where, f"manifest length {len(body)} does not match header {n}")
        if xxhash.xxh3_64_digest(body) != digest:
            raise CorruptionError(where, "manifest checksum mismatch")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise CorruptionError(where, f"manifest is not JSON: {e}") from None
        m = _validate(doc, where)
        if kid:
            if not m.sha256:
                raise refuse("signed manifest binds no sha256 of its object", kid)
            m = dataclasses.replace(m, signer=keyring, key_id=kid.hex())
        return m


def _warn_unchecked(kid: str, where: str) -> None:
    with _warn_lock:
        if kid in _unchecked_warned:
            return
        _unchecked_warned.add(kid)
    log.warning(
        "%s is signed (key id %s) but no signing key is configured (RESILIENT_SIGNING_KEY): its signature "
        "is not checked; further manifests signed with this key are read without this warning",
        where, kid,
    )


def _is_hex(v: object, n: int) -> bool:
    return isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)


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
        parity = nat(doc.get("parity", 0), "parity") if mode == "rs" else 0
        if mode == "rs" and not (parity >= 1 and len(pieces) - parity >= 2):
            raise bad(f"rs manifest with {len(pieces)} pieces of which {parity} parity")
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
        sha = doc.get("sha256", "")
        if sha != "" and not _is_hex(sha, 64):
            raise bad(f"sha256={sha!r}")
        length, block = nat(doc["length"], "length"), nat(doc.get("block", 0), "block")
        wrong = geometry_problem(mode, length, block, [p.length for p in pieces], parity=parity or 1)
        if wrong:
            raise bad(wrong)
        return Manifest(
            key=key,
            generation=nat(doc["generation"], "generation"),
            epoch=nat(doc["epoch"], "epoch"),
            checkpoint_id=cid,
            mode=mode,
            length=length,
            xxh3=hexdigest(doc["xxh3"], "xxh3"),
            pieces=tuple(pieces),
            held=held,
            block=block,
            created_at=float(created),
            info=info,
            sha256=sha,
            parity=parity,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptionError):
            raise
        raise bad(f"{type(e).__name__}: {e}") from None


def geometry_problem(
    mode: str, length: int, block: int, piece_lengths: Sequence[int], *, parity: int = 1
) -> str | None:
    """Why a manifest's object geometry is impossible (None when it is what a save writes).

    Replicate: one piece as long as the object, no block size. Parity and rs: ``k >= 2`` data shards and
    `parity` parity shards (one for XOR parity), a block size that is a multiple of 8 from 8 bytes to `MAX_BLOCK`, and every shard exactly
    as long as the stripes the object needs (``ceil(length / (k * block)) * block``).

    >>> geometry_problem("parity", 100, 8, [56, 56, 56]) is None
    True
    >>> geometry_problem("parity", 100, 0, [0, 0, 0])
    'parity block size 0: expected a multiple of 8 from 8 to 1073741824'
    >>> geometry_problem("replicate", 10, 0, [11])
    'replicate piece of 11 bytes for an object of 10'
    """
    if mode == "replicate":
        if block:
            return f"replicate manifest with block size {block}"
        if list(piece_lengths) != [length]:
            return f"replicate piece of {piece_lengths[0]} bytes for an object of {length}"
        return None
    k = len(piece_lengths) - parity
    if not (8 <= block <= MAX_BLOCK and block % 8 == 0):
        return f"parity block size {block}: expected a multiple of 8 from 8 to {MAX_BLOCK}"
    if k < 2:
        return f"{mode} manifest with {k} data shards"
    shard = -(-length // (k * block)) * block
    if any(n != shard for n in piece_lengths):
        return f"parity shards of {sorted(set(piece_lengths))} bytes; an object of {length} needs {shard}"
    return None


def choose_manifest(manifests: Iterable[Manifest]) -> Manifest | None:
    """Pick the checkpoint a generation stands for, from the manifests its replicas hold.

    Two writers can only meet on one generation when one of them is stale; the higher epoch is the
    current owner, so it wins. Among equal epochs the checkpoint recorded on more replicas wins (it is
    the one that reached its quorum), then the smaller id, so every reader picks the same one. Votes
    count identical manifests (all but which piece each replica holds): a copy altered on one replica
    does not borrow the votes of the genuine ones.

    >>> choose_manifest([]) is None
    True
    """
    votes: dict[Manifest, list[Manifest]] = {}
    for m in manifests:
        votes.setdefault(m.holding(0), []).append(m)
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
