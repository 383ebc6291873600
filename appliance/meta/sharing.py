"""Grants (the seed's SharedFiles): a node's key wrapped for another user's public key.
A grant on a folder lets the user read its whole subtree, read-only."""

from __future__ import annotations

import time

import apsw

from appliance.errors import BadRequestError, NotFoundError
from appliance.meta.accounts import user_by_name
from appliance.meta.journal import Journal
from appliance.meta.records import Grant, Node, User
from appliance.meta.tree import (
    NODE_COLUMNS,
    NODE_FROM,
    node_from_row,
    owned_node,
)
from protocol.limits import MAX_WRAPPED_KEY_BYTES

MAX_GRANTS_PER_REQUEST = 100


def share(db: apsw.Connection, owner: User, journal: Journal, node_id: str,
          grants: list[tuple[str, bytes]]) -> list[Grant]:
    node = owned_node(db, owner.id, node_id)
    if node.deleted:
        raise BadRequestError(f"node {node_id} is deleted")
    if not grants or len(grants) > MAX_GRANTS_PER_REQUEST:
        raise BadRequestError(f"share with 1-{MAX_GRANTS_PER_REQUEST} users at once")
    recipients = []
    for name, wrapped_key in grants:
        user = user_by_name(db, name)
        if user.id == owner.id:
            raise BadRequestError("you cannot share a node with yourself")
        if not wrapped_key or len(wrapped_key) > MAX_WRAPPED_KEY_BYTES:
            raise BadRequestError(f"the wrapped key for {name} must have "
                                  f"1-{MAX_WRAPPED_KEY_BYTES} bytes")
        recipients.append((user, wrapped_key))
    now = time.time()
    for user, wrapped_key in recipients:
        db.execute("INSERT INTO grants(user_id, node_id, wrapped_key, granted_at) "
                   "VALUES (?, ?, ?, ?) ON CONFLICT(user_id, node_id) DO UPDATE SET "
                   "wrapped_key = excluded.wrapped_key", (user.id, node.id, wrapped_key, now))
    journal.record(node, "shared")
    return grants_of(db, node.id)


def unshare(db: apsw.Connection, owner: User, journal: Journal, node_id: str,
            user_name: str) -> None:
    node = owned_node(db, owner.id, node_id)
    user = user_by_name(db, user_name)
    db.execute("DELETE FROM grants WHERE user_id = ? AND node_id = ?", (user.id, node.id))
    if not db.changes():
        raise NotFoundError(f"node {node_id} is not shared with {user_name}")
    journal.record(node, "unshared", also_tell=[user.id])


def grants_of(db: apsw.Connection, node_id: str) -> list[Grant]:
    rows = db.execute("SELECT u.name, g.node_id, g.wrapped_key, g.granted_at FROM grants g "
                      "JOIN users u ON u.id = g.user_id WHERE g.node_id = ? ORDER BY u.name",
                      (node_id,)).fetchall()
    return [Grant(*row) for row in rows]  # type: ignore[arg-type]


def shared_with(db: apsw.Connection, user_id: int) -> list[tuple[Node, Grant]]:
    """Every live node granted to the user, with the grant (its wrapped key)."""
    rows = db.execute(
        f"SELECT {NODE_COLUMNS}, gu.name, g.wrapped_key, g.granted_at {NODE_FROM} "
        "JOIN grants g ON g.node_id = n.id JOIN users gu ON gu.id = g.user_id "
        "WHERE g.user_id = ? AND n.deleted_at IS NULL ORDER BY g.granted_at",
        (user_id,)).fetchall()
    result = []
    for row in rows:
        node = node_from_row(row[:-3])
        result.append((node, Grant(str(row[-3]), node.id, bytes(row[-2]),  # type: ignore[arg-type]
                                   float(row[-1]))))  # type: ignore[arg-type]
    return result

