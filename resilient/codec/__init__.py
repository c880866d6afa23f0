"""Checkpoint codec: a state <-> one self-describing stored object, with no pickle by default.

A state is nested dicts, OrderedDicts, lists and tuples of tensors (any dtype but quantized, any device),
NumPy arrays and scalars, ints, floats, bools, None, strs, bytes and bytearrays. `encode` streams the object
as chunks (compressing per leaf when it pays, in parallel blocks); `decode` validates the whole index before
reading any block and checks every block's xxh3_64 before using it; `verify` runs the checks without
building anything. Given an `ObjectBuffer` (or a buffer passed with ``owned=True``), `decode` builds the
tensors of raw blocks on that memory instead of copying them. The byte layout is documented in
`resilient.codec.format`.

Example:
    >>> import torch
    >>> from resilient.codec import decode, encode, verify
    >>> state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 10}
    >>> blob = b"".join(encode(state))
    >>> restored = decode(blob)
    >>> torch.equal(restored["model"]["w"], state["model"]["w"]), restored["step"]
    (True, 10)
    >>> verify(blob).n_tensors
    1
"""

from resilient.codec.buffer import ObjectBuffer
from resilient.codec.core import MapLocation, decode, encode
from resilient.codec.format import FORMAT_VERSION
from resilient.codec.info import DtypeStats, ObjectInfo, verify
from resilient.codec.snapshot import SnapshotBuffers
from resilient.codec.tree import DeviceTensor

__all__ = [
    "DeviceTensor",
    "DtypeStats",
    "FORMAT_VERSION",
    "MapLocation",
    "ObjectBuffer",
    "ObjectInfo",
    "SnapshotBuffers",
    "decode",
    "encode",
    "verify",
]
