"""Garbage collection of what no node needs any more, after a grace period.

- Deleted nodes whose tombstone is older than the grace period are purged (with their
  block lists and grants); until then `restore` brings them back.
- Blocks whose reference count has been 0 for longer than the grace period are collected
  in three steps, so that a block referenced again meanwhile is never lost:
  1. `unreferenced_blocks` lists them, and `claim_block` marks each not stored (a new node
     that references one from now on asks for it to be uploaded again);
  2. the caller deletes them from the block store (tombstoned there);
  3. `forget_block` drops the row of one still unreferenced, or lists it as pending for the
     nodes that now wait for it.
  appliance/collect.py runs the three steps.
  A per-block lock (appliance.locks, held by the block routes and by appliance.collect)
  keeps an upload of the same block from interleaving with steps 1-3.
"""

from __future__ import annotations

import apsw

DEFAULT_GRACE_S = 7 * 24 * 3600.0


def purge_deleted_nodes(db: apsw.Connection, cutoff: float, limit: int = 1000) -> int:
    ids = [str(row[0]) for row in db.execute(
        "SELECT id FROM nodes WHERE deleted_at IS NOT NULL AND deleted_at < ? LIMIT ?",
        (cutoff, limit))]
    for node_id in ids:
        db.execute("DELETE FROM node_blocks WHERE node_id = ?", (node_id,))
        db.execute("DELETE FROM pending_blocks WHERE node_id = ?", (node_id,))
        db.execute("DELETE FROM grants WHERE node_id = ?", (node_id,))
        db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
    return len(ids)


def unreferenced_blocks(db: apsw.Connection, cutoff: float, limit: int) -> list[str]:
    rows = db.execute("SELECT block_id FROM blocks WHERE unreferenced_since < ? AND "
                      "refs <= 0 ORDER BY unreferenced_since LIMIT ?", (cutoff, limit))
    return [str(row[0]) for row in rows]


def claim_block(db: apsw.Connection, block_id: str, cutoff: float) -> bool:
    """Step 1 for one block; False if it is referenced again (then leave it alone)."""
    db.execute("UPDATE blocks SET stored = 0 WHERE block_id = ? AND refs <= 0 AND "
               "unreferenced_since < ?", (block_id, cutoff))
    return bool(db.changes())


def forget_block(db: apsw.Connection, block_id: str) -> None:
    """Step 3 for one block the store has deleted."""
    db.execute("DELETE FROM blocks WHERE block_id = ? AND refs <= 0", (block_id,))
    if not db.changes():  # referenced again between steps 1 and 3: it must be re-uploaded
        db.execute("INSERT OR IGNORE INTO pending_blocks(node_id, block_id) "
                   "SELECT DISTINCT nb.node_id, nb.block_id FROM node_blocks nb "
                   "JOIN nodes n ON n.id = nb.node_id "
                   "WHERE nb.block_id = ? AND n.deleted_at IS NULL", (block_id,))
        db.execute("UPDATE nodes SET status = 'uploading' WHERE id IN "
                   "(SELECT node_id FROM pending_blocks WHERE block_id = ?)", (block_id,))
