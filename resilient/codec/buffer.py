"""`ObjectBuffer`: memory that one stored object is read into and then handed over to `decode`.

Loading used to copy every byte twice into fresh memory (file -> read buffer -> tensors), and fresh memory is
expensive here: its page faults cost about as much as the copy itself. An `ObjectBuffer` is fresh, private,
page-aligned anonymous memory that asks the kernel for huge pages (one fault per 2 MiB instead of per 4 KiB),
filled straight from the file. `decode` then builds the tensors and arrays of raw blocks on this memory, in
place: the object's 64-byte block alignment (format version 2) keeps every element aligned.

Handing over is what makes that safe. A tensor that aliases memory somebody else may still change would
change under its user, so `decode` builds in place only on memory handed to it: an `ObjectBuffer` (the first
`decode` of it takes it; later ones copy as usual) or a writable buffer passed with ``owned=True``. The
tensors keep the memory alive, and it is unmapped when the last of them is gone. One kept tensor keeps the
whole object's memory mapped (like ``torch.load(mmap=True)``).

`ObjectBuffer.read` also hashes the object (xxh3_64) while it reads, on a helper thread, so the whole-object
check against the digest its writer recorded (`ObjectBuffer.matches`) costs no time of its own. That digest
covers every byte of the object, so the decode that takes a buffer that matched skips its per-block
checksums: each byte is hashed once per load. Later decodes of the same buffer check every block again
(the values of the first one may have changed the memory since).
"""

from __future__ import annotations

import itertools
import mmap
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, TypeVar

import numpy as np
import xxhash

__all__ = ["HUGE_PAGE", "ObjectBuffer", "READ_CHUNK", "fresh_array"]

READ_CHUNK = 8 << 20
"""Bytes per read call; each chunk is hashed on a helper thread while the next one is read."""
HUGE_PAGE = 2 << 20
"""Memory of at least this size is advised to use transparent huge pages."""

M = TypeVar("M", bound=mmap.mmap)

_PRIVATE = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


class ObjectBuffer(mmap.mmap):
    """Fresh, page-aligned, writable memory holding one object, to be handed over to `decode`.

    Slicing gives bytes, as for an ``mmap``; it is not compared by content (``==`` is identity). While a
    tensor decoded from it is alive the buffer cannot be closed or resized (``BufferError``), so decoded
    tensors never point at unmapped memory.

    Attributes:
        xxh3: the xxh3_64 of the bytes as `read` read them (None for `allocate`).
        verified: `matches` found ``xxh3`` equal to the digest recorded for the whole object.

    Example:
        >>> import torch
        >>> from resilient.codec import decode, encode
        >>> blob = b"".join(encode({"w": torch.ones(1024)}))
        >>> buffer = ObjectBuffer.allocate(len(blob))
        >>> buffer[:] = blob
        >>> w = decode(buffer)["w"]  # built on the buffer's memory, no copy
        >>> w.add_(1).sum().item()
        2048.0
    """

    xxh3: int | None
    verified: bool

    @classmethod
    def allocate(cls, size: int) -> ObjectBuffer:
        """Fresh zeroed memory of ``size`` bytes (at least 1); pages are only touched when written."""
        buffer = _map(cls, size)
        buffer.xxh3 = None
        buffer.verified = False
        buffer._takers = itertools.count()
        return buffer

    @classmethod
    def read(cls, file: BinaryIO, size: int) -> ObjectBuffer | bytes:
        """Read ``size`` bytes from the current position of ``file`` (unbuffered), hashing them while reading.

        Returns:
            The buffer, its `xxh3` set; or, when the file holds fewer bytes than ``size`` (it shrank), just
            the bytes that were there (the caller's length check then fails).
        """
        if size == 0:
            return b""
        buffer = cls.allocate(size)
        hasher = xxhash.xxh3_64()
        got = _read_hashing(file, memoryview(buffer), hasher)
        if got < size:
            return buffer[:got]
        buffer.xxh3 = hasher.intdigest()
        return buffer

    @classmethod
    def copy_of(cls, data: bytes | bytearray | memoryview) -> ObjectBuffer:
        """A buffer holding a copy of ``data`` (at least 1 byte), its `xxh3` set."""
        buffer = cls.allocate(len(data))
        buffer[:] = data
        buffer.xxh3 = xxhash.xxh3_64_intdigest(data)
        return buffer

    def matches(self, xxh3: int) -> bool:
        """Whether the bytes as read hash to ``xxh3``, the digest recorded for the whole object by its writer.

        A match is remembered in `verified`: the decode that takes this buffer then relies on it instead of
        checking each block's checksum. Only compare with a digest from outside the object (a manifest).
        """
        self.verified = self.xxh3 is not None and self.xxh3 == xxh3
        return self.verified

    def take(self) -> bool:
        """True for the first caller only: that caller may keep using the memory (`decode` calls this)."""
        return next(self._takers) == 0


def fresh_array(size: int) -> np.ndarray:
    """``size`` bytes of fresh memory, page-aligned, in huge pages where the kernel allows, as flat uint8.

    Faulting in huge pages costs a fraction of 4 KiB pages (decode fills large values several times faster);
    the memory is unmapped when the array and every view of it are gone.
    """
    return np.frombuffer(_map(mmap.mmap, size), dtype=np.uint8)


def _map(cls: type[M], size: int) -> M:
    if _PRIVATE:
        memory = cls(-1, size, flags=_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    else:  # pragma: no cover - platforms without MAP_PRIVATE (Windows)
        memory = cls(-1, size)
    if size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # pragma: no cover - transparent huge pages unavailable: 4 KiB pages then
            pass
    return memory


def _read_hashing(file: BinaryIO, view: memoryview, hasher: xxhash.xxh3_64) -> int:
    """Fill ``view`` from ``file``; hash each chunk, in order, on a helper thread while the next is read."""
    got = 0
    if len(view) <= READ_CHUNK:
        while got < len(view) and (n := file.readinto(view[got:])):
            got += n
        hasher.update(view[:got])
        return got
    pending: Future[None] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="resilient-read") as pool:
        try:
            while got < len(view) and (n := file.readinto(view[got : got + READ_CHUNK])):
                if pending is not None:
                    pending.result()
                pending = pool.submit(hasher.update, view[got : got + n])
                got += n
        finally:
            if pending is not None:
                pending.result()
    return got
