"""How a batch's output becomes bytes and back, per sink format; pure functions, no I/O.

=========  =========================================  ==========================================
format     accepted output                            read back as
=========  =========================================  ==========================================
jsonl      dict of equal-length columns (lists,       dict of column lists (columns in order of
           tuples, NumPy arrays, torch tensors), a    first appearance; a row missing a column
           list of row dicts, a pyarrow Table or a    gives None). An output of 0 rows reads
           pandas DataFrame                           back as ``{}``.
parquet    the same                                   dict of NumPy arrays; a column of N-D rows
                                                      (embeddings) comes back N-D
delta      the same (parquet files; N-D columns are   dict of NumPy arrays (N-D columns as arrays
           stored as lists: Delta has no fixed size)  of per-row arrays)
tensors    any state `resilient.codec.encode` takes   the decoded state
=========  =========================================  ==========================================

jsonl is strict JSON (RFC 8259) so that any reader can read it: NaN and infinities are refused, with
an error that names the column and suggests the parquet or tensors format, which store them. Floats are
written with Python's shortest round-tripping ``repr``, so they read back bit-exact (float32 values are
widened to float64 exactly). bytes are refused (no JSON type holds them).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resilient.errors import CodecError, UnsupportedTypeError

__all__ = ["EXTENSIONS", "arrow_to_numpy", "decode_output", "encode_output", "rows_to_columns"]

EXTENSIONS = {"jsonl": "jsonl", "parquet": "parquet", "tensors": "tensors"}
Buffer = bytes | bytearray | memoryview


def encode_output(fmt: str, output: Any, where: str) -> tuple[Callable[[], Iterable[Buffer]], int | None]:
    """``(make_chunks, rows)``: a function returning the object's bytes as chunks (callable again for a
    retry), and the number of rows (None for tensors). Refusals raise before anything is written."""
    if fmt == "jsonl":
        data, rows = _to_jsonl(output, where)
        return (lambda: [data]), rows
    if fmt in ("parquet", "delta"):
        table = _to_table(output, where)
        if fmt == "delta":  # Delta has no fixed-size list type: N-D columns are stored as lists
            table = table.cast(pa.schema([f.with_type(_variable_lists(f.type)) for f in table.schema]))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        buf = sink.getvalue()
        return (lambda: [memoryview(buf)]), table.num_rows
    from resilient.codec import encode

    first = iter(encode(output))
    head = next(first, b"")  # runs the codec's type checks now, before any write starts
    chunks: list[Iterable[Buffer]] = [[head], first]

    def make() -> Iterable[Buffer]:
        if chunks:  # the first attempt streams the iterator already started
            started = chunks.copy()
            chunks.clear()
            return (c for part in started for c in part)
        return encode(output)

    return make, None


def decode_output(fmt: str, data: bytes | bytearray, where: str) -> Any:
    if fmt == "jsonl":
        rows = []
        for line in bytes(data).split(b"\n"):
            if line and not line.isspace():
                rows.append(json.loads(line))
        return rows_to_columns(rows)
    if fmt in ("parquet", "delta"):
        return arrow_to_numpy(pq.read_table(pa.BufferReader(data)))
    from resilient.codec import decode

    return decode(data, where=where)


# --- jsonl ------------------------------------------------------------------------------------------


def rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts as a dict of column lists; columns in order of first appearance, gaps as None."""
    columns: dict[str, list[Any]] = {}
    for i, row in enumerate(rows):
        for key in row:
            if key not in columns:
                columns[key] = [None] * i
        for key, col in columns.items():
            col.append(row.get(key))
    return columns


def _plain(value: Any) -> Any:
    """``json.dumps`` hook: NumPy and torch values as Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    raise TypeError(type(value).__qualname__)


def _column_values(name: str, col: Any, where: str) -> list[Any]:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(col, torch.Tensor):
        return col.detach().cpu().tolist() if col.dim() else _not_column(name, col, where)
    if isinstance(col, np.ndarray):
        return col.tolist() if col.ndim else _not_column(name, col, where)
    if isinstance(col, (list, tuple)):
        return list(col)
    return _not_column(name, col, where)


def _not_column(name: str, col: Any, where: str) -> list[Any]:
    raise CodecError(f"{where}: column {name!r} is a {type(col).__name__}, not a list, array or tensor of "
                     "one value per row")


def _as_rows(output: Any, where: str) -> list[Mapping[str, Any]]:
    if isinstance(output, pa.Table):
        output = output.to_pydict()
    elif type(output).__module__.startswith("pandas") and hasattr(output, "to_dict"):
        output = output.to_dict("list")
    if isinstance(output, Mapping):
        cols = {}
        for name, col in output.items():
            if not isinstance(name, str):
                raise CodecError(f"{where}: column name {name!r} is not a str")
            cols[name] = _column_values(name, col, where)
        lengths = {name: len(v) for name, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise CodecError(f"{where}: columns have different lengths {lengths}")
        names = list(cols)
        return [dict(zip(names, values)) for values in zip(*cols.values())]
    if isinstance(output, (list, tuple)) and all(isinstance(r, Mapping) for r in output):
        return list(output)
    raise UnsupportedTypeError(where, f"{type(output).__module__}.{type(output).__qualname__} (jsonl takes a dict "
                               "of columns or a list of row dicts)")


def _to_jsonl(output: Any, where: str) -> tuple[bytes, int]:
    rows = _as_rows(output, where)
    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(row, allow_nan=False, ensure_ascii=False, separators=(",", ":"),
                                    default=_plain))
        except ValueError as e:
            bad = [k for k, v in row.items() if _has_nonfinite(v)]
            raise CodecError(f"{where}: row {i} column {', '.join(map(repr, bad)) or '?'} holds NaN or an infinity, "
                             "which strict JSON cannot store; use format='parquet' or 'tensors', or replace them "
                             f"({e})") from None
        except TypeError as e:
            raise UnsupportedTypeError(f"{where} row {i}", f"{e} (jsonl stores str, numbers, bool, None, lists "
                                       "and dicts with str keys; use format='parquet' or 'tensors')") from None
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    return data, len(rows)


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(map(_has_nonfinite, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(_has_nonfinite, value))
    try:
        return _has_nonfinite(_plain(value))
    except TypeError:
        return False


# --- parquet ----------------------------------------------------------------------------------------


def _to_arrow_column(name: str, col: Any, where: str) -> pa.Array:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(col, torch.Tensor):
        if col.dtype == torch.bfloat16:
            raise UnsupportedTypeError(f"{where} column {name!r}", "torch.bfloat16 (parquet has no bfloat16: "
                                       "convert with .float(), or use format='tensors')")
        col = col.detach().cpu().numpy()
    if isinstance(col, np.ndarray) and col.ndim > 1 and not col.dtype.hasobject:
        arr: pa.Array = _flat_array(np.ascontiguousarray(col).reshape(-1))
        for size in reversed(col.shape[1:]):
            arr = pa.FixedSizeListArray.from_arrays(arr, size)
        return arr
    if isinstance(col, np.ndarray) and col.ndim == 0:
        _not_column(name, col, where)
    if isinstance(col, np.ndarray):
        return _flat_array(col)
    if not isinstance(col, (list, tuple)):
        _not_column(name, col, where)
    return pa.array(col)


def _variable_lists(t: pa.DataType) -> pa.DataType:
    """``t`` with every fixed-size list made a variable-size one (of the same values)."""
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_variable_lists(t.value_type)))
    return t


def _flat_array(col: np.ndarray) -> pa.Array:
    """A 1-D NumPy array as an Arrow array. Numbers are wrapped without a copy when contiguous and in
    native byte order (else copied once into that form: Arrow refuses swapped bytes). This also skips
    ``pa.array``, whose first call imports pandas: 0.17 s in a fresh worker, on the path of a replacement's
    first output. Anything else (bools, datetimes, strings, objects) goes through ``pa.array``."""
    if col.dtype.kind in "iuf" and type(col) is np.ndarray:
        col = np.ascontiguousarray(col, dtype=col.dtype.newbyteorder("="))
        return pa.Array.from_buffers(pa.from_numpy_dtype(col.dtype), len(col), [None, pa.py_buffer(col)])
    return pa.array(col)


def _to_table(output: Any, where: str) -> pa.Table:
    try:
        if isinstance(output, pa.Table):
            return output
        if type(output).__module__.startswith("pandas") and hasattr(output, "to_dict"):
            return pa.Table.from_pandas(output, preserve_index=False)
        if isinstance(output, Mapping):
            for name in output:
                if not isinstance(name, str):
                    raise CodecError(f"{where}: column name {name!r} is not a str")
            return pa.table({name: _to_arrow_column(name, col, where) for name, col in output.items()})
        if isinstance(output, (list, tuple)) and all(isinstance(r, Mapping) for r in output):
            return pa.Table.from_pylist(list(output))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise CodecError(f"{where}: cannot store as parquet: {e}") from None
    raise UnsupportedTypeError(where, f"{type(output).__module__}.{type(output).__qualname__} (parquet takes a dict "
                               "of columns, a list of row dicts, a pyarrow Table or a pandas DataFrame)")


def arrow_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """A table as a dict of NumPy arrays; fixed-size-list columns without nulls become N-D arrays."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        out[name] = _fixed_size(col) if pa.types.is_fixed_size_list(col.type) else col.to_numpy()
    return out


def _fixed_size(col: pa.ChunkedArray) -> np.ndarray:
    arr: pa.Array = col.combine_chunks()
    shape = [len(arr)]
    while pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            return col.to_numpy()
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    if arr.null_count or not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
                              or pa.types.is_boolean(arr.type)):
        return col.to_numpy()
    return arr.to_numpy(zero_copy_only=False).reshape(shape)
