"""Properties of the codecs: any k of the k+m shards decode to the block; fewer than k give a
clear error; rebuilt shards equal the originals."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import BlockUnrecoverableError
from appliance.storage.codec import ErasureCodec, ReplicaCodec

CODECS = {(k, m): ErasureCodec(k, m) for k, m in [(4, 2), (2, 1), (3, 3), (6, 3)]}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(CODECS)), st.binary(min_size=1, max_size=300_000), st.data())
def test_any_k_shards_decode(shape: tuple[int, int], block: bytes, data: st.DataObject) -> None:
    codec = CODECS[shape]
    payloads = codec.encode(block)
    assert len(payloads) == codec.total
    chosen = data.draw(st.sets(st.integers(0, codec.total - 1), min_size=codec.k,
                               max_size=codec.k), label="shards")
    assert codec.decode({i: payloads[i] for i in chosen}, len(block)) == block


def test_every_k_subset_decodes_for_defaults() -> None:
    codec = CODECS[(4, 2)]
    block = bytes(range(256)) * 4099
    payloads = codec.encode(block)
    for subset in itertools.combinations(range(6), 4):
        assert codec.decode({i: payloads[i] for i in subset}, len(block)) == block


@given(st.binary(min_size=1, max_size=50_000), st.integers(0, 3))
def test_fewer_than_k_shards_give_a_clear_error(block: bytes, keep: int) -> None:
    codec = CODECS[(4, 2)]
    payloads = codec.encode(block)
    with pytest.raises(BlockUnrecoverableError, match="4 are needed"):
        codec.decode({i: payloads[i] for i in range(keep)}, len(block))


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=100_000), st.sets(st.integers(0, 5), max_size=2))
def test_rebuild_reproduces_lost_shards(block: bytes, lost: set[int]) -> None:
    codec = CODECS[(4, 2)]
    payloads = codec.encode(block)
    healthy = {i: payloads[i] for i in range(6) if i not in lost}
    rebuilt = codec.rebuild(healthy, len(block), sorted(lost))
    assert rebuilt == {i: payloads[i] for i in lost}


@given(st.binary(max_size=10_000), st.integers(1, 4), st.data())
def test_replicas_any_one_decodes(block: bytes, m: int, data: st.DataObject) -> None:
    codec = ReplicaCodec(m)
    payloads = codec.encode(block)
    assert len(payloads) == m + 1
    index = data.draw(st.integers(0, m))
    assert codec.decode({index: payloads[index]}, len(block)) == block
    with pytest.raises(BlockUnrecoverableError):
        codec.decode({}, len(block))


def test_wrong_length_is_refused() -> None:
    codec = CODECS[(4, 2)]
    payloads = codec.encode(b"x" * 1000)
    with pytest.raises(BlockUnrecoverableError, match="header says"):
        codec.decode(dict(enumerate(payloads)), 999)
