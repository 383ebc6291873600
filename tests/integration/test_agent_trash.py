"""`cairn trash` and `cairn restore` end to end: the CLI (in-process) against the session's
real `cairnd serve` on 127.0.0.1 — deleted items listed with the paths they had, restored byte
for byte, deleted folders above restored first, namesakes and ambiguities reported, and the
refusals (nothing there, another user's, data reclaimed) as one line with their exit code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import MakeUser, cairn_ok, fails, ls_json, run_cairn, write
from cairnd_helpers import Served, appliance_database

from agent.errors import ApiError, ForbiddenError, RemoteNotFoundError, UsageError
from appliance.config import ApplianceConfig


def new_user(fresh_user: MakeUser, directory: Path) -> tuple[str, Path]:
    """A user of their own (so each test starts with an empty trash) and their home."""
    user = fresh_user()
    return user.name, user.join(directory / user.name)


@pytest.fixture
def alice(fresh_user: MakeUser, tmp_path: Path) -> Path:
    return new_user(fresh_user, tmp_path)[1]


def trash_json(home: Path, *flags: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(cairn_ok(home, "trash", "--json", *flags))
    return entries


def fetched(home: Path, remote: str, local: Path) -> bytes:
    cairn_ok(home, "get", remote, local)
    return local.read_bytes()


def delete_blocks_of(config: ApplianceConfig, node_id: str) -> int:
    """What garbage collection leaves between collecting a deleted file's blocks and purging
    its tombstone: the block rows gone, the node still there."""
    with appliance_database(config, write=True) as db:
        db.execute("DELETE FROM blocks WHERE block_id IN "
                   "(SELECT block_id FROM node_blocks WHERE node_id = ?)", (node_id,))
        return db.changes()


# --- help ------------------------------------------------------------------------------------

def test_help_of_trash_and_restore(alice: Path) -> None:
    trash_help = cairn_ok(alice, "trash", "--help")
    for words in ("newest first", "path it had", "grace period", "cairn restore PATH",
                  "--json", "--all"):
        assert words in " ".join(trash_help.split()), (words, trash_help)
    restore_help = cairn_ok(alice, "restore", "--help")
    for words in ("Usage: cairn restore [OPTIONS] PATH", "id:<node id>",
                  "most recently deleted", "folders come back first", "conflicted-copy"):
        assert words in " ".join(restore_help.split()), (words, restore_help)
    assert "cairn trash" in " ".join(cairn_ok(alice, "--help").split())


# --- listing ---------------------------------------------------------------------------------

def test_trash_lists_deletion_roots_with_the_paths_they_had(alice: Path,
                                                             tmp_path: Path) -> None:
    assert trash_json(alice) == []
    assert cairn_ok(alice, "trash").strip() == "the trash is empty"
    write(tmp_path / "a.txt", b"alpha" * 100)
    tree = tmp_path / "tree"
    write(tree / "x.bin", os.urandom(1000))
    write(tree / "sub" / "y.bin", os.urandom(2000))
    write(tree / "sub" / "z.bin", os.urandom(3000))
    cairn_ok(alice, "mkdir", "/docs")
    cairn_ok(alice, "put", tmp_path / "a.txt", "/docs/")
    cairn_ok(alice, "put", tree, "/")

    cairn_ok(alice, "rm", "/docs/a.txt")
    cairn_ok(alice, "rm", "-r", "/tree")

    entries = trash_json(alice)
    assert [(e["path"], e["kind"], e["size"], e["items_inside"], e["deleted_with"])
            for e in entries] == [("/tree", "dir", 6000, 4, None),
                                  ("/docs/a.txt", "file", 500, 0, None)]
    assert entries[0]["deleted_at"] >= entries[1]["deleted_at"]
    assert all(len(e["id"]) == 32 for e in entries)

    everything = trash_json(alice, "--all")
    assert sorted((e["path"], e["kind"], e["deleted_with"]) for e in everything) == [
        ("/docs/a.txt", "file", None),
        ("/tree", "dir", None),
        ("/tree/sub", "dir", "/tree"),
        ("/tree/sub/y.bin", "file", "/tree"),
        ("/tree/sub/z.bin", "file", "/tree"),
        ("/tree/x.bin", "file", "/tree"),
    ]
    assert {e["path"]: e["items_inside"] for e in everything}["/tree/sub"] == 2
    expanded = cairn_ok(alice, "trash", "--all").strip().splitlines()
    assert len(expanded) == 6, expanded
    sub = [line.split()[2:] for line in expanded if line.split()[5] == "/tree/sub"]
    assert sub == [["folder", "4.9", "KiB", "/tree/sub", "(and", "2", "items", "inside)",
                    "(deleted", "with", "/tree)"]]

    table = cairn_ok(alice, "trash").strip().splitlines()
    assert len(table) == 2, table
    assert table[0].split()[2:] == ["folder", "5.9", "KiB", "/tree", "(and", "4", "items",
                                      "inside)"]
    assert table[1].split()[2:] == ["file", "500", "B", "/docs/a.txt"]


# --- restoring -------------------------------------------------------------------------------

def test_restore_brings_a_file_back_byte_for_byte(alice: Path, tmp_path: Path) -> None:
    original = write(tmp_path / "report.bin", os.urandom(300_000))
    cairn_ok(alice, "mkdir", "/docs")
    cairn_ok(alice, "put", original, "/docs/report.bin")
    cairn_ok(alice, "rm", "/docs/report.bin")
    assert ls_json(alice, "/docs") == []

    assert cairn_ok(alice, "restore", "/docs/report.bin").strip() == \
        "restored /docs/report.bin"
    assert fetched(alice, "/docs/report.bin", tmp_path / "back.bin") == original.read_bytes()
    assert trash_json(alice) == []
    # Restored once is restored: there is nothing left to restore at that path.
    fails(run_cairn(alice, "restore", "/docs/report.bin"), RemoteNotFoundError.exit_code,
          "nothing deleted at /docs/report.bin")


def test_restore_a_folder_brings_back_what_it_took(alice: Path, tmp_path: Path) -> None:
    tree = tmp_path / "photos"
    write(tree / "2026" / "a.jpg", b"a" * 10)
    write(tree / "2026" / "b.jpg", b"b" * 20)
    cairn_ok(alice, "put", tree, "/")
    cairn_ok(alice, "rm", "-r", "/photos")

    assert cairn_ok(alice, "restore", "photos/").strip() == \
        "restored /photos (and 3 items inside)"
    back = tmp_path / "back"
    cairn_ok(alice, "get", "/photos", back)
    assert (back / "2026" / "a.jpg").read_bytes() == b"a" * 10
    assert (back / "2026" / "b.jpg").read_bytes() == b"b" * 20


def test_restoring_inside_a_deleted_folder_restores_the_folders_first(
        alice: Path, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    write(project / "readme.txt", b"read me")
    write(project / "src" / "main.py", b"print(1)")
    util = write(project / "src" / "lib" / "util.py", os.urandom(5000))
    cairn_ok(alice, "put", project, "/")
    cairn_ok(alice, "rm", "/proj/src/lib/util.py")   # first by itself,
    cairn_ok(alice, "rm", "-r", "/proj")             # then the folder it was in
    assert [(e["path"], e["items_inside"]) for e in trash_json(alice)] == \
        [("/proj", 4), ("/proj/src/lib/util.py", 0)]

    assert cairn_ok(alice, "restore", "/proj/src/lib/util.py").strip().splitlines() == [
        "restored /proj/src/lib/util.py",
        "its folder /proj was deleted too: restored it first (and 4 items inside)"]
    assert fetched(alice, "/proj/src/lib/util.py", tmp_path / "util.py") == util.read_bytes()
    assert fetched(alice, "/proj/src/main.py", tmp_path / "main.py") == b"print(1)"
    assert sorted(e["name"] for e in ls_json(alice, "/proj")) == ["readme.txt", "src"]
    assert trash_json(alice) == []


def test_restoring_an_item_a_folder_took_along_restores_that_folder(
        alice: Path, tmp_path: Path) -> None:
    write(tmp_path / "notes" / "a" / "b.txt", b"bee")
    write(tmp_path / "notes" / "c.txt", b"sea")
    cairn_ok(alice, "put", tmp_path / "notes", "/")
    cairn_ok(alice, "rm", "-r", "/notes")
    node_id = {e["path"]: e["id"] for e in trash_json(alice, "--all")}["/notes/a/b.txt"]

    assert cairn_ok(alice, "restore", f"id:{node_id}").strip().splitlines() == [
        "restored /notes/a/b.txt",
        "it was deleted with its folder /notes: restored that (and 3 items inside)"]
    assert fetched(alice, "/notes/c.txt", tmp_path / "c.txt") == b"sea"
    assert fetched(alice, "/notes/a/b.txt", tmp_path / "b.txt") == b"bee"


def test_the_most_recent_of_two_deletions_comes_back(alice: Path, tmp_path: Path) -> None:
    cairn_ok(alice, "put", write(tmp_path / "one" / "d.txt", b"first"), "/d.txt")
    cairn_ok(alice, "rm", "/d.txt")
    cairn_ok(alice, "put", write(tmp_path / "two" / "d.txt", b"second"), "/d.txt")
    cairn_ok(alice, "rm", "/d.txt")

    assert cairn_ok(alice, "restore", "/d.txt").strip().splitlines() == [
        "restored /d.txt",
        "2 deleted items had that path; restored the most recently deleted (the other is "
        "still in the trash)"]
    assert fetched(alice, "/d.txt", tmp_path / "d.txt") == b"second"
    assert [e["path"] for e in trash_json(alice)] == ["/d.txt"]


def test_a_restored_name_that_a_live_item_has_is_reported(alice: Path,
                                                          tmp_path: Path) -> None:
    cairn_ok(alice, "mkdir", "/c")
    cairn_ok(alice, "put", write(tmp_path / "old" / "n.txt", b"old"), "/c/n.txt")
    cairn_ok(alice, "rm", "/c/n.txt")
    cairn_ok(alice, "put", write(tmp_path / "new" / "n.txt", b"new"), "/c/n.txt")
    restored_id = trash_json(alice)[0]["id"]

    lines = cairn_ok(alice, "restore", "/c/n.txt").strip().splitlines()
    assert lines[0] == "restored /c/n.txt"
    assert lines[1].startswith("note: a live item is also named /c/n.txt; both are kept")
    assert len(lines) == 2
    entries = ls_json(alice, "/c")
    assert sorted(e["name"] for e in entries) == ["n.txt", "n.txt"]
    assert restored_id in {e["id"] for e in entries}
    assert fetched(alice, f"id:{restored_id}", tmp_path / "restored.txt") == b"old"


# --- refusals --------------------------------------------------------------------------------

def test_nothing_deleted_there_fails_in_one_line(alice: Path, tmp_path: Path) -> None:
    fails(run_cairn(alice, "restore", "/nope.txt"), RemoteNotFoundError.exit_code,
          "nothing deleted at /nope.txt", "cairn trash")
    cairn_ok(alice, "put", write(tmp_path / "live.txt", b"here"), "/live.txt")
    fails(run_cairn(alice, "restore", "/live.txt"), RemoteNotFoundError.exit_code,
          "nothing deleted at /live.txt")
    live_id = ls_json(alice, "/live.txt")[0]["id"]
    fails(run_cairn(alice, "restore", f"id:{live_id}"), UsageError.exit_code,
          "is not deleted", "/live.txt")
    fails(run_cairn(alice, "restore", "id:" + "0" * 32), RemoteNotFoundError.exit_code,
          "nothing deleted at id:")
    fails(run_cairn(alice, "restore", "/"), UsageError.exit_code, "root folder")


def test_another_users_deleted_file_is_not_yours_to_restore(
        fresh_user: MakeUser, tmp_path: Path) -> None:
    owner, alice = new_user(fresh_user, tmp_path)
    bob_name, bob = new_user(fresh_user, tmp_path)
    cairn_ok(alice, "mkdir", "/shared")
    cairn_ok(alice, "put", write(tmp_path / "shared" / "f.txt", b"ours"), "/shared/f.txt")
    cairn_ok(alice, "share", "/shared", bob_name)
    cairn_ok(alice, "rm", "/shared/f.txt")
    node_id = trash_json(alice)[0]["id"]

    assert trash_json(bob) == []
    fails(run_cairn(bob, "restore", f"id:{node_id}"), ForbiddenError.exit_code,
          f"belongs to {owner}")
    assert [e["id"] for e in trash_json(alice)] == [node_id]   # still deleted


def test_restoring_after_the_data_was_reclaimed_says_so(
        appliance: Served, alice: Path, tmp_path: Path) -> None:
    cairn_ok(alice, "put", write(tmp_path / "old.bin", os.urandom(10_000)), "/old.bin")
    cairn_ok(alice, "rm", "/old.bin")
    node_id = trash_json(alice)[0]["id"]
    assert delete_blocks_of(appliance.config, node_id) == 1

    fails(run_cairn(alice, "restore", "/old.bin"), ApiError.exit_code,
          "/old.bin can no longer be restored", "reclaimed", "grace period")
    assert [e["id"] for e in trash_json(alice)] == [node_id]
