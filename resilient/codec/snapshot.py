"""Point-in-time copies of a state into reusable host buffers, for asynchronous saves.

The caller of an asynchronous save blocks only while its state is copied into memory; encoding and writing
then run in the background from the copy. Fresh allocations cost about 1 s per GB on this kind of machine
(page faults) against ~11 GB/s for a copy into existing memory, so the buffers are kept and reused.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from resilient.codec.dtypes import same_size_int
from resilient.codec.tree import MAX_DEPTH, DeviceTensor
from resilient.errors import CodecError

__all__ = ["SnapshotBuffers"]


def _copy_tensor(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
    src = src.detach()
    if src.is_conj():
        src = src.resolve_conj()
    if src.is_neg():
        src = src.resolve_neg()
    as_int = same_size_int(src.dtype)
    dst.view(as_int).copy_(src.view(as_int), non_blocking=non_blocking)


class SnapshotBuffers:
    """Host buffers that hold a copy of a state, reused from one `take` to the next.

    `take` returns a tree of the same structure in which every tensor and array is a copy held in a buffer
    owned by this object. A buffer is reused by the next `take` when the value at the same path has the
    same shape and dtype; it is re-allocated otherwise, and buffers of paths that disappeared are dropped.
    CPU tensors are copied into CPU buffers; tensors on other devices into host buffers (pinned for CUDA),
    returned as `DeviceTensor` so that decode puts them back on their device.

    Not thread-safe: give each owner its own. Each `take` overwrites the buffers of the previous snapshot,
    so finish using (encoding, writing) one snapshot before taking the next.

    Example:
        >>> import torch
        >>> buffers = SnapshotBuffers()
        >>> state = {"w": torch.ones(4), "step": 3}
        >>> snap = buffers.take(state)
        >>> _ = state["w"].add_(1)
        >>> snap["w"].tolist(), snap["step"], buffers.nbytes
        ([1.0, 1.0, 1.0, 1.0], 3, 16)
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor | np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held in buffers."""
        return sum(b.numel() * b.element_size() if isinstance(b, torch.Tensor) else b.nbytes
                   for b in self._buffers.values())

    def take(self, state: Any) -> Any:
        """Copy ``state`` into the buffers and return the copy.

        Containers (dict, OrderedDict, list, tuple) are rebuilt; tensors and arrays are copied; bytearrays
        are copied; other values (int, float, str, bytes, None, bool and anything else) are kept as they
        are, by reference. CUDA copies are issued asynchronously and synchronized once at the end.

        Args:
            state: the state to copy.

        Returns:
            A structurally identical tree holding copies.

        Raises:
            CodecError: nesting deeper than 100 levels.
        """
        taker = _Taker(self._buffers)
        snapshot = taker.walk(state, "state", 0)
        for device in taker.devices:
            torch.cuda.synchronize(device)
        self._buffers = taker.fresh
        return snapshot


class _Taker:
    def __init__(self, old: dict[str, torch.Tensor | np.ndarray]) -> None:
        self.old = old
        self.fresh: dict[str, torch.Tensor | np.ndarray] = {}
        self.devices: set[torch.device] = set()

    def walk(self, value: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError(f"{path}: nested deeper than {MAX_DEPTH} levels (is there a reference cycle?)")
        kind = type(value)
        if kind is dict or kind is OrderedDict:
            return kind((k, self.walk(v, f"{path}[{k!r}]", depth + 1)) for k, v in value.items())
        if kind is list:
            return [self.walk(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if kind is tuple:
            return tuple(self.walk(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
        if kind is DeviceTensor:
            return DeviceTensor(self.tensor(value.host, path, pin=False), value.device)
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                return self.tensor(value, path, pin=False)
            is_cuda = value.device.type == "cuda"
            host = self.tensor(value, path, pin=is_cuda and torch.cuda.is_available())
            if is_cuda:
                self.devices.add(value.device)
            return DeviceTensor(host, str(value.device))
        if isinstance(value, np.ndarray):
            buffer = self.buffer(path, value.shape, value.dtype, lambda: np.empty_like(value, order="C", subok=False))
            np.copyto(buffer, value, casting="no")
            return buffer
        if kind is bytearray:
            return bytearray(value)
        return value

    def buffer(self, path: str, shape: Any, dtype: Any, make: Any) -> Any:
        buffer = self.old.get(path)
        if buffer is None or type(buffer.dtype) is not type(dtype) or buffer.shape != shape or buffer.dtype != dtype:
            buffer = make()
        self.fresh[path] = buffer
        return buffer

    def tensor(self, value: torch.Tensor, path: str, *, pin: bool) -> torch.Tensor:
        def make() -> torch.Tensor:
            return torch.empty(value.shape, dtype=value.dtype, pin_memory=pin)

        buffer = self.buffer(path, value.shape, value.dtype, make)
        if buffer.is_pinned() != pin:
            buffer = self.fresh[path] = make()
        _copy_tensor(buffer, value, non_blocking=pin)
        return buffer
