"""A disk that answers EIO, as a dying drive does: reads fall back to other shards, writes
go to other disks, and repeated errors make the disk `failing` — still read, never written.

Real folders cannot produce EIO on demand, so the disk module's file I/O is wrapped: `open`
and `read_direct` (shard reads), `_write_all` and `write_direct` (shard writes) raise
OSError(EIO) for files under the faulty disk's folder. Everything else — Disk's error
handling and state, the store — is real.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from storage_fixtures import (
    MiB,
    assert_full_redundancy,
    disk_specs,
    format_disks,
    make_block,
    open_store,
    shard_files,
    temp_files,
)

from appliance.storage import disk as disk_module
from appliance.storage.blockstore import BlockStore
from appliance.storage.disk import Disk, DiskState


@dataclass
class Faults:
    """Which disk folder fails, and how; counts what reached it."""

    root: Path | None = None
    reads: bool = False
    writes: bool = False
    opened: int = 0

    def hits(self, path: str | os.PathLike[str]) -> bool:
        return self.root is not None and Path(path).is_relative_to(self.root)


def _eio(path: str | os.PathLike[str]) -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO), str(path))


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    faults = Faults()
    real_open, real_write_all = open, disk_module._write_all

    def faulty_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if faults.hits(file):
            faults.opened += 1
            if faults.reads:
                raise _eio(file)
        return real_open(file, *args, **kwargs)

    def faulty_write_all(fd: int, parts: list[bytes | memoryview]) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if faults.writes and faults.hits(target):
            raise _eio(target)
        real_write_all(fd, parts)

    real_read_direct, real_write_direct = disk_module.read_direct, disk_module.write_direct

    def faulty_read_direct(path: str | os.PathLike[str]) -> bytes | None:
        if faults.hits(path):
            faults.opened += 1
            if faults.reads:
                raise _eio(path)
        return real_read_direct(path)

    def faulty_write_direct(fd: int, parts: list[bytes | memoryview]) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if faults.writes and faults.hits(target):
            raise _eio(target)
        real_write_direct(fd, parts)

    monkeypatch.setattr(disk_module, "open", faulty_open, raising=False)
    monkeypatch.setattr(disk_module, "_write_all", faulty_write_all)
    # Big shards bypass the page cache (direct_io.py): the same faults on that path.
    monkeypatch.setattr(disk_module, "read_direct", faulty_read_direct)
    monkeypatch.setattr(disk_module, "write_direct", faulty_write_direct)
    return faults


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlockStore]:
    specs = disk_specs(tmp_path / "disks")
    format_disks(specs)
    store = open_store(tmp_path, specs)
    yield store
    store.close()


def holder_of(store: BlockStore, block_id: str, index: int) -> Disk:
    shard = next(f for f in shard_files(store, block_id)
                 if f.header is not None and f.header.index == index)
    return next(d for d in store.disks if d.name == shard.disk)


def test_eio_on_reads_falls_back_and_repeated_eio_makes_the_disk_failing(
        store: BlockStore, faults: Faults) -> None:
    assert store.repair_queue is not None
    rng = random.Random(8)
    block_id, data = make_block(rng, 4 * MiB + 1)
    store.put(block_id, data)
    sick = holder_of(store, block_id, 0)  # holds a data shard: the fast path wants it
    faults.root, faults.reads = sick.root, True

    assert store.get(block_id) == data
    assert block_id in store.repair_queue.pending()
    assert sick.recent_errors() == 1 and sick.writable  # one error is noise

    for _ in range(disk_module.FAILING_ERRORS - 1):
        assert store.get(block_id) == data
    assert sick.state is DiskState.FAILING
    assert sick.readable and not sick.writable
    assert "I/O errors" in sick.status(count_shards=False).detail

    # Failing: never written. A new large block gets 5 shards on the 5 other disks.
    faults.reads = False
    other_id, other = make_block(rng, MiB - 3)
    result = store.put(other_id, other)
    assert (result.shards_written, result.shards_total) == (5, 6)
    assert not sick.shard_path(other_id).exists()
    assert other_id in store.repair_queue.pending()

    # ... but still read: its data shard serves the block once it answers again.
    faults.opened = 0
    assert store.get(block_id) == data
    assert faults.opened >= 2  # the header in _locate, then the payload on the fast path


def test_eio_on_writes_moves_the_shard_to_another_disk(
        store: BlockStore, faults: Faults, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.repair_queue is not None
    rng = random.Random(9)
    sick = store.disks[2]
    faults.root, faults.writes = sick.root, True
    written = {}
    for number in range(disk_module.FAILING_ERRORS):
        block_id, data = make_block(rng, 200_000 + number)
        result = store.put(block_id, data)
        assert result.shards_written == 5
        assert block_id in store.repair_queue.pending()
        assert not sick.shard_path(block_id).exists()  # the temp file was removed too
        written[block_id] = data
    assert temp_files(sick.root) == []
    assert sick.state is DiskState.FAILING
    for block_id, data in written.items():
        assert store.get(block_id) == data

    # Once the drive is replaced (here: it stops failing and the error window passes),
    # repair writes the missing shards onto it again.
    faults.writes = False
    monkeypatch.setattr(disk_module, "FAILING_WINDOW", 0.0)
    assert sick.probe() is DiskState.OK
    for block_id in written:
        store.repair(block_id)
    assert_full_redundancy(store, written)
