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
    # 2: accounts, the encrypted tree, block references, grants and the change journal.
    """
    CREATE TABLE users (
        id             INTEGER PRIMARY KEY,
        name           TEXT NOT NULL UNIQUE,
        public_key     BLOB,                 -- X25519, set once by the user's first device
        key_bundle     BLOB,                 -- opaque: encrypted under the user's passphrase
        bundle_version INTEGER NOT NULL DEFAULT 0,
        created_at     REAL NOT NULL
    );
    CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        user_id     INTEGER NOT NULL REFERENCES users(id),
        name        TEXT NOT NULL,
        token_hash  BLOB NOT NULL UNIQUE,    -- SHA-256 of the device token
        created_at  REAL NOT NULL,
        last_seen   REAL,
        revoked_at  REAL
    );
    CREATE TABLE enrollment_codes (
        code_id         TEXT PRIMARY KEY,    -- base32, as sent on the wire
        user_id         INTEGER NOT NULL REFERENCES users(id),
        key             BLOB NOT NULL,       -- HMAC key derived from the code's secret
        created_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,
        used_at         REAL,
        failed_attempts INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE nodes (
        id           TEXT PRIMARY KEY,       -- 32 hex digits
        owner_id     INTEGER NOT NULL REFERENCES users(id),
        parent_id    TEXT,                   -- NULL for the owner's root directory
        kind         TEXT NOT NULL CHECK (kind IN ('file', 'dir')),
        version      INTEGER NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('uploading', 'uploaded')),
        deleted_at   REAL,                   -- tombstone; purged after the grace period
        deleted_root TEXT,                   -- the node whose deletion took this one along
        metadata     BLOB NOT NULL,          -- opaque ciphertext (name, mtime, block keys...)
        wrapped_key  BLOB NOT NULL,          -- node key wrapped by the parent's key
        size         INTEGER NOT NULL,
        block_count  INTEGER NOT NULL,
        content_tag  BLOB NOT NULL,          -- hash of metadata and block list (retries)
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL,
        updated_by   TEXT                    -- device id
    ) WITHOUT ROWID;
    CREATE INDEX nodes_by_parent ON nodes(parent_id);
    CREATE INDEX nodes_roots ON nodes(owner_id) WHERE parent_id IS NULL;
    CREATE INDEX nodes_deleted ON nodes(deleted_at) WHERE deleted_at IS NOT NULL;
    CREATE TABLE node_blocks (
        node_id  TEXT NOT NULL,
        position INTEGER NOT NULL,
        block_id TEXT NOT NULL,
        size     INTEGER NOT NULL,
        PRIMARY KEY (node_id, position)
    ) WITHOUT ROWID;
    CREATE INDEX node_blocks_by_block ON node_blocks(block_id);
    CREATE TABLE blocks (
        block_id           TEXT PRIMARY KEY,
        size               INTEGER NOT NULL,
        stored             INTEGER NOT NULL DEFAULT 0,  -- durable in the block store
        refs               INTEGER NOT NULL DEFAULT 0,  -- positions in live nodes
        unreferenced_since REAL                         -- set when refs drops to 0
    ) WITHOUT ROWID;
    CREATE INDEX blocks_unreferenced ON blocks(unreferenced_since)
        WHERE unreferenced_since IS NOT NULL;
    CREATE TABLE pending_blocks (                -- blocks an uploading node still lacks
        node_id  TEXT NOT NULL,
        block_id TEXT NOT NULL,
        PRIMARY KEY (node_id, block_id)
    ) WITHOUT ROWID;
    CREATE INDEX pending_by_block ON pending_blocks(block_id);
    CREATE TABLE grants (                        -- the seed's SharedFiles
        user_id     INTEGER NOT NULL REFERENCES users(id),
        node_id     TEXT NOT NULL,
        wrapped_key BLOB NOT NULL,               -- node key wrapped for the user's public key
        granted_at  REAL NOT NULL,
        PRIMARY KEY (user_id, node_id)
    ) WITHOUT ROWID;
    CREATE INDEX grants_by_node ON grants(node_id);
    CREATE TABLE changes (
        cursor    INTEGER PRIMARY KEY AUTOINCREMENT,
        node_id   TEXT NOT NULL,
        version   INTEGER NOT NULL,
        kind      TEXT NOT NULL,
        at        REAL NOT NULL,
        device_id TEXT
    );
    CREATE INDEX changes_by_node ON changes(node_id, cursor);
    CREATE TABLE feed (                          -- who sees which change (fan-out on write)
        user_id INTEGER NOT NULL,
        cursor  INTEGER NOT NULL,
        PRIMARY KEY (user_id, cursor)
    ) WITHOUT ROWID;
    """,
    # 3: the appliance's own small facts. `epoch` names this database's history: a home
    # recovered from an older copy gets a new one (appliance.meta.epoch), and agents that
    # see it change re-send what the copy lacks instead of taking its absence for deletes.
    """
    CREATE TABLE appliance_state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO appliance_state(key, value) VALUES
        ('epoch', lower(hex(randomblob(16)))),
        ('epoch_started_at', CAST((julianday('now') - 2440587.5) * 86400.0 AS TEXT));
    """,
    # 4: blocks `cairnd fsck` found in the store but not in `blocks` (a crash between a
    # store write and its commit, or a database recovered from an older copy), and when it
    # first saw each: it deletes one only after the grace period (appliance.fsck).
    """
    CREATE TABLE fsck_orphans (
        block_id   TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,        -- unix time of the first run that saw it
        last_seen  REAL NOT NULL         -- of the latest; rows no whole scan saw are dropped
    ) WITHOUT ROWID;
    """,
    # 5: LAN peers (API 1.5). The SHA-256 of the SubjectPublicKeyInfo of the key in each
    # device's newest certificate (appliance.device_ca): block grants are bound to it.
    # NULL until the device asks for a certificate. Revoked devices are listed by index.
    """
    ALTER TABLE devices ADD COLUMN cert_key_sha256 TEXT;
    CREATE INDEX devices_revoked ON devices(revoked_at) WHERE revoked_at IS NOT NULL;
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
