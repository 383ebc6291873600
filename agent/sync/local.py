"""The engine's hold on DIR between rounds: the last scan, which paths to look at again,
which files are still being written, and the conflicted copies (for `cairn status`).

A scan is a whole walk at first, on the periodic rescan, and whenever in doubt (the
watcher stopped, too many paths changed, .cairnignore changed, a known path vanished);
otherwise the last scan with the paths the watcher and the executor touched looked at
again, so a change costs what it touched, not the folder's size. Each scan says which
paths changed (`LocalScan.changed`): the next plan looks at those.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from agent.sync.ignore import IGNORE_FILE, IgnoreRules
from agent.sync.names import is_conflicted_copy
from agent.sync.scan import (
    LocalScan,
    changed_between,
    rescan_paths,
    scan_tree,
    walk_is_cheaper,
)
from agent.sync.shared_plan import SHARED_FOLDER
from agent.sync.state import SyncDb
from agent.sync.watch import ROOT_GONE

RESERVED = frozenset({SHARED_FOLDER})


class LocalTree:
    def __init__(self, root: Path, db: SyncDb, folder_id: int) -> None:
        self.root = root
        self.db = db
        self.folder_id = folder_id
        self.last: LocalScan | None = None
        self.dirty: set[str] | None = None     # None: walk everything next time
        self.unsettled: set[str] = set()       # files still being written
        self.conflicts: set[str] = set()       # conflicted copies
        self.inodes: dict[int, str] = {}       # where each inode was (a move's old path)

    def mark(self, paths: set[str], everything: bool = False) -> None:
        """Paths to look at again in the next scan; a whole walk when that is simpler."""
        if self.dirty is None:
            return
        known = 0 if self.last is None else len(self.last.entries)
        if everything or ROOT_GONE in paths or IGNORE_FILE in paths \
                or walk_is_cheaper(len(self.dirty) + len(paths), known):
            self.dirty = None
        else:
            self.dirty |= paths

    def scan(self, ignore: IgnoreRules) -> LocalScan:
        """Raises LocalFileError if DIR cannot be read (the next scan walks it all)."""
        seen: set[str] = set()           # changed in an update that a walk then replaced
        try:
            if self.dirty is None or self.last is None:
                scan = self._walk(ignore)
            else:
                scan = rescan_paths(self.root, ignore, self.last.entries, self.dirty,
                                    partial(self.db.cached_content, self.folder_id),
                                    time.time_ns(), reserved=RESERVED, inodes=self.inodes)
                if scan.vanished:
                    seen = scan.changed
                    scan = self._walk(ignore)
        except BaseException:
            self.dirty = None
            raise
        last, self.last = self.last, scan
        if scan.complete:
            scan.changed = seen | changed_between({} if last is None else last.entries,
                                                  scan.entries)
            looked: Iterable[str] = scan.entries
            self.unsettled, self.conflicts, self.inodes = set(), set(), {}
        else:
            looked = self.unsettled | scan.changed
        for path in looked:
            entry = scan.entries.get(path)
            if entry is not None:
                self.inodes[entry.stat.inode] = path
            _put(self.unsettled, path, entry is not None and not entry.stable)
            _put(self.conflicts, path, entry is not None and is_conflicted_copy(path))
        self.dirty = set(self.unsettled)
        return scan

    def _walk(self, ignore: IgnoreRules) -> LocalScan:
        scan = scan_tree(self.root, ignore, self.db.cached_contents(self.folder_id),
                         time.time_ns(), reserved=RESERVED)
        scan.complete = True
        return scan


def _put(paths: set[str], path: str, member: bool) -> None:
    if member:
        paths.add(path)
    else:
        paths.discard(path)
