"""Property tests of the XOR striping: any single lost shard is rebuilt, for any length and geometry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient.storage.parity import Striper, assemble, placement, reconstruct


def stripe(data: bytes, k: int, block: int, cuts: list[int]) -> list[bytes]:
    s = Striper(k=k, block=block)
    parts: list[list[bytes]] = [[] for _ in range(k + 1)]
    bounds = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    stripes = []
    for a, b in zip(bounds, bounds[1:]):  # fed in arbitrary chunks
        stripes += list(s.feed(data[a:b]))
    stripes += list(s.finish())
    for st_ in stripes:
        for i, blk in enumerate(st_):
            parts[i].append(bytes(blk))
    assert s.length == len(data)
    return [b"".join(p) for p in parts]


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=5000),
    k=st.integers(2, 6),
    block=st.sampled_from([8, 16, 64, 256]),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
    lost=st.integers(0, 6),
)
def test_any_single_lost_shard_is_reconstructed(data, k, block, cuts, lost):
    shards = stripe(data, k, block, cuts)
    assert len({len(s) for s in shards}) == 1
    lost %= k + 1
    damaged: list[bytes | None] = list(shards)
    damaged[lost] = None
    assert reconstruct(damaged) == shards[lost]
    rebuilt = list(shards)
    rebuilt[lost] = reconstruct(damaged)
    assert bytes(assemble(rebuilt[:k], block, len(data))) == data


def test_reconstruct_refuses_two_losses_and_ragged_shards():
    with pytest.raises(ValueError):
        reconstruct([None, None, b"\0" * 8])
    with pytest.raises(ValueError):
        reconstruct([None, b"\0" * 8, b"\0" * 16])


@given(g=st.integers(0, 10**6), n=st.integers(3, 9))
def test_placement_is_a_rotation(g, n):
    p = placement(g, n)
    assert sorted(p) == list(range(n)) and p == [(j + g) % n for j in range(n)]
