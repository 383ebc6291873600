"""A durable queue of blocks that need repair, and the tombstones of deleted blocks.

Kept in the appliance database so that a block noticed as degraded by a read, a write or a
scrub is repaired even if the appliance restarts first. Thread-safe: one apsw connection
used under a lock (apsw itself serialises, the lock keeps transactions whole).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import apsw

from appliance.db import open_database


class RepairQueue:
    def __init__(self, database_path: Path) -> None:
        self._path = database_path
        self._connection = open_database(database_path)
        self._lock = threading.Lock()
        # Every put asks whether its block is tombstoned; one read connection per thread
        # keeps that lookup off the shared connection's lock (16 writers queued on it).
        self._local = threading.local()
        self._readers: list[apsw.Connection] = []

    def _reader(self) -> apsw.Connection:
        reader: apsw.Connection | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = apsw.Connection(str(self._path), flags=apsw.SQLITE_OPEN_READONLY)
            reader.setbusytimeout(10_000)
            self._local.reader = reader
            with self._lock:
                self._readers.append(reader)
        return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._connection.close()

    def enqueue(self, block_id: str, reason: str) -> None:
        with self._lock, self._connection:
            self._connection.execute(
                "INSERT INTO repair_queue(block_id, reason, queued_at) VALUES (?, ?, ?) "
                "ON CONFLICT(block_id) DO UPDATE SET reason = excluded.reason",
                (block_id, reason, time.time()))

    def pending(self, limit: int = 100) -> list[str]:
        """Oldest first; blocks that failed many attempts sink to the back."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT block_id FROM repair_queue ORDER BY attempts, queued_at LIMIT ?",
                (limit,)).fetchall()
        return [str(row[0]) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            row = self._connection.execute("SELECT count(*) FROM repair_queue").fetchone()
        return int(row[0]) if row else 0

    def done(self, block_id: str) -> None:
        with self._lock, self._connection:
            self._connection.execute("DELETE FROM repair_queue WHERE block_id = ?", (block_id,))

    def failed(self, block_id: str) -> None:
        with self._lock, self._connection:
            self._connection.execute(
                "UPDATE repair_queue SET attempts = attempts + 1 WHERE block_id = ?",
                (block_id,))

    def add_tombstone(self, block_id: str) -> None:
        with self._lock, self._connection:
            self._connection.execute(
                "INSERT OR REPLACE INTO block_tombstones(block_id, deleted_at) VALUES (?, ?)",
                (block_id, time.time()))
            self._connection.execute("DELETE FROM repair_queue WHERE block_id = ?", (block_id,))

    def clear_tombstone(self, block_id: str) -> None:
        """Called on every put: a lock-free lookup; the write only when there is one."""
        if self.is_tombstoned(block_id):
            with self._lock, self._connection:
                self._connection.execute(
                    "DELETE FROM block_tombstones WHERE block_id = ?", (block_id,))

    def is_tombstoned(self, block_id: str) -> bool:
        return self._reader().execute(
            "SELECT 1 FROM block_tombstones WHERE block_id = ?",
            (block_id,)).fetchone() is not None

    # -- scrub history -------------------------------------------------------------------

    def scrub_started(self) -> int:
        with self._lock, self._connection:
            self._connection.execute("INSERT INTO scrub_runs(started_at) VALUES (?)",
                                     (time.time(),))
            run_id = int(self._connection.last_insert_rowid())
        return run_id

    def scrub_finished(self, run_id: int, checked: int, repaired: int,
                       unrecoverable: int) -> None:
        with self._lock, self._connection:
            self._connection.execute(
                "UPDATE scrub_runs SET finished_at = ?, checked = ?, repaired = ?, "
                "unrecoverable = ? WHERE id = ?",
                (time.time(), checked, repaired, unrecoverable, run_id))

    def last_scrub_finished(self) -> float | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT max(finished_at) FROM scrub_runs").fetchone()
        return float(row[0]) if row and row[0] is not None else None
