"""The local change watcher for `cairn sync DIR`: inotify (agent.sync.inotify) under trio.

Theory of operation. One inotify instance watches every folder under DIR (symbolic links
are not followed); a folder that appears is watched at once, with what it already holds
reported too, and a folder moved within DIR keeps its watches under its new name. trio
waits for the descriptor to become readable (no thread, no polling: an idle watcher costs
no CPU); once a change arrives, changes are collected until DEBOUNCE_MS pass without a
new one (or MAX_BATCH_MS of steady changes), then the batch is yielded.

The batches are a hint that wakes the engine, not a record of what happened: contents of
a folder created in one go may show up only as the folder itself, and watching stops on
errors. The engine scans DIR on every wake-up and also every few minutes, which covers
all of that. When the kernel's queue overflows the watcher ends, so the engine walks the
whole folder and starts a new watcher.

When DIR is deleted, moved away or replaced (its own watch reports it; and every
ROOT_CHECK_S its device and inode are compared), `watch_changes` yields `{ROOT_GONE}` and
ends. When the watcher cannot run (no inotify, the watch limit reached, a folder inside
DIR that cannot be read) it logs a warning and ends without yielding anything further.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import trio

from agent.sync import inotify
from agent.sync.ignore import IgnoreRules
from agent.sync.inotify import Event, Inotify

log = logging.getLogger(__name__)

ROOT_GONE: Final = ""
"""The path yielded, alone, when DIR itself is deleted, moved away or replaced."""

MAX_BATCH_MS: Final = 1_000
"""While changes keep coming (a large copy), a batch is still yielded this often."""

DEBOUNCE_MS: Final = 20
"""A batch closes once this long passes without a new change."""

ROOT_CHECK_S: Final = 30.0
"""How often an idle watcher compares DIR's device and inode (a DIR replaced without an
inotify event, e.g. a bind mount)."""

_GONE_ERRORS: Final = (errno.ENOENT, errno.ENOTDIR)


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    """The engine restarts a stopped watcher every few seconds: say why once."""
    log.warning("%s", message)


def wanted(rules: IgnoreRules, relative_path: str, is_dir: bool | None) -> bool:
    """Whether a change to RELATIVE_PATH is worth reporting. IS_DIR is None when the path
    is gone and its kind unknown: reported unless ignored both as a file and as a folder
    (a needless wake-up costs a scan; a missed deletion waits for the periodic one)."""
    if is_dir is None:
        return not (rules.ignores(relative_path, False) and rules.ignores(relative_path, True))
    return not rules.ignores(relative_path, is_dir)


def _kind(path: str) -> bool | None:
    """True for a folder, False for anything else, None if nothing is there any more."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return None


def _identity(root: str) -> tuple[int, int] | None:
    """Device and inode of the folder at ROOT, None if there is no folder there."""
    try:
        info = os.stat(root)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


class _Watches:
    """The folders watched, by watch descriptor, as paths relative to the root ('' is the
    root itself)."""

    def __init__(self, notify: Inotify, root: str) -> None:
        self.notify = notify
        self.root = root
        self.paths: dict[int, str] = {}

    def add_tree(self, folder: str, found: set[str] | None = None) -> None:
        """Watch FOLDER and every folder under it; FOUND collects what is under it (a
        folder that just appeared: its contents came before its watch). Raises OSError
        (the watch limit, a folder that cannot be read); a folder gone meanwhile is
        skipped."""
        stack = [folder]
        while stack:
            current = stack.pop()
            absolute = os.path.join(self.root, current) if current else self.root
            try:
                self.paths[self.notify.add(absolute)] = current
                entries = list(os.scandir(absolute))
            except OSError as exc:
                if exc.errno in _GONE_ERRORS:
                    continue
                raise
            for entry in entries:
                child = f"{current}/{entry.name}" if current else entry.name
                if found is not None:
                    found.add(child)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(child)
                except OSError:
                    continue

    def moved(self, old: str, new: str) -> None:
        """A watched folder was renamed within the root: its watches follow it."""
        prefix = old + "/"
        for watch, path in list(self.paths.items()):
            if path == old:
                self.paths[watch] = new
            elif path.startswith(prefix):
                self.paths[watch] = new + path[len(old):]

    def drop_tree(self, folder: str) -> None:
        """FOLDER left the root: stop watching it and what is under it."""
        prefix = folder + "/"
        for watch, path in list(self.paths.items()):
            if path == folder or path.startswith(prefix):
                self.notify.remove(watch)
                del self.paths[watch]


class _Overflow(Exception):
    """The kernel dropped events: what changed is unknown."""


def _take(watches: _Watches, events: list[Event], found: set[str]) -> bool:
    """Add the paths EVENTS name to FOUND and keep the watches current. Whether DIR itself
    is gone. Raises _Overflow and OSError (a new folder that cannot be watched)."""
    moved_from: dict[int, str] = {}
    for event in events:
        if event.mask & inotify.IN_Q_OVERFLOW:
            raise _Overflow
        folder = watches.paths.get(event.watch)
        if folder is None:
            continue
        if event.mask & inotify.IN_IGNORED:
            del watches.paths[event.watch]
            if folder == "":
                return True
            continue
        if not event.name:          # the watched folder itself
            if folder == "" and event.mask & (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
                                              | inotify.IN_UNMOUNT):
                return True
            continue
        path = f"{folder}/{event.name}" if folder else event.name
        found.add(path)
        if not event.is_dir:
            continue
        if event.mask & inotify.IN_MOVED_FROM:
            moved_from[event.cookie] = path
        elif event.mask & inotify.IN_MOVED_TO and event.cookie in moved_from:
            watches.moved(moved_from.pop(event.cookie), path)
        elif event.mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
            watches.add_tree(path, found)
    for path in moved_from.values():      # moved out of DIR
        watches.drop_tree(path)
    return False


def _wanted_paths(root: str, paths: set[str], rules: IgnoreRules) -> set[str]:
    return {path for path in paths
            if wanted(rules, path, _kind(os.path.join(root, path)))}


async def watch_changes(root: Path, rules_for: Callable[[], IgnoreRules], *,
                        debounce_ms: int = DEBOUNCE_MS) -> AsyncIterator[set[str]]:
    """Yield, per batch, the relative paths under ROOT that changed and are not ignored.

    A batch closes once DEBOUNCE_MS pass without a new change. RULES_FOR is called for
    every batch, so an edited .cairnignore applies at once. Yields `{ROOT_GONE}` and ends
    when ROOT is deleted, moved away or replaced (or missing at the start); logs a warning
    and ends when the watcher cannot run or the kernel's queue overflowed. Cancel it with
    a trio cancel scope (at once); if you stop iterating early, close it (`aclosing`) to
    release its inotify descriptor at once rather than when it is garbage-collected.
    """
    absolute_root = os.path.join(os.getcwd(), root)
    identity = _identity(absolute_root)
    if identity is None:
        yield {ROOT_GONE}
        return
    try:
        notify = Inotify()
    except OSError:
        _warn_once("inotify is not available: local changes are found by periodic rescans")
        return
    with notify:
        watches = _Watches(notify, absolute_root)
        try:
            watches.add_tree("")
            while True:
                found: set[str] = set()
                with trio.move_on_after(ROOT_CHECK_S):
                    await trio.lowlevel.wait_readable(notify.fd)
                gone = _take(watches, notify.read(), found)
                first = trio.current_time()
                while found and not gone:       # the rest of the batch
                    quiet = min(debounce_ms / 1000, first + MAX_BATCH_MS / 1000
                                - trio.current_time())
                    if quiet <= 0:
                        break
                    with trio.move_on_after(quiet) as waited:
                        await trio.lowlevel.wait_readable(notify.fd)
                    if waited.cancelled_caught:
                        break
                    gone = _take(watches, notify.read(), found)
                if gone or _identity(absolute_root) != identity:
                    yield {ROOT_GONE}
                    return
                paths = _wanted_paths(absolute_root, found, rules_for())
                if paths:
                    yield paths
        except _Overflow:
            log.info("too many local changes at once for the watcher: walking %s", root)
        except OSError as exc:
            if _identity(absolute_root) != identity:
                yield {ROOT_GONE}
                return
            reason = ("the inotify watch limit is reached; raise "
                      "fs.inotify.max_user_watches" if exc.errno == errno.ENOSPC else str(exc))
            _warn_once(f"cannot watch {root} for changes ({reason}): "
                       "local changes are found by periodic rescans")
