"""encode and decode: a state <-> one self-describing stored object (layout: `resilient.codec.format`)."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import numpy as np
import torch

from resilient.codec.blocks import DEFER, decode_block, encode_block, ordered_map, plan_leaf
from resilient.codec.buffer import HUGE_PAGE, ObjectBuffer, fresh_array
from resilient.codec.check import Slot, build, check_tree
from resilient.codec.format import HEADER, MAX_BLOCK_BYTES, Block, block_start, dump_index, footer, header, read_frame
from resilient.codec.info import as_bytes_view
from resilient.codec.tree import Leaf, block_step, flatten, leaf_bytes
from resilient.errors import CodecError, ConfigError, CorruptionError, UnsafeCheckpointError

__all__ = ["MapLocation", "decode", "encode"]

MapLocation = Union[None, str, torch.device, Mapping[str, Union[str, torch.device]], Callable[[str], Any]]
"""Where decoded tensors go: None (where they were saved), one device, {saved: target}, or a callable."""

COMPRESSIONS = ("auto", "zstd", "off")
_COALESCE_BELOW = 16 << 10
_COALESCE_TO = 1 << 20


def _check_host() -> None:
    if sys.byteorder != "little":
        raise CodecError("the checkpoint format stores tensors little-endian; this host is big-endian")


def _check_options(compression: str, level: int, threads: int, block_size: int) -> None:
    _check_host()
    if compression not in COMPRESSIONS:
        raise ConfigError("compression", compression, 'one of "auto", "zstd", "off"')
    if type(level) is not int or not -7 <= level <= 22:
        raise ConfigError("level", level, "an int from -7 (fastest) to 22 (smallest)")
    if type(threads) is not int or not 1 <= threads <= 256:
        raise ConfigError("threads", threads, "an int from 1 to 256")
    if type(block_size) is not int or not 1024 <= block_size <= MAX_BLOCK_BYTES:
        raise ConfigError("block_size", block_size, f"an int from 1024 to {MAX_BLOCK_BYTES} bytes")


def encode(
    state: Any,
    *,
    compression: str = "auto",
    level: int = 1,
    allow_pickle: bool = False,
    threads: int = 2,
    block_size: int = 4 << 20,
) -> Iterator[bytes | memoryview]:
    """Encode ``state`` as one stored object, streamed as chunks to write in order.

    A generator: nothing runs until the first chunk is requested. Then options and the whole state's types
    are checked (and ``allow_pickle`` values pickled) before the first chunk is produced, so an unsupported
    value raises before any byte exists. Chunks of raw blocks are zero-copy memoryviews of the tensors'
    memory: write each chunk before the next is requested, and do not change the state's tensors until the
    iterator is exhausted. Memory stays bounded: at most ``2 * threads`` batches of blocks (one large block,
    or about 1 MiB of small ones, each) are in flight.

    Args:
        state: nested dict / OrderedDict / list / tuple of torch.Tensor (any dtype but quantized, any
            device), numpy.ndarray and scalars (numeric and bool), DeviceTensor, int, float, bool, None,
            str, bytes, bytearray. Dict keys: str, int, float, bool, None.
        compression: "auto" (compress a leaf only when a sample shows it saves >= 20%), "zstd" (always),
            "off".
        level: zstd level, -7 (fastest) to 22.
        allow_pickle: pickle values of other types into "pickle" segments instead of raising.
        threads: compression threads.
        block_size: largest block in bytes; larger leaves are split and compressed in parallel.

    Yields:
        The object's bytes in order; ``b"".join(chunks)`` is the whole object.

    Raises:
        UnsupportedTypeError: a value of another type, and ``allow_pickle`` is false.
        ConfigError: a bad option.
        CodecError: nesting deeper than 100 levels, or a value that cannot be pickled.

    Example:
        >>> import torch
        >>> blob = b"".join(encode({"w": torch.ones(3)}))
        >>> decode(blob)["w"].sum().item()
        3.0
    """
    _check_options(compression, level, threads, block_size)
    tree, leaves = flatten(state, allow_pickle=allow_pickle, block_size=block_size)
    yield from _coalesce(_stream(tree, leaves, compression, level, threads, block_size))


def _tasks(leaves: list[Leaf], mode: str, level: int, block_size: int) -> Iterator[tuple[Any, ...]]:
    for leaf in leaves:
        data = leaf_bytes(leaf)
        if leaf.kind == "pickle":
            plan = "pickle"
        elif len(leaf.spans) == 1:
            plan = DEFER
        else:
            plan = plan_leaf(data, leaf.itemsize, mode, level, block_step(leaf.itemsize, block_size))
        for start, stop in leaf.spans:
            yield data[start:stop], leaf.itemsize, plan, mode, level


def _stream(tree: Any, leaves: list[Leaf], mode: str, level: int, threads: int,
            block_size: int) -> Iterator[bytes | memoryview]:
    yield header()
    blocks: list[Block] = []
    offset = HEADER.size
    tasks = _tasks(leaves, mode, level, block_size)
    for encoded in ordered_map(encode_block, tasks, threads, size_of=lambda task: task[0].size):
        start = block_start(offset)
        if start != offset:
            yield bytes(start - offset)
        size = len(encoded.payload)
        blocks.append(Block(start, size, encoded.raw, encoded.encoding, encoded.checksum))
        offset = start + size
        yield encoded.payload
    index = dump_index(tree, blocks)
    yield index
    yield footer(index)


def _coalesce(chunks: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """Join runs of small chunks (small leaves, header, index) into ~1 MiB chunks; pass large ones through."""
    pending = bytearray()
    for chunk in chunks:
        if len(chunk) < _COALESCE_BELOW:
            pending += chunk
            if len(pending) < _COALESCE_TO:
                continue
            chunk = b""
        if pending:
            yield bytes(pending)
            pending.clear()
        if chunk:
            yield chunk
    if pending:
        yield bytes(pending)


def _resolver(map_location: MapLocation, where: str) -> Callable[[str, str], torch.device]:
    """A function (saved device, path) -> target device; map_location is consulted once per saved device."""
    if map_location is not None and not isinstance(map_location, (str, torch.device, Mapping)):
        if not callable(map_location):
            raise CodecError(f"map_location must be None, a device, a dict or a callable, not {map_location!r}")
    resolved: dict[str, torch.device] = {}

    def target_of(saved: str) -> Any:
        if map_location is None:
            return saved
        if isinstance(map_location, (str, torch.device)):
            return map_location
        if isinstance(map_location, Mapping):
            for key, value in map_location.items():
                if str(torch.device(key)) == saved:
                    return value
            return saved
        target = map_location(saved)
        return saved if target is None else target

    def resolve(saved: str, path: str) -> torch.device:
        if saved in resolved:
            return resolved[saved]
        try:
            device = torch.device(target_of(saved))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CodecError(f"{where}: map_location gives no device for {saved} ({exc})") from exc
        if device.type == "cuda":
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= available:
                raise CodecError(
                    f"{where}: {path} was saved on {saved} and would load on {device}, but this process sees "
                    f'{available} CUDA devices; pass map_location="cpu" (or a dict/callable) to load it elsewhere'
                )
        resolved[saved] = device
        return device

    return resolve


def _allocate(slot: Slot, where: str) -> tuple[Any, np.ndarray]:
    """A fresh value for ``slot`` and a flat uint8 view of its memory (huge pages for large arrays)."""
    try:
        if slot.nbytes >= HUGE_PAGE and slot.kind in ("tensor", "ndarray"):
            flat = fresh_array(slot.nbytes)
            value = _view(slot, flat)
            if value is not None:
                return value, flat
        if slot.kind == "tensor":
            tensor = torch.empty(slot.shape, dtype=slot.dtype)
            return tensor, tensor.reshape(-1).view(torch.uint8).numpy()
        if slot.kind == "ndarray":
            array = np.empty(slot.shape, dtype=slot.dtype)
            return array, array.reshape(-1).view(np.uint8)
        buffer = bytearray(slot.nbytes)
        return buffer, np.frombuffer(buffer, dtype=np.uint8)
    except (MemoryError, OSError, RuntimeError, ValueError, OverflowError) as exc:
        raise CorruptionError(where, f"{slot.path}: cannot allocate the {slot.nbytes} bytes declared: {exc}") from None


def _view(slot: Slot, flat: np.ndarray) -> Any:
    """The tensor or array of ``slot`` on the memory of ``flat`` (its bytes), or None if torch has no view."""
    if slot.kind == "ndarray":
        return flat.view(slot.dtype).reshape(slot.shape)
    try:
        return torch.from_numpy(flat).view(slot.dtype).reshape(slot.shape)
    except (RuntimeError, TypeError):
        return None


def decode(
    data: bytes | bytearray | memoryview,
    *,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
    where: str = "<object>",
    threads: int = 2,
    owned: bool = False,
) -> Any:
    """Rebuild the state stored in ``data``.

    The footer, index and whole tree are validated before any block is read; each block's checksum is
    checked before it is decompressed or used (except on an `ObjectBuffer` this decode takes that
    `ObjectBuffer.matches` the whole object's recorded digest: that digest already covers every byte);
    pickle segments are refused before any of them is read unless ``allow_pickle`` is true; nothing is
    returned before every block has passed.

    Values are built in fresh memory (huge pages for tensors and arrays of 2 MiB or more), except when
    ``data`` is handed over: then a tensor or array whose blocks are all stored raw, next to each other and
    aligned for its element type is built on ``data``'s own memory, with no copy (the values keep that
    memory alive). ``data`` is handed over when it is an `ObjectBuffer` that no decode has taken before,
    or when ``owned`` is true and it is writable. Tensors on the object's memory or on huge pages have
    storages that cannot grow (``resize_`` past their size raises; ``clone()`` first).

    Args:
        data: the whole stored object (bytes, bytearray, memoryview, `ObjectBuffer` or any contiguous
            buffer).
        map_location: None puts each tensor on the device it was saved from; a device (``"cpu"``,
            ``torch.device("cuda:0")``) puts every tensor there; a dict maps saved device strings to targets
            (unlisted devices stay); a callable gets the saved device string and returns a device (None: stay),
            once per distinct saved device.
        allow_pickle: load pickle segments (runs arbitrary code from the object: trusted objects only).
        where: names the object in errors.
        threads: checksum and decompression threads.
        owned: the caller hands ``data`` over: nobody else will use, change or resize it, so values may be
            built on its memory. Read-only data is copied regardless.

    Returns:
        The state, with the types it was encoded with (Parameters come back as plain tensors,
        DeviceTensors as tensors on their recorded device).

    Raises:
        CorruptionError: the object failed a framing, index or checksum check.
        UnsafeCheckpointError: it holds pickle segments and ``allow_pickle`` is false.
        CodecError: a target device is unavailable (e.g. saved on CUDA, loading without it).
    """
    _check_host()
    if type(threads) is not int or not 1 <= threads <= 256:
        raise ConfigError("threads", threads, "an int from 1 to 256")
    view = as_bytes_view(data, where)
    frame = read_frame(view, where)
    compiled, slots = check_tree(frame.tree, frame.blocks, where)
    pickled = [slot.path for slot in slots if slot.kind == "pickle"]
    if pickled and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{where}: refusing to unpickle {len(pickled)} pickle segment(s) at {', '.join(pickled[:5])}; "
            "pass allow_pickle=True only for objects you trust"
        )
    resolve = _resolver(map_location, where)
    devices = [resolve(s.device, s.path) if s.kind == "tensor" else None for s in slots]
    memory, check = _handed_over(data, view, owned)
    values: list[Any] = []

    def tasks() -> Iterator[tuple[Any, ...]]:
        for slot in slots:
            value = None if memory is None else _in_place(slot, frame.blocks, memory)
            flat = None
            if value is None:
                value, flat = _allocate(slot, where)
            values.append(value)
            if flat is None and not check:
                continue  # in place, and covered by the whole-object digest: nothing to do
            position = 0
            for i in range(slot.first, slot.first + slot.count):
                block = frame.blocks[i]
                stored = view[block.offset : block.offset + block.stored]
                out = None if flat is None else flat[position : position + block.raw]
                yield stored, block, out, slot.itemsize, where, i, check
                position += block.raw

    for _ in ordered_map(decode_block, tasks(), threads, size_of=lambda task: task[1].raw):
        pass
    for i, slot in enumerate(slots):
        if slot.kind == "bytes":
            values[i] = bytes(values[i])
        elif slot.kind == "pickle":
            values[i] = _unpickle(values[i], slot, where)
        elif slot.kind == "tensor" and devices[i].type != "cpu":
            try:
                values[i] = values[i].to(devices[i])
            except (RuntimeError, AssertionError) as exc:
                raise CodecError(f"{where}: {slot.path}: cannot move to {devices[i]}: {exc}") from exc
    return build(compiled, values)


def _handed_over(data: Any, view: memoryview, owned: bool) -> tuple[np.ndarray | None, bool]:
    """(memory, check): the object's memory as flat uint8 when values may be built on it (None when they
    must be copied), and whether block checksums must be checked.

    The array holds a buffer export of ``data`` for as long as any value built on it lives, so ``data``
    cannot be resized, closed or unmapped under them.
    """
    taken = isinstance(data, ObjectBuffer) and data.take()  # always asked: a buffer is taken only once
    if view.readonly or not (taken or owned):
        return None, True
    return np.frombuffer(view, dtype=np.uint8), not (taken and data.verified)


def _in_place(slot: Slot, blocks: list[Block], memory: np.ndarray) -> Any:
    """``slot``'s value as a view of the object's ``memory``, or None where its blocks do not allow it."""
    if slot.kind not in ("tensor", "ndarray") or not slot.nbytes:
        return None
    run = blocks[slot.first : slot.first + slot.count]
    start = run[0].offset
    if run[-1].offset + run[-1].stored - start != slot.nbytes or any(b.encoding != "raw" for b in run):
        return None  # compressed, or gaps between its blocks (raw lengths add up to nbytes)
    if (memory.__array_interface__["data"][0] + start) % slot.itemsize:
        return None  # misaligned (a version 1 object after an odd-sized leaf)
    return _view(slot, memory[start : start + slot.nbytes])


def _unpickle(payload: bytearray, slot: Slot, where: str) -> Any:
    try:
        return pickle.loads(payload)
    except Exception as exc:  # unpickling runs arbitrary code: any error is possible
        raise CodecError(f"{where}: {slot.path}: pickle segment failed to load: {exc!r}") from exc
