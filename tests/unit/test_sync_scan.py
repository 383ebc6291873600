"""The local scan: a whole walk, and the incremental update from the paths that changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agent.sync.ignore import IgnoreRules
from agent.sync.model import link_content_id
from agent.sync.scan import folder_not_local, hash_file, rescan_paths, scan_tree, stat_of

RULES = IgnoreRules.from_text("*.log\n")


def later() -> int:
    return time.time_ns() + 10**10      # everything written so far counts as stable


def no_cache(path: str) -> None:
    return None


def test_a_whole_walk_skips_special_files_ignored_and_reserved(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.txt").write_text("a")
    (tmp_path / "x.log").write_text("ignored")
    (tmp_path / "Shared with me").mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/", tmp_path / "x2.log")          # an ignored name: a link too
    scan = scan_tree(tmp_path, RULES, {}, later(), reserved=frozenset({"Shared with me"}))
    assert sorted(scan.entries) == ["d", "d/a.txt"]
    assert scan.skipped == ["fifo"]


def test_links_are_entries_of_their_own_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_text("not ours")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d/a.txt").write_text("a")
    links = {"rel": "d/a.txt", "abs": str(outside / "secret.txt"), "dangling": "nowhere",
             "to-folder": str(outside), "d/up": "../d"}
    for name, target in links.items():
        os.symlink(target, root / name)
    scan = scan_tree(root, RULES, {}, later())
    assert sorted(scan.entries) == sorted(["d", "d/a.txt", *links])   # not looked into
    for name, target in links.items():
        entry = scan.entries[name]
        assert entry.kind == "file" and entry.stable
        assert entry.content == link_content_id(target)
        assert entry.stat == stat_of(os.lstat(root / name))
    assert scan.entries["d/a.txt"].content is None      # a file is hashed on demand
    # a link is read, never what it points to
    assert hash_file(root / "abs") == (stat_of(os.lstat(root / "abs")),
                                       link_content_id(str(outside / "secret.txt")))


def test_an_update_sees_a_link_made_or_pointed_elsewhere(tmp_path: Path) -> None:
    os.symlink("one", tmp_path / "l")
    first = scan_tree(tmp_path, RULES, {}, later())
    os.symlink("two", tmp_path / "tmp-link")
    os.rename(tmp_path / "tmp-link", tmp_path / "l")     # what ln -sfn does
    os.symlink("three", tmp_path / "new")
    update = rescan_paths(tmp_path, RULES, first.entries, {"l", "new"}, no_cache, later())
    assert update.entries["l"].content == link_content_id("two")
    assert update.entries["new"].content == link_content_id("three")
    assert update.changed == {"l", "new"}


def test_a_folder_above_that_is_a_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "real/sub").mkdir(parents=True)
    os.symlink(tmp_path / "real", tmp_path / "link")
    (tmp_path / "file").write_text("f")
    assert folder_not_local(tmp_path, "real/sub/x.txt") is None
    assert folder_not_local(tmp_path, "real/missing/x.txt") is None
    assert folder_not_local(tmp_path, "link/sub/x.txt") == "link"
    assert folder_not_local(tmp_path, "file/x.txt") == "file"
    assert folder_not_local(tmp_path, "link") is None     # the item itself may be a link


def test_an_update_looks_only_at_what_changed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    first = scan_tree(tmp_path, RULES, {}, later())
    (tmp_path / "b.txt").write_text("bigger")
    (tmp_path / "new/deep").mkdir(parents=True)
    (tmp_path / "new/deep/c.txt").write_text("c")
    (tmp_path / "unseen.txt").write_text("no event for this one")
    update = rescan_paths(tmp_path, RULES, first.entries, {"b.txt", "new/deep/c.txt"},
                          no_cache, later())
    assert update.entries["b.txt"].stat.size == 6
    assert {"new", "new/deep", "new/deep/c.txt"} <= set(update.entries)
    assert "unseen.txt" not in update.entries       # only the dirty paths were looked at
    assert update.entries["d/a.txt"] is first.entries["d/a.txt"]
    assert not update.vanished and not update.complete


def test_a_gone_path_asks_for_a_whole_walk(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    first = scan_tree(tmp_path, RULES, {}, later())
    os.rename(tmp_path / "a.txt", tmp_path / "b.txt")
    update = rescan_paths(tmp_path, RULES, first.entries, {"a.txt"}, no_cache, later())
    assert update.vanished and "a.txt" not in update.entries


def test_a_moved_inode_is_looked_for_at_its_old_path(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    first = scan_tree(tmp_path, RULES, {}, later())
    os.rename(tmp_path / "a.txt", tmp_path / "b.txt")
    update = rescan_paths(tmp_path, RULES, first.entries, {"b.txt"}, no_cache, later())
    assert sorted(update.entries) == ["b.txt"]      # not a copy: a.txt is gone too
