"""The block store on real folders: round trips, id checks, deletion, repair, and the async
wrapper and background maintenance under trio."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio
from storage_fixtures import disk_specs, format_disks, open_store, shard_files, truncate

from appliance.errors import BlockIdMismatchError, BlockNotFoundError, InvalidBlockIdError
from appliance.storage import disk as disk_module
from appliance.storage.async_store import AsyncBlockStore
from appliance.storage.blockstore import BlockStore, RepairOutcome, block_id_of
from appliance.storage.maintenance import next_scrub_delay, pause_needed, run_maintenance
from appliance.storage.scrub import Scrubber

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _probe_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_module, "PROBE_INTERVAL", 0.0)


def make_store(root: Path, disks: int = 6) -> BlockStore:
    """DISKS formatted folders root/disk0... under a 4+2 store."""
    specs = disk_specs(root, disks)
    format_disks(specs)
    return open_store(root, specs)


@pytest.mark.parametrize("size", [0, 1, 4096, 64 * 1024, 64 * 1024 + 1, 4 * MIB, 4 * MIB + 1])
def test_round_trip_and_shard_count(tmp_path: Path, size: int) -> None:
    store = make_store(tmp_path)
    data = os.urandom(size)
    block_id = block_id_of(data)
    result = store.put(block_id, data)
    assert not result.degraded
    assert store.get(block_id) == data
    assert store.has(block_id)
    small = size <= 64 * 1024
    holders = [d.name for d in store.disks if d.has_shard(block_id)]
    assert len(holders) == (3 if small else 6)  # replicas for small blocks, 4+2 otherwise
    shards = shard_files(store, block_id)
    assert [s.disk for s in shards] == holders and all(s.header for s in shards)
    files = [s for s in shards if not s.location.packed]  # small replicas are packed
    assert len(files) == (0 if small else 6)
    assert len({f.disk for f in files}) == len(files)  # one shard per disk


def test_put_refuses_bytes_that_do_not_match_the_id(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(BlockIdMismatchError):
        store.put(block_id_of(b"one"), b"two")
    with pytest.raises(InvalidBlockIdError):
        store.put("../../etc/passwd", b"x")
    with pytest.raises(InvalidBlockIdError):
        store.get("ABCDEF" + "0" * 58)
    assert not list(tmp_path.glob("disk*/shards/*/*/*"))


def test_put_is_idempotent_and_skips_stored_blocks(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = os.urandom(MIB)
    block_id = block_id_of(data)
    assert not store.put(block_id, data).already_stored
    mtimes = [s.location.file.stat().st_mtime_ns for s in shard_files(store, block_id)]
    assert len(mtimes) == 6
    assert store.put(block_id, data).already_stored
    assert [s.location.file.stat().st_mtime_ns
            for s in shard_files(store, block_id)] == mtimes


def test_unknown_block_is_not_found(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(BlockNotFoundError):
        store.get(block_id_of(b"never stored"))
    assert not store.has(block_id_of(b"never stored"))


def test_more_disks_than_shards_balances_load(tmp_path: Path) -> None:
    store = make_store(tmp_path, disks=9)  # 4+2 over nine disks
    for n in range(300):
        data = n.to_bytes(4, "big") * 20_000  # 80 KB: erasure coded
        store.put(block_id_of(data), data)
    counts = [s.shard_count or 0 for s in store.disk_status()]
    assert sum(counts) == 300 * 6
    assert min(counts) > 0.75 * 200 and max(counts) < 1.25 * 200


def test_delete_survives_a_missing_disk_coming_back(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = os.urandom(MIB)
    block_id = block_id_of(data)
    store.put(block_id, data)
    holder = shard_files(store, block_id)[0].location.disk_root
    parked = tmp_path / "parked"
    holder.rename(parked)  # the disk is offline while the block is deleted
    assert store.delete(block_id) == 5
    parked.rename(holder)
    assert len(shard_files(store, block_id)) == 1
    report = Scrubber(store).run()
    assert report.removed == 1 and report.repaired == 0
    assert shard_files(store, block_id) == []
    store.put(block_id, data)  # putting it again clears the tombstone
    assert Scrubber(store).run().healthy == 1


def test_repair_outcomes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = os.urandom(2 * MIB)
    block_id = block_id_of(data)
    store.put(block_id, data)
    assert store.repair(block_id).outcome is RepairOutcome.HEALTHY
    files = shard_files(store, block_id)
    truncate(files[0].location, 100)
    files[1].location.delete()
    result = store.repair(block_id)
    assert result.outcome is RepairOutcome.REPAIRED and result.shards_written == 2
    assert store.repair(block_id).outcome is RepairOutcome.HEALTHY
    for f in shard_files(store, block_id)[:3]:
        f.location.delete()
    assert store.repair(block_id).outcome is RepairOutcome.UNRECOVERABLE


def test_pacing_and_scheduling_are_pure() -> None:
    assert pause_needed(100 * MIB, 1.0, 50 * MIB) == pytest.approx(1.0)
    assert pause_needed(10 * MIB, 1.0, 50 * MIB) == 0.0
    assert pause_needed(10 * MIB, 0.0, 0) == 0.0  # rate 0 = unlimited
    assert next_scrub_delay(None, 1000.0, 86400) == 600.0
    assert next_scrub_delay(1000.0, 1500.0, 3600) == 3100.0
    assert next_scrub_delay(0.0, 1e9, 3600) == 0.0


async def test_async_store_concurrent_puts_and_gets(tmp_path: Path) -> None:
    store = AsyncBlockStore(make_store(tmp_path))
    blocks = [os.urandom(n * 7919 + 1) for n in range(40)]
    async with trio.open_nursery() as nursery:
        for data in blocks + blocks:  # every block twice, concurrently
            nursery.start_soon(store.put, block_id_of(data), data)
    for data in blocks:
        assert await store.get(block_id_of(data)) == data
    store.close()


async def test_background_maintenance_repairs_queued_blocks(tmp_path: Path) -> None:
    raw = make_store(tmp_path)
    store = AsyncBlockStore(raw)
    data = os.urandom(3 * MIB)
    block_id = block_id_of(data)
    await store.put(block_id, data)
    victim = shard_files(raw, block_id)[2]
    victim.location.write_bytes(b"garbage")
    assert await store.get(block_id) == data   # degraded read queues the block...
    assert raw.repair_queue is not None and block_id in raw.repair_queue.pending()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_maintenance(
                store, rate_bytes_per_s=0, full_scrub_interval_s=86400))
            for _ in range(400):  # ...and maintenance repairs it
                if block_id not in raw.repair_queue.pending():
                    break
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert block_id not in raw.repair_queue.pending()
    assert len(shard_files(raw, block_id)) == 6
    assert Scrubber(raw).run().repaired == 0
    store.close()


def test_scrub_rebuilds_an_empty_replacement_disk(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blocks = [os.urandom(n * 100_003) for n in range(1, 12)]
    for data in blocks:
        store.put(block_id_of(data), data)
    before = {s.name: s.shard_count for s in store.disk_status()}
    shutil.rmtree(tmp_path / "disk2")
    (tmp_path / "disk2").mkdir()  # a new, empty disk in the same slot
    assert store.disk_status()[2].state.value == "blank"
    report = Scrubber(store).run()
    assert report.formatted_disks == ["disk2"]
    assert report.unrecoverable == 0
    assert {s.name: s.shard_count for s in store.disk_status()} == before


def test_small_put_is_acknowledged_only_after_its_pack_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.errors import InsufficientDisksError
    from appliance.storage.pack import ShardPack

    store = make_store(tmp_path)
    small = os.urandom(4096)
    store.put(block_id_of(small), small)
    holders = [d for d in store.disks if d.has_shard(block_id_of(small))]
    assert len(holders) == 3 and all(d.pack.commits >= 1 for d in holders)

    def broken_commit(self: ShardPack, batch: object) -> None:
        raise OSError(5, "Input/output error", str(self.path))

    monkeypatch.setattr(ShardPack, "_commit", broken_commit)
    other = os.urandom(4096)
    with pytest.raises(InsufficientDisksError):  # no commit, no acknowledgement
        store.put(block_id_of(other), other)
    monkeypatch.undo()
    assert not store.has(block_id_of(other))


def test_put_many_shares_commits_and_fails_each_block_alone(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    small = [os.urandom(4096) for _ in range(200)]
    big = os.urandom(MIB)
    stored_before = os.urandom(3000)
    store.put(block_id_of(stored_before), stored_before)
    commits_before = sum(d.pack.commits for d in store.disks)
    blocks = {block_id_of(b): b for b in [*small, big, stored_before]}
    blocks[block_id_of(b"one")] = b"two"  # bytes that are not the block
    results = store.put_many(blocks)

    assert isinstance(results.pop(block_id_of(b"one")), BlockIdMismatchError)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert results[block_id_of(stored_before)].already_stored  # type: ignore[union-attr]
    for block_id, data in blocks.items():
        if block_id != block_id_of(b"one"):
            assert store.get(block_id) == data
            assert len(shard_files(store, block_id)) == (6 if data is big else 3)
    # 200 small puts, 3 replicas each over 6 disks: a handful of group commits, not 600.
    assert sum(d.pack.commits for d in store.disks) - commits_before <= 12
    assert not store.has(block_id_of(b"one"))


def test_small_read_takes_the_general_path_when_a_replica_moved_or_is_missing(
        tmp_path: Path) -> None:
    """The fast path reads one packed replica and the others' headers on the disks the
    block belongs on; a replica missing there sends the read down the general path, which
    still finds the block and queues the repair."""
    store = make_store(tmp_path)
    data = os.urandom(5000)
    block_id = block_id_of(data)
    store.put(block_id, data)
    holders = [d for d in store.ranking(bytes.fromhex(block_id))[:3]]
    assert all(d.pack.size(block_id) is not None for d in holders)
    assert store.get(block_id) == data
    assert store.repair_queue is not None and len(store.repair_queue) == 0
    assert holders[1].pack.remove(block_id)
    assert store.get(block_id) == data
    assert block_id in store.repair_queue.pending(limit=10)
