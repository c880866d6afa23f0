"""A sink read by the tools users reach for (pandas, pyarrow.dataset, Ray Data, DuckDB, Polars, deltalake)
after chaos: a worker SIGKILLed while staging, the driver SIGKILLed mid-commit and the job run again, a
zombie epoch committing late. Each reader must see every input row exactly once and nothing else, on a
local directory and on a real S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from resilient.io import FileSink, StagedOutput
from resilient.io.delta import delta_options
from tests import procs
from tests.procs.sink_writer import output

ROOT = Path(__file__).resolve().parent.parent
ROWS, BATCHES = 5, 12
EVERY_ID = Counter(range(ROWS * BATCHES))


# -- readers: each returns the ids it read ------------------------------------------------------------


def _pyarrow_fs(bucket: Any) -> Any:
    import pyarrow.fs

    o = bucket.storage_options
    return pyarrow.fs.S3FileSystem(access_key=o["key"], secret_key=o["secret"],
                                   region=o["client_kwargs"]["region_name"],
                                   endpoint_override=o["endpoint_url"].split("://")[1], scheme="http")


def _polars_options(bucket: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in delta_options(bucket.storage_options).items()}


def read_pandas(url: str, fmt: str, bucket: Any) -> list[int]:
    import pandas as pd

    opts = {"storage_options": bucket.storage_options} if bucket else {}
    return pd.read_parquet(url, columns=["id"], **opts)["id"].tolist()


def read_pyarrow(url: str, fmt: str, bucket: Any) -> list[int]:
    import pyarrow.dataset as ds

    path, fs = (url.split("://", 1)[1], _pyarrow_fs(bucket)) if bucket else (url, None)
    return ds.dataset(path, format="json" if fmt == "jsonl" else "parquet", filesystem=fs).to_table(
        columns=["id"]).column("id").to_pylist()


def read_ray(url: str, fmt: str, bucket: Any) -> list[int]:
    import ray

    fs = _pyarrow_fs(bucket) if bucket else None
    path = url.split("://", 1)[1] if bucket else url
    ds = ray.data.read_json(path, filesystem=fs) if fmt == "jsonl" else ray.data.read_parquet(path, filesystem=fs)
    return [r["id"] for r in ds.select_columns(["id"]).take_all()]


def read_duckdb(url: str, fmt: str, bucket: Any) -> list[int]:
    import duckdb

    con = duckdb.connect()
    if bucket:  # DuckDB's own S3 support is an extension it would download: it reads through s3fs instead
        import s3fs

        con.register_filesystem(s3fs.S3FileSystem(**bucket.storage_options, skip_instance_cache=True))
    fn = "read_json_auto" if fmt == "jsonl" else "read_parquet"
    return [r[0] for r in con.sql(f"select id from {fn}('{url}/*.{fmt}')").fetchall()]


def read_polars(url: str, fmt: str, bucket: Any) -> list[int]:
    import polars as pl

    opts = {"storage_options": _polars_options(bucket)} if bucket else {}
    # a glob, not the directory: Polars lists every name under it, `_` ones included, and refuses mixed suffixes
    scan = pl.scan_ndjson if fmt == "jsonl" else pl.scan_parquet
    return scan(f"{url}/*.{fmt}", **opts).select("id").collect()["id"].to_list()


def read_deltalake(url: str, fmt: str, bucket: Any) -> list[int]:
    from deltalake import DeltaTable

    opts = delta_options(bucket.storage_options) if bucket else None
    return DeltaTable(url, storage_options=opts).to_pyarrow_table(columns=["id"]).column("id").to_pylist()


def read_polars_delta(url: str, fmt: str, bucket: Any) -> list[int]:
    import polars as pl

    opts = delta_options(bucket.storage_options) if bucket else None
    return pl.read_delta(url, columns=["id"], storage_options=opts)["id"].to_list()


def read_duckdb_over_deltalake(url: str, fmt: str, bucket: Any) -> list[int]:
    """DuckDB's own delta reader is an extension it downloads: here DuckDB scans deltalake's dataset."""
    import duckdb
    from deltalake import DeltaTable

    table = DeltaTable(url, storage_options=delta_options(bucket.storage_options) if bucket else None)
    dataset = table.to_pyarrow_dataset()  # noqa: F841 - read by name by DuckDB below
    return [r[0] for r in duckdb.connect().sql("select id from dataset").fetchall()]


def read_sink(url: str, fmt: str, bucket: Any) -> list[int]:
    sink = FileSink(url, format=fmt, storage_options=bucket.storage_options if bucket else None)
    return [int(i) for _, out in sink.read_all() for i in out["id"]]


READERS = {
    "parquet": [read_pandas, read_pyarrow, read_ray, read_duckdb, read_polars, read_sink],
    "jsonl": [read_pyarrow, read_ray, read_duckdb, read_polars, read_sink],
    "delta": [read_deltalake, read_polars_delta, read_duckdb_over_deltalake, read_sink],
}


def assert_every_reader_sees_each_row_once(url: str, fmt: str, bucket: Any) -> None:
    for reader in READERS[fmt]:
        got = Counter(int(i) for i in reader(url, fmt, bucket))
        assert got == EVERY_ID, (reader.__name__, sorted((got - EVERY_ID).items()), sorted((EVERY_ID - got).items()))


# -- processes -----------------------------------------------------------------------------------------


def run_writer(url: str, fmt: str, options: dict, batches: list[int], epoch: int, *, kill: str | None = None,
               commit: bool = False) -> tuple[int, list[StagedOutput], str]:
    spec = {"url": url, "format": fmt, "options": options, "rows": ROWS, "batches": batches, "epoch": epoch,
            "kill": kill, "commit": commit}
    done = subprocess.run([sys.executable, "-m", "tests.procs.sink_writer", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stdout.splitlines()
    staged = [StagedOutput(**json.loads(line)) for line in lines if line.startswith("{")]
    return done.returncode, staged, done.stderr[-2000:]


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    if request.param == "local":
        return str(tmp_path / "out"), None
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket.url}/out", bucket


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "delta"])
def test_readers_see_each_row_once_after_chaos(where: tuple[str, Any], fmt: str, ray_session: Any) -> None:
    url, bucket = where
    options = bucket.storage_options if bucket else {}
    sink = FileSink(url, format=fmt, storage_options=options)
    assert sink.commit_group([sink.encode(b, output(b, ROWS, 1), epoch=1) for b in range(3)]) == [True] * 3

    # a worker SIGKILLed halfway through staging batch 3: what it wrote is never visible
    rc, staged, err = run_writer(url, fmt, options, [3], epoch=1, kill="staging")
    assert rc == -signal.SIGKILL and staged == [], err

    # a zombie: epoch 1 staged batches 3 and 4, was fenced; epoch 2 redid them and committed; then the
    # zombie's outputs reach a commit late (a stale answer) and lose, and its staged bytes are discarded
    rc, zombie, err = run_writer(url, fmt, options, [3, 4], epoch=1)
    assert rc == 0 and len(zombie) == 2, err
    assert sink.commit_group([sink.encode(b, output(b, ROWS, 2), epoch=2) for b in (3, 4)]) == [True, True]
    assert sink.commit_group(zombie) == [False, False]

    # the driver SIGKILLed in the middle of committing batches 5..11, then the job run again: the batches
    # it did not commit are staged again and committed, and a retry of the whole group commits nothing twice
    kill = {"delta": "delta:after"}.get(fmt, "publish:3")
    rc, first_run, err = run_writer(url, fmt, options, list(range(5, BATCHES)), epoch=3, kill=kill, commit=True)
    assert rc == -signal.SIGKILL and len(first_run) == BATCHES - 5, err
    rerun = FileSink(url, format=fmt, storage_options=options)
    done = set(rerun.committed_from(5))
    assert len(done) == 3 if fmt != "delta" else done == set(range(5, BATCHES))  # published, or one transaction
    redo = [rerun.encode(b, output(b, ROWS, 4), epoch=4) for b in range(5, BATCHES) if b not in done]
    assert rerun.commit_group(redo) == [True] * len(redo)
    again = [rerun.encode(b, output(b, ROWS, 5), epoch=5) for b in range(BATCHES)]
    assert rerun.commit_group(again) == [False] * BATCHES

    assert list(rerun.committed_from(0)) == list(range(BATCHES))
    epochs = {b: int(out["epoch"][0]) for b, out in rerun.read_all()}
    assert epochs[3] == epochs[4] == 2 and all(epochs[b] == 3 for b in done)
    rerun.mark_complete({"committed": BATCHES})
    assert_every_reader_sees_each_row_once(url, fmt, bucket)

    # staged leftovers (the killed worker's half file or upload, the failed run's stale records) are orphans
    orphans = rerun.orphans()
    if bucket is None or fmt != "delta":
        assert orphans, "the worker killed while staging left nothing to collect"
    rerun.delete(orphans)
    assert rerun.orphans() == []
    assert_every_reader_sees_each_row_once(url, fmt, bucket)



# -- a real job: Ray actors through the pipeline decorator, its driver SIGKILLed and run again ----------


def run_driver(args: list[str], kill_after: int | None) -> tuple[int, list[str]]:
    rc, lines, _, _ = procs.run_driver("tests.procs.sink_driver", args, signal_after=kill_after)
    return rc, lines


@pytest.mark.parametrize("fmt", ["parquet", "delta"])  # jsonl: the sink-level chaos above, every reader
def test_a_job_whose_driver_was_killed_is_read_once_by_every_reader(tmp_path: Path, ray_session: Any,
                                                                    fmt: str) -> None:
    address = ray_session.get_runtime_context().gcs_address
    url = str(tmp_path / "out")
    args = [address, f"readers-{fmt}", url, fmt, str(tmp_path / "ckpt"), str(ROWS * BATCHES * 10)]
    rc, lines = run_driver(args, kill_after=30)
    assert rc == -signal.SIGKILL, lines
    rc, lines = run_driver(args, kill_after=None)
    assert rc == 0, lines
    done = json.loads(lines[-1].split(" ", 1)[1])
    assert done["committed"] == ROWS * BATCHES * 10 // 3
    rows = Counter(range(ROWS * BATCHES * 10))
    for reader in READERS[fmt]:
        got = Counter(int(i) for i in reader(url, fmt, None))
        assert got == rows, (reader.__name__, sorted((got - rows).items())[:5], sorted((rows - got).items())[:5])
    sink = FileSink(url, format=fmt)
    assert sink.is_complete() is not None
    for b, out in sink.read_all():
        assert [int(i) for i in out["y"]] == [i * i for i in range(3 * b, 3 * b + 3)]
