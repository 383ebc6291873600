"""The agent's sync database (apsw, WAL): per synced folder, the three trees and its status.

`HOME/sync.db`, 0600 — it holds names and node keys (the remote tree is kept decrypted so
the planner and a restarted agent need no round trips), so it is as private as `keys`.

Tables, each keyed by the folder's row id:
- folders: local DIR, remote folder id, changes-feed cursor and the appliance's epoch it
           belongs to, status for `cairn status`;
- remote:  the mirror of the appliance's nodes under the remote folder (the root included);
- base:    the merge base, one row per synced node;
- local:   the last scan's content ids, by path and stat (a cache: unchanged files are not
           hashed again);
- peer_blocks: block id -> (folder, node, version, index in its block table), for every
           file of the remote mirror, kept in the same transaction as its remote row when
           the database is opened with `block_index` (`of_home`: `cairn sync`). The LAN
           peer service (agent/peers/sources.py) finds there which synced file lists a
           block a peer asks for. A row is only a hint: what is served is checked against
           the remote row, the base and the file itself, so a stale or missing row costs a
           miss, never a wrong byte.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import apsw

from agent.crypto.nodes import open_metadata
from agent.errors import IntegrityError, LocalFileError
from agent.sync.model import BaseEntry, Kind, Stat, is_within, link_content_id

DB_FILE = "sync.db"
LINK_CONTENT_VERSION = 1    # PRAGMA user_version from which a link row's content is its own
PEER_BLOCKS_VERSION = 2     # ... from which peer_blocks covers every remote row

SCHEMA = """
CREATE TABLE IF NOT EXISTS folders (
    id INTEGER PRIMARY KEY, local_dir TEXT NOT NULL UNIQUE, remote_root TEXT NOT NULL,
    remote_path TEXT NOT NULL, cursor INTEGER NOT NULL DEFAULT 0,
    listed INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'starting',
    detail TEXT NOT NULL DEFAULT '', pending INTEGER NOT NULL DEFAULT 0,
    conflicts INTEGER NOT NULL DEFAULT 0, pid INTEGER, updated_at REAL, epoch TEXT);
CREATE TABLE IF NOT EXISTS remote (
    folder INTEGER NOT NULL, node_id TEXT NOT NULL, parent_id TEXT, name TEXT NOT NULL,
    kind TEXT NOT NULL, version INTEGER NOT NULL, uploaded INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, mode INTEGER NOT NULL,
    content TEXT NOT NULL, device TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, key BLOB NOT NULL, meta BLOB NOT NULL, link TEXT,
    PRIMARY KEY (folder, node_id));
CREATE INDEX IF NOT EXISTS remote_by_parent ON remote (folder, parent_id);
CREATE TABLE IF NOT EXISTS base (
    folder INTEGER NOT NULL, node_id TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
    version INTEGER NOT NULL, content TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
    mode INTEGER, inode INTEGER, PRIMARY KEY (folder, node_id));
CREATE INDEX IF NOT EXISTS base_by_path ON base (folder, path);
CREATE TABLE IF NOT EXISTS local (
    folder INTEGER NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, mode INTEGER NOT NULL, inode INTEGER NOT NULL,
    content TEXT NOT NULL, PRIMARY KEY (folder, path));
CREATE TABLE IF NOT EXISTS peer_blocks (
    block_id BLOB NOT NULL, folder INTEGER NOT NULL, node_id TEXT NOT NULL,
    version INTEGER NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY (block_id, folder, node_id, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS peer_blocks_by_node ON peer_blocks (folder, node_id);
"""


@dataclass(frozen=True)
class FolderRecord:
    id: int
    local_dir: str
    remote_root: str
    remote_path: str
    cursor: int
    listed: bool
    state: str
    detail: str
    pending: int
    conflicts: int
    pid: int | None
    updated_at: float | None
    epoch: str | None = None    # the appliance's epoch the base was synced against (None:
                                # not known yet; see agent/sync/rollback.py)


@dataclass(frozen=True)
class RemoteRow:
    node_id: str
    parent_id: str | None
    name: str
    kind: Kind
    version: int
    uploaded: bool
    size: int
    mtime_ns: int
    mode: int
    content: str
    device: str
    created_at: float
    updated_at: float
    key: bytes
    meta: bytes      # the sealed metadata as the appliance serves it (opened with key)
    link: str | None = None     # a symbolic link's target (the node is a "file")


REMOTE_COLUMNS = ("node_id, parent_id, name, kind, version, uploaded, size, mtime_ns, mode, "
                  "content, device, created_at, updated_at, key, meta, link")


def remote_row_of(row: tuple[Any, ...]) -> RemoteRow:
    values = list(row)
    values[5] = bool(values[5])
    return RemoteRow(*values)


def _base_row(row: tuple[Any, ...]) -> BaseEntry:
    node_id, path, kind, version, content, size, mtime_ns, mode, inode = row
    stat = None if size is None else Stat(size, mtime_ns, mode, inode)
    # Interned: the same path and content id are held by the local tree and the remote
    # view too (one string each instead of three, at 100,000 files).
    return BaseEntry(sys.intern(node_id), sys.intern(path), kind, version, sys.intern(content),
                     stat)


_UNDER = "(path = ? OR (path >= ? AND path < ?))"
"""A path and everything under it ('/' + 1 is '0'), by a range the path index serves."""


class _Base:
    """One folder's base in memory: by node id, by path, and the paths changed since the
    engine last asked (the next plan looks at those)."""

    def __init__(self, entries: dict[str, BaseEntry]) -> None:
        self.entries = entries
        self.at: dict[str, tuple[str, ...]] = {}    # a tuple: a set costs 4x the memory
        for entry in entries.values():
            self._index(entry)
        self.touched: set[str] = set()

    def _index(self, entry: BaseEntry) -> None:
        self.at[entry.path] = (*self.at.get(entry.path, ()), entry.node_id)

    def put(self, entry: BaseEntry, keep_others: bool = False) -> None:
        """As put_base: other nodes at the path are forgotten (unless KEEP_OTHERS)."""
        if not keep_others:
            for other in list(self.at.get(entry.path, ())):
                if other != entry.node_id:
                    self.remove(other)
        self.remove(entry.node_id)
        self.entries[entry.node_id] = entry
        self._index(entry)
        self.touched.add(entry.path)

    def remove(self, node_id: str) -> None:
        entry = self.entries.pop(node_id, None)
        if entry is None:
            return
        ids = tuple(i for i in self.at[entry.path] if i != node_id)
        if ids:
            self.at[entry.path] = ids
        else:
            del self.at[entry.path]
        self.touched.add(entry.path)

    def under(self, path: str) -> list[str]:
        """The node ids at PATH or under it; a whole pass only for a folder (or a path the
        base does not know)."""
        here = self.at.get(path, ())
        if here and all(self.entries[i].kind == "file" for i in here):
            return list(here)
        prefix = path + "/"
        return list(here) + [e.node_id for e in self.entries.values()
                             if e.path.startswith(prefix)]


class SyncDb:
    def __init__(self, path: Path, *, block_index: bool = False) -> None:
        try:
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
            self.db = apsw.Connection(str(path))
        except (OSError, apsw.Error) as exc:
            raise LocalFileError(f"cannot open the sync database {path}: {exc}") from None
        self.db.setbusytimeout(5000)
        # Writes bump these, so whole-tree reads are served from memory until something
        # changed (a round reads both trees in every phase).
        self.remote_revision = 0
        self.base_revision = 0
        self._bases: dict[int, _Base] = {}      # folder -> its base in memory, once read
        self.db.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        self.db.execute(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(remote)")}
        if "link" not in columns:           # a database from before links were carried
            self.db.execute("ALTER TABLE remote ADD COLUMN link TEXT")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(folders)")}
        if "epoch" not in columns:          # ... or before the appliance had epochs
            self.db.execute("ALTER TABLE folders ADD COLUMN epoch TEXT")
        (user_version,) = self.db.execute("PRAGMA user_version").fetchone() or (0,)
        if user_version < LINK_CONTENT_VERSION:
            self._link_contents()
        self.block_index = block_index
        if block_index and user_version < PEER_BLOCKS_VERSION:
            self._index_all_blocks()

    def _link_contents(self) -> None:
        """Rows of links mirrored before links were synced hold an empty file's content
        id; a link's is made from its target (model.link_content_id)."""
        with self.transaction():
            for folder, node_id, link in list(self.db.execute(
                    "SELECT folder, node_id, link FROM remote WHERE link IS NOT NULL")):
                self.db.execute("UPDATE remote SET content = ? WHERE folder = ? AND "
                                "node_id = ?", (link_content_id(link), folder, node_id))
            self.db.execute(f"PRAGMA user_version = {LINK_CONTENT_VERSION}")

    def _index_all_blocks(self) -> None:
        """peer_blocks for a database written before it existed (or without it)."""
        with self.transaction():
            self.db.execute("DELETE FROM peer_blocks")
            for folder, *values in list(self.db.execute(
                    f"SELECT folder, {REMOTE_COLUMNS} FROM remote WHERE kind = 'file'")):
                self._index_blocks(folder, remote_row_of(tuple(values)))
            self.db.execute(f"PRAGMA user_version = {PEER_BLOCKS_VERSION}")

    @classmethod
    def of_home(cls, home: Path) -> SyncDb:
        """HOME's sync.db, with the peer block index kept (see the module)."""
        return cls(home / DB_FILE, block_index=True)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.db:
            yield

    # --- folders -----------------------------------------------------------------------

    def folder(self, local_dir: str) -> FolderRecord | None:
        row = self.db.execute("SELECT * FROM folders WHERE local_dir = ?",
                              (local_dir,)).fetchone()
        return None if row is None else FolderRecord(*row)

    def folders(self) -> list[FolderRecord]:
        return [FolderRecord(*row) for row in
                self.db.execute("SELECT * FROM folders ORDER BY local_dir")]

    def add_folder(self, local_dir: str, remote_root: str, remote_path: str) -> FolderRecord:
        self.db.execute("INSERT INTO folders (local_dir, remote_root, remote_path) "
                        "VALUES (?, ?, ?)", (local_dir, remote_root, remote_path))
        found = self.folder(local_dir)
        assert found is not None
        return found

    def set_cursor(self, folder: int, cursor: int, listed: bool = True) -> None:
        self.db.execute("UPDATE folders SET cursor = ?, listed = ? WHERE id = ?",
                        (cursor, int(listed), folder))

    def set_epoch(self, folder: int, epoch: str) -> None:
        self.db.execute("UPDATE folders SET epoch = ? WHERE id = ?", (epoch, folder))

    def set_status(self, folder: int, state: str, detail: str = "", pending: int = 0,
                   conflicts: int = 0) -> None:
        self.db.execute("UPDATE folders SET state = ?, detail = ?, pending = ?, "
                        "conflicts = ?, pid = ?, updated_at = ? WHERE id = ?",
                        (state, detail, pending, conflicts, os.getpid(), time.time(), folder))

    # --- the remote mirror --------------------------------------------------------------

    def remote_rows(self, folder: int) -> list[RemoteRow]:
        return [remote_row_of(row) for row in self.db.execute(
            f"SELECT {REMOTE_COLUMNS} FROM remote WHERE folder = ?", (folder,))]

    def remote_row(self, folder: int, node_id: str) -> RemoteRow | None:
        row = self.db.execute(f"SELECT {REMOTE_COLUMNS} FROM remote WHERE folder = ? AND "
                              "node_id = ?", (folder, node_id)).fetchone()
        return None if row is None else remote_row_of(row)

    def put_remote(self, folder: int, row: RemoteRow) -> None:
        if self.remote_row(folder, row.node_id) == row:
            return                    # our own write coming back through the feed
        self.remote_revision += 1
        self.db.execute(f"INSERT OR REPLACE INTO remote (folder, {REMOTE_COLUMNS}) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (folder, row.node_id, row.parent_id, row.name, row.kind, row.version,
                         int(row.uploaded), row.size, row.mtime_ns, row.mode, row.content,
                         row.device, row.created_at, row.updated_at, row.key, row.meta,
                         row.link))
        if self.block_index:
            self._index_blocks(folder, row)

    def _index_blocks(self, folder: int, row: RemoteRow) -> None:
        """ROW's blocks in peer_blocks (its older version's rows replaced)."""
        self.db.execute("DELETE FROM peer_blocks WHERE folder = ? AND node_id = ?",
                        (folder, row.node_id))
        if row.kind != "file" or row.link is not None or row.size == 0:
            return
        try:
            blocks = open_metadata(row.key, row.node_id, row.kind, row.meta).blocks
        except (IntegrityError, ValueError):
            return      # the mirror opened it before; a row that does not open serves nothing
        self.db.executemany(
            "INSERT OR IGNORE INTO peer_blocks (block_id, folder, node_id, version, idx) "
            "VALUES (?, ?, ?, ?, ?)",
            [(ref.block_id, folder, row.node_id, row.version, index)
             for index, ref in enumerate(blocks)])

    def drop_remote_subtree(self, folder: int, node_id: str) -> None:
        self.remote_revision += 1
        self.db.execute(
            "WITH RECURSIVE down(id) AS (SELECT ? UNION ALL SELECT r.node_id FROM remote r "
            "JOIN down ON r.parent_id = down.id WHERE r.folder = ?) "
            "DELETE FROM peer_blocks WHERE folder = ? AND node_id IN (SELECT id FROM down)",
            (node_id, folder, folder))
        self.db.execute(
            "WITH RECURSIVE down(id) AS (SELECT ? UNION ALL SELECT r.node_id FROM remote r "
            "JOIN down ON r.parent_id = down.id WHERE r.folder = ?) "
            "DELETE FROM remote WHERE folder = ? AND node_id IN (SELECT id FROM down)",
            (node_id, folder, folder))

    def clear_remote(self, folder: int) -> None:
        self.remote_revision += 1
        self.db.execute("DELETE FROM remote WHERE folder = ?", (folder,))
        self.db.execute("DELETE FROM peer_blocks WHERE folder = ?", (folder,))

    # --- the base -----------------------------------------------------------------------

    def base_entries(self, folder: int) -> dict[str, BaseEntry]:
        """The base by node id (kept in memory and updated in place: do not modify)."""
        return self._base(folder).entries

    def base_paths(self, folder: int) -> dict[str, tuple[str, ...]]:
        """path -> the node ids the base has there (do not modify)."""
        return self._base(folder).at

    def take_base_touched(self, folder: int) -> set[str]:
        """The paths whose base entries changed since the last call (for the next plan)."""
        base = self._base(folder)
        touched, base.touched = base.touched, set()
        return touched

    def _base(self, folder: int) -> _Base:
        if folder not in self._bases:
            self._bases[folder] = _Base(self._read_base(folder))
        return self._bases[folder]

    def _read_base(self, folder: int) -> dict[str, BaseEntry]:
        return {entry.node_id: entry for entry in (_base_row(row) for row in self.db.execute(
            "SELECT node_id, path, kind, version, content, size, mtime_ns, mode, inode "
            "FROM base WHERE folder = ?", (folder,)))}

    def base_at(self, folder: int, path: str) -> BaseEntry | None:
        if folder in self._bases:
            base = self._bases[folder]
            ids = base.at.get(path)
            return base.entries[min(ids)] if ids else None
        row = self.db.execute("SELECT node_id, path, kind, version, content, size, mtime_ns,"
                              " mode, inode FROM base WHERE folder = ? AND path = ?",
                              (folder, path)).fetchone()
        return None if row is None else _base_row(row)

    def base_of(self, folder: int, node_id: str) -> BaseEntry | None:
        if folder in self._bases:
            return self._bases[folder].entries.get(node_id)
        row = self.db.execute("SELECT node_id, path, kind, version, content, size, mtime_ns,"
                              " mode, inode FROM base WHERE folder = ? AND node_id = ?",
                              (folder, node_id)).fetchone()
        return None if row is None else _base_row(row)

    def put_base(self, folder: int, entry: BaseEntry) -> None:
        self.base_revision += 1
        stat = entry.stat
        self.db.execute("DELETE FROM base WHERE folder = ? AND path = ? AND node_id != ?",
                        (folder, entry.path, entry.node_id))
        self.db.execute(
            "INSERT OR REPLACE INTO base (folder, node_id, path, kind, version, content, size,"
            " mtime_ns, mode, inode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (folder, entry.node_id, entry.path, entry.kind, entry.version, entry.content,
             None if stat is None else stat.size, None if stat is None else stat.mtime_ns,
             None if stat is None else stat.mode, None if stat is None else stat.inode))
        if folder in self._bases:
            self._bases[folder].put(entry)

    def replace_base(self, folder: int, entries: Iterable[BaseEntry],
                     forget: Iterable[str] = ()) -> None:
        """Write ENTRIES (each replacing its node's entry) and drop the nodes FORGET, as
        one change of many entries: none drops another that shares its path meanwhile
        (a re-based folder's entries move all at once; agent/sync/rollback.py)."""
        self.base_revision += 1
        entries = list(entries)
        gone = [*forget, *(entry.node_id for entry in entries)]
        self.db.executemany("DELETE FROM base WHERE folder = ? AND node_id = ?",
                            [(folder, node_id) for node_id in gone])
        self.db.executemany(
            "INSERT INTO base (folder, node_id, path, kind, version, content, size, mtime_ns,"
            " mode, inode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(folder, e.node_id, e.path, e.kind, e.version, e.content,
              *((None,) * 4 if e.stat is None else
                (e.stat.size, e.stat.mtime_ns, e.stat.mode, e.stat.inode)))
             for e in entries])
        if folder in self._bases:
            base = self._bases[folder]
            for node_id in gone:
                base.remove(node_id)
            for entry in entries:
                base.put(entry, keep_others=True)

    def forget_base(self, folder: int, node_id: str) -> None:
        self.base_revision += 1
        self.db.execute("DELETE FROM base WHERE folder = ? AND node_id = ?", (folder, node_id))
        if folder in self._bases:
            self._bases[folder].remove(node_id)

    def forget_base_under(self, folder: int, path: str) -> None:
        self.base_revision += 1
        self.db.execute(f"DELETE FROM base WHERE folder = ? AND {_UNDER}",
                        (folder, path, path + "/", path + "0"))
        if folder in self._bases:
            base = self._bases[folder]
            for node_id in base.under(path):
                base.remove(node_id)

    def move_base(self, folder: int, old: str, new: str) -> None:
        """Re-path a moved node and everything under it."""
        self.base_revision += 1
        rows = self.db.execute(f"SELECT node_id, path FROM base WHERE folder = ? AND {_UNDER}",
                               (folder, old, old + "/", old + "0")).fetchall()
        base = self._bases.get(folder)
        for node_id, path in rows:
            assert is_within(str(path), old)
            self.db.execute("UPDATE base SET path = ? WHERE folder = ? AND node_id = ?",
                            (new + str(path)[len(old):], folder, node_id))
            if base is not None and node_id in base.entries:
                entry = base.entries[node_id]
                base.put(replace(entry, path=new + entry.path[len(old):]), keep_others=True)

    # --- the local content cache --------------------------------------------------------

    def cached_contents(self, folder: int) -> dict[str, tuple[Stat, str]]:
        return {sys.intern(path): (Stat(size, mtime_ns, mode, inode), sys.intern(content))
                for path, size, mtime_ns, mode, inode, content in self.db.execute(
                    "SELECT path, size, mtime_ns, mode, inode, content FROM local "
                    "WHERE folder = ?", (folder,))}

    def cached_content(self, folder: int, path: str) -> tuple[Stat, str] | None:
        row = self.db.execute("SELECT size, mtime_ns, mode, inode, content FROM local WHERE "
                              "folder = ? AND path = ?", (folder, path)).fetchone()
        return None if row is None else (Stat(*row[:4]), str(row[4]))

    def cache_content(self, folder: int, path: str, stat: Stat, content: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO local (folder, path, size, mtime_ns, mode, "
                        "inode, content) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (folder, path, stat.size, stat.mtime_ns, stat.mode, stat.inode,
                         content))

    def prune_cache(self, folder: int, keep: set[str]) -> None:
        for (path,) in self.db.execute("SELECT path FROM local WHERE folder = ?",
                                       (folder,)).fetchall():
            if path not in keep:
                self.db.execute("DELETE FROM local WHERE folder = ? AND path = ?",
                                (folder, path))
