"""`cairn mount` on real FUSE mounts, with real programs as its clients, against the
session's appliance; a second device checks what arrived with `cairn get` or its own
mount. Every mount is unmounted after its test (the `drives` fixture)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from agent_helpers import User, cairn_ok, fails, ls_json, run_cairn_binary, write
from drive_helpers import state_of
from sync_helpers import tree_of, wait_for

pytestmark = pytest.mark.root


def run(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True,
                            text=True, check=False, timeout=300,
                            env={**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null",
                                 "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
                                 "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"})
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def source_tree(root: Path) -> Path:
    """A small tree like a project's: nested folders, an executable, a 9 MiB file (three
    blocks), an empty file, names with spaces and non-ASCII."""
    write(root / "README.md", "# project\n")
    write(root / "src" / "main.py", "print('hi')\n" * 100)
    script = write(root / "bin" / "run.sh", "#!/bin/sh\necho run\n")
    script.chmod(0o755)
    write(root / "data" / "blob.bin", os.urandom(9 * 1024 * 1024 + 17))
    write(root / "data" / "empty", b"")
    write(root / "docs" / "naïve résumé.txt", "accents\n")
    write(root / "docs" / "with space" / "note.txt", "spaces\n")
    return root


def assert_same_files(expected: Path, actual: Path) -> None:
    want, got = tree_of(expected), tree_of(actual)
    assert sorted(got) == sorted(want)
    for path, data in want.items():
        assert got[path] == data, path
        if data is not None:
            assert os.stat(expected / path).st_mode & 0o111 == \
                os.stat(actual / path).st_mode & 0o111, path


def test_mount_refuses_a_missing_or_non_empty_mount_point(fresh_user, tmp_path: Path
                                                          ) -> None:
    home = fresh_user().join(tmp_path / "home")
    fails(run_cairn_binary(home, "mount", tmp_path / "nowhere"), 2, "does not exist")
    busy = tmp_path / "busy"
    write(busy / "file", "x")
    fails(run_cairn_binary(home, "mount", busy), 2, "not empty")
    fails(run_cairn_binary(home, "mount", busy / "file"), 2, "not a directory")
    fails(run_cairn_binary(home, "umount", tmp_path), 2, "nothing is mounted")


def test_real_programs_write_through_the_mount(fresh_user, drives, tmp_path: Path) -> None:
    user: User = fresh_user()
    home_a = user.join(tmp_path / "a", "laptop")
    home_b = user.join(tmp_path / "b", "desktop")
    source = source_tree(tmp_path / "source")
    drive = drives(home_a, tmp_path / "mnt").start()
    mnt = drive.mountpoint

    run("cp", "-a", source, mnt / "copied")
    run("rsync", "-a", f"{source}/", mnt / "rsynced")         # temp files renamed over
    (source / "src" / "main.py").write_text("print('changed')\n")
    run("rsync", "-a", f"{source}/", mnt / "rsynced")         # again: renames over files
    with tarfile.open(tmp_path / "src.tar", "w") as tar:
        tar.add(source, arcname="untarred")
    run("tar", "xf", tmp_path / "src.tar", "-C", mnt)

    repo = tmp_path / "repo"
    run("git", "init", "-q", "-b", "main", repo)
    shutil.copytree(source, repo / "tree")
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "one", cwd=repo)
    write(repo / "tree" / "more.txt", "more\n")
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "two", cwd=repo)
    run("git", "clone", "-q", repo, mnt / "clone")
    run("git", "fsck", "--full", cwd=mnt / "clone")
    assert run("git", "status", "--porcelain", cwd=mnt / "clone") == ""

    database = sqlite3.connect(mnt / "notes.db")
    database.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    with database:
        database.executemany("INSERT INTO notes (body) VALUES (?)",
                             [(f"note {i}" * 20,) for i in range(2000)])
    database.close()
    assert run("sqlite3", mnt / "notes.db", "SELECT COUNT(*) FROM notes").strip() == "2000"

    # An editor's save: the new text to a swap file, the old one kept as a backup, the
    # swap file renamed over the target (on the appliance already).
    target = mnt / "letter.txt"
    target.write_text("draft 1\n")
    wait_for(lambda: state_of(target) == "cached", timeout=30, what="letter.txt uploaded")
    first_id = next(e for e in ls_json(home_b, "/") if e["name"] == "letter.txt")["id"]
    shutil.copy2(target, mnt / "letter.txt~")
    (mnt / ".letter.txt.swp").write_text("draft 2\n")
    os.rename(mnt / ".letter.txt.swp", target)
    assert target.read_text() == "draft 2\n"
    assert (mnt / "letter.txt~").read_text() == "draft 1\n"

    expected = tree_of(mnt)
    assert drive.stop() == 0                       # uploads everything, then exits
    assert "all changes uploaded" in drive.log_text()

    local = tmp_path / "from-b"
    local.mkdir()
    for name in ("copied", "rsynced", "untarred", "clone", "notes.db", "letter.txt",
                 "letter.txt~"):
        cairn_ok(home_b, "get", f"/{name}", local / name)
    assert tree_of(local) == expected
    assert_same_files(source, local / "rsynced")
    (source / "src" / "main.py").write_text("print('hi')\n" * 100)
    assert_same_files(source, local / "copied")
    names = {e["name"] for e in ls_json(home_b, "/")}
    assert ".letter.txt.swp" not in names
    letter = [e for e in ls_json(home_b, "/") if e["name"] == "letter.txt"]
    assert len(letter) == 1 and letter[0]["version"] >= 2     # a new version of one node
    assert letter[0]["id"] == first_id
    run("git", "fsck", "--full", cwd=local / "clone")


def test_a_change_reaches_the_other_mount_within_two_seconds(fresh_user, drives,
                                                            tmp_path: Path) -> None:
    user: User = fresh_user()
    home_a = user.join(tmp_path / "a", "laptop")
    home_b = user.join(tmp_path / "b", "desktop")
    write(tmp_path / "seed.txt", "version 1\n")
    cairn_ok(home_a, "put", tmp_path / "seed.txt", "/shared.txt")
    cairn_ok(home_a, "put", tmp_path / "seed.txt", "/doomed.txt")
    a = drives(home_a, tmp_path / "mnt-a").start()
    b = drives(home_b, tmp_path / "mnt-b").start()
    seen_by_b = b.mountpoint / "shared.txt"
    assert seen_by_b.read_text() == "version 1\n"       # now in B's page cache

    (a.mountpoint / "shared.txt").write_text("version 2, longer\n")
    written = time.monotonic()
    wait_for(lambda: seen_by_b.read_text() == "version 2, longer\n", timeout=10,
             what="B to read A's change", every=0.05)
    took = time.monotonic() - written
    assert took < 2.0, took

    (a.mountpoint / "fresh.txt").write_text("new\n")
    os.unlink(a.mountpoint / "doomed.txt")
    wait_for(lambda: "doomed.txt" not in os.listdir(b.mountpoint)
             and "fresh.txt" in os.listdir(b.mountpoint), timeout=10,
             what="B's listing to follow A", every=0.05)
    assert (b.mountpoint / "fresh.txt").read_text() == "new\n"
    with pytest.raises(FileNotFoundError):
        (b.mountpoint / "doomed.txt").stat()


def test_a_killed_mount_loses_no_written_file(fresh_user, drives, tmp_path: Path) -> None:
    user: User = fresh_user()
    home_a = user.join(tmp_path / "a", "laptop")
    home_b = user.join(tmp_path / "b", "desktop")
    drive = drives(home_a, tmp_path / "mnt").start()
    contents = {"small.txt": b"small\n", "big.bin": os.urandom(9 * 1024 * 1024 + 5)}
    (drive.mountpoint / "folder").mkdir()
    contents["folder/inner.txt"] = b"inner\n"
    for name, data in contents.items():
        (drive.mountpoint / name).write_bytes(data)
    with open(drive.mountpoint / "synced.txt", "wb") as handle:
        handle.write(b"fsynced\n")
        os.fsync(handle.fileno())
    contents["synced.txt"] = b"fsynced\n"
    drive.kill()                                    # before the write-back delay ran out
    for entry in ls_json(home_b, "/"):              # nothing partial shows elsewhere
        if entry["kind"] == "file":
            assert entry["status"] == "uploaded", entry

    drive.start()
    assert "cleared a stale mount" in drive.log_text()
    for name, data in contents.items():
        assert (drive.mountpoint / name).read_bytes() == data, name
    wait_uploaded(home_a)
    local = tmp_path / "from-b"
    local.mkdir()
    for name, data in contents.items():
        cairn_ok(home_b, "get", f"/{name}", local / name.replace("/", "_"))
        assert (local / name.replace("/", "_")).read_bytes() == data, name


def drive_pending(home: Path, since: float = 0.0) -> int | None:
    """The drive's pending changes as `cairn status --json` reports them; None while its
    status is older than SINCE (written once a second)."""
    report = json.loads(cairn_ok(home, "status", "--json"))
    drive = report.get("drive")
    assert drive is not None, report
    return int(drive["pending"]) if drive["written_at"] > since else None


def wait_uploaded(home: Path, timeout: float = 30) -> None:
    since = time.time()
    wait_for(lambda: drive_pending(home, since) == 0, timeout=timeout, what="the uploads")


def test_errors_are_the_errnos_programs_expect(fresh_user, drives, tmp_path: Path) -> None:
    home = fresh_user().join(tmp_path / "a")
    mnt = drives(home, tmp_path / "mnt").start().mountpoint
    (mnt / "dir").mkdir()
    (mnt / "dir" / "file").write_text("x")
    (mnt / "other").mkdir()
    checks = {
        errno.ENAMETOOLONG: lambda: (mnt / ("n" * 256)).write_text("x"),
        errno.ENOTEMPTY: lambda: os.rmdir(mnt / "dir"),
        errno.EEXIST: lambda: os.mkdir(mnt / "dir"),
        errno.EISDIR: lambda: open(mnt / "dir", "w"),  # noqa: SIM115
        errno.ENOTDIR: lambda: os.rmdir(mnt / "dir" / "file"),
        errno.EPERM: lambda: os.link(mnt / "dir" / "file", mnt / "hard"),
        errno.ENOENT: lambda: os.stat(mnt / "missing"),
    }
    for code, action in checks.items():
        with pytest.raises(OSError) as raised:
            action()
        assert raised.value.errno == code, (code, raised.value)
    with pytest.raises(OSError) as raised:
        os.mkfifo(mnt / "fifo")
    assert raised.value.errno == errno.EPERM
    with pytest.raises(OSError) as raised:
        os.rename(mnt / "other", mnt / "dir")            # over a non-empty folder
    assert raised.value.errno == errno.ENOTEMPTY
    os.rename(mnt / "dir" / "file", mnt / "other" / "moved")
    assert (mnt / "other" / "moved").read_text() == "x"
    assert os.statvfs(mnt).f_namemax == 255
    assert os.listdir(mnt / "dir") == []


def test_states_pins_and_free(fresh_user, drives, tmp_path: Path) -> None:
    home = fresh_user().join(tmp_path / "a")
    data = os.urandom(5 * 1024 * 1024)
    write(tmp_path / "remote.bin", data)
    cairn_ok(home, "put", tmp_path / "remote.bin", "/docs/remote.bin")
    drive = drives(home, tmp_path / "mnt").start()
    mnt = drive.mountpoint
    remote = mnt / "docs" / "remote.bin"
    assert state_of(remote) == "cloud"
    assert remote.read_bytes() == data
    assert state_of(remote) == "cached"

    (mnt / "docs" / "new.txt").write_text("new\n")
    assert state_of(mnt / "docs" / "new.txt") == "dirty"
    wait_for(lambda: state_of(mnt / "docs" / "new.txt") == "cached", timeout=30,
             what="the new file to be uploaded and cached")

    cairn_ok(home, "free", mnt / "docs")
    assert state_of(remote) == "cloud"
    out = cairn_ok(home, "pin", mnt / "docs")
    assert "available offline" in out
    assert state_of(remote) == "pinned"
    cairn_ok(home, "free", mnt / "docs")                 # pinned blocks stay
    assert state_of(remote) == "pinned"
    cairn_ok(home, "unpin", mnt / "docs")
    assert state_of(remote) == "cached"
    status = cairn_ok(home, "status")
    assert f"drive mounted at {mnt}" in status
    assert drive.stop(signal.SIGTERM) == 0


def test_shared_with_me_is_read_only(fresh_user, drives, tmp_path: Path) -> None:
    owner: User = fresh_user("owner")
    reader: User = fresh_user("reader")
    home_owner = owner.join(tmp_path / "o", "owner-laptop")
    home_reader = reader.join(tmp_path / "r", "reader-laptop")
    write(tmp_path / "plan.txt", "the plan\n")
    cairn_ok(home_owner, "put", tmp_path / "plan.txt", "/project/plan.txt")
    cairn_ok(home_owner, "share", "/project", reader.name)
    mnt = drives(home_reader, tmp_path / "mnt").start().mountpoint
    shared = mnt / "Shared with me" / owner.name / "project"
    wait_for(shared.exists, timeout=10, what="the shared folder")
    assert (shared / "plan.txt").read_text() == "the plan\n"
    assert not os.stat(shared / "plan.txt").st_mode & 0o222
    for action in (lambda: (shared / "plan.txt").write_text("mine now"),
                   lambda: (shared / "new.txt").write_text("x"),
                   lambda: os.unlink(shared / "plan.txt"),
                   lambda: os.rename(shared / "plan.txt", mnt / "taken.txt"),
                   lambda: os.mkdir(shared / "sub")):
        with pytest.raises(OSError) as raised:
            action()
        assert raised.value.errno in (errno.EROFS, errno.EACCES), raised.value
    write(tmp_path / "more.txt", "more\n")
    cairn_ok(home_owner, "put", tmp_path / "more.txt", "/project/more.txt")
    wait_for(lambda: (shared / "more.txt").exists(), timeout=10, what="the owner's new file")
    cairn_ok(home_owner, "unshare", "/project", reader.name)
    wait_for(lambda: not shared.exists(), timeout=10, what="the unshare")


def test_symbolic_links_are_kept_never_followed(fresh_user, drives, tmp_path: Path) -> None:
    user: User = fresh_user()
    home_a = user.join(tmp_path / "a", "laptop")
    home_b = user.join(tmp_path / "b", "desktop")
    mnt = drives(home_a, tmp_path / "mnt").start().mountpoint
    (mnt / "real.txt").write_text("real\n")
    os.symlink("real.txt", mnt / "relative")
    os.symlink("/etc/hostname", mnt / "outside")
    os.symlink("missing/target", mnt / "dangling")
    assert os.readlink(mnt / "relative") == "real.txt"
    assert (mnt / "relative").read_text() == "real\n"       # the kernel follows, in the mount
    assert os.path.islink(mnt / "dangling")
    os.rename(mnt / "relative", mnt / "renamed")
    assert os.readlink(mnt / "renamed") == "real.txt"

    repo = tmp_path / "repo"                                # a repository with a link
    run("git", "init", "-q", "-b", "main", repo)
    write(repo / "docs" / "guide.md", "guide\n")
    os.symlink("docs/guide.md", repo / "GUIDE")
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "links", cwd=repo)
    run("git", "clone", "-q", repo, mnt / "clone")
    assert os.readlink(mnt / "clone" / "GUIDE") == "docs/guide.md"
    assert run("git", "status", "--porcelain", cwd=mnt / "clone") == ""

    wait_uploaded(home_a)
    local = tmp_path / "from-b"
    local.mkdir()
    for name in ("renamed", "outside", "dangling", "clone"):
        cairn_ok(home_b, "get", f"/{name}", local / name)
    assert os.readlink(local / "renamed") == "real.txt"
    assert os.readlink(local / "outside") == "/etc/hostname"
    assert os.readlink(local / "dangling") == "missing/target"
    assert os.readlink(local / "clone" / "GUIDE") == "docs/guide.md"


def test_a_write_based_on_an_old_version_keeps_both(fresh_user, drives, tmp_path: Path
                                                    ) -> None:
    user: User = fresh_user()
    home_a = user.join(tmp_path / "a", "laptop")
    home_b = user.join(tmp_path / "b", "desktop")
    write(tmp_path / "v1.txt", "version 1\n")
    cairn_ok(home_a, "put", tmp_path / "v1.txt", "/report.txt")
    mnt = drives(home_a, tmp_path / "mnt").start().mountpoint
    with open(mnt / "report.txt", "w") as mine:       # open: not uploaded until closed
        mine.write("the laptop's version\n")
        write(tmp_path / "theirs.txt", "the desktop's version\n")
        cairn_ok(home_b, "put", tmp_path / "theirs.txt", "/report.txt")
    wait_for(lambda: len([n for n in os.listdir(mnt) if n.startswith("report")]) == 2,
             timeout=30, what="the conflicted copy")
    names = sorted(os.listdir(mnt))
    copy = [n for n in names if "conflicted copy from desktop" in n]   # cairn put names it
    assert len(copy) == 1, names
    assert (mnt / "report.txt").read_text() == "the laptop's version\n"
    assert (mnt / copy[0]).read_text() == "the desktop's version\n"
    assert state_of(mnt / copy[0]) == "conflict"
    wait_uploaded(home_a)
    local = tmp_path / "from-b"
    local.mkdir()
    cairn_ok(home_b, "get", "/report.txt", local / "report.txt")
    assert (local / "report.txt").read_text() == "the laptop's version\n"


def test_mount_and_sync_on_one_device(fresh_user, drives, tmp_path: Path) -> None:
    from sync_helpers import Device
    user: User = fresh_user()
    home = user.join(tmp_path / "a", "laptop")
    folder = tmp_path / "synced"
    folder.mkdir()
    syncing = Device(home=home, folder=folder, name="laptop").start()
    try:
        mnt = drives(home, tmp_path / "mnt").start().mountpoint
        (mnt / "from-mount.txt").write_text("written in the mount\n")
        write(folder / "from-sync.txt", "written in the synced folder\n")
        wait_for(lambda: (folder / "from-mount.txt").exists(), timeout=30,
                 what="the mount's file in the synced folder")
        wait_for(lambda: (mnt / "from-sync.txt").exists(), timeout=30,
                 what="the synced file in the mount")
        assert (folder / "from-mount.txt").read_text() == "written in the mount\n"
        assert (mnt / "from-sync.txt").read_text() == "written in the synced folder\n"
        assert "Traceback" not in syncing.log_text()
    finally:
        syncing.stop()


@pytest.mark.slow
def test_ten_thousand_entries(fresh_user, drives, tmp_path: Path) -> None:
    user: User = fresh_user()
    home_a = user.join(tmp_path / "a", "laptop")
    home_b = user.join(tmp_path / "b", "desktop")
    writer = drives(home_a, tmp_path / "mnt-a").start()
    data = b"x" * 100
    for folder in range(20):
        os.mkdir(writer.mountpoint / f"d{folder:02d}")
        for index in range(500):
            (writer.mountpoint / f"d{folder:02d}" / f"f{index:03d}").write_bytes(data)
    wait_uploaded(home_a, timeout=300)
    reader = drives(home_b, tmp_path / "mnt-b").start()
    found = run("find", reader.mountpoint).splitlines()
    assert len(found) == 1 + 20 + 10_000
    listing = run("ls", "-lR", reader.mountpoint)
    assert listing.count(" 100 ") == 10_000
    assert (reader.mountpoint / "d19" / "f499").read_bytes() == data


def test_emptying_a_file_by_opening_it_with_o_trunc_is_a_change(fresh_user, drives,
                                                                tmp_path: Path) -> None:
    home = fresh_user().join(tmp_path / "a")
    write(tmp_path / "full.txt", "full of words\n")
    cairn_ok(home, "put", tmp_path / "full.txt", "/full.txt")
    mnt = drives(home, tmp_path / "mnt").start().mountpoint
    os.close(os.open(mnt / "full.txt", os.O_WRONLY | os.O_TRUNC))     # `: > full.txt`
    assert (mnt / "full.txt").read_bytes() == b""
    wait_uploaded(home)
    assert [e["size"] for e in ls_json(home, "/") if e["name"] == "full.txt"] == [0]
    os.close(os.open(mnt / "full.txt", os.O_RDWR))      # opened for writing, left as it was
    wait_uploaded(home)
    assert [e["version"] for e in ls_json(home, "/") if e["name"] == "full.txt"] == [2]
