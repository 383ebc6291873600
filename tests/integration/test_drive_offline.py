"""The drive without its appliance, and within a tiny cache: an appliance of the test's
own (stopped and started again on the same address), real mounts."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from agent_helpers import cairn_ok, ls_json, make_user, write
from cairnd_helpers import Served, free_port, serving
from drive_helpers import state_of
from sync_helpers import wait_for

from appliance.home import init_home

pytestmark = pytest.mark.root
MiB = 1024 * 1024


def test_offline_reads_fail_fast_writes_wait(tmp_path: Path, drives) -> None:
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    listen = ("--listen", f"127.0.0.1:{free_port()}")
    with serving(config.home, *listen) as server:
        user = make_user(Served(config, server), "offline")
        home = user.join(tmp_path / "a", "laptop")
        other = user.join(tmp_path / "b", "desktop")
        warm, cold = os.urandom(6 * MiB), os.urandom(5 * MiB)
        cairn_ok(home, "put", write(tmp_path / "warm.bin", warm), "/warm.bin")
        cairn_ok(home, "put", write(tmp_path / "cold.bin", cold), "/cold.bin")
        drive = drives(home, tmp_path / "mnt").start()
        mnt = drive.mountpoint
        assert (mnt / "warm.bin").read_bytes() == warm
        assert server.stop() == 0

        assert (mnt / "warm.bin").read_bytes() == warm        # cached: still readable
        assert sorted(os.listdir(mnt)) == ["cold.bin", "warm.bin"]
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            (mnt / "cold.bin").read_bytes()
        assert raised.value.errno == errno.EIO
        assert time.monotonic() - started < 1.0
        assert "read failed: " in drive.log_text()               # and says why

        (mnt / "offline.txt").write_text("written offline\n")
        (mnt / "folder").mkdir()
        (mnt / "folder" / "inside.txt").write_text("inside\n")
        os.rename(mnt / "warm.bin", mnt / "folder" / "warm.bin")
        time.sleep(2)                                         # past the write-back delay
        assert state_of(mnt / "offline.txt") == "dirty"
        assert drive.stop() == 75                         # unmounted; the changes stay staged
        assert "stay staged" in drive.log_text()

        started = time.monotonic()                            # a warm index, no appliance
        drive.start()
        # It waited on no connection (a timeout would be 5 s or more); bench/mount.py
        # measures how fast it is (target < 1 s).
        assert time.monotonic() - started < 4.0
        assert (mnt / "offline.txt").read_text() == "written offline\n"
        assert (mnt / "folder" / "warm.bin").read_bytes() == warm

        with serving(config.home, *listen) as again:
            assert again.url == server.url
            wait_for(lambda: state_of(mnt / "offline.txt") == "cached", timeout=30,
                     what="the offline write to be uploaded")
            wait_for(lambda: {e["name"] for e in ls_json(other, "/folder")}
                     == {"inside.txt", "warm.bin"}, timeout=30, what="the folder")
            local = tmp_path / "fetched"
            local.mkdir()
            cairn_ok(other, "get", "/folder/warm.bin", local / "warm.bin")
            assert (local / "warm.bin").read_bytes() == warm
            assert (mnt / "cold.bin").read_bytes() == cold
            assert drive.stop() == 0
            assert again.stop() == 0


def cache_bytes(home: Path) -> int:
    blocks = home / "drive" / "cache" / "blocks"
    return sum(f.stat().st_size for f in blocks.rglob("*") if f.is_file())


def test_a_tiny_cache_is_never_exceeded(fresh_user, drives, tmp_path: Path) -> None:
    home = fresh_user().join(tmp_path / "a")
    files = {f"f{i}.bin": os.urandom(3 * MiB) for i in range(6)}
    for name, data in files.items():
        cairn_ok(home, "put", write(tmp_path / name, data), f"/{name}")
    drive = drives(home, tmp_path / "mnt", "--cache-size", "8M").start()
    mnt = drive.mountpoint
    for name, data in files.items():                      # 18 MiB through an 8 MiB cache
        assert (mnt / name).read_bytes() == data
        assert cache_bytes(home) <= 8 * MiB
    # unsent writes share the budget
    with pytest.raises(OSError) as raised, open(mnt / "huge.bin", "wb") as handle:
        for _ in range(12):
            handle.write(os.urandom(MiB))
    assert raised.value.errno == errno.ENOSPC
    assert cache_bytes(home) <= 8 * MiB
    os.unlink(mnt / "huge.bin")
    (mnt / "small.txt").write_text("still fine\n")
    wait_for(lambda: state_of(mnt / "small.txt") in ("cached", "cloud"), timeout=30,
             what="the small file's upload")
    assert drive.stop() == 0
