"""The erasure codec's own join of the data shards (the healthy-read fast path) returns what
pyeclib's decode returns, and hands anything unusual back to pyeclib."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import BlockUnrecoverableError
from appliance.storage import allocator
from appliance.storage.codec import ErasureCodec

CODECS = {(k, m): ErasureCodec(k, m) for k, m in [(4, 2), (2, 1), (1, 1), (6, 3)]}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(CODECS)), st.binary(min_size=1, max_size=300_000))
def test_join_of_data_shards_equals_pyeclib_decode(shape: tuple[int, int],
                                                   block: bytes) -> None:
    codec = CODECS[shape]
    payloads = codec.encode(block)
    data = {i: memoryview(payloads[i]) for i in range(codec.k)}
    assert codec._join_data(data, len(block)) == block
    assert bytes(codec._driver.decode(payloads[: codec.k])) == block


@pytest.mark.parametrize("offset", [0, 4, 8, 12, 20, 40, 58, 59, 62, 67, 70])
def test_join_refuses_a_damaged_fragment_header(offset: int) -> None:
    codec = CODECS[(4, 2)]
    block = bytes(range(256)) * 1000
    payloads = codec.encode(block)
    damaged = bytearray(payloads[2])
    damaged[offset] ^= 0x01
    data: dict[int, bytes] = {0: payloads[0], 1: payloads[1], 2: bytes(damaged),
                              3: payloads[3]}
    assert codec._join_data(data, len(block)) is None
    with pytest.raises(BlockUnrecoverableError):  # and pyeclib refuses it too
        codec.decode(data, len(block))


def test_join_refuses_a_wrong_block_length_and_a_short_fragment() -> None:
    codec = CODECS[(4, 2)]
    block = bytes(200_000)
    payloads = codec.encode(block)
    data = {i: payloads[i] for i in range(4)}
    assert codec._join_data(data, len(block) + 1) is None
    assert codec._join_data({**data, 3: payloads[3][:-1]}, len(block)) is None
    assert codec._join_data({**data, 1: payloads[1][:50]}, len(block)) is None


def test_allocator_tuning_runs_once_and_keeps_its_answer() -> None:
    assert allocator.tune() is allocator.tune()
