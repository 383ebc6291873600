"""Small-block shards packed into one SQLite database per disk, written by group commit.

A small block (≤ small_block_limit) is stored as m+1 replicas. As files, each replica costs
a new inode, a folder entry and a flush; this machine's filesystem makes ~3,000 new durable
files a second, so three per put capped small puts below 1,000/s. Packed, a replica is a
row in `<disk>/small-shards.sqlite` (WAL, synchronous=FULL): no new file, and one commit —
one WAL fsync — covers every put that arrived while the previous commit ran. SQLite gives
the index, deletion and space reuse (free pages are recycled) that a hand-made pack file
would need, and its own crash safety: a commit either happened or did not.

Each row holds the complete shard bytes (header + payload, shard_format.py), so a packed
shard is verified exactly like a shard file.

Writers call `submit` (queue a put or delete, get a ticket) and then `wait(ticket)`, which
returns once a commit that took their operation has finished — leader style: the first
waiter with no commit running becomes the committer for everyone queued. Splitting submit
from wait lets one put queue its replicas on several disks before waiting on any.

Safety against a vanishing disk: SQLite would keep writing to a database file that was
deleted under an open connection. Before each commit the leader checks that the path still
names the inode it opened; if not, the batch fails with ENOENT and the connection is
reopened next time.

Errors leave as OSError with an errno (ENOSPC, EROFS, EIO, ENOENT) so that disk.py maps
them to disk states the same way as file errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import apsw

PACK_NAME = "small-shards.sqlite"
READER_RECHECK_S = 1.0
READER_CACHE_KIB = 256
FAILURES_KEPT = 1024  # failed commit generations remembered for their waiters
_SCHEMA = ("CREATE TABLE IF NOT EXISTS shards ("
           " block_id TEXT PRIMARY KEY,"   # hex BLAKE3 id of the block
           " shard BLOB NOT NULL"          # the whole shard: 96-byte header + payload
           ") WITHOUT ROWID")

_Operation = tuple[str, bytes | None]   # (block id, shard bytes) or (block id, None): delete


def _os_error(exc: apsw.Error, path: Path) -> OSError:
    """The errno a file operation would have failed with."""
    code = errno.EIO
    if isinstance(exc, apsw.FullError):
        code = errno.ENOSPC
    elif isinstance(exc, apsw.ReadOnlyError):
        code = errno.EROFS
    elif isinstance(exc, apsw.CantOpenError):
        code = errno.ENOENT
    return OSError(code, f"{os.strerror(code)} (sqlite: {exc})", str(path))


class ShardPack:
    """The small-shard database of one disk. Thread-safe."""

    def __init__(self, root: Path, marker: Path) -> None:
        self.path = root / PACK_NAME
        self._marker = marker  # the database is only ever created on a formatted disk
        self._cond = threading.Condition()
        self._pending: list[_Operation] = []
        self._started = 0
        self._finished = 0
        self._failed: dict[int, OSError] = {}   # generation -> why its commit failed
        self._running = False
        self._writer: apsw.Connection | None = None
        self._writer_inode: tuple[int, int] | None = None
        self._local = threading.local()          # one read connection per thread
        self._recheck = 0                        # bumped by `recheck_readers`
        self._readers: list[apsw.Connection] = []
        self._readers_lock = threading.Lock()
        self.commits = 0

    # -- connections ---------------------------------------------------------------------

    def _inode(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _open_writer(self) -> apsw.Connection:
        inode = self._inode()
        if self._writer is not None and inode == self._writer_inode:
            return self._writer
        if self._writer is not None:  # the file was deleted or replaced under us
            self._writer.close()
            self._writer = None
        if not self._marker.exists():
            raise OSError(errno.ENOENT, "not a formatted Cairn disk (no marker)",
                          str(self.path.parent))
        if inode is None:
            self._create()
        connection = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READWRITE)
        connection.setbusytimeout(10_000)
        connection.execute("PRAGMA synchronous=FULL")
        self._writer, self._writer_inode = connection, self._inode()
        return connection

    def _create(self) -> None:
        """Make the database under a temporary name, schema and WAL mode included, then
        rename it into place: readers never see a database without its table."""
        temp = self.path.with_name(f".{PACK_NAME}.{os.getpid()}.{threading.get_ident()}")
        connection = apsw.Connection(str(temp))
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SCHEMA)
        finally:
            connection.close()
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, self.path)  # never replaces a database another process made
        except FileExistsError:
            pass
        finally:
            temp.unlink()
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open_reader(self) -> apsw.Connection | None:
        """This thread's read connection (None when there is no database: nothing packed
        here). Whether the file was replaced is checked at most every READER_RECHECK_S:
        a read through a stale connection can only return shard bytes that are verified
        (checksum, block id) like any other, and a missing disk is caught by its probe."""
        now = time.monotonic()
        reader: apsw.Connection | None = getattr(self._local, "reader", None)
        if reader is not None and now - getattr(self._local, "checked", 0.0) \
                < READER_RECHECK_S and getattr(self._local, "recheck", 0) == self._recheck:
            return reader
        inode = self._inode()
        self._local.checked, self._local.recheck = now, self._recheck
        if reader is not None and inode == getattr(self._local, "inode", None):
            return reader
        if reader is not None:
            reader.close()
            self._local.reader = None
        if inode is None:
            return None
        reader = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READWRITE)
        reader.setbusytimeout(10_000)
        # The kernel's page cache holds these pages anyway; SQLite's own cache (2 MiB per
        # connection by default) would be one more copy in every store thread, per disk.
        reader.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
        self._local.reader, self._local.inode = reader, inode
        with self._readers_lock:
            self._readers.append(reader)
        return reader

    def recheck_readers(self) -> None:
        """Have every thread's reader check the file at its next read (the disk changed
        state: it may have been replaced since, within READER_RECHECK_S)."""
        self._recheck += 1

    def close(self) -> None:
        with self._cond:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._readers_lock:
            for reader in self._readers:
                with contextlib.suppress(apsw.Error):  # in use by a thread a hung disk holds
                    reader.close()
            self._readers.clear()

    # -- writes: group commit ------------------------------------------------------------

    def submit(self, block_hex: str, shard: bytes | None) -> int:
        """Queue a put (shard bytes) or a delete (None); returns the ticket to wait on."""
        with self._cond:
            self._pending.append((block_hex, shard))
            return self._started + 1

    def wait(self, ticket: int) -> None:
        """Return once the commit that took the ticket's operation is durable; OSError if
        that commit failed."""
        with self._cond:
            while self._finished < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                generation = self._started
                batch, self._pending = self._pending, []
                self._cond.release()
                error: OSError | None = None
                try:
                    self._commit(batch)
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._finished = generation
                    if error is not None:
                        self._failed[generation] = error
                        for old in [g for g in self._failed if g < generation - FAILURES_KEPT]:
                            del self._failed[old]  # their waiters returned long ago
                    self._cond.notify_all()
                self.commits += 1
            failure = self._failed.get(ticket)
            if failure is not None:
                raise OSError(failure.errno, failure.strerror, failure.filename)

    def _commit(self, batch: list[_Operation]) -> None:
        try:
            connection = self._open_writer()
            # BEGIN/COMMIT statements, not `with connection`: apsw keeps the GIL through
            # the commit its context manager makes, so a disk that hung in that fsync
            # froze every thread of the process, the server's event loop included.
            connection.execute("BEGIN IMMEDIATE")
            try:
                for block_hex, shard in batch:
                    if shard is None:
                        connection.execute("DELETE FROM shards WHERE block_id = ?",
                                           (block_hex,))
                    else:
                        connection.execute(
                            "INSERT OR REPLACE INTO shards(block_id, shard) VALUES (?, ?)",
                            (block_hex, shard))
                connection.execute("COMMIT")
            except BaseException:
                if not connection.get_autocommit():
                    connection.execute("ROLLBACK")
                raise
            if self._inode() != self._writer_inode:
                raise OSError(errno.ENOENT, "the disk's small-shard database vanished "
                                            "during a commit", str(self.path))
        except apsw.Error as exc:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            raise _os_error(exc, self.path) from exc

    def write(self, block_hex: str, shard: bytes) -> None:
        self.wait(self.submit(block_hex, shard))

    def remove(self, block_hex: str) -> bool:
        present = self.size(block_hex) is not None
        if present:
            self.wait(self.submit(block_hex, None))
        return present

    # -- reads ---------------------------------------------------------------------------

    def read(self, block_hex: str, limit: int | None = None) -> bytes | None:
        try:
            reader = self._open_reader()
            if reader is None:
                return None
            if limit is None:
                row = reader.execute("SELECT shard FROM shards WHERE block_id = ?",
                                     (block_hex,)).fetchone()
            else:
                row = reader.execute(
                    "SELECT substr(shard, 1, ?) FROM shards WHERE block_id = ?",
                    (limit, block_hex)).fetchone()
        except apsw.Error as exc:
            raise _os_error(exc, self.path) from exc
        return bytes(row[0]) if row else None

    def size(self, block_hex: str) -> int | None:
        try:
            reader = self._open_reader()
            if reader is None:
                return None
            row = reader.execute("SELECT length(shard) FROM shards WHERE block_id = ?",
                                 (block_hex,)).fetchone()
        except apsw.Error as exc:
            raise _os_error(exc, self.path) from exc
        return int(row[0]) if row else None

    def block_ids(self, batch: int = 1000) -> Iterator[str]:
        """Every block id in the pack, in order, fetched a batch at a time (no big list)."""
        after = ""
        while ids := self.block_id_batch(after, batch):
            yield from ids
            after = ids[-1]

    def block_id_batch(self, after: str, batch: int = 1000) -> list[str]:
        """The first BATCH block ids after AFTER, in order ([] past the last one)."""
        try:
            reader = self._open_reader()
            if reader is None:
                return []
            rows = reader.execute(
                "SELECT block_id FROM shards WHERE block_id > ? ORDER BY block_id "
                "LIMIT ?", (after, batch)).fetchall()
        except apsw.Error as exc:
            raise _os_error(exc, self.path) from exc
        return [str(row[0]) for row in rows]

