"""Reed-Solomon k+m striping (``rs:K+M``): every subset of at most M lost or corrupt shards is rebuilt, by
the pure coder (property tests over every subset) and by the store (load, verify naming each shard,
repair rebuilding it) on real local directories."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient.config import Settings
from resilient.errors import ConfigError
from resilient.storage import CheckpointStore, layout
from resilient.storage.erasure import RsStriper, rebuild
from resilient.storage.manifest import Manifest
from resilient.storage.parity import assemble

FAST = {"retry_attempts": 1, "retry_backoff_seconds": 0.01, "retry_backoff_max_seconds": 0.02}


def stripe(data: bytes, k: int, m: int, block: int, cuts: list[int]) -> list[bytes]:
    s = RsStriper(k=k, m=m, block=block)
    parts: list[list[bytes]] = [[] for _ in range(k + m)]
    bounds = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    stripes = []
    for a, b in zip(bounds, bounds[1:]):  # fed in arbitrary chunks
        stripes += list(s.feed(data[a:b]))
    stripes += list(s.finish())
    for st_ in stripes:
        for i, blk in enumerate(st_):
            parts[i].append(bytes(blk))
    return [b"".join(p) for p in parts]


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    k=st.integers(2, 5),
    m=st.integers(1, 3),
    block=st.sampled_from([8, 16, 64]),
    cuts=st.lists(st.integers(0, 10_000), max_size=5),
)
def test_every_subset_of_at_most_m_lost_shards_is_rebuilt(data, k, m, block, cuts):
    shards = stripe(data, k, m, block, cuts)
    assert shards[:k] and len({len(s) for s in shards}) == 1
    assert bytes(assemble(shards[:k], block, len(data))) == data  # systematic: data shards are the data
    for size in range(1, m + 1):
        for lost in itertools.combinations(range(k + m), size):
            damaged = [None if i in lost else s for i, s in enumerate(shards)]
            back = rebuild(damaged, k, m, block, lost)
            assert back == {i: shards[i] for i in lost}, (k, m, lost)


def test_rebuild_refuses_more_than_m_losses_and_ragged_shards():
    shards = stripe(bytes(range(200)), 3, 2, 8, [])
    with pytest.raises(ValueError, match="needs 3"):
        rebuild([None, None, None, shards[3], shards[4]], 3, 2, 8, [0])
    with pytest.raises(ValueError, match="common length"):
        rebuild([shards[0], shards[1][:-8], shards[2], None, None], 3, 2, 8, [3])


@pytest.mark.parametrize("value", ["rs:1+2", "rs:4+0", "rs:x+y", "rs:200+100", "raid6"])
def test_rs_setting_is_validated_naming_the_variable(value):
    env = {"RESILIENT_STORAGE": ",".join(f"memory://r{i}" for i in range(6)), "RESILIENT_REDUNDANCY": value}
    with pytest.raises(ConfigError, match=r"RESILIENT_REDUNDANCY=.*rs:K\+M") as e:
        Settings.from_env(env)
    assert e.value.name == "RESILIENT_REDUNDANCY" and e.value.value == value


def test_rs_needs_one_shard_per_storage_url():
    env = {"RESILIENT_STORAGE": "memory://a,memory://b,memory://c,memory://d", "RESILIENT_REDUNDANCY": "rs:4+2"}
    with pytest.raises(ConfigError, match=r"K \+ M = 4"):
        Settings.from_env(env)
    s = Settings.from_env({**env, "RESILIENT_REDUNDANCY": " RS:2+2 "})
    assert s.redundancy == "rs:2+2" and s.quorum == 3


# --- the store ------------------------------------------------------------------------------------


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(300, 200, generator=g), "step": step}


def shard_files(d: Path, key: str, g: int) -> list[Path]:
    gdir = d.joinpath(*layout.gen_dir(key, g).split("/"))
    return sorted(p for p in gdir.iterdir() if p.name != layout.MANIFEST)


@pytest.fixture
def rs_dirs(tmp_dirs) -> list[Path]:
    dirs = tmp_dirs(5)
    with CheckpointStore(storage=[str(d) for d in dirs], redundancy="rs:3+2", **FAST) as store:
        c = store.save("k", state(1))
        assert len(c.acked) == 5
    return dirs


def test_rs_manifest_records_its_geometry_and_every_shard(rs_dirs):
    raw = rs_dirs[0].joinpath(*layout.gen_dir("k", 1).split("/"), layout.MANIFEST).read_bytes()
    m = Manifest.from_bytes(raw, where="x")
    assert (m.mode, m.k, m.m, len(m.pieces)) == ("rs", 3, 2, 5)
    assert sorted(f.name for d in rs_dirs for f in shard_files(d, "k", 1)) == sorted(p.name for p in m.pieces)


@pytest.mark.parametrize("lost", list(itertools.combinations(range(5), 2)))
@pytest.mark.parametrize("how", ["deleted", "corrupt"])
def test_any_two_lost_or_corrupt_shards_of_rs_3_2_load_verify_and_repair(rs_dirs, lost, how):
    dirs = rs_dirs
    damaged = []
    for j in lost:
        (f,) = shard_files(dirs[j], "k", 1)
        damaged.append(f.name)
        if how == "deleted":
            f.unlink()
        else:
            data = bytearray(f.read_bytes())
            data[len(data) // 3] ^= 0x5A
            f.write_bytes(bytes(data))
    with CheckpointStore(storage=[str(d) for d in dirs], redundancy="rs:3+2", **FAST) as store:
        loaded = store.load("k", repair=False)
        assert torch.equal(loaded.state["w"], state(1)["w"])
        report = store.verify()
        assert not report.ok and not report.unrecoverable
        for j, name in zip(lost, damaged):  # verify names each damaged shard on its replica
            assert any(str(dirs[j]) in p.url and p.kind in ("missing", "corrupt") for p in report.problems), (
                report.problems)
        rewritten = store.repair()
        assert sorted(os.path.basename(p) for p in rewritten if not p.endswith(layout.MANIFEST)) == sorted(damaged)
        assert store.verify().ok


def test_three_lost_shards_of_rs_3_2_are_unrecoverable_and_load_falls_back(tmp_dirs):
    dirs = tmp_dirs(5)
    with CheckpointStore(storage=[str(d) for d in dirs], redundancy="rs:3+2", **FAST) as store:
        store.save("k", state(1))
        store.save("k", state(2))
    for j in (0, 2, 4):
        for f in shard_files(dirs[j], "k", 2):
            f.unlink()
    with CheckpointStore(storage=[str(d) for d in dirs], redundancy="rs:3+2", **FAST) as store:
        loaded = store.load("k", repair=False)
        assert loaded.generation == 1 and loaded.skipped == (2,)
        assert ("k", 2) in store.verify().unrecoverable
