"""SnapshotBuffers: copies into reused buffers, and snapshots that encode like the state they copy."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch

from resilient.codec import DeviceTensor, SnapshotBuffers, decode, encode
from resilient.errors import CodecError

CUDA = torch.cuda.is_available()


def make_state() -> dict[str, Any]:
    return {
        "model": OrderedDict(w=torch.randn(64, 32), b=torch.zeros(32, dtype=torch.bfloat16)),
        "opt": {"step": 3, "lr": 0.1, "moments": [torch.ones(5), (torch.arange(4), np.arange(3.0))]},
        "name": "run-1",
        "raw": b"abc",
        "buf": bytearray(b"xyz"),
        "none": None,
    }


def test_snapshot_is_a_structural_copy() -> None:
    state = make_state()
    snap = SnapshotBuffers().take(state)
    assert type(snap["model"]) is OrderedDict and type(snap["opt"]["moments"][1]) is tuple
    assert snap["opt"]["step"] == 3 and snap["name"] is state["name"] and snap["raw"] is state["raw"]
    assert snap["buf"] == state["buf"] and snap["buf"] is not state["buf"]
    assert snap["model"]["w"] is not state["model"]["w"]
    assert torch.equal(snap["model"]["w"], state["model"]["w"])
    assert np.array_equal(snap["opt"]["moments"][1][1], state["opt"]["moments"][1][1])


def test_values_are_copies_not_views() -> None:
    state = make_state()
    snap = SnapshotBuffers().take(state)
    before = snap["model"]["w"].clone()
    state["model"]["w"].add_(1.0)
    state["opt"]["moments"][1][1][:] = -1
    state["buf"][0] = 0
    assert torch.equal(snap["model"]["w"], before)
    assert snap["opt"]["moments"][1][1].tolist() == [0.0, 1.0, 2.0]
    assert snap["buf"] == bytearray(b"xyz")


def test_buffers_are_reused_for_same_shape_and_dtype() -> None:
    buffers = SnapshotBuffers()
    state = make_state()
    first = buffers.take(state)
    pointers = (first["model"]["w"].data_ptr(), first["opt"]["moments"][1][1].ctypes.data)
    state["model"]["w"].mul_(2.0)
    second = buffers.take(state)
    assert (second["model"]["w"].data_ptr(), second["opt"]["moments"][1][1].ctypes.data) == pointers
    assert torch.equal(second["model"]["w"], state["model"]["w"])
    assert buffers.nbytes == 64 * 32 * 4 + 32 * 2 + 5 * 4 + 4 * 8 + 3 * 8


def test_shape_or_dtype_change_reallocates_and_vanished_paths_are_dropped() -> None:
    buffers = SnapshotBuffers()
    state = make_state()
    first = buffers.take(state)
    old_w, old_b = first["model"]["w"].data_ptr(), first["model"]["b"].data_ptr()
    state["model"]["w"] = torch.randn(10, 10)
    state["model"]["b"] = torch.zeros(32, dtype=torch.float32)
    del state["opt"]
    second = buffers.take(state)
    assert second["model"]["w"].shape == (10, 10) and second["model"]["w"].data_ptr() != old_w
    assert second["model"]["b"].dtype == torch.float32 and second["model"]["b"].data_ptr() != old_b
    assert buffers.nbytes == 10 * 10 * 4 + 32 * 4


def test_non_contiguous_and_exotic_dtype_sources() -> None:
    base = torch.randn(8, 6)
    int4 = torch.empty((4, 6), dtype=torch.int4)
    int4.view(torch.uint8).copy_(torch.arange(24, dtype=torch.uint8).reshape(4, 6))
    state = {"t": base.t(), "c": torch.randn(3, dtype=torch.complex64).conj(), "q": int4.t()}
    snap = SnapshotBuffers().take(state)
    assert snap["t"].is_contiguous() and torch.equal(snap["t"], base.t())
    assert torch.equal(snap["c"], state["c"].resolve_conj())
    assert torch.equal(snap["q"].view(torch.uint8), int4.t().view(torch.uint8).contiguous())


def test_snapshot_encodes_like_the_state() -> None:
    buffers = SnapshotBuffers()
    state = make_state()
    snap = buffers.take(state)
    assert b"".join(encode(snap)) == b"".join(encode(state))
    out = decode(b"".join(encode(snap)))
    assert torch.equal(out["model"]["w"], state["model"]["w"]) and out["opt"]["step"] == 3


def test_cycles_are_refused() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(CodecError, match="nested deeper"):
        SnapshotBuffers().take(cycle)


def test_device_tensors_are_copied_and_keep_their_device() -> None:
    host = torch.arange(6.0)
    snap = SnapshotBuffers().take({"d": DeviceTensor(host, "cuda:0")})
    assert isinstance(snap["d"], DeviceTensor) and snap["d"].device == "cuda:0"
    assert snap["d"].host is not host and torch.equal(snap["d"].host, host)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_tensors_snapshot_to_pinned_host_and_restore_to_their_device() -> None:
    buffers = SnapshotBuffers()
    state = {"w": torch.randn(256, 128, device="cuda").t(), "h": torch.randn(1000, device="cuda").half(),
             "cpu": torch.ones(3)}
    snap = buffers.take(state)
    assert isinstance(snap["w"], DeviceTensor) and snap["w"].device == str(state["w"].device)
    assert snap["w"].host.is_pinned() and snap["w"].host.device.type == "cpu"
    pointer = snap["w"].host.data_ptr()
    state["w"].add_(1.0)
    assert buffers.take(state)["w"].host.data_ptr() == pointer
    out = decode(b"".join(encode(buffers.take(state), block_size=4096)))
    assert out["w"].device == state["w"].device and torch.equal(out["w"], state["w"])
    assert out["h"].device == state["h"].device and torch.equal(out["h"], state["h"])
    assert out["cpu"].device.type == "cpu"
