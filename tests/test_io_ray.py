"""RayDatasetSource on a real local Ray (2 CPUs): deterministic order, replay, fingerprint."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator

import numpy as np
import pytest

from resilient.io import RayDatasetSource, SourceChangedError, as_source, check_fingerprint

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """The session's Ray (conftest ``ray_session``) where there is one, else a module-scoped one."""
    try:
        request.getfixturevalue("ray_session")
        yield
        return
    except pytest.FixtureLookupError:
        pass
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def make_ds(n: int = 200, *, shift: int = 0, reverse_delay: bool = False):
    """n rows over 10 blocks; with ``reverse_delay`` later blocks finish first, so the rows come out of
    order unless the executor preserves it (it does not by default: checked by hand, 2 runs in 3).

    The map function is defined here so that it travels by value (workers cannot import test modules).
    """

    def fn(batch: dict) -> dict:
        if reverse_delay:
            time.sleep(0.03 * (9 - int(batch["id"][0]) * 10 // n))
        return {"id": batch["id"] + shift, "sq": batch["id"] * batch["id"]}

    return ray.data.range(n, override_num_blocks=10).map_batches(fn, num_cpus=0.5, udf_modifying_row_count=False)


def test_ray_dataset_source_keeps_order(local_ray: None) -> None:
    src = as_source(make_ds(reverse_delay=True), batch_size=16)
    assert isinstance(src, RayDatasetSource)
    full = list(src.read(0))
    assert [i for i, _ in full] == list(range(13))
    assert np.concatenate([b["id"] for _, b in full]).tolist() == list(range(200))  # each row once, in order
    assert all(np.array_equal(b["sq"], b["id"] ** 2) for _, b in full)
    assert [len(b["id"]) for _, b in full] == [16] * 12 + [8]


def test_ray_dataset_source_replays_from_any_start(local_ray: None) -> None:
    src = RayDatasetSource(make_ds(), 16)
    assert len(src) == 13
    full = list(src.read(0))
    for start in (1, 7, 12, 13):
        tail = list(src.read(start))
        assert [i for i, _ in tail] == list(range(start, 13))
        assert all(np.array_equal(a["id"], b["id"]) for (_, a), (_, b) in zip(tail, full[start:]))


def test_ray_dataset_fingerprint(local_ray: None) -> None:
    src = RayDatasetSource(make_ds(), 16)
    fp = src.fingerprint()
    assert json.loads(json.dumps(fp)) == fp
    assert fp["rows"] == 200 and fp["length"] == 13 and "id" in fp["schema"]
    copy = pickle.loads(ray.cloudpickle.dumps(src))  # as Ray ships it to a worker
    assert copy.fingerprint() == fp
    assert RayDatasetSource(make_ds(), 16).fingerprint() == fp
    with pytest.raises(SourceChangedError, match="rows 200 -> 199"):
        check_fingerprint(fp, RayDatasetSource(make_ds(199), 16).fingerprint())
    with pytest.raises(SourceChangedError, match="first"):
        check_fingerprint(fp, RayDatasetSource(make_ds(shift=1), 16).fingerprint())
