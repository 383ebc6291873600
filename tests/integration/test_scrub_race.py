"""Issue 14's false "unrecoverable": a scrub rebuilds two replaced disks while the
appliance serves, one byte is flipped in a shard on a third disk, and a read right after
must still succeed (4 healthy shards of 6 remain on disk).

The cause: the serving process caches each disk's state for up to PROBE_INTERVAL (2 s).
Reads during the rebuild keep that view at "blank" for the two replaced disks, so a read
in the seconds after the scrub skipped them, counted only the shards on the other disks,
met the flipped one and called the block unrecoverable. Fixed twice over: a read that comes
up short re-probes the disks it skipped, and `cairnd scrub` runs inside the serving process
(its admin socket), whose disk objects are the ones that get formatted.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from appliance.storage.disk import PROBE_INTERVAL
from tests.api_helpers import add_user, create_file, download, enroll, make_root, upload
from tests.cairnd_helpers import run_cairnd, served_appliance

BLOCK = 1024 * 1024   # erasure-coded (above the small-block limit): one shard per disk


def _flip_a_byte_in_every_shard(disk: Path) -> int:
    flipped = 0
    for shard in (disk / "shards").rglob("*"):
        if shard.is_file() and len(shard.name) == 64:
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0x01          # a payload byte: the shard checksum no longer holds
            shard.write_bytes(bytes(data))
            flipped += 1
    return flipped


def test_a_read_right_after_a_scrub_that_rebuilt_two_disks_sees_them(tmp_path: Path) -> None:
    with served_appliance(tmp_path / "home") as (config, server):
        device = enroll(server.url, config.tls_certificate, add_user(config.home, "alice"))
        try:
            root = make_root(device)
            blocks = [os.urandom(BLOCK) for _ in range(3)]
            created = create_file(device, root["id"], blocks)
            upload(device, created["upload"], blocks)
            node_id = created["node"]["id"]
            assert download(device, node_id) == b"".join(blocks)

            disks = [spec.path for spec in config.store.disks]
            for replaced in disks[:2]:
                shutil.rmtree(replaced)
                replaced.mkdir()
            time.sleep(PROBE_INTERVAL + 0.5)   # the server's next read sees them blank
            assert download(device, node_id) == b"".join(blocks)  # degraded: 4 of 6

            # Users keep reading while the scrub rebuilds (this keeps the server's view of
            # the replaced disks fresh as "blank" right up to their formatting).
            stop = threading.Event()
            failures: list[str] = []

            def keep_reading() -> None:
                while not stop.is_set():
                    try:
                        if download(device, node_id) != b"".join(blocks):
                            failures.append("wrong bytes")
                    except AssertionError as exc:
                        failures.append(str(exc))

            reader = threading.Thread(target=keep_reading)
            reader.start()
            try:
                scrub = run_cairnd("scrub", "--home", config.home, "--json", timeout=120)
            finally:
                stop.set()
                reader.join(30)
            assert scrub.returncode == 0, scrub.stderr
            assert failures == [], failures[:3]

            # One byte flipped in every shard on a third disk: 5 healthy shards of 6 remain
            # per block (the two rebuilt disks hold good ones), so every read must succeed.
            assert _flip_a_byte_in_every_shard(disks[2]) == len(blocks)
            assert download(device, node_id) == b"".join(blocks)
        finally:
            device.close()
