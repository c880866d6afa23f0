"""What every source shares: the `Source` protocol, content digests, and fingerprint comparison.

A fingerprint is plain JSON data (dicts, lists, str, int, float, bool, None) that identifies a source's
input well enough to notice that it changed between runs: a job records it on its first run and a
resumed run refuses an input whose fingerprint differs (`check_fingerprint`), because batch ids are
positions and a changed input would shift them under the commits already made.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import xxhash

from resilient.errors import ConfigError, ResilientError

__all__ = ["Source", "SourceChangedError", "check_fingerprint", "digest"]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_MAX_DEPTH = 100


@runtime_checkable
class Source(Protocol):
    """A replayable input: batches with ids ``0..len-1`` that can be read again from any id.

    Implementations hold URLs, options and data, never open handles, so they pickle and can be shipped
    to Ray processes.
    """

    def fingerprint(self) -> dict:
        """JSON-serializable identity of the input, the same in every process and run over the same input."""
        ...

    def __len__(self) -> int:
        """The number of batches."""
        ...

    def read(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(batch_id, batch)`` for ids ``start..len-1``, in order."""
        ...


class SourceChangedError(ResilientError, ValueError):
    """The input differs from the one a job recorded on its first run.

    Attributes:
        differences: one line per difference, e.g. ``"length 2000 -> 1999"`` or
            ``"file s3://b/in/part-3.jsonl: size 120 -> 140"``.
    """

    def __init__(self, differences: list[str]) -> None:
        self.differences = list(differences)
        super().__init__(
            "the input changed since the job recorded it: " + "; ".join(self.differences)
            + " (batch ids are positions in the input, so a job resumes only over the input it started "
            "with; restore that input, or start a new job for the new one)"
        )


def check_fingerprint(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise `SourceChangedError` naming every difference between two fingerprints; return if equal.

    Example:
        >>> check_fingerprint({"kind": "range", "length": 3}, {"kind": "range", "length": 3})
        >>> try:
        ...     check_fingerprint({"kind": "range", "length": 2000}, {"kind": "range", "length": 1999})
        ... except SourceChangedError as e:
        ...     e.differences
        ['length 2000 -> 1999']
    """
    if recorded == current:
        return
    out: list[str] = []
    _diff(recorded, current, "", out)
    raise SourceChangedError(out or ["fingerprint differs"])


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _diff(old: Any, new: Any, where: str, out: list[str]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            name = f"{where}{key}"
            if key not in new:
                out.append(f"{name} {_show(old[key])} -> (absent)")
            elif key not in old:
                out.append(f"{name} (absent) -> {_show(new[key])}")
            elif key == "files" and _file_list(old[key]) and _file_list(new[key]):
                _diff_files(old[key], new[key], out)
            elif old[key] != new[key]:
                if isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
                    _diff(old[key], new[key], f"{name}.", out)
                else:
                    out.append(f"{name} {_show(old[key])} -> {_show(new[key])}")
        return
    out.append(f"{where.rstrip('.')} {_show(old)} -> {_show(new)}")


def _file_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(f, Mapping) and "path" in f for f in value)


def _diff_files(old: list[Mapping[str, Any]], new: list[Mapping[str, Any]], out: list[str]) -> None:
    before = {f["path"]: f for f in old}
    after = {f["path"]: f for f in new}
    for path, f in before.items():
        if path not in after:
            out.append(f"file {path}: removed")
            continue
        g = after[path]
        for key in [*f, *(k for k in g if k not in f)]:
            if f.get(key) != g.get(key):
                out.append(f"file {path}: {key} {_show(f.get(key))} -> {_show(g.get(key))}")
    out.extend(f"file {path}: added" for path in after if path not in before)
    if [p for p in before if p in after] != [p for p in after if p in before]:
        out.append("file order changed")


def check_start(start: int, length: int | None) -> int:
    """``start`` if it is a valid first batch id to read from (``0..length``), else a ConfigError."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0 or (
            length is not None and start > length):
        accepted = "an int >= 0" if length is None else f"an int from 0 to {length} (the number of batches)"
        raise ConfigError("start", start, accepted)
    return int(start)


def digest(*values: Any) -> str:
    """A stable content hash (xxh3_64, hex) of batches: the same in every process and run.

    Arrays and tensors are hashed by dtype, shape and bytes; containers by their items in order; plain
    values by type and ``repr``. Other objects fall back to their type name and ``repr`` with memory
    addresses removed, which is stable but may miss changes such an object's ``repr`` does not show.

    Example:
        >>> digest([1, 2.5, "a"]) == digest([1, 2.5, "a"]) != digest([1, 2.5, "b"])
        True
    """
    h = xxhash.xxh3_64()
    for v in values:
        _feed(h, v, 0)
    return h.hexdigest()


def _feed(h: Any, obj: Any, depth: int) -> None:
    if obj is None or isinstance(obj, (bool, int, float, complex, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = memoryview(obj).cast("B") if isinstance(obj, memoryview) else obj
        h.update(f"bytes:{len(data)}:".encode())
        h.update(data)
    elif isinstance(obj, np.ndarray):
        h.update(f"ndarray:{obj.dtype.str}:{obj.shape}:".encode())
        if obj.dtype.hasobject:
            for item in obj.reshape(-1):
                _feed(h, item, depth + 1)
        else:
            h.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    elif isinstance(obj, np.generic):
        h.update(f"np:{obj.dtype.str}:".encode())
        _feed(h, obj.item(), depth + 1)
    elif _is_tensor(obj):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor:{t.dtype}:{tuple(obj.shape)}:".encode())
        h.update(t.view(sys.modules["torch"].uint8).numpy())
    elif depth < _MAX_DEPTH and isinstance(obj, Mapping):
        h.update(f"map:{len(obj)}:".encode())
        for k, v in obj.items():
            _feed(h, k, depth + 1)
            _feed(h, v, depth + 1)
    elif depth < _MAX_DEPTH and isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}:{len(obj)}:".encode())
        for v in obj:
            _feed(h, v, depth + 1)
    else:
        h.update(f"{type(obj).__qualname__}:{_ADDRESS.sub('', repr(obj))};".encode())


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)
