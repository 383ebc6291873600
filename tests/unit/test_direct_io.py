"""Writes and reads around the page cache (O_DIRECT) — the appliance's shard files
(appliance/storage/direct_io.py) and the agent's downloaded blocks (agent/direct_write.py):
every length comes back byte for byte, alignment is handled for any size and offset, and a
filesystem without O_DIRECT gets the ordinary path with nothing lost."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import blake3
import pytest
from storage_fixtures import MiB, disk_specs, format_disks, open_store

from agent.buffers import thread_buffer
from agent.direct_write import open_direct, write_block
from appliance.storage.direct_io import ALIGN, open_new_file, read_direct, write_direct

SIZES = [1, ALIGN - 1, ALIGN, ALIGN + 1, MiB + 176, 3 * MiB + 5]


def _takes_o_direct(folder: Path) -> bool:
    try:
        os.close(os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        (folder / ".probe").unlink(missing_ok=True)
    return True


@pytest.fixture
def no_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every open asking for O_DIRECT refused as a filesystem without it refuses it (EINVAL,
    after creating the file). tmpfs took O_DIRECT from Linux 6.6 on, and FUSE filesystems
    differ, so the refusal is injected."""
    real_open = os.open

    def refusing_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, mode, **kwargs))
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


@pytest.mark.parametrize("size", SIZES)
def test_a_shard_file_round_trips_through_o_direct(tmp_path: Path, size: int) -> None:
    if not _takes_o_direct(tmp_path):
        pytest.skip("this filesystem does not take O_DIRECT")
    header, payload = os.urandom(96), os.urandom(size)
    fd, direct = open_new_file(tmp_path / "shard", direct=True)
    try:
        assert direct and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        write_direct(fd, [header, memoryview(payload)])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "shard").read_bytes() == header + payload
    assert read_direct(tmp_path / "shard") == header + payload


def test_a_filesystem_without_o_direct_gets_the_ordinary_path(no_o_direct: None,
                                                              tmp_path: Path) -> None:
    fd, direct = open_new_file(tmp_path / "shard", direct=True)
    try:
        assert not direct and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        os.write(fd, b"shard")
    finally:
        os.close(fd)
    assert read_direct(tmp_path / "shard") is None
    assert open_direct(tmp_path / "shard") is None


def test_a_store_without_o_direct_falls_back_and_keeps_every_block(no_o_direct: None,
                                                                   tmp_path: Path) -> None:
    specs = disk_specs(tmp_path / "disks")
    format_disks(specs)
    store = open_store(tmp_path, specs)
    try:
        blocks = {}
        for seed in range(3):
            data = os.urandom(MiB + seed)
            block_id = blake3.blake3(data).hexdigest()
            store.put(block_id, data)
            blocks[block_id] = data
        assert all(store.get(block_id) == data for block_id, data in blocks.items())
        assert not any(disk._direct for disk in store.disks)   # asked once, not per shard
    finally:
        store.close()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", [0, 4 * MiB])
def test_a_block_lands_at_its_offset_directly_and_its_tail_buffered(
        tmp_path: Path, size: int, offset: int) -> None:
    path = tmp_path / "part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    direct_fd = open_direct(path)
    try:
        os.ftruncate(fd, offset + size + 10)
        data = os.urandom(size)
        buffer = thread_buffer(size, "plain")
        buffer[:size] = data
        write_block(fd, direct_fd, buffer[:size], offset)
        write_block(fd, direct_fd, b"0123456789", offset + size)   # unaligned: buffered
        os.fsync(fd)
    finally:
        os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)
    content = path.read_bytes()
    assert content[offset:] == data + b"0123456789"
    assert content[:offset] == bytes(offset)


def test_thread_buffers_are_aligned_reused_and_grown() -> None:
    first = thread_buffer(10, "plain")
    assert len(first) >= 10
    again = thread_buffer(5, "plain")
    assert again.obj is first.obj   # the same mmap: its pages stay faulted in
    assert thread_buffer(5, "cipher").obj is not first.obj
    bigger = thread_buffer(len(first) + 1, "plain")
    assert len(bigger) > len(first) and bigger.obj is not first.obj
