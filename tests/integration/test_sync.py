"""`cairn sync` end to end: a real appliance on 127.0.0.1 (the session's, with a user of
each test's own; a test restarting it has its own) and two or three real agents
(`cairn sync DIR` subprocesses, each with its own home and folder), changing files the way
users do and checking every folder ends up identical — and that nothing anyone wrote is
lost: offline edits, concurrent edits (conflicted copies), edit against delete, the
appliance restarting mid-sync, an agent killed mid-download, and SIGTERM or Ctrl-C stopping
an agent cleanly (exit 0) with a restart picking up where it stopped."""

from __future__ import annotations

import math
import os
import shutil
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from agent_helpers import MakeUser, ls_json, make_user, run_cairn, write
from cairnd_helpers import Served, free_port, serving
from sync_helpers import (
    LINK,
    Device,
    devices_of,
    part_files,
    stop_all,
    tree_of,
    wait_converged,
    wait_for,
)

from agent import download as download_module
from agent import operations as ops
from agent.crypto.blocks import BLOCK_SIZE, encrypt_block
from agent.crypto.nodes import NodeMeta
from agent.download import download_file
from agent.errors import LocalFileError, UploadStalledError
from agent.home import AgentHome
from agent.remote import RemoteTree, Target
from agent.sync.engine import SyncEngine, SyncOptions, open_folder
from agent.sync.state import SyncDb
from agent.upload import announce, upload_file
from appliance.home import init_home

COPY = "conflicted copy from"


@pytest.fixture
def devices(tmp_path: Path, fresh_user: MakeUser) -> Iterator[list[Device]]:
    """Three devices of a new user of the session's appliance."""
    trio_of = devices_of(fresh_user("alice"), tmp_path, "laptop", "desktop", "tablet")
    yield trio_of
    stop_all(*trio_of)


def read_or_none(path: Path) -> bytes | None:
    """The file's bytes, or None while it is not there (being replaced)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def copies(tree: dict[str, bytes | None]) -> dict[str, bytes | None]:
    return {path: data for path, data in tree.items() if COPY in path}


def test_changes_on_one_device_reach_the_others(devices: list[Device]) -> None:
    laptop, desktop, tablet = devices
    for device in devices:
        device.start()
    write(laptop.folder / "notes.txt", "first")
    write(laptop.folder / "docs/report.md", "# report")
    (laptop.folder / "empty").mkdir()
    script = laptop.folder / "run.sh"
    write(script, "#!/bin/sh\necho hi\n")
    os.chmod(script, 0o755)
    os.utime(script, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    tree = wait_converged(*devices)
    assert tree["notes.txt"] == b"first" and tree["docs/report.md"] == b"# report"
    assert tree["empty"] is None
    for device in (desktop, tablet):
        info = os.stat(device.folder / "run.sh")
        assert stat.S_IMODE(info.st_mode) == 0o755
        assert info.st_mtime_ns == 1_600_000_000_123_456_789

    write(desktop.folder / "notes.txt", "edited on the desktop")            # edit
    assert wait_converged(*devices)["notes.txt"] == b"edited on the desktop"
    os.rename(tablet.folder / "notes.txt", tablet.folder / "renamed.txt")   # rename
    os.rename(tablet.folder / "docs", tablet.folder / "papers")            # move a folder
    tree = wait_converged(*devices)
    assert "notes.txt" not in tree and tree["renamed.txt"] == b"edited on the desktop"
    assert tree["papers/report.md"] == b"# report" and "docs" not in tree
    os.rename(laptop.folder / "renamed.txt", laptop.folder / "papers/renamed.txt")
    tree = wait_converged(*devices)
    assert tree["papers/renamed.txt"] == b"edited on the desktop"
    os.unlink(desktop.folder / "papers/renamed.txt")                         # delete
    os.rmdir(desktop.folder / "empty")
    tree = wait_converged(*devices)
    assert "papers/renamed.txt" not in tree and "empty" not in tree
    assert not copies(tree)
    # a rename is a move on the appliance (the node keeps its id), not a new upload
    assert "uploaded renamed.txt" not in tablet.log_text()
    assert "moved" in tablet.log_text()


def test_offline_edits_are_sent_when_the_device_is_back(devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    laptop.start()
    desktop.start()
    write(laptop.folder / "a.txt", "v1")
    wait_converged(laptop, desktop)
    desktop.stop()
    write(desktop.folder / "a.txt", "written offline")
    write(desktop.folder / "offline/new.txt", "also offline")
    time.sleep(0.5)
    assert (laptop.folder / "a.txt").read_bytes() == b"v1"
    desktop.start()
    tree = wait_converged(laptop, desktop)
    assert tree["a.txt"] == b"written offline" and tree["offline/new.txt"] == b"also offline"


def test_concurrent_edits_keep_both_versions(devices: list[Device]) -> None:
    laptop, desktop, tablet = devices
    for device in devices:
        device.start()
    write(laptop.folder / "plan.txt", "base")
    wait_converged(*devices)
    laptop.stop()
    desktop.stop()
    write(laptop.folder / "plan.txt", "laptop's version")
    write(desktop.folder / "plan.txt", "desktop's version")
    laptop.start()
    wait_for(lambda: read_or_none(tablet.folder / "plan.txt") == b"laptop's version",
             what="the laptop's edit to arrive")
    desktop.start()                   # the last writer: keeps the name
    tree = wait_converged(*devices)
    assert tree["plan.txt"] == b"desktop's version"
    kept = copies(tree)
    assert list(kept.values()) == [b"laptop's version"], sorted(tree)
    (name,) = kept
    assert name.startswith("plan (conflicted copy from laptop ") and name.endswith(").txt")


def test_an_edit_beats_a_delete(devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    laptop.start()
    desktop.start()
    write(laptop.folder / "keep.txt", "original")
    write(laptop.folder / "gone.txt", "original")
    wait_converged(laptop, desktop)
    laptop.stop()
    desktop.stop()
    write(laptop.folder / "keep.txt", "edited while the other device deleted it")
    os.unlink(desktop.folder / "keep.txt")
    os.unlink(laptop.folder / "gone.txt")          # deleted here, edited there
    write(desktop.folder / "gone.txt", "edited while the other device deleted it")
    desktop.start()
    time.sleep(1)
    laptop.start()
    tree = wait_converged(laptop, desktop)
    assert tree["keep.txt"] == b"edited while the other device deleted it"
    assert tree["gone.txt"] == b"edited while the other device deleted it"


def test_two_devices_creating_one_name_keep_both(devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    write(laptop.folder / "todo.txt", "laptop's list")
    write(desktop.folder / "todo.txt", "desktop's list")
    write(laptop.folder / "same.txt", "identical")
    write(desktop.folder / "same.txt", "identical")
    laptop.start()
    desktop.start()
    tree = wait_converged(laptop, desktop)
    assert sorted(data for path, data in tree.items() if path.startswith("todo")) == [
        b"desktop's list", b"laptop's list"]
    assert tree["same.txt"] == b"identical"
    assert not any(path.startswith("same (") for path in tree)   # merged by content


def test_two_identical_nodes_of_one_name_end_as_one(devices: list[Device]) -> None:
    """Two devices keeping the same conflicted copy at once (or uploading the same new
    file) create two nodes of one name and content: the appliance sees no names. Made
    deterministic here by creating the twin in-process while the agents are stopped. The
    twin must be deleted on the appliance and nothing else held up. (Found by the random
    test, seed 2315: the delete was checked like a folder's, the twin had no base entry,
    so it was skipped on every pass and the move phase never emptied.)"""
    laptop, desktop, _ = devices
    write(laptop.folder / "copy.txt", "one content, two nodes")
    laptop.start()
    desktop.start()
    wait_converged(laptop, desktop)
    stop_all(laptop, desktop)

    async def upload_twin() -> None:
        async with ops.session(AgentHome(laptop.home)) as tree:
            root = await tree.resolve("/")
            await upload_file(tree, laptop.folder / "copy.txt", Target(root, "copy.txt", None),
                              show_progress=False)

    trio.run(upload_twin)
    assert sorted(e["name"] for e in ls_json(laptop.home)) == ["copy.txt", "copy.txt"]
    laptop.start()
    desktop.start()
    write(desktop.folder / "later.txt", "not held up")
    wait_for(lambda: sorted(e["name"] for e in ls_json(laptop.home)) == ["copy.txt", "later.txt"],
             what="the twin to be deleted on the appliance")
    tree = wait_converged(laptop, desktop)
    assert tree == {"copy.txt": b"one content, two nodes", "later.txt": b"not held up"}


def test_a_file_still_settling_always_has_a_wake_up_coming(devices: list[Device]) -> None:
    """A file is sent once it has been still for a moment; a timer wakes the engine then.
    Another timer firing first (the file was rewritten meanwhile) wakes a round that finds
    nothing new — and must set the file's timer again before it returns. Found by the
    random test, seed 2502112: the round returned early without it, and the file waited
    for the next change or the 5-minute rescan. Driven here round by round, in-process,
    as the engine's loop would (the loop forgets a timer once it has fired)."""
    laptop = devices[0]

    async def rounds() -> tuple[float, float, str]:
        async with ops.session(AgentHome(laptop.home)) as tree:
            db = SyncDb.of_home(laptop.home)
            try:
                folder = await open_folder(tree, db, laptop.folder, "/")
                engine = SyncEngine(tree, db, folder, SyncOptions(once=True))
                await engine.sync_round()                     # idle: nothing here
                write(laptop.folder / "new.txt", "still being written")
                engine._mark({"new.txt"})                     # what the watcher reports
                await engine.sync_round()                     # too fresh: waits
                first = engine._next_wake_at - trio.current_time()
                engine._next_wake_at = math.inf               # an earlier timer fired
                await engine.sync_round()                     # nothing new...
                again = engine._next_wake_at - trio.current_time()
                if not 0 < again <= 0.5:
                    return first, again, ""
                await trio.sleep(again)                       # ... and when it is due:
                await engine.sync_round()
                return first, again, ", ".join(e["name"] for e in ls_json(laptop.home))
            finally:
                db.close()

    first, again, remote = trio.run(rounds)
    assert 0 < first <= 0.5
    assert 0 < again <= 0.5, "no wake-up is set for the file still settling"
    assert remote == "new.txt"


@pytest.mark.slow
def test_the_appliance_restarting_mid_sync(tmp_path: Path) -> None:
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    listen = ("--listen", f"127.0.0.1:{free_port()}")   # the same address after a restart
    with serving(config.home, *listen) as server:
        alice = make_user(Served(config, server), "alice")
        laptop, desktop = devices_of(alice, tmp_path, "laptop", "desktop")
        try:
            laptop.start()
            desktop.start()
            write(laptop.folder / "before.txt", "before")
            wait_converged(laptop, desktop)
            assert server.stop() == 0
            write(laptop.folder / "during.txt", "written while the appliance was down")
            write(desktop.folder / "before.txt", "edited while it was down")
            wait_for(lambda: "offline" in laptop.log_text(), what="the laptop going offline")
            with serving(config.home, *listen) as again:
                assert again.url == server.url
                tree = wait_converged(laptop, desktop, timeout=60)
                assert tree["during.txt"] == b"written while the appliance was down"
                assert tree["before.txt"] == b"edited while it was down"
                stop_all(laptop, desktop)
                assert again.stop() == 0
        finally:
            stop_all(laptop, desktop)


def test_an_agent_killed_mid_download_leaves_no_partial_file(devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    big = os.urandom(1024 * 1024) * 96       # 96 MiB: 24 blocks
    write(laptop.folder / "big.bin", big)
    laptop.start()
    wait_for(lambda: "uploaded big.bin" in laptop.log_text(), timeout=120,
             what="the upload")
    desktop.start()
    wait_for(lambda: part_files(desktop.folder), timeout=60, every=0.01,
             what="the download to start")
    desktop.stop(signal.SIGKILL)
    assert not (desktop.folder / "big.bin").exists()   # never a partial file under the name
    desktop.start()
    tree = wait_converged(laptop, desktop, timeout=120)
    assert tree["big.bin"] == big
    assert part_files(desktop.folder) == []


def test_status_shows_each_synced_folder(devices: list[Device]) -> None:
    laptop = devices[0]
    laptop.start()
    write(laptop.folder / "x.txt", "x")
    wait_for(lambda: "uploaded x.txt" in laptop.log_text(), what="the upload")

    def idle() -> bool:
        out = run_cairn(laptop.home, "status").stdout
        return f"sync {laptop.folder} <-> /: idle" in out
    wait_for(idle, what="status to say idle")
    laptop.stop()
    assert "not running" in run_cairn(laptop.home, "status").stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_sync_cleanly_and_a_restart_resumes(devices: list[Device],
                                                           sig: signal.Signals) -> None:
    laptop, desktop, _ = devices
    big = os.urandom(1024 * 1024) * 64       # 64 MiB: 16 blocks
    laptop.start()
    desktop.start()
    write(laptop.folder / "small.txt", "small")
    wait_converged(laptop, desktop)
    write(laptop.folder / "big.bin", big)
    wait_for(lambda: part_files(desktop.folder), timeout=60, every=0.01,
             what="the download to start")

    asked = time.monotonic()
    assert desktop.stop(sig) == 0            # mid-download
    assert time.monotonic() - asked < 10
    log = desktop.log_text()
    assert "Traceback" not in log, log
    assert log.strip().splitlines()[-1] == \
        f"stopped syncing {desktop.folder} ({sig.name})", log[-2000:]
    db = SyncDb.of_home(desktop.home)
    try:
        assert [record.state for record in db.folders()] == ["stopped"]
    finally:
        db.close()
    assert f"sync {desktop.folder} <-> /: not running" in \
        run_cairn(desktop.home, "status").stdout
    assert not (desktop.folder / "big.bin").exists()

    desktop.start()                          # resumes where it stopped
    tree = wait_converged(laptop, desktop, timeout=120)
    assert tree["big.bin"] == big
    assert part_files(desktop.folder) == []
    assert laptop.stop(sig) == 0             # idle
    assert "Traceback" not in laptop.log_text()


def test_sync_once_stopped_by_a_signal_says_it_did_not_finish(devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    big = os.urandom(1024 * 1024) * 64
    write(laptop.folder / "big.bin", big)
    laptop.start()
    wait_for(lambda: "uploaded big.bin" in laptop.log_text(), timeout=120, what="the upload")
    desktop.start("--once")
    wait_for(lambda: part_files(desktop.folder), timeout=60, every=0.01,
             what="the download to start")
    assert desktop.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    log = desktop.log_text()
    assert "Traceback" not in log, log
    assert log.strip().splitlines()[-1] == \
        "cairn: interrupted by SIGTERM; run the same command again to resume"
    desktop.start("--once")
    assert desktop.process is not None and desktop.process.wait(timeout=120) == 0
    assert tree_of(desktop.folder)["big.bin"] == big


def test_what_others_share_appears_read_only(tmp_path: Path, fresh_user: MakeUser) -> None:
    alice_user, bob_user = fresh_user("alice"), fresh_user("bob")
    [alice] = devices_of(alice_user, tmp_path, "alice-laptop")
    [bob] = devices_of(bob_user, tmp_path, "bob-laptop")
    shared = bob.folder / "Shared with me" / alice_user.name / "project"
    try:
        write(alice.folder / "project/plan.txt", "alice's plan")
        write(alice.folder / "private.txt", "not shared")
        alice.start()
        wait_for(lambda: "uploaded project/plan.txt" in alice.log_text(), what="the upload")
        assert run_cairn(alice.home, "share", "/project", bob_user.name).returncode == 0
        bob.start()
        wait_for(lambda: (shared / "plan.txt").exists(), what="the share to arrive")
        assert (shared / "plan.txt").read_bytes() == b"alice's plan"
        assert not (bob.folder / "private.txt").exists()

        write(alice.folder / "project/plan.txt", "alice's plan, revised")   # kept current
        wait_for(lambda: read_or_none(shared / "plan.txt") == b"alice's plan, revised",
                 what="the revision")

        write(shared / "plan.txt", "bob tried to edit")       # read-only: moved out
        def moved_out() -> bool:
            return any(COPY in p.name and read_or_none(p) == b"bob tried to edit"
                       for p in bob.folder.iterdir() if p.is_file())
        wait_for(moved_out, what="bob's edit to become a copy in his own files")
        wait_for(lambda: read_or_none(shared / "plan.txt") == b"alice's plan, revised",
                 what="the original back")
        assert "shared with you read-only" in bob.log_text()
        assert (alice.folder / "project/plan.txt").read_bytes() == b"alice's plan, revised"
        wait_for(lambda: any(COPY in e["name"] for e in ls_json(bob.home)),
                 what="bob's copy to sync to his own tree")

        assert run_cairn(alice.home, "unshare", "/project", bob_user.name).returncode == 0
        wait_for(lambda: not (shared / "plan.txt").exists(), what="the unshare")
    finally:
        stop_all(alice, bob)


def test_special_files_and_ignored_paths_stay_local(devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    os.mkfifo(laptop.folder / "a-fifo")
    write(laptop.folder / ".cairnignore", "build/\n*.log\n!keep.log\n")
    write(laptop.folder / "build/out.o", "object")
    write(laptop.folder / "debug.log", "noise")
    write(laptop.folder / "keep.log", "wanted")
    write(laptop.folder / "notes.txt.swp", "vim swap")
    os.symlink("notes.txt", laptop.folder / ".#notes.txt")      # an emacs lock: a link
    write(laptop.folder / "real.txt", "real")
    laptop.start()
    desktop.start()
    wanted = (".cairnignore", "keep.log", "real.txt")
    # The three may arrive in separate passes; the ignored ones are never planned at all.
    wait_for(lambda: all((desktop.folder / name).exists() for name in wanted),
             what="the sync")
    tree = tree_of(desktop.folder)
    assert sorted(tree) == [".cairnignore", "keep.log", "real.txt"]
    names = {entry["name"] for entry in ls_json(laptop.home)}
    assert names == {".cairnignore", "keep.log", "real.txt"}


def links_of(folder: Path) -> dict[str, str]:
    """relative path -> target, for every symbolic link under FOLDER."""
    return {path: os.fsdecode(data[len(LINK):]) for path, data in tree_of(folder).items()
            if data is not None and data.startswith(LINK)}


def test_links_travel_as_links_never_followed(tmp_path: Path, devices: list[Device]
                                              ) -> None:
    laptop, desktop, _ = devices
    outside = tmp_path / "outside"
    write(outside / "secret.txt", "outside the synced folder: never uploaded")
    write(outside / "inner/deep.txt", "nor this")
    write(laptop.folder / "real.txt", "real")
    made = {"relative": "real.txt", "absolute": str(outside / "secret.txt"),
            "dangling": "no/such/file", "to-folder": str(outside),
            "docs/up": "../real.txt", "docs/self": "."}
    for path, target in made.items():
        (laptop.folder / path).parent.mkdir(exist_ok=True)
        os.symlink(target, laptop.folder / path)
    laptop.start()
    desktop.start()
    wait_for(lambda: links_of(desktop.folder) == made, what="the links to arrive")
    tree = wait_converged(laptop, desktop)
    assert sorted(tree) == sorted(["real.txt", "docs", *made])   # nothing under a link
    for path, target in made.items():
        assert os.path.islink(desktop.folder / path)
        assert os.readlink(desktop.folder / path) == target
    # on the appliance: file nodes without content, whatever they point to
    entries = {e["name"]: e for e in ls_json(laptop.home)}
    assert all(entries[name]["size"] == 0 for name in made if "/" not in name)
    assert b"never uploaded" not in b"".join(
        data for data in tree.values() if data is not None and not data.startswith(LINK))

    # a new target (ln -sfn: a new link renamed over the old one), a rename, a delete
    os.symlink("docs", laptop.folder / "relative.new")
    os.rename(laptop.folder / "relative.new", laptop.folder / "relative")
    os.rename(desktop.folder / "absolute", desktop.folder / "renamed")
    os.unlink(laptop.folder / "dangling")
    wait_for(lambda: links_of(desktop.folder).get("relative") == "docs"
             and links_of(laptop.folder).get("renamed") == str(outside / "secret.txt")
             and not os.path.lexists(desktop.folder / "dangling"),
             what="the link changes to travel")
    tree = wait_converged(laptop, desktop)
    assert "absolute" not in tree and "dangling" not in tree and not copies(tree)
    assert "moved" in desktop.log_text()            # a rename is a move, not an upload

    # a folder holding links is deleted on the other device too (the links themselves)
    shutil.rmtree(desktop.folder / "docs")
    wait_for(lambda: not os.path.lexists(laptop.folder / "docs"),
             what="the folder with links to be deleted")
    tree = wait_converged(laptop, desktop)
    assert sorted(tree) == ["real.txt", "relative", "renamed", "to-folder"]
    assert (outside / "secret.txt").read_text() == "outside the synced folder: never uploaded"
    assert (outside / "inner/deep.txt").read_text() == "nor this"
    assert (laptop.folder / "real.txt").read_text() == "real"


def test_a_link_and_a_file_trade_places_and_conflicting_links_keep_both(
        devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    laptop.start()
    desktop.start()
    os.symlink("one", laptop.folder / "l")
    write(laptop.folder / "f.txt", "a file")
    wait_converged(laptop, desktop)
    assert links_of(desktop.folder) == {"l": "one"}
    # a file becomes a link, and a link a file: each a new version of its node
    os.unlink(desktop.folder / "f.txt")
    os.symlink("l", desktop.folder / "f.txt")
    os.unlink(desktop.folder / "l")
    write(desktop.folder / "l", "now a file")
    wait_for(lambda: links_of(laptop.folder) == {"f.txt": "l"}
             and read_or_none(laptop.folder / "l") == b"now a file",
             what="the swap to travel")
    # both change one link while apart: the last writer keeps the name, the other's
    # target is kept as a conflicted copy, itself a link
    os.unlink(desktop.folder / "l")
    os.symlink("base", desktop.folder / "l")
    wait_for(lambda: links_of(laptop.folder).get("l") == "base", what="the new link")
    wait_converged(laptop, desktop)
    stop_all(laptop, desktop)
    sent = laptop.log_text().count(" uploaded l\n")
    os.unlink(laptop.folder / "l")
    os.symlink("laptop's", laptop.folder / "l")
    os.unlink(desktop.folder / "l")
    os.symlink("desktop's", desktop.folder / "l")
    laptop.start()
    wait_for(lambda: laptop.log_text().count(" uploaded l\n") > sent,
             what="the laptop's link to go first")
    desktop.start()
    wait_converged(laptop, desktop)
    links = links_of(desktop.folder)
    kept = {path: target for path, target in links.items() if COPY in path}
    assert links["l"] == "desktop's" and list(kept.values()) == ["laptop's"], links
    assert all(os.path.islink(desktop.folder / path) for path in kept)


def test_a_folder_replaced_by_a_link_is_never_written_through(
        tmp_path: Path, devices: list[Device]) -> None:
    laptop, desktop, _ = devices
    outside = tmp_path / "outside"
    write(outside / "mine.txt", "outside the synced folder")
    write(laptop.folder / "d/a.txt", "a")
    laptop.start()
    desktop.start()
    wait_converged(laptop, desktop)
    desktop.stop()
    shutil.rmtree(desktop.folder / "d")
    os.symlink(outside, desktop.folder / "d")       # the folder is now a link out
    write(laptop.folder / "d/new.txt", "arrived while the desktop was away")
    wait_for(lambda: "new.txt" in {e["name"] for e in ls_json(laptop.home, "/d")},
             what="the new file on the appliance")
    desktop.start()
    tree = wait_converged(laptop, desktop)
    assert sorted(os.listdir(outside)) == ["mine.txt"]            # nothing written there
    assert tree["d/new.txt"] == b"arrived while the desktop was away"
    (aside,) = links_of(desktop.folder).items()     # the link, set aside, syncs as a link
    assert COPY in aside[0] and aside[1] == str(outside)


def test_a_big_file_is_fetched_while_another_device_is_still_uploading_it(
        devices: list[Device]) -> None:
    """Issue 12: the two hops overlap. The laptop uploads a 3-block file one block at a
    time (in-process, pausing before the last); the desktop's `cairn sync` already holds
    the first blocks, verified, in its temporary file — and renames it into place only
    once the last block is in."""
    _, desktop, _ = devices
    laptop = devices[0]
    blocks = [os.urandom(BLOCK_SIZE), os.urandom(BLOCK_SIZE), os.urandom(1000)]
    content = b"".join(blocks)
    desktop.start()
    wait_for(lambda: "syncing" in desktop.log_text(), what="the desktop to start")

    def part_holds_first_blocks() -> bool:
        parts = [desktop.folder / p for p in part_files(desktop.folder)]
        return any(p.stat().st_size == len(content)
                   and p.read_bytes()[:2 * BLOCK_SIZE] == blocks[0] + blocks[1]
                   for p in parts)

    async def upload_slowly() -> tuple[bool, bool]:
        async with ops.session(AgentHome(laptop.home)) as tree:
            _, put = await begin_upload(tree, "big.bin", blocks)
            for data in blocks[:2]:
                await put(data)
            early = await trio.to_thread.run_sync(lambda: _poll(part_holds_first_blocks))
            not_yet = not (desktop.folder / "big.bin").exists()
            await put(blocks[2])
            return early, not_yet

    early, not_yet = trio.run(upload_slowly)
    assert early, "the desktop did not fetch blocks before the upload was complete"
    assert not_yet, "the file was in place before its last block was uploaded"
    wait_for(lambda: read_or_none(desktop.folder / "big.bin") == content,
             what="the complete file on the desktop")
    assert part_files(desktop.folder) == []


async def begin_upload(tree: RemoteTree, name: str, blocks: list[bytes]
                       ) -> tuple[str, Callable[[bytes], Awaitable[None]]]:
    """A device's upload of NAME (at the root, made of BLOCKS) driven block by block: the
    node is announced, `uploading`; returns its id and what sends one of its blocks."""
    root = await tree.resolve("/")
    secret = tree.keys.content_secret
    meta = NodeMeta(name=name, kind="file", size=sum(map(len, blocks)),
                    blocks=tuple(encrypt_block(secret, b)[0] for b in blocks),
                    device="laptop")
    answer = await announce(tree, Target(root, name, None), meta)
    urls = {u.block_id: u.url for u in answer.upload}

    async def put(data: bytes) -> None:
        ref, cipher = encrypt_block(secret, data)
        await trio.to_thread.run_sync(tree.connection.put_block, urls[ref.id_hex], cipher)

    return answer.node.id, put


def _poll(condition: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_fetch_of_an_upload_that_stopped_gives_up_and_keeps_what_it_has(
        devices: list[Device], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other device stops uploading halfway: the streaming download gives up after
    STREAM_STALL_S (1 s here) with UploadStalledError, nothing is put in place, and the
    verified first block stays in the temporary file for the next try."""
    laptop, desktop, _ = devices
    monkeypatch.setattr(download_module, "STREAM_STALL_S", 1.0)
    blocks = [os.urandom(BLOCK_SIZE), os.urandom(5000)]
    target = desktop.folder / "half.bin"

    async def scenario() -> None:
        async with ops.session(AgentHome(laptop.home)) as up, \
                ops.session(AgentHome(desktop.home)) as down:
            node_id, put = await begin_upload(up, "half.bin", blocks)
            await put(blocks[0])
            node = await down.node(node_id)
            assert node.status == "uploading"
            with pytest.raises(UploadStalledError):
                await download_file(down, node, target, show_progress=False, stream=True)
            with pytest.raises(LocalFileError, match="still being uploaded"):
                await download_file(down, node, target, show_progress=False)

    trio.run(scenario)
    assert not target.exists()
    parts = part_files(desktop.folder)
    assert len(parts) == 1
    assert (desktop.folder / parts[0]).read_bytes()[:BLOCK_SIZE] == blocks[0]


def test_a_stalled_upload_is_not_streamed_again_each_round(
        devices: list[Device], monkeypatch: pytest.MonkeyPatch) -> None:
    """Driven round by round in-process: the desktop's round streams the laptop's file,
    which stops after its first block; the round gives up after STREAM_STALL_S (0.5 s
    here) and the next rounds skip that version at once instead of waiting again — until
    the upload completes and the file is downloaded as usual."""
    laptop, desktop, _ = devices
    monkeypatch.setattr(download_module, "STREAM_STALL_S", 0.5)
    blocks = [os.urandom(BLOCK_SIZE), os.urandom(3000)]

    async def scenario() -> tuple[float, float, bytes | None]:
        async with ops.session(AgentHome(laptop.home)) as up, \
                ops.session(AgentHome(desktop.home)) as down:
            _, put = await begin_upload(up, "slow.bin", blocks)
            await put(blocks[0])
            db = SyncDb.of_home(desktop.home)
            try:
                folder = await open_folder(down, db, desktop.folder, "/")
                engine = SyncEngine(down, db, folder, SyncOptions(once=True))
                started = trio.current_time()
                await engine.sync_round()                 # streams, then gives up
                stalled = trio.current_time() - started
                started = trio.current_time()
                await engine.sync_round()                 # skipped at once
                skipped = trio.current_time() - started
                await put(blocks[1])
                await engine.sync_round()                 # complete now: downloaded
                return stalled, skipped, read_or_none(desktop.folder / "slow.bin")
            finally:
                db.close()

    stalled, skipped, content = trio.run(scenario)
    assert stalled >= 0.5
    assert skipped < 0.5, f"the second round waited {skipped:.2f} s on the stalled upload"
    assert content == b"".join(blocks)
