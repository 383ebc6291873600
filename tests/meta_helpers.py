"""Builders for unit tests of appliance.meta: an in-memory SQLite database (apsw) with the
appliance's migrations applied, and terse ways to make users, devices, nodes and blocks.

The functions under test run inside the caller's transaction; these tests call them on an
autocommit connection, which is each statement its own transaction — what matters here is
what the functions write and refuse, not how requests are serialised (appliance.meta.database
and the API tests cover that).
"""

from __future__ import annotations

import os

import apsw
import blake3

from appliance.db import MIGRATIONS, migrate, schema_version
from appliance.meta import accounts, tree
from appliance.meta.journal import Journal
from appliance.meta.records import BlockRef, Node, NodeKind, User
from appliance.meta.tree import NodeContent


def memory_db() -> apsw.Connection:
    """A fresh in-memory database at the current schema (foreign keys on, as served)."""
    db = apsw.Connection(":memory:")
    db.execute("PRAGMA foreign_keys=ON")
    migrate(db)
    assert schema_version(db) == len(MIGRATIONS)
    return db


def new_user(db: apsw.Connection, name: str) -> User:
    return accounts.add_user(db, name)


def journal(db: apsw.Connection, device_id: str | None = "dev_test") -> Journal:
    return Journal(db, device_id)


def new_id() -> str:
    return os.urandom(16).hex()


def block_ref(data: bytes) -> BlockRef:
    return BlockRef(blake3.blake3(data).hexdigest(), len(data))


def content(*blocks: BlockRef, metadata: bytes = b"sealed-meta", key: bytes = b"wrapped"
            ) -> NodeContent:
    return NodeContent(metadata=metadata, wrapped_key=key,
                       size=sum(b.size for b in blocks), blocks=tuple(blocks))


def mkroot(db: apsw.Connection, user: User) -> Node:
    node, created = tree.create_node(db, user, journal(db), kind="dir", parent_id=None,
                                     content=content(), node_id=new_id())
    assert created
    return node


def mkdir(db: apsw.Connection, user: User, parent: Node | str) -> Node:
    parent_id = parent if isinstance(parent, str) else parent.id
    node, _ = tree.create_node(db, user, journal(db), kind="dir", parent_id=parent_id,
                               content=content(), node_id=new_id())
    return node


def mkfile(db: apsw.Connection, user: User, parent: Node | str, *blocks: BlockRef,
           kind: NodeKind = "file") -> Node:
    parent_id = parent if isinstance(parent, str) else parent.id
    node, _ = tree.create_node(db, user, journal(db), kind=kind, parent_id=parent_id,
                               content=content(*blocks), node_id=new_id())
    return node


def store(db: apsw.Connection, *blocks: BlockRef) -> list[Node]:
    """Mark each block stored, as the block PUT route does; the nodes that completed."""
    completed: list[Node] = []
    for block in blocks:
        completed += tree.mark_block_stored(db, block.block_id, block.size, journal(db))
    return completed


def block_row(db: apsw.Connection, block_id: str) -> tuple[int, int, float | None] | None:
    """(stored, refs, unreferenced_since) of a block, or None without a row."""
    row = db.execute("SELECT stored, refs, unreferenced_since FROM blocks WHERE block_id = ?",
                     (block_id,)).fetchone()
    return None if row is None else (int(row[0]), int(row[1]), row[2])


def node_of(db: apsw.Connection, node_id: str) -> Node:
    node = tree.find_node(db, node_id)
    assert node is not None, node_id
    return node
