"""RAID-5 style striping with one XOR parity shard: pure byte arithmetic, no I/O.

The stored object is cut into stripes of `k` blocks of `block` bytes (the last stripe zero-padded).
Shard ``i < k`` is block ``i`` of every stripe, concatenated; shard ``k`` is their XOR::

    stripe s:   d[s,0]  d[s,1]  ...  d[s,k-1]   p[s] = d[s,0] ^ d[s,1] ^ ... ^ d[s,k-1]
    shard i  =  d[0,i] + d[1,i] + ...           shard k = p[0] + p[1] + ...

Any one shard is the XOR of the other k, so the loss (or corruption, caught by its checksum) of any one
shard is repaired. Which replica holds which shard rotates with the generation (`placement`), so parity
writes spread over all replicas as in RAID-5.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["Striper", "assemble", "placement", "reconstruct"]


def placement(generation: int, n: int) -> list[int]:
    """Piece index held by each of `n` replicas for `generation` (a rotation of 0..n-1).

    >>> placement(1, 3)
    [1, 2, 0]
    """
    return [(j + generation) % n for j in range(n)]


class Striper:
    """Feed the object's bytes in any chunking; get back, per full stripe, its k data blocks and parity.

    >>> s = Striper(k=2, block=8)
    >>> [[bytes(b) for b in st] for st in s.feed(b"abcdefghijklmnop")]
    [[b'abcdefgh', b'ijklmnop', b'\\x08\\x08\\x08\\x08\\x08\\x08\\x08\\x18']]
    """

    def __init__(self, k: int, block: int) -> None:
        if k < 2 or block < 8 or block % 8:
            raise ValueError(f"Striper(k={k}, block={block}) needs k >= 2 and a block size multiple of 8")
        self.k = k
        self.block = block
        self._buf = np.zeros(k * block, dtype=np.uint8)
        self._fill = 0
        self.length = 0

    def feed(self, chunk: bytes | bytearray | memoryview) -> Iterator[list[np.ndarray]]:
        src = np.frombuffer(chunk, dtype=np.uint8)
        self.length += src.size
        pos = 0
        while pos < src.size:
            take = min(src.size - pos, self._buf.size - self._fill)
            self._buf[self._fill : self._fill + take] = src[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self._buf.size:
                yield self._emit()

    def finish(self) -> Iterator[list[np.ndarray]]:
        """Emit the last, zero-padded stripe (if any bytes are pending)."""
        if self._fill:
            self._buf[self._fill :] = 0
            yield self._emit()

    def _emit(self) -> list[np.ndarray]:
        self._fill = 0
        blocks = self._buf.reshape(self.k, self.block)
        parity = np.bitwise_xor.reduce(blocks.view(np.uint64), axis=0).view(np.uint8)
        return [blocks[i].copy() for i in range(self.k)] + [parity]


def reconstruct(shards: Sequence[bytes | memoryview | None]) -> bytes:
    """The one missing shard (``None``) as the XOR of the others (all of equal length)."""
    present = [np.frombuffer(s, dtype=np.uint8) for s in shards if s is not None]
    if len(present) != len(shards) - 1:
        raise ValueError(f"reconstruct needs exactly one missing shard, got {len(shards) - len(present)}")
    sizes = {p.size for p in present}
    if len(sizes) != 1 or next(iter(sizes)) % 8:
        raise ValueError(f"shards must have one common length, a multiple of 8; got {sorted(sizes)}")
    acc = present[0].view(np.uint64).copy()
    for p in present[1:]:
        np.bitwise_xor(acc, p.view(np.uint64), out=acc)
    return acc.view(np.uint8).tobytes()


def assemble(data_shards: Sequence[bytes | memoryview], block: int, length: int) -> bytearray:
    """Re-interleave k data shards into the object's first `length` bytes."""
    k = len(data_shards)
    arrays = [np.frombuffer(s, dtype=np.uint8) for s in data_shards]
    if len({a.size for a in arrays}) != 1 or arrays[0].size % block:
        raise ValueError("data shards must have one common length, a multiple of the block size")
    stripes = arrays[0].size // block
    if length > stripes * block * k:
        raise ValueError(f"object length {length} exceeds what {k} shards of {arrays[0].size} hold")
    out = bytearray(stripes * block * k)
    view = np.frombuffer(out, dtype=np.uint8).reshape(stripes, k, block)
    for i, a in enumerate(arrays):
        view[:, i, :] = a.reshape(stripes, block)
    del view
    del out[length:]
    return out
