"""The on-disk shard format, version 1 (spec: docs/shard-format.md).

A shard file is a fixed 96-byte header followed by the payload:

    offset size  field
    0      8     magic               b"CAIRNSHD"
    8      2     format version      1 (uint16, big-endian like every integer here)
    10     1     scheme              0 = replica (payload is the whole block)
                                     1 = Reed-Solomon via pyeclib backend isa_l_rs_vand
                                         (payload is one pyeclib fragment)
    11     1     shard index         0..k+m-1 (erasure) or 0..m (replica number)
    12     1     k                   data shards needed to decode (1 for replicas)
    13     1     m                   parity shards / extra replicas
    14     2     reserved            zero
    16     8     block length        bytes of the original block
    24     8     payload length      bytes that follow the header
    32     32    block id            BLAKE3 digest of the block's bytes
    64     32    checksum            BLAKE3 over header bytes 0..63 followed by the payload

The checksum covers every header field and the payload, so a flipped byte anywhere in the
file, or a truncated file, fails `parse_shard`. A file that was half-written when the machine
died therefore never reads as a valid shard.

Pure functions only: no files, no threads.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import blake3

from appliance.errors import ShardFormatError

MAGIC = b"CAIRNSHD"
FORMAT_VERSION = 1
HEADER_SIZE = 96
_PREFIX = struct.Struct(">8sHBBBBHQQ32s")  # bytes 0..63, everything the checksum precedes
assert _PREFIX.size == 64


class Scheme(enum.IntEnum):
    """How the shards of one block relate to the block."""

    REPLICA = 0
    REED_SOLOMON_ISA_L_VAND = 1


@dataclass(frozen=True)
class ShardHeader:
    scheme: Scheme
    index: int
    k: int
    m: int
    block_length: int
    payload_length: int
    block_id: bytes  # 32 raw bytes

    def __post_init__(self) -> None:
        if len(self.block_id) != 32:
            raise ValueError("block_id must be 32 bytes")
        if not (1 <= self.k <= 255 and 0 <= self.m <= 255):
            raise ValueError("k must be 1..255 and m 0..255")
        if not 0 <= self.index < self.k + self.m:
            raise ValueError(f"shard index {self.index} out of range for k={self.k} m={self.m}")
        if self.block_length < 0 or self.payload_length < 0:
            raise ValueError("lengths must not be negative")


def _prefix(header: ShardHeader) -> bytes:
    return _PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        int(header.scheme),
        header.index,
        header.k,
        header.m,
        0,
        header.block_length,
        header.payload_length,
        header.block_id,
    )


def checksum(prefix: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    hasher = blake3.blake3(prefix)
    hasher.update(payload)
    return hasher.digest()


def serialize_header(header: ShardHeader, payload: bytes | memoryview) -> bytes:
    """The 96 header bytes for `payload`; the shard file is these followed by the payload."""
    if len(payload) != header.payload_length:
        raise ValueError("payload length does not match the header")
    prefix = _prefix(header)
    return prefix + checksum(prefix, payload)


def serialize_shard(header: ShardHeader, payload: bytes) -> bytes:
    return serialize_header(header, payload) + payload


def parse_header(raw: bytes | memoryview) -> tuple[ShardHeader, bytes]:
    """Parse the 96 header bytes without checking the checksum (which needs the payload).

    Returns the header and the stored checksum. Raises ShardFormatError for anything that is
    not a version-1 Cairn shard header.
    """
    if len(raw) < HEADER_SIZE:
        raise ShardFormatError(f"shard is truncated: {len(raw)} header bytes")
    (magic, version, scheme, index, k, m, reserved, block_length, payload_length,
     block_id) = _PREFIX.unpack_from(raw, 0)
    if magic != MAGIC:
        raise ShardFormatError("not a Cairn shard (bad magic)")
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"unsupported shard format version {version}")
    if reserved != 0:
        raise ShardFormatError("reserved header bytes are not zero")
    try:
        header = ShardHeader(Scheme(scheme), index, k, m, block_length, payload_length,
                             bytes(block_id))
    except ValueError as exc:
        raise ShardFormatError(f"invalid shard header: {exc}") from exc
    return header, bytes(raw[64:HEADER_SIZE])


def parse_shard(raw: bytes | memoryview) -> tuple[ShardHeader, memoryview]:
    """Parse and verify a whole shard; returns the header and a view of the payload."""
    view = memoryview(raw)
    header, stored = parse_header(view)
    payload = view[HEADER_SIZE:]
    if len(payload) != header.payload_length:
        raise ShardFormatError(
            f"shard is truncated: {len(payload)} of {header.payload_length} payload bytes")
    if checksum(view[:64], payload) != stored:
        raise ShardFormatError("shard checksum mismatch (corrupt)")
    return header, payload
