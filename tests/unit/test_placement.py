"""Placement: distinct disks, stable, balanced in proportion to weight, minimal movement."""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from appliance.storage.placement import Slot, rank

SLOTS = [Slot(f"disk{i}") for i in range(12)]


@given(st.binary(min_size=32, max_size=32))
def test_ranking_is_a_stable_permutation(block_id: bytes) -> None:
    ranking = rank(SLOTS, block_id)
    assert sorted(ranking) == sorted(s.name for s in SLOTS)
    assert rank(list(reversed(SLOTS)), block_id) == ranking


def test_first_shard_spreads_evenly_over_equal_disks() -> None:
    firsts = Counter(rank(SLOTS, os.urandom(32))[0] for _ in range(24_000))
    assert len(firsts) == 12
    assert max(firsts.values()) < 1.15 * 2000 and min(firsts.values()) > 0.85 * 2000


def test_weights_set_the_share() -> None:
    slots = [Slot("big", 3.0), Slot("small", 1.0)]
    firsts = Counter(rank(slots, os.urandom(32))[0] for _ in range(8000))
    assert 0.70 < firsts["big"] / 8000 < 0.80


def test_adding_a_disk_moves_only_its_share() -> None:
    ids = [os.urandom(32) for _ in range(4000)]
    before = [rank(SLOTS, b)[0] for b in ids]
    after = [rank([*SLOTS, Slot("disk12")], b)[0] for b in ids]
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all(b == "disk12" for _, b in moved)
    assert len(moved) < 4000 / 13 * 1.3
