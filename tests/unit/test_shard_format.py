"""Properties of the shard format: round trips, and every flipped byte or truncation is
detected."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import ShardFormatError
from appliance.storage.shard_format import (
    HEADER_SIZE,
    Scheme,
    ShardHeader,
    parse_header,
    parse_shard,
    serialize_shard,
)


@st.composite
def shards(draw: st.DrawFn) -> tuple[ShardHeader, bytes]:
    k = draw(st.integers(1, 16))
    m = draw(st.integers(0, 8))
    payload = draw(st.binary(max_size=2048))
    header = ShardHeader(
        scheme=draw(st.sampled_from(list(Scheme))),
        index=draw(st.integers(0, k + m - 1)),
        k=k,
        m=m,
        block_length=draw(st.integers(0, 2**63 - 1)),
        payload_length=len(payload),
        block_id=draw(st.binary(min_size=32, max_size=32)),
    )
    return header, payload


@given(shards())
def test_parse_serialize_round_trip(shard: tuple[ShardHeader, bytes]) -> None:
    header, payload = shard
    raw = serialize_shard(header, payload)
    assert len(raw) == HEADER_SIZE + len(payload)
    parsed, parsed_payload = parse_shard(raw)
    assert parsed == header
    assert bytes(parsed_payload) == payload
    assert parse_header(raw[:HEADER_SIZE])[0] == header


@settings(max_examples=300)
@given(shards(), st.data())
def test_any_flipped_byte_is_detected(shard: tuple[ShardHeader, bytes], data: st.DataObject
                                      ) -> None:
    raw = bytearray(serialize_shard(*shard))
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="xor")
    raw[position] ^= flip
    with pytest.raises(ShardFormatError):
        parse_shard(bytes(raw))


@given(shards(), st.data())
def test_truncation_is_detected(shard: tuple[ShardHeader, bytes], data: st.DataObject) -> None:
    raw = serialize_shard(*shard)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(ShardFormatError):
        parse_shard(raw[:cut])


def test_other_files_are_rejected_with_clear_messages() -> None:
    with pytest.raises(ShardFormatError, match="bad magic"):
        parse_shard(b"X" * 200)
    header = ShardHeader(Scheme.REPLICA, 0, 1, 2, 3, 3, bytes(32))
    raw = bytearray(serialize_shard(header, b"abc"))
    raw[8:10] = (2).to_bytes(2, "big")
    with pytest.raises(ShardFormatError, match="version 2"):
        parse_shard(bytes(raw))


def test_header_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError):
        ShardHeader(Scheme.REPLICA, 3, 1, 2, 0, 0, bytes(32))  # index beyond k+m
    with pytest.raises(ValueError):
        ShardHeader(Scheme.REPLICA, 0, 1, 2, 0, 0, bytes(31))
