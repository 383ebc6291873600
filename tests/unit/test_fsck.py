"""appliance.fsck on a real database file (the appliance's migrations) and a real block store
over six formatted temp folders, sharing that database for its repair queue as the
appliance does: each kind of problem is made for real (shards deleted on disk, rows
changed by SQL), then detected, repaired, and a second run finds the home clean."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from meta_helpers import block_ref, journal, mkfile, mkroot, new_id, new_user
from storage_fixtures import K, disk_specs, format_disks, open_store, shard_files

from appliance import fsck_loop
from appliance.fsck import check_refs_batch, run_cheap_checks, run_fsck
from appliance.fsck_report import FsckReport, node_verdict, refs_verdict, store_verdict
from appliance.locks import KeyedLocks
from appliance.meta import tree
from appliance.meta.database import Metadata
from appliance.meta.records import BlockRef, Node, User
from appliance.storage.async_store import AsyncBlockStore
from appliance.storage.blockstore import BlockStore

GRACE = 3600.0
SMALL, LARGE = 3000, 200_000     # a packed replica block; an erasure-coded one (4+2)


@dataclass
class Home:
    meta: Metadata
    store: BlockStore
    user: User
    root: Node
    rng: random.Random

    def data(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def file(self, *blocks: bytes, upload: bool = True) -> tuple[Node, list[BlockRef]]:
        """A file of BLOCKS (each uploaded as the block routes do, unless not UPLOAD)."""
        refs = [block_ref(b) for b in blocks]
        node = self.meta.write_sync(lambda db: mkfile(db, self.user, self.root, *refs))
        if upload:
            for data in blocks:
                self.upload(data)
        return self.node(node.id), refs

    def upload(self, data: bytes) -> None:
        ref = block_ref(data)
        self.store.put(ref.block_id, data)
        self.meta.write_sync(lambda db: tree.mark_block_stored(db, ref.block_id, ref.size,
                                                               journal(db)))

    def node(self, node_id: str) -> Node:
        node = self.meta.read_sync(lambda db: tree.find_node(db, node_id))
        assert node is not None
        return node

    def sql(self, query: str, *params: object) -> list[tuple[object, ...]]:
        return self.meta.write_sync(lambda db: list(db.execute(query, params)))

    def lose_shards(self, block_id: str, count: int | None = None) -> None:
        """Delete COUNT of the block's shards on disk (all of them by default)."""
        shards = shard_files(self.store, block_id)
        for shard in shards[: len(shards) if count is None else count]:
            shard.location.delete()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    specs = disk_specs(tmp_path)
    format_disks(specs)
    store = open_store(tmp_path, specs)
    meta = Metadata(tmp_path / "appliance.db")
    user = meta.write_sync(lambda db: new_user(db, "alice"))
    root = meta.write_sync(lambda db: mkroot(db, user))
    yield Home(meta, store, user, root, random.Random(14))
    meta.close()
    store.close()


def fsck(home: Home, **options: object) -> FsckReport:
    return run_fsck(home.meta, home.store, grace_s=GRACE, **options)  # type: ignore[arg-type]


def kinds(report: FsckReport) -> dict[str, int]:
    return {kind: count for kind, count in report.found.items() if count}


def assert_clean(home: Home) -> FsckReport:
    report = fsck(home)
    errors = {k: n for k, n in kinds(report).items() if k not in
              ("degraded_block", "orphan_block", "unrecorded_block", "deleted_leftover")}
    assert report.clean and not errors, report.summary()
    return report


def changes_of(home: Home, node_id: str) -> list[str]:
    return [str(r[0]) for r in home.sql("SELECT kind FROM changes WHERE node_id = ? "
                                        "ORDER BY cursor", node_id)]


# --- the pure rules ------------------------------------------------------------------------

def test_the_rules_name_each_inconsistency() -> None:
    assert refs_verdict(2, None, 2) == []
    assert refs_verdict(0, 1.0, 0) == []
    assert refs_verdict(1, None, 2) == ["wrong_refs"]
    assert refs_verdict(0, 5.0, 2) == ["wrong_refs", "unreferenced_mark"]
    assert refs_verdict(0, None, 0) == ["unreferenced_mark"]
    assert node_verdict("uploaded", set(), set()) is None
    assert node_verdict("uploading", {"a"}, {"a"}) is None
    assert node_verdict("uploaded", {"a"}, set()) == "uploaded_missing_blocks"
    assert node_verdict("uploading", {"a", "b"}, {"a"}) == "pending_mismatch"
    assert node_verdict("uploading", set(), set()) == "pending_mismatch"
    assert node_verdict("uploaded", set(), {"a"}) == "pending_mismatch"
    assert store_verdict(True, 6, 6) is None
    assert store_verdict(True, 5, 6) == "degraded_block"
    assert store_verdict(False, 0, 6) == "missing_block"
    assert store_verdict(False, 3, 6) == "unrecoverable_block"


# --- a healthy home ------------------------------------------------------------------------

def test_a_healthy_home_is_clean(home: Home) -> None:
    small, large = home.data(SMALL), home.data(LARGE)
    home.file(small, large, small)                      # a block twice in one file
    home.file(large)                                    # the same block in another file
    uploading, _ = home.file(home.data(LARGE), home.data(SMALL), upload=False)
    deleted, _ = home.file(home.data(SMALL))
    home.meta.write_sync(lambda db: tree.delete_node(db, home.user, journal(db), deleted.id,
                                                     deleted.version))
    report = assert_clean(home)
    assert kinds(report) == {}
    assert report.checked == {"nodes": 4, "blocks": 5, "referenced_blocks": 5,
                              "store_blocks": 3}
    assert home.node(uploading.id).status == "uploading"
    assert run_cheap_checks(home.meta, grace_s=GRACE).clean
    verified = fsck(home, verify=True)
    assert verified.clean and kinds(verified) == {}


# --- the store -----------------------------------------------------------------------------

def test_a_lost_block_is_listed_with_its_nodes_and_its_nodes_wait_for_it_again(
        home: Home) -> None:
    lost, kept = home.data(LARGE), home.data(SMALL)
    first, refs = home.file(lost, kept)
    second, _ = home.file(lost)
    home.lose_shards(refs[0].block_id)
    report = fsck(home)
    assert kinds(report) == {"missing_block": 1} and not report.clean
    [finding] = report.findings
    assert finding.subject == refs[0].block_id
    assert set(finding.nodes) == {first.id, second.id}

    repaired = fsck(home, repair=True)
    assert kinds(repaired) == {"missing_block": 1, "uploaded_missing_blocks": 2}
    assert repaired.clean, repaired.summary()
    for node in (first, second):
        assert home.node(node.id).status == "uploading"
        assert changes_of(home, node.id)[-1] == "uploading"   # devices learn of it
    assert home.sql("SELECT node_id FROM pending_blocks WHERE block_id = ? ORDER BY node_id",
                    refs[0].block_id) == sorted([(first.id,), (second.id,)])
    assert_clean(home)

    home.upload(lost)                                     # a device sends it again
    assert home.node(first.id).status == home.node(second.id).status == "uploaded"
    assert kinds(assert_clean(home)) == {}


def test_too_few_shards_is_unrecoverable_and_fewer_than_all_is_degraded(home: Home) -> None:
    broken, degraded, small = home.data(LARGE), home.data(LARGE), home.data(SMALL)
    node, refs = home.file(broken, degraded, small)
    home.lose_shards(refs[0].block_id, count=6 - K + 1)   # K - 1 shards left
    home.lose_shards(refs[1].block_id, count=2)
    home.lose_shards(refs[2].block_id, count=1)           # replicas: 2 of 3 left
    assert home.store.repair_queue is not None
    queued_before = set(home.store.repair_queue.pending())
    report = fsck(home)
    assert kinds(report) == {"unrecoverable_block": 1, "degraded_block": 2}
    assert report.repaired["degraded_block"] == 2         # queued for repair, not errors
    assert {refs[1].block_id, refs[2].block_id} <= \
        set(home.store.repair_queue.pending()) - queued_before
    unrecoverable = [f for f in report.findings if f.kind == "unrecoverable_block"]
    assert unrecoverable[0].nodes == (node.id,) and "3 of 6 shards" in unrecoverable[0].detail

    repaired = fsck(home, repair=True)
    assert repaired.clean and repaired.repaired["unrecoverable_block"] == 1
    assert home.node(node.id).status == "uploading"


def test_verify_reads_every_block_and_finds_what_headers_hide(home: Home) -> None:
    data = home.data(SMALL)
    _, refs = home.file(data)
    for shard in shard_files(home.store, refs[0].block_id):   # every replica's body rots
        raw = bytearray(shard.location.read_bytes() or b"")
        raw[-1] ^= 0xFF
        shard.location.write_bytes(bytes(raw))
    assert kinds(fsck(home)) == {}                        # the headers are intact
    verified = fsck(home, verify=True)
    assert kinds(verified) == {"unrecoverable_block": 1}


def test_a_missing_disk_keeps_repair_from_calling_blocks_lost(home: Home,
                                                                tmp_path: Path) -> None:
    node, refs = home.file(home.data(LARGE))
    home.lose_shards(refs[0].block_id, count=2)            # 4 left ...
    away = next(d for d in home.store.disks if d.has_shard(refs[0].block_id))
    away.root.rename(tmp_path / "unplugged")               # ... 3 readable
    away.probe()
    report = fsck(home, repair=True)
    assert kinds(report) == {"unrecoverable_block": 1} and not report.clean
    assert report.repaired["unrecoverable_block"] == 0
    assert any(away.name in note for note in report.notes)
    assert home.node(node.id).status == "uploaded"
    (tmp_path / "unplugged").rename(away.root)
    away.probe()
    assert fsck(home).clean


def test_a_block_in_the_store_but_not_recorded_is_recorded_after_a_full_read(
        home: Home) -> None:
    node, _ = home.file(home.data(LARGE), upload=False)      # uploading, block pending
    data = home.data(LARGE)
    other, other_refs = home.file(data, upload=False)
    home.store.put(other_refs[0].block_id, data)           # a crash before the commit
    report = fsck(home)
    assert kinds(report) == {"unrecorded_block": 1} and report.clean
    assert home.node(other.id).status == "uploading"
    repaired = fsck(home, repair=True)
    assert repaired.repaired["unrecorded_block"] == 1
    assert home.node(other.id).status == "uploaded"
    assert changes_of(home, other.id)[-1] == "uploaded"
    assert home.node(node.id).status == "uploading"        # its block is nowhere


# --- reference counts ----------------------------------------------------------------------

def test_wrong_counts_and_marks_are_corrected(home: Home) -> None:
    shared, alone, dropped = home.data(SMALL), home.data(SMALL), home.data(SMALL)
    home.file(shared, shared)
    home.file(shared, alone)
    gone, _ = home.file(dropped)
    home.meta.write_sync(lambda db: tree.delete_node(db, home.user, journal(db), gone.id,
                                                     gone.version))
    a, b, c = (block_ref(x).block_id for x in (shared, alone, dropped))
    home.sql("UPDATE blocks SET refs = 7 WHERE block_id = ?", a)
    home.sql("UPDATE blocks SET refs = 0, unreferenced_since = 1.0 WHERE block_id = ?", b)
    home.sql("UPDATE blocks SET unreferenced_since = NULL WHERE block_id = ?", c)
    report = fsck(home)
    assert kinds(report) == {"wrong_refs": 2, "unreferenced_mark": 2}
    assert kinds(run_cheap_checks(home.meta, grace_s=GRACE)) == kinds(report)
    repaired = fsck(home, repair=True)
    assert repaired.clean and repaired.repaired == repaired.found
    rows = dict((r[0], (r[1], r[2])) for r in home.sql(
        "SELECT block_id, refs, unreferenced_since IS NULL FROM blocks"))
    assert rows[a] == (3, 1) and rows[b] == (1, 1) and rows[c] == (0, 0)
    assert kinds(assert_clean(home)) == {}


def test_a_referenced_block_without_a_row_gets_one_and_is_recorded_if_stored(
        home: Home) -> None:
    node, refs = home.file(home.data(SMALL), home.data(LARGE))
    home.sql("DELETE FROM blocks WHERE block_id = ?", refs[1].block_id)
    report = fsck(home)
    assert kinds(report) == {"block_row_missing": 1, "unrecorded_block": 1,
                             "uploaded_missing_blocks": 1}
    repaired = fsck(home, repair=True)
    assert repaired.clean, repaired.summary()
    assert kinds(repaired) == {"block_row_missing": 1, "unrecorded_block": 1}
    assert home.sql("SELECT stored, refs FROM blocks WHERE block_id = ?",
                    refs[1].block_id) == [(1, 1)]
    assert home.node(node.id).status == "uploaded"
    assert kinds(assert_clean(home)) == {}


def test_the_refs_merge_covers_every_id_once_in_small_batches(home: Home) -> None:
    """check_refs_batch walks `blocks` and node_blocks together; ids only one side has,
    at batch edges, must be covered exactly once."""
    datas = [home.data(100 + i) for i in range(23)]
    for i in range(0, 23, 3):
        home.file(*datas[i:i + 3], upload=False)
    ids = sorted(block_ref(d).block_id for d in datas)
    removed = ids[::4]
    for block_id in removed:
        home.sql("DELETE FROM blocks WHERE block_id = ?", block_id)
    home.sql("INSERT INTO blocks(block_id, size, refs, unreferenced_since) VALUES (?, 1, 0, 1.0)",
             "f" * 64)                                     # a row nothing references
    report = FsckReport()
    after: str | None = ""
    rounds = 0
    while after is not None and rounds < 100:
        after = home.meta.read_sync(partial(check_refs_batch, report=report, after=after,
                                            cutoff=0.0, now=time.time(), fix=False, limit=3))
        rounds += 1
    assert after is None
    assert report.checked["blocks"] == 23 - len(removed) + 1
    assert sorted(f.subject for f in report.findings) == removed
    assert kinds(report) == {"block_row_missing": len(removed)}


# --- node status and pending rows ----------------------------------------------------------

def test_nodes_whose_status_or_pending_rows_are_wrong_are_made_consistent(
        home: Home) -> None:
    missing = home.data(SMALL)
    claims, _ = home.file(missing, upload=False)           # says uploaded, lacks a block
    home.sql("UPDATE nodes SET status = 'uploaded' WHERE id = ?", claims.id)
    home.sql("DELETE FROM pending_blocks WHERE node_id = ?", claims.id)
    lacks_a_row, lacking = home.file(home.data(SMALL), home.data(SMALL), upload=False)
    home.sql("DELETE FROM pending_blocks WHERE node_id = ? AND block_id = ?", lacks_a_row.id,
             lacking[0].block_id)
    stuck, _ = home.file(home.data(SMALL))                 # has all, says uploading
    home.sql("UPDATE nodes SET status = 'uploading' WHERE id = ?", stuck.id)
    stray, _ = home.file(home.data(SMALL))
    home.sql("INSERT INTO pending_blocks(node_id, block_id) VALUES (?, ?)", stray.id,
             "e" * 64)
    report = fsck(home)
    assert kinds(report) == {"uploaded_missing_blocks": 1, "pending_mismatch": 3}
    assert kinds(run_cheap_checks(home.meta, grace_s=GRACE)) == kinds(report)
    assert fsck(home, repair=True).clean
    assert home.node(claims.id).status == "uploading"
    assert home.sql("SELECT block_id FROM pending_blocks WHERE node_id = ?", claims.id) == \
        [(block_ref(missing).block_id,)]
    assert len(home.sql("SELECT 1 FROM pending_blocks WHERE node_id = ?", lacks_a_row.id)) == 2
    assert home.node(stuck.id).status == "uploaded"
    assert changes_of(home, stuck.id)[-1] == "uploaded"
    assert home.sql("SELECT 1 FROM pending_blocks WHERE node_id = ?", stray.id) == []
    assert kinds(assert_clean(home)) == {}
    home.upload(missing)                                   # the device re-sends it
    assert home.node(claims.id).status == "uploaded"


# --- dangling rows -------------------------------------------------------------------------

def test_rows_of_nodes_that_are_gone_are_deleted_and_a_detached_node_is_reported(
        home: Home) -> None:
    node, refs = home.file(home.data(SMALL))
    ghost = new_id()
    home.sql("INSERT INTO node_blocks(node_id, position, block_id, size) VALUES (?, 0, ?, ?)",
             ghost, refs[0].block_id, refs[0].size)
    bob = home.meta.write_sync(lambda db: new_user(db, "bob"))
    home.sql("INSERT INTO grants(user_id, node_id, wrapped_key, granted_at) "
             "VALUES (?, ?, x'00', 1.0)", bob.id, ghost)
    deleted, _ = home.file(home.data(SMALL), upload=False)
    home.meta.write_sync(lambda db: tree.delete_node(db, home.user, journal(db), deleted.id,
                                                     deleted.version))
    home.sql("INSERT INTO pending_blocks(node_id, block_id) VALUES (?, ?)", deleted.id,
             "d" * 64)
    orphaned, _ = home.file(home.data(SMALL))
    home.sql("UPDATE nodes SET parent_id = ? WHERE id = ?", new_id(), orphaned.id)
    report = fsck(home)
    assert kinds(report) == {"dangling_node_blocks": 1, "dangling_grants": 1,
                             "stray_pending": 1, "detached_node": 1}
    repaired = fsck(home, repair=True)
    assert repaired.remaining("detached_node") == 1 and repaired.errors_remaining == 1
    assert home.sql("SELECT 1 FROM node_blocks WHERE node_id = ?", ghost) == []
    assert home.sql("SELECT 1 FROM grants WHERE node_id = ?", ghost) == []
    assert home.sql("SELECT 1 FROM pending_blocks WHERE node_id = ?", deleted.id) == []
    assert kinds(fsck(home)) == {"detached_node": 1}
    assert home.node(node.id).status == "uploaded"


# --- orphans -------------------------------------------------------------------------------

def test_orphans_are_listed_and_collected_only_after_the_grace_period(home: Home) -> None:
    home.file(home.data(SMALL))
    orphans = [home.data(SMALL), home.data(LARGE)]
    ids = sorted(block_ref(d).block_id for d in orphans)
    for data in orphans:
        home.store.put(block_ref(data).block_id, data)     # stored, never committed
    now = time.time()
    report = run_fsck(home.meta, home.store, grace_s=GRACE, repair=True, now=now)
    assert kinds(report) == {"orphan_block": 2} and report.clean
    assert report.repaired["orphan_block"] == 0            # first seen just now
    assert all(home.store.has(block_id) for block_id in ids)
    assert [r[0] for r in home.sql("SELECT block_id FROM fsck_orphans ORDER BY block_id")] \
        == ids

    early = run_fsck(home.meta, home.store, grace_s=GRACE, repair=True,
                     now=now + GRACE / 2)
    assert early.repaired["orphan_block"] == 0 and all(map(home.store.has, ids))
    late = run_fsck(home.meta, home.store, grace_s=GRACE, repair=True, now=now + GRACE + 1)
    assert late.repaired["orphan_block"] == 2
    assert not any(map(home.store.has, ids))
    assert home.store.repair_queue is not None
    assert all(map(home.store.repair_queue.is_tombstoned, ids))
    assert home.sql("SELECT count(*) FROM fsck_orphans") == [(0,)]
    assert kinds(assert_clean(home)) == {}


def test_an_orphan_that_a_device_sends_again_is_kept_and_forgotten(home: Home) -> None:
    data = home.data(LARGE)
    block_id = block_ref(data).block_id
    home.store.put(block_id, data)
    now = time.time()
    assert kinds(run_fsck(home.meta, home.store, grace_s=GRACE, now=now)) == \
        {"orphan_block": 1}
    node, _ = home.file(data, upload=False)                # the device's node comes back
    home.upload(data)                                       # and its block with it
    report = run_fsck(home.meta, home.store, grace_s=GRACE, repair=True,
                      now=now + GRACE + 1)
    assert kinds(report) == {} and home.store.has(block_id)
    assert home.node(node.id).status == "uploaded"
    assert home.sql("SELECT count(*) FROM fsck_orphans") == [(0,)]


def test_shards_of_a_deleted_block_are_left_to_scrub(home: Home) -> None:
    data = home.data(SMALL)
    block_id = block_ref(data).block_id
    home.store.put(block_id, data)
    assert home.store.repair_queue is not None
    home.store.repair_queue.add_tombstone(block_id)        # GC deleted it; a disk was away
    report = fsck(home, repair=True)
    assert kinds(report) == {"deleted_leftover": 1} and report.clean
    assert home.store.has(block_id)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll CONDITION (state of other threads: nothing to wait on) every 10 ms, 30 s."""
    for _ in range(3000):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("not so within 30 s")


# --- inside the server ---------------------------------------------------------------------

async def test_in_the_server_store_actions_wait_for_the_block_lock(home: Home) -> None:
    data = home.data(LARGE)
    block_id = block_ref(data).block_id
    home.store.put(block_id, data)
    fsck(home)                                              # first seen now
    await trio.sleep(0.05)
    locks = KeyedLocks()
    store = AsyncBlockStore(home.store)
    reports: list[FsckReport] = []

    async def repair() -> None:
        reports.append(await fsck_loop.run_fsck_in_server(
            home.meta, store, locks, grace_s=0.01, repair=True))

    async with trio.open_nursery() as nursery, locks.hold(block_id):  # an upload holds it
        nursery.start_soon(repair)
        await wait_until(lambda: _waiting(locks, block_id) or bool(reports))
        await trio.sleep(0.2)
        assert not reports and home.store.has(block_id), "it did not wait for the lock"
    assert reports[0].repaired["orphan_block"] == 1
    assert not home.store.has(block_id)


def _waiting(locks: KeyedLocks, block_id: str) -> bool:
    """Whether someone besides us waits for BLOCK_ID's lock."""
    entry = locks._locks.get(block_id)
    return entry is not None and entry[1] > 1


def logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "appliance.fsck_loop"]


async def test_the_loop_logs_what_the_database_checks_find(
        home: Home, caplog: pytest.LogCaptureFixture) -> None:
    _, refs = home.file(home.data(SMALL))
    home.sql("UPDATE blocks SET refs = 3 WHERE block_id = ?", refs[0].block_id)
    caplog.set_level(logging.INFO, logger="appliance.fsck_loop")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(fsck_loop.run_fsck_loop, home.meta,
                                   AsyncBlockStore(home.store), 3600, grace_s=GRACE,
                                   first_delay_s=0))
        await wait_until(lambda: bool(logged(caplog)))
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    [record] = logged(caplog)
    assert record.levelno == logging.WARNING
    assert "wrong_refs: 1" in record.getMessage() and refs[0].block_id in record.getMessage()
    assert home.sql("SELECT refs FROM blocks WHERE block_id = ?", refs[0].block_id) == [(3,)]


def test_the_report_is_json_ready_and_caps_its_lists(home: Home) -> None:
    for _ in range(3):
        home.file(home.data(SMALL))
    home.sql("UPDATE blocks SET refs = 9")
    report = fsck(home)
    body = report.to_json()
    assert body["clean"] is False and body["errors_remaining"] == 3
    assert body["problems"]["wrong_refs"] == {"severity": "error", "check": "refs",
                                              "found": 3, "repaired": 0}
    assert len(body["findings"]) == 3 and body["checked"]["blocks"] == 3
    assert "3 problems remain" in report.summary()

