"""The local change watcher for `cairn sync DIR`: inotify through `watchfiles`, under trio.

Theory of operation. `watchfiles.awatch` runs on anyio, hence under trio. Its Rust side
keeps an inotify watch on every folder under DIR and collects events in a background
thread; each `awatch` step runs `RustNotify.watch` in a worker thread, which sleeps
`step` ms at a time and returns a batch once a step passes with nothing new (or after
MAX_BATCH_MS of steady changes). So a change is reported within one or two steps.

The batches are a hint that wakes the engine, not a record of what happened: contents of
a folder created in one go may show up only as the folder itself, inotify's queue can
overflow silently, and watching stops on errors. The engine scans DIR on every wake-up
and also every few minutes, which covers all of that.

Cancellation: `awatch` waits for its worker thread without abandoning it, so a trio
cancel takes effect when `RustNotify.watch` next returns. `rust_timeout=ROOT_CHECK_MS`
bounds that (the default, 5 s, would hold a cancelled caller for up to 5 s); with
`yield_on_timeout` the same wake-up checks that DIR is still the folder we started on.

When DIR is deleted, moved away or replaced (compared by device and inode),
`watch_changes` yields `{ROOT_GONE}` and ends: the inotify watches belong to the old
folder (after a move, events even keep the old path names). When the watcher cannot run
(no inotify, the watch limit reached, a folder inside DIR that cannot be read, an error
while watching) it logs a warning and ends without yielding anything further.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Final

from watchfiles import Change, awatch
from watchfiles._rust_notify import WatchfilesRustInternalError

from agent.sync.ignore import IgnoreRules

log = logging.getLogger(__name__)

ROOT_GONE: Final = ""
"""The path yielded, alone, when DIR itself is deleted, moved away or replaced."""

MAX_BATCH_MS: Final = 1_000
"""While changes keep coming (a large copy), a batch is still yielded this often."""

ROOT_CHECK_MS: Final = 500
"""How often the idle watcher returns to Python: bounds how long a cancel takes, and how
soon a DIR moved away without an inotify event is noticed."""

_IN_CLOEXEC: Final = 0o2000000


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    """The engine restarts a stopped watcher every few seconds: say why once."""
    log.warning("%s", message)


def inotify_available() -> bool:
    """Whether this process can create an inotify instance. Without it `watchfiles` would
    quietly fall back to polling the whole tree, which `watch_changes` refuses to do."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        descriptor = libc.inotify_init1(_IN_CLOEXEC)
    except (OSError, AttributeError):
        return False
    if descriptor < 0:
        return False
    os.close(descriptor)
    return True


def relative_to_root(root: str, path: str) -> str | None:
    """PATH as '/'-separated and relative to ROOT (both absolute), ROOT_GONE for ROOT
    itself, None for anything outside it."""
    relative = os.path.relpath(path, root)
    if relative == os.curdir:
        return ROOT_GONE
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return None
    return relative.replace(os.sep, "/")


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


def _changed_paths(root: str, changes: Iterable[tuple[Change, str]],
                   rules: IgnoreRules) -> set[str]:
    found: set[str] = set()
    for _, path in changes:
        relative = relative_to_root(root, path)
        if relative and relative not in found and wanted(rules, relative, _kind(path)):
            found.add(relative)
    return found


async def watch_changes(root: Path, rules_for: Callable[[], IgnoreRules], *,
                        debounce_ms: int = 50) -> AsyncIterator[set[str]]:
    """Yield, per batch, the relative paths under ROOT that changed and are not ignored.

    A batch closes once DEBOUNCE_MS pass without a new change. RULES_FOR is called for
    every batch, so an edited .cairnignore applies at once. Yields `{ROOT_GONE}` and ends
    when ROOT is deleted, moved away or replaced (or missing at the start); logs a warning
    and ends when the watcher cannot run. Cancel it with a trio cancel scope (returns
    within about ROOT_CHECK_MS); if you stop iterating early, close it (`aclosing`) to
    release its inotify watches at once rather than when it is garbage-collected.
    """
    if not inotify_available():
        _warn_once("inotify is not available: local changes are found by periodic rescans")
        return
    absolute_root = os.path.join(os.getcwd(), root)   # as watchfiles reports paths
    identity = _identity(absolute_root)
    if identity is None:
        yield {ROOT_GONE}
        return
    # watch_filter=None: awatch's DefaultFilter would drop .git, node_modules, .venv, *.pyc
    # and more, which are files like any other here; IgnoreRules decides instead.
    batches = awatch(root, watch_filter=None, debounce=MAX_BATCH_MS, step=debounce_ms,
                     rust_timeout=ROOT_CHECK_MS, yield_on_timeout=True, force_polling=False,
                     ignore_permission_denied=False)
    try:
        async with contextlib.aclosing(batches):
            async for changes in batches:
                if _identity(absolute_root) != identity:
                    yield {ROOT_GONE}
                    return
                if not changes:
                    continue      # a ROOT_CHECK_MS timeout: only the check above
                paths = _changed_paths(absolute_root, changes, rules_for())
                if paths:
                    yield paths
    except (OSError, WatchfilesRustInternalError) as exc:
        if _identity(absolute_root) != identity:
            yield {ROOT_GONE}
            return
        _warn_once(f"cannot watch {root} for changes ({exc}): "
                   "local changes are found by periodic rescans")
