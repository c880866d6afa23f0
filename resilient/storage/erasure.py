"""RAID-6 style and wider: k data shards plus m Reed-Solomon parity shards (``rs:K+M``), pure arithmetic.

The stored object is cut into stripes exactly as for XOR parity (`resilient.storage.parity`): stripes of
`k` blocks of `block` bytes, the last one zero-padded; shard ``i < k`` is block ``i`` of every stripe,
concatenated. Shards ``k .. k+m-1`` are the m Reed-Solomon parity blocks of every stripe (systematic
Vandermonde code over GF(2^8), computed by ``zfec``). Any k of the k+m shards rebuild the others, so the
loss (or corruption, caught by each shard's checksum) of any m shards is repaired. Which replica holds
which shard rotates with the generation (`resilient.storage.parity.placement`).

``zfec`` was chosen over ``pyeclib`` by measurement on 64 MiB in 1 MiB stripes, RS(4+2), on this project's
2-core machines: encode 792 MB/s against 738 (ISA-L backend), decode with two data shards lost 842 MB/s
against 1430; the encode runs on every save, the decode only after losses. ``zfec`` shards are the raw
blocks (no fragment headers), so each shard keeps its length and checksum in the manifest as with XOR
parity, and it is one small C extension with no bundled libraries or deprecated backends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import zfec

from resilient.storage.parity import Striper

__all__ = ["MAX_SHARDS", "RsStriper", "rebuild"]

MAX_SHARDS = 256  # zfec's limit on k + m


class RsStriper(Striper):
    """A `Striper` that emits, per full stripe, its k data blocks and m Reed-Solomon parity blocks.

    >>> s = RsStriper(k=2, m=2, block=8)
    >>> stripe = next(s.feed(bytes(range(16))))
    >>> [len(b) for b in stripe], bytes(stripe[1])
    ([8, 8, 8, 8], b'\\x08\\t\\n\\x0b\\x0c\\r\\x0e\\x0f')
    """

    def __init__(self, k: int, m: int, block: int) -> None:
        super().__init__(k, block)
        if m < 1 or k + m > MAX_SHARDS:
            raise ValueError(f"RsStriper(k={k}, m={m}) needs m >= 1 and k + m <= {MAX_SHARDS}")
        self.m = m
        self._encoder = zfec.Encoder(k, k + m)

    def _emit(self) -> list[np.ndarray]:
        self._fill = 0
        blocks = self._buf.reshape(self.k, self.block)
        data = [blocks[i].copy() for i in range(self.k)]
        parity = self._encoder.encode([memoryview(d) for d in data], list(range(self.k, self.k + self.m)))
        return data + [np.frombuffer(p, dtype=np.uint8) for p in parity]


def rebuild(
    shards: Sequence[bytes | bytearray | memoryview | None], k: int, m: int, block: int, want: Iterable[int]
) -> dict[int, bytes]:
    """The shards numbered in `want`, rebuilt from any k of the present ones (``None``: lost or bad).

    >>> s = RsStriper(k=2, m=2, block=8)
    >>> shards = [bytes(b) for b in next(s.feed(bytes(range(16))))]
    >>> rebuild([None, None, shards[2], shards[3]], 2, 2, 8, [0, 1]) == {0: shards[0], 1: shards[1]}
    True
    """
    want = sorted(set(want))
    present = [i for i, s in enumerate(shards) if s is not None]
    if len(shards) != k + m or len(present) < k:
        raise ValueError(f"RS({k}+{m}) needs {k} of its {k + m} shards, got {len(present)} of {len(shards)}")
    sizes = {memoryview(shards[i]).nbytes for i in present}
    if len(sizes) != 1 or next(iter(sizes)) % block:
        raise ValueError(f"shards must have one common length, a multiple of {block}; got {sorted(sizes)}")
    size = next(iter(sizes))
    use = present[:k]
    views = [memoryview(shards[i]).cast("B") for i in use]
    decoder, encoder = zfec.Decoder(k, k + m), zfec.Encoder(k, k + m)
    parity_wanted = [i for i in want if i >= k]
    out = {i: bytearray(size) for i in want}
    for lo in range(0, size, block):
        data = decoder.decode([v[lo : lo + block] for v in views], use)
        parity = encoder.encode(data, parity_wanted) if parity_wanted else []
        for i in want:
            out[i][lo : lo + block] = data[i] if i < k else parity[parity_wanted.index(i)]
    return {i: bytes(b) for i, b in out.items()}
