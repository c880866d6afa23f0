"""verify and ObjectInfo: what a stored object holds, checked without building any value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from xxhash import xxh3_64_intdigest

from resilient.codec.blocks import inflate_check
from resilient.codec.check import check_tree
from resilient.codec.format import ENCODINGS, read_frame
from resilient.errors import CodecError, CorruptionError

__all__ = ["DtypeStats", "ObjectInfo", "as_bytes_view", "verify"]


def as_bytes_view(data: bytes | bytearray | memoryview, where: str) -> memoryview:
    """``data`` as a flat byte memoryview (no copy)."""
    try:
        view = memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise CodecError(f"{where}: expected contiguous bytes-like data, got {type(data).__name__}") from exc


class DtypeStats(NamedTuple):
    """Bytes of one dtype before and after encoding."""

    raw_bytes: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        """raw / stored (1.0 when empty)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


def _frozen(mapping: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(sorted(mapping.items())))


@dataclass(frozen=True)
class ObjectInfo:
    """What `verify` learned about a stored object.

    Attributes:
        format_version: the object's format version.
        total_bytes: its size.
        n_tensors: torch tensors in the state.
        n_arrays: NumPy arrays in the state.
        n_blocks: data blocks.
        raw_bytes: leaf bytes before encoding.
        stored_bytes: block bytes as stored.
        raw_by_encoding: raw bytes per block encoding ("raw", "zstd", "shuffle+zstd", "pickle").
        stored_by_encoding: stored bytes per block encoding.
        by_dtype: raw and stored bytes per dtype name ("bfloat16", "numpy <f4", "bytes", "bytearray",
            "pickle").
        has_pickle: the object holds pickle segments (decode needs ``allow_pickle=True``).
    """

    format_version: int
    total_bytes: int
    n_tensors: int
    n_arrays: int
    n_blocks: int
    raw_bytes: int
    stored_bytes: int
    raw_by_encoding: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    stored_by_encoding: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    by_dtype: Mapping[str, DtypeStats] = field(default_factory=lambda: _frozen({}))
    has_pickle: bool = False

    @property
    def ratio(self) -> float:
        """raw_bytes / stored_bytes (1.0 when empty)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


def verify(data: bytes | bytearray | memoryview, *, where: str = "<object>", inflate: bool = False) -> ObjectInfo:
    """Check an object's framing, index and every block checksum, without building any value.

    Args:
        data: the whole stored object.
        where: names the object in errors.
        inflate: also decompress every compressed block through a small scratch buffer and check that it
            holds exactly its declared length: a full decode dry run (pickle segments are never loaded).

    Returns:
        Sizes and per-encoding / per-dtype byte counts.

    Raises:
        CorruptionError: any check failed.

    Example:
        >>> from resilient.codec import encode
        >>> blob = b"".join(encode({"ids": bytes(100_000)}))
        >>> verify(blob).stored_by_encoding["zstd"] < 1000
        True
    """
    view = as_bytes_view(data, where)
    frame = read_frame(view, where)
    _, slots = check_tree(frame.tree, frame.blocks, where)
    for i, block in enumerate(frame.blocks):
        if xxh3_64_intdigest(view[block.offset : block.offset + block.stored]) != block.checksum:
            raise CorruptionError(where, f"block {i} (offset {block.offset}): checksum mismatch")
        if inflate:
            inflate_check(view[block.offset : block.offset + block.stored], block, where, i)
    raw_by: dict[str, int] = {}
    stored_by: dict[str, int] = {}
    dtypes: dict[str, tuple[int, int]] = {}
    for slot in slots:
        raw, stored = dtypes.get(slot.label, (0, 0))
        for block in frame.blocks[slot.first : slot.first + slot.count]:
            raw_by[block.encoding] = raw_by.get(block.encoding, 0) + block.raw
            stored_by[block.encoding] = stored_by.get(block.encoding, 0) + block.stored
            raw, stored = raw + block.raw, stored + block.stored
        dtypes[slot.label] = (raw, stored)
    for encoding in ENCODINGS:
        raw_by.setdefault(encoding, 0)
        stored_by.setdefault(encoding, 0)
    return ObjectInfo(
        format_version=frame.version,
        total_bytes=len(view),
        n_tensors=sum(slot.kind == "tensor" for slot in slots),
        n_arrays=sum(slot.kind == "ndarray" for slot in slots),
        n_blocks=len(frame.blocks),
        raw_bytes=sum(b.raw for b in frame.blocks),
        stored_bytes=sum(b.stored for b in frame.blocks),
        raw_by_encoding=_frozen(raw_by),
        stored_by_encoding=_frozen(stored_by),
        by_dtype=_frozen({k: DtypeStats(*v) for k, v in dtypes.items()}),
        has_pickle=any(slot.kind == "pickle" for slot in slots),
    )
