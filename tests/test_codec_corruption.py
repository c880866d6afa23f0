"""Damaged, foreign, newer and malicious objects: decode and verify refuse them with CodecError subclasses only.

Objects are also built by hand here, from the layout documented in `resilient.codec.format` (struct, json,
xxhash), so the tests check the documented format rather than the writer's own helpers.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient.codec import FORMAT_VERSION, decode, encode, verify
from resilient.errors import CodecError, CorruptionError, UnsafeCheckpointError

MAGIC = b"\x89RESCK\r\n"


def blob(state: Any, **options: Any) -> bytes:
    return b"".join(encode(state, **options))


def make_object(tree: Any, segments: list[tuple[bytes, str, int]], *, version: int = 1) -> bytes:
    """An object from (stored bytes, encoding, raw length) segments and a tree, per the documented layout:
    version 1 blocks follow each other, version 2 blocks start at multiples of 64 after zero gaps."""
    out = bytearray(struct.pack("<8sHHI", MAGIC, version, 0, 0))
    table = []
    for stored, encoding, raw in segments:
        if version >= 2:
            out += bytes(-len(out) % 64)
        table.append([len(out), len(stored), raw, encoding, f"{xxhash.xxh3_64_intdigest(stored):016x}"])
        out += stored
    return close(bytes(out), {"version": version, "writer": "hand", "tree": tree, "blocks": table})


def close(body: bytes, doc: Any, version: int | None = None) -> bytes:
    """Append an index and a valid footer to ``body`` (the index may say anything); the footer's version is
    the header's unless given."""
    index = json.dumps(doc).encode()
    if version is None:
        version = struct.unpack_from("<8sHHI", body)[1]
    return body + index + struct.pack("<QQHHI8s", len(index), xxhash.xxh3_64_intdigest(index), version, 0, 0, MAGIC)


def split(data: bytes) -> tuple[bytes, Any]:
    """The bytes before the index, and the parsed index."""
    (length,) = struct.unpack_from("<Q", data, len(data) - 32)
    start = len(data) - 32 - length
    return data[:start], json.loads(data[start : len(data) - 32])


def small_state() -> dict[str, Any]:
    return {
        "z": torch.zeros(300),  # zstd under "zstd"
        "w": (torch.arange(200, dtype=torch.float32) * 0.01).to(torch.bfloat16),  # shuffle+zstd
        "raw": torch.tensor([1, 2, 3], dtype=torch.int8),
        "np": np.arange(4, dtype=np.int16),
        "meta": {"step": 7, "lr": 0.5, "name": "run", "big": 2**70, "blob": b"abc"},
    }


@pytest.fixture(scope="module")
def small() -> bytes:
    data = blob(small_state(), compression="zstd")
    assert {e for e, n in verify(data).stored_by_encoding.items() if n} == {"zstd", "shuffle+zstd"}
    return data


def assert_refused_or_same(data: bytes, original: bytes) -> None:
    try:
        state = decode(data)
    except CodecError:
        return
    assert blob(state, compression="zstd") == original


def test_every_truncation_is_corruption(small: bytes) -> None:
    for end in range(len(small)):
        with pytest.raises(CorruptionError):
            decode(small[:end])
        with pytest.raises(CorruptionError):
            verify(small[:end])


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_flipped_byte_is_corruption(small: bytes, mask: int) -> None:
    for position in range(len(small)):
        damaged = bytearray(small)
        damaged[position] ^= mask
        with pytest.raises(CorruptionError):
            decode(damaged)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_damage_never_gives_a_wrong_state(data: st.DataObject) -> None:
    original = blob({"w": torch.arange(3000, dtype=torch.float32), "ids": torch.arange(5000) % 7}, block_size=4096)
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        damaged = damaged[: data.draw(st.integers(0, len(damaged)))]
    if bytes(damaged) == original:
        return
    with pytest.raises(CorruptionError):
        decode(damaged)


@pytest.mark.parametrize(
    "foreign",
    [b"", b"\x89RESCK\r", b"PK\x03\x04" + bytes(100), bytes(64), b"\x89PNG\r\n\x1a\n" + bytes(64)],
)
def test_foreign_objects_are_corruption(foreign: bytes) -> None:
    with pytest.raises(CorruptionError):
        decode(foreign)


def test_torch_save_output_is_not_a_checkpoint_object() -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer)
    with pytest.raises(CorruptionError, match="not a resilient checkpoint object"):
        decode(buffer.getvalue(), where="s3://bucket/x")


def test_newer_version_says_which_and_what_is_supported() -> None:
    data = make_object({"t": "none"}, [], version=FORMAT_VERSION + 1)
    with pytest.raises(CorruptionError, match=rf"format version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}") as info:
        decode(data, where="replica-a/gen-3")
    assert info.value.where == "replica-a/gen-3"


@pytest.mark.parametrize("version", [1, 2])
def test_hand_built_object_matches_the_documented_layout(version: int) -> None:
    payload = np.arange(6, dtype=np.float32).tobytes()
    tree = {"t": "dict", "k": [{"t": "str", "v": "w"}, {"t": "str", "v": "n"}],
            "v": [{"t": "tensor", "dtype": "float32", "shape": [2, 3], "device": "cpu", "b": [0, 2]},
                  {"t": "float", "v": (1.5).hex()}]}
    frame = zstandard.ZstdCompressor().compress(payload[12:])
    data = make_object(tree, [(payload[:12], "raw", 12), (frame, "zstd", 12)], version=version)
    out = decode(data)
    assert torch.equal(out["w"], torch.arange(6.0).reshape(2, 3)) and out["n"] == 1.5
    assert verify(data).format_version == version


def test_writer_output_matches_the_documented_layout() -> None:
    data = blob({"a": torch.arange(5, dtype=torch.int8), "b": torch.ones(1000), "c": b"xyz"}, compression="off")
    assert struct.unpack_from("<8sHHI", data) == (MAGIC, FORMAT_VERSION, 0, 0)
    body, doc = split(data)
    assert doc["version"] == struct.unpack_from("<H", data, len(data) - 16)[0] == FORMAT_VERSION
    end = 16
    for offset, stored, raw, encoding, _ in doc["blocks"]:
        assert offset == -(-end // 64) * 64 and body[end:offset] == bytes(offset - end)
        end = offset + stored
    assert end == len(body)


def test_nonzero_gap_bytes_are_corruption() -> None:
    tree = {"t": "list", "v": [{"t": "bytes", "n": 3, "b": [0, 1]}, {"t": "bytes", "n": 2, "b": [1, 1]}]}
    data = make_object(tree, [(b"abc", "raw", 3), (b"de", "raw", 2)], version=2)
    assert decode(data) == [b"abc", b"de"]
    for position in (16, 63, 67, 127):  # the gaps before block 0 (16..63) and block 1 (67..127)
        damaged = bytearray(data)
        damaged[position] = 1
        for check in (decode, verify):
            with pytest.raises(CorruptionError, match="gap bytes before it are not zero"):
                check(bytes(damaged))


def test_version_1_objects_have_no_gaps() -> None:
    tree = {"t": "list", "v": [{"t": "bytes", "n": 3, "b": [0, 1]}, {"t": "bytes", "n": 2, "b": [1, 1]}]}
    v1 = make_object(tree, [(b"abc", "raw", 3), (b"de", "raw", 2)], version=1)
    assert decode(v1) == [b"abc", b"de"]
    body, doc = split(make_object(tree, [(b"abc", "raw", 3), (b"de", "raw", 2)], version=2))
    doc["version"] = 1
    v1_with_gaps = bytearray(close(body, doc, version=1))
    v1_with_gaps[8:10] = struct.pack("<H", 1)
    with pytest.raises(CorruptionError, match="block 0: at offset 64 .*expected 16"):
        decode(bytes(v1_with_gaps))


# --- pickle segments ----------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


def _pickle_object(marker: Path, *, corrupt_after: bool = False) -> bytes:
    payload = pickle.dumps(_Payload(marker))
    tensor = np.arange(4, dtype=np.float32).tobytes()
    tree = {"t": "dict", "k": [{"t": "str", "v": "evil"}, {"t": "str", "v": "w"}],
            "v": [{"t": "pickle", "n": len(payload), "b": [0, 1]},
                  {"t": "tensor", "dtype": "float32", "shape": [4], "device": "cpu", "b": [1, 1]}]}
    data = bytearray(make_object(tree, [(payload, "pickle", len(payload)), (tensor, "raw", len(tensor))]))
    if corrupt_after:
        data[struct.calcsize("<8sHHI") + len(payload) + 2] ^= 0xFF
    return bytes(data)


def test_pickle_segment_is_refused_before_it_is_read(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = _pickle_object(marker)
    with pytest.raises(UnsafeCheckpointError, match=r"state\['evil'\]"):
        decode(data)
    assert not marker.exists()
    assert verify(data).has_pickle and not marker.exists()
    with pytest.raises(CorruptionError):
        decode(_pickle_object(marker, corrupt_after=True), allow_pickle=True)
    assert not marker.exists()  # every block is checked before anything is unpickled
    out = decode(data, allow_pickle=True)
    out["evil"].close()
    assert marker.exists()


def test_pickle_blocks_are_only_allowed_in_pickle_leaves(tmp_path: Path) -> None:
    payload = pickle.dumps(_Payload(tmp_path / "pwned"))
    tree = {"t": "bytes", "n": len(payload), "b": [0, 1]}
    with pytest.raises(CorruptionError):
        decode(make_object(tree, [(payload, "pickle", len(payload))]))
    tree = {"t": "pickle", "n": len(payload), "b": [0, 1]}
    with pytest.raises(CorruptionError):
        decode(make_object(tree, [(payload, "raw", len(payload))]), allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


# --- malicious indexes with valid checksums -----------------------------------------------------------


def _set(path: list[Any], value: Any) -> Any:
    def mutate(doc: Any) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


_TENSOR = ["tree", "v", 0]  # the first value of the root dict of small_state(): "z"
_MUTATIONS = {
    "dtype object": _set([*_TENSOR, "dtype"], "object"),
    "dtype not a str": _set([*_TENSOR, "dtype"], ["float32"]),
    "negative dim": _set([*_TENSOR, "shape"], [-300]),
    "shape too big": _set([*_TENSOR, "shape"], [301]),
    "shape huge": _set([*_TENSOR, "shape"], [2**62, 2**62]),
    "bool dim": _set([*_TENSOR, "shape"], [True]),
    "block range": _set([*_TENSOR, "b"], [1, 1]),
    "block range long": _set([*_TENSOR, "b"], [0, 100]),
    "bad device": _set([*_TENSOR, "device"], "warp:9"),
    "unknown node": _set([*_TENSOR, "t"], "module"),
    "extra key": _set([*_TENSOR, "x"], 1),
    "offset gap": _set(["blocks", 1, 0], 10**6),
    "offset overlap": _set(["blocks", 1, 0], 16),
    "raw length": _set(["blocks", 0, 2], 1 << 40),
    "stored length": _set(["blocks", 0, 1], 0),
    "encoding": _set(["blocks", 0, 3], "lz4"),
    "checksum text": _set(["blocks", 0, 4], "0x12345678901234"),
    "float in json": _set(["tree", "v", 4, "v", 1, "v"], 0.5),
    "bad float hex": _set(["tree", "v", 4, "v", 1, "v"], "0x1p99999"),
    "bad int hex": _set(["tree", "v", 4, "v", 3, "v"], "12"),
    "dict lengths": _set(["tree", "k"], []),
    "duplicate keys": _set(["tree", "k", 1], {"t": "str", "v": "z"}),
    "list key": _set(["tree", "k", 0], {"t": "list", "v": []}),
    "version mismatch": _set(["version"], 1),
    "misaligned block": lambda doc: doc["blocks"][1].__setitem__(0, doc["blocks"][1][0] + 8),
    "missing blocks": _set(["blocks"], {}),
    "extra block": lambda doc: doc["blocks"].append(list(doc["blocks"][-1])),
    "deep": _set(["tree"], json.loads('{"t": "list", "v": [' * 150 + "]}" * 150)),
}


@pytest.mark.parametrize("name", sorted(_MUTATIONS))
def test_malicious_indexes_with_valid_checksums_are_refused(small: bytes, name: str) -> None:
    body, doc = split(small)
    _MUTATIONS[name](doc)
    data = close(body, doc)
    with pytest.raises(CorruptionError):
        decode(data)
    with pytest.raises(CorruptionError):
        verify(data)


def test_json_nested_past_the_parser_limit_is_corruption(small: bytes) -> None:
    body, _ = split(small)
    index = b"[" * 100_000 + b"]" * 100_000
    data = body + index + struct.pack(
        "<QQHHI8s", len(index), xxhash.xxh3_64_intdigest(index), FORMAT_VERSION, 0, 0, MAGIC
    )
    with pytest.raises(CorruptionError):
        decode(data)


def test_zstd_frame_declaring_more_than_the_index_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    tree = {"t": "bytes", "n": 100, "b": [0, 1]}
    with pytest.raises(CorruptionError, match="declares"):
        decode(make_object(tree, [(bomb, "zstd", 100)]))
    truncated = zstandard.ZstdCompressor().compress(b"x" * 100)[:-3]
    with pytest.raises(CorruptionError):
        decode(make_object(tree, [(truncated, "zstd", 100)]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6)
    | st.sampled_from(["cpu", "cuda:0", "float32", "<f4", "tensor", "dict", "nan", "0x1p3", "raw", "zstd"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("tvkbnx"), inner, max_size=3),
    max_leaves=6,
)


def _slots(doc: Any, trail: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [trail] if trail else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        found += _slots(value, (*trail, key))
    return found


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzzed_indexes_fail_only_with_codec_errors(small: bytes, data: st.DataObject) -> None:
    body, doc = split(small)
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        trail = data.draw(st.sampled_from(_slots(doc)))
        _set(list(trail), data.draw(json_values))(doc)
    damaged = close(body, doc)
    for check in (decode, verify):
        try:
            check(damaged)
        except CodecError:
            pass


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_fuzzed_blocks_with_valid_checksums_fail_only_with_codec_errors(small: bytes, data: st.DataObject) -> None:
    body, doc = split(small)
    n = data.draw(st.integers(0, len(doc["blocks"]) - 1))
    offset, stored, raw, encoding, _ = doc["blocks"][n]
    block = bytearray(body[offset : offset + stored])
    for _ in range(data.draw(st.integers(1, 3))):
        block[data.draw(st.integers(0, stored - 1))] = data.draw(st.integers(0, 255))
    doc["blocks"][n][4] = f"{xxhash.xxh3_64_intdigest(bytes(block)):016x}"
    damaged = close(body[:offset] + bytes(block) + body[offset + stored :], doc)
    try:
        decode(damaged)
    except CodecError:
        pass
