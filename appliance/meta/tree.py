"""The encrypted node tree: creating, updating, moving, deleting and restoring nodes, block
references and upload progress, and who may see what.

What the appliance knows of a node is what DESIGN-NOTES says it may: id, owner, parent,
kind, version, status, sizes, timestamps, the devices that changed it and its block ids.
Names, modes and block keys live in `metadata`, which is ciphertext to us.

Block bookkeeping, per block id:
- `blocks.refs` counts the positions that live nodes' current versions give the block;
  when it drops to 0 the block becomes unreferenced, and garbage collection deletes it once
  the grace period has passed (appliance.meta.gc), so a deleted file can be restored.
- `blocks.stored` says the block store holds the block durably; it is set only after the
  store's put returned, so a crash in between leaves the block to be uploaded again.
- `pending_blocks` lists, for each uploading node, the distinct blocks it still lacks; a
  node is `uploaded` exactly when it has none, which is checked in the same transaction
  that marks its last block stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import apsw
import blake3

from appliance.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    GoneError,
    NotFoundError,
)
from appliance.meta.journal import Journal
from appliance.meta.records import BlockRef, Node, NodeKind, NodeStatus, User
from protocol.ids import is_block_id, is_node_id
from protocol.limits import (
    MAX_BLOCK_BYTES,
    MAX_BLOCKS_PER_NODE,
    MAX_METADATA_BYTES,
    MAX_WRAPPED_KEY_BYTES,
)

# The owner's name by a subquery, not a join: SQLite's join with `users` (whose rows carry
# the key bundles) made a node lookup cost 27 µs instead of 7.
NODE_COLUMNS = ("n.id, n.owner_id, (SELECT name FROM users WHERE id = n.owner_id), "
                "n.parent_id, n.kind, n.version, n.status, n.deleted_at, n.metadata, "
                "n.wrapped_key, n.size, n.block_count, n.content_tag, n.created_at, "
                "n.updated_at, n.updated_by")
NODE_FROM = "FROM nodes n"


@dataclass(frozen=True)
class NodeContent:
    """What a client sends to create a node or give it a new version."""

    metadata: bytes
    wrapped_key: bytes
    size: int                                   # -1 in an update without blocks: keep
    blocks: tuple[BlockRef, ...] | None = None  # None in an update: keep the blocks

    @property
    def block_list(self) -> tuple[BlockRef, ...]:
        return self.blocks or ()

    def check(self, kind: NodeKind) -> None:
        if len(self.metadata) > MAX_METADATA_BYTES:
            raise BadRequestError(f"metadata is over {MAX_METADATA_BYTES} bytes")
        if not self.wrapped_key or len(self.wrapped_key) > MAX_WRAPPED_KEY_BYTES:
            raise BadRequestError(f"wrapped_key must have 1-{MAX_WRAPPED_KEY_BYTES} bytes")
        if kind == "dir" and (self.block_list or self.size):
            raise BadRequestError("a directory has no blocks and size 0")
        if len(self.block_list) > MAX_BLOCKS_PER_NODE:
            raise BadRequestError(f"a file has at most {MAX_BLOCKS_PER_NODE} blocks")
        if self.size < 0 or self.size > MAX_BLOCKS_PER_NODE * MAX_BLOCK_BYTES:
            raise BadRequestError("size is out of range")
        for block in self.block_list:
            check_block_id(block.block_id)
            if not 0 < block.size <= MAX_BLOCK_BYTES:
                raise BadRequestError(f"block {block.block_id[:16]}: size must be 1 to "
                                      f"{MAX_BLOCK_BYTES} bytes")

    def tag(self, kind: NodeKind, parent_id: str | None) -> bytes:
        """Identifies this exact content, so a retried request is recognised as one."""
        digest = blake3.blake3()
        for part in (kind.encode(), (parent_id or "").encode(), self.metadata,
                     self.wrapped_key, str(self.size).encode()):
            digest.update(len(part).to_bytes(8, "big") + part)
        for block in self.block_list:
            digest.update(f"{block.block_id}:{block.size};".encode())
        return digest.digest()


def check_node_id(node_id: str) -> str:
    if not is_node_id(node_id):
        raise NotFoundError(f"no node {node_id[:40]!r} (node ids are 32 hex digits)")
    return node_id


def check_block_id(block_id: str) -> str:
    if not is_block_id(block_id):
        raise BadRequestError(f"invalid block id {block_id[:70]!r} "
                              "(64 lowercase hex digits: the BLAKE3 of the block)")
    return block_id


# --- reading -------------------------------------------------------------------------------

def node_from_row(row: tuple[object, ...]) -> Node:
    return Node(*row)  # type: ignore[arg-type]


def find_node(db: apsw.Connection, node_id: str) -> Node | None:
    row = db.execute(f"SELECT {NODE_COLUMNS} {NODE_FROM} WHERE n.id = ?",
                     (node_id,)).fetchone()
    return None if row is None else node_from_row(row)


def can_read(db: apsw.Connection, user_id: int, node: Node) -> bool:
    if node.owner_id == user_id:
        return True
    row = db.execute(
        "WITH RECURSIVE up(id, parent_id) AS ("
        "  SELECT id, parent_id FROM nodes WHERE id = ?"
        "  UNION ALL SELECT n.id, n.parent_id FROM nodes n JOIN up ON n.id = up.parent_id)"
        "SELECT 1 FROM up JOIN grants g ON g.node_id = up.id AND g.user_id = ? LIMIT 1",
        (node.id, user_id)).fetchone()
    return row is not None


def readable_node(db: apsw.Connection, user_id: int, node_id: str) -> Node:
    """The node, if the user owns it or it lies in a subtree shared with them; a node they
    may not see is reported exactly like one that does not exist."""
    check_node_id(node_id)
    node = find_node(db, node_id)
    if node is None or not can_read(db, user_id, node):
        raise NotFoundError(f"no node {node_id}")
    return node


def owned_node(db: apsw.Connection, user_id: int, node_id: str) -> Node:
    node = readable_node(db, user_id, node_id)
    if node.owner_id != user_id:
        raise ForbiddenError(f"node {node_id} is shared with you read-only; only its owner "
                             f"({node.owner_name}) can change it")
    return node


def root_node(db: apsw.Connection, user_id: int) -> Node | None:
    row = db.execute(f"SELECT {NODE_COLUMNS} {NODE_FROM} WHERE n.owner_id = ? AND "
                     "n.parent_id IS NULL AND n.deleted_at IS NULL", (user_id,)).fetchone()
    return None if row is None else node_from_row(row)


def children(db: apsw.Connection, parent_id: str, include_deleted: bool, after: str,
             limit: int) -> list[Node]:
    deleted = "" if include_deleted else "AND n.deleted_at IS NULL"
    rows = db.execute(f"SELECT {NODE_COLUMNS} {NODE_FROM} WHERE n.parent_id = ? "
                      f"{deleted} AND n.id > ? ORDER BY n.id LIMIT ?",
                      (parent_id, after, limit)).fetchall()
    return [node_from_row(row) for row in rows]


def trash(db: apsw.Connection, user_id: int, limit: int) -> list[Node]:
    """Deleted nodes that were deleted themselves (not taken along with a folder)."""
    rows = db.execute(f"SELECT {NODE_COLUMNS} {NODE_FROM} WHERE n.owner_id = ? AND "
                      "n.deleted_at IS NOT NULL AND n.deleted_root = n.id "
                      "ORDER BY n.deleted_at DESC LIMIT ?", (user_id, limit)).fetchall()
    return [node_from_row(row) for row in rows]


def node_blocks(db: apsw.Connection, node_id: str, offset: int = 0,
                limit: int = MAX_BLOCKS_PER_NODE) -> list[BlockRef]:
    rows = db.execute("SELECT block_id, size FROM node_blocks WHERE node_id = ? AND "
                      "position >= ? ORDER BY position LIMIT ?",
                      (node_id, offset, limit)).fetchall()
    return [BlockRef(str(b), int(s)) for b, s in rows]  # type: ignore[arg-type]


def stored_blocks(db: apsw.Connection, node_id: str, offset: int = 0,
                  limit: int = MAX_BLOCKS_PER_NODE) -> list[BlockRef]:
    """The node's distinct blocks that are stored, in order of first position, from the
    OFFSET-th of them (a file still uploading: what another device may fetch already)."""
    rows = db.execute(
        "SELECT nb.block_id, nb.size FROM node_blocks nb JOIN blocks b "
        "ON b.block_id = nb.block_id WHERE nb.node_id = ? AND b.stored = 1 "
        "GROUP BY nb.block_id ORDER BY min(nb.position) LIMIT ? OFFSET ?",
        (node_id, limit, offset)).fetchall()
    return [BlockRef(str(b), int(s)) for b, s in rows]  # type: ignore[arg-type]


def missing_blocks(db: apsw.Connection, node_id: str) -> list[BlockRef]:
    rows = db.execute("SELECT p.block_id, b.size FROM pending_blocks p JOIN blocks b "
                      "ON b.block_id = p.block_id WHERE p.node_id = ? ORDER BY p.block_id",
                      (node_id,)).fetchall()
    return [BlockRef(str(b), int(s)) for b, s in rows]  # type: ignore[arg-type]


def block_is_stored(db: apsw.Connection, block_id: str) -> bool:
    row = db.execute("SELECT stored FROM blocks WHERE block_id = ?", (block_id,)).fetchone()
    return bool(row and row[0])


def user_may_read_block(db: apsw.Connection, user_id: int, block_id: str) -> bool:
    """Whether some node the user can read references the block."""
    rows = db.execute("SELECT DISTINCT node_id FROM node_blocks WHERE block_id = ? LIMIT 64",
                      (block_id,)).fetchall()
    for (node_id,) in rows:
        node = find_node(db, str(node_id))
        if node is not None and can_read(db, user_id, node):
            return True
    return False


def user_awaits_block(db: apsw.Connection, user_id: int, block_id: str) -> bool:
    """Whether one of the user's uploading nodes is waiting for the block."""
    row = db.execute("SELECT 1 FROM pending_blocks p JOIN nodes n ON n.id = p.node_id "
                     "WHERE p.block_id = ? AND n.owner_id = ? LIMIT 1",
                     (block_id, user_id)).fetchone()
    return row is not None


# --- block references ----------------------------------------------------------------------

def _write_blocks(db: apsw.Connection, node_id: str, blocks: tuple[BlockRef, ...]) -> None:
    db.executemany("INSERT INTO node_blocks(node_id, position, block_id, size) "
                   "VALUES (?, ?, ?, ?)",
                   [(node_id, i, b.block_id, b.size) for i, b in enumerate(blocks)])


def _reference(db: apsw.Connection, node_id: str,
               blocks: tuple[BlockRef, ...] | None = None) -> int:
    """Count the node's blocks (BLOCKS, its node_blocks rows; read from there when None)
    as referenced; list those not stored as pending. Returns how many distinct blocks are
    pending (the node has none pending before: new, or unreferenced first)."""
    if blocks is None:
        blocks = tuple(node_blocks(db, node_id))
    counts: dict[str, tuple[int, int]] = {}          # block id -> (positions, size)
    for block in blocks:
        positions, size = counts.get(block.block_id, (0, 0))
        counts[block.block_id] = (positions + 1, max(size, block.size))
    pending = []
    for block_id, (positions, size) in counts.items():
        row = db.execute(
            "INSERT INTO blocks(block_id, size, refs) VALUES (?, ?, ?) "
            "ON CONFLICT(block_id) DO UPDATE SET refs = refs + excluded.refs, "
            "unreferenced_since = NULL RETURNING stored", (block_id, size, positions)
        ).fetchone()
        if not (row and row[0]):
            pending.append((node_id, block_id))
    db.executemany("INSERT OR IGNORE INTO pending_blocks(node_id, block_id) VALUES (?, ?)",
                   pending)
    return len(pending)


def _unreference(db: apsw.Connection, node_id: str, now: float) -> None:
    db.execute(
        "WITH c(block_id, n) AS (SELECT block_id, count(*) FROM node_blocks "
        "  WHERE node_id = ? GROUP BY block_id) "
        "UPDATE blocks SET refs = refs - (SELECT n FROM c WHERE c.block_id = blocks.block_id),"
        " unreferenced_since = CASE WHEN refs - (SELECT n FROM c WHERE c.block_id = "
        "   blocks.block_id) <= 0 THEN ? ELSE NULL END "
        "WHERE block_id IN (SELECT block_id FROM c)", (node_id, now))
    db.execute("DELETE FROM pending_blocks WHERE node_id = ?", (node_id,))


def mark_block_stored(db: apsw.Connection, block_id: str, size: int,
                      journal: Journal) -> list[Node]:
    """The store holds `block_id` durably now. Returns the nodes this completed (now
    `uploaded`, each with an `uploaded` change in the journal)."""
    db.execute("INSERT INTO blocks(block_id, size, stored, unreferenced_since) "
               "VALUES (?, ?, 1, ?) ON CONFLICT(block_id) DO UPDATE SET stored = 1",
               (block_id, size, time.time()))
    waiting = [str(row[0]) for row in db.execute(
        "DELETE FROM pending_blocks WHERE block_id = ? RETURNING node_id", (block_id,))]
    completed = []
    for node_id in waiting:
        if db.execute("SELECT 1 FROM pending_blocks WHERE node_id = ? LIMIT 1",
                      (node_id,)).fetchone():
            continue
        db.execute("UPDATE nodes SET status = 'uploaded' WHERE id = ? AND "
                   "status = 'uploading'", (node_id,))
        node = find_node(db, node_id)
        if node is not None and db.changes():
            journal.record(node, "uploaded")
            completed.append(node)
    return completed


# --- changing the tree ---------------------------------------------------------------------

def _check_parent(db: apsw.Connection, user: User, parent_id: str) -> Node:
    parent = readable_node(db, user.id, parent_id)
    if parent.owner_id != user.id:
        raise ForbiddenError(f"folder {parent_id} is shared with you read-only")
    if parent.kind != "dir":
        raise BadRequestError(f"parent {parent_id} is a file, not a folder")
    if parent.deleted:
        raise ConflictError(f"folder {parent_id} is deleted (restore it first)")
    return parent


def create_node(db: apsw.Connection, user: User, journal: Journal, *, kind: NodeKind,
                parent_id: str | None, content: NodeContent,
                node_id: str) -> tuple[Node, bool]:
    """Create a node with a client- or server-chosen id. Repeating the same request (same
    id and content, say after a lost answer) returns the node unchanged; returns whether
    it was created now."""
    content.check(kind)
    check_node_id(node_id)
    tag = content.tag(kind, parent_id)
    existing = find_node(db, node_id)
    if existing is not None:
        if existing.owner_id == user.id and existing.content_tag == tag \
                and existing.version == 1:
            return existing, False
        raise ConflictError(f"node {node_id} already exists", current_version=(
            existing.version if existing.owner_id == user.id else None))
    if parent_id is None:
        if kind != "dir":
            raise BadRequestError("only a folder can be a root (parent null)")
        root = root_node(db, user.id)
        if root is not None:
            raise ConflictError(f"user {user.name} already has a root folder",
                                root_id=root.id)
    else:
        _check_parent(db, user, parent_id)
    now = time.time()
    blocks = content.block_list
    _write_blocks(db, node_id, blocks)
    status: NodeStatus = "uploading" if _reference(db, node_id, blocks) else "uploaded"
    node = Node(id=node_id, owner_id=user.id, owner_name=user.name, parent_id=parent_id,
                kind=kind, version=1, status=status, deleted_at=None,
                metadata=content.metadata, wrapped_key=content.wrapped_key, size=content.size,
                block_count=len(blocks), content_tag=tag, created_at=now, updated_at=now,
                updated_by=journal.device_id)
    db.execute(
        "INSERT INTO nodes(id, owner_id, parent_id, kind, version, status, metadata, "
        "wrapped_key, size, block_count, content_tag, created_at, updated_at, updated_by) "
        "VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (node_id, user.id, parent_id, kind, status, content.metadata, content.wrapped_key,
         content.size, len(blocks), tag, now, now, journal.device_id))
    journal.record(node, "created")
    return node, True


def _check_base(node: Node, base_version: int) -> None:
    if base_version != node.version:
        raise ConflictError(
            f"node {node.id} is at version {node.version}, not {base_version}: someone "
            "changed it meanwhile; fetch it and merge", current_version=node.version)


def update_node(db: apsw.Connection, user: User, journal: Journal, node_id: str, *,
                base_version: int, parent_id: str | None,
                content: NodeContent | None, move: bool) -> Node:
    """A new version: new content (metadata, wrapped key, size, blocks), a move to
    `parent_id` (with the node key re-wrapped for the new parent), or both. A request
    retried after its answer was lost is recognised and answered with the node."""
    node = owned_node(db, user.id, node_id)
    new_parent = parent_id if move else node.parent_id
    keep_blocks = content is not None and content.blocks is None
    if content is not None and content.blocks is None:
        content = replace(content, blocks=tuple(node_blocks(db, node.id)),
                          size=node.size if content.size < 0 else content.size)
    if content is not None and node.version == base_version + 1 \
            and node.updated_by == journal.device_id \
            and node.content_tag == content.tag(node.kind, new_parent):
        return node  # the same device repeating the same update
    _check_base(node, base_version)
    if node.deleted:
        raise ConflictError(f"node {node_id} is deleted; restore it first",
                            current_version=node.version)
    if move:
        if node.parent_id is None:
            raise BadRequestError("a root folder cannot be moved")
        if parent_id is None:
            raise BadRequestError("a move needs the new parent's id")
        _check_parent(db, user, parent_id)
        if _is_within(db, parent_id, node.id):
            raise BadRequestError("cannot move a folder into itself or its subtree")
        if content is None:
            raise BadRequestError("a move needs the node key re-wrapped for the new parent "
                                  "(wrapped_key) and the metadata")
    if content is None:
        raise BadRequestError("nothing to change: send content, a new parent, or both")
    content.check(node.kind)
    now = time.time()
    tag = content.tag(node.kind, new_parent)
    if keep_blocks:
        pending = 1 if node.status == "uploading" else 0
    else:
        _unreference(db, node.id, now)
        db.execute("DELETE FROM node_blocks WHERE node_id = ?", (node.id,))
        _write_blocks(db, node.id, content.block_list)
        pending = _reference(db, node.id, content.block_list)
    db.execute(
        "UPDATE nodes SET parent_id = ?, version = version + 1, status = ?, metadata = ?, "
        "wrapped_key = ?, size = ?, block_count = ?, content_tag = ?, updated_at = ?, "
        "updated_by = ? WHERE id = ?",
        (new_parent, "uploading" if pending else "uploaded", content.metadata,
         content.wrapped_key, content.size, len(content.block_list), tag, now,
         journal.device_id, node.id))
    updated = find_node(db, node.id)
    assert updated is not None
    journal.record(updated, "moved" if move and new_parent != node.parent_id else "updated")
    return updated


def _is_within(db: apsw.Connection, node_id: str, ancestor_id: str) -> bool:
    row = db.execute(
        "WITH RECURSIVE up(id, parent_id) AS ("
        "  SELECT id, parent_id FROM nodes WHERE id = ?"
        "  UNION ALL SELECT n.id, n.parent_id FROM nodes n JOIN up ON n.id = up.parent_id)"
        "SELECT 1 FROM up WHERE id = ? LIMIT 1", (node_id, ancestor_id)).fetchone()
    return row is not None


def _subtree(db: apsw.Connection, node_id: str, where: str, args: tuple[object, ...]
             ) -> list[str]:
    rows = db.execute(
        "WITH RECURSIVE down(id) AS (SELECT ? UNION ALL "
        f"  SELECT n.id FROM nodes n JOIN down ON n.parent_id = down.id WHERE {where})"
        "SELECT id FROM down", (node_id, *args)).fetchall()
    return [str(row[0]) for row in rows]


def delete_node(db: apsw.Connection, user: User, journal: Journal, node_id: str,
                base_version: int, unchanged_since: int | None = None) -> Node:
    """Tombstone the node and, for a folder, everything live under it. Blocks stay until
    the grace period ends; `restore_node` undoes this until then. UNCHANGED_SINCE (a feed
    cursor): refuse (ConflictError) if anything live under the folder changed after it —
    the caller decided the delete on what it saw then, and an edit elsewhere beats it."""
    node = owned_node(db, user.id, node_id)
    if node.deleted:
        return node  # deleting twice is not a conflict
    _check_base(node, base_version)
    members = _subtree(db, node.id, "n.deleted_at IS NULL", ())
    if unchanged_since is not None:
        _check_unchanged_under(db, node, members, unchanged_since)
    now = time.time()
    for member in members:
        _unreference(db, member, now)
        db.execute("UPDATE nodes SET deleted_at = ?, deleted_root = ?, version = version + 1,"
                   " updated_at = ?, updated_by = ? WHERE id = ?",
                   (now, node.id, now, journal.device_id, member))
        deleted = find_node(db, member)
        assert deleted is not None
        journal.record(deleted, "deleted")
    result = find_node(db, node.id)
    assert result is not None
    return result


_IDS_PER_QUERY = 500


def _check_unchanged_under(db: apsw.Connection, node: Node, members: list[str],
                           cursor: int) -> None:
    others = [member for member in members if member != node.id]
    for start in range(0, len(others), _IDS_PER_QUERY):
        chunk = others[start:start + _IDS_PER_QUERY]
        row = db.execute(
            f"SELECT node_id FROM changes WHERE node_id IN ({','.join('?' * len(chunk))}) "
            "AND cursor > ? LIMIT 1", (*chunk, cursor)).fetchone()
        if row is not None:
            raise ConflictError(
                f"node {row[0]} in folder {node.id} changed after cursor {cursor}: the "
                "folder is kept; fetch the changes and decide again",
                current_version=node.version)


def restore_node(db: apsw.Connection, user: User, journal: Journal, node_id: str,
                 base_version: int) -> Node:
    """Bring back a deleted node (and what its deletion took along) while its blocks are
    still kept. Raises GoneError once garbage collection has reclaimed any of them."""
    node = owned_node(db, user.id, node_id)
    if not node.deleted:
        return node
    _check_base(node, base_version)
    if node.parent_id is not None:
        parent = find_node(db, node.parent_id)
        if parent is None or parent.deleted:
            raise ConflictError("its folder is deleted too; restore the folder first")
    elif root_node(db, user.id) is not None:
        raise ConflictError(f"user {user.name} already has another root folder")
    members = [str(row[0]) for row in db.execute(
        "SELECT id FROM nodes WHERE deleted_root = ?", (node.id,))]
    lost = db.execute(
        "SELECT count(*) FROM node_blocks nb LEFT JOIN blocks b ON b.block_id = nb.block_id "
        f"WHERE nb.node_id IN ({','.join('?' * len(members))}) AND b.block_id IS NULL",
        members).fetchone()
    if lost and lost[0]:
        raise GoneError(f"node {node_id} can no longer be restored: its data was reclaimed "
                        "after the grace period")
    now = time.time()
    for member in members:
        pending = _reference(db, member)
        db.execute("UPDATE nodes SET deleted_at = NULL, deleted_root = NULL, "
                   "version = version + 1, status = ?, updated_at = ?, updated_by = ? "
                   "WHERE id = ?", ("uploading" if pending else "uploaded", now,
                                    journal.device_id, member))
        restored = find_node(db, member)
        assert restored is not None
        journal.record(restored, "restored")
    result = find_node(db, node.id)
    assert result is not None
    return result
