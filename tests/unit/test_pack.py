"""The small-shard pack: round trips, group commit, and never acknowledging a write that is
not in the disk's database."""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path

import apsw
import pytest

from appliance.storage.pack import PACK_NAME, ShardPack, _os_error


def make_pack(root: Path) -> ShardPack:
    root.mkdir(parents=True, exist_ok=True)
    (root / "marker").write_text("{}")
    return ShardPack(root, root / "marker")


def test_write_read_size_remove_and_list(tmp_path: Path) -> None:
    pack = make_pack(tmp_path / "disk")
    assert pack.read("a" * 64) is None  # no database yet: nothing packed
    pack.write("b" * 64, b"shard-b")
    pack.write("a" * 64, b"shard-a")
    assert pack.read("a" * 64) == b"shard-a"
    assert pack.read("a" * 64, limit=3) == b"sha"
    assert pack.size("b" * 64) == 7
    assert list(pack.block_ids(batch=1)) == ["a" * 64, "b" * 64]
    assert pack.remove("a" * 64) and not pack.remove("a" * 64)
    assert pack.read("a" * 64) is None
    pack.close()


def test_concurrent_writers_share_commits(tmp_path: Path) -> None:
    pack = make_pack(tmp_path / "disk")
    ids = [f"{n:064x}" for n in range(400)]

    def writer(chunk: list[str]) -> None:
        tickets = [(block, pack.submit(block, block.encode())) for block in chunk]
        for _, ticket in tickets:
            pack.wait(ticket)

    threads = [threading.Thread(target=writer, args=(ids[i::16],)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(pack.read(block) == block.encode() for block in ids)
    assert pack.commits < len(ids)  # writes were batched
    pack.close()


def test_a_vanished_disk_never_acknowledges_a_write(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    pack = make_pack(root)
    pack.write("a" * 64, b"one")
    shutil.rmtree(root)  # the disk is gone, the writer connection is still open
    with pytest.raises(OSError) as caught:
        pack.write("b" * 64, b"two")
    assert caught.value.errno == errno.ENOENT
    assert not root.exists()  # and nothing was created in its place
    pack.close()


def test_no_database_is_made_on_an_unformatted_folder(tmp_path: Path) -> None:
    root = tmp_path / "blank"
    root.mkdir()
    pack = ShardPack(root, root / "marker")  # no marker: a blank replacement disk
    with pytest.raises(OSError):
        pack.write("a" * 64, b"x")
    assert list(root.iterdir()) == []  # still blank, not "foreign"


def test_a_replaced_database_is_reopened(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    pack = make_pack(root)
    pack.write("a" * 64, b"old")
    (root / PACK_NAME).unlink()  # e.g. the disk was replaced and formatted again
    pack.write("b" * 64, b"new")
    assert pack.read("b" * 64) == b"new"
    pack.close()


def test_sqlite_errors_become_the_errno_a_file_write_would_give(tmp_path: Path) -> None:
    assert _os_error(apsw.FullError("full"), tmp_path).errno == errno.ENOSPC
    assert _os_error(apsw.ReadOnlyError("ro"), tmp_path).errno == errno.EROFS
    assert _os_error(apsw.CantOpenError("gone"), tmp_path).errno == errno.ENOENT
    assert _os_error(apsw.CorruptError("bad"), tmp_path).errno == errno.EIO
