"""Erasure coding and replication behind one small interface.

`ErasureCodec` wraps pyeclib (backend `isa_l_rs_vand`, systematic Reed-Solomon: the first k
fragments hold the data, so a healthy read is a concatenation). `ReplicaCodec` stores m+1
whole copies; the store uses it for small blocks, where k+m tiny fragments would cost more
in files and fsyncs than they save in space (see docs/architecture.md). Both tolerate the
loss of any m shards.

Pure CPU work; callers run it in worker threads (pyeclib releases the GIL).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Protocol

from pyeclib.ec_iface import ECDriver, ECDriverError

from appliance.errors import BlockUnrecoverableError
from appliance.storage.shard_format import Scheme

# liberasurecode's header at the start of every pyeclib fragment (80 bytes, little-endian):
# index, data bytes in this fragment, backend metadata size, block length, ... at 0; magic at
# 59; CRC-32 of bytes 0..58 at 67. The fragment's data follows the header.
_FRAGMENT_HEADER_SIZE = 80
_FRAGMENT_META = struct.Struct("<IIIQ")
_FRAGMENT_META_SIZE = 59
_FRAGMENT_U32 = struct.Struct("<I")
_FRAGMENT_MAGIC = 0xB0C5ECC
_FRAGMENT_MAGIC_AT = 59
_FRAGMENT_META_CRC_AT = 67


class Codec(Protocol):
    scheme: Scheme
    k: int
    m: int

    @property
    def total(self) -> int: ...

    def encode(self, block: bytes) -> list[bytes]:
        """All `total` shard payloads of `block`, by shard index."""
        ...

    def decode(self, payloads: Mapping[int, bytes | memoryview], block_length: int) -> bytes:
        """The block from any `k` payloads keyed by shard index."""
        ...

    def rebuild(self, payloads: Mapping[int, bytes | memoryview], block_length: int,
                missing: Sequence[int]) -> dict[int, bytes]:
        """The payloads of the `missing` indices from at least `k` healthy ones."""
        ...


class ErasureCodec:
    scheme = Scheme.REED_SOLOMON_ISA_L_VAND
    backend = "isa_l_rs_vand"

    def __init__(self, k: int, m: int) -> None:
        if k < 1 or m < 1 or k + m > 32:
            raise ValueError("erasure coding needs k >= 1, m >= 1 and k + m <= 32")
        self.k = k
        self.m = m
        self._driver = ECDriver(k=k, m=m, ec_type=self.backend)

    @property
    def total(self) -> int:
        return self.k + self.m

    def encode(self, block: bytes) -> list[bytes]:
        return list(self._driver.encode(block))

    def _fragments(self, payloads: Mapping[int, bytes | memoryview]) -> list[bytes]:
        if len(payloads) < self.k:
            raise BlockUnrecoverableError(
                f"only {len(payloads)} healthy shards, {self.k} are needed to decode")
        # Data shards first: with all of 0..k-1 present, decoding is a concatenation.
        ordered = sorted(payloads)[: self.k] if all(i in payloads for i in range(self.k)) \
            else sorted(payloads)
        return [bytes(payloads[i]) for i in ordered]

    def _join_data(self, payloads: Mapping[int, bytes | memoryview],
                   block_length: int) -> bytes | None:
        """The block as the data fragments' bytes joined, in one copy.

        What pyeclib does for a systematic code when every data fragment is present, minus
        its three copies of the block (into its buffers, out, and into bytes), which cost
        more than the rest of a read. Each fragment header is checked as liberasurecode
        checks it (magic, metadata CRC); None if anything looks unexpected, and pyeclib
        decodes instead."""
        parts: list[memoryview] = []
        remaining = block_length
        for index in range(self.k):
            fragment = memoryview(payloads[index])
            if len(fragment) < _FRAGMENT_HEADER_SIZE:
                return None
            fragment_index, size, backend_metadata, length = \
                _FRAGMENT_META.unpack_from(fragment, 0)
            if (_FRAGMENT_U32.unpack_from(fragment, _FRAGMENT_MAGIC_AT)[0] != _FRAGMENT_MAGIC
                    or _FRAGMENT_U32.unpack_from(fragment, _FRAGMENT_META_CRC_AT)[0]
                    != zlib.crc32(fragment[:_FRAGMENT_META_SIZE])
                    or fragment_index != index or backend_metadata != 0
                    or length != block_length
                    or _FRAGMENT_HEADER_SIZE + size > len(fragment)):
                return None
            take = min(size, remaining)
            parts.append(fragment[_FRAGMENT_HEADER_SIZE:_FRAGMENT_HEADER_SIZE + take])
            remaining -= take
        return b"".join(parts) if remaining == 0 else None

    def decode(self, payloads: Mapping[int, bytes | memoryview], block_length: int) -> bytes:
        if all(i in payloads for i in range(self.k)):
            joined = self._join_data(payloads, block_length)
            if joined is not None:
                return joined
        try:
            block = bytes(self._driver.decode(self._fragments(payloads)))
        except ECDriverError as exc:
            # Not only too few fragments: a corrupt fragment (liberasurecode checks its own
            # fragment metadata) raises ECInvalidFragmentMetadata or ECBadFragmentChecksum.
            # The fast read path, which skips shard checksums, must see a Cairn error and
            # fall back to the verified path instead of failing the read.
            raise BlockUnrecoverableError(f"erasure decode failed: {exc}") from exc
        if len(block) != block_length:
            raise BlockUnrecoverableError(
                f"decoded {len(block)} bytes where the header says {block_length}")
        return block

    def rebuild(self, payloads: Mapping[int, bytes | memoryview], block_length: int,
                missing: Sequence[int]) -> dict[int, bytes]:
        fragments = self.encode(self.decode(payloads, block_length))
        return {index: fragments[index] for index in missing}


class ReplicaCodec:
    scheme = Scheme.REPLICA
    k = 1

    def __init__(self, m: int) -> None:
        if m < 1:
            raise ValueError("replication needs m >= 1")
        self.m = m

    @property
    def total(self) -> int:
        return 1 + self.m

    def encode(self, block: bytes) -> list[bytes]:
        return [block] * self.total

    def decode(self, payloads: Mapping[int, bytes | memoryview], block_length: int) -> bytes:
        if not payloads:
            raise BlockUnrecoverableError("no healthy replica left")
        block = bytes(next(iter(payloads.values())))
        if len(block) != block_length:
            raise BlockUnrecoverableError("replica length does not match its header")
        return block

    def rebuild(self, payloads: Mapping[int, bytes | memoryview], block_length: int,
                missing: Sequence[int]) -> dict[int, bytes]:
        block = self.decode(payloads, block_length)
        return {index: block for index in missing}
