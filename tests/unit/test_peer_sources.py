"""What the peer service can serve (agent/peers/sources.py): blocks re-made from the
user's synced files — only when the file is still the synced version and the result is the
very block asked for — and blocks from the drive's cache. A real sync.db (SyncDb, with the
peer block index its put_remote keeps) and real files; no appliance."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from agent.blockcache import BlockCache
from agent.crypto.blocks import BLOCK_SIZE, BlockRef, encrypt_block
from agent.crypto.keys import UserKeys
from agent.crypto.nodes import NodeMeta, new_node_key, seal_metadata
from agent.peers.sources import CacheBlocks, Sources, SyncedFiles, block_offset
from agent.sync.model import BaseEntry, content_of_refs
from agent.sync.scan import stat_of
from agent.sync.state import DB_FILE, RemoteRow, SyncDb

ROOT, NODE, OTHER = "a" * 32, "b" * 32, "c" * 32
KEYS = UserKeys.generate()


def encrypt_file(data: bytes) -> tuple[list[BlockRef], list[bytes]]:
    refs, blocks = [], []
    for start in range(0, len(data), BLOCK_SIZE):
        ref, ciphertext = encrypt_block(KEYS.content_secret, data[start:start + BLOCK_SIZE])
        refs.append(ref)
        blocks.append(ciphertext)
    return refs, blocks


class Synced:
    """A synced folder DIR with files recorded the way the engine records a synced file:
    a remote row (sealed metadata listing the blocks) and a base row with the file's stat."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dir = home / "dir"
        self.dir.mkdir(parents=True)
        self.db = SyncDb.of_home(home)
        self.folder = self.db.add_folder(str(self.dir), ROOT, "/").id
        self.db.put_remote(self.folder, RemoteRow(ROOT, None, "", "dir", 1, True, 0, 0,
                                                  0o755, "", "", 1.0, 1.0, new_node_key(),
                                                  b"sealed"))

    def add(self, node_id: str, name: str, data: bytes, version: int = 1
            ) -> tuple[list[BlockRef], list[bytes]]:
        path = self.dir / name
        path.write_bytes(data)
        refs, blocks = encrypt_file(data)
        key = new_node_key()
        info = os.lstat(path)
        meta = NodeMeta(name=name, kind="file", size=len(data), mtime_ns=info.st_mtime_ns,
                        mode=0o644, blocks=tuple(refs))
        content = content_of_refs(refs)
        self.db.put_remote(self.folder, RemoteRow(
            node_id, ROOT, name, "file", version, True, len(data), info.st_mtime_ns, 0o644,
            content, "A", 1.0, 1.0, key, seal_metadata(key, node_id, meta)))
        self.db.put_base(self.folder, BaseEntry(node_id, name, "file", version, content,
                                                stat_of(info)))
        return refs, blocks


@pytest.fixture
def synced(tmp_path: Path) -> Synced:
    return Synced(tmp_path)


def test_a_synced_file_serves_its_blocks_reencrypted_exactly(synced: Synced) -> None:
    data = os.urandom(2 * BLOCK_SIZE + 1234)
    refs, blocks = synced.add(NODE, "big.bin", data)
    source = SyncedFiles(synced.home / DB_FILE)
    ids = [r.id_hex for r in refs]
    assert source.holds([*ids, "f" * 64]) == ids
    for ref, block in zip(refs, blocks, strict=True):
        served = source.read(ref.id_hex)
        assert served == block and blake3.blake3(served).hexdigest() == ref.id_hex
    assert source.read("f" * 64) is None
    assert block_offset(refs, 2) == 2 * BLOCK_SIZE


def test_a_file_changed_since_it_was_synced_is_not_served(synced: Synced) -> None:
    refs, _ = synced.add(NODE, "doc.txt", b"version one " * 1000)
    source = SyncedFiles(synced.home / DB_FILE)
    block_id = refs[0].id_hex
    assert source.read(block_id) is not None
    path = synced.dir / "doc.txt"
    info = os.stat(path)
    path.write_bytes(b"version two " * 1000)        # same size, other bytes
    assert source.holds([block_id]) == []
    assert source.read(block_id) is None
    # Even with its size and mtime put back (the stat check alone would pass on the inode
    # too: written in place), the bytes are not the block's: still nothing served.
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert source.holds([block_id]) == [block_id]    # HAVE is a hint from the stat
    assert source.read(block_id) is None
    assert source.changed >= 2


def test_a_file_replaced_by_another_inode_or_a_link_is_not_served(synced: Synced,
                                                                   tmp_path: Path) -> None:
    data = b"same bytes" * 500
    refs, _ = synced.add(NODE, "a.txt", data)
    source = SyncedFiles(synced.home / DB_FILE)
    path = synced.dir / "a.txt"
    info = os.stat(path)
    path.unlink()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(data)
    path.symlink_to(outside)                      # a link is never followed
    assert source.holds([refs[0].id_hex]) == []
    assert source.read(refs[0].id_hex) is None
    path.unlink()
    path.write_bytes(data)                        # the same bytes, another inode
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert source.read(refs[0].id_hex) is None


def test_a_newer_remote_version_not_synced_here_is_not_served(synced: Synced) -> None:
    refs, _ = synced.add(NODE, "a.txt", b"one" * 100)
    source = SyncedFiles(synced.home / DB_FILE)
    assert source.holds([refs[0].id_hex]) == [refs[0].id_hex]
    # Another device wrote version 2; this device has not downloaded it yet: the base
    # still says version 1, the remote row version 2. Neither version is served.
    key = new_node_key()
    new_refs, _ = encrypt_file(b"two" * 100)
    meta = NodeMeta(name="a.txt", kind="file", size=300, blocks=tuple(new_refs))
    synced.db.put_remote(synced.folder, RemoteRow(
        NODE, ROOT, "a.txt", "file", 2, True, 300, 0, 0o644, content_of_refs(new_refs), "B",
        1.0, 2.0, key, seal_metadata(key, NODE, meta)))
    assert source.holds([refs[0].id_hex, new_refs[0].id_hex]) == []
    assert source.read(refs[0].id_hex) is None
    assert source.read(new_refs[0].id_hex) is None


def test_the_index_follows_deletions_and_a_relisting(synced: Synced) -> None:
    refs, _ = synced.add(NODE, "a.txt", b"a" * 100)
    other, _ = synced.add(OTHER, "b.txt", b"b" * 100)
    source = SyncedFiles(synced.home / DB_FILE)
    synced.db.drop_remote_subtree(synced.folder, NODE)
    assert source.holds([refs[0].id_hex, other[0].id_hex]) == [other[0].id_hex]
    synced.db.clear_remote(synced.folder)
    assert source.holds([other[0].id_hex]) == []
    rows = synced.db.db.execute("SELECT COUNT(*) FROM peer_blocks").fetchone()
    assert rows == (0,)


def test_an_older_database_is_indexed_when_opened(tmp_path: Path) -> None:
    # Rows written without the index (as the drive's SyncDb, or a database from before
    # peers), then opened as sync opens it: every file's blocks are indexed.
    plain = SyncDb(tmp_path / DB_FILE)
    folder = plain.add_folder(str(tmp_path), ROOT, "/").id
    key = new_node_key()
    refs, _ = encrypt_file(b"x" * 5000)
    meta = NodeMeta(name="x", kind="file", size=5000, blocks=tuple(refs))
    plain.put_remote(folder, RemoteRow(NODE, ROOT, "x", "file", 1, True, 5000, 0, 0o644,
                                       content_of_refs(refs), "", 1.0, 1.0, key,
                                       seal_metadata(key, NODE, meta)))
    assert plain.db.execute("SELECT COUNT(*) FROM peer_blocks").fetchone() == (0,)
    plain.close()
    indexed = SyncDb.of_home(tmp_path)
    assert indexed.db.execute("SELECT block_id FROM peer_blocks").fetchall() == [
        (refs[0].block_id,)]


def test_a_database_without_the_index_serves_nothing_and_raises_nothing(
        tmp_path: Path) -> None:
    assert SyncedFiles(tmp_path / DB_FILE).holds(["a" * 64]) == []
    (tmp_path / DB_FILE).write_bytes(b"")
    assert SyncedFiles(tmp_path / DB_FILE).read("a" * 64) is None


def test_the_cache_serves_verified_ciphertext(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "cache", 64 * 1024 * 1024)
    refs, blocks = encrypt_file(os.urandom(1000))
    cache.put(refs[0].id_hex, blocks[0])
    source = Sources([SyncedFiles(tmp_path / DB_FILE), CacheBlocks(cache)])
    assert source.holds([refs[0].id_hex, "e" * 64]) == [refs[0].id_hex]
    assert source.read(refs[0].id_hex) == blocks[0]
    # A block gone bad in the cache is dropped, never served.
    path = tmp_path / "cache" / "blocks" / refs[0].id_hex[:2] / refs[0].id_hex
    path.write_bytes(b"\0" + blocks[0][1:])
    assert source.read(refs[0].id_hex) is None
    assert source.holds([refs[0].id_hex]) == []
