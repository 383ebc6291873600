"""Helpers for block store tests against real disk folders: build a store of formatted
folders, make blocks, damage shards, and check redundancy by parsing the shards on disk —
shard files, and small-block replicas read straight from each disk's pack database with the
own SQL — not through the store, so a bug in the store cannot hide a missing shard.

The packs are read with apsw, never the standard library's sqlite3: two copies of SQLite in
one process break each other's POSIX locks, and a closing sqlite3 connection could then
checkpoint and remove the WAL under the store's open writer."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import apsw

from appliance.errors import ShardFormatError
from appliance.storage.blockstore import BlockStore, block_id_of
from appliance.storage.disk import SHARDS_DIR, TMP_SUFFIX, format_disk, shard_relative_path
from appliance.storage.pack import PACK_NAME
from appliance.storage.repair_queue import RepairQueue
from appliance.storage.settings import DiskSpec, StoreSettings
from appliance.storage.shard_format import HEADER_SIZE, ShardHeader, parse_header, parse_shard

APPLIANCE_ID = "test-appliance-0001"
K, M = 4, 2
MiB = 1024 * 1024

# Sizes that exercise both codecs and the awkward edges of Reed-Solomon padding.
LARGE_SIZES = (4 * MiB, 4 * MiB + 1, MiB - 3, 100_003)
SMALL_SIZES = (1024, 2049, 3 * 1024, 4096)


def disk_specs(root: Path, count: int = 6) -> tuple[DiskSpec, ...]:
    return tuple(DiskSpec(f"disk{i}", root / f"disk{i}") for i in range(count))


def format_disks(specs: Iterable[DiskSpec]) -> None:
    for spec in specs:
        format_disk(spec, APPLIANCE_ID)


def store_settings(specs: tuple[DiskSpec, ...]) -> StoreSettings:
    return StoreSettings(APPLIANCE_ID, specs, data_shards=K, parity_shards=M,
                         reserve_free_bytes=0)


def open_store(root: Path, specs: tuple[DiskSpec, ...]) -> BlockStore:
    """A store over `specs` with its repair queue in root/appliance.db (shared by every store
    opened on the same root, as the server and `cairnd scrub` share the real one)."""
    return BlockStore(store_settings(specs), RepairQueue(root / "appliance.db"))


def make_block(rng: random.Random, size: int) -> tuple[str, bytes]:
    data = rng.randbytes(size)
    return block_id_of(data), data


def deterministic_block(seed: int, counter: int) -> bytes:
    """Block number `counter` of the stream `seed`: the kill -9 child and the test both
    derive it, so the test knows every acknowledged block's bytes without being told."""
    rng = random.Random(f"cairn-block-{seed}-{counter}")
    roll = rng.random()
    if roll < 0.55:
        size = rng.randint(1024, 4096)
    elif roll < 0.80:
        size = rng.randint(64 * 1024 + 1, 300_000)
    elif roll < 0.95:
        size = MiB - 3
    else:
        size = 4 * MiB + 1
    return rng.randbytes(size)


def total_shards(store: BlockStore, block_length: int) -> int:
    return store.codec_for_length(block_length).total


@dataclass(frozen=True)
class ShardLocation:
    """Where one shard of a block lives on one disk: its file, or its row in the disk's
    pack (small blocks). Bytes are read and written directly, bypassing the store."""

    disk_root: Path
    block_id: str
    packed: bool

    @property
    def name(self) -> str:
        return self.block_id

    @property
    def file(self) -> Path:
        return self.disk_root / shard_relative_path(self.block_id)

    def _pack(self) -> apsw.Connection:
        connection = apsw.Connection(str(self.disk_root / PACK_NAME),
                                     flags=apsw.SQLITE_OPEN_READWRITE)
        connection.setbusytimeout(10_000)
        return connection

    def read_bytes(self) -> bytes | None:
        if not self.packed:
            try:
                return self.file.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        if not (self.disk_root / PACK_NAME).exists():
            return None
        pack = self._pack()
        try:
            row = pack.execute("SELECT shard FROM shards WHERE block_id = ?",
                               (self.block_id,)).fetchone()
        finally:
            pack.close()
        return bytes(row[0]) if row else None

    def write_bytes(self, data: bytes) -> None:
        if not self.packed:
            self.file.write_bytes(data)
            return
        pack = self._pack()
        try:
            pack.execute("UPDATE shards SET shard = ? WHERE block_id = ?",
                         (data, self.block_id))
        finally:
            pack.close()

    def delete(self) -> None:
        """The shard is gone from this disk (a lost sector, a file someone removed)."""
        if not self.packed:
            self.file.unlink()
            return
        pack = self._pack()
        try:
            pack.execute("DELETE FROM shards WHERE block_id = ?", (self.block_id,))
        finally:
            pack.close()

    def __str__(self) -> str:
        return f"{self.disk_root.name}:{'pack' if self.packed else 'file'}:{self.block_id[:16]}"


@dataclass(frozen=True)
class ShardFile:
    disk: str
    location: ShardLocation
    header: ShardHeader | None   # None: the bytes are not a valid shard
    problem: str = ""


def _disk_roots(where: BlockStore | Sequence[DiskSpec]) -> list[tuple[str, Path]]:
    if isinstance(where, BlockStore):
        return [(disk.name, disk.root) for disk in where.disks]
    return [(spec.name, spec.path) for spec in where]


def shard_files(where: BlockStore | Sequence[DiskSpec], block_id: str) -> list[ShardFile]:
    """Every shard of the block on every disk folder of a store (or of an appliance's
    config: `config.store.disks`), file or packed, fully verified; disk by disk in order,
    a disk's shard file before its packed copy."""
    found = []
    for disk_name, root in _disk_roots(where):
        for packed in (False, True):
            location = ShardLocation(root, block_id, packed)
            raw = location.read_bytes()
            if raw is None:
                continue
            try:
                header, _ = parse_shard(raw)
            except ShardFormatError as exc:
                found.append(ShardFile(disk_name, location, None, exc.message))
                continue
            if header.block_id != bytes.fromhex(block_id):
                found.append(ShardFile(disk_name, location, None, "names another block"))
                continue
            found.append(ShardFile(disk_name, location, header))
    return found


def redundancy_problems(store: BlockStore, blocks: dict[str, bytes]) -> list[str]:
    """Why each block lacks full redundancy (empty when all are whole): every shard index
    0..total-1 must be present in a valid shard file, and no invalid file may remain."""
    problems = []
    for block_id, data in blocks.items():
        total = total_shards(store, len(data))
        files = shard_files(store, block_id)
        invalid = [f"{f.disk}: {f.problem}" for f in files if f.header is None]
        indices = sorted(f.header.index for f in files if f.header is not None)
        lengths = {f.header.block_length for f in files if f.header is not None}
        if invalid or set(indices) != set(range(total)) or lengths != {len(data)}:
            problems.append(f"{block_id[:16]} ({len(data)} B): shard indices {indices} of "
                            f"{total}, lengths {sorted(lengths)}, invalid {invalid}")
    return problems


def assert_full_redundancy(store: BlockStore, blocks: dict[str, bytes]) -> None:
    problems = redundancy_problems(store, blocks)
    assert not problems, "blocks without full redundancy:\n" + "\n".join(problems)


def assert_reads_back(store: BlockStore, blocks: dict[str, bytes]) -> None:
    wrong = [block_id[:16] for block_id, data in blocks.items() if store.get(block_id) != data]
    assert not wrong, f"blocks read back wrong: {wrong}"


def shard_index_paths(store: BlockStore, block_id: str) -> dict[int, ShardLocation]:
    """Shard index -> where it lives, for a block whose shards are all valid."""
    result = {}
    for shard in shard_files(store, block_id):
        assert shard.header is not None, f"{shard.location}: {shard.problem}"
        result[shard.header.index] = shard.location
    return result


def _stored(location: ShardLocation) -> bytearray:
    raw = location.read_bytes()
    assert raw is not None, f"{location} is gone"
    return bytearray(raw)


def flip_byte(location: ShardLocation, offset: int) -> None:
    raw = _stored(location)
    raw[offset] ^= 0x5A
    location.write_bytes(bytes(raw))


def truncate(location: ShardLocation, length: int) -> None:
    location.write_bytes(bytes(_stored(location)[:length]))


def payload_offset(location: ShardLocation, fraction: float) -> int:
    header, _ = parse_header(bytes(_stored(location)[:HEADER_SIZE]))
    return HEADER_SIZE + int(header.payload_length * fraction)


def files_under(root: Path, sub: str) -> list[Path]:
    base = root / sub
    return [p for p in base.rglob("*") if p.is_file()] if base.exists() else []


def shard_dir_files(root: Path) -> list[Path]:
    """Shard files proper (not temp files of writes in progress or interrupted)."""
    return [p for p in files_under(root, SHARDS_DIR) if not p.name.endswith(TMP_SUFFIX)]


def packed_ids(root: Path) -> set[str]:
    """Block ids with a shard in the disk's pack (read with apsw, see the module doc)."""
    if not (root / PACK_NAME).exists():
        return set()
    pack = apsw.Connection(str(root / PACK_NAME), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        return {str(row[0]) for row in pack.execute("SELECT block_id FROM shards")}
    finally:
        pack.close()


def temp_files(root: Path) -> list[Path]:
    """Temp files of shard writes (in the fan-out folders beside their final names)."""
    return [p for p in files_under(root, SHARDS_DIR) if p.name.endswith(TMP_SUFFIX)]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@contextmanager
def mounted(*mount_argv: str, target: Path) -> Iterator[Path]:
    """`mount *mount_argv target`; always unmounted on the way out (lazily, if busy)."""
    _run("mount", *mount_argv, str(target))
    try:
        yield target
    finally:
        result = subprocess.run(["umount", str(target)], capture_output=True, timeout=30)
        if result.returncode != 0:
            _run("umount", "-l", str(target))


def remount(target: Path, options: str) -> None:
    _run("mount", "-o", f"remount,{options}", str(target))
