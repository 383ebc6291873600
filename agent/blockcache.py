"""The agent's block cache: ciphertext blocks on local disk, named by their id, within a
hard budget.

For the drive (issue 13: blocks read on demand stay for the next read, pinned files stay
available offline) and the LAN peer service (blocks served to the user's other devices).
It holds **ciphertext**, as the design notes decide: plaintext exists only in RAM and in
the user's own files, and a block is served to a peer exactly as the appliance stores it.

- **Verified on read**: a block's BLAKE3 must be its name. One that fails (a torn write, a
  flipped bit) is dropped and reads as missing, so it costs a fetch, never wrong bytes.
- **Budget**: `put` makes room by evicting the least recently used unpinned blocks. When
  the pinned blocks alone leave no room, it raises CacheFullError and stores nothing: the
  drive turns that into ENOSPC before the device fills up.
- **Pins** count: a block two pinned files share is pinned twice, and stays until both
  are unpinned.
- **Layout**: FOLDER/blocks/ab/<id>, and FOLDER/index.sqlite (apsw) with one row per block:
  its size, its last use (a counter, so the order survives a restart) and its pins.
- **Crashes**: a block is written to a temp name and renamed, without fsync: a cache may
  lose blocks in a crash, and whatever survives is verified when read. Opening the cache
  removes temp files, drops rows whose file is gone and deletes files the index does not
  know (a crash between the rename and the row).

Thread-safe (one lock; a big block is written to its temporary file outside it, its room
held meanwhile): the drive calls it from its worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

import apsw
import blake3

from agent.errors import CacheFullError, IntegrityError

log = logging.getLogger(__name__)

_BLOCK_ID = re.compile(r"^[0-9a-f]{64}$")
_TEMP_SUFFIX = ".part"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    id   TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    used INTEGER NOT NULL,
    pins INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS blocks_evictable ON blocks (pins, used);
"""


def _check_id(block_id: str) -> None:
    if not _BLOCK_ID.match(block_id):
        raise ValueError(f"not a block id: {block_id[:80]!r}")


class BlockCache:
    """Ciphertext blocks in FOLDER, at most BUDGET bytes of them (see the module)."""

    def __init__(self, folder: Path, budget: int) -> None:
        if budget <= 0:
            raise ValueError("the cache's budget must be positive")
        self.folder = folder
        self.budget = budget
        self._blocks = folder / "blocks"
        self._blocks.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = apsw.Connection(str(folder / "index.sqlite"))
        self._db.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        self._db.execute(_SCHEMA)
        self._reconcile()
        used, clock = self._one("SELECT COALESCE(SUM(size), 0), COALESCE(MAX(used), 0) "
                                "FROM blocks")
        self._used: int = used
        self._clock: int = clock
        self._reserved = 0     # bytes of the budget held for something else (staged writes)
        self._writing = 0      # bytes of blocks being written outside the lock (by `put`)

    # -- the operations ----------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def get(self, block_id: str, *, verify: bool = True) -> bytes | None:
        """The block's bytes, verified; None if it is not here (or was bad, and is gone).
        VERIFY False: the caller checks the bytes against the id itself (decrypting does)
        and calls `drop` if they fail."""
        _check_id(block_id)
        path = self._path(block_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._forget(block_id)
            return None
        if verify and blake3.blake3(data).hexdigest() != block_id:
            log.warning("cached block %s… failed its check and was dropped", block_id[:16])
            with self._lock:
                self._remove(block_id)
            return None
        with self._lock:
            self._db.execute("UPDATE blocks SET used = ? WHERE id = ?",
                             (self._tick(), block_id))
        return data

    def drop(self, block_id: str) -> None:
        """Remove a block found bad by its reader (see `get`), pinned or not."""
        _check_id(block_id)
        log.warning("cached block %s… failed its check and was dropped", block_id[:16])
        with self._lock:
            self._remove(block_id)

    def put(self, block_id: str, data: bytes | memoryview, *, pin: bool = False,
            checked: bool = False) -> None:
        """Keep DATA as block BLOCK_ID (pinned once more if PIN). Raises IntegrityError if
        DATA is not that block (CHECKED: the caller just computed or verified its id, so
        it is not hashed again), CacheFullError if the pinned blocks leave no room."""
        _check_id(block_id)
        if not checked and blake3.blake3(data).hexdigest() != block_id:
            raise IntegrityError(f"block {block_id[:16]}… does not match its id; not cached")
        with self._lock:
            if self._touch(block_id, pin):
                return
            self._forget(block_id)
            self._make_room(len(data))
            self._writing += len(data)     # room held while the file is written unlocked
        try:
            temp = self._write_temp(block_id, data)
        finally:
            with self._lock:
                self._writing -= len(data)
        with self._lock:
            if self._touch(block_id, pin):   # another thread kept it meanwhile
                temp.unlink(missing_ok=True)
                return
            try:
                self._make_room(len(data))
                os.replace(temp, self._path(block_id))
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            self._db.execute("INSERT INTO blocks (id, size, used, pins) VALUES (?, ?, ?, ?)",
                             (block_id, len(data), self._tick(), int(pin)))
            self._used += len(data)

    def put_many(self, blocks: Iterable[tuple[str, bytes | memoryview]]) -> int:
        """`put` each (id, data) of BLOCKS, unpinned, in one transaction (many small
        blocks at once); stops at the first that finds no room. The number kept."""
        checked = []
        for block_id, data in blocks:
            _check_id(block_id)
            if blake3.blake3(data).hexdigest() != block_id:
                raise IntegrityError(f"block {block_id[:16]}… does not match its id")
            checked.append((block_id, data))
        kept = 0
        with self._lock, self._db:
            for block_id, data in checked:
                try:
                    self._keep(block_id, data, False)
                except CacheFullError:
                    break
                kept += 1
        return kept

    def _keep(self, block_id: str, data: bytes | memoryview, pin: bool) -> None:
        """`put` with the lock held all along (put_many: small blocks, one transaction)."""
        if self._touch(block_id, pin):
            return
        self._forget(block_id)
        self._make_room(len(data))
        self._write(block_id, data)
        self._db.execute("INSERT INTO blocks (id, size, used, pins) VALUES (?, ?, ?, ?)",
                         (block_id, len(data), self._tick(), int(pin)))
        self._used += len(data)

    def _touch(self, block_id: str, pin: bool) -> bool:
        """Whether the block is here already (then marked used, and pinned once more if
        PIN). Callers hold the lock."""
        known = self._db.execute("SELECT 1 FROM blocks WHERE id = ?", (block_id,)).fetchone()
        if known is None or not self._path(block_id).exists():
            return False
        self._db.execute("UPDATE blocks SET used = ?, pins = pins + ? WHERE id = ?",
                         (self._tick(), int(pin), block_id))
        return True

    def has(self, block_id: str) -> bool:
        """Whether the index holds the block (not verified: `get` does that)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM blocks WHERE id = ?",
                                    (block_id,)).fetchone() is not None

    def holds_all(self, block_ids: Iterable[str]) -> bool:
        with self._lock:
            return all(self._db.execute("SELECT 1 FROM blocks WHERE id = ?",
                                        (block_id,)).fetchone() is not None
                       for block_id in block_ids)

    def reserve(self, size: int) -> None:
        """Hold SIZE bytes of the budget for something else that shares it (the drive's
        staged writes), evicting unpinned blocks to make room. Raises CacheFullError,
        reserving nothing, when pinned blocks and SIZE do not fit together."""
        with self._lock:
            if size > self._reserved:
                self._make_room(0, reserved=size)
            self._reserved = size

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def pin(self, block_ids: Iterable[str]) -> list[str]:
        """Pin each block that is here once more; the ids that are not here (to fetch and
        `put(..., pin=True)`)."""
        missing = []
        with self._lock, self._db:
            for block_id in block_ids:
                _check_id(block_id)
                changed = self._db.execute(
                    "UPDATE blocks SET pins = pins + 1 WHERE id = ? RETURNING id",
                    (block_id,)).fetchone()
                if changed is None:
                    missing.append(block_id)
        return missing

    def unpin(self, block_ids: Iterable[str]) -> None:
        """Take one pin off each block (never below none)."""
        with self._lock, self._db:
            for block_id in block_ids:
                _check_id(block_id)
                self._db.execute("UPDATE blocks SET pins = MAX(pins - 1, 0) WHERE id = ?",
                                 (block_id,))

    def free(self, block_ids: Iterable[str]) -> int:
        """Drop the unpinned ones of BLOCK_IDS now; the bytes freed."""
        freed = 0
        with self._lock:
            for block_id in block_ids:
                _check_id(block_id)
                row = self._db.execute("SELECT size FROM blocks WHERE id = ? AND pins = 0",
                                       (block_id,)).fetchone()
                if row is not None:
                    self._remove(block_id)
                    freed += row[0]
        return freed

    def pinned_bytes(self) -> int:
        return int(self._one("SELECT COALESCE(SUM(size), 0) FROM blocks WHERE pins > 0")[0])

    def close(self) -> None:
        self._db.close()

    # -- inside (callers hold the lock) ------------------------------------------------

    def _one(self, query: str) -> tuple[int, ...]:
        """The one row of an aggregate QUERY."""
        row = self._db.execute(query).fetchone()
        assert row is not None
        return tuple(row)

    def _path(self, block_id: str) -> Path:
        return self._blocks / block_id[:2] / block_id

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _make_room(self, size: int, reserved: int | None = None) -> None:
        held = self._reserved if reserved is None else reserved
        if size + held > self.budget:
            raise CacheFullError(f"{size + held} bytes do not fit in the cache's budget "
                                 f"({self.budget} bytes)")
        while self._used + self._writing + held + size > self.budget:
            row = self._db.execute("SELECT id FROM blocks WHERE pins = 0 ORDER BY used "
                                   "LIMIT 1").fetchone()
            if row is None:
                raise CacheFullError(f"the cache is full ({self._used} bytes pinned, "
                                     f"{held} held for unsent writes, of {self.budget}); "
                                     "unpin or free some, or give it a larger budget")
            self._remove(row[0])

    def _write(self, block_id: str, data: bytes | memoryview) -> None:
        os.replace(self._write_temp(block_id, data), self._path(block_id))

    def _write_temp(self, block_id: str, data: bytes | memoryview) -> Path:
        """DATA in a temporary file beside the block's place, for the caller to rename."""
        final = self._path(block_id)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        temp = final.with_name(f".{block_id}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
        except OSError:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return temp

    def _remove(self, block_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(block_id).unlink()
        self._forget(block_id)

    def _forget(self, block_id: str) -> None:
        row = self._db.execute("DELETE FROM blocks WHERE id = ? RETURNING size",
                               (block_id,)).fetchone()
        if row is not None:
            self._used -= row[0]

    def _reconcile(self) -> None:
        """Make the index and the files agree after a crash (see the module)."""
        on_disk: set[str] = set()
        for fan in self._blocks.iterdir():
            for entry in fan.iterdir() if fan.is_dir() else ():
                if entry.name.endswith(_TEMP_SUFFIX) or not _BLOCK_ID.match(entry.name):
                    entry.unlink(missing_ok=True)   # a write a crash cut short, or litter
                else:
                    on_disk.add(entry.name)
        with self._db:
            known = {row[0] for row in self._db.execute("SELECT id FROM blocks")}
            for block_id in known - on_disk:
                self._db.execute("DELETE FROM blocks WHERE id = ?", (block_id,))
            for block_id in on_disk - known:   # renamed, not recorded: no use, no pin
                self._path(block_id).unlink(missing_ok=True)
