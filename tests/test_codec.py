"""Round trips of resilient.codec: every supported type, dtype, layout, block split, thread count and mode."""

from __future__ import annotations

import math
import struct
from collections import OrderedDict, namedtuple
from dataclasses import FrozenInstanceError
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resilient.codec as codec
from resilient.codec import DeviceTensor, ObjectInfo, decode, encode, verify
from resilient.codec.dtypes import NUMPY_DTYPES, TORCH_DTYPES
from resilient.errors import CodecError, ConfigError, UnsupportedTypeError

MODES = ("auto", "zstd", "off")
CUDA = torch.cuda.is_available()


def blob(state: Any, **options: Any) -> bytes:
    return b"".join(encode(state, **options))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: Any, want: Any, path: str = "state") -> None:
    """Exact equality: same types (Parameter -> Tensor, DeviceTensor -> Tensor), bits, dtypes, shapes."""
    if isinstance(want, DeviceTensor):
        want = want.host
    if isinstance(want, torch.Tensor):
        assert type(got) is torch.Tensor, path
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path
        assert torch.equal(bits(got.cpu()), bits(want.cpu())), path
        return
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype.str == want.dtype.str and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), path
    elif isinstance(want, dict):
        assert len(got) == len(want), path
        for (gk, gv), (wk, wv) in zip(got.items(), want.items()):
            assert_same(gk, wk, f"{path} key")
            assert_same(gv, wv, f"{path}[{wk!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, path


def filled(shape: tuple[int, ...], dtype: torch.dtype, data: bytes) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    flat = tensor.reshape(-1).view(torch.uint8).numpy()
    flat[:] = np.resize(np.frombuffer(data, dtype=np.uint8), flat.size) if data else 0
    if dtype == torch.bool:
        flat &= 1
    return tensor


# --- hypothesis: random nested states ------------------------------------------------------------------

_DTYPES = [torch.bfloat16, torch.float16, torch.bool, torch.int8, torch.uint8, torch.int64, torch.float64,
           torch.complex64, torch.float32]
_shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
_nan_bits = st.integers(0, (1 << 52) - 1).map(lambda m: struct.unpack("<d", struct.pack("<Q", 0x7FF0 << 48 | m | 1))[0])


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(_shapes)
    size = math.prod(shape) * dtype.itemsize
    return filled(shape, dtype, draw(st.binary(min_size=size, max_size=size)))


@st.composite
def arrays(draw: Any) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(sorted(NUMPY_DTYPES))))
    shape = draw(_shapes)
    size = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=size, max_size=size))
    if dtype.kind == "b":
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(-0.0), _nan_bits)
_keys = st.one_of(st.text(max_size=8), st.integers(-(2**70), 2**70), _floats, st.booleans(), st.none())
_np_scalars = st.one_of(st.floats(width=32).map(np.float32), st.integers(-(2**63), 2**63 - 1).map(np.int64),
                        st.booleans().map(np.bool_), st.integers(0, 255).map(np.uint8))
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**300), 2**300), _floats, st.text(max_size=20),
    st.binary(max_size=64), st.binary(max_size=64).map(bytearray), tensors(), arrays(), _np_scalars,
)
states = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
        st.dictionaries(_keys, children, max_size=4).map(OrderedDict),
    ),
    max_leaves=12,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states, mode=st.sampled_from(MODES))
def test_random_states_round_trip_exactly(state: Any, mode: str) -> None:
    data = blob(state, compression=mode, block_size=1024)
    assert_same(decode(data), state)
    assert verify(data).total_bytes == len(data)


# --- dtypes and layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
def test_every_allowed_torch_dtype_round_trips(name: str) -> None:
    dtype = TORCH_DTYPES[name]
    noise = np.random.default_rng(1).integers(0, 256, 40_000, dtype=np.uint8).tobytes()
    state = {
        "small": filled((3, 5), dtype, noise),
        "big": filled((50, 100), dtype, noise),  # crosses TINY_BYTES for auto sampling, split at 4 KiB
        "scalar": filled((), dtype, noise),
        "empty": filled((0, 7), dtype, b""),
    }
    for mode in MODES:
        assert_same(decode(blob(state, compression=mode, block_size=4096)), state)


def test_quantized_tensors_are_unsupported_without_pickle() -> None:
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(UnsupportedTypeError) as info:
        blob({"q": q})
    assert info.value.path == "state['q']"


def test_non_contiguous_transposed_expanded_conj_and_parameter_tensors() -> None:
    base = torch.randn(64, 48)
    c = torch.randn(10, 10, dtype=torch.complex64)
    state = {
        "t": base.t(),
        "strided": base[::3, 1::2],
        "expanded": torch.arange(5.0).expand(4, 5),
        "conj": c.conj(),
        "neg": c.conj().imag,
        "param": torch.nn.Parameter(torch.randn(3, 3)),
        "int4": filled((6, 4), torch.int4, bytes(range(24))).t(),
    }
    for mode in MODES:
        out = decode(blob(state, compression=mode))
        for key, value in state.items():
            want = value.resolve_conj().resolve_neg().detach()
            assert out[key].is_contiguous() and out[key].shape == want.shape, key
            assert torch.equal(bits(out[key]), bits(want.view(torch.uint8) if key == "int4" else want)), key


def test_numpy_arrays_keep_dtype_byte_order_and_layout() -> None:
    a = np.arange(24, dtype=">f4").reshape(4, 6)
    state = {"be": a, "t": a.T, "f16": np.ones((2, 2), np.float16), "b": np.array([True, False]),
             "c": np.array(1 + 2j), "scalar": np.float64(-0.0), "empty": np.zeros((0, 3), np.int32)}
    out = decode(blob(state))
    assert_same(out, {**state, "t": np.ascontiguousarray(a.T)})
    assert out["be"].dtype.str == ">f4"


def test_python_scalars_are_exact() -> None:
    neg_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_0000_1234))[0]
    state = [2**64, -(2**1000), 2**63 - 1, -(2**63), 0.1, -0.0, math.inf, -math.inf, neg_nan, 5e-324,
             "\u00e9\U0001f600\ud800", b"\x00\xff", bytearray(b"ab"), None, True, False]
    assert_same(decode(blob(state)), state)


def test_containers_keep_their_types_and_key_types() -> None:
    state = OrderedDict([("b", 1), ("a", (1, [2, ()])), (3, {}), (2.5, []), (None, OrderedDict()), (True, "x")])
    out = decode(blob(state))
    assert_same(out, state)
    assert list(out) == ["b", "a", 3, 2.5, None, True]


@pytest.mark.parametrize("state", [None, {}, [], (), 0, "", b"", torch.empty(0)])
def test_trivial_states(state: Any) -> None:
    assert_same(decode(blob(state)), state)


# --- blocks, threads, streaming ------------------------------------------------------------------------


def test_large_leaves_are_split_into_blocks_of_whole_elements() -> None:
    state = {"c128": torch.randn(1000, dtype=torch.complex128), "f32": torch.randn(3000) * 0.01,
             "bytes": bytes(range(256)) * 40}
    data = blob(state, compression="zstd", block_size=1100)  # not a multiple of 64 (block alignment): 1088
    info = verify(data)
    assert info.n_blocks == math.ceil(16000 / 1088) + math.ceil(12000 / 1088) + math.ceil(10240 / 1088)
    assert_same(decode(data), state)


@pytest.mark.parametrize("mode", MODES)
def test_threads_do_not_change_the_object(mode: str) -> None:
    rng = np.random.default_rng(2)
    state = {f"w{i}": torch.from_numpy(rng.standard_normal(20_000).astype(np.float32)) for i in range(4)}
    state["ids"] = torch.from_numpy(rng.integers(0, 1000, 30_000))
    state["noise"] = torch.from_numpy(rng.integers(0, 256, 50_000, dtype=np.uint8))
    objects = {threads: blob(state, compression=mode, threads=threads, block_size=8192) for threads in (1, 2, 4)}
    assert objects[1] == objects[2] == objects[4]
    for threads in (1, 3):
        assert_same(decode(objects[2], threads=threads), state)


def test_raw_chunks_are_zero_copy_views_of_the_tensor() -> None:
    tensor = torch.zeros(1 << 18)  # 1 MiB, above the coalescing limit
    chunks = encode({"t": tensor}, compression="off")
    views = [c for c in chunks if isinstance(c, memoryview)]
    assert len(views) == 1 and len(views[0]) == tensor.numel() * 4
    tensor[0] = 1.0
    assert bytes(views[0][:4]) == struct.pack("<f", 1.0)


def test_small_chunks_are_coalesced() -> None:
    state = {f"t{i}": torch.full((10,), float(i)) for i in range(500)}
    chunks = list(encode(state))
    assert len(chunks) <= 3
    assert_same(decode(b"".join(chunks)), state)


def test_encode_is_lazy_and_checks_everything_before_the_first_chunk() -> None:
    chunks = encode({"ok": torch.ones(3), "bad": object()})
    with pytest.raises(UnsupportedTypeError):
        next(chunks)


# --- compression choice -------------------------------------------------------------------------------


def _only_encoding(info: ObjectInfo) -> set[str]:
    return {e for e, n in info.stored_by_encoding.items() if n}


def test_auto_shuffles_bf16_weights() -> None:
    info = verify(blob({"w": (torch.randn(512, 1024) * 0.02).to(torch.bfloat16)}))
    assert _only_encoding(info) == {"shuffle+zstd"}
    assert info.by_dtype["bfloat16"].ratio > 1.35


def test_auto_stores_random_bytes_raw() -> None:
    noise = torch.from_numpy(np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8))
    assert _only_encoding(verify(blob({"noise": noise, "b": noise.numpy().tobytes()}))) == {"raw"}


def test_auto_compresses_token_ids_and_text_bytes() -> None:
    rng = np.random.default_rng(4)
    ids = torch.from_numpy(np.minimum(rng.zipf(1.3, 1 << 17), 50_256).astype(np.int64))
    info = verify(blob({"ids": ids}))
    assert _only_encoding(info) <= {"zstd", "shuffle+zstd"} and info.by_dtype["int64"].ratio > 4
    text = b"".join(b'{"id": %d, "label": "positive"}\n' % i for i in range(5000))
    info = verify(blob({"text": text}))
    assert _only_encoding(info) == {"zstd"} and info.by_dtype["bytes"].ratio > 4


def test_auto_leaves_tiny_leaves_raw_and_zstd_mode_always_compresses() -> None:
    state = {"tiny": torch.zeros(16), "big": torch.from_numpy(np.random.default_rng(5).integers(0, 2**31, 10_000, dtype=np.int32))}
    assert _only_encoding(verify(blob(state, compression="auto"))) == {"raw"}
    assert _only_encoding(verify(blob(state, compression="zstd"))) <= {"zstd", "shuffle+zstd"}
    assert _only_encoding(verify(blob(state, compression="off"))) == {"raw"}


@pytest.mark.parametrize("level", [-7, 1, 3])
def test_levels(level: int) -> None:
    state = {"w": torch.randn(100_000) * 0.01}
    assert_same(decode(blob(state, level=level, compression="zstd")), state)


# --- options, errors, pickle opt-in, devices ---------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{"compression": "lz4"}, {"level": 23}, {"threads": 0}, {"block_size": 100}, {"level": 1.5}]
)
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        blob({}, **options)


class Custom:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is Custom and other.value == self.value


Point = namedtuple("Point", "x y")


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"opt": {"fn": lambda x: x}}, "state['opt']['fn']"),
        ({"model": {"w": [1, 2, 3, Custom(1)]}}, "state['model']['w'][3]"),
        ([Point(1, 2)], "state[0]"),
        ({"a": {(1, 2): 3}}, "state['a'] key (1, 2)"),
        ({"o": np.array([object()])}, "state['o']"),
        ({"s": {1, 2}}, "state['s']"),
    ],
)
def test_unsupported_values_name_their_path(state: Any, path: str) -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        blob(state)
    assert info.value.path == path
    assert path in str(info.value)


def test_allow_pickle_round_trips_other_types() -> None:
    state = {"c": Custom(7), "p": Point(1, 2), "k": {(1, 2): 3}, "t": torch.ones(2), "s": {1, 2}}
    data = blob(state, allow_pickle=True)
    assert verify(data).has_pickle
    out = decode(data, allow_pickle=True)
    assert out["c"] == Custom(7) and out["p"] == Point(1, 2) and out["k"] == {(1, 2): 3} and out["s"] == {1, 2}
    assert_same(out["t"], state["t"])


def test_unpicklable_value_with_allow_pickle_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match=r"state\['fn'\].*cannot be pickled"):
        blob({"fn": lambda: 1}, allow_pickle=True)


def test_reference_cycles_and_deep_nesting_are_refused() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(CodecError, match="nested deeper"):
        blob(cycle)
    deep: Any = 0
    for _ in range(200):
        deep = [deep]
    with pytest.raises(CodecError, match="nested deeper"):
        blob(deep)


def test_map_location_forms() -> None:
    state = {"t": torch.randn(3), "d": DeviceTensor(torch.arange(4), "cuda:0")}
    data = blob(state)
    for location in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}, lambda saved: "cpu"):
        out = decode(data, map_location=location)
        assert out["d"].device.type == "cpu" and out["t"].device.type == "cpu"
        assert_same(out, state)
    if not CUDA:
        with pytest.raises(CodecError, match='map_location="cpu"'):
            decode(data)
        with pytest.raises(CodecError, match="cuda:0"):
            decode(data, map_location={"cpu": "cpu"})


def test_device_tensor_records_its_device_and_map_location_is_asked_once_per_device() -> None:
    seen: list[str] = []
    state = {"a": DeviceTensor(torch.ones(2), "cuda:1"), "b": DeviceTensor(torch.zeros(3), "cuda:1"),
             "c": torch.ones(1)}
    out = decode(blob(state), map_location=lambda saved: seen.append(saved) or "cpu")
    assert sorted(seen) == ["cpu", "cuda:1"]
    assert_same(out, state)
    with pytest.raises(CodecError, match="not a device"):
        blob({"d": DeviceTensor(torch.ones(2), "warp-drive:9")})


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_tensors_round_trip_to_their_device() -> None:
    state = {"w": torch.randn(300, 200, device="cuda").t(), "h": torch.randn(5000, device="cuda").half()}
    out = decode(blob(state, block_size=4096))
    for key in state:
        assert out[key].device == state[key].device
        assert torch.equal(bits(out[key]).cpu(), bits(state[key]).cpu())
    assert decode(blob(state), map_location="cpu")["w"].device.type == "cpu"


# --- public surface -----------------------------------------------------------------------------------


def test_exported_names_are_pinned_and_sorted() -> None:
    assert codec.__all__ == sorted(codec.__all__)
    assert set(codec.__all__) == {"DeviceTensor", "DtypeStats", "FORMAT_VERSION", "MapLocation", "ObjectBuffer",
                                  "ObjectInfo", "SnapshotBuffers", "decode", "encode", "verify"}


def test_object_info_is_frozen_and_counts_bytes() -> None:
    state = {"w": torch.randn(1000), "b": b"x" * 10_000, "a": np.zeros(10)}
    data = blob(state)
    info = verify(data)
    assert (info.format_version, info.n_tensors, info.n_arrays, info.total_bytes) == (2, 1, 1, len(data))
    assert info.raw_bytes == 4000 + 10_000 + 80 == sum(info.raw_by_encoding.values())
    assert info.stored_bytes == sum(info.stored_by_encoding.values()) < info.raw_bytes
    with pytest.raises(FrozenInstanceError):
        info.n_tensors = 3  # type: ignore[misc]
