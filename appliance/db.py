"""The appliance's SQLite database (apsw, WAL) and its schema migrations.

Migrations are an ordered list of SQL scripts; `PRAGMA user_version` records how many have
run. Each runs in its own transaction, so a crash mid-migration leaves the previous version.
Later issues append to MIGRATIONS; never edit one that has shipped.
"""

from __future__ import annotations

from pathlib import Path

import apsw

MIGRATIONS: tuple[str, ...] = (
    # 1: block store bookkeeping.
    """
    CREATE TABLE repair_queue (
        block_id   TEXT PRIMARY KEY,     -- hex BLAKE3 id of a block with missing/bad shards
        reason     TEXT NOT NULL,
        queued_at  REAL NOT NULL,        -- unix time
        attempts   INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE block_tombstones (
        block_id   TEXT PRIMARY KEY,     -- deleted blocks: shards that reappear (a disk that
        deleted_at REAL NOT NULL         -- was missing during delete) are removed, not repaired
    ) WITHOUT ROWID;
    CREATE TABLE scrub_runs (
        id            INTEGER PRIMARY KEY,
        started_at    REAL NOT NULL,
        finished_at   REAL,
        checked       INTEGER NOT NULL DEFAULT 0,
        repaired      INTEGER NOT NULL DEFAULT 0,
        unrecoverable INTEGER NOT NULL DEFAULT 0
    );
    """,
)


def open_database(path: Path) -> apsw.Connection:
    """Open (creating if needed) the database at `path` and bring its schema up to date."""
    connection = apsw.Connection(str(path))
    connection.setbusytimeout(10_000)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    migrate(connection)
    return connection


def schema_version(connection: apsw.Connection) -> int:
    row = connection.execute("PRAGMA user_version").fetchone()
    return int(row[0]) if row else 0


def migrate(connection: apsw.Connection) -> None:
    current = schema_version(connection)
    for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
        with connection:  # one transaction per migration
            connection.execute(script)
            connection.execute(f"PRAGMA user_version={number}")
