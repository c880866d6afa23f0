"""`FileSource`: batches of rows from files matched by an fsspec glob (jsonl, parquet, npy).

Each batch is a row range of one file: batches never cross a file boundary, so a file of ``r`` rows
gives ``ceil(r / rows_per_batch)`` batches (the last one may be short) and a file with no rows gives
none. Batch ids run on across files in path order.

The first use scans the files once: one listing, then each file's row count (parquet footer, npy
header; jsonl files are read through once, recording where each batch starts). The scan is kept on the
instance and travels with it when it is pickled, so `read` in another process seeks straight to its
file and row without reading earlier files. Every batch is one ranged read (a row-group read for
parquet). Reads use the scan: a job compares `fingerprint` on resume to notice changed files.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from resilient.config import redact_url
from resilient.errors import ConfigError, CorruptionError
from resilient.io._base import SourceChangedError, check_start
from resilient.io._formats import arrow_to_numpy, rows_to_columns

__all__ = ["FileSource"]

_FORMATS = {"jsonl": "jsonl", "ndjson": "jsonl", "parquet": "parquet", "pq": "parquet", "npy": "npy"}
_SCAN_CHUNK = 4 << 20


@dataclass(frozen=True)
class _File:
    path: str  # inside the filesystem (no protocol)
    url: str  # as fingerprints and errors show it
    size: int
    stamp: tuple[str, Any]  # ("etag", value) or ("mtime", value)
    rows: int
    starts: tuple[int, ...] = ()  # jsonl: byte offset where each batch starts
    npy: tuple[int, str, tuple[int, ...]] | None = None  # npy: data offset, dtype, shape after axis 0


class FileSource:
    """Rows of the files matching ``url_glob``, ``rows_per_batch`` at a time.

    Args:
        url_glob: an fsspec URL or local path with glob characters (``s3://bucket/in/*.parquet``), or a
            directory (its files of the format's extensions).
        format: "jsonl", "parquet" or "npy"; by default from the files' extensions (which must agree).
        rows_per_batch: rows per batch.
        storage_options: fsspec options (for s3, e.g. ``endpoint_url``); kept and pickled to rebuild the
            filesystem in each process.

    Batches: jsonl gives a dict of column lists (a row missing a column gives None); parquet a dict of
    NumPy arrays (fixed-size-list columns as N-D arrays); npy ``{"x": array}`` (rows along axis 0).

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with open(os.path.join(d, "a.jsonl"), "w") as f:
        ...     _ = f.write('{"q": 1}\\n{"q": 2}\\n{"q": 3}\\n')
        >>> src = FileSource(os.path.join(d, "*.jsonl"), rows_per_batch=2)
        >>> list(src.read())
        [(0, {'q': [1, 2]}), (1, {'q': [3]})]
    """

    def __init__(self, url_glob: str, *, format: str | None = None, rows_per_batch: int,
                 storage_options: dict[str, Any] | None = None) -> None:
        if format is not None and format not in ("jsonl", "parquet", "npy"):
            raise ConfigError("format", format, '"jsonl", "parquet", "npy", or None (from the extension)')
        if isinstance(rows_per_batch, bool) or not isinstance(rows_per_batch, int) or rows_per_batch < 1:
            raise ConfigError("rows_per_batch", rows_per_batch, "an int >= 1")
        self.url_glob = url_glob
        self.format = format
        self.rows_per_batch = rows_per_batch
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._files: list[_File] | None = None
        self._first_batch: list[int] = []  # per file: id of its first batch, then the total

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None  # rebuilt from url and options in each process
        return state

    def __repr__(self) -> str:
        return f"FileSource({redact_url(self.url_glob)!r}, format={self.format!r}, " \
               f"rows_per_batch={self.rows_per_batch})"

    # -- scan ------------------------------------------------------------------------------------

    def _filesystem(self) -> tuple[Any, str]:
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.url_glob, **self.storage_options)
        self._fs = fs
        return fs, path

    def _scan(self) -> list[_File]:
        if self._files is not None:
            return self._files
        fs, pattern = self._filesystem()
        fs.invalidate_cache()  # a cached listing would hide files added since
        found = fs.glob(pattern, detail=True)
        entries = {p: i for p, i in found.items() if i.get("type") != "directory"}
        if not entries and len(found) == 1 and fs.isdir(pattern):
            entries = {i["name"]: i for i in fs.ls(pattern, detail=True) if i.get("type") != "directory"
                       and not i["name"].rsplit("/", 1)[-1].startswith(("_", "."))
                       and self._format_of(i["name"], strict=False)}
        if not entries:
            raise ConfigError("url_glob", redact_url(self.url_glob), "a glob or directory matching at least one file")
        formats = {self._format_of(p, strict=True) for p in entries}
        if len(formats) > 1:
            raise ConfigError("format", None, "one format for all files",
                              detail=f"the files have several: {sorted(formats)}; pass format= or a narrower glob")
        self.format = formats.pop()
        files = [self._describe(fs, p, entries[p]) for p in sorted(entries)]
        first = [0]
        for f in files:
            first.append(first[-1] + math.ceil(f.rows / self.rows_per_batch))
        self._files, self._first_batch = files, first
        return files

    def _format_of(self, path: str, *, strict: bool) -> str | None:
        if self.format is not None:
            return self.format
        ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if ext in _FORMATS:
            return _FORMATS[ext]
        if strict:
            raise ConfigError("format", None, '"jsonl", "parquet" or "npy"',
                              detail=f"cannot tell the format of {redact_url(path)} from its extension; pass format=")
        return None

    def _describe(self, fs: Any, path: str, info: dict[str, Any]) -> _File:
        url = redact_url(fs.unstrip_protocol(path))
        size = int(info.get("size") or 0)
        etag = info.get("ETag") or info.get("etag")
        stamp = ("etag", str(etag).strip('"')) if etag else ("mtime", _plain_time(info.get("mtime")))
        if self.format == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            return _File(path, url, size, stamp, rows)
        if self.format == "npy":
            offset, dtype, shape = _npy_header(fs, path, url)
            return _File(path, url, size, stamp, shape[0], npy=(offset, dtype, shape[1:]))
        rows, starts = _jsonl_starts(fs, path, self.rows_per_batch)
        return _File(path, url, size, stamp, rows, starts=tuple(starts))

    # -- Source ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        self._scan()
        return self._first_batch[-1]

    def fingerprint(self) -> dict:
        files = self._scan()
        return {
            "kind": "files",
            "format": self.format,
            "rows_per_batch": self.rows_per_batch,
            "length": self._first_batch[-1],
            "files": [{"path": f.url, "size": f.size, f.stamp[0]: f.stamp[1], "rows": f.rows} for f in files],
        }

    def locate(self, batch_id: int) -> tuple[str, int, int]:
        """Where batch ``batch_id`` comes from: ``(file URL, first row, end row)`` within that file."""
        files = self._scan()
        if not 0 <= batch_id < self._first_batch[-1]:
            raise ConfigError("batch_id", batch_id, f"an int from 0 to {self._first_batch[-1] - 1}")
        i = bisect.bisect_right(self._first_batch, batch_id) - 1
        lo = (batch_id - self._first_batch[i]) * self.rows_per_batch
        return files[i].url, lo, min(lo + self.rows_per_batch, files[i].rows)

    def read(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        files = self._scan()
        start = check_start(start, self._first_batch[-1])
        fs = self._fs if self._fs is not None else self._filesystem()[0]
        i = bisect.bisect_right(self._first_batch, start) - 1
        for index in range(max(i, 0), len(files)):
            f = files[index]
            first = self._first_batch[index]
            for k in range(max(start - first, 0), self._first_batch[index + 1] - first):
                lo = k * self.rows_per_batch
                hi = min(lo + self.rows_per_batch, f.rows)
                yield first + k, self._read_rows(fs, f, k, lo, hi)

    def _read_rows(self, fs: Any, f: _File, k: int, lo: int, hi: int) -> Any:
        if self.format == "npy":
            offset, dtype, tail = f.npy  # type: ignore[misc]
            dt = np.dtype(dtype)
            row_bytes = dt.itemsize * math.prod(tail)
            out = np.empty((hi - lo, *tail), dtype=dt)
            data = fs.cat_file(f.path, start=offset + lo * row_bytes, end=offset + hi * row_bytes)
            if len(data) != out.nbytes:
                raise SourceChangedError([f"file {f.url}: shorter than its header says (rows {lo}..{hi})"])
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
            return {"x": out}
        if self.format == "parquet":
            return _parquet_rows(fs, f, lo, hi)
        end = f.starts[k + 1] if k + 1 < len(f.starts) else f.size
        rows = []
        for line in fs.cat_file(f.path, start=f.starts[k], end=end).split(b"\n"):
            if line and not line.isspace():
                rows.append(_json_row(line, f.url, lo + len(rows)))
        if len(rows) != hi - lo:
            raise SourceChangedError([f"file {f.url}: rows {lo}..{hi} hold {len(rows)} rows now"])
        return rows_to_columns(rows)


def _plain_time(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _json_row(line: bytes, url: str, row: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as e:
        raise CorruptionError(f"{url} row {row}", f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CorruptionError(f"{url} row {row}", f"a JSON {type(value).__name__}, not an object")
    return value


def _jsonl_starts(fs: Any, path: str, per_batch: int) -> tuple[int, list[int]]:
    """Rows (non-blank lines) of a jsonl file and the byte offset where each batch starts."""
    rows, starts, pos, carry = 0, [], 0, b""
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop() if chunk else b""
            for line in lines:
                if line and not line.isspace():
                    if rows % per_batch == 0:
                        starts.append(pos)
                    rows += 1
                pos += len(line) + 1
            if not chunk:
                return rows, starts


def _npy_header(fs: Any, path: str, url: str) -> tuple[int, str, tuple[int, ...]]:
    fmt = np.lib.format
    with fs.open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
        except ValueError as e:
            raise CorruptionError(url, f"not a .npy file: {e}") from None
        offset = f.tell()
    if dtype.hasobject:
        raise ConfigError("format", "npy", "a .npy file of plain values",
                          detail=f"{url} holds Python objects, which load only with pickle")
    if not shape:
        raise ConfigError("format", "npy", "a .npy file of at least one dimension", detail=f"{url} holds a scalar")
    if fortran and len(shape) > 1:
        raise ConfigError("format", "npy", "a .npy file in C order",
                          detail=f"{url} is in Fortran order, so its rows are not contiguous; save "
                          "np.ascontiguousarray(a)")
    return offset, dtype.str if not dtype.fields else dtype.descr, tuple(shape)


def _parquet_rows(fs: Any, f: _File, lo: int, hi: int) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        meta = pf.metadata
        if meta.num_rows != f.rows:
            raise SourceChangedError([f"file {f.url}: rows {f.rows} -> {meta.num_rows}"])
        groups, first_row, row = [], None, 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if row < hi and row + n > lo:
                groups.append(g)
                first_row = row if first_row is None else first_row
            row += n
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    return arrow_to_numpy(table.slice(lo - (first_row or 0), hi - lo))
