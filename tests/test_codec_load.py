"""Loading without copies: ObjectBuffer, values built in place on a handed-over buffer, format versions.

`decode` builds tensors and arrays whose blocks are stored raw directly on the memory of a buffer handed over
to it; these tests pin what makes that safe (checksums first, writable and independent values, memory kept
alive, nothing built on memory the caller still holds) and that objects written in format version 1 still
load.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
import xxhash

import resilient.codec.buffer as buffer_module
from resilient.codec import ObjectBuffer, decode, encode, verify
from resilient.codec.blocks import shuffle, unshuffle
from resilient.codec.format import read_frame
from resilient.errors import CorruptionError, NoCheckpointError
from resilient.storage import CheckpointStore
from resilient.storage.replica import FsspecReplica, LocalReplica
from tests.test_codec import assert_same

DATA = Path(__file__).parent / "data"


def v1_state() -> dict[str, Any]:
    """The state stored in data/codec_v1.rck (format version 1, written by resilient 0.1.0 with block_size=4096)."""
    return {
        "w": torch.arange(300, dtype=torch.float32).reshape(20, 15) / 7,
        "odd": torch.arange(7, dtype=torch.bfloat16),
        "after_odd": torch.arange(5, dtype=torch.float32) - 2.5,
        "big": (torch.arange(3000) % 17).to(torch.float32),
        "bf": torch.linspace(-1, 1, 2500).bfloat16(),
        "ids": torch.arange(1000, dtype=torch.int64) % 50,
        "mask": torch.arange(10) % 3 == 0,
        "empty": torch.empty(0, 3),
        "wide": torch.arange(4000, dtype=torch.float64).reshape(40, 100),
        "np": np.arange(64, dtype="<f8").reshape(8, 8),
        "np_be": np.arange(12, dtype=">i4"),
        "blob": bytes(range(256)) * 3,
        "ba": bytearray(b"xyz"),
        "scalars": [None, True, 7, 2**70, -1.5, "text", np.float32(2.5)],
        "nested": OrderedDict(a=(1, [2.0, {"b": torch.ones(2, 2, dtype=torch.int32)}])),
        "step": 12345,
    }


def mixed_state() -> dict[str, Any]:
    """Raw leaves of every alignment need after odd-sized ones, and compressed leaves, small and large."""
    g = torch.Generator().manual_seed(0)
    return {
        "odd": torch.arange(7, dtype=torch.bfloat16),
        "f32": torch.randn(3000, generator=g),
        "odd2": b"xyz",
        "f64": torch.randint(-(2**62), 2**62, (40, 25), generator=g).view(torch.float64),  # random bits: raw
        "c128": torch.randn(33, generator=g, dtype=torch.complex128),
        "odd3": np.arange(3, dtype=np.int8),
        "arr": np.random.default_rng(0).standard_normal((20, 10)).astype(">f4"),
        "i64_small": torch.arange(100),
        "zeros": torch.zeros(1 << 20),  # 4 MiB, compressed: decoded into fresh (huge page) memory
        "split": torch.randn(5000, generator=g),  # several raw blocks with block_size=4096
        "bool": torch.arange(9) % 2 == 0,
        "empty": torch.empty(0, 4),
    }


def to_buffer(data: bytes) -> ObjectBuffer:
    buffer = ObjectBuffer.allocate(len(data))
    buffer[:] = data
    return buffer


def address(data: Any) -> int:
    return np.frombuffer(data, dtype=np.uint8).ctypes.data


def pointer(value: Any) -> int:
    return value.data_ptr() if isinstance(value, torch.Tensor) else value.ctypes.data


def inside(value: Any, data: Any) -> bool:
    start = address(data)
    return start <= pointer(value) < start + len(data)


def raw_leaves(data: bytes) -> set[str]:
    """Names of the root dict's tensor/array leaves whose blocks are all raw."""
    frame = read_frame(memoryview(data), "x")
    found = set()
    for key, node in zip(frame.tree["k"], frame.tree["v"]):
        if node["t"] in ("tensor", "ndarray") and node["b"][1]:
            first, count = node["b"]
            if all(b.encoding == "raw" for b in frame.blocks[first : first + count]):
                found.add(key["v"])
    return found


@pytest.fixture(scope="module")
def mixed() -> bytes:
    return b"".join(encode(mixed_state(), block_size=4096))


# --- format version 1 ------------------------------------------------------------------------------


def test_version_1_object_written_before_alignment_still_decodes() -> None:
    data = (DATA / "codec_v1.rck").read_bytes()
    assert verify(data).format_version == 1
    assert_same(decode(data), v1_state())
    buffer = to_buffer(data)
    out = decode(buffer)
    assert_same(out, v1_state())
    assert inside(out["w"], buffer)  # 16-byte aligned in version 1 too: built in place
    assert not inside(out["after_odd"], buffer)  # at offset 1230: misaligned for float32, copied
    assert not inside(out["big"], buffer)  # compressed


# --- in place on a handed-over buffer ---------------------------------------------------------------


def test_raw_leaves_are_built_in_place_aligned_and_writable(mixed: bytes) -> None:
    buffer = to_buffer(mixed)
    out = decode(buffer)
    assert_same(out, mixed_state())
    raw = raw_leaves(mixed)
    assert {"f32", "f64", "c128", "arr", "i64_small", "split", "bool", "odd"} <= raw
    assert "zeros" not in raw
    for name in raw:
        value = out[name]
        assert inside(value, buffer), name
        assert (pointer(value) - address(buffer)) % 64 == 0 and pointer(value) % 64 == 0, name
        if isinstance(value, torch.Tensor):  # a storage of its own bytes (torch.save of it saves only them)
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), name
    assert not inside(out["zeros"], buffer)
    out["f32"].add_(1)
    out["arr"][0, 0] = 42
    assert torch.equal(out["f32"], mixed_state()["f32"] + 1) and out["arr"][0, 0] == 42


def test_plain_buffers_are_copied_unless_handed_over(mixed: bytes) -> None:
    for data in (mixed, bytearray(mixed), memoryview(bytearray(mixed))):
        out = decode(data)
        assert not any(inside(out[name], data) for name in raw_leaves(mixed))
    owned = bytearray(mixed)
    out = decode(owned, owned=True)
    assert_same(out, mixed_state())
    assert inside(out["f32"], owned)
    with pytest.raises(BufferError):
        owned.clear()  # the values hold the bytearray's memory: it cannot be resized under them
    read_only = decode(mixed, owned=True)  # bytes cannot be written: copied regardless
    assert not inside(read_only["f32"], mixed)


def test_only_the_first_decode_takes_a_buffer(mixed: bytes) -> None:
    buffer = to_buffer(mixed)
    first, second = decode(buffer), decode(buffer)
    assert inside(first["f32"], buffer) and not inside(second["f32"], buffer)
    first["f32"].zero_()
    assert_same(second, mixed_state())


def test_values_keep_the_memory_alive_after_the_buffer_is_dropped(mixed: bytes) -> None:
    buffer = to_buffer(mixed)
    out = decode(buffer)
    with pytest.raises(BufferError):
        buffer.close()
    del buffer
    gc.collect()
    np.frombuffer(bytearray(len(mixed)), dtype=np.uint8).fill(0xFF)  # reuse freed memory if any was freed
    assert_same(out, mixed_state())
    kept = out["split"]
    del out
    gc.collect()
    assert torch.equal(kept, mixed_state()["split"])


@pytest.mark.parametrize("threads", [1, 2])
def test_corrupt_raw_block_in_a_handed_over_buffer_is_corruption(mixed: bytes, threads: int) -> None:
    frame = read_frame(memoryview(mixed), "x")
    raw = [b for b in frame.blocks if b.encoding == "raw" and b.raw >= 64]
    for block in (raw[0], raw[len(raw) // 2], raw[-1]):
        for position in (block.offset, block.offset + block.stored - 1):
            buffer = to_buffer(mixed)
            buffer[position] ^= 0x10
            with pytest.raises(CorruptionError, match="checksum mismatch"):
                decode(buffer, threads=threads)


def read_buffer(tmp_path: Path, data: bytes) -> ObjectBuffer:
    (tmp_path / "object").write_bytes(data)
    with open(tmp_path / "object", "rb", buffering=0) as f:
        buffer = ObjectBuffer.read(f, len(data))
    assert isinstance(buffer, ObjectBuffer)
    return buffer


def test_a_buffer_matching_its_digest_is_decoded_without_block_checks_once(tmp_path: Path, mixed: bytes) -> None:
    buffer = read_buffer(tmp_path, mixed)
    assert not buffer.verified
    assert not buffer.matches(xxhash.xxh3_64_intdigest(mixed) ^ 1) and not buffer.verified
    assert buffer.matches(xxhash.xxh3_64_intdigest(mixed)) and buffer.verified
    first = decode(buffer)
    assert_same(first, mixed_state())
    first["f32"][0] += 1  # the first decode's values own the memory now
    for owned in (False, True):
        with pytest.raises(CorruptionError, match="checksum mismatch"):
            decode(buffer, owned=owned)  # later decodes check every block again


def test_a_buffer_that_did_not_match_is_checked_block_by_block(tmp_path: Path, mixed: bytes) -> None:
    block = next(b for b in read_frame(memoryview(mixed), "x").blocks if b.encoding == "raw" and b.raw > 1000)
    damaged = bytearray(mixed)
    damaged[block.offset] ^= 1
    buffer = read_buffer(tmp_path, bytes(damaged))
    assert not buffer.matches(xxhash.xxh3_64_intdigest(mixed))
    with pytest.raises(CorruptionError, match="checksum mismatch"):
        decode(buffer)


@pytest.mark.parametrize("itemsize", [2, 4, 8, 16])
@pytest.mark.parametrize("count", [1, 1000, (128 << 10) + 3, 300_001])
def test_unshuffle_inverts_shuffle(itemsize: int, count: int) -> None:
    data = np.random.default_rng(count).integers(0, 256, count * itemsize, dtype=np.uint8)
    regrouped = shuffle(data, itemsize, np.empty_like(data)).copy()
    out = np.empty_like(data)
    unshuffle(regrouped, itemsize, out)
    assert np.array_equal(out, data)


# --- ObjectBuffer.read and the replicas ----------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 5000, 300_000])
@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_object_buffer_read_hashes_what_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
                                                 chunk: int) -> None:
    monkeypatch.setattr(buffer_module, "READ_CHUNK", chunk)
    payload = os.urandom(size)
    (tmp_path / "o").write_bytes(payload)
    with open(tmp_path / "o", "rb", buffering=0) as f:
        got = ObjectBuffer.read(f, size)
    assert isinstance(got, ObjectBuffer) and got[:] == payload and got.xxh3 == xxhash.xxh3_64_intdigest(payload)
    with open(tmp_path / "o", "rb", buffering=0) as f:
        short = ObjectBuffer.read(f, size + 10)  # the file shrank since its size was taken
    assert short == payload


def test_replicas_read_into_object_buffers_only_when_asked(tmp_path: Path) -> None:
    payload = b"".join(encode({"w": torch.arange(100.0)}))
    (tmp_path / "o").write_bytes(payload)
    local = LocalReplica(str(tmp_path), "file://x")
    assert local.read("o") == payload and type(local.read("o")) is bytearray
    owned = local.read("o", owned=True)
    assert type(owned) is ObjectBuffer and owned[:] == payload
    assert owned.xxh3 == xxhash.xxh3_64_intdigest(payload)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/o", payload)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no conditional create on memory://: not used here
        remote = FsspecReplica(fs, "/bucket", "memory://bucket")
    assert remote.read("o") == payload
    owned = remote.read("o", owned=True)
    assert type(owned) is ObjectBuffer and owned[:] == payload
    assert owned.xxh3 == xxhash.xxh3_64_intdigest(payload)
    assert torch.equal(decode(owned)["w"], torch.arange(100.0))


# --- CheckpointStore.load --------------------------------------------------------------------------------


def _objects(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name != "MANIFEST" and p.stat().st_size > 10_000]


def test_loads_are_in_place_writable_and_independent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[tuple[int, bool]] = []
    take = ObjectBuffer.take

    def spy(self: ObjectBuffer) -> bool:
        taken.append((len(self), self.verified))
        return take(self)

    monkeypatch.setattr(ObjectBuffer, "take", spy)
    state = mixed_state()
    with CheckpointStore(storage=[str(tmp_path / "a")], write_quorum=1) as store:
        store.save("k", state)
        first, second = store.load("k").state, store.load("k").state
    (size,) = {path.stat().st_size for path in _objects(tmp_path / "a")}
    assert taken == [(size, True), (size, True)]  # read into a buffer, checked whole, handed to decode
    assert_same(first, state)
    first["f32"].mul_(0)
    first["zeros"].add_(1)
    assert_same(second, state)
    assert first["f32"].untyped_storage().data_ptr() != second["f32"].untyped_storage().data_ptr()


def test_load_skips_a_copy_with_a_corrupt_raw_block_and_repairs_it(tmp_path: Path) -> None:
    state = mixed_state()
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    with CheckpointStore(storage=dirs, write_quorum=2) as store:
        store.save("k", state)
        (path,) = _objects(tmp_path / "a")
        data = bytearray(path.read_bytes())
        block = next(b for b in read_frame(memoryview(bytes(data)), "x").blocks if b.encoding == "raw" and b.raw > 1000)
        data[block.offset + 100] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptionError):
            decode(bytes(data))
        loaded = store.load("k")
        assert_same(loaded.state, state)
        assert any(str(path.relative_to(tmp_path / "a")).replace(os.sep, "/") in r for r in loaded.repaired)
    assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_load_of_the_only_copy_with_a_corrupt_raw_block_fails(tmp_path: Path) -> None:
    with CheckpointStore(storage=[str(tmp_path / "a")], write_quorum=1) as store:
        store.save("k", mixed_state())
        (path,) = _objects(tmp_path / "a")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(NoCheckpointError, match="checksum mismatch"):
            store.load("k")
