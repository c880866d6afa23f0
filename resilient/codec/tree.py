"""State -> index tree: the encode side of the tree described in `resilient.codec.format`.

`flatten` walks a state once, checks every value's type, and returns the JSON tree plus the list of leaves
whose bytes become blocks. It reads no tensor data (device copies happen later, one leaf at a time, in
`leaf_bytes`), so an unsupported value is reported before a single byte is written.
"""

from __future__ import annotations

import math
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from resilient.codec.dtypes import numpy_dtype_name, same_size_int, torch_dtype_name
from resilient.codec.format import ALIGN
from resilient.errors import CodecError, UnsupportedTypeError

__all__ = [
    "DeviceTensor",
    "Leaf",
    "MAX_DEPTH",
    "block_step",
    "flatten",
    "float_node",
    "int_node",
    "leaf_bytes",
    "type_name",
]

MAX_DEPTH = 100
"""Deepest container nesting written or read (deeper states are almost surely reference cycles)."""

_INT64 = range(-(1 << 63), 1 << 63)


class DeviceTensor(NamedTuple):
    """A host copy of a tensor that is recorded as living on ``device`` (decode puts it back there).

    Example:
        >>> import torch
        >>> DeviceTensor(torch.zeros(2), "cuda:0").device
        'cuda:0'
    """

    host: torch.Tensor
    device: str


@dataclass(frozen=True)
class Leaf:
    """A value whose bytes are stored in blocks.

    Attributes:
        kind: "tensor", "ndarray", "bytes" (bytes or bytearray) or "pickle" (``value`` is the payload).
        value: the tensor, DeviceTensor, array, bytes or pickle payload.
        nbytes: how many bytes `leaf_bytes` will return.
        itemsize: element size (1 for bytes and pickle), the unit of byte regrouping.
        label: the dtype name reported in statistics.
        path: where the value sits in the state.
        spans: the (start, stop) byte range of each block.
    """

    kind: str
    value: Any
    nbytes: int
    itemsize: int
    label: str
    path: str
    spans: tuple[tuple[int, int], ...]


def type_name(value: Any) -> str:
    """The qualified name of ``value``'s type (``builtins.`` left out)."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def int_node(value: int) -> dict[str, Any]:
    """The node of an int: a JSON number inside int64, else an exact hex string."""
    return {"t": "int", "v": value if value in _INT64 else hex(value)}


def float_node(value: float) -> dict[str, Any]:
    """The node of a float, exact: ``float.hex``, with NaN's sign and payload kept as raw bits."""
    if value != value:
        (bits,) = struct.unpack("<Q", struct.pack("<d", value))
        return {"t": "float", "v": "nan", "bits": f"{bits:016x}"}
    return {"t": "float", "v": value.hex()}


def _scalar_node(value: Any) -> dict[str, Any] | None:
    kind = type(value)
    if value is None:
        return {"t": "none"}
    if kind is bool:
        return {"t": "bool", "v": value}
    if kind is int:
        return int_node(value)
    if kind is float:
        return float_node(value)
    if kind is str:
        return {"t": "str", "v": value}
    return None


def block_step(itemsize: int, block_size: int) -> int:
    """The length of each block of a leaf but its last: at most ``block_size``, whole elements, and a
    multiple of `resilient.codec.format.ALIGN` (so a leaf's raw blocks follow each other with no gap)."""
    return block_size - block_size % math.lcm(itemsize, ALIGN)


def _spans(nbytes: int, itemsize: int, block_size: int) -> tuple[tuple[int, int], ...]:
    step = block_step(itemsize, block_size)
    return tuple((start, min(start + step, nbytes)) for start in range(0, nbytes, step))


class _Flattener:
    def __init__(self, allow_pickle: bool, block_size: int) -> None:
        self.allow_pickle = allow_pickle
        self.block_size = block_size
        self.leaves: list[Leaf] = []
        self.n_blocks = 0

    def leaf(self, node: dict[str, Any], kind: str, value: Any, nbytes: int, itemsize: int, label: str,
             path: str) -> dict[str, Any]:
        spans = _spans(nbytes, itemsize, self.block_size)
        node["b"] = [self.n_blocks, len(spans)]
        self.n_blocks += len(spans)
        self.leaves.append(Leaf(kind, value, nbytes, itemsize, label, path, spans))
        return node

    def unsupported(self, value: Any, path: str, name: str | None = None) -> dict[str, Any]:
        if not self.allow_pickle:
            raise UnsupportedTypeError(path, name or type_name(value))
        try:
            payload = pickle.dumps(value, protocol=5)
        except Exception as exc:  # pickling runs arbitrary __reduce__ code: any error is possible
            raise CodecError(f"{path} ({type_name(value)}) cannot be pickled: {exc!r}") from exc
        return self.leaf({"t": "pickle", "n": len(payload)}, "pickle", payload, len(payload), 1, "pickle", path)

    def tensor(self, tensor: torch.Tensor, device: str, value: Any, path: str) -> dict[str, Any]:
        name = torch_dtype_name(tensor.dtype)
        plain = tensor.layout == torch.strided and not tensor.is_nested and tensor.device.type != "meta"
        if name is None or not plain:
            return self.unsupported(value, path, f"torch.Tensor[{tensor.dtype}, {tensor.layout}]")
        node = {"t": "tensor", "dtype": name, "shape": list(tensor.shape), "device": device}
        nbytes = tensor.numel() * tensor.element_size()
        return self.leaf(node, "tensor", value, nbytes, tensor.element_size(), name, path)

    def node(self, value: Any, path: str, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise CodecError(f"{path}: nested deeper than {MAX_DEPTH} levels (is there a reference cycle?)")
        scalar = _scalar_node(value)
        if scalar is not None:
            return scalar
        kind = type(value)
        if kind is dict or kind is OrderedDict:
            return self.mapping(value, path, depth)
        if kind is list or kind is tuple:
            items = [self.node(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
            return {"t": kind.__name__, "v": items}
        if kind is bytes or kind is bytearray:
            node = {"t": kind.__name__, "n": len(value)}
            return self.leaf(node, "bytes", value, len(value), 1, "bytes", path)
        if kind is DeviceTensor:
            return self.device_tensor(value, path)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return self.tensor(value, str(value.device), value, path)
        if kind is np.ndarray or kind is np.memmap:
            name = numpy_dtype_name(value.dtype)
            if name is None:
                return self.unsupported(value, path, f"numpy.ndarray[{value.dtype}]")
            node = {"t": "ndarray", "dtype": name, "shape": list(value.shape)}
            return self.leaf(node, "ndarray", value, value.nbytes, value.itemsize, f"numpy {name}", path)
        if isinstance(value, np.generic) and numpy_dtype_name(value.dtype) is not None:
            return {"t": "npscalar", "dtype": value.dtype.str, "v": value.tobytes().hex()}
        return self.unsupported(value, path)

    def mapping(self, value: dict[Any, Any], path: str, depth: int) -> dict[str, Any]:
        keys = []
        for key in value:
            node = _scalar_node(key)
            if node is None:
                if self.allow_pickle:
                    return self.unsupported(value, path)
                raise UnsupportedTypeError(f"{path} key {key!r}", type_name(key))
            keys.append(node)
        items = [self.node(v, f"{path}[{k!r}]", depth + 1) for k, v in value.items()]
        return {"t": "odict" if type(value) is OrderedDict else "dict", "k": keys, "v": items}

    def device_tensor(self, value: DeviceTensor, path: str) -> dict[str, Any]:
        host, device = value
        if not (isinstance(host, torch.Tensor) and host.device.type == "cpu"):
            raise CodecError(f"{path}: DeviceTensor.host must be a CPU tensor, got {type_name(host)}")
        try:
            device = str(torch.device(device))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CodecError(f"{path}: DeviceTensor.device {device!r} is not a device: {exc}") from None
        return self.tensor(host, device, value, path)


def flatten(state: Any, *, allow_pickle: bool, block_size: int) -> tuple[dict[str, Any], list[Leaf]]:
    """Describe ``state`` as an index tree and list the leaves whose bytes become blocks.

    Args:
        state: the value to store (see `resilient.codec.encode` for what is supported).
        allow_pickle: pickle unsupported values into ``pickle`` leaves instead of raising.
        block_size: the largest block, in bytes (rounded down to a multiple of each leaf's item size and of
            `resilient.codec.format.ALIGN`).

    Returns:
        The root node and the leaves in block order.

    Raises:
        UnsupportedTypeError: a value that is not stored without pickle, and ``allow_pickle`` is false.
        CodecError: nesting deeper than `MAX_DEPTH`, or a value that cannot be pickled.
    """
    flattener = _Flattener(allow_pickle, block_size)
    return flattener.node(state, "state", 0), flattener.leaves


def _host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if tensor.device.type != "cpu":
        pin = tensor.device.type == "cuda" and torch.cuda.is_available()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        as_int = same_size_int(tensor.dtype)
        host.view(as_int).copy_(tensor.view(as_int))
        tensor = host
    elif not tensor.is_contiguous():
        tensor = tensor.view(same_size_int(tensor.dtype)).contiguous()
    return tensor.reshape(-1).view(torch.uint8)


def leaf_bytes(leaf: Leaf) -> np.ndarray:
    """The bytes of ``leaf`` as a flat uint8 array (a view where the value is contiguous host memory).

    Tensors on other devices are copied to host memory here (pinned when CUDA is available).

    Raises:
        CodecError: the value changed size since `flatten` described it.
    """
    value = leaf.value
    if leaf.kind == "tensor":
        tensor = value.host if type(value) is DeviceTensor else value
        data = _host_bytes(tensor).numpy()
    elif leaf.kind == "ndarray":
        data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    else:
        data = np.frombuffer(value, dtype=np.uint8)
    if data.size != leaf.nbytes:
        raise CodecError(f"{leaf.path} changed size while being encoded ({leaf.nbytes} -> {data.size} bytes)")
    return data
