"""Streaming one encoded checkpoint to several replicas at once.

The encoder produces the object's bytes once; each replica's writer thread consumes them as they are
produced, so compression, hashing and the writes of all replicas overlap. Chunks are kept on a `Tape`
until the save ends, so a writer that hits a transient error restarts its upload from the first byte
(the retry policy decides whether it may) without re-encoding. A save that returns before a slow
replica's upload ends (see `resilient.storage.deadlines`) first gives the tape copies of its chunks
(`Tape.detach`) and the tape is released when that upload ends. Memory is therefore bounded by one
stored object per save (plus, in parity and rs modes, the parity shards).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import xxhash

from resilient.storage.parity import Striper

__all__ = ["Tape", "Piece", "produce"]

Buffer = bytes | bytearray | memoryview


class Tape:
    """An append-only list of chunks that any number of readers replay from the start, each at its own
    pace, blocking until the writer appends more or closes it."""

    def __init__(self) -> None:
        self._chunks: list[Buffer] = []
        self._closed = False
        self._cond = threading.Condition()

    def append(self, chunk: Buffer) -> None:
        with self._cond:
            self._chunks.append(chunk)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[Buffer]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._chunks) and not self._closed:
                    self._cond.wait()
                if i >= len(self._chunks):
                    return
                chunk = self._chunks[i]
            i += 1
            yield chunk

    def detach(self) -> None:
        """Replace every chunk by a copy of its own, so that a reader still replaying the tape after the
        save returned (a straggler's upload) never reads memory the caller owns again (raw blocks are
        zero-copy views of the caller's tensors). A chunk a reader is writing at this moment is the one
        exception: if the caller changes it meanwhile, that copy fails its checksum (never loaded; repair
        rewrites it)."""
        with self._cond:
            self._chunks = [c if isinstance(c, bytes) else bytes(c) for c in self._chunks]

    def release(self) -> None:
        """Drop the chunks (after every reader is done)."""
        with self._cond:
            self._chunks = []


@dataclass
class Piece:
    """One object a replica stores: its tape and, once produced, its length and xxh3_64."""

    tape: Tape
    length: int = 0
    xxh3: str = ""


def produce(chunks: Iterable[Buffer], pieces: list[Piece], *, striper: Striper | None) -> tuple[int, str]:
    """Drain the encoder into the pieces' tapes; return the whole object's length and xxh3_64.

    Without a striper there is one piece, the object itself. With one, pieces ``0..k-1`` get the data
    blocks of every stripe and pieces ``k..`` the parity blocks (one with XOR parity, m with `RsStriper`). Tapes are closed even on error, so writers
    never wait forever.
    """
    whole = xxhash.xxh3_64()
    hashes = [whole] if striper is None else [xxhash.xxh3_64() for _ in pieces]  # replicate: piece == object
    length = 0
    try:
        for chunk in chunks:
            whole.update(chunk)
            length += memoryview(chunk).nbytes
            if striper is None:
                pieces[0].tape.append(chunk)
                continue
            for stripe in striper.feed(chunk):
                _append_stripe(stripe, pieces, hashes)
        if striper is not None:
            for stripe in striper.finish():
                _append_stripe(stripe, pieces, hashes)
    finally:
        for p in pieces:
            p.tape.close()
    for p, h in zip(pieces, hashes):
        p.xxh3 = h.hexdigest()
        p.length = length if striper is None else (striper.block * _stripes(length, striper))
    return length, whole.hexdigest()


def _stripes(length: int, striper: Striper) -> int:
    per = striper.k * striper.block
    return (length + per - 1) // per


def _append_stripe(stripe: list, pieces: list[Piece], hashes: list) -> None:
    for i, block in enumerate(stripe):
        mv = memoryview(block)
        hashes[i].update(mv)
        pieces[i].tape.append(mv)
