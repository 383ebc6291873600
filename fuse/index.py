"""The drive's persistent index: `HOME/drive/drive.db` (apsw, WAL, 0600).

Built the way the sync engine keeps its remote view: the same `SyncDb` tables, one folder
record for the whole tree (`<drive>`, the user's root), filled by the same `Mirror` (a
whole listing once, then the changes feed). On top of it one table of its own, `pending`:
every change made through the mount and not yet on the appliance, by node id — a new file
or folder (its id and key chosen here), a file whose content is in the staging area, a
rename, a chmod, a delete. The drive shows the mirror with the pending rows laid over it,
so a lookup, a listing or a stat is a few indexed queries and never a request, and a
change made offline is part of the tree at once and survives a restart (it is uploaded
when the appliance answers again).

Two nodes of one name in a folder (made on two devices at once) are shown the way the
sync engine names them: the oldest keeps the name, the others get a conflicted-copy name.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.crypto.nodes import NodeKind, NodeMeta, open_metadata
from agent.sync.names import unique_copy_name
from agent.sync.state import REMOTE_COLUMNS, FolderRecord, RemoteRow, SyncDb, remote_row_of

DRIVE_FOLDER = "<drive>"     # the folder record of the whole tree in drive.db
SHARED_RECORD = "<shared>"   # the folder record of what others shared (fuse/shared.py)
DB_FILE = "drive.db"

PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    node_id TEXT PRIMARY KEY, parent_id TEXT NOT NULL, name TEXT NOT NULL,
    kind TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    base_version INTEGER,              -- the appliance's version it changes; NULL: new here
    staged INTEGER NOT NULL,           -- 1: the content is in staging/<node_id>
    deleted INTEGER NOT NULL DEFAULT 0,
    key BLOB NOT NULL, created_at REAL NOT NULL, changed_at REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,   -- bumped by every change (uploads compare)
    seq INTEGER NOT NULL,              -- order of the changes, for the uploads
    state TEXT NOT NULL DEFAULT 'dirty', detail TEXT NOT NULL DEFAULT '',
    link TEXT);                        -- a symbolic link's target
CREATE INDEX IF NOT EXISTS pending_by_parent ON pending (parent_id, name);
CREATE INDEX IF NOT EXISTS pending_by_seq ON pending (seq);
CREATE INDEX IF NOT EXISTS pending_by_change ON pending (changed_at);
CREATE TABLE IF NOT EXISTS pins (node_id TEXT PRIMARY KEY);
"""

_ENTRY_COLUMNS = ("node_id, parent_id, name, kind, size, mtime_ns, mode, version, uploaded, "
                  "device, created_at, link")
# Named parameters: :drive and :shared (the two folder records), :device (this device's
# name, for pending rows), and :node, :parent, :name as a query needs.
_REMOTE_ENTRIES = (f"SELECT {_ENTRY_COLUMNS}, 0, 0, '', folder = :shared FROM remote r "
                   "WHERE folder IN (:drive, :shared) AND "
                   "NOT EXISTS (SELECT 1 FROM pending p WHERE p.node_id = r.node_id)")
_PENDING_ENTRIES = ("SELECT node_id, parent_id, name, kind, size, mtime_ns, mode, base_version, "
                    "1, :device, created_at, link, 1, staged, state, 0 FROM pending "
                    "WHERE NOT deleted")


@dataclass(frozen=True, slots=True)
class Entry:
    """A node as the drive shows it: the mirror's row, or the pending change over it."""

    node_id: str
    parent_id: str | None
    name: str
    kind: NodeKind
    size: int
    mtime_ns: int
    mode: int
    version: int | None       # the appliance's version (None: not on the appliance yet)
    uploaded: bool
    device: str
    created_at: float
    link: str | None          # a symbolic link's target
    local: bool               # a change made here, not uploaded yet
    staged: bool              # the content is in the staging area
    state: str                # the pending change's state ('' for a clean node)
    readonly: bool            # shared with the user by someone else

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


def _entry(row: tuple[Any, ...]) -> Entry:
    (node_id, parent_id, name, kind, size, mtime_ns, mode, version, uploaded, device,
     created_at, link, local, staged, state, readonly) = row
    return Entry(node_id, parent_id, name, kind, size, mtime_ns, mode, version,
                 bool(uploaded), device, created_at, link, bool(local), bool(staged), state,
                 bool(readonly))


@dataclass(frozen=True, slots=True)
class Pending:
    """One change made here and not yet on the appliance."""

    node_id: str
    parent_id: str
    name: str
    kind: NodeKind
    size: int
    mtime_ns: int
    mode: int
    base_version: int | None
    staged: bool
    deleted: bool
    key: bytes
    created_at: float
    changed_at: float
    generation: int
    seq: int
    state: str
    detail: str
    link: str | None = None


_PENDING_COLUMNS = ("node_id, parent_id, name, kind, size, mtime_ns, mode, base_version, "
                    "staged, deleted, key, created_at, changed_at, generation, seq, state, "
                    "detail, link")


def _pending(row: tuple[Any, ...]) -> Pending:
    values = list(row)
    values[8], values[9] = bool(values[8]), bool(values[9])
    return Pending(*values)


def layout(entries: list[Entry]) -> dict[str, Entry]:
    """A folder's entries by the name the drive shows: of two with one name, the oldest
    (creation time, then id: every device picks the same) keeps it, the others get a
    conflicted-copy name (pure)."""
    by_name: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_name[entry.name].append(entry)
    shown: dict[str, Entry] = {}
    taken = set(by_name)
    for name in sorted(by_name):
        group = sorted(by_name[name], key=lambda e: (e.created_at, e.node_id))
        shown[name] = group[0]
        for entry in group[1:]:
            copy = unique_copy_name(name, entry.device, entry.created_at, taken)
            taken.add(copy)
            shown[copy] = entry
    return shown


class DriveIndex:
    """drive.db: the mirror of the user's tree and the pending changes over it."""

    def __init__(self, path: Path, device_name: str) -> None:
        self.sync_db = SyncDb(path)
        self.db = self.sync_db.db
        self.db.execute(PENDING_SCHEMA)
        # The drive looks names up in folders of any size: by name, not by scanning.
        self.db.execute("CREATE INDEX IF NOT EXISTS remote_by_name "
                        "ON remote (folder, parent_id, name)")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(pending)")}
        if "link" not in columns:
            self.db.execute("ALTER TABLE pending ADD COLUMN link TEXT")
        self.device_name = device_name
        self._folders: tuple[int, int] | None = None

    def close(self) -> None:
        self.sync_db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.db:
            yield

    # --- the folder record -------------------------------------------------------------

    def folder(self) -> FolderRecord | None:
        return self.sync_db.folder(DRIVE_FOLDER)

    def start(self, root_id: str) -> FolderRecord:
        """The drive's folder record, made for the user's root on first use."""
        found = self.folder()
        if found is not None:
            return found
        return self.sync_db.add_folder(DRIVE_FOLDER, root_id, "/")

    def _params(self, **extra: object) -> dict[str, object]:
        if self._folders is None:
            drive = self.folder()
            assert drive is not None, "DriveIndex.start first"
            shared = self.sync_db.folder(SHARED_RECORD)
            self._folders = (drive.id, -1 if shared is None else shared.id)
        return {"drive": self._folders[0], "shared": self._folders[1],
                "device": self.device_name, **extra}

    def forget_folders(self) -> None:
        """A folder record was added: look the ids up again."""
        self._folders = None

    # --- what the drive shows ----------------------------------------------------------

    def entry(self, node_id: str) -> Entry | None:
        params = self._params(node=node_id)
        row = self.db.execute(f"{_PENDING_ENTRIES} AND node_id = :node", params).fetchone()
        if row is not None:
            return _entry(row)
        if self.db.execute("SELECT 1 FROM pending WHERE node_id = ?", (node_id,)).fetchone():
            return None                       # deleted here
        row = self.db.execute(f"{_REMOTE_ENTRIES} AND node_id = :node", params).fetchone()
        return None if row is None else _entry(row)

    def children(self, parent_id: str) -> dict[str, Entry]:
        """The folder's entries by the name shown."""
        rows = self.db.execute(
            f"{_REMOTE_ENTRIES} AND parent_id = :parent UNION ALL "
            f"{_PENDING_ENTRIES} AND parent_id = :parent", self._params(parent=parent_id))
        return layout([_entry(row) for row in rows])

    def lookup(self, parent_id: str, name: str) -> Entry | None:
        rows = self.db.execute(
            f"{_REMOTE_ENTRIES} AND parent_id = :parent AND name = :name UNION ALL "
            f"{_PENDING_ENTRIES} AND parent_id = :parent AND name = :name",
            self._params(parent=parent_id, name=name)).fetchall()
        if len(rows) == 1:
            return _entry(rows[0])
        if rows:
            return min(map(_entry, rows), key=lambda e: (e.created_at, e.node_id))
        if "(conflicted copy from " in name:
            return self.children(parent_id).get(name)
        return None

    def has_children(self, parent_id: str) -> bool:
        return self.db.execute(
            f"SELECT 1 FROM ({_REMOTE_ENTRIES} AND parent_id = :parent UNION ALL "
            f"{_PENDING_ENTRIES} AND parent_id = :parent) LIMIT 1",
            self._params(parent=parent_id)).fetchone() is not None

    def remote_row(self, node_id: str) -> RemoteRow | None:
        """The mirrored node (the user's, or one shared with them)."""
        params = self._params(node=node_id)
        row = self.db.execute(f"SELECT {REMOTE_COLUMNS} FROM remote WHERE node_id = :node "
                              "AND folder IN (:drive, :shared)", params).fetchone()
        return None if row is None else remote_row_of(row)

    def remote_meta(self, node_id: str) -> tuple[bytes, NodeMeta] | None:
        """The mirrored node's key and decrypted metadata (its block list)."""
        row = self.remote_row(node_id)
        if row is None:
            return None
        return row.key, open_metadata(row.key, row.node_id, row.kind, row.meta)

    def key_of(self, node_id: str) -> bytes | None:
        found = self.db.execute("SELECT key FROM pending WHERE node_id = ?",
                                (node_id,)).fetchone()
        if found is not None:
            return bytes(found[0])
        row = self.remote_row(node_id)
        return None if row is None else row.key

    # --- pending changes ---------------------------------------------------------------

    def pending(self, node_id: str) -> Pending | None:
        row = self.db.execute(f"SELECT {_PENDING_COLUMNS} FROM pending WHERE node_id = ?",
                              (node_id,)).fetchone()
        return None if row is None else _pending(row)

    def all_pending(self) -> list[Pending]:
        return [_pending(row) for row in self.db.execute(
            f"SELECT {_PENDING_COLUMNS} FROM pending ORDER BY seq")]

    def changed_before(self, cutoff: float) -> list[Pending]:
        """The pending changes last changed at CUTOFF or before, in the order made."""
        return [_pending(row) for row in self.db.execute(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE changed_at <= ? ORDER BY seq",
            (cutoff,))]

    def first_change_after(self, cutoff: float) -> float | None:
        """When the earliest change after CUTOFF was made (None if there is none)."""
        found = self._one("SELECT MIN(changed_at) FROM pending WHERE changed_at > ?", cutoff)
        return None if found is None else float(found)

    def pending_summary(self, names: int) -> tuple[int, int, list[str]]:
        """How many changes are pending, how many of them in conflict, and the names of
        the first NAMES in order (for the status file, written every second)."""
        count = self._one("SELECT COUNT(*) FROM pending")
        conflicts = self._one("SELECT COUNT(*) FROM pending WHERE state = 'conflict'")
        first = [row[0] for row in self.db.execute(
            "SELECT name FROM pending ORDER BY seq LIMIT ?", (names,))]
        return int(count), int(conflicts), first

    def pending_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM pending"))

    def put_pending(self, change: Pending) -> Pending:
        """Record CHANGE (a new row, or one replacing the node's row): a new sequence
        number and generation, changed now."""
        seq = int(self._one("SELECT COALESCE(MAX(seq), 0) + 1 FROM pending"))  # indexed
        generation = int(self._one("SELECT COALESCE(MAX(generation), 0) + 1 FROM pending "
                                   "WHERE node_id = ?", change.node_id))
        row = Pending(change.node_id, change.parent_id, change.name, change.kind, change.size,
                      change.mtime_ns, change.mode, change.base_version, change.staged,
                      change.deleted, change.key, change.created_at, time.time(), generation,
                      seq, "dirty", "", change.link)
        self.db.execute(f"INSERT OR REPLACE INTO pending ({_PENDING_COLUMNS}) VALUES "
                        f"({', '.join('?' * 18)})",
                        (row.node_id, row.parent_id, row.name, row.kind, row.size,
                         row.mtime_ns, row.mode, row.base_version, int(row.staged),
                         int(row.deleted), row.key, row.created_at, row.changed_at,
                         row.generation, row.seq, row.state, row.detail, row.link))
        return row

    def _one(self, query: str, *params: object) -> Any:
        row = self.db.execute(query, params).fetchone()
        assert row is not None, query
        return row[0]

    def set_state(self, node_id: str, state: str, detail: str = "") -> None:
        self.db.execute("UPDATE pending SET state = ?, detail = ? WHERE node_id = ?",
                        (state, detail, node_id))

    def rebase(self, node_id: str, version: int | None) -> None:
        """The node is on the appliance at VERSION now (a newer change is still pending)."""
        self.db.execute("UPDATE pending SET base_version = ? WHERE node_id = ?",
                        (version, node_id))

    def set_size(self, node_id: str, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE pending SET size = ?, mtime_ns = ? WHERE node_id = ?",
                        (size, mtime_ns, node_id))

    def drop_pending(self, node_id: str, generation: int | None = None) -> bool:
        """Forget the node's pending change (only if it is still GENERATION, when given);
        whether it was dropped."""
        if generation is None:
            self.db.execute("DELETE FROM pending WHERE node_id = ?", (node_id,))
        else:
            self.db.execute("DELETE FROM pending WHERE node_id = ? AND generation = ?",
                            (node_id, generation))
        return self.db.changes() > 0

    def staged_ids(self) -> list[str]:
        return [row[0] for row in self.db.execute(
            "SELECT node_id FROM pending WHERE staged AND NOT deleted")]

    # --- pins ----------------------------------------------------------------------------

    def pinned(self, node_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM pins WHERE node_id = ?",
                               (node_id,)).fetchone() is not None

    def set_pinned(self, node_id: str, pinned: bool) -> None:
        if pinned:
            self.db.execute("INSERT OR IGNORE INTO pins (node_id) VALUES (?)", (node_id,))
        else:
            self.db.execute("DELETE FROM pins WHERE node_id = ?", (node_id,))

    def pinned_ids(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT node_id FROM pins")]
