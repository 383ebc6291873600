"""An appliance recovered to an older state: the devices notice and re-send what it lost.

Simulated without the home replication: a real appliance serves two real `cairn sync`
agents; it is stopped cleanly and its database copied; it serves again while the devices
make changes (new files, an edit, a rename, a delete, a new folder, a big file); it is
stopped, the old copy put back — with a new epoch (`renew_epoch`, what `cairnd recover`
does) — and started again. The agents must notice, list the tree again and re-send what
the copy lacks: the blocks are still on the disks (orphans the copy does not know), the
nodes and versions are not. Then a third device reads everything back byte-exact, no
local file was deleted, an edit made in the window is the device's content (not a
conflicted copy), and the devices keep syncing.

An edit made since the restore, by a device that re-sends first or by a third one, is
taken by a device offline meanwhile as the next version of what it synced (downloaded)
when the copy had that version, and kept beside its own when the copy lacked it.

Also: a copy put back by hand without a new epoch (noticed by the cursor) under a folder
first synced in the lost window (made again, not taken for deleted); and the drive, which
lists the tree again and shows no ghost of what the appliance lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import apsw
import pytest
from agent_helpers import cairn_ok, ls_json, make_user, run_cairn, write
from cairnd_helpers import Served, database_rows, free_port, serving
from drive_helpers import state_of
from sync_helpers import Device, devices_of, stop_all, tree_of, wait_converged, wait_for

from appliance.config import ApplianceConfig
from appliance.home import init_home
from appliance.meta.epoch import current_epoch, renew_epoch

NOTICED = "the appliance was restored from an older copy"


def snapshot(config: ApplianceConfig, to: Path) -> None:
    """A consistent copy of the stopped appliance's database (SQLite's backup)."""
    with contextlib.closing(apsw.Connection(str(config.database))) as source, \
            contextlib.closing(apsw.Connection(str(to))) as copy, \
            copy.backup("main", source, "main") as backup:
        backup.step()


def put_back(config: ApplianceConfig, copy: Path, *, new_epoch: bool) -> str:
    """Replace the stopped appliance's database with COPY (renewing its epoch, as a
    recovery does, if NEW_EPOCH); the epoch it then has."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{config.database}{suffix}")
    shutil.copyfile(copy, config.database)
    with contextlib.closing(apsw.Connection(str(config.database))) as db, db:
        return renew_epoch(db) if new_epoch else current_epoch(db)


def idle(device: Device) -> bool:
    """Whether the device's sync says it is idle (everything sent and recorded)."""
    status = cairn_ok(device.home, "status")
    return any(line.strip().startswith(f"sync {device.folder} <-> ") and ": idle" in line
               for line in status.splitlines())


def remote_files(home: Path, folder: str = "/") -> list[tuple[str, int]]:
    """(path, size) of every file the appliance holds under FOLDER (`cairn ls`), sorted;
    two nodes of one name are two items. Nothing while FOLDER is not there."""
    found: list[tuple[str, int]] = []
    listing = run_cairn(home, "ls", "--json", folder)
    if listing.returncode != 0:
        assert "no such" in listing.stderr, listing.stderr
        return []
    for entry in json.loads(listing.stdout):
        path = f"{folder.rstrip('/')}/{entry['name']}"
        if entry["kind"] == "dir":
            found += remote_files(home, path)
        else:
            found.append((path, entry["size"]))
    return sorted(found)


def wait_trees(expected: dict[str, bytes | None], *devices: Device,
               timeout: float = 120) -> None:
    """Wait until every device's folder is EXPECTED (not merely equal to the others':
    they are equal for a moment while both still lack a download)."""
    def reached() -> bool:
        return all(tree_of(d.folder) == expected for d in devices)
    try:
        wait_for(reached, timeout, "the expected trees", every=0.1)
    except AssertionError:
        detail = "\n".join(f"--- {d.name}: {sorted(tree_of(d.folder))}\n"
                           f"{d.log_text()[-3000:]}" for d in devices)
        raise AssertionError(f"expected {sorted(expected)}\n{detail}") from None


@pytest.mark.slow
def test_devices_resend_what_a_restored_appliance_lost(tmp_path: Path) -> None:
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    listen = ("--listen", f"127.0.0.1:{free_port()}")   # the same address after restarts
    big = os.urandom(6 * 1024 * 1024 + 123)             # two blocks, sent by URL
    copy = tmp_path / "appliance-copy.db"
    with serving(config.home, *listen) as server:
        alice = make_user(Served(config, server), "alice")
        laptop, desktop, phone = devices_of(alice, tmp_path, "laptop", "desktop", "phone")
        try:
            laptop.start()
            desktop.start()
            write(laptop.folder / "old.txt", "from before the copy")
            write(laptop.folder / "edited.txt", "version 1")
            write(laptop.folder / "renamed-before.txt", "renamed in the window")
            write(laptop.folder / "deleted.txt", "deleted in the window")
            write(laptop.folder / "keep/deep.txt", "deep")
            wait_converged(laptop, desktop)
            assert server.stop() == 0         # the agents run on, offline, throughout
            snapshot(config, copy)
            before_nodes = database_rows(config, "SELECT count(*) FROM nodes")[0][0]

            with serving(config.home, *listen) as window:
                write(laptop.folder / "new.txt", "made in the window")
                write(laptop.folder / "edited.txt", "version 2, made in the window")
                (laptop.folder / "renamed-before.txt").rename(
                    laptop.folder / "renamed-after.txt")
                write(desktop.folder / "fresh/inside.txt", "a folder made in the window")
                write(desktop.folder / "keep/deep2.txt", "beside an old file")
                # (deleted after the new files exist: a new file taking a deleted one's
                # inode in the same scan is a move of that node, not a delete)
                (desktop.folder / "deleted.txt").unlink()
                (laptop.folder / "big.bin").write_bytes(big)
                window_tree = wait_converged(laptop, desktop, timeout=90)
                assert "deleted.txt" not in window_tree
                wait_for(lambda: all(idle(d) for d in (laptop, desktop)), timeout=30,
                         what="both devices to be idle")
                assert window.stop() == 0
            after_nodes = database_rows(config, "SELECT count(*) FROM nodes")[0][0]
            assert after_nodes > before_nodes

            epoch = put_back(config, copy, new_epoch=True)
            assert database_rows(config, "SELECT count(*) FROM nodes")[0][0] == before_nodes
            with serving(config.home, *listen) as restored:
                for device in (laptop, desktop):
                    wait_for(lambda d=device: NOTICED in d.log_text(), timeout=60,
                             what=f"{device.name} to notice the restore")
                # Nothing a device had is lost (no conflicted copy either: the edit made
                # in the window is the device's content); only a delete made in the
                # window is undone.
                tree = dict(window_tree)
                tree["deleted.txt"] = b"deleted in the window"
                assert tree["edited.txt"] == b"version 2, made in the window"
                assert tree["big.bin"] == big
                wait_trees(tree, laptop, desktop)

                # The appliance has it all again: a third device reads it back exactly.
                want = sorted((f"/{p}", len(v)) for p, v in tree.items() if v is not None)
                wait_for(lambda: remote_files(phone.home) == want, timeout=60,
                         what="the appliance to hold every file again, once")
                for path, size in want:
                    out = tmp_path / "get" / path.strip("/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    cairn_ok(phone.home, "get", path, out)
                    assert out.read_bytes() == tree[path.strip("/")], path
                    assert size == out.stat().st_size
                for device in (laptop, desktop):
                    assert device.log_text().count(NOTICED) == 1, device.log_text()[-3000:]
                    assert re.search(r"after the restore: \d+ items it lost",
                                     device.log_text())

                # ... and the devices keep syncing, in the new history.
                write(desktop.folder / "later.txt", "after the restore")
                (laptop.folder / "old.txt").unlink()
                del tree["old.txt"]
                tree["later.txt"] = b"after the restore"
                wait_trees(tree, laptop, desktop, timeout=60)
                assert database_rows(
                    config, "SELECT value FROM appliance_state WHERE key = 'epoch'"
                ) == [(epoch,)]
                stop_all(laptop, desktop)
                assert restored.stop() == 0
                assert "Traceback" not in restored.stderr(), restored.stderr()[-3000:]
        finally:
            stop_all(laptop, desktop)


@pytest.mark.slow
def test_an_edit_made_since_the_restore_is_no_conflict_where_the_copy_had_the_base(
        tmp_path: Path) -> None:
    """The laptop and the desktop synced a.txt and b.txt (version 1, which the copy holds);
    the desktop edits both in the window (version 2, lost); after the restore a third
    device edits b.txt from the copy's version 1 before the desktop notices. The desktop
    sends a.txt again (the copy's version is older) and meets a true conflict on b.txt
    (its version 2 was lost, the phone's edit is concurrent with it): both kept. The
    laptop, offline all along, synced version 1 of both, which the copy had: what
    changed since is the next version of what it holds — downloaded, no conflicted copy
    of its own (the false conflict of issue 14: its stale file kept the name)."""
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    listen = ("--listen", f"127.0.0.1:{free_port()}")
    copy = tmp_path / "appliance-copy.db"
    edited = {"a.txt": b"a, version 2, from the desktop in the window",
              "b.txt": b"b, version 2, from the desktop in the window"}
    theirs = b"b from the phone, since the restore"
    with serving(config.home, *listen) as server:
        alice = make_user(Served(config, server), "alice")
        laptop, desktop, phone = devices_of(alice, tmp_path, "laptop", "desktop", "phone")
        try:
            write(laptop.folder / "a.txt", "a, version 1")
            write(laptop.folder / "b.txt", "b, version 1")
            laptop.start()
            desktop.start()
            wait_converged(laptop, desktop)
            wait_for(lambda: all(idle(d) for d in (laptop, desktop)), timeout=30,
                     what="both devices to be idle")
            stop_all(laptop, desktop)          # the laptop stays offline until the end
            assert server.stop() == 0
            snapshot(config, copy)

            with serving(config.home, *listen) as window:
                desktop.start()
                for name, data in edited.items():
                    write(desktop.folder / name, data)
                wait_for(lambda: remote_files(phone.home) == sorted(
                    (f"/{n}", len(d)) for n, d in edited.items()), timeout=60,
                         what="the desktop's edits to reach the appliance")
                wait_for(lambda: idle(desktop), timeout=30, what="the desktop to be idle")
                desktop.stop()
                assert window.stop() == 0

            put_back(config, copy, new_epoch=True)
            with serving(config.home, *listen) as restored:
                cairn_ok(phone.home, "put", write(tmp_path / "phone-b.txt", theirs),
                         "/b.txt")
                desktop.start()
                wait_for(lambda: len(remote_files(phone.home)) == 3 and idle(desktop),
                         timeout=60, what="the desktop to send its edits again")
                expected = tree_of(desktop.folder)
                copies = [name for name in expected if "conflicted copy" in name]
                assert len(copies) == 1 and expected[copies[0]] == theirs, expected
                assert {k: v for k, v in expected.items() if k not in copies} == edited
                assert "1 changed since are compared" in desktop.log_text()

                laptop.start()
                wait_for(lambda: NOTICED in laptop.log_text(), timeout=60,
                         what="the laptop to notice the restore")
                wait_trees(expected, laptop, desktop)
                assert "0 changed since are compared, 2 changed since on the version " \
                    "synced here" in laptop.log_text(), laptop.log_text()[-3000:]
                assert "conflict: " not in laptop.log_text().split(NOTICED, 1)[1]
                stop_all(laptop, desktop)
                assert restored.stop() == 0
                assert "Traceback" not in restored.stderr(), restored.stderr()[-3000:]
        finally:
            stop_all(laptop, desktop)


@pytest.mark.slow
def test_a_copy_put_back_by_hand_and_a_folder_first_synced_in_the_window(
        tmp_path: Path) -> None:
    """No new epoch (a database put back by hand): the device notices by its cursor,
    above the appliance's newest. Its synced remote folder itself was made in the lost
    window: it is made again (the same id, derived from parent and name), not taken for
    deleted."""
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    listen = ("--listen", f"127.0.0.1:{free_port()}")
    copy = tmp_path / "appliance-copy.db"
    with serving(config.home, *listen) as server:
        user = make_user(Served(config, server), "bob")
        (laptop,) = devices_of(user, tmp_path, "laptop")
        laptop.extra = ("--remote", "/projects/cairn")
        cairn_ok(laptop.home, "put", write(tmp_path / "a.txt", "before"), "/a.txt")
        assert server.stop() == 0
        snapshot(config, copy)
        try:
            with serving(config.home, *listen) as window:
                write(laptop.folder / "plan.txt", "written in the window")
                write(laptop.folder / "src/main.py", "print('hi')")
                laptop.start()
                wait_for(lambda: remote_files(laptop.home, "/projects") == [
                    ("/projects/cairn/plan.txt", 21), ("/projects/cairn/src/main.py", 11)],
                         timeout=60, what="the first sync")
                wait_for(lambda: idle(laptop), timeout=30, what="the device to be idle")
                assert window.stop() == 0
            put_back(config, copy, new_epoch=False)
            with serving(config.home, *listen) as restored:
                wait_for(lambda: NOTICED in laptop.log_text(), timeout=60,
                         what="the device to notice the restore")
                assert "older than" in laptop.log_text()          # by its cursor
                wait_for(lambda: remote_files(laptop.home, "/projects") == [
                    ("/projects/cairn/plan.txt", 21), ("/projects/cairn/src/main.py", 11)],
                         timeout=60, what="the folder and its files to be sent again")
                assert "made /projects/cairn again" in laptop.log_text()
                assert tree_of(laptop.folder) == {"plan.txt": b"written in the window",
                                                  "src": None,
                                                  "src/main.py": b"print('hi')"}
                assert sorted(e["name"] for e in ls_json(laptop.home, "/")) == [
                    "a.txt", "projects"]
                laptop.stop()
                assert restored.stop() == 0
        finally:
            laptop.stop()


@pytest.mark.root
@pytest.mark.slow
def test_the_drive_lists_again_after_a_restore(tmp_path: Path, drives: Any) -> None:
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    listen = ("--listen", f"127.0.0.1:{free_port()}")
    copy = tmp_path / "appliance-copy.db"
    with serving(config.home, *listen) as server:
        user = make_user(Served(config, server), "drive")
        home = user.join(tmp_path / "a", "laptop")
        other = user.join(tmp_path / "b", "desktop")
        cairn_ok(home, "put", write(tmp_path / "old.txt", "from before the copy"), "/old.txt")
        drive = drives(home, tmp_path / "mnt").start()
        mnt = drive.mountpoint
        assert server.stop() == 0                  # the drive stays mounted, offline
        snapshot(config, copy)
        big = os.urandom(5 * 1024 * 1024 + 7)
        written = {"/old.txt": b"edited through the mount in the window",
                   "/mine.txt": b"written through the mount in the window",
                   "/made/inside.bin": big}
        with serving(config.home, *listen) as window:
            cairn_ok(other, "put", write(tmp_path / "theirs.txt", "lost"), "/theirs.txt")
            (mnt / "made").mkdir()
            for path, data in written.items():
                (mnt / path.strip("/")).write_bytes(data)
            for path in written:
                wait_for(lambda p=path: state_of(mnt / p.strip("/")) == "cached",
                         timeout=60, what=f"{path} to be uploaded")
            wait_for(lambda: (mnt / "theirs.txt").exists(), timeout=30,
                     what="the drive to show the other device's file")
            assert window.stop() == 0
        put_back(config, copy, new_epoch=True)
        with serving(config.home, *listen) as restored:
            wait_for(lambda: NOTICED in drive.log_text(), timeout=60,
                     what="the drive to notice the restore")
            # Listed again: no ghost of what the appliance lost and no device holds (a
            # `cairn put` keeps nothing to send again); what the drive wrote in the
            # window is sent again from its block cache, as it was.
            wait_for(lambda: sorted(os.listdir(mnt)) == ["made", "mine.txt", "old.txt"],
                     timeout=30, what="the drive to show the restored tree")
            assert not (mnt / "theirs.txt").exists()
            for path, data in written.items():
                assert (mnt / path.strip("/")).read_bytes() == data, path
            want = sorted((path, len(data)) for path, data in written.items())
            wait_for(lambda: remote_files(other) == want, timeout=60,
                     what="the appliance to hold what the drive wrote again")
            for path, data in written.items():
                out = tmp_path / "get" / path.strip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                cairn_ok(other, "get", path, out)
                assert out.read_bytes() == data, path
            assert "sending them again" in drive.log_text()
            (mnt / "after.txt").write_text("written after the restore")
            wait_for(lambda: "/after.txt" in dict(remote_files(other)), timeout=30,
                     what="a write after the restore to reach the appliance")
            assert drive.stop() == 0
            assert restored.stop() == 0
            assert "Traceback" not in drive.log_text()
