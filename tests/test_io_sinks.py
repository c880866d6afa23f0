"""FileSink contract, run against a local directory and a real S3 server (moto on 127.0.0.1):
stage is invisible, commit is create-only and at most once, reads verify, resume scans are bounded."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from resilient.errors import (
    CodecError,
    ConfigError,
    CorruptionError,
    FencedError,
    PermanentStorageError,
    UnsupportedTypeError,
)
from resilient.io import FileSink, NotCommittedError, StagedOutput
from resilient.retry import RetryPolicy

FAST = RetryPolicy(attempts=3, backoff_seconds=0.001, backoff_max_seconds=0.002, jitter=False)


@pytest.fixture(params=["local", "s3"])
def make_sink(request: pytest.FixtureRequest, tmp_path: Any):
    """Factory for sinks on one fresh root (a local directory or an S3 bucket)."""
    if request.param == "local":
        url, options = str(tmp_path / "out"), {}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        url, options = f"{bucket.url}/out", bucket.storage_options

    def make(fmt: str = "jsonl", **kw: Any) -> FileSink:
        kw.setdefault("retry", FAST)
        return FileSink(url, format=fmt, storage_options=options, **kw)

    make.kind = request.param  # type: ignore[attr-defined]
    return make


def output_for(fmt: str, b: int) -> Any:
    if fmt == "jsonl":
        return {"id": np.arange(b, b + 3), "text": [f"r{b}", "é", ""], "score": torch.tensor([0.1, -2.5, 1e-300],
                                                                                             dtype=torch.float64)}
    if fmt == "parquet":
        return {"id": np.arange(b, b + 3), "emb": np.arange(6, dtype=np.float32).reshape(3, 2) + b,
                "text": ["a", "b", None]}
    return {"logits": torch.randn(2, 3, generator=torch.Generator().manual_seed(b)).bfloat16(), "step": b,
            "meta": [b, "x", None]}


def assert_output(fmt: str, got: Any, b: int) -> None:
    if fmt == "jsonl":
        assert got == {"id": [b, b + 1, b + 2], "text": [f"r{b}", "é", ""], "score": [0.1, -2.5, 1e-300]}
    elif fmt == "parquet":
        assert got["id"].tolist() == [b, b + 1, b + 2]
        assert got["emb"].dtype == np.float32 and got["emb"].shape == (3, 2)
        assert np.array_equal(got["emb"], np.arange(6, dtype=np.float32).reshape(3, 2) + b)
        assert got["text"].tolist() == ["a", "b", None]
    else:
        want = output_for(fmt, b)
        assert torch.equal(got["logits"], want["logits"]) and got["logits"].dtype == torch.bfloat16
        assert got["step"] == b and got["meta"] == [b, "x", None]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tensors"])
def test_stage_commit_read_round_trip(make_sink: Any, fmt: str) -> None:
    sink = make_sink(fmt)
    staged = sink.stage(3, output_for(fmt, 3), epoch=2)
    assert isinstance(staged, StagedOutput) and staged.batch_id == 3 and staged.epoch == 2
    assert staged.rows == (None if fmt == "tensors" else 3)
    assert staged.name.startswith("data/000000/000000000003-e2-") and staged.name.endswith(f".{fmt}")
    # staged is invisible
    assert not sink.is_committed(3) and list(sink.committed_from(0)) == []
    with pytest.raises(NotCommittedError) as err:
        sink.read(3)
    assert isinstance(err.value, LookupError) and err.value.batch_id == 3
    assert sink.commit(staged) is True
    assert sink.is_committed(3)
    assert_output(fmt, sink.read(3), 3)
    # another process (a fresh, unpickled sink) sees the same
    other = pickle.loads(pickle.dumps(sink))
    assert [b for b, _ in other.read_all()] == [3]
    assert_output(fmt, other.read(3), 3)


def test_commit_is_at_most_once(make_sink: Any) -> None:
    sink = make_sink()
    first = sink.stage(5, {"v": [1]}, epoch=0)
    assert sink.commit(first) is True
    marker = sink._store().read("commit/000000/000000000005")
    assert sink.commit(first) is False  # a second call did not commit
    zombie = sink.stage(5, {"v": [666]}, epoch=0)
    newer = sink.stage(5, {"v": [2]}, epoch=1)
    assert sink.commit(zombie) is False and sink.commit(newer) is False
    assert bytes(sink._store().read("commit/000000/000000000005")) == bytes(marker)  # never overwritten
    assert sink.read(5) == {"v": [1]}
    assert json.loads(marker) == {"batch_id": 5, "name": first.name, "length": first.length, "xxh3": first.xxh3,
                                  "epoch": 0, "rows": 1}


def test_concurrent_commits_of_one_batch_exactly_one_wins(make_sink: Any) -> None:
    sink = make_sink()
    staged = [sink.stage(9, {"who": [i]}, epoch=i) for i in range(6)]
    results: list[bool] = []
    barrier = threading.Barrier(len(staged))

    def go(s: StagedOutput) -> None:
        barrier.wait()
        results.append(pickle.loads(pickle.dumps(sink)).commit(s))

    threads = [threading.Thread(target=go, args=(s,)) for s in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(results) == Counter({True: 1, False: 5})
    assert sink.read(9)["who"][0] in range(6)


class LandsThenFails:
    """A backend whose first ``create_exclusive`` lands and then reports a dropped connection (the
    answer was lost), or, with ``lands=False``, fails before creating anything."""

    def __init__(self, backend: Any, *, lands: bool) -> None:
        self.backend = backend
        self.lands = lands
        self.creates = 0

    def create_exclusive(self, rel: str, data: bytes) -> None:
        self.creates += 1
        if self.creates == 1:
            if self.lands:
                self.backend.create_exclusive(rel, data)
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        self.backend.create_exclusive(rel, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@pytest.mark.parametrize("lands", [True, False])
def test_retried_commit_whose_first_attempt_landed(make_sink: Any, lands: bool) -> None:
    sink = make_sink()
    sink.commit(sink.stage(0, {"v": [0]}, epoch=0))  # the layout record exists: only markers go through the fake
    staged = sink.stage(1, {"v": [1]}, epoch=0)
    flaky = LandsThenFails(sink._store(), lands=lands)
    sink._backend = flaky
    assert sink.commit(staged) is True
    assert flaky.creates == 2
    assert sink.read(1) == {"v": [1]}
    assert sink.commit(staged) is False


def test_committed_from_spans_shards_ascending_and_bounded(make_sink: Any) -> None:
    width = 8
    sink = make_sink(shard_width=width)
    rng = random.Random(7)
    ids = sorted(rng.sample(range(400), 60 if make_sink.kind == "s3" else 150))
    for b in rng.sample(ids, len(ids)):  # commit order does not matter
        assert sink.commit(sink.stage(b, {"b": [b]}, epoch=0))
    assert len({b // width for b in ids}) > 10
    for start in (0, 1, ids[5], ids[5] + 1, 199, 398, 400, 10_000):
        assert list(sink.committed_from(start)) == [b for b in ids if b >= start]

    counting = CountingListdir(sink._store())
    sink._backend = counting
    start = 200
    it = sink.committed_from(start)
    first = next(it)
    assert first == min(b for b in ids if b >= start)
    # the top listing plus one shard, the watermark's: nothing below it, nothing ahead of need
    assert counting.calls == ["commit", f"commit/{first // width:06d}"]
    rest = list(it)
    shards = [int(c.rsplit("/", 1)[1]) for c in counting.calls[1:]]
    assert shards == sorted(shards) and min(shards) >= start // width
    assert counting.largest <= width  # one shard's listing at a time
    assert [first, *rest] == [b for b in ids if b >= start]
    assert [b for b, _ in sink.read_all(start)] == [b for b in ids if b >= start]


class CountingListdir:
    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.calls: list[str] = []
        self.largest = 0

    def listdir(self, rel: str) -> list[str]:
        self.calls.append(rel)
        names = self.backend.listdir(rel)
        if rel != "commit":
            self.largest = max(self.largest, len(names))
        return names

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def test_orphans_and_delete(make_sink: Any) -> None:
    sink = make_sink(shard_width=4)
    attempts = [sink.stage(1, {"v": [i]}, epoch=i) for i in range(3)]  # retried batch: three attempts
    assert sink.commit(attempts[1])
    lone = sink.stage(2, {"v": [2]}, epoch=0)
    assert sink.commit(lone)
    uncommitted = sink.stage(6, {"v": [6]}, epoch=0)  # another shard, never committed
    orphans = sink.orphans()
    assert sorted(orphans) == sorted([attempts[0].name, attempts[2].name, uncommitted.name])
    with pytest.raises(ConfigError, match="committed output"):
        sink.delete([attempts[1].name])
    with pytest.raises(ConfigError):
        sink.delete(["commit/000000/000000000001"])
    with pytest.raises(ConfigError):
        sink.delete(["data/000000/../../escape"])
    sink.delete(orphans)
    assert sink.orphans() == []
    assert sink.read(1) == {"v": [1]} and sink.read(2) == {"v": [2]}
    assert list(sink.committed_from(0)) == [1, 2]


def test_mark_complete(make_sink: Any) -> None:
    sink = make_sink()
    assert sink.is_complete() is None
    sink.mark_complete({"batches": 10, "rows": 99})
    sink.mark_complete({"rows": 99, "batches": 10})  # the same again: fine
    assert sink.is_complete() == {"batches": 10, "rows": 99}
    with pytest.raises(FencedError):
        sink.mark_complete({"batches": 11})
    with pytest.raises(ConfigError):
        make_sink().mark_complete({"x": object()})


def test_corruption_is_detected(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path), format="jsonl", retry=FAST)
    staged = sink.stage(4, {"v": [1, 2, 3]}, epoch=0)
    sink.commit(staged)
    path = tmp_path / staged.name
    data = path.read_bytes()
    path.write_bytes(data.replace(b"2", b"7"))  # same length, other bytes
    with pytest.raises(CorruptionError, match="xxh3"):
        sink.read(4)
    path.write_bytes(data[:-2])
    with pytest.raises(CorruptionError, match="length"):
        sink.read(4)
    path.unlink()
    with pytest.raises(PermanentStorageError, match="missing"):
        sink.read(4)
    marker = tmp_path / "commit" / "000000" / "000000000004"
    marker.chmod(0o644)
    marker.write_text(json.dumps({"name": "../../etc/passwd", "length": 1, "xxh3": "0"}))
    with pytest.raises(CorruptionError, match="commit marker"):
        sink.read(4)


def test_layout_mismatch_is_refused(tmp_path: Any) -> None:
    FileSink(str(tmp_path), shard_width=100).commit(FileSink(str(tmp_path), shard_width=100).stage(
        1, {"a": [1]}, epoch=0))
    with pytest.raises(ConfigError, match="shard_width"):
        list(FileSink(str(tmp_path)).committed_from(0))
    with pytest.raises(ConfigError, match="format"):
        FileSink(str(tmp_path), format="parquet", shard_width=100).is_committed(1)


def test_bogus_staged_output_is_refused(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path))
    good = sink.stage(1, {"a": [1]}, epoch=3)
    for bad in (
        StagedOutput(2, good.name, good.length, good.xxh3, 3, 1),  # names another batch's object
        StagedOutput(1, good.name, good.length, good.xxh3, 4, 1),  # another epoch
        StagedOutput(1, "../../x", 1, "0", 3, 1),
        StagedOutput(1, good.name.replace(".jsonl", ".parquet"), 1, "0", 3, 1),
    ):
        with pytest.raises(ConfigError):
            sink.commit(bad)
    assert not sink.is_committed(1) and not sink.is_committed(2)


def test_jsonl_values(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path))
    floats = np.random.default_rng(0).standard_normal(50)
    rows = [{"f": float(x), "f32": np.float32(x), "i": np.int64(i), "nested": {"l": [1, None, True]}}
            for i, x in enumerate(floats)]
    sink.commit(sink.stage(0, rows, epoch=0))
    got = sink.read(0)
    assert got["f"] == floats.tolist()  # bit-exact through repr
    assert got["f32"] == [float(np.float32(x)) for x in floats]
    assert got["i"] == list(range(50)) and got["nested"][0] == {"l": [1, None, True]}
    sink.commit(sink.stage(1, [{"a": 1}, {"b": 2}], epoch=0))
    assert sink.read(1) == {"a": [1, None], "b": [None, 2]}
    sink.commit(sink.stage(2, {"a": []}, epoch=0))
    assert sink.read(2) == {}  # no rows: no columns
    with pytest.raises(CodecError, match="NaN"):
        sink.stage(3, {"a": [1.0, float("nan")]}, epoch=0)
    with pytest.raises(CodecError, match="NaN"):
        sink.stage(3, {"a": torch.tensor([float("inf")])}, epoch=0)
    with pytest.raises(CodecError, match="different lengths"):
        sink.stage(3, {"a": [1, 2], "b": [1]}, epoch=0)
    with pytest.raises(UnsupportedTypeError):
        sink.stage(3, {"a": [b"bytes"]}, epoch=0)
    with pytest.raises(UnsupportedTypeError):
        sink.stage(3, "text", epoch=0)
    assert sink.orphans() == []  # refusals write nothing


_NUMERIC = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16,
            np.float32, np.float64]


def test_parquet_values(tmp_path: Any) -> None:
    """Every column kind reads back equal, with its dtype: numbers (wrapped without a copy), strided and
    N-D views, non-native byte order, bools, datetimes, strings, NaN and infinities."""
    sink = FileSink(str(tmp_path), format="parquet")
    base = np.arange(-6, 18)
    out = {f"n_{np.dtype(t).name}": (base % 9 * 3).astype(t) for t in _NUMERIC}
    out.update({
        "strided": np.arange(48, dtype=np.int32)[::2],
        "emb": np.arange(24 * 3 * 2, dtype=np.float32).reshape(24, 3, 2)[:, ::-1],
        "big_endian": np.arange(24, dtype=">i4"),
        "flag": base % 2 == 0,
        "when": np.arange(24).astype("datetime64[s]"),
        "name": np.array([f"r{i}" for i in range(24)]),
        "special": np.array([np.nan, np.inf, -np.inf, -0.0] * 6),
        "tensor": torch.arange(24, dtype=torch.float64) / 3,
    })
    sink.commit(sink.stage(0, out, epoch=0))
    got = sink.read(0)
    for name, want in out.items():
        want = want.numpy() if isinstance(want, torch.Tensor) else want
        assert got[name].shape == want.shape, name
        if want.dtype.kind in "iufb":
            assert got[name].dtype == want.dtype.newbyteorder("="), name
            np.testing.assert_array_equal(got[name], want, err_msg=name)
        else:
            assert list(got[name]) == list(want), name
    assert np.signbit(got["special"][3])  # -0.0 kept, bit for bit


def test_parquet_encoding_of_numbers_does_not_import_pandas(tmp_path: Any) -> None:
    """pyarrow's ``pa.array`` imports pandas on its first call (0.17 s): a replacement actor's first
    output would pay it on the failover path. Numeric columns do not go through it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from resilient.io import FileSink\n"
        f"sink = FileSink({str(tmp_path)!r}, format='parquet')\n"
        "sink.encode(0, {'id': np.arange(8), 'score': np.ones((8, 4), dtype=np.float32)}, epoch=1)\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_parquet_and_tensors_refusals(tmp_path: Any) -> None:
    with pytest.raises(UnsupportedTypeError, match="bfloat16"):
        FileSink(str(tmp_path / "p"), format="parquet").stage(0, {"x": torch.ones(2).bfloat16()}, epoch=0)
    with pytest.raises(CodecError):
        FileSink(str(tmp_path / "p"), format="parquet").stage(0, {"x": [1, 2], "y": [1]}, epoch=0)
    with pytest.raises(UnsupportedTypeError):
        FileSink(str(tmp_path / "t"), format="tensors").stage(0, {"f": lambda: 1}, epoch=0)
    with pytest.raises(ConfigError, match="format"):
        FileSink(str(tmp_path), format="csv")
    with pytest.raises(ConfigError):
        FileSink(str(tmp_path)).stage(-1, {"a": [1]}, epoch=0)


def test_pickle_and_repr_hide_credentials(s3_bucket: Any) -> None:
    url = s3_bucket.url.replace("s3://", "s3://AKIAEXAMPLE:wJalrXUtnSECRET@") + "/out"
    sink = FileSink(url, format="jsonl", storage_options=s3_bucket.storage_options)
    assert "wJalrXUtnSECRET" not in repr(sink) and "testing" not in repr(sink)
    plain = FileSink(f"{s3_bucket.url}/out", storage_options=s3_bucket.storage_options, retry=FAST)
    plain.commit(plain.stage(0, {"a": [1]}, epoch=0))
    assert plain._backend is not None
    blob = pickle.dumps(plain)
    copy = pickle.loads(blob)
    assert copy._backend is None and b"S3FileSystem" not in blob  # no live filesystem travels
    assert copy.read(0) == {"a": [1]}


def test_local_staging_leaves_no_partial_files(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path), format="tensors")
    staged = sink.stage(0, {"w": torch.arange(10_000.0)}, epoch=0)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert files == [str(tmp_path / staged.name)]
    assert os.path.getsize(files[0]) == staged.length


# -- grouped commits (the runtime's path) ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tensors"])
def test_group_commit_round_trip(make_sink: Any, fmt: str) -> None:
    sink = make_sink(fmt, shard_width=4)
    ids = [9, 2, 3, 7, 4]  # out of order, across shards
    encoded = [pickle.loads(pickle.dumps(sink.encode(b, output_for(fmt, b), epoch=1))) for b in ids]
    assert sink.commit_group(encoded) == [True] * 5
    assert list(sink.committed_from(0)) == sorted(ids)
    reader = make_sink(fmt, shard_width=4)  # another process's view
    for b in ids:
        assert_output(fmt, reader.read(b), b)
    assert [b for b, _ in reader.read_all(4)] == [4, 7, 9]
    if fmt == "jsonl":  # a jsonl part is itself valid jsonl: every row of the group, in group order
        part = reader._record(9)["name"]
        lines = reader._store().read(part).decode().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [i for b in ids for i in (b, b + 1, b + 2)]


def test_group_commit_is_at_most_once_per_batch(make_sink: Any) -> None:
    sink = make_sink()
    first = [sink.encode(b, {"v": [b, 0]}, epoch=0) for b in range(0, 6)]
    again = [sink.encode(b, {"v": [b, 1]}, epoch=1) for b in range(4, 10)]
    assert sink.commit_group(first) == [True] * 6
    assert sink.commit_group(again) == [False, False, True, True, True, True]
    staged = sink.stage(5, {"v": [5, 2]}, epoch=2)
    assert sink.commit(staged) is False  # the per-batch path sees the group's marker too
    assert [out["v"] for _, out in sink.read_all()] == [[b, 0] for b in range(6)] + [[b, 1] for b in range(6, 10)]


def test_concurrent_group_commits_each_batch_exactly_once(make_sink: Any) -> None:
    """Writers racing with overlapping groups: every batch has exactly one winner, and what a reader sees is
    the winner's output."""
    sink = make_sink()
    groups = [[sink.encode(b, {"who": [w], "b": [b]}, epoch=w) for b in range(w, w + 12, 2)] for w in range(4)]
    won: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(groups))

    def go(w: int) -> None:
        barrier.wait()
        mine = pickle.loads(pickle.dumps(sink))
        for o, ok in zip(groups[w], mine.commit_group(groups[w])):
            if ok:
                won.setdefault(o.batch_id, []).append(w)

    threads = [threading.Thread(target=go, args=(w,)) for w in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = sorted({o.batch_id for g in groups for o in g})
    assert sorted(won) == all_ids and all(len(w) == 1 for w in won.values())
    for b, (w,) in won.items():
        assert sink.read(b) == {"who": [w], "b": [b]}


def test_group_commit_refuses_bad_input(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path), format="jsonl", retry=FAST)
    a = sink.encode(1, {"v": [1]}, epoch=0)
    with pytest.raises(ConfigError, match="at most once"):
        sink.commit_group([a, a])
    forged = a.__class__(a.batch_id, a.epoch, a.data + b" ", a.xxh3, a.rows)
    with pytest.raises(ConfigError, match="checksum"):
        sink.commit_group([forged])
    assert sink.commit_group([]) == []
    assert list(sink.committed_from(0)) == []


def test_group_corruption_is_detected_per_batch(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path), format="jsonl", retry=FAST)
    sink.commit_group([sink.encode(b, {"v": [b * 11]}, epoch=0) for b in range(3)])
    part = tmp_path / sink._record(1)["name"]
    data = part.read_bytes()
    rec = sink._record(1)
    broken = bytearray(data)
    broken[rec["offset"] + rec["length"] - 3] ^= 0x01  # inside batch 1's slice
    part.write_bytes(bytes(broken))
    fresh = FileSink(str(tmp_path), format="jsonl", retry=FAST)
    assert fresh.read(0) == {"v": [0]} and fresh.read(2) == {"v": [22]}
    with pytest.raises(CorruptionError, match="xxh3"):
        fresh.read(1)
    index = next((tmp_path / "data").rglob("*.json"))
    index.write_text("{not json")
    with pytest.raises(CorruptionError, match="group index"):
        FileSink(str(tmp_path), format="jsonl", retry=FAST).read(0)
    index.unlink()
    with pytest.raises(CorruptionError, match="missing"):
        FileSink(str(tmp_path), format="jsonl", retry=FAST).read(0)


def test_local_markers_are_hard_links_to_one_file_holding_the_group_id(tmp_path: Any) -> None:
    """A group's markers, across two shards, are names of one file whose content is the group's id; its
    temporary name is gone; a second commit of the same batches leaves them as they are."""
    sink = FileSink(str(tmp_path), format="jsonl", retry=FAST, shard_width=4)
    encoded = [sink.encode(b, {"v": [b]}, epoch=0) for b in (3, 4, 6)]
    assert sink.commit_group(encoded) == [True, True, True]
    markers = [tmp_path / "commit" / f"{b // 4:06d}" / f"{b:012d}" for b in (3, 4, 6)]
    stats = [m.lstat() for m in markers]
    assert not any(m.is_symlink() for m in markers)
    assert len({(st.st_dev, st.st_ino) for st in stats}) == 1 and stats[0].st_nlink == 3
    (index,) = (tmp_path / "data" / "000000").glob("*.json")
    assert {m.read_text() for m in markers} == {index.stem}
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # no temporaries left
    assert sink.commit_group([sink.encode(b, {"v": [-b]}, epoch=1) for b in (2, 3, 6)]) == [True, False, False]
    assert markers[0].lstat().st_nlink == 3 and markers[0].read_text() == index.stem
    assert [(b, out["v"]) for b, out in FileSink(str(tmp_path), format="jsonl", shard_width=4).read_all()] == [
        (2, [-2]), (3, [3]), (4, [4]), (6, [6])]


def test_a_copy_of_a_local_sink_reads_the_same(tmp_path: Any) -> None:
    """Markers are plain files: a copy made by tools that do not keep hard links (shutil.copytree,
    ``cp -r``) is a complete sink."""
    import shutil

    sink = FileSink(str(tmp_path / "a"), format="parquet", retry=FAST)
    sink.commit_group([sink.encode(b, output_for("parquet", b), epoch=0) for b in range(5)])
    sink.mark_complete({"total": 5})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = FileSink(str(tmp_path / "b"), format="parquet")
    assert copy.is_complete() is not None
    assert [b for b, _ in copy.read_all()] == list(range(5))
    np.testing.assert_array_equal(copy.read(4)["emb"], sink.read(4)["emb"])


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EMLINK])
def test_markers_are_symlinks_where_the_filesystem_refuses_hard_links(tmp_path: Any, monkeypatch: Any,
                                                                      refusal: int) -> None:
    """EPERM (no hard links on this filesystem: all markers) or EMLINK (the file's link count is full: the
    rest of the group): markers become symbolic links holding the id, and read the same. The refusal is
    injected into the replica's link() of markers."""
    from resilient.storage import replica

    real_link, calls = os.link, []

    def link(src: str, dst: str) -> None:
        if f"{os.sep}commit{os.sep}" not in dst:  # _sink.json (create-only objects need link() locally)
            return real_link(src, dst)
        calls.append(dst)
        if refusal == errno.EPERM or len(calls) > 1:
            raise OSError(refusal, os.strerror(refusal), dst)
        real_link(src, dst)

    monkeypatch.setattr(replica.os, "link", link)
    sink = FileSink(str(tmp_path), format="jsonl", retry=FAST)
    assert sink.commit_group([sink.encode(b, {"v": [b]}, epoch=0) for b in (0, 1, 2)]) == [True, True, True]
    assert sink.commit_group([sink.encode(1, {"v": [9]}, epoch=1)]) == [False]
    monkeypatch.undo()
    markers = [tmp_path / "commit" / "000000" / f"{b:012d}" for b in (0, 1, 2)]
    expect = [True, True, True] if refusal == errno.EPERM else [False, True, True]
    assert [m.is_symlink() for m in markers] == expect
    assert len({os.readlink(m) if m.is_symlink() else m.read_text() for m in markers}) == 1
    assert len(calls) == (2 if refusal == errno.EPERM else 3)  # once refused, no more links in that call
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))
    assert [out["v"] for _, out in FileSink(str(tmp_path), format="jsonl").read_all()] == [[0], [1], [2]]


def test_writer_killed_between_markers_commits_only_those_made(tmp_path: Any) -> None:
    """A process SIGKILLed after the first of a group's markers: that batch is committed, the others are
    not, the markers' temporary is an orphan (and only it); the rest commit later, exactly once."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, signal
        from resilient.io import FileSink
        from resilient.storage import replica
        real_link, n = os.link, []
        def link(src, dst):
            if "/commit/" in dst:
                if n:
                    os.kill(os.getpid(), signal.SIGKILL)
                n.append(dst)
            real_link(src, dst)
        replica.os.link = link
        sink = FileSink({str(tmp_path)!r}, format="jsonl", shard_width=4)
        sink.commit_group([sink.encode(b, {{"v": [b]}}, epoch=0) for b in (1, 2, 5)])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    sink = FileSink(str(tmp_path), format="jsonl", retry=FAST, shard_width=4)
    assert list(sink.committed_from(0)) == [1]
    (tmp,) = sink.orphans()
    assert tmp.startswith("commit/000000/.tmp-")
    assert sink.commit_group([sink.encode(b, {"v": [-b]}, epoch=1) for b in (1, 2, 5)]) == [False, True, True]
    assert sink.orphans() == [tmp]
    sink.delete([tmp])
    assert sink.orphans() == []
    assert [(b, out["v"]) for b, out in sink.read_all()] == [(1, [1]), (2, [-2]), (5, [-5])]


def test_interrupted_group_commit_leaves_only_orphans(make_sink: Any) -> None:
    """The part and index land, then the writer dies before any marker: nothing becomes visible, the
    objects are orphans, and a later commit of the same batches works."""
    sink = make_sink(shard_width=4)
    sink.commit_group([sink.encode(0, {"v": [0]}, epoch=0)])

    class Died(Exception):
        pass

    def die(*args: Any) -> bool:
        raise Died()

    sink._point = sink._point_all = die  # type: ignore[method-assign]
    with pytest.raises(Died):
        sink.commit_group([sink.encode(b, {"v": [b, -1]}, epoch=0) for b in (1, 5)])
    fresh = make_sink(shard_width=4)
    assert list(fresh.committed_from(0)) == [0]
    orphans = fresh.orphans()
    assert len(orphans) == 2 and {o.rsplit(".", 1)[1] for o in orphans} == {"json", "jsonl"}
    assert fresh.commit_group([fresh.encode(b, {"v": [b]}, epoch=1) for b in (1, 5)]) == [True, True]
    assert sorted(fresh.orphans()) == sorted(orphans)
    with pytest.raises(ConfigError, match="committed outputs"):
        fresh.delete([fresh._record(5)["name"]])
    fresh.delete(orphans)
    assert fresh.orphans() == []
    assert [out["v"] for _, out in fresh.read_all()] == [[0], [1], [5]]
