"""The safety promises of `cairn sync`, one test each, with a real appliance (the session's,
a user per test) and real agents (`cairn sync` subprocesses):
a vanished or emptied folder pauses instead of deleting, a mass deletion waits for
confirmation, a full disk pauses downloads and deletes nothing, a new device's existing
files are merged (never wiped), and a download never replaces a file that changed while it
was being fetched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from agent_helpers import CAIRN, MakeUser, User, agent_env, ls_json, run_cairn, write
from sync_helpers import Device, devices_of, stop_all, tree_of, wait_converged, wait_for

from agent import operations as ops
from agent.home import AgentHome
from agent.sync.engine import SyncEngine, SyncOptions, open_folder
from agent.sync.model import Download
from agent.sync.planner import plan
from agent.sync.state import SyncDb

COPY = "conflicted copy from"


@pytest.fixture
def alice(fresh_user: MakeUser) -> User:
    return fresh_user("alice")


@pytest.fixture
def pair(tmp_path: Path, alice: User) -> Iterator[tuple[Device, Device]]:
    laptop, desktop = devices_of(alice, tmp_path, "laptop", "desktop")
    yield laptop, desktop
    stop_all(laptop, desktop)


def status_of(device: Device) -> dict[str, object]:
    """The device's synced folder in `cairn status --json` ({} until it is registered)."""
    report = json.loads(run_cairn(device.home, "status", "--json").stdout)
    assert len(report["sync"]) <= 1
    return dict(report["sync"][0]) if report["sync"] else {}


def paused_because(device: Device, *words: str) -> bool:
    folder = status_of(device)
    detail = str(folder.get("detail"))
    return folder.get("state") == "paused" and all(w in detail for w in words)


def seeded(pair: tuple[Device, Device], files: int) -> dict[str, bytes | None]:
    laptop, desktop = pair
    for index in range(files):
        write(laptop.folder / f"f{index:02}.txt", f"file {index}")
    laptop.start()
    desktop.start()
    return wait_converged(laptop, desktop)


def test_a_vanished_folder_pauses_and_deletes_nothing(pair: tuple[Device, Device]) -> None:
    laptop, desktop = pair
    before = seeded(pair, 3)
    moved = laptop.folder.with_name("unmounted")
    os.rename(laptop.folder, moved)                  # the drive is unplugged
    wait_for(lambda: paused_because(laptop, "missing"), what="the pause")
    assert tree_of(desktop.folder) == before
    assert len(ls_json(desktop.home)) == 3
    os.rename(moved, laptop.folder)                  # and back
    wait_for(lambda: status_of(laptop)["state"] == "idle", what="the resume")
    assert wait_converged(laptop, desktop) == before


def test_an_emptied_folder_pauses_until_confirmed(pair: tuple[Device, Device]) -> None:
    laptop, desktop = pair
    before = seeded(pair, 3)
    for path in laptop.folder.iterdir():             # a mount point with nothing mounted
        path.unlink()
    wait_for(lambda: paused_because(laptop, "empty", "--allow-mass-delete"),
             what="the pause")
    assert tree_of(desktop.folder) == before
    assert len(ls_json(desktop.home)) == 3
    laptop.stop()
    laptop.start("--allow-mass-delete")              # the user meant it
    assert wait_converged(laptop, desktop) == {}
    trash = json.loads(run_cairn(desktop.home, "trash", "--json").stdout)
    assert len(trash) == 3                           # recoverable with cairn restore


def test_a_mass_deletion_waits_for_confirmation(pair: tuple[Device, Device]) -> None:
    laptop, desktop = pair
    seeded(pair, 20)
    for index in range(15):
        (laptop.folder / f"f{index:02}.txt").unlink()
    wait_for(lambda: paused_because(laptop, "15 of 20", "--allow-mass-delete"),
             what="the pause")
    assert len(tree_of(desktop.folder)) == 20
    assert len(ls_json(desktop.home)) == 20
    # a small deletion below the threshold goes through without asking
    laptop.stop()
    shutil.copy(desktop.folder / "f00.txt", laptop.folder / "f00.txt")
    laptop.start("--allow-mass-delete")
    tree = wait_converged(laptop, desktop)
    assert sorted(tree) == ["f00.txt"] + [f"f{i:02}.txt" for i in range(15, 20)]


@pytest.mark.slow
def test_a_full_disk_pauses_downloads_and_deletes_nothing(tmp_path: Path, alice: User
                                                          ) -> None:
    laptop, desktop = devices_of(alice, tmp_path, "laptop", "desktop")
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        desktop.folder = small / "folder"
        desktop.folder.mkdir()
        write(desktop.folder / "mine.txt", "written on the desktop")
        write(laptop.folder / "notes.txt", "fits")
        write(laptop.folder / "huge.bin", os.urandom(12 * 1024 * 1024))   # does not fit
        laptop.start()
        wait_for(lambda: "uploaded huge.bin" in laptop.log_text(), timeout=60,
                 what="the upload")
        desktop.process = subprocess.Popen(
            [*CAIRN, "--home", str(desktop.home), "sync", str(desktop.folder), "-v"],
            stdout=open(desktop.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            stdin=subprocess.DEVNULL, env=agent_env(CAIRN_SYNC_DISK_RETRY_S="4"))
        wait_for(lambda: paused_because(desktop, "disk is full"), timeout=60,
                 what="downloads to pause")
        assert (desktop.folder / "notes.txt").read_bytes() == b"fits"
        assert (desktop.folder / "mine.txt").read_bytes() == b"written on the desktop"
        assert not (desktop.folder / "huge.bin").exists()
        wait_for(lambda: (laptop.folder / "mine.txt").exists(), what="uploads to go on")
        names = {entry["name"] for entry in ls_json(laptop.home)}
        assert names == {"notes.txt", "huge.bin", "mine.txt"}    # nothing deleted
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        tree = wait_converged(laptop, desktop, timeout=60)       # retried, and done
        assert len(tree["huge.bin"] or b"") == 12 * 1024 * 1024
    finally:
        stop_all(laptop, desktop)
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_new_device_merges_what_its_folder_already_holds(
        tmp_path: Path, pair: tuple[Device, Device], alice: User) -> None:
    laptop, _ = pair
    write(laptop.folder / "same.txt", "identical on both")
    write(laptop.folder / "differs.txt", "the laptop's text")
    write(laptop.folder / "only-laptop.txt", "laptop")
    laptop.start()
    wait_for(lambda: len(ls_json(laptop.home)) == 3, what="the upload")
    [phone] = devices_of(alice, tmp_path, "phone")
    write(phone.folder / "same.txt", "identical on both")
    write(phone.folder / "differs.txt", "the phone's text")
    write(phone.folder / "only-phone.txt", "phone")
    try:
        phone.start()
        tree = wait_converged(laptop, phone)
    finally:
        phone.stop()
    assert tree["same.txt"] == b"identical on both"
    assert tree["only-laptop.txt"] == b"laptop" and tree["only-phone.txt"] == b"phone"
    assert tree["differs.txt"] == b"the laptop's text"
    kept = {path: data for path, data in tree.items() if COPY in path}
    assert list(kept.values()) == [b"the phone's text"]
    assert next(iter(kept)).startswith("differs (conflicted copy from phone ")
    assert len(tree) == 5


def test_a_download_never_replaces_a_file_changed_meanwhile(
        pair: tuple[Device, Device]) -> None:
    laptop, desktop = pair
    seeded(pair, 1)
    desktop.stop()
    write(laptop.folder / "f00.txt", "the laptop's edit")
    wait_for(lambda: any(e["size"] == len("the laptop's edit") for e in ls_json(laptop.home)),
             what="the laptop's upload")

    async def plan_then_edit_then_execute() -> list[tuple[str, str]]:
        home = AgentHome(desktop.home)
        async with ops.session(home) as tree:
            db = SyncDb.of_home(desktop.home)
            try:
                folder = await open_folder(tree, db, desktop.folder, "/")
                engine = SyncEngine(tree, db, folder, SyncOptions(once=True))
                await engine.mirror.refresh()
                from agent.sync.ignore import IgnoreRules
                scan = engine._scan(IgnoreRules.load(desktop.folder))
                base = db.base_entries(folder.id)
                current = plan(scan.entries, engine.mirror.entries(), base)
                assert [type(a) for a in current.actions] == [Download]
                # the user saves the file while the download is on its way
                write(desktop.folder / "f00.txt", "the desktop's edit, meanwhile")
                outcome = await engine._execute(current)
                return outcome.failed
            finally:
                db.close()

    failed = trio.run(plan_then_edit_then_execute)
    assert failed and "changed while it was being downloaded" in failed[0][1]
    assert (desktop.folder / "f00.txt").read_bytes() == b"the desktop's edit, meanwhile"
    assert not [p for p in os.listdir(desktop.folder) if p.endswith(".cairn-part")]
    desktop.start()                                   # and then: both versions are kept
    tree = wait_converged(laptop, desktop)
    assert sorted(data for data in tree.values() if data) == [
        b"the desktop's edit, meanwhile", b"the laptop's edit"]


def test_a_deleted_remote_folder_pauses_and_resumes_when_restored(
        pair: tuple[Device, Device]) -> None:
    laptop, desktop = pair
    write(laptop.folder / "a.txt", "a")
    write(laptop.folder / "sub/b.txt", "b")
    laptop.start("--remote", "/work")
    wait_for(lambda: "uploaded sub/b.txt" in laptop.log_text(), what="the upload")
    assert run_cairn(desktop.home, "rm", "-r", "/work").returncode == 0
    wait_for(lambda: paused_because(laptop, "/work was deleted"), what="the pause")
    assert sorted(tree_of(laptop.folder)) == ["a.txt", "sub", "sub/b.txt"]
    assert run_cairn(desktop.home, "restore", "/work").returncode == 0
    wait_for(lambda: status_of(laptop).get("state") == "idle", what="the resume")
    write(laptop.folder / "c.txt", "after")
    wait_for(lambda: "c.txt" in {e["name"] for e in ls_json(desktop.home, "/work")},
             what="syncing again")
    assert sorted(tree_of(laptop.folder)) == ["a.txt", "c.txt", "sub", "sub/b.txt"]
