"""The local scan: a whole walk, and the incremental update from the paths that changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agent.sync.ignore import IgnoreRules
from agent.sync.scan import rescan_paths, scan_tree

RULES = IgnoreRules.from_text("*.log\n")


def later() -> int:
    return time.time_ns() + 10**10      # everything written so far counts as stable


def no_cache(path: str) -> None:
    return None


def test_a_whole_walk_skips_links_ignored_and_reserved(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.txt").write_text("a")
    (tmp_path / "x.log").write_text("ignored")
    (tmp_path / "Shared with me").mkdir()
    os.symlink("/", tmp_path / "link")
    scan = scan_tree(tmp_path, RULES, {}, later(), reserved=frozenset({"Shared with me"}))
    assert sorted(scan.entries) == ["d", "d/a.txt"]
    assert scan.skipped == ["link"]


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
