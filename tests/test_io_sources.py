"""Sources: every id exactly once, replay from any id, fingerprints that notice changed input.

Files are real (tmp_path) and real S3 (the moto server fixture); Ray datasets are in test_io_ray.py.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient.errors import ConfigError
from resilient.io import (
    FileSource,
    IterableSource,
    RangeSource,
    SequenceSource,
    Source,
    SourceChangedError,
    as_source,
    check_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]


def ids_of(source: Source, start: int = 0) -> list[int]:
    return [i for i, _ in source.read(start)]


def assert_replayable(source: Source) -> list[tuple[int, Any]]:
    """ids 0..n-1 exactly once, in order; read(start) is the tail of read(0) for every start."""
    full = list(source.read(0))
    n = len(source)
    assert Counter(i for i, _ in full) == Counter(range(n))
    assert [i for i, _ in full] == list(range(n))
    for start in range(n + 1):
        tail = list(source.read(start))
        assert [i for i, _ in tail] == list(range(start, n))
        for (i, got), (j, want) in zip(tail, full[start:]):
            assert i == j and _same(got, want)
    return full


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def roundtrip(fp: dict) -> dict:
    return json.loads(json.dumps(fp))


# -- in-memory sources ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers() | st.text(max_size=5) | st.none(), max_size=30), st.data())
def test_sequence_source_replays_any_start(items: list, data: st.DataObject) -> None:
    src = SequenceSource(items)
    assert len(src) == len(items)
    start = data.draw(st.integers(0, len(items)))
    assert list(src.read(start)) == list(enumerate(items))[start:]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(1, 40), st.integers(-50, 50), st.sampled_from([1, 2, -3]), st.data())
def test_range_source_rows_exactly_once(n_rows: int, batch_size: int, first: int, step: int,
                                        data: st.DataObject) -> None:
    src = RangeSource(n_rows, batch_size, start=first, step=step)
    batches = list(src.read())
    assert [i for i, _ in batches] == list(range(len(src)))
    ids = np.concatenate([b["id"] for _, b in batches]) if batches else np.empty(0, np.int64)
    assert ids.tolist() == list(range(first, first + n_rows * step, step))
    assert all(len(b["id"]) == batch_size for _, b in batches[:-1])
    start = data.draw(st.integers(0, len(src)))
    tail = list(src.read(start))
    assert [i for i, _ in tail] == list(range(start, len(src)))
    assert all(np.array_equal(a["id"], b["id"]) for (_, a), (_, b) in zip(tail, batches[start:]))


def test_sequence_of_dicts_and_tensors() -> None:
    items = [{"x": torch.arange(i, i + 3), "name": f"b{i}"} for i in range(7)]
    full = assert_replayable(SequenceSource(items))
    assert all(b is items[i] for i, b in full)


def test_iterable_source_from_factory_counts_once_and_replays() -> None:
    calls = []

    def factory():
        calls.append(1)
        return ({"i": i} for i in range(10))

    src = as_source(factory)
    assert isinstance(src, IterableSource)
    assert len(src) == 10 and len(src) == 10
    assert len(calls) == 1  # the count is kept
    full = assert_replayable(src)
    assert [b for _, b in full] == [{"i": i} for i in range(10)]
    copy = pickle.loads(pickle.dumps(IterableSource(RangeFactory(4), length=4)))
    assert list(copy.read(2)) == [(2, 2), (3, 3)]


class RangeFactory:
    """A picklable factory (plain pickle cannot ship lambdas; Ray's cloudpickle can)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self):
        return iter(range(self.n))


class Reiterable:
    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_reiterable_object_is_replayed_and_pickles() -> None:
    src = as_source(Reiterable(["a", "b", "c"]))
    assert isinstance(src, IterableSource)
    assert_replayable(src)
    again = pickle.loads(pickle.dumps(src))
    assert list(again.read(1)) == [(1, "b"), (2, "c")]
    assert again.fingerprint() == src.fingerprint()


def test_iterable_that_changes_length_is_refused() -> None:
    items = list(range(5))
    src = IterableSource(lambda: iter(items))
    assert len(src) == 5
    items.pop()
    with pytest.raises(SourceChangedError, match="length 5 -> 4"):
        list(src.read(0))
    items.extend([7, 8])
    with pytest.raises(SourceChangedError, match="more than 5"):
        list(src.read(0))


def test_factory_returning_one_shared_iterator_is_noticed() -> None:
    shared = iter(range(3))
    src = IterableSource(lambda: shared)
    assert len(src) == 3  # consumes it
    with pytest.raises(SourceChangedError, match="ended early"):
        list(src.read(0))


@pytest.mark.parametrize("obj", [
    (x for x in range(3)),
    iter([1, 2, 3]),
    map(str, [1, 2]),
    "abc",
    b"abc",
    {"a": 1},
    42,
])
def test_as_source_refuses_what_cannot_be_replayed(obj: Any) -> None:
    with pytest.raises(ConfigError) as err:
        as_source(obj)
    assert err.value.name == "source"
    assert "re-iterable" in str(err.value)


def test_as_source_refuses_generator_with_advice() -> None:
    with pytest.raises(ConfigError, match="pass the function that creates it"):
        as_source(x for x in range(3))


def test_as_source_dispatch() -> None:
    r = as_source(range(3, 20, 2), batch_size=4)
    assert isinstance(r, RangeSource)
    assert np.concatenate([b["id"] for _, b in r.read()]).tolist() == list(range(3, 20, 2))
    assert len(as_source(range(5000))) == 5  # default batch size 1024
    assert isinstance(as_source([1, 2]), SequenceSource)
    assert isinstance(as_source((1, 2)), SequenceSource)
    assert isinstance(as_source(np.zeros((4, 2))), SequenceSource)
    seq = SequenceSource([1])
    assert as_source(seq) is seq
    with pytest.raises(ConfigError, match="batch_size"):
        as_source([1, 2, 3], batch_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        as_source(range(3), batch_size=0)


def test_read_start_out_of_range_is_refused() -> None:
    src = SequenceSource([1, 2, 3])
    assert list(src.read(3)) == []
    for bad in (-1, 4, 1.5, True):
        with pytest.raises(ConfigError):
            list(src.read(bad))


# -- fingerprints ----------------------------------------------------------------------------------------


def test_fingerprints_are_json_and_survive_pickling() -> None:
    sources = [
        SequenceSource([{"x": torch.arange(5.0), "y": np.arange(3)}, {"x": torch.ones(2)}, "s"]),
        RangeSource(100, 7, start=3),
        IterableSource(RangeFactory(6)),
        as_source(Reiterable([1, 2])),
    ]
    for src in sources:
        fp = src.fingerprint()
        assert roundtrip(fp) == fp
        assert pickle.loads(pickle.dumps(src)).fingerprint() == fp
        check_fingerprint(roundtrip(fp), fp)


def test_fingerprint_changes_with_content_and_length() -> None:
    base = SequenceSource([torch.zeros(3), torch.ones(3), torch.arange(3.0)])
    grown = SequenceSource([torch.zeros(3), torch.ones(3), torch.arange(3.0), torch.zeros(1)])
    edited = SequenceSource([torch.zeros(3), torch.ones(3), torch.arange(3.0) + 1])
    with pytest.raises(SourceChangedError) as err:
        check_fingerprint(base.fingerprint(), grown.fingerprint())
    assert "length 3 -> 4" in err.value.differences
    with pytest.raises(SourceChangedError, match="sample"):
        check_fingerprint(base.fingerprint(), edited.fingerprint())
    with pytest.raises(SourceChangedError, match="kind 'sequence' -> 'range'"):
        check_fingerprint(base.fingerprint(), RangeSource(3, 1).fingerprint())
    with pytest.raises(SourceChangedError, match="batch_size 10 -> 20"):
        check_fingerprint(RangeSource(100, 10).fingerprint(), RangeSource(100, 20).fingerprint())


# -- files ----------------------------------------------------------------------------------------------

ROWS = [7, 0, 5, 3]  # rows per file; 0: a file with no rows gives no batches
PER_BATCH = 3  # divides none of the non-empty files


def write_files(fs: Any, root: str, fmt: str, rows: list[int] = ROWS) -> list[list[int]]:
    """Files part-<i> under root whose rows carry a global row number; returns each file's row numbers."""
    out, n = [], 0
    for i, count in enumerate(rows):
        numbers = list(range(n, n + count))
        n += count
        write_file(fs, f"{root}/part-{i}.{fmt}", fmt, numbers)
        out.append(numbers)
    return out


def write_file(fs: Any, path: str, fmt: str, numbers: list[int]) -> None:
    if fmt == "jsonl":
        lines = [json.dumps({"row": k, "text": f"t{k}", **({"extra": k} if k % 4 == 0 else {})}) for k in numbers]
        data = ("\n\n".join(lines) + "\n").encode() if lines else b""  # blank lines are not rows
    elif fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"row": pa.array(numbers, pa.int64()), "emb": pa.FixedSizeListArray.from_arrays(
            pa.array(np.repeat(np.array(numbers, np.float32), 2)), 2)}), sink, row_group_size=2)
        data = sink.getvalue().to_pybytes()
    else:
        buf = fsspec.filesystem("memory")
        with buf.open("/x.npy", "wb") as f:
            np.save(f, np.stack([np.array([k, -k], np.int32) for k in numbers]) if numbers
                    else np.empty((0, 2), np.int32))
        data = buf.cat_file("/x.npy")
    fs.pipe_file(path, data)


def rows_of(batch: dict, fmt: str) -> list[int]:
    if fmt == "jsonl":
        assert batch["text"] == [f"t{k}" for k in batch["row"]]
        # a column appears in a batch when one of its rows has it; rows without it give None
        assert batch.get("extra", [None] * len(batch["row"])) == [k if k % 4 == 0 else None for k in batch["row"]]
        return list(batch["row"])
    if fmt == "parquet":
        assert batch["emb"].shape == (len(batch["row"]), 2)
        assert np.array_equal(batch["emb"][:, 0], batch["row"].astype(np.float32))
        return batch["row"].tolist()
    x = batch["x"]
    assert x.dtype == np.int32 and x.shape[1] == 2 and np.array_equal(x[:, 1], -x[:, 0]) and x.flags.writeable
    return x[:, 0].tolist()


def check_file_source(src: FileSource, files: list[list[int]], fmt: str) -> None:
    full = assert_replayable(src)
    # batches follow the files: none crosses a boundary, only each file's last batch is short
    expected = [numbers[lo:lo + PER_BATCH] for numbers in files for lo in range(0, len(numbers), PER_BATCH)]
    assert [rows_of(b, fmt) for _, b in full] == expected
    assert sum(len(r) for r in expected) == sum(map(len, files))
    url, lo, hi = src.locate(len(src) - 1)
    assert url.endswith(f"part-{len(files) - 1}.{fmt}") and (lo, hi) == (0, 3)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "npy"])
def test_file_source_local(tmp_path: Path, fmt: str) -> None:
    fs = fsspec.filesystem("file")
    files = write_files(fs, str(tmp_path), fmt)
    src = FileSource(str(tmp_path / f"*.{fmt}"), rows_per_batch=PER_BATCH)
    assert len(src) == 3 + 0 + 2 + 1
    check_file_source(src, files, fmt)
    assert src.format == fmt
    # a pickled copy (as shipped to a worker) reads the same without rescanning
    copy = pickle.loads(pickle.dumps(src))
    assert copy._fs is None and copy.fingerprint() == src.fingerprint()
    assert [rows_of(b, fmt) for _, b in copy.read(3)] == [rows_of(b, fmt) for _, b in src.read(3)]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "npy"])
def test_read_from_later_file_does_not_read_earlier_ones(tmp_path: Path, fmt: str) -> None:
    fs = fsspec.filesystem("file")
    files = write_files(fs, str(tmp_path), fmt)
    src = FileSource(f"file://{tmp_path}/*", format=fmt, rows_per_batch=PER_BATCH)
    len(src)
    (tmp_path / f"part-0.{fmt}").write_bytes(b"garbage, not " + fmt.encode())  # after the scan
    assert [rows_of(b, fmt) for _, b in src.read(3)] == [files[2][:3], files[2][3:], files[3]]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "npy"])
def test_file_source_fingerprint_notices_changes(tmp_path: Path, fmt: str) -> None:
    fs = fsspec.filesystem("file")
    write_files(fs, str(tmp_path), fmt)
    pattern = str(tmp_path / f"*.{fmt}")
    fp = FileSource(pattern, rows_per_batch=PER_BATCH).fingerprint()
    assert roundtrip(fp) == fp
    check_fingerprint(roundtrip(fp), FileSource(pattern, rows_per_batch=PER_BATCH).fingerprint())
    part2 = f"file://{tmp_path}/part-2.{fmt}"

    write_file(fs, str(tmp_path / f"part-2.{fmt}"), fmt, list(range(12, 19)))  # appended to: 5 -> 7 rows
    with pytest.raises(SourceChangedError) as err:
        check_fingerprint(fp, FileSource(pattern, rows_per_batch=PER_BATCH).fingerprint())
    assert f"file {part2}: rows 5 -> 7" in err.value.differences
    assert any(d.startswith(f"file {part2}: size ") for d in err.value.differences)
    assert "length 6 -> 7" in err.value.differences

    write_file(fs, str(tmp_path / f"part-2.{fmt}"), fmt, list(range(7, 12)))
    os.remove(tmp_path / f"part-3.{fmt}")
    write_file(fs, str(tmp_path / f"part-9.{fmt}"), fmt, [1])
    with pytest.raises(SourceChangedError) as err:
        check_fingerprint(fp, FileSource(pattern, rows_per_batch=PER_BATCH).fingerprint())
    assert f"file file://{tmp_path}/part-3.{fmt}: removed" in err.value.differences
    assert f"file file://{tmp_path}/part-9.{fmt}: added" in err.value.differences


FINGERPRINT_SCRIPT = """
import json, sys, torch
from resilient.io import FileSource, SequenceSource
items = [{"x": torch.arange(float(i)), "name": f"b{i}"} for i in range(5)]
print(json.dumps([FileSource(sys.argv[1], rows_per_batch=3).fingerprint(), SequenceSource(items).fingerprint()]))
"""


def test_fingerprints_are_the_same_in_another_process(tmp_path: Path) -> None:
    write_files(fsspec.filesystem("file"), str(tmp_path), "jsonl")
    pattern = str(tmp_path / "*.jsonl")
    items = [{"x": torch.arange(float(i)), "name": f"b{i}"} for i in range(5)]
    here = [FileSource(pattern, rows_per_batch=3).fingerprint(), SequenceSource(items).fingerprint()]
    out = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT, pattern], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120)
    assert json.loads(out.stdout) == here


def test_file_source_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="url_glob"):
        len(FileSource(str(tmp_path / "*.jsonl"), rows_per_batch=2))
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "b.npy").write_bytes(b"")
    with pytest.raises(ConfigError, match="several"):
        len(FileSource(str(tmp_path / "*"), rows_per_batch=2))
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ConfigError, match="rows_per_batch"):
            FileSource(str(tmp_path / "*.jsonl"), rows_per_batch=bad)  # type: ignore[arg-type]
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="pickle"):
        len(FileSource(str(tmp_path / "obj.npy"), rows_per_batch=2))


def test_file_source_directory_and_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    (tmp_path / "_SUCCESS").write_text("")
    src = FileSource(str(tmp_path), rows_per_batch=1)
    assert len(src) == 2
    assert next(src.read(0)) == (0, {"a": [1]})
    with pytest.raises(Exception, match="row 1.*not an object"):
        list(src.read(1))


# -- files on S3 -------------------------------------------------------------------------------------------


def test_file_source_on_s3(s3_bucket: Any) -> None:
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    root = s3_bucket.url[len("s3://"):]

    def source(fmt: str) -> FileSource:
        return FileSource(f"{s3_bucket.url}/in-{fmt}/part-*", rows_per_batch=PER_BATCH,
                          storage_options=s3_bucket.storage_options)

    recorded = {}
    for fmt in ("jsonl", "parquet", "npy"):
        files = write_files(fs, f"{root}/in-{fmt}", fmt)
        src = source(fmt)
        check_file_source(src, files, fmt)
        fp = recorded[fmt] = src.fingerprint()
        assert all(f["etag"] and f["path"].startswith(f"{s3_bucket.url}/in-{fmt}/") for f in fp["files"])
        assert "testing" not in repr(src)  # the fake credentials
        copy = pickle.loads(pickle.dumps(src))
        assert copy.fingerprint() == fp
        assert [rows_of(b, fmt) for _, b in copy.read(4)] == [rows_of(b, fmt) for _, b in src.read(4)]
    write_file(fs, f"{root}/in-jsonl/part-0.jsonl", "jsonl", list(range(100, 107)))  # same rows, new content
    with pytest.raises(SourceChangedError, match=r"in-jsonl/part-0.jsonl: etag") as err:
        check_fingerprint(recorded["jsonl"], source("jsonl").fingerprint())
    assert not any("length" in d for d in err.value.differences)
