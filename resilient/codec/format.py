"""The byte layout of one stored checkpoint object, and the checks that guard reading it.

One object is a header, the data blocks, a JSON index and a fixed-size footer. The index and footer come last
so a writer can stream blocks as they are produced and describe them afterwards::

    offset 0                                                                      len(object)
    +----------+---------+---------+-- ... --+---------+----------------+---------------+
    |  header  | block 0 | block 1 |         | block N | index (JSON)   |    footer     |
    | 16 bytes |         |         |         |         | index_length B |   32 bytes    |
    +----------+---------+---------+-- ... --+---------+----------------+---------------+

    header (16 bytes, little-endian)        footer (32 bytes, little-endian)
    +0   8s  magic  b"\\x89RESCK\\r\\n"        +0   u64  index_length
    +8   u16 format version (2)              +8   u64  xxh3_64 of the index bytes
    +10  u16 flags (0)                       +16  u16  format version (equals the header's)
    +12  u32 reserved (0)                    +18  u16  flags (0)
                                             +20  u32  reserved (0)
                                             +24  8s   magic (equals the header's)

Blocks fill the space between header and index in index order. In version 2 each block starts at the first
multiple of `ALIGN` (64) at or after the end of the one before it (of the header, for block 0), and the gap
bytes are zero, so a reader that holds the object at an aligned address can use raw blocks in place, as
tensors, with no copy (every element type is at most 64 bytes). Version 1 (still read) has no gaps: each
block starts where the one before it ends. Each block is one of these encodings of a slice of one leaf's
bytes (a tensor's contiguous little-endian elements, a bytes value, or a pickle payload):

    raw            the bytes as they are (stored length == raw length)
    zstd           one zstd frame that declares its content size
    shuffle+zstd   the bytes regrouped by position within an element (byte 0 of every element, then
                   byte 1 of every element...), then one zstd frame (short byte planes end in block
                   flushes, so no zstd block mixes two planes); the element size comes from the leaf
    pickle         raw bytes of a pickle payload; never read unless the reader passes allow_pickle=True

The index is ASCII JSON (no floats, no NaN)::

    {"version": 2, "writer": "resilient 0.1.0",
     "tree": <node>,
     "blocks": [[offset, stored_length, raw_length, encoding, "xxh3_64 of the stored bytes, 16 hex"], ...]}

A node is an object whose ``"t"`` names its type; leaves that hold bytes name their blocks as
``"b": [first_block, block_count]``. Leaves are visited depth first (dict values in order), and their block
ranges are consecutive, so every block belongs to exactly one leaf::

    {"t": "none"}                          {"t": "bool", "v": true}
    {"t": "int", "v": 7 | "-0x1f..."}      ints outside int64 are hex strings (exact, any size)
    {"t": "float", "v": "0x1.8p+1"}        float.hex; "inf", "-inf"; NaN as "nan" plus "bits": 16 hex
    {"t": "str", "v": "..."}
    {"t": "bytes" | "bytearray" | "pickle", "n": length, "b": [first, count]}
    {"t": "tensor", "dtype": "bfloat16", "shape": [2, 3], "device": "cuda:0", "b": [first, count]}
    {"t": "ndarray", "dtype": "<f4", "shape": [2, 3], "b": [first, count]}
    {"t": "npscalar", "dtype": "<f4", "v": "0000803f"}          the value's bytes, hex
    {"t": "list" | "tuple", "v": [node, ...]}
    {"t": "dict" | "odict", "k": [key node, ...], "v": [node, ...]}   keys: none, bool, int, float, str

Readers check, in order, before touching any block: size, header magic, version (a newer one is refused
naming both versions), footer magic and fields, index length and checksum, JSON, the block table (types,
tiling, lengths, encodings), the gaps (all zero), and the whole tree (node types, dtypes from the
allow-lists, shapes consistent with raw lengths, block ranges). Only then are blocks read, each checked
against its xxh3_64 before it is used or decompressed into exactly its declared raw length (or, all at
once, by an xxh3_64 of the whole object recorded outside it, as a checkpoint manifest does). Any failure
is a ``CorruptionError``.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, NamedTuple

import xxhash

from resilient import __version__
from resilient.errors import CorruptionError

__all__ = [
    "ALIGN",
    "Block",
    "ENCODINGS",
    "FOOTER",
    "FORMAT_VERSION",
    "Frame",
    "HEADER",
    "MAGIC",
    "MAX_BLOCK_BYTES",
    "MAX_INDEX_BYTES",
    "block_start",
    "dump_index",
    "footer",
    "header",
    "read_frame",
]

MAGIC = b"\x89RESCK\r\n"
FORMAT_VERSION = 2
ALIGN = 64
"""In format version 2, where blocks start: at multiples of this many bytes from the object's start."""
HEADER = struct.Struct("<8sHHI")
FOOTER = struct.Struct("<QQHHI8s")
ENCODINGS = ("raw", "zstd", "shuffle+zstd", "pickle")
MAX_INDEX_BYTES = 256 << 20
"""Largest index a reader accepts (a state with millions of leaves stays far below it)."""
MAX_BLOCK_BYTES = 1 << 30
"""Largest raw length of one block (writers split leaves into blocks of at most ``block_size``)."""


_HEX16 = re.compile(r"[0-9a-f]{16}")


class Block(NamedTuple):
    """One entry of the block table."""

    offset: int
    stored: int
    raw: int
    encoding: str
    checksum: int


class Frame(NamedTuple):
    """What the framing checks yield: the version, the JSON tree (not yet validated) and the block table."""

    version: int
    tree: Any
    blocks: list[Block]


def block_start(end: int, version: int = FORMAT_VERSION) -> int:
    """Where a block starts when the previous one (or the header) ends at ``end``."""
    return end if version < 2 else -(-end // ALIGN) * ALIGN


def header() -> bytes:
    """The 16 header bytes of an object in the current format."""
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0)


def dump_index(tree: Any, blocks: list[Block]) -> bytes:
    """Serialize the index (compact ASCII JSON)."""
    table = [[b.offset, b.stored, b.raw, b.encoding, f"{b.checksum:016x}"] for b in blocks]
    doc = {"version": FORMAT_VERSION, "writer": f"resilient {__version__}", "tree": tree, "blocks": table}
    return json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def footer(index: bytes) -> bytes:
    """The 32 footer bytes that close an object whose index is ``index``."""
    return FOOTER.pack(len(index), xxhash.xxh3_64_intdigest(index), FORMAT_VERSION, 0, 0, MAGIC)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed in an index")


def _reject_float(text: str) -> Any:
    raise ValueError(f"JSON float {text[:20]} is not allowed in an index")


def read_frame(data: memoryview, where: str) -> Frame:
    """Check the framing of ``data`` and parse its index and block table.

    Args:
        data: the whole object, as a byte memoryview.
        where: names the object in errors.

    Returns:
        The format version, the JSON tree (validated later by `resilient.codec.check`) and the block table.

    Raises:
        CorruptionError: any framing, checksum, JSON or block-table check failed.
    """
    size = len(data)
    if size < HEADER.size + FOOTER.size:
        raise CorruptionError(where, f"truncated: {size} bytes is shorter than an empty object")
    magic, version, flags, reserved = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptionError(where, f"not a resilient checkpoint object (magic {bytes(magic)!r})")
    if version > FORMAT_VERSION:
        raise CorruptionError(
            where,
            f"written in format version {version}; this resilient {__version__} reads versions up to "
            f"{FORMAT_VERSION} (upgrade resilient to read it)",
        )
    if version < 1 or flags or reserved:
        raise CorruptionError(where, f"bad header fields (version {version}, flags {flags}, reserved {reserved})")
    index_len, index_sum, f_version, f_flags, f_reserved, f_magic = FOOTER.unpack_from(data, size - FOOTER.size)
    if f_magic != MAGIC:
        raise CorruptionError(where, "footer magic missing: the object is truncated or its end is damaged")
    if f_version != version or f_flags or f_reserved:
        raise CorruptionError(where, f"footer fields disagree with the header (version {f_version} != {version})")
    index_start = size - FOOTER.size - index_len
    if index_len > MAX_INDEX_BYTES or index_start < HEADER.size:
        raise CorruptionError(where, f"index length {index_len} does not fit in a {size}-byte object")
    index = data[index_start : size - FOOTER.size]
    if xxhash.xxh3_64_intdigest(index) != index_sum:
        raise CorruptionError(where, "index checksum mismatch")
    try:
        doc = json.loads(
            bytes(index).decode("ascii"), parse_constant=_reject_constant, parse_float=_reject_float
        )
    except (ValueError, RecursionError) as exc:
        raise CorruptionError(where, f"index is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"version", "writer", "tree", "blocks"}:
        raise CorruptionError(where, "index is not an object with keys version, writer, tree, blocks")
    if doc["version"] != version or type(doc["version"]) is not int:
        raise CorruptionError(where, f"index version {doc['version']!r} != frame version {version}")
    blocks = _read_blocks(doc["blocks"], index_start, version, where)
    _check_gaps(data, blocks, where)
    return Frame(version, doc["tree"], blocks)


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _read_blocks(table: Any, end: int, version: int, where: str) -> list[Block]:
    if not isinstance(table, list):
        raise CorruptionError(where, "block table is not a list")
    blocks = []
    offset = HEADER.size
    for i, entry in enumerate(table):
        offset = block_start(offset, version)
        if not (isinstance(entry, list) and len(entry) == 5):
            raise CorruptionError(where, f"block {i}: entry is not a 5-item list")
        b_offset, stored, raw, encoding, checksum = entry
        if not (_is_int(b_offset, 0, end) and _is_int(stored, 1, end) and _is_int(raw, 1, MAX_BLOCK_BYTES)):
            raise CorruptionError(where, f"block {i}: offset/lengths {entry[:3]!r} out of range")
        if b_offset != offset or b_offset + stored > end:
            raise CorruptionError(
                where, f"block {i}: at offset {b_offset} (+{stored}), expected {offset} and to end by {end}"
            )
        if encoding not in ENCODINGS:
            raise CorruptionError(where, f"block {i}: unknown encoding {encoding!r}")
        if encoding in ("raw", "pickle") and stored != raw:
            raise CorruptionError(where, f"block {i}: {encoding} block with stored {stored} != raw {raw}")
        if not (isinstance(checksum, str) and _HEX16.fullmatch(checksum)):
            raise CorruptionError(where, f"block {i}: checksum {checksum!r} is not 16 hex digits")
        blocks.append(Block(b_offset, stored, raw, encoding, int(checksum, 16)))
        offset += stored
    if offset != end:
        raise CorruptionError(where, f"blocks end at {offset} but the index starts at {end}")
    return blocks


def _check_gaps(data: memoryview, blocks: list[Block], where: str) -> None:
    """Every byte outside the header, blocks, index and footer (version 2 alignment gaps) must be zero."""
    end = HEADER.size
    for i, block in enumerate(blocks):
        if block.offset != end and data[end : block.offset].tobytes().count(0) != block.offset - end:
            raise CorruptionError(where, f"block {i}: the {block.offset - end} gap bytes before it are not zero")
        end = block.offset + block.stored
