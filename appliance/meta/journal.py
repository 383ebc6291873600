"""The change journal: one row per change to a node, with a global, monotonically increasing
cursor, fanned out at write time to every user who can see the node (`feed`), so a user's
feed is read by index range and costs what it returns, not the size of the tree."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import apsw

from appliance.meta.records import Change, Node


def _change(row: Any) -> Change:
    return Change(*row)


_CHANGE_COLUMNS = "c.cursor, c.node_id, c.version, c.kind, c.at, c.device_id"


def audience(db: apsw.Connection, node_id: str, owner_id: int) -> set[int]:
    """The owner and everyone holding a grant on the node or one of its ancestors."""
    rows = db.execute(
        "WITH RECURSIVE up(id, parent_id) AS ("
        "  SELECT id, parent_id FROM nodes WHERE id = ?"
        "  UNION ALL SELECT n.id, n.parent_id FROM nodes n JOIN up ON n.id = up.parent_id)"
        "SELECT DISTINCT g.user_id FROM up JOIN grants g ON g.node_id = up.id",
        (node_id,)).fetchall()
    return {owner_id, *(int(row[0]) for row in rows)}  # type: ignore[arg-type]


@dataclass
class Journal:
    """Records changes inside the caller's transaction and remembers, for after the commit,
    which users should be told about which cursor (see appliance.api.notify)."""

    db: apsw.Connection
    device_id: str | None
    published: dict[int, int] = field(default_factory=dict)  # user id -> newest cursor

    def record(self, node: Node, kind: str, also_tell: Iterable[int] = ()) -> int:
        self.db.execute(
            "INSERT INTO changes(node_id, version, kind, at, device_id) VALUES (?, ?, ?, ?, ?)",
            (node.id, node.version, kind, time.time(), self.device_id))
        cursor = int(self.db.last_insert_rowid())
        users = audience(self.db, node.id, node.owner_id) | set(also_tell)
        self.db.executemany("INSERT INTO feed(user_id, cursor) VALUES (?, ?)",
                            [(user, cursor) for user in users])
        for user in users:
            self.published[user] = cursor
        return cursor


def feed_page(db: apsw.Connection, user_id: int, after: int, limit: int) -> list[Change]:
    rows = db.execute(
        f"SELECT {_CHANGE_COLUMNS} FROM feed f JOIN changes c ON c.cursor = f.cursor "
        "WHERE f.user_id = ? AND f.cursor > ? ORDER BY f.cursor LIMIT ?",
        (user_id, after, limit)).fetchall()
    return [_change(row) for row in rows]


def added_since(db: apsw.Connection, user_id: int, cursor: int) -> int:
    """How many changes the user's feed holds after CURSOR."""
    row = db.execute("SELECT count(*) FROM feed WHERE user_id = ? AND cursor > ?",
                     (user_id, cursor)).fetchone()
    return int(row[0]) if row else 0


def latest_cursor(db: apsw.Connection, user_id: int) -> int:
    row = db.execute("SELECT max(cursor) FROM feed WHERE user_id = ?", (user_id,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def node_history(db: apsw.Connection, node_id: str, since_version: int,
                 limit: int) -> list[Change]:
    rows = db.execute(
        f"SELECT {_CHANGE_COLUMNS} FROM changes c WHERE c.node_id = ? AND c.version > ? "
        "ORDER BY c.cursor LIMIT ?", (node_id, since_version, limit)).fetchall()
    return [_change(row) for row in rows]
