"""Block encodings: the compression choice, byte regrouping ("shuffle"), and ordered parallel execution.

Compression pays only when it saves more than it costs. zstd level 1 runs at 0.5-0.8 GB/s per core while
a local NVMe/virtio disk takes 0.5-1.1 GB/s with fsync, so saving 15% of a float tensor's bytes (fp32
regrouped: x1.19) costs more time than it wins; under "auto" a leaf is compressed only when that saves at
least `MIN_SAVING` of its bytes (bf16 x1.46, token ids x4-8 qualify; fp32 weights are stored raw, zero-copy).
"zstd" compresses regardless. The choice is made once per leaf from a sample (`SAMPLES` slices from the start, the middle and the
end, together 1/8 of the leaf, each at most `SAMPLE_BYTES`): zstd on the bytes as they are, and on the bytes
regrouped by position within an element (byte j of every element together), which turns float exponents and
the zero high bytes of small integers into long compressible runs. Leaves of at most `WHOLE_TRIAL_BYTES` are
compressed both ways whole, keeping the smaller; leaves under `TINY_BYTES` are not tried at all. A leaf of
one block is planned by the worker that encodes it, so sampling runs in parallel too.

zstandard releases the GIL while it works, as do NumPy's strided copies and xxhash, so `ordered_map` runs
blocks on a small thread pool with a bounded look-ahead and hands results back in order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import numpy as np
import xxhash
import zstandard

from resilient.codec.format import Block
from resilient.errors import CorruptionError

__all__ = [
    "BATCH_BYTES",
    "CHOOSE",
    "DEFER",
    "Encoded",
    "MIN_SAVING",
    "SAMPLES",
    "SAMPLE_BYTES",
    "TINY_BYTES",
    "WHOLE_TRIAL_BYTES",
    "decode_block",
    "encode_block",
    "ordered_map",
    "plan_leaf",
]

SAMPLES = 3
SAMPLE_BYTES = 64 << 10
"""The most bytes of one sample slice; a leaf is sampled at 1/8 of its size, at least `WHOLE_TRIAL_BYTES`."""
WHOLE_TRIAL_BYTES = 8 << 10
"""Leaves up to this size are compressed every way and the best result kept."""
TINY_BYTES = 4 << 10
"""Under "auto", leaves smaller than this are stored raw without trying."""
MIN_SAVING = 0.20
"""Under "auto", compress only when the stored size drops by at least this fraction."""
BATCH_BYTES = 1 << 20
"""Blocks smaller than this are handed to worker threads in batches of about this many bytes."""

_PLANE_FLUSH_BELOW = 256 << 10
_UNSHUFFLE_RUN = 128 << 10  # elements rebuilt per step of two-byte unshuffling (256 KiB: stays in cache)

CHOOSE = "choose"
"""A plan that lets the worker try every candidate on the whole (small) block and keep the best."""
DEFER = "defer"
"""A plan that lets the worker call `plan_leaf` itself (single-block leaves: sampling runs in parallel too)."""

T = TypeVar("T")


class Encoded(NamedTuple):
    """One block, ready to be written: ``payload`` is bytes, or a zero-copy memoryview for raw blocks."""

    encoding: str
    payload: bytes | memoryview
    raw: int
    checksum: int


class _Local(threading.local):
    """Per-thread zstd contexts (they are not thread-safe) and a reusable regrouping buffer."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()
        self.buffer = np.empty(0, dtype=np.uint8)

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        cctx = self.compressors.get(level)
        if cctx is None:
            cctx = self.compressors[level] = zstandard.ZstdCompressor(level=level)
        return cctx

    def scratch(self, size: int) -> np.ndarray:
        if self.buffer.size < size:
            self.buffer = np.empty(size, dtype=np.uint8)
        return self.buffer[:size]


_local = _Local()


def shuffle(data: np.ndarray, itemsize: int, out: np.ndarray) -> np.ndarray:
    """Regroup ``data`` (n elements of ``itemsize`` bytes) so byte j of every element is together."""
    if itemsize == 1:
        return data
    count = data.size // itemsize
    for j in range(itemsize):
        out[j * count : (j + 1) * count] = data[j::itemsize]
    return out


def unshuffle(data: np.ndarray, itemsize: int, out: np.ndarray) -> None:
    """Invert `shuffle`: write the regrouped ``data`` back into element order in ``out``.

    Two-byte elements (bf16, fp16: the usual compressed floats) are rebuilt as ``low | high << 8`` in
    cache-sized runs, about twice as fast as two strided byte copies; wider ones are copied plane by plane.
    """
    count = data.size // itemsize
    if itemsize == 2:
        wide, low, high = out.view(np.uint16), data[:count], data[count:]
        for start in range(0, count, _UNSHUFFLE_RUN):
            stop = min(start + _UNSHUFFLE_RUN, count)
            part = wide[start:stop]
            np.left_shift(high[start:stop], 8, out=part, dtype=np.uint16)
            np.bitwise_or(part, low[start:stop], out=part)
        return
    for j in range(itemsize):
        out[j::itemsize] = data[j * count : (j + 1) * count]


def _compress_shuffled(data: np.ndarray, itemsize: int, level: int) -> bytes:
    """Regroup ``data`` and compress it as one zstd frame.

    zstd builds one literal table per block of up to 128 KiB. When the regrouped byte planes are shorter
    than that, a block would mix the compressible plane (float exponents) with the random ones and compress
    both poorly, so short planes are each closed with a block flush: still one frame, but every zstd block
    then holds bytes of a single plane, as it does for large blocks.
    """
    cctx = _local.compressor(level)
    regrouped = shuffle(data, itemsize, _local.scratch(data.size))
    plane = data.size // itemsize
    if plane >= _PLANE_FLUSH_BELOW:
        return cctx.compress(regrouped)
    stream = cctx.compressobj(size=data.size)
    parts = []
    for j in range(itemsize):
        parts.append(stream.compress(regrouped[j * plane : (j + 1) * plane]))
        parts.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    parts.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
    return b"".join(parts)


def _candidates(data: np.ndarray, itemsize: int, level: int) -> dict[str, bytes]:
    found = {"zstd": _local.compressor(level).compress(data)}
    if itemsize > 1:
        found["shuffle+zstd"] = _compress_shuffled(data, itemsize, level)
    return found


def _pick(sizes: dict[str, int], raw: int, mode: str) -> str:
    best = min(sizes, key=lambda encoding: (sizes[encoding], encoding != "zstd"))
    if mode == "auto" and sizes[best] > (1.0 - MIN_SAVING) * raw:
        return "raw"
    return best


def plan_leaf(data: np.ndarray, itemsize: int, mode: str, level: int, block_bytes: int) -> str:
    """Choose how to encode the blocks of one leaf.

    Args:
        data: the leaf's bytes, flat uint8.
        itemsize: its element size.
        mode: "auto", "zstd" or "off".
        level: the zstd level.
        block_bytes: the largest block.

    Returns:
        An encoding from `resilient.codec.format.ENCODINGS`, or `CHOOSE` for a small leaf whose single
        block the worker compresses every way and keeps the best of.
    """
    size = data.size
    if mode == "off" or size == 0 or (mode == "auto" and size < TINY_BYTES):
        return "raw"
    if mode == "zstd" and itemsize == 1:
        return "zstd"
    if size <= WHOLE_TRIAL_BYTES and size <= block_bytes:
        return CHOOSE
    step = min(SAMPLE_BYTES, max(WHOLE_TRIAL_BYTES, size // 8) // SAMPLES)
    step -= step % itemsize
    starts = [0, (size // 2) // itemsize * itemsize, (size - step) // itemsize * itemsize]
    sample = np.concatenate([data[start : start + step] for start in starts])
    sizes = {encoding: len(out) for encoding, out in _candidates(sample, itemsize, level).items()}
    return _pick(sizes, sample.size, mode)


def encode_block(data: np.ndarray, itemsize: int, plan: str, mode: str, level: int) -> Encoded:
    """Encode one block (runs on a worker thread).

    Args:
        data: the block's bytes, flat uint8 (a view of the leaf: raw blocks are returned zero-copy).
        itemsize: the leaf's element size.
        plan: from `plan_leaf`, `DEFER` for a leaf of one block, or "pickle" for a pickle payload.
        mode: "auto", "zstd" or "off".
        level: the zstd level.
    """
    payload: bytes | memoryview
    if plan == DEFER:
        plan = plan_leaf(data, itemsize, mode, level, data.size)
    if plan == CHOOSE:
        found = _candidates(data, itemsize, level)
        plan = _pick({encoding: len(out) for encoding, out in found.items()}, data.size, mode)
        payload = found[plan] if plan != "raw" else memoryview(data)
    elif plan == "zstd":
        payload = _local.compressor(level).compress(data)
    elif plan == "shuffle+zstd":
        payload = _compress_shuffled(data, itemsize, level)
    else:
        payload = memoryview(data)
    if plan in ("zstd", "shuffle+zstd") and mode == "auto" and len(payload) >= data.size:
        plan, payload = "raw", memoryview(data)
    return Encoded(plan, payload, data.size, xxhash.xxh3_64_intdigest(payload))


def _check_frame(stored: memoryview, size: int, where: str, index: int) -> None:
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise CorruptionError(where, f"block {index}: zstd: {exc}") from None
    if declared != size:
        raise CorruptionError(where, f"block {index}: zstd frame declares {declared} bytes, the index {size}")


def _decompress_into(stored: memoryview, out: np.ndarray, where: str, index: int) -> None:
    try:
        reader = _local.decompressor.stream_reader(stored, read_size=len(stored), closefd=False)
        target = memoryview(out)
        filled = 0
        while filled < out.size:
            count = reader.readinto(target[filled:])
            if not count:
                raise CorruptionError(where, f"block {index}: zstd frame ends after {filled} of {out.size} bytes")
            filled += count
        if reader.read(1):
            raise CorruptionError(where, f"block {index}: zstd frame holds more than {out.size} bytes")
    except zstandard.ZstdError as exc:
        raise CorruptionError(where, f"block {index}: zstd: {exc}") from None


def inflate_check(stored: memoryview, block: Block, where: str, index: int) -> None:
    """Decompress one compressed block through a small scratch buffer and check it holds exactly
    ``block.raw`` bytes (a dry run: nothing is kept, memory stays bounded whatever the block claims).

    Raises:
        CorruptionError: the zstd frame is damaged or does not hold exactly ``block.raw`` bytes.
    """
    if block.encoding in ("raw", "pickle"):
        return
    _check_frame(stored, block.raw, where, index)
    scratch = memoryview(_local.scratch(min(block.raw, 1 << 20)))
    try:
        reader = _local.decompressor.stream_reader(stored, read_size=len(stored), closefd=False)
        total = 0
        while True:
            count = reader.readinto(scratch)
            if not count:
                break
            total += count
            if total > block.raw:
                break
    except zstandard.ZstdError as exc:
        raise CorruptionError(where, f"block {index}: zstd: {exc}") from None
    if total != block.raw:
        raise CorruptionError(where, f"block {index}: zstd frame holds {total} bytes, the index says {block.raw}")


def decode_block(
    stored: memoryview, block: Block, out: np.ndarray | None, itemsize: int, where: str, index: int,
    check: bool = True,
) -> None:
    """Check one block's checksum, then decode it into ``out`` (exactly ``block.raw`` bytes).

    ``out`` is None for a raw block that is used where it is stored: only its checksum is checked.
    ``check=False`` skips the checksum (the caller verified these bytes another way).

    Raises:
        CorruptionError: checksum mismatch, or a zstd frame that does not hold exactly ``block.raw`` bytes.
    """
    if check and xxhash.xxh3_64_intdigest(stored) != block.checksum:
        raise CorruptionError(where, f"block {index} (offset {block.offset}, {block.stored} bytes): checksum mismatch")
    if out is None:
        return
    if block.encoding in ("raw", "pickle"):
        out[:] = np.frombuffer(stored, dtype=np.uint8)
        return
    _check_frame(stored, out.size, where, index)
    if block.encoding == "zstd" or itemsize == 1:
        _decompress_into(stored, out, where, index)
    else:
        regrouped = _local.scratch(out.size)
        _decompress_into(stored, regrouped, where, index)
        unshuffle(regrouped, itemsize, out)


def _batches(tasks: Iterable[tuple[Any, ...]], size_of: Callable[[tuple[Any, ...]], int]) -> Iterator[list[Any]]:
    batch: list[tuple[Any, ...]] = []
    total = 0
    for task in tasks:
        size = size_of(task)
        if size >= BATCH_BYTES:
            if batch:
                yield batch
                batch, total = [], 0
            yield [task]
            continue
        batch.append(task)
        total += size
        if total >= BATCH_BYTES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def ordered_map(
    fn: Callable[..., T], tasks: Iterable[tuple[Any, ...]], threads: int, size_of: Callable[[tuple[Any, ...]], int]
) -> Iterator[T]:
    """``fn(*task)`` for every task, on ``threads`` threads, yielding results in task order.

    Tasks smaller than `BATCH_BYTES` (by ``size_of``) run in batches of about that size, so that the cost
    of handing work to a thread stays small next to the work. At most ``2 * threads`` batches are in flight,
    so memory stays bounded however many tasks there are. Tasks are drawn from ``tasks`` on the calling
    thread. Closing the iterator early cancels what has not started and waits for what has.
    """
    if threads <= 1:
        for task in tasks:
            yield fn(*task)
        return

    def run(batch: list[tuple[Any, ...]]) -> list[T]:
        return [fn(*task) for task in batch]

    pending: deque[Future[list[T]]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resilient-codec") as pool:
        try:
            for batch in _batches(tasks, size_of):
                pending.append(pool.submit(run, batch))
                if len(pending) >= 2 * threads:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
