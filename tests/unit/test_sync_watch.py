"""What `cairn sync` ignores (agent/sync/ignore.py, pure) and the local change watcher
(agent/sync/watch.py) on real files in tmp_path: real inotify, real trio, no mocks."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
import trio.testing

from agent.sync import inotify
from agent.sync.ignore import BUILTIN_TEMPORARY_FILES, IgnoreRules
from agent.sync.inotify import Event, parse_events
from agent.sync.watch import (
    ROOT_GONE,
    wanted,
    watch_changes,
)

# --- ignore rules ----------------------------------------------------------------------

BUILTINS = IgnoreRules.from_text("")

TEMPORARY_NAMES = ["notes.txt.swp", ".notes.txt.swx", ".x.swo", "4913", "report.doc~",
                   ".#notes.org", "#notes.org#", ".~lock.budget.ods#", "~$budget.docx",
                   ".DS_Store", "Thumbs.db", "x.tmp", ".goutputstream-AB12CD",
                   "film.mkv.part", "film.mkv.crdownload"]


def test_every_builtin_temporary_pattern_has_an_example() -> None:
    for pattern in BUILTIN_TEMPORARY_FILES:
        assert fnmatch.filter(TEMPORARY_NAMES, pattern), pattern


@pytest.mark.parametrize("name", TEMPORARY_NAMES)
def test_builtin_temporaries_are_ignored_as_files_at_any_depth(name: str) -> None:
    assert BUILTINS.ignores(name, False)
    assert BUILTINS.ignores(f"a/b/{name}", False)


@pytest.mark.parametrize("name", ["4913", "old~", "x.tmp", "Thumbs.db"])
def test_builtin_temporaries_do_not_hide_folders_of_that_name(name: str) -> None:
    assert not BUILTINS.ignores(name, True)
    assert not BUILTINS.ignores(f"{name}/inside.txt", False)


@pytest.mark.parametrize("name", [".cairn-state", ".cairn-trash",
                                  ".report.odt.0123456789ab-v3.cairn-part"])
def test_cairn_own_names_are_ignored_as_files_and_folders(name: str) -> None:
    assert BUILTINS.ignores(name, False)
    assert BUILTINS.ignores(name, True)
    assert BUILTINS.ignores(f"deep/er/{name}", False)


@pytest.mark.parametrize("name", ["notes.txt", "swp", "x.swp.txt", "4913.txt", "cairn-notes",
                                  ".cairnignore-old", "a.partial", "thumbs.db.bak",
                                  "Makefile", ".bashrc"])
def test_ordinary_names_are_kept(name: str) -> None:
    assert not BUILTINS.ignores(name, False)
    assert not BUILTINS.ignores(name, True)


def test_negation_brings_a_file_back() -> None:
    rules = IgnoreRules.from_text("*.log\n!keep.log\n")
    assert rules.ignores("debug.log", False)
    assert rules.ignores("sub/debug.log", False)
    assert not rules.ignores("keep.log", False)
    assert not rules.ignores("sub/keep.log", False)


def test_folder_pattern_matches_folders_only_and_everything_below() -> None:
    rules = IgnoreRules.from_text("build/\n")
    assert rules.ignores("build", True)
    assert rules.ignores("src/build", True)
    assert not rules.ignores("build", False)          # a file called build is kept
    assert rules.ignores("build/x/y.o", False)        # a deep path judged on its own
    assert rules.ignores("build/x", True)
    assert not rules.ignores("builder/x.o", False)


def test_nothing_under_an_ignored_folder_comes_back() -> None:
    rules = IgnoreRules.from_text("build/\n!build/keep.txt\n")
    assert rules.ignores("build/keep.txt", False)


def test_anchored_pattern_matches_at_the_top_only() -> None:
    rules = IgnoreRules.from_text("/top.txt\n")
    assert rules.ignores("top.txt", False)
    assert not rules.ignores("sub/top.txt", False)


def test_cairnignore_itself_is_never_ignored() -> None:
    rules = IgnoreRules.from_text(".*\n.cairnignore\n")
    assert not rules.ignores(".cairnignore", False)
    assert rules.ignores(".hidden", False)
    assert rules.ignores("sub/.cairnignore", False)   # only DIR's own file is special


def test_comments_blank_lines_crlf_and_escapes() -> None:
    rules = IgnoreRules.from_text("# a comment\r\n\r\n*.bak\r\n\\#literal\r\n")
    assert rules.ignores("x.bak", False)
    assert rules.ignores("#literal", False)
    assert not rules.ignores("# a comment", False)
    assert rules.rejected_lines == ()


def test_malformed_lines_are_skipped_and_the_rest_apply() -> None:
    rules = IgnoreRules.from_text("!\n*.log\n\\\n[z-a]\nsecret/\n")
    assert rules.rejected_lines == ("!", "\\", "[z-a]")
    assert rules.ignores("x.log", False)
    assert rules.ignores("secret", True)
    assert not rules.ignores("x.txt", False)


def test_root_itself_is_never_ignored() -> None:
    assert not IgnoreRules.from_text("*\n").ignores("", True)


def write(path: Path, data: str | bytes = "x") -> None:
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_load_missing_file_means_builtins_only(tmp_path: Path) -> None:
    rules = IgnoreRules.load(tmp_path)
    assert rules.ignores("x.swp", False)
    assert not rules.ignores("x.log", False)


def test_load_reads_utf8_with_a_byte_order_mark(tmp_path: Path) -> None:
    write(tmp_path / ".cairnignore", "\ufeff*.log\nbrouillon-é.txt\n".encode())
    rules = IgnoreRules.load(tmp_path)
    assert rules.ignores("x.log", False)
    assert rules.ignores("brouillon-é.txt", False)


def test_load_undecodable_file_warns_and_keeps_builtins(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / ".cairnignore", b"*.log\n\xff\xfe\xfa\n")
    rules = IgnoreRules.load(tmp_path)
    assert not rules.ignores("x.log", False)
    assert rules.ignores("x.swp", False)
    assert "not UTF-8" in caplog.text


def test_load_unreadable_file_warns_and_keeps_builtins(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / ".cairnignore").mkdir()               # EISDIR, even for root
    rules = IgnoreRules.load(tmp_path)
    assert rules.ignores("x.swp", False)
    assert "cannot read" in caplog.text


def test_load_warns_about_invalid_patterns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / ".cairnignore", "!\n*.log\n")
    caplog.set_level(logging.WARNING, logger="agent.sync.ignore")
    assert IgnoreRules.load(tmp_path).ignores("x.log", False)
    assert "skipping invalid patterns '!'" in caplog.text


# --- pure pieces of the watcher ---------------------------------------------------------

def test_a_vanished_path_is_reported_unless_ignored_either_way() -> None:
    rules = IgnoreRules.from_text("build/\n")
    assert wanted(rules, "build", None)               # it may have been a file
    assert not wanted(rules, "build", True)
    assert not wanted(IgnoreRules.from_text("x.swp/\n"), "x.swp", None)
    assert wanted(rules, "notes.txt", None)


def test_x_swp_vanished_is_kept_if_only_the_file_reading_ignores_it() -> None:
    # A folder called x.swp is not a vim swap file: if it vanished, say so.
    assert BUILTINS.ignores("x.swp", False) and not BUILTINS.ignores("x.swp", True)
    assert wanted(BUILTINS, "x.swp", None)


# --- the watcher on real files ----------------------------------------------------------

class Batches:
    """What a running watcher reported, read with a deadline."""

    def __init__(self, receive: trio.MemoryReceiveChannel[set[str]]) -> None:
        self.receive = receive
        self.seen: list[set[str]] = []

    def union(self) -> set[str]:
        everything: set[str] = set()
        for batch in self.seen:
            everything |= batch
        return everything

    async def until(self, done: Callable[[set[str]], bool], seconds: float = 5) -> set[str]:
        """Reads batches until DONE holds for everything seen so far; returns that."""
        with trio.fail_after(seconds):
            while not done(self.union()):
                self.seen.append(await self.receive.receive())
        return self.union()

    async def until_has(self, *paths: str) -> set[str]:
        return await self.until(lambda seen: set(paths) <= seen)

    async def ended(self, seconds: float = 5) -> bool:
        with trio.fail_after(seconds):
            try:
                self.seen.append(await self.receive.receive())
            except trio.EndOfChannel:
                return True
        return False


@asynccontextmanager
async def watching(root: Path, rules_for: Callable[[], IgnoreRules] | None = None,
                   ) -> AsyncIterator[Batches]:
    """A watcher running on ROOT; yields once its inotify watches are in place."""
    send, receive = trio.open_memory_channel[set[str]](1000)

    async def run() -> None:
        async with send:
            async for batch in watch_changes(root, rules_for or (lambda: IgnoreRules.load(root))):
                await send.send(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        # The watches are set up before the watcher first waits: once every task is
        # blocked, they exist.
        await trio.testing.wait_all_tasks_blocked()
        yield Batches(receive)
        nursery.cancel_scope.cancel()


def inotify_descriptors() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in os.listdir(fds):
        with suppress(OSError):                 # closed since the listing
            count += os.readlink(fds / fd) == "anon_inode:inotify"
    return count


def test_inotify_is_available_here() -> None:
    assert inotify.available()


async def test_a_new_file_is_reported(tmp_path: Path) -> None:
    async with watching(tmp_path) as batches:
        write(tmp_path / "a.txt")
        assert await batches.until_has("a.txt") == {"a.txt"}


async def test_a_modified_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "a.txt", "one")
    async with watching(tmp_path) as batches:
        with (tmp_path / "sub" / "a.txt").open("a") as file:
            file.write("two")
        assert await batches.until_has("sub/a.txt") == {"sub/a.txt"}


async def test_a_deleted_file_and_folder_are_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.txt")
    write(tmp_path / "d" / "e" / "f.txt")
    async with watching(tmp_path) as batches:
        (tmp_path / "a.txt").unlink()
        shutil.rmtree(tmp_path / "d")
        seen = await batches.until_has("a.txt", "d")
        assert seen <= {"a.txt", "d", "d/e", "d/e/f.txt"}


async def test_a_rename_reports_both_names(tmp_path: Path) -> None:
    write(tmp_path / "old.txt")
    async with watching(tmp_path) as batches:
        (tmp_path / "old.txt").rename(tmp_path / "new.txt")
        assert await batches.until_has("old.txt", "new.txt") == {"old.txt", "new.txt"}


async def test_a_burst_of_writes_arrives_in_few_batches(tmp_path: Path) -> None:
    names = {f"f{i:02}.txt" for i in range(30)}
    async with watching(tmp_path) as batches:
        for name in names:
            write(tmp_path / name)
        assert await batches.until_has(*names) == names
        assert len(batches.seen) <= 3


async def test_ignored_names_are_not_reported(tmp_path: Path) -> None:
    async with watching(tmp_path) as batches:
        write(tmp_path / "x.swp")
        write(tmp_path / ".cairn-state" / "db")
        write(tmp_path / ".real.txt.abc-v1.cairn-part")
        write(tmp_path / "real.txt")
        # the ignored ones were written first, so they would be in this batch or before
        assert await batches.until_has("real.txt") == {"real.txt"}


async def test_paths_under_an_ignored_folder_are_not_reported(tmp_path: Path) -> None:
    write(tmp_path / ".cairnignore", "build/\n")
    write(tmp_path / "build" / "x" / "old.o")
    async with watching(tmp_path) as batches:
        write(tmp_path / "build" / "x" / "y.o")
        write(tmp_path / "build" / "new" / "z.o")
        (tmp_path / "build" / "x" / "old.o").unlink()
        write(tmp_path / "marker.txt")
        assert await batches.until_has("marker.txt") == {"marker.txt"}


async def test_an_edited_cairnignore_applies_to_the_next_batch(tmp_path: Path) -> None:
    async with watching(tmp_path) as batches:
        write(tmp_path / "a.log")
        await batches.until_has("a.log")
        write(tmp_path / ".cairnignore", "*.log\n")
        await batches.until_has(".cairnignore")
        write(tmp_path / "b.log")
        write(tmp_path / "b.txt")
        assert "b.log" not in await batches.until_has("b.txt")


async def test_nested_new_folders_are_reported_and_then_watched(tmp_path: Path) -> None:
    async with watching(tmp_path) as batches:
        os.makedirs(tmp_path / "n" / "b" / "c")
        write(tmp_path / "n" / "b" / "c" / "first.txt")
        # contents created together with the folder may come only as "n": the engine scans
        seen = await batches.until_has("n")
        assert seen <= {"n", "n/b", "n/b/c", "n/b/c/first.txt"}
        write(tmp_path / "n" / "b" / "c" / "later.txt")
        assert "n/b/c/later.txt" in await batches.until_has("n/b/c/later.txt")


async def test_root_moved_away_yields_root_gone_and_ends(tmp_path: Path) -> None:
    root = tmp_path / "dir"
    root.mkdir()
    async with watching(root) as batches:
        root.rename(tmp_path / "elsewhere")
        await batches.until_has(ROOT_GONE)
        assert batches.seen[-1] == {ROOT_GONE}
        assert await batches.ended()


async def test_root_deleted_yields_root_gone_and_ends(tmp_path: Path) -> None:
    root = tmp_path / "dir"
    write(root / "sub" / "a.txt")
    async with watching(root) as batches:
        shutil.rmtree(root)
        await batches.until_has(ROOT_GONE)
        assert batches.seen[-1] == {ROOT_GONE}
        assert await batches.ended()


async def test_root_replaced_by_another_folder_yields_root_gone(tmp_path: Path) -> None:
    root = tmp_path / "dir"
    root.mkdir()
    async with watching(root) as batches:
        root.rename(tmp_path / "old")
        root.mkdir()                      # same path, another folder: the watches are stale
        write(root / "a.txt")
        await batches.until_has(ROOT_GONE)
        assert batches.seen[-1] == {ROOT_GONE}
        assert await batches.ended()


async def test_missing_root_yields_root_gone_at_once(tmp_path: Path) -> None:
    async with watching(tmp_path / "nowhere") as batches:
        await batches.until_has(ROOT_GONE)
        assert await batches.ended()


async def test_cancelling_returns_promptly_and_releases_inotify(tmp_path: Path) -> None:
    before = inotify_descriptors()
    with trio.fail_after(5):
        async with watching(tmp_path) as batches:
            write(tmp_path / "a.txt")
            await batches.until_has("a.txt")
            assert inotify_descriptors() == before + 1
            await trio.sleep(0.1)                 # cancel mid-wait, not on a boundary
            started = trio.current_time()
    # leaving `watching` cancelled the watcher and waited for it to finish
    assert trio.current_time() - started < 1.0
    assert inotify_descriptors() == before


async def test_cancelling_right_after_starting_is_prompt_too(tmp_path: Path) -> None:
    with trio.fail_after(2):
        async with watching(tmp_path):
            started = trio.current_time()
    assert trio.current_time() - started < 1.0


async def test_a_surrounding_cancel_scope_stops_the_watcher(tmp_path: Path) -> None:
    with trio.fail_after(2):
        with trio.move_on_after(0.3) as scope:
            async for _ in watch_changes(tmp_path, lambda: BUILTINS):
                pytest.fail("nothing changed")
        assert scope.cancelled_caught


# --- inotify itself ----------------------------------------------------------------------

def _raw_event(watch: int, mask: int, cookie: int, name: bytes) -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""
    return struct.pack("iIII", watch, mask, cookie, len(padded)) + padded


def test_events_are_parsed_with_their_padding_and_undecodable_names() -> None:
    data = (_raw_event(1, inotify.IN_CREATE | inotify.IN_ISDIR, 0, b"new folder")
            + _raw_event(2, inotify.IN_DELETE_SELF, 0, b"")
            + _raw_event(1, inotify.IN_MOVED_FROM, 7, b"caf\xe9.txt")
            + _raw_event(-1, inotify.IN_Q_OVERFLOW, 0, b""))
    events = parse_events(data)
    assert events == [Event(1, inotify.IN_CREATE | inotify.IN_ISDIR, 0, "new folder"),
                      Event(2, inotify.IN_DELETE_SELF, 0, ""),
                      Event(1, inotify.IN_MOVED_FROM, 7, os.fsdecode(b"caf\xe9.txt")),
                      Event(-1, inotify.IN_Q_OVERFLOW, 0, "")]
    assert events[0].is_dir and not events[2].is_dir
    assert os.fsencode(events[2].name) == b"caf\xe9.txt"      # the name round-trips


def test_a_truncated_read_yields_only_whole_events() -> None:
    data = _raw_event(1, inotify.IN_MODIFY, 0, b"a.txt")
    assert parse_events(data + data[:10]) == [Event(1, inotify.IN_MODIFY, 0, "a.txt")]


async def test_a_folder_moved_inside_keeps_its_watches_under_its_new_name(
        tmp_path: Path) -> None:
    write(tmp_path / "old" / "deep" / "a.txt")
    async with watching(tmp_path) as batches:
        (tmp_path / "old").rename(tmp_path / "new")
        await batches.until_has("old", "new")
        write(tmp_path / "new" / "deep" / "b.txt")
        seen = await batches.until_has("new/deep/b.txt")
        assert not any(path.startswith("old/") for path in seen)


async def test_a_folder_moved_in_from_outside_is_reported_and_watched(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write(tmp_path / "outside" / "sub" / "a.txt")
    async with watching(root) as batches:
        (tmp_path / "outside").rename(root / "inside")
        seen = await batches.until_has("inside")
        assert seen <= {"inside", "inside/sub", "inside/sub/a.txt"}
        write(root / "inside" / "sub" / "b.txt")
        assert "inside/sub/b.txt" in await batches.until_has("inside/sub/b.txt")


async def test_a_folder_moved_out_is_no_longer_watched(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "leaving" / "a.txt")
    async with watching(root) as batches:
        (root / "leaving").rename(tmp_path / "gone")
        await batches.until_has("leaving")
        write(tmp_path / "gone" / "b.txt")          # outside now: not ours
        write(root / "marker.txt")
        seen = await batches.until_has("marker.txt")
        assert not any("b.txt" in path for path in seen)


def _max_queued_events() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


async def test_a_queue_overflow_ends_the_watcher_so_the_engine_walks_everything(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = _max_queued_events()
    if limit > 50_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it here")
    caplog.set_level(logging.INFO, logger="agent.sync.watch")
    async with watching(tmp_path) as batches:
        for index in range(limit + 100):      # no checkpoint: the watcher cannot read
            (tmp_path / f"f{index}").touch()
        assert await batches.ended(seconds=20)
    assert "too many local changes at once" in caplog.text
