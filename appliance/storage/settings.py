"""The block store's settings: plain values, read from config.toml by appliance.config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SMALL_BLOCK_LIMIT = 64 * 1024
DEFAULT_RESERVE_FREE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class DiskSpec:
    """One disk slot. `name` is the stable key used for placement; `path` is where the
    disk's filesystem is (a folder, or a mount point when `require_mount` is true, in which
    case an unmounted, empty mount point counts as missing instead of being written to).
    `weight` scales the disk's share of new shards: give each disk its size in TB when sizes
    differ. It is configuration, not a measurement, so placement never shifts by itself."""

    name: str
    path: Path
    require_mount: bool = False
    weight: float = 1.0


@dataclass(frozen=True)
class StoreSettings:
    appliance_id: str
    disks: tuple[DiskSpec, ...]
    data_shards: int = 4
    parity_shards: int = 2
    small_block_limit: int = DEFAULT_SMALL_BLOCK_LIMIT
    reserve_free_bytes: int = DEFAULT_RESERVE_FREE_BYTES

    def __post_init__(self) -> None:
        if self.data_shards < 1 or self.parity_shards < 1:
            raise ValueError("data_shards and parity_shards must both be at least 1")
        if len(self.disks) < self.data_shards + self.parity_shards:
            raise ValueError(
                f"{self.data_shards}+{self.parity_shards} shards need at least "
                f"{self.data_shards + self.parity_shards} disks, {len(self.disks)} configured")
        names = [d.name for d in self.disks]
        if len(set(names)) != len(names):
            raise ValueError("disk names must be unique")
