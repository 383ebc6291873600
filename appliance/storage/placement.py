"""Where the shards of a block go: weighted rendezvous (highest random weight) hashing.

Every disk slot gets a score for every block, derived from BLAKE3(slot name, block id) and
scaled by the slot's weight (its capacity), and the slots are ranked by score. Shard i goes
to the i-th writable slot in that ranking, so:

- the shards of one block land on distinct disks;
- with more disks than k+m, blocks spread over all of them in proportion to capacity;
- the ranking depends only on slot names, so it survives restarts, and a replaced disk in
  the same slot receives the same shards back on rebuild;
- adding a disk moves only the blocks that now rank it first (about 1/N of them).

Pure functions only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

_MAX_U64 = float(2**64)


@dataclass(frozen=True)
class Slot:
    name: str
    weight: float = 1.0


def _score(slot: Slot, block_id: bytes) -> float:
    digest = blake3.blake3(slot.name.encode() + b"\x00" + block_id).digest(length=8)
    # Map to (0, 1) strictly, then the standard weighted-rendezvous transform.
    unit = (int.from_bytes(digest, "big") + 0.5) / _MAX_U64
    return -slot.weight / math.log(unit)


def rank(slots: Sequence[Slot], block_id: bytes) -> list[str]:
    """Slot names ordered from most to least preferred for this block."""
    return [s.name for s in sorted(slots, key=lambda s: (-_score(s, block_id), s.name))]
