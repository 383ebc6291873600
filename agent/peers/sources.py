"""What the peer service can serve: where a block a peer asks for comes from.

Two sources, each answering two questions — which of these blocks do you hold (`holds`:
cheap, index lookups and at most a stat per file, never a read) and give me this one
(`read`: the exact ciphertext, or None):

- `CacheBlocks`: the drive's block cache (`cairn mount`). It holds ciphertext named by its
  id and verifies every block on read, so what it returns is the block.
- `SyncedFiles`: the files of the user's own synced folders (`cairn sync`). sync.db's
  peer_blocks table (agent/sync/state.py) says which file version lists a block and where
  in its block table. A block is re-made from the file only when

    1. the base row of that node has the very version of the remote row that lists the
       block (the local file was last synced at that version), and
    2. the file's stat now (size, mtime_ns, inode; a regular file, links not followed) is
       the base row's, before and after the read, and
    3. the plaintext read has the block's plain hash (`encrypt_again_into`: a block key is
       never used on other bytes), and
    4. the ciphertext it encrypts to (convergent: deterministic) hashes to the id asked for.

  Shared folders are not served: what others share with the user is mirrored in another
  table (agent/sync/shared.py), never in `remote`, so no peer_blocks row names it.

Both are called from the server's threads: each keeps its own lock around its database.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import apsw
import blake3

from agent.blockcache import BlockCache
from agent.crypto.blocks import BlockRef, encrypt_again_into
from agent.crypto.nodes import open_metadata
from agent.errors import IntegrityError
from agent.sync.model import Kind

log = logging.getLogger(__name__)

OPENED_KEPT = 64        # opened block tables kept (a 1 GiB file's: 256 refs, ~26 KB)


class BlockSource(Protocol):
    def holds(self, block_ids: Sequence[str]) -> list[str]:
        """The ones of BLOCK_IDS this source can serve now, cheaply (no block read)."""
        ...

    def read(self, block_id: str) -> bytes | bytearray | None:
        """The block's ciphertext, exactly (its BLAKE3 is BLOCK_ID), or None."""
        ...


class NoBlocks:
    """A source that holds nothing (a service that serves only its refusals)."""

    def holds(self, block_ids: Sequence[str]) -> list[str]:
        return []

    def read(self, block_id: str) -> bytes | bytearray | None:
        return None


class CacheBlocks:
    """The drive's block cache (thread-safe itself; verified on read)."""

    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache

    def holds(self, block_ids: Sequence[str]) -> list[str]:
        return [block_id for block_id in block_ids if self.cache.has(block_id)]

    def read(self, block_id: str) -> bytes | bytearray | None:
        return self.cache.get(block_id)


class Sources:
    """Several sources, asked in order."""

    def __init__(self, sources: Iterable[BlockSource]) -> None:
        self.sources = list(sources)

    def holds(self, block_ids: Sequence[str]) -> list[str]:
        found: set[str] = set()
        for source in self.sources:
            found.update(source.holds([b for b in block_ids if b not in found]))
        return [b for b in block_ids if b in found]

    def read(self, block_id: str) -> bytes | bytearray | None:
        for source in self.sources:
            data = source.read(block_id)
            if data is not None:
                return data
        return None


# --- the synced files -------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """A synced file whose current version lists the block (from sync.db)."""

    folder: int
    node_id: str
    version: int
    index: int               # in the file's block table
    path: Path               # the local file
    size: int                # the base's stat of it
    mtime_ns: int
    inode: int


# One row per (file version listing the block, synced at that very version): the remote
# row of that version and the base row of that version, joined on the block's index row.
_CANDIDATES = """
SELECT p.folder, p.node_id, p.version, p.idx, f.local_dir, b.path, b.size, b.mtime_ns, b.inode
FROM peer_blocks p
JOIN remote r ON r.folder = p.folder AND r.node_id = p.node_id AND r.version = p.version
JOIN base b ON b.folder = p.folder AND b.node_id = p.node_id AND b.version = p.version
JOIN folders f ON f.id = p.folder
WHERE p.block_id = ? AND b.kind = 'file' AND b.size IS NOT NULL AND r.link IS NULL
"""
_OPEN_ROW = "SELECT key, meta, kind FROM remote WHERE folder = ? AND node_id = ? AND " \
            "version = ?"


def same_file(info: os.stat_result, candidate: Candidate) -> bool:
    """Whether INFO is the file the base recorded (a regular file, same size, mtime and
    inode): the file is then the version the base says it is."""
    return (stat.S_ISREG(info.st_mode) and info.st_size == candidate.size
            and info.st_mtime_ns == candidate.mtime_ns and info.st_ino == candidate.inode)


def block_offset(refs: Sequence[BlockRef], index: int) -> int:
    """Where block INDEX of a file with block table REFS begins in the file."""
    return sum(ref.plain_size for ref in refs[:index])


def _candidate(row: tuple[Any, ...]) -> Candidate:
    folder, node_id, version, index, local_dir, path, size, mtime_ns, inode = row
    return Candidate(int(folder), str(node_id), int(version), int(index),
                     Path(local_dir) / str(path), int(size), int(mtime_ns), int(inode))


class SyncedFiles:
    """Blocks re-made from the user's synced files (see the module). Opens DB_PATH (HOME/
    sync.db) read-only; nothing here writes it."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._lock = threading.Lock()
        self._db: apsw.Connection | None = None
        self._opened: OrderedDict[tuple[int, str, int], tuple[BlockRef, ...]] = OrderedDict()
        self.changed = 0       # files found changed since they were indexed (for tests, logs)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connection(self) -> apsw.Connection | None:
        if self._db is None:
            if not self.db_path.exists():
                return None
            self._db = apsw.Connection(str(self.db_path), flags=apsw.SQLITE_OPEN_READONLY)
            self._db.setbusytimeout(2000)
        return self._db

    def candidates(self, block_id: str) -> list[Candidate]:
        with self._lock:
            try:
                db = self._connection()
                if db is None:
                    return []
                rows = db.execute(_CANDIDATES, (bytes.fromhex(block_id),)).fetchall()
            except apsw.Error as exc:     # no sync.db yet, or one from before peer_blocks
                log.debug("no synced file to serve from: %s", exc)
                return []
        return [_candidate(row) for row in rows]

    def holds(self, block_ids: Sequence[str]) -> list[str]:
        stats: dict[Path, os.stat_result | None] = {}
        held = []
        for block_id in block_ids:
            for candidate in self.candidates(block_id):
                if candidate.path not in stats:
                    try:
                        stats[candidate.path] = os.lstat(candidate.path)
                    except OSError:
                        stats[candidate.path] = None
                info = stats[candidate.path]
                if info is not None and same_file(info, candidate):
                    held.append(block_id)
                    break
        return held

    def read(self, block_id: str) -> bytes | bytearray | None:
        for candidate in self.candidates(block_id):
            data = self._read_from(candidate, block_id)
            if data is not None:
                return data
        return None

    def _refs(self, candidate: Candidate) -> tuple[BlockRef, ...] | None:
        key = (candidate.folder, candidate.node_id, candidate.version)
        with self._lock:
            refs = self._opened.get(key)
            if refs is not None:
                self._opened.move_to_end(key)
                return refs
            db = self._connection()
            row = None if db is None else db.execute(_OPEN_ROW, key).fetchone()
        if row is None:
            return None
        node_key, meta, kind = row
        kind_: Kind = kind
        if kind_ != "file":
            return None
        try:
            refs = open_metadata(node_key, candidate.node_id, "file", meta).blocks
        except (IntegrityError, ValueError):
            return None
        with self._lock:
            self._opened[key] = refs
            while len(self._opened) > OPENED_KEPT:
                self._opened.popitem(last=False)
        return refs

    def _read_from(self, candidate: Candidate, block_id: str) -> bytearray | None:
        refs = self._refs(candidate)
        if refs is None or candidate.index >= len(refs) \
                or refs[candidate.index].id_hex != block_id:
            return None
        ref = refs[candidate.index]
        offset = block_offset(refs, candidate.index)
        try:
            fd = os.open(candidate.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY
                         | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not same_file(os.fstat(fd), candidate):
                self._changed(candidate)
                return None
            plaintext = os.pread(fd, ref.plain_size, offset)
            if len(plaintext) != ref.plain_size or not same_file(os.fstat(fd), candidate):
                self._changed(candidate)
                return None
        except OSError:
            return None
        finally:
            os.close(fd)
        out = bytearray(ref.cipher_size)
        ciphertext = encrypt_again_into(ref, plaintext, memoryview(out))
        if ciphertext is None:          # same stat, other bytes (an mtime set back)
            self._changed(candidate)
            return None
        if blake3.blake3(out, max_threads=blake3.blake3.AUTO).hexdigest() != block_id:
            log.warning("block %s… re-made from %s is not the block; not served",
                        block_id[:16], candidate.path)
            return None
        return out

    def _changed(self, candidate: Candidate) -> None:
        self.changed += 1
        log.info("not serving from %s: it changed since it was synced", candidate.path)
