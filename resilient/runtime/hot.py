"""Hot snapshots: a slot's newest state kept in the Ray object store, for a replacement to start from.

A stateful slot's persisted checkpoint trails its worker: a snapshot taken every ``checkpoint_every``
batches is written to storage only once the outputs below it are committed (`resilient.runtime.worker`),
so at a crash the newest persisted state is often a checkpoint older than the newest snapshot, and the
replacement replays the batches in between. A hot snapshot closes most of that gap.

Protocol
--------
1. Ship. A stateful call (`Worker.run`) returns two objects: its answers with the cursor of the newest
   snapshot it took (or None), and that snapshot, *packed* (below). Ray stores a return value in the
   object store of the worker's node, owned by the caller, the driver: it outlives the worker process.
   Only a snapshot whose cursor is at or below the call's first failed batch is shipped (every batch
   below it answered without error), and only one of at most ``hot_snapshot_max_mb``.
2. Keep. The scheduler keeps, per slot, the newest hot snapshot of the answers it accepts (a forgotten
   call's or a zombie's never count): ``(cursor, object ref)``; dropping the ref frees the memory.
3. Restore. A replacement is activated with that ref (`StartActor.hot`). The worker reads it (local
   shared memory when on the same node), unpacks it and loads it, and reports its cursor; the slot
   replays from there. If the object is lost (its node died), does not arrive within
   ``HOT_READ_TIMEOUT_S`` or does not load, the worker restores the persisted checkpoint instead.

Why it is safe: an accepted answer's outputs are committed (a failed commit is retried, or the job fails),
so every batch below the hot cursor has or will have its one committed output, and the state at that
cursor is the state those batches built. The snapshot is not durable: a driver crash loses it, and a
re-run restores from storage as before. Rollbacks (an exception in user code) still restore from storage.

Packing turns each tensor of the snapshot (`resilient.codec.SnapshotBuffers` copies) into a NumPy view
of its bytes, so Ray writes it to the object store with one copy and reads it back without any (pickling
a torch tensor goes through ``torch.save``: about 3x slower for an 11 MB state, measured). Unpacking
copies each array out of the read-only shared memory into a fresh tensor, so the pipeline may keep and
change what `load_state_dict` is given.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from resilient.codec import DeviceTensor
from resilient.codec.dtypes import same_size_int

__all__ = ["HOT_READ_TIMEOUT_S", "PackedTensor", "pack", "unpack"]

HOT_READ_TIMEOUT_S = 10.0
"""How long a replacement waits for a hot snapshot before restoring the persisted checkpoint instead."""


class PackedTensor:
    """A CPU tensor as a NumPy array of its bytes (a same-size integer view), with its dtype and shape."""

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, data: np.ndarray, dtype: torch.dtype, shape: tuple) -> None:
        self.data, self.dtype, self.shape = data, dtype, shape

    def __reduce__(self) -> tuple:
        return PackedTensor, (self.data, self.dtype, self.shape)


def pack(tree: Any) -> Any:
    """The snapshot ``tree`` with every CPU tensor as a `PackedTensor` (a view: nothing is copied).

    >>> t = torch.arange(4, dtype=torch.bfloat16)
    >>> p = pack({"w": t, "step": 3})
    >>> type(p["w"]).__name__, p["w"].data.dtype, p["step"]
    ('PackedTensor', dtype('int16'), 3)
    >>> unpack(p)["w"].equal(t)
    True
    """
    return _map(tree, _pack_leaf)


def unpack(tree: Any) -> Any:
    """The inverse of `pack`, with every array and tensor copied into fresh, writable memory; a
    `DeviceTensor` goes back to its device."""
    return _map(tree, _unpack_leaf)


def _map(tree: Any, leaf: Any) -> Any:
    """``tree`` rebuilt (dict, OrderedDict, list and tuple containers) with ``leaf`` applied to the rest."""
    kind = type(tree)
    if kind is dict or kind is OrderedDict:
        return kind((k, _map(v, leaf)) for k, v in tree.items())
    if kind is list:
        return [_map(v, leaf) for v in tree]
    if kind is tuple:
        return tuple(_map(v, leaf) for v in tree)
    return leaf(tree)


def _pack_leaf(value: Any) -> Any:
    if type(value) is DeviceTensor:
        return DeviceTensor(_pack_leaf(value.host), value.device)
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous()
        return PackedTensor(t.view(same_size_int(t.dtype)).numpy(), t.dtype, tuple(t.shape))
    return value


def _unpack_leaf(value: Any) -> Any:
    if type(value) is DeviceTensor:
        return _unpack_leaf(value.host).to(value.device)
    if type(value) is PackedTensor:
        return torch.from_numpy(np.array(value.data)).view(value.dtype).reshape(value.shape)
    if isinstance(value, np.ndarray):
        return np.array(value)
    return value
