"""`cairnd fsck`: the metadata database checked against the block store, and repaired.

Theory of operation
-------------------
The database says what the store should hold and which nodes are complete; the store holds
what it holds. fsck walks both in id order, a batch (BATCH ids) at a time — never a set of
every id — and reports where they disagree. The checks, in the order a run makes them:

dangling  node_blocks rows and grants of nodes that no longer exist; pending rows of deleted
          or missing nodes; live nodes whose folder is deleted or missing.
refs      `blocks.refs` is the number of node_blocks positions in live nodes (a block twice
          in one file counts twice; deleted nodes not at all: appliance.meta.tree), and
          `unreferenced_since` is set exactly when that number is 0 (else GC never collects
          the block, or reads a stale date); a block nodes reference has a row at all.
store     every block a live node references — or a deleted one that `restore` can still
          bring back (inside the grace period) — that the database records as stored is in
          the store. By default `BlockStore.has`: every disk's shard header read, enough
          shards to decode (plus a count of the disks holding one); with `verify`, a full
          read instead (decoded and checked against its id: every referenced byte is read
          once, which is what scrub does per shard, so it is offered, not the default).
          Fewer shards than written: queued for repair, a notice. Too few to decode: an
          error, listed with the nodes that need the block. A block not yet recorded as
          stored that the store holds (a crash between the store's write and the commit)
          is a notice; repair records it after a full read.
nodes     a live node is `uploaded` exactly when each of its blocks is stored, and an
          `uploading` one has a pending_blocks row for each block it lacks and no other —
          what the API serves upload URLs from and completes the node by.
orphans   block ids in the store the database does not know: no `blocks` row, no node
          naming it (a crash between a batch's store writes and its commit; a database
          recovered from an older copy). Their
          devices send them again, so they are never deleted early: each run records when
          it first saw each one (table fsck_orphans), and a repair run deletes those first
          seen longer ago than the grace period. Rows of `blocks` with refs 0 are garbage
          collection's, not orphans. Shards of tombstoned (deleted) blocks are scrub's.

Errors make a report unclean; notices (degraded, unrecorded, orphan blocks, deleted
leftovers) are the normal traces of crashes and failed disks, which the system resolves.

Memory: each check holds one batch of ids (and, for nodes, their block lists) at a time;
the store is listed by BlockStore.iter_block_ids, streamed, and looked up in the database
a batch at a time. Without repair a run changes nothing but its orphan bookkeeping and the
repair queue. Beside a server that does not lend its locks (a plain `cairnd fsck` while it
serves), a block that looks lost is looked at again — the database, then the store — so
that a block GC deleted meanwhile is not reported.

Repair (`repair=True`) re-checks each batch inside one write transaction and fixes it
there, so a server writing beside it never sees, nor makes us see, half a fix. Store
actions (record a block found in the store, mark a lost one not stored, delete an orphan)
run under GUARD, which inside the server holds the per-block lock the block routes and GC
hold (appliance.fsck_loop.TrioBlockGuard), and re-check the block under it. A lost block
is only marked lost while every disk is readable: a missing disk makes blocks look lost.

Run it through `run_fsck` (everything) or `run_cheap_checks` (dangling, refs, nodes: the
database alone, which the background maintenance runs on a schedule).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import apsw

from appliance.config import ApplianceConfig
from appliance.errors import CairnApplianceError, DiskError
from appliance.fsck_report import (
    Finding,
    FsckProgress,
    FsckReport,
    node_verdict,
    refs_verdict,
    store_verdict,
)
from appliance.meta import tree
from appliance.meta.database import Metadata
from appliance.meta.journal import Journal
from appliance.storage.blockstore import BlockStore

T = TypeVar("T")
BATCH = 500
MAX_NODES_LISTED = 10    # nodes listed per lost block
_ABOVE_ALL_IDS = "~"     # sorts after every lowercase hex id


class BlockGuard(Protocol):
    """Runs WORK while holding BLOCK_ID's lock (inside the server: the one uploads and GC
    hold; see appliance.fsck_loop.TrioBlockGuard)."""

    def __call__(self, block_id: str, work: Callable[[], T]) -> T: ...


def unguarded(block_id: str, work: Callable[[], T]) -> T:
    """The guard of a process that owns the home alone (the CLI holds the owner lock)."""
    return work()


Progress = Callable[[FsckProgress], None]


# --- dangling rows -------------------------------------------------------------------------

_DANGLING: tuple[tuple[str, str, str | None], ...] = (
    ("dangling_node_blocks",
     "SELECT node_id, count(*) FROM node_blocks WHERE node_id NOT IN (SELECT id FROM nodes) "
     "GROUP BY node_id",
     "DELETE FROM node_blocks WHERE node_id NOT IN (SELECT id FROM nodes)"),
    ("stray_pending",
     "SELECT node_id, count(*) FROM pending_blocks WHERE node_id NOT IN "
     "(SELECT id FROM nodes WHERE deleted_at IS NULL) GROUP BY node_id",
     "DELETE FROM pending_blocks WHERE node_id NOT IN "
     "(SELECT id FROM nodes WHERE deleted_at IS NULL)"),
    ("dangling_grants",
     "SELECT 'user ' || user_id || ' / node ' || node_id, 1 FROM grants "
     "WHERE node_id NOT IN (SELECT id FROM nodes)",
     "DELETE FROM grants WHERE node_id NOT IN (SELECT id FROM nodes)"),
    ("detached_node",
     "SELECT c.id, 1 FROM nodes c LEFT JOIN nodes p ON p.id = c.parent_id "
     "WHERE c.deleted_at IS NULL AND c.parent_id IS NOT NULL "
     "AND (p.id IS NULL OR p.deleted_at IS NOT NULL)",
     None),
)


def check_dangling(db: apsw.Connection, report: FsckReport, fix: bool) -> None:
    """Check 5, inside the caller's transaction; with FIX, delete what is found."""
    for kind, query, repair in _DANGLING:
        found = 0
        for subject, rows in db.execute(query):
            found += 1
            report.add(Finding(kind, str(subject), f"({rows} rows)" if int(rows) > 1 else "",
                               repaired=fix and repair is not None))
        if fix and repair is not None and found:
            db.execute(repair)


# --- reference counts ----------------------------------------------------------------------

def check_refs_batch(db: apsw.Connection, report: FsckReport, after: str, cutoff: float,
                     now: float, fix: bool, limit: int = BATCH) -> str | None:
    """Check 2 on the block ids just after AFTER (a merge of `blocks` and the ids
    node_blocks names, LIMIT of each at most), inside the caller's transaction. Returns
    the last id covered, or None once everything is. CUTOFF: deleted nodes since then
    can still be restored."""
    rows = db.execute("SELECT block_id, refs, unreferenced_since FROM blocks "
                      "WHERE block_id > ? ORDER BY block_id LIMIT ?", (after, limit)).fetchall()
    used = [str(r[0]) for r in db.execute(
        "SELECT DISTINCT block_id FROM node_blocks WHERE block_id > ? ORDER BY block_id "
        "LIMIT ?", (after, limit))]
    if not rows and not used:
        return None
    ends = [ids[-1] for ids in ([str(r[0]) for r in rows], used) if len(ids) == limit]
    upper = min(ends) if ends else _ABOVE_ALL_IDS
    counts = {str(b): (int(live), int(restorable), int(size)) for b, live, restorable, size
              in db.execute(
                  "SELECT nb.block_id, sum(n.deleted_at IS NULL), "
                  "sum(n.deleted_at IS NOT NULL AND n.deleted_at >= ?), max(nb.size) "
                  "FROM node_blocks nb JOIN nodes n ON n.id = nb.node_id "
                  "WHERE nb.block_id > ? AND nb.block_id <= ? GROUP BY nb.block_id",
                  (cutoff, after, upper))}
    for row in rows:
        block_id, refs = str(row[0]), int(row[1])  # type: ignore[arg-type]
        since = None if row[2] is None else float(row[2])
        if block_id > upper:
            break
        report.checked["blocks"] += 1
        live = counts.pop(block_id, (0, 0, 0))[0]
        kinds = refs_verdict(refs, since, live)
        for kind in kinds:
            report.add(Finding(kind, block_id, f"refs {refs}, used {live} times by live nodes"
                               + (f", unreferenced since {since:.0f}" if since else ""),
                               repaired=fix))
        if fix and kinds:
            db.execute("UPDATE blocks SET refs = ?, unreferenced_since = CASE WHEN ? > 0 "
                       "THEN NULL ELSE coalesce(unreferenced_since, ?) END "
                       "WHERE block_id = ?", (live, live, now, block_id))
    for block_id, (live, restorable, size) in counts.items():   # no row in `blocks`
        if not live and not restorable:
            continue    # only nodes past their grace period use it: GC purges them
        report.add(Finding("block_row_missing", block_id, f"used {live} times by live "
                           f"nodes, {restorable} by restorable ones", repaired=fix))
        if fix:
            db.execute("INSERT INTO blocks(block_id, size, stored, refs, unreferenced_since) "
                       "VALUES (?, ?, 0, ?, ?)",
                       (block_id, size, live, None if live else now))
    return None if upper == _ABOVE_ALL_IDS else upper


# --- node status and pending rows ----------------------------------------------------------

def check_nodes_batch(db: apsw.Connection, report: FsckReport, after: str, fix: bool,
                      limit: int = BATCH) -> str | None:
    """Check 3 on the live nodes just after AFTER, inside the caller's transaction; with
    FIX, rewrite what is wrong (and journal a changed status, so devices learn of it).
    Returns the last node id covered, or None once every node is."""
    nodes = [(str(i), str(s)) for i, s in db.execute(
        "SELECT id, status FROM nodes WHERE id > ? AND deleted_at IS NULL ORDER BY id "
        "LIMIT ?", (after, limit))]
    if not nodes:
        return None
    last = nodes[-1][0]
    lacking: dict[str, set[str]] = {}
    for node_id, block_id in db.execute(
            "SELECT nb.node_id, nb.block_id FROM node_blocks nb LEFT JOIN blocks b "
            "ON b.block_id = nb.block_id WHERE nb.node_id > ? AND nb.node_id <= ? "
            "AND (b.block_id IS NULL OR b.stored = 0)", (after, last)):
        lacking.setdefault(str(node_id), set()).add(str(block_id))
    pending: dict[str, set[str]] = {}
    for node_id, block_id in db.execute("SELECT node_id, block_id FROM pending_blocks "
                                        "WHERE node_id > ? AND node_id <= ?", (after, last)):
        pending.setdefault(str(node_id), set()).add(str(block_id))
    for node_id, status in nodes:
        report.checked["nodes"] += 1
        need, have = lacking.get(node_id, set()), pending.get(node_id, set())
        kind = node_verdict(status, need, have)
        if kind is None:
            continue
        report.add(Finding(kind, node_id, f"{status}, lacks {len(need)} blocks, "
                           f"{len(have)} pending rows", repaired=fix))
        if fix:
            _fix_node(db, node_id, status, need, have)
    return None if len(nodes) < limit else last


def _fix_node(db: apsw.Connection, node_id: str, status: str, need: set[str],
              have: set[str]) -> None:
    db.executemany("DELETE FROM pending_blocks WHERE node_id = ? AND block_id = ?",
                   [(node_id, b) for b in sorted(have - need)])
    db.executemany("INSERT INTO pending_blocks(node_id, block_id) VALUES (?, ?)",
                   [(node_id, b) for b in sorted(need - have)])
    wanted = "uploading" if need else "uploaded"
    if wanted != status:
        db.execute("UPDATE nodes SET status = ? WHERE id = ?", (wanted, node_id))
        node = tree.find_node(db, node_id)
        assert node is not None
        Journal(db, None).record(node, wanted)


# --- the store -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Referenced:
    """A block that live or restorable nodes reference, as the database records it."""

    block_id: str
    live: bool              # a live node references it (not only restorable ones)
    stored: bool
    size: int | None        # None: no row in `blocks`


def referenced_batch(db: apsw.Connection, after: str, cutoff: float,
                     limit: int = BATCH) -> list[Referenced]:
    rows = db.execute(
        "SELECT r.block_id, r.live, b.stored, b.size FROM ("
        "  SELECT nb.block_id AS block_id, max(n.deleted_at IS NULL) AS live"
        "  FROM node_blocks nb JOIN nodes n ON n.id = nb.node_id"
        "  WHERE nb.block_id > ? AND (n.deleted_at IS NULL OR n.deleted_at >= ?)"
        "  GROUP BY nb.block_id ORDER BY nb.block_id LIMIT ?) r "
        "LEFT JOIN blocks b ON b.block_id = r.block_id ORDER BY r.block_id",
        (after, cutoff, limit))
    return [Referenced(str(b), bool(live), bool(stored), None if size is None else int(size))
            for b, live, stored, size in rows]


def nodes_needing(db: apsw.Connection, block_id: str, cutoff: float) -> tuple[str, ...]:
    return tuple(str(r[0]) for r in db.execute(
        "SELECT DISTINCT nb.node_id FROM node_blocks nb JOIN nodes n ON n.id = nb.node_id "
        "WHERE nb.block_id = ? AND (n.deleted_at IS NULL OR n.deleted_at >= ?) LIMIT ?",
        (block_id, cutoff, MAX_NODES_LISTED)))


def _is_stored_and_needed(db: apsw.Connection, block_id: str, cutoff: float) -> bool:
    row = db.execute("SELECT stored FROM blocks WHERE block_id = ?", (block_id,)).fetchone()
    return bool(row and row[0]) and bool(nodes_needing(db, block_id, cutoff))


def _record_stored(db: apsw.Connection, block_id: str, size: int) -> bool:
    """Record a block the store was just found to hold, if it is still not recorded and a
    live node still needs it; the nodes waiting only for it become `uploaded`."""
    row = db.execute("SELECT stored FROM blocks WHERE block_id = ?", (block_id,)).fetchone()
    needed = db.execute("SELECT 1 FROM node_blocks nb JOIN nodes n ON n.id = nb.node_id "
                        "WHERE nb.block_id = ? AND n.deleted_at IS NULL LIMIT 1",
                        (block_id,)).fetchone()
    if (row and row[0]) or needed is None:
        return False
    tree.mark_block_stored(db, block_id, size, Journal(db, None))
    return True


# --- orphans -------------------------------------------------------------------------------

def known_ids(db: apsw.Connection, ids: list[str]) -> tuple[set[str], set[str]]:
    """Of IDS, those the database knows (a row in `blocks`, or a node that references
    it: that row missing is the refs check's problem, and the block is no orphan), and
    those tombstoned (deleted)."""
    marks = ",".join("?" * len(ids))
    known = {str(r[0]) for r in db.execute(
        f"SELECT block_id FROM blocks WHERE block_id IN ({marks}) UNION "
        f"SELECT block_id FROM node_blocks WHERE block_id IN ({marks})", ids + ids)}
    tombstoned = {str(r[0]) for r in db.execute(
        f"SELECT block_id FROM block_tombstones WHERE block_id IN ({marks})", ids)}
    return known, tombstoned


def saw_orphans(db: apsw.Connection, ids: list[str], now: float) -> dict[str, float]:
    """Record that this run saw IDS as orphans; when each was first seen."""
    first: dict[str, float] = {}
    for block_id in ids:
        row = db.execute(
            "INSERT INTO fsck_orphans(block_id, first_seen, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(block_id) DO UPDATE SET last_seen = excluded.last_seen "
            "RETURNING first_seen", (block_id, now, now)).fetchone()
        assert row is not None
        first[block_id] = float(row[0])
    return first


def forget_orphans(db: apsw.Connection, seen_at: float) -> None:
    """After a whole scan: drop the rows of orphans not seen by it, or known by now."""
    db.execute("DELETE FROM fsck_orphans WHERE last_seen < ? OR block_id IN "
               "(SELECT block_id FROM blocks)", (seen_at,))


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


# --- the runs ------------------------------------------------------------------------------

@dataclass
class _Run:
    """One run's state; each check is a method (the I/O shell around the functions above)."""

    meta: Metadata
    report: FsckReport
    grace_s: float
    now: float
    guard: BlockGuard = unguarded
    progress: Progress | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def cutoff(self) -> float:
        return self.now - self.grace_s

    @property
    def fix(self) -> bool:
        return self.report.repair

    def tell(self, phase: str, done: int) -> None:
        if self.progress is not None:
            self.progress(FsckProgress(phase, done, time.monotonic() - self.started))

    def transaction(self, fn: Callable[[apsw.Connection], T]) -> T:
        """A write transaction when repairing (check and fix at once), else a read one."""
        return self.meta.write_sync(fn) if self.fix else self.meta.read_sync(fn)

    def dangling(self) -> None:
        self.report.checks.append("dangling")
        self.tell("dangling", 0)
        self.transaction(lambda db: check_dangling(db, self.report, self.fix))

    def refs(self) -> None:
        self.report.checks.append("refs")
        self.report.checked["blocks"] += 0
        after: str | None = ""
        while after is not None:
            after = self.transaction(partial(check_refs_batch, report=self.report,
                                             after=after, cutoff=self.cutoff, now=self.now,
                                             fix=self.fix))
            self.tell("refs", self.report.checked["blocks"])

    def nodes(self) -> None:
        self.report.checks.append("nodes")
        self.report.checked["nodes"] += 0
        after: str | None = ""
        while after is not None:
            after = self.transaction(partial(check_nodes_batch, report=self.report,
                                             after=after, fix=self.fix))
            self.tell("nodes", self.report.checked["nodes"])


@dataclass
class _StoreRun(_Run):
    """The checks that also read the store (store, orphans)."""

    store: BlockStore | None = None
    verify: bool = False

    @property
    def blocks(self) -> BlockStore:
        assert self.store is not None
        return self.store

    def decodable(self, block_id: str) -> bool:
        try:
            if self.verify:
                self.blocks.get(block_id)
                return True
            return self.blocks.has(block_id)
        except CairnApplianceError:
            return False

    def holders(self, block_id: str) -> int:
        """Readable disks holding a shard of the block (a stat or an index lookup each)."""
        count = 0
        for disk in self.blocks.disks:
            try:
                count += disk.readable and disk.has_shard(block_id)
            except DiskError:
                continue
        return count

    def check_store(self) -> None:
        self.report.checks.append("store")
        self.report.checked["referenced_blocks"] += 0
        unreadable = [disk.name for disk in self.blocks.disks if not disk.readable]
        if unreadable:
            self.report.notes.append(
                f"disks not readable: {', '.join(unreadable)} (`cairnd disks`); blocks may "
                "look degraded or lost because of them, so none is queued or marked lost "
                "until every disk is readable (`cairnd scrub` rebuilds a replaced disk)")
        after = ""
        while batch := self.meta.read_sync(partial(referenced_batch, after=after,
                                                   cutoff=self.cutoff)):
            for block in batch:
                self.report.checked["referenced_blocks"] += 1
                if block.stored:
                    self.stored_block(block, not unreadable)
                elif block.live:
                    self.unrecorded_block(block)
            after = batch[-1].block_id
            self.tell("store", self.report.checked["referenced_blocks"])

    def stored_block(self, block: Referenced, all_readable: bool) -> None:
        block_id, store = block.block_id, self.blocks
        holders, total = self.holders(block_id), store.codec_for_length(block.size or 0).total
        kind = store_verdict(self.decodable(block_id), holders, total)
        if kind is None:
            return
        detail = f"{holders} of {total} shards on readable disks"
        if kind == "degraded_block":
            queued = all_readable and store.repair_queue is not None
            if queued and store.repair_queue is not None:
                store.repair_queue.enqueue(block_id, f"fsck: {detail}")
            self.report.add(Finding(kind, block_id, detail, repaired=queued))
            return
        # Lost, by this look. Look again, the database first: beside a server, the block
        # may have been deleted by GC (after its nodes went) or stored again meanwhile.
        if not self.meta.read_sync(lambda db: _is_stored_and_needed(db, block_id, self.cutoff)) \
                or self.decodable(block_id):
            return
        nodes = self.meta.read_sync(lambda db: nodes_needing(db, block_id, self.cutoff))
        lost = self.fix and all_readable and self.guard(block_id, lambda: self.mark_lost(block_id))
        self.report.add(Finding(kind, block_id, detail, nodes, repaired=lost))

    def mark_lost(self, block_id: str) -> bool:
        """Under the block's lock: if it is still lost, record it as not stored (the nodes
        check then sends its nodes back to `uploading`, pending rows and all)."""
        if self.decodable(block_id):
            return False

        def unstore(db: apsw.Connection) -> bool:
            db.execute("UPDATE blocks SET stored = 0 WHERE block_id = ? AND stored = 1",
                       (block_id,))
            return bool(db.changes())

        return self.meta.write_sync(unstore)

    def unrecorded_block(self, block: Referenced) -> None:
        """A block live nodes lack per the database; the store may have it anyway."""
        block_id = block.block_id
        if not self.decodable(block_id):
            return
        recorded = self.fix and self.guard(block_id, lambda: self.record(block_id))
        self.report.add(Finding("unrecorded_block", block_id, "in the store, not recorded "
                                "as stored", repaired=recorded))

    def record(self, block_id: str) -> bool:
        try:
            data = self.blocks.get(block_id)   # a full read: the id is checked
        except CairnApplianceError:
            return False
        return self.meta.write_sync(lambda db: _record_stored(db, block_id, len(data)))

    def orphans(self) -> None:
        self.report.checks.append("orphans")
        scanned = 0
        for batch in batches(self.blocks.iter_block_ids()):
            scanned += len(batch)
            known, tombstoned = self.meta.read_sync(partial(known_ids, ids=batch))
            for block_id in sorted(tombstoned - known):
                self.report.add(Finding("deleted_leftover", block_id))
            orphans = [b for b in batch if b not in known and b not in tombstoned]
            if orphans:
                first_seen = self.meta.write_sync(partial(saw_orphans, ids=orphans,
                                                          now=self.now))
                for block_id in orphans:
                    self.orphan(block_id, first_seen[block_id])
            self.tell("orphans", scanned)
        self.report.checked["store_blocks"] = scanned
        self.meta.write_sync(lambda db: forget_orphans(db, self.now))

    def orphan(self, block_id: str, first_seen: float) -> None:
        due = first_seen < self.cutoff
        collected = self.fix and due and self.guard(block_id, lambda: self.collect(block_id))
        detail = f"first seen {_when(first_seen)}" + (
            "" if due else f", may be collected after {_when(first_seen + self.grace_s)}")
        self.report.add(Finding("orphan_block", block_id, detail, repaired=collected))

    def collect(self, block_id: str) -> bool:
        """Under the block's lock: delete an orphan still unknown to the database (the
        store tombstones it, so a shard on a disk away now goes when scrub meets it)."""
        if self.meta.read_sync(lambda db: known_ids(db, [block_id])[0]):
            return False
        self.blocks.delete(block_id)
        self.meta.write_sync(lambda db: db.execute(
            "DELETE FROM fsck_orphans WHERE block_id = ?", (block_id,)).fetchall())
        return True


def run_cheap_checks(meta: Metadata, *, grace_s: float, repair: bool = False,
                     progress: Progress | None = None, now: float | None = None
                     ) -> FsckReport:
    """The checks that read only the database (dangling, refs, nodes): run by the
    background maintenance on a schedule."""
    run = _Run(meta, FsckReport(repair=repair), grace_s, time.time() if now is None else now,
               progress=progress)
    run.dangling()
    run.refs()
    run.nodes()
    run.report.seconds = time.monotonic() - run.started
    return run.report


def run_fsck(meta: Metadata, store: BlockStore, *, grace_s: float, repair: bool = False,
             verify: bool = False, progress: Progress | None = None,
             guard: BlockGuard = unguarded, now: float | None = None) -> FsckReport:
    """Every check, in the order of the module doc: each repair makes the next check's
    ground true (rows and counts, then the store, then the nodes that depend on both).
    Blocking; inside the server run it in a worker thread with the server's block guard.
    PROGRESS is called at least once per batch, and whatever it raises stops the run."""
    run = _StoreRun(meta, FsckReport(repair=repair, verify=verify), grace_s,
                    time.time() if now is None else now, guard, progress, store=store,
                    verify=verify)
    run.dangling()
    run.refs()
    run.check_store()
    run.nodes()
    run.orphans()
    run.report.seconds = time.monotonic() - run.started
    return run.report


def batches(ids: Iterator[str], size: int = BATCH) -> Iterator[list[str]]:
    while batch := list(itertools.islice(ids, size)):
        yield batch


def fsck_command(config: ApplianceConfig, store: BlockStore, args: dict[str, Any],
                 progress: Callable[[dict[str, Any]], None], *, meta: Metadata | None = None,
                 guard: BlockGuard = unguarded) -> dict[str, Any]:
    """`cairnd fsck` as a store command (appliance/store_commands.py): ARGS `repair` and
    `verify` (booleans); the result is {"report": FsckReport.to_json(), "summary": text},
    printed alike wherever it was made. Inside the server pass its META and GUARD; without
    META the database is opened here (the CLI, holding the owner lock)."""
    opened = meta is None
    database = Metadata(config.database) if meta is None else meta
    try:
        report = run_fsck(database, store, grace_s=config.gc_grace_s,
                          repair=bool(args.get("repair")), verify=bool(args.get("verify")),
                          progress=lambda step: progress(step.to_json()), guard=guard)
    finally:
        if opened:
            database.close()
    return {"report": report.to_json(), "summary": report.summary()}

