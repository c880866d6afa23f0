"""Shared fixtures: a real S3 server on 127.0.0.1, local directories, a directory that fills up.

Markers (``slow``) are registered in pyproject.toml.
"""

from __future__ import annotations

import itertools
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from resilient.testing import NoSpaceDirectory, NoSpaceUnavailable, S3Server


class S3Bucket(NamedTuple):
    """A fresh bucket on the test server: ``url`` is ``s3://<name>``; options are for fsspec/s3fs."""

    url: str
    storage_options: dict[str, Any]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session. Do not kill it: use ``s3_server_private`` for that."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_server_private() -> Iterator[S3Server]:
    """A moto S3 server of the test's own, free to kill or restart; stopped after the test."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A new bucket with a unique name on the session server."""
    if not s3_server.running:
        warnings.warn("a test stopped the shared S3 server; restarting it (its data is lost)", stacklevel=1)
        s3_server.start()
    url = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    return S3Bucket(url, s3_server.storage_options)


@pytest.fixture
def tmp_dirs(tmp_path: Path) -> Callable[[int], list[Path]]:
    """Factory: ``tmp_dirs(n)`` returns ``n`` new, empty local directories (new ones on each call)."""
    counter = itertools.count()

    def make(n: int) -> list[Path]:
        dirs = [tmp_path / f"dir{next(counter)}" for _ in range(n)]
        for d in dirs:
            d.mkdir()
        return dirs

    return make


@pytest.fixture
def no_space_dir() -> Iterator[NoSpaceDirectory]:
    """A mounted 1 MiB tmpfs (``.path``, ``.size``); skips the test where tmpfs cannot be mounted."""
    directory = NoSpaceDirectory(1 << 20)
    try:
        directory.__enter__()
    except NoSpaceUnavailable as e:
        pytest.skip(f"no size-limited tmpfs here: {e}")
    try:
        yield directory
    finally:
        directory.__exit__(None, None, None)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray instance for every Ray test of the session (start-up costs seconds here).

    Death info arrives at once (no 1 s wait), and workers import test modules through PYTHONPATH. A new
    instance of the session's own (``address="local"``), never a cluster already running on the machine.
    """
    import os

    import ray

    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"timeout_ms_task_wait_for_death_info": 0},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
