"""FileSink contract, run against a local directory and a real S3 server (moto on 127.0.0.1): staged
outputs are invisible, a commit publishes create-only and at most once per batch, reads verify, and what
reaches the driver per batch is a few hundred bytes whatever the output's size."""

from __future__ import annotations

import json
import os
import pickle
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

    make.url = url  # type: ignore[attr-defined]

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



@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tensors", "delta"])
def test_stage_commit_read_round_trip(make_sink: Any, fmt: str) -> None:
    sink = make_sink(fmt)
    staged = sink.stage(3, output_for("parquet" if fmt == "delta" else fmt, 3), epoch=2)
    assert isinstance(staged, StagedOutput) and staged.batch_id == 3 and staged.epoch == 2
    assert staged.rows == (None if fmt == "tensors" else 3)
    if fmt == "delta":
        assert staged.name.startswith("part-000000000003-e2-") and staged.name.endswith(".parquet")
    else:
        assert staged.name == f"part-000000000003.{fmt}"
    # staged is invisible
    assert not sink.is_committed(3) and list(sink.committed_from(0)) == []
    with pytest.raises(NotCommittedError) as err:
        sink.read(3)
    assert isinstance(err.value, LookupError) and err.value.batch_id == 3
    assert sink.commit(staged) is True
    assert sink.is_committed(3)
    got = sink.read(3)
    if fmt == "delta":  # N-D columns are lists in Delta tables
        assert got["id"].tolist() == [3, 4, 5] and [list(r) for r in got["emb"]] == [[3, 4], [5, 6], [7, 8]]
    else:
        assert_output(fmt, got, 3)
    # another process (a fresh, unpickled sink) sees the same
    other = pickle.loads(pickle.dumps(sink))
    assert [b for b, _ in other.read_all()] == [3]


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_what_reaches_the_driver_is_small_whatever_the_output(make_sink: Any, fmt: str) -> None:
    """A 1 MiB output (256 rows x 1024 float32) is written by the worker: its record pickles in < 400 bytes."""
    sink = make_sink(fmt)
    emb = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    staged = sink.encode(0, {"emb": emb}, epoch=7)
    assert staged.length > 1 << 20
    assert len(pickle.dumps(staged)) < 400
    assert sink.commit_group([pickle.loads(pickle.dumps(staged))]) == [True]
    got = sink.read(0)["emb"]
    np.testing.assert_array_equal(np.stack(got) if fmt == "delta" else got, emb)


@pytest.mark.parametrize("fmt", ["jsonl", "delta"])
def test_commit_is_at_most_once(make_sink: Any, fmt: str) -> None:
    sink = make_sink(fmt)
    first = sink.stage(5, {"v": [1]}, epoch=0)
    assert sink.commit(first) is True
    name = sink._committed()[5]
    before = bytes(sink._store().read(name))
    zombie = sink.stage(5, {"v": [666]}, epoch=0)
    newer = sink.stage(5, {"v": [2]}, epoch=1)
    assert sink.commit(zombie) is False and sink.commit(newer) is False
    assert sink._committed() == {5: name} and bytes(sink._store().read(name)) == before  # never overwritten
    assert [v.tolist() if hasattr(v, "tolist") else v for v in sink.read(5).values()] == [[1]]
    assert sink.orphans() == []  # the losers' staged bytes are discarded


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
    assert sink.read(9)["who"][0] in range(6) and sink.orphans() == []


class PublishLandsThenFails:
    """Wraps a sink's publisher: the first publish lands, then reports a dropped connection (its answer
    was lost); or, with ``lands=False``, fails before publishing anything."""

    def __init__(self, sink: FileSink, *, lands: bool) -> None:
        self.real = sink._publisher()
        self.lands = lands
        self.calls = 0
        sink._publisher = lambda: self  # type: ignore[method-assign]

    def publish(self, final: str, token: str) -> bool:
        self.calls += 1
        if self.calls == 1:
            if self.lands:
                assert self.real.publish(final, token)
            raise ConnectionResetError(104, "connection reset by peer")
        return self.real.publish(final, token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("lands", [True, False])
def test_retried_publish_whose_first_attempt_landed_is_its_own(make_sink: Any, lands: bool) -> None:
    sink = make_sink("parquet")
    staged = sink.stage(1, {"v": [1]}, epoch=0)
    flaky = PublishLandsThenFails(sink, lands=lands)
    assert sink.commit(staged) is True
    assert flaky.calls == 2
    assert sink.read(1)["v"].tolist() == [1]
    other = sink.stage(1, {"v": [2]}, epoch=1)
    assert sink.commit(other) is False


def test_delta_retried_transaction_is_not_applied_twice(make_sink: Any) -> None:
    """The group's transaction landed but its answer was lost: the retry finds its (app id, version) in the
    log and commits nothing; a resumed run (another app id) leaves out the batches the table holds."""
    from deltalake import DeltaTable

    sink = make_sink("delta")
    group = [sink.encode(b, {"v": [b]}, epoch=0) for b in range(4)]
    real = DeltaTable.create_write_transaction
    calls = []

    def lands_then_fails(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(kwargs["commit_properties"].app_transactions[0].version)
        real(self, *args, **kwargs)
        if len(calls) == 1:
            raise ConnectionResetError(104, "connection reset by peer")

    DeltaTable.create_write_transaction = lands_then_fails  # type: ignore[method-assign]
    try:
        assert sink.commit_group(group) == [True] * 4  # retried inside: the retry finds the transaction
        assert calls == [1]
        calls.clear()
        assert sink.commit_group(group) == [True] * 4  # retried by the driver (the same group)
    finally:
        DeltaTable.create_write_transaction = real  # type: ignore[method-assign]
    assert calls == []  # both retries found version 1 of this committer in the log
    log = sink._delta()
    table = DeltaTable(log.uri, storage_options=log.options or None)
    assert table.version() == 1 and table.transaction_version(log.app_id) == 1
    resumed = make_sink("delta")
    again = [resumed.encode(b, {"v": [-b]}, epoch=1) for b in range(2, 6)]
    assert resumed.commit_group(again) == [False, False, True, True]
    assert [int(out["v"][0]) for _, out in resumed.read_all()] == [0, 1, 2, 3, -4, -5]
    assert resumed.orphans() == []
    assert DeltaTable(log.uri, storage_options=log.options or None).to_pyarrow_table().num_rows == 6


def test_committed_from_is_ascending_from_start(make_sink: Any, monkeypatch: Any) -> None:
    sink = make_sink()
    ids = [40, 3, 17, 0, 99, 18]
    assert sink.commit_group([sink.encode(b, {"b": [b]}, epoch=0) for b in ids]) == [True] * len(ids)
    for start in (0, 1, 17, 18, 19, 99, 100):
        assert list(sink.committed_from(start)) == sorted(b for b in ids if b >= start)
    assert [b for b, _ in sink.read_all(18)] == [18, 40, 99]
    if make_sink.kind == "s3":  # the listing starts at the first name it needs (S3 lists in key order)
        calls = []
        fs = sink._store().fs
        real = fs.call_s3

        def counting(method: str, *args: Any, **kw: Any) -> Any:
            calls.append((method, kw.get("StartAfter")))
            return real(method, *args, **kw)

        monkeypatch.setattr(fs, "call_s3", counting)
        assert list(sink.committed_from(40)) == [40, 99]
        assert calls == [("list_objects_v2", f"{make_sink.url.split('/', 3)[3]}/part-00000000004")]


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_orphans_and_delete(make_sink: Any, fmt: str) -> None:
    sink = make_sink(fmt)
    attempts = [sink.stage(1, {"v": [i]}, epoch=i) for i in range(3)]  # a retried batch: three attempts
    assert sink.commit(attempts[1])
    lone = sink.stage(2, {"v": [2]}, epoch=0)
    assert sink.commit(lone)
    uncommitted = sink.stage(6, {"v": [6]}, epoch=0)  # staged, never committed (a fenced epoch's output)
    orphans = sink.orphans()
    assert len(orphans) == 3  # the two attempts that were never offered to a commit, and batch 6's
    with pytest.raises(ConfigError, match="orphans"):
        sink.delete([sink._committed()[1]])
    with pytest.raises(ConfigError):
        sink.delete(["_staging/../../escape"])
    sink.delete(orphans)
    assert sink.orphans() == []
    assert [int(sink.read(b)["v"][0]) for b in (1, 2)] == [1, 2]
    assert list(sink.committed_from(0)) == [1, 2]
    assert not sink.is_committed(6) and uncommitted.batch_id == 6


def test_corruption_is_detected(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path), format="jsonl", retry=FAST)
    staged = sink.stage(4, {"v": [1, 2, 3]}, epoch=0)
    sink.commit(staged)
    path = tmp_path / staged.name
    data = path.read_bytes()
    path.write_bytes(data.replace(b"2", b"7"))  # same length, other bytes
    with pytest.raises(CorruptionError, match="xxh3"):
        FileSink(str(tmp_path), format="jsonl").read(4)
    path.write_bytes(data[:-2])
    with pytest.raises(CorruptionError, match="length"):
        FileSink(str(tmp_path), format="jsonl").read(4)
    (record,) = (tmp_path / "_commit").iterdir()
    record.write_text("{not json")
    with pytest.raises(CorruptionError, match="group record"):
        FileSink(str(tmp_path), format="jsonl").read(4)


def test_layout_mismatch_and_layout_1_are_refused(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path / "a"))
    sink.commit(sink.stage(1, {"a": [1]}, epoch=0))
    with pytest.raises(ConfigError, match="format"):
        FileSink(str(tmp_path / "a"), format="parquet").is_committed(1)
    assert FileSink.open(str(tmp_path / "a")).format == "jsonl"
    old = tmp_path / "old"  # what resilient 0.1.0 wrote
    (old / "commit" / "000000").mkdir(parents=True)
    (old / "_sink.json").write_text(json.dumps({"format": "parquet", "shard_width": 10000, "version": 1}))
    for call in (lambda s: list(s.read_all()), lambda s: s.commit(s.stage(0, {"a": [1]}, epoch=0))):
        with pytest.raises(ConfigError, match="layout 1") as err:
            call(FileSink(str(old), format="parquet"))
        assert "resilient 0.1.0" in str(err.value) and "new URL" in str(err.value)


def test_bogus_staged_output_is_refused(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path))
    good = sink.stage(1, {"a": [1]}, epoch=3)
    other = sink.stage(2, {"a": [2]}, epoch=3)
    for bad in (
        StagedOutput(2, 3, good.name, good.staged, good.length, good.xxh3, 1),  # names another batch's file
        StagedOutput(1, 3, good.name, "../../etc/passwd", 1, "0", 1),
        StagedOutput(1, 3, "part-000000000001.parquet", good.staged, 1, "0", 1),
        StagedOutput(1, 3, good.name, "_staging/../x", 1, "0", 1),
        StagedOutput(1, 4, good.name, good.staged, good.length, good.xxh3, 1),  # another epoch's staged file
        StagedOutput(1, 3, good.name, other.staged, other.length, other.xxh3, 1),  # batch 2's staged file
    ):
        with pytest.raises(ConfigError):
            sink.commit(bad)
    assert not sink.is_committed(1) and not sink.is_committed(2)
    with pytest.raises(ConfigError, match="at most once"):
        sink.commit_group([good, good])
    assert sink.commit_group([]) == []


def test_local_staging_is_invisible_and_publishing_leaves_one_plain_file(tmp_path: Any) -> None:
    sink = FileSink(str(tmp_path), format="tensors")
    staged = sink.stage(0, {"w": torch.arange(10_000.0)}, epoch=0)
    files = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert files == [staged.staged] and staged.staged.startswith("_staging/") and staged.staged.endswith(".staged")
    assert os.path.getsize(tmp_path / staged.staged) == staged.length
    assert sink.commit(staged)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert [f for f in files if not f.startswith("_")] == [staged.name]
    assert os.stat(tmp_path / staged.name).st_nlink == 1  # the staged name is gone: a copy keeps it whole


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tensors"])
def test_group_commit_round_trip(make_sink: Any, fmt: str) -> None:
    sink = make_sink(fmt)
    ids = [9, 2, 3, 7, 4]  # out of order
    staged = [pickle.loads(pickle.dumps(sink.encode(b, output_for(fmt, b), epoch=1))) for b in ids]
    assert sink.commit_group(staged) == [True] * 5
    assert list(sink.committed_from(0)) == sorted(ids)
    reader = make_sink(fmt)  # another process's view
    for b in ids:
        assert_output(fmt, reader.read(b), b)
    assert [b for b, _ in reader.read_all(4)] == [4, 7, 9]
    if fmt == "jsonl":  # each file is plain jsonl
        lines = reader._store().read("part-000000000009.jsonl").decode().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [9, 10, 11]


def test_group_commit_is_at_most_once_per_batch(make_sink: Any) -> None:
    sink = make_sink()
    first = [sink.encode(b, {"v": [b, 0]}, epoch=0) for b in range(0, 6)]
    again = [sink.encode(b, {"v": [b, 1]}, epoch=1) for b in range(4, 10)]
    assert sink.commit_group(first) == [True] * 6
    assert sink.commit_group(again) == [False, False, True, True, True, True]
    assert sink.commit(sink.stage(5, {"v": [5, 2]}, epoch=2)) is False
    assert [out["v"] for _, out in sink.read_all()] == [[b, 0] for b in range(6)] + [[b, 1] for b in range(6, 10)]


def test_concurrent_group_commits_each_batch_exactly_once(make_sink: Any) -> None:
    """Committers racing with overlapping groups: every batch has exactly one winner, and what a reader
    sees is the winner's output."""
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
    assert sink.orphans() == []


def test_a_copy_of_a_local_sink_reads_the_same(tmp_path: Any) -> None:
    import shutil

    sink = FileSink(str(tmp_path / "a"), format="parquet", retry=FAST)
    sink.commit_group([sink.encode(b, output_for("parquet", b), epoch=0) for b in range(5)])
    sink.mark_complete({"total": 5})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = FileSink(str(tmp_path / "b"), format="parquet")
    assert copy.is_complete() is not None
    assert [b for b, _ in copy.read_all()] == list(range(5))
    np.testing.assert_array_equal(copy.read(4)["emb"], sink.read(4)["emb"])


def test_s3_publish_answered_412_after_its_own_completion_is_its_own(s3_bucket: Any, monkeypatch: Any) -> None:
    """S3 (unlike moto) may answer a retried CompleteMultipartUpload of an upload it completed with 412 or
    NoSuchUpload: the object's ETag (MD5 of the part's MD5, "-1") tells it is ours."""
    sink = FileSink(f"{s3_bucket.url}/out", format="jsonl", storage_options=s3_bucket.storage_options, retry=FAST)
    a = sink.encode(0, {"v": [1]}, epoch=0)
    b = sink.encode(0, {"v": [2]}, epoch=1)
    assert sink.commit(a)
    pub, fs = sink._publisher(), sink._store().fs
    real = fs.call_s3

    class PreconditionFailed(Exception):
        response = {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}

    def answer_412(method: str, *args: Any, **kw: Any) -> Any:
        if method == "complete_multipart_upload":
            raise OSError("precondition failed") from PreconditionFailed()
        return real(method, *args, **kw)

    monkeypatch.setattr(fs, "call_s3", answer_412)
    assert pub.publish(a.name, a.staged) is True
    assert pub.publish(b.name, b.staged) is False


def test_s3_staging_is_an_unfinished_upload_until_the_commit(s3_bucket: Any) -> None:
    """Nothing is listed while staged; an upload that lost is aborted; leftovers are uploads, collected."""
    sink = FileSink(f"{s3_bucket.url}/out", format="parquet", storage_options=s3_bucket.storage_options, retry=FAST)
    fs = sink._store().fs
    a = sink.encode(0, {"v": [1]}, epoch=0)
    b = sink.encode(0, {"v": [2]}, epoch=1)
    left = sink.encode(1, {"v": [3]}, epoch=0)
    assert a.staged.startswith("mpu:") and fs.find(f"{s3_bucket.url}/out") == []
    assert len(sink.orphans()) == 3
    assert sink.commit_group([a]) == [True] and sink.commit_group([b]) == [False]
    assert sink.orphans() == [f"part-000000000001.parquet?uploadId={left.staged.split(':')[1]}"]
    sink.delete(sink.orphans())
    assert sink.orphans() == [] and list(sink.committed_from(0)) == [0]
    assert sink.read(0)["v"].tolist() == [1]



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


def test_docstring_examples_run() -> None:
    import doctest

    import resilient.io
    from resilient.io import _formats, _publish, delta, sinks

    for module in (resilient.io, sinks, delta, _publish, _formats):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_a_sink_that_does_not_exist_yet_has_nothing_committed(make_sink: Any) -> None:
    for fmt in ("parquet", "delta"):
        sink = make_sink(fmt)
        assert list(sink.committed_from(0)) == [] and not sink.is_committed(0) and list(sink.read_all()) == []
        assert sink.orphans() == [] and sink.is_complete() is None


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_settle_later_returns_before_the_fsync_and_settle_waits_for_it(tmp_path: Any, monkeypatch: Any,
                                                                        fmt: str) -> None:
    """A worker's staged file is synced in the background; `settle` returns only once every one is
    durable, and a failed sync is told per batch, its staged file removed (it must not be published)."""
    import resilient.io._publish as publish

    gate, synced, real = threading.Event(), [], publish._sync_and_close

    def slow_sync(fd: int, path: str) -> None:  # the deferred sync, held back; batch 5's fails
        gate.wait(10)
        if "000000000005" in os.path.basename(path):
            synced.append(None)
            os.close(fd)
            os.unlink(path)
            raise OSError(5, "Input/output error")
        real(fd, path)
        synced.append(path)

    monkeypatch.setattr(publish, "_sync_and_close", slow_sync)
    sink = FileSink(str(tmp_path / "out"), format=fmt)
    staged = [sink.encode(b, {"y": [b, b]}, epoch=3, settle_later=True) for b in (4, 5, 6)]
    assert synced == []  # encode returned with every fsync still waiting
    gate.set()
    failed = sink.settle()
    assert list(failed) == [5] and "Input/output error" in failed[5] and len(synced) == 3
    assert not os.path.exists(os.path.join(sink.url, staged[1].staged))
    assert sink.settle() == {}  # nothing left
    ok = [s for s in staged if s.batch_id != 5]
    assert sink.commit_group(ok) == [True, True]
    assert sorted(sink.committed_from(0)) == [4, 6]
