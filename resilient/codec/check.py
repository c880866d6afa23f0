"""Index tree -> state: the decode side of the tree described in `resilient.codec.format`.

`check_tree` validates the whole JSON tree against the block table before any block is read, and compiles it
into a small plan: constants already parsed, and `Slot`s describing each leaf to allocate. `build` then
assembles the state from the plan and the decoded leaf values; it cannot fail.
"""

from __future__ import annotations

import math
import re
import struct
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch

from resilient.codec.dtypes import NUMPY_DTYPES, TORCH_DTYPES
from resilient.codec.format import Block
from resilient.codec.tree import MAX_DEPTH
from resilient.errors import CorruptionError

__all__ = ["Slot", "build", "check_tree"]

_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_MAX_DIMS = 64
_MAX_DIM = 1 << 48

_SCHEMAS: dict[str, frozenset[str]] = {
    name: frozenset(keys.split())
    for name, keys in {
        "none": "t",
        "bool": "t v",
        "int": "t v",
        "float": "t v",
        "str": "t v",
        "bytes": "t n b",
        "bytearray": "t n b",
        "pickle": "t n b",
        "tensor": "t dtype shape device b",
        "ndarray": "t dtype shape b",
        "npscalar": "t dtype v",
        "list": "t v",
        "tuple": "t v",
        "dict": "t k v",
        "odict": "t k v",
    }.items()
}
_KEY_TYPES = frozenset({"none", "bool", "int", "float", "str"})


class Slot(NamedTuple):
    """A leaf to allocate and fill from blocks ``first .. first + count - 1``.

    Attributes:
        kind: "tensor", "ndarray", "bytes", "bytearray" or "pickle".
        dtype: the torch or NumPy dtype (None for bytes and pickle).
        shape: the shape (``(nbytes,)`` for bytes and pickle).
        device: the device recorded at save time (tensors only).
        first: its first block.
        count: how many blocks.
        nbytes: its raw size, the sum of its blocks' raw lengths.
        itemsize: its element size (1 for bytes and pickle).
        label: the dtype name reported in statistics.
        path: where it sits in the state.
    """

    kind: str
    dtype: Any
    shape: tuple[int, ...]
    device: str | None
    first: int
    count: int
    nbytes: int
    itemsize: int
    label: str
    path: str


class _Checker:
    def __init__(self, blocks: list[Block], where: str) -> None:
        self.blocks = blocks
        self.where = where
        self.slots: list[Slot] = []

    def fail(self, path: str, reason: str) -> CorruptionError:
        return CorruptionError(self.where, f"index: {path}: {reason}")

    def node(self, node: Any, path: str, depth: int) -> tuple[Any, ...]:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise self.fail(path, "node is not an object with a type 't'")
        kind = node["t"]
        schema = _SCHEMAS.get(kind)
        if schema is None:
            raise self.fail(path, f"unknown node type {kind!r}")
        if set(node) != schema and not (kind == "float" and set(node) == {"t", "v", "bits"}):
            raise self.fail(path, f"{kind} node has keys {sorted(node)}, expected {sorted(schema)}")
        if kind in ("list", "tuple"):
            if not isinstance(node["v"], list):
                raise self.fail(path, f"{kind} items are not a list")
            items = [self.node(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node["v"])]
            return ("l" if kind == "list" else "t", items)
        if kind in ("dict", "odict"):
            return self.mapping(node, path, depth)
        if kind in ("bytes", "bytearray", "pickle"):
            size = node["n"]
            if not (type(size) is int and size >= 0):
                raise self.fail(path, f"bad length {size!r}")
            return ("x", self.slot(node, kind, None, (size,), None, size, 1, kind, path))
        if kind in ("tensor", "ndarray"):
            return ("x", self.array(node, kind, path))
        return ("c", self.scalar(node, kind, path))

    def mapping(self, node: dict[str, Any], path: str, depth: int) -> tuple[Any, ...]:
        keys, values = node["k"], node["v"]
        if not (isinstance(keys, list) and isinstance(values, list) and len(keys) == len(values)):
            raise self.fail(path, "dict keys and values are not two lists of one length")
        parsed = []
        for key in keys:
            kind = key.get("t") if isinstance(key, dict) else None
            if not isinstance(kind, str) or kind not in _KEY_TYPES:
                raise self.fail(path, f"dict key node of type {kind!r}")
            parsed.append(self.node(key, path, depth + 1)[1])
        if len(dict.fromkeys(parsed)) != len(parsed):
            raise self.fail(path, "duplicate dict keys")
        items = [self.node(v, f"{path}[{k!r}]", depth + 1) for k, v in zip(parsed, values)]
        return ("o" if node["t"] == "odict" else "d", parsed, items)

    def scalar(self, node: dict[str, Any], kind: str, path: str) -> Any:
        value = node.get("v")
        if kind == "none":
            return None
        if kind == "bool" and type(value) is bool:
            return value
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "int" and type(value) is int:
            return value
        if kind == "int" and isinstance(value, str) and _HEX_INT.fullmatch(value):
            return int(value, 16)
        if kind == "float" and isinstance(value, str):
            return self.float_value(node, value, path)
        if kind == "npscalar":
            return self.npscalar(node, path)
        raise self.fail(path, f"bad {kind} value {str(value)[:40]!r}")

    def float_value(self, node: dict[str, Any], value: str, path: str) -> float:
        bits = node.get("bits")
        if value == "nan" and isinstance(bits, str) and _HEX16.fullmatch(bits):
            (result,) = struct.unpack("<d", struct.pack("<Q", int(bits, 16)))
            if math.isnan(result):
                return result
        elif bits is None and len(value) <= 40 and value != "nan":
            try:
                return float.fromhex(value)
            except (ValueError, OverflowError):
                pass
        raise self.fail(path, f"bad float {value[:40]!r}")

    def npscalar(self, node: dict[str, Any], path: str) -> Any:
        name, value = node["dtype"], node["v"]
        if name not in NUMPY_DTYPES or not isinstance(value, str):
            raise self.fail(path, f"bad numpy scalar of dtype {str(name)[:40]!r}")
        dtype = np.dtype(name)
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != dtype.itemsize or (dtype.kind == "b" and raw[0] > 1):
            raise self.fail(path, f"bad numpy {name} scalar bytes {value[:40]!r}")
        return np.frombuffer(raw, dtype=dtype)[0].copy()

    def array(self, node: dict[str, Any], kind: str, path: str) -> int:
        name, shape = node["dtype"], node["shape"]
        if kind == "tensor":
            dtype: Any = TORCH_DTYPES.get(name) if isinstance(name, str) else None
            label = name
        else:
            dtype = np.dtype(name) if isinstance(name, str) and name in NUMPY_DTYPES else None
            label = f"numpy {name}"
        if dtype is None:
            raise self.fail(path, f"{kind} dtype {str(name)[:40]!r} is not in the allow-list")
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS):
            raise self.fail(path, f"bad shape {str(shape)[:80]}")
        if not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
            raise self.fail(path, f"bad shape {str(shape)[:80]}")
        device = None
        if kind == "tensor":
            device = node["device"]
            try:
                device = str(torch.device(device)) if isinstance(device, str) and len(device) <= 64 else None
            except (RuntimeError, ValueError, TypeError, OverflowError):
                device = None
            if device is None:
                raise self.fail(path, f"bad device {str(node['device'])[:40]!r}")
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        return self.slot(node, kind, dtype, tuple(shape), device, nbytes, itemsize, label, path)

    def slot(self, node: dict[str, Any], kind: str, dtype: Any, shape: tuple[int, ...], device: str | None,
             nbytes: int, itemsize: int, label: str, path: str) -> int:
        ref = node["b"]
        expected = self.slots[-1].first + self.slots[-1].count if self.slots else 0
        if not (isinstance(ref, list) and len(ref) == 2 and all(type(v) is int for v in ref)):
            raise self.fail(path, f"bad block range {str(ref)[:40]}")
        first, count = ref
        if first != expected or count < 0 or first + count > len(self.blocks):
            raise self.fail(path, f"block range {ref} (expected to start at {expected}, {len(self.blocks)} blocks)")
        blocks = self.blocks[first : first + count]
        raw = sum(b.raw for b in blocks)
        if raw != nbytes:
            raise self.fail(path, f"blocks hold {raw} bytes, the {kind} needs {nbytes}")
        for i, block in enumerate(blocks, first):
            if (block.encoding == "pickle") != (kind == "pickle"):
                raise self.fail(path, f"block {i} is {block.encoding}, which a {kind} cannot use")
            if block.raw % itemsize:
                raise self.fail(path, f"block {i} holds {block.raw} bytes, not whole {itemsize}-byte elements")
        self.slots.append(Slot(kind, dtype, shape, device, first, count, nbytes, itemsize, label, path))
        return len(self.slots) - 1


def check_tree(tree: Any, blocks: list[Block], where: str) -> tuple[tuple[Any, ...], list[Slot]]:
    """Validate a JSON tree against the block table and compile it.

    Args:
        tree: the parsed ``"tree"`` of the index.
        blocks: the validated block table.
        where: names the object in errors.

    Returns:
        The compiled tree (for `build`) and the leaves to allocate, in block order.

    Raises:
        CorruptionError: any node is malformed, or the leaves do not use every block exactly once.
    """
    checker = _Checker(blocks, where)
    compiled = checker.node(tree, "state", 0)
    used = checker.slots[-1].first + checker.slots[-1].count if checker.slots else 0
    if used != len(blocks):
        raise CorruptionError(where, f"index: {len(blocks) - used} blocks belong to no leaf")
    return compiled, checker.slots


def build(compiled: tuple[Any, ...], values: list[Any]) -> Any:
    """Assemble the state from a compiled tree and the decoded leaf values (indexed like the slots)."""
    tag = compiled[0]
    if tag == "c":
        return compiled[1]
    if tag == "x":
        return values[compiled[1]]
    if tag == "l":
        return [build(item, values) for item in compiled[1]]
    if tag == "t":
        return tuple(build(item, values) for item in compiled[1])
    items = zip(compiled[1], (build(item, values) for item in compiled[2]))
    return OrderedDict(items) if tag == "o" else dict(items)
