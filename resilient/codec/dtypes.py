"""The element types the codec stores, as allow-lists keyed by the names written in the index.

Torch dtypes are named as ``str(dtype)`` without the ``torch.`` prefix (``"bfloat16"``). Every dtype of the
running torch is allowed except the quantized ones (their scale and zero point live outside the bytes).
NumPy dtypes are named by ``dtype.str`` (``"<f4"``, ``"|b1"``), which records the byte order; only boolean,
integer, floating and complex types of a fixed, portable size are allowed.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "NUMPY_DTYPES",
    "TORCH_DTYPES",
    "numpy_dtype_name",
    "same_size_int",
    "torch_dtype_name",
]

_QUANTIZED = frozenset({"qint8", "qint32", "quint8", "quint2x4", "quint4x2"})


def _torch_dtypes() -> dict[str, torch.dtype]:
    found = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    names = {str(d).removeprefix("torch."): d for d in found}
    return {n: names[n] for n in sorted(names) if n not in _QUANTIZED}


def _numpy_dtypes() -> frozenset[str]:
    bases = ["b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"]
    return frozenset(np.dtype(order + base).str for base in bases for order in "<>")


TORCH_DTYPES: dict[str, torch.dtype] = _torch_dtypes()
"""Allowed torch dtypes, by index name."""

NUMPY_DTYPES: frozenset[str] = _numpy_dtypes()
"""Allowed NumPy dtypes, by ``dtype.str``."""

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def torch_dtype_name(dtype: torch.dtype) -> str | None:
    """The index name of ``dtype``, or None when the codec does not store it."""
    name = str(dtype).removeprefix("torch.")
    return name if TORCH_DTYPES.get(name) is dtype else None


def numpy_dtype_name(dtype: np.dtype) -> str | None:
    """The index name of ``dtype``, or None when the codec does not store it."""
    return dtype.str if dtype.str in NUMPY_DTYPES else None


def same_size_int(dtype: torch.dtype) -> torch.dtype:
    """An integer dtype of the same element size (for byte-exact copies of any dtype), else ``dtype``.

    Copy kernels are missing for some dtypes (``int4``...), but a same-size view copies bit for bit.
    """
    return _INT_OF_SIZE.get(dtype.itemsize, dtype)
