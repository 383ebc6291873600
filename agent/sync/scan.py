"""The local tree: a walk of DIR (stat only), and content ids of files on demand.

A symbolic link is an entry of its own, a "file" whose content id is made from its target
(read with the walk: one readlink): it is never followed, so nothing outside DIR is read
or written through it, and its stat is the link's own (lstat). Special files (sockets,
fifos, devices) are skipped. Ignored paths (.cairnignore and the built-in temporary-file
patterns) are skipped with everything under them.

A file is *stable* once its ctime is STABLE_S old: one still being written (or just
copied in with an old mtime) waits, and the engine looks again when the window has passed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.crypto.blocks import BLOCK_SIZE, plain_hash_of
from agent.errors import FileChangedError, LocalFileError
from agent.sync.ignore import IgnoreRules
from agent.sync.model import Kind, LocalEntry, Stat, content_id, link_content_id, parent_of

log = logging.getLogger(__name__)

STABLE_S = 0.2


@dataclass
class LocalScan:
    entries: dict[str, LocalEntry] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)     # special files
    unreadable: list[str] = field(default_factory=list)
    settles_in_s: float | None = None     # when the first unstable file becomes stable
    complete: bool = False                # a whole walk (not an update of the last one)
    vanished: bool = False                # an update found a known path gone: it may have
                                          # moved anywhere, so walk everything
    changed: set[str] = field(default_factory=set)   # paths whose entry differs from the
                                                      # last scan's (an update's)


def stat_of(info: os.stat_result) -> Stat:
    return Stat(info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode), info.st_ino)


def lstat_or_none(path: Path) -> Stat | None:
    """What is at PATH now (a link is not followed), or None."""
    try:
        return stat_of(os.lstat(path))
    except FileNotFoundError:
        return None


LINK_READS = 3     # tries at reading a link that is being replaced meanwhile


def read_link(path: Path) -> tuple[os.stat_result, str, bool]:
    """The symbolic link at PATH: its own stat, its target, and whether the two were read
    together (a link is never changed in place, only replaced, so a stat equal before and
    after the readlink belongs to that target; False: it was replaced on every try).
    Raises LocalFileError if it cannot be read, FileChangedError if it is no longer a
    link."""
    for attempt in range(LINK_READS):
        try:
            before = os.lstat(path)
            target = os.readlink(path)
            after = os.lstat(path)
        except OSError as exc:
            if exc.errno == errno.EINVAL:      # not a link (any more)
                raise FileChangedError(f"{path} is no longer a symbolic link") from None
            raise LocalFileError(f"cannot read the link {path}: {exc.strerror}") from None
        if not stat.S_ISLNK(after.st_mode):
            raise FileChangedError(f"{path} is no longer a symbolic link")
        together = stat_of(before) == stat_of(after)
        if together or attempt == LINK_READS - 1:
            return after, target, together
    raise AssertionError("unreachable")


def folder_not_local(root: Path, path: str) -> str | None:
    """The first folder above PATH (under ROOT, which is not looked at) that is not a real
    folder here — a symbolic link, which writing through would write outside DIR, or a
    file — or None. A missing folder is fine (it will be made, below what was checked)."""
    folder = ""
    for name in path.split("/")[:-1]:
        folder = f"{folder}/{name}" if folder else name
        try:
            info = os.lstat(root / folder)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(info.st_mode):
            return folder
    return None


def is_link(path: Path) -> bool:
    """Whether PATH is a symbolic link now (not followed; False if nothing is there)."""
    return os.path.islink(path)


def is_dir(path: Path) -> bool:
    return os.path.isdir(path)


def kind_at(path: Path) -> Kind | None:
    """What is at PATH now, a link not followed: a folder, anything else ("file"), or
    None."""
    try:
        return "dir" if stat.S_ISDIR(os.lstat(path).st_mode) else "file"
    except FileNotFoundError:
        return None


CachedContent = Callable[[str], "tuple[Stat, str] | None"]
MAX_DIRTY = 256      # more changed paths than this (and than a quarter of the folder's
DIRTY_SHARE = 4      # entries, 1/DIRTY_SHARE): a whole walk is cheaper


def walk_is_cheaper(dirty: int, entries: int) -> bool:
    """Whether looking at DIRTY paths again costs more than walking ENTRIES."""
    return dirty > max(MAX_DIRTY, entries // DIRTY_SHARE)


def scan_tree(root: Path, rules: IgnoreRules, cached: Mapping[str, tuple[Stat, str]],
              now_ns: int, stable_s: float = STABLE_S,
              reserved: frozenset[str] = frozenset()) -> LocalScan:
    """Everything under ROOT worth syncing, except the top-level names in RESERVED.
    Raises LocalFileError if ROOT itself cannot be read (the caller pauses: a vanished or
    unmounted folder must not look empty)."""
    result = LocalScan()
    _walk(root, "", rules, cached.get, now_ns, int(stable_s * 1e9), reserved, result)
    return result


def rescan_paths(root: Path, rules: IgnoreRules, previous: dict[str, LocalEntry],
                 dirty: set[str], cached: CachedContent, now_ns: int,
                 stable_s: float = STABLE_S, reserved: frozenset[str] = frozenset(),
                 inodes: Mapping[int, str] | None = None) -> LocalScan:
    """PREVIOUS with the DIRTY paths (what the watcher and the executor touched) looked at
    again: each path, and for a folder everything under it. A path whose folder is not
    known yet is taken from the nearest known folder up. The caller keeps files that are
    still settling among the dirty paths, and walks everything now and then anyway (the
    watcher's events are hints: a queue overflow loses them). When a known path is gone
    the result says `vanished`: it may have been renamed to a path whose event is still
    to come, and only a whole walk tells a move from a delete.

    PREVIOUS is updated in place and becomes the result's entries (copying it would cost
    what the folder holds); `changed` says which paths differ from before. INODES, if
    given, is where each inode was (kept by the caller; else built from PREVIOUS)."""
    result = LocalScan(entries=previous)
    window_ns = int(stable_s * 1e9)
    done: set[str] = set()
    before: dict[str, LocalEntry] = {}       # what the looked-at paths held

    def looked_at(path: str) -> bool:
        """Whether PATH or a folder above it was looked at already."""
        while path:
            if path in done:
                return True
            path = parent_of(path)
        return False

    def look(path: str) -> None:
        while path and parent_of(path) and parent_of(path) not in result.entries:
            path = parent_of(path)
        if not path or looked_at(path):
            return
        done.add(path)
        for gone, entry in _forget(result.entries, path).items():
            before.setdefault(gone, entry)
            result.changed.add(gone)
        if path.partition("/")[0] in reserved:
            return
        try:
            info = os.lstat(root / path)
        except OSError:
            result.vanished = result.vanished or path in before
            return
        if stat.S_ISDIR(info.st_mode):
            if not rules.ignores(path, True):
                result.entries[path] = LocalEntry(path, "dir", stat_of(info))
                result.changed.add(path)
                _walk(root, path, rules, cached, now_ns, window_ns, reserved, result)
        elif stat.S_ISREG(info.st_mode) and not rules.ignores(path, False):
            _add_file(result, path, stat_of(info), info.st_ctime_ns, cached, now_ns,
                      window_ns)
        elif stat.S_ISLNK(info.st_mode) and not rules.ignores(path, False):
            _add_link(result, root, path, window_ns)

    for path in sorted(dirty, key=lambda p: p.count("/")):
        look(path)
    # A rename's two events may come in different batches: an inode now seen at a new
    # path is looked for at its old one too, so a move never looks like a copy.
    # (Only a path new or holding another inode can be; the index is built only then.)
    new = {p for p in result.changed if p in result.entries and (
        p not in before or before[p].stat.inode != result.entries[p].stat.inode)}
    by_inode = inodes if inodes is not None else {
        e.stat.inode: p for p, e in result.entries.items() if p not in new} if new else {}
    for path in sorted(new):
        elsewhere = by_inode.get(result.entries[path].stat.inode)
        if elsewhere is not None and elsewhere != path and elsewhere in result.entries:
            look(elsewhere)
    result.changed = {p for p in result.changed if before.get(p) != result.entries.get(p)}
    return result


def changed_between(before: Mapping[str, LocalEntry], after: Mapping[str, LocalEntry]
                    ) -> set[str]:
    """The paths whose entry differs (after a whole walk: a pass over both)."""
    return ({p for p, e in after.items() if before.get(p) != e}
            | {p for p in before if p not in after})


def _forget(entries: dict[str, LocalEntry], path: str) -> dict[str, LocalEntry]:
    """Remove PATH (and for a folder what is under it); what was removed."""
    entry = entries.pop(path, None)
    if entry is None:
        return {}
    gone = {path: entry}
    if entry.kind == "dir":
        prefix = path + "/"
        for other in [p for p in entries if p.startswith(prefix)]:
            gone[other] = entries.pop(other)
    return gone


def _walk(root: Path, top: str, rules: IgnoreRules, cached: CachedContent, now_ns: int,
          window_ns: int, reserved: frozenset[str], result: LocalScan) -> None:
    pending = [top]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(root / folder if folder else root) as listing:
                items = list(listing)
        except OSError as exc:
            if not folder:
                raise LocalFileError(f"cannot read {root}: {exc.strerror}") from None
            result.unreadable.append(folder)
            continue
        for item in items:
            if not folder and item.name in reserved:
                continue
            path = sys.intern(f"{folder}/{item.name}" if folder else item.name)
            try:
                info = item.stat(follow_symlinks=False)
            except OSError:
                continue   # gone between listing and stat: the next scan tells
            if stat.S_ISDIR(info.st_mode):
                if rules.ignores(path, True):
                    continue
                result.entries[path] = LocalEntry(path, "dir", stat_of(info))
                result.changed.add(path)
                pending.append(path)
            elif stat.S_ISREG(info.st_mode):
                if rules.ignores(path, False):
                    continue
                _add_file(result, path, stat_of(info), info.st_ctime_ns, cached, now_ns,
                          window_ns)
            elif rules.ignores(path, False):
                continue
            elif stat.S_ISLNK(info.st_mode):
                _add_link(result, root, path, window_ns)
            else:
                result.skipped.append(path)


def _add_file(result: LocalScan, path: str, file_stat: Stat, ctime_ns: int,
              cached: CachedContent, now_ns: int, window_ns: int) -> None:
    known = cached(path)
    content = known[1] if known is not None and known[0] == file_stat else None
    age_ns = now_ns - max(ctime_ns, file_stat.mtime_ns)
    stable = age_ns >= window_ns
    if not stable:
        wait = (window_ns - age_ns) / 1e9
        result.settles_in_s = wait if result.settles_in_s is None \
            else min(result.settles_in_s, wait)
    result.entries[path] = LocalEntry(path, "file", file_stat, content, stable)
    result.changed.add(path)


def _add_link(result: LocalScan, root: Path, path: str, window_ns: int) -> None:
    """A link is made whole at once (no settling), unless it was replaced while read."""
    try:
        info, target, stable = read_link(root / path)
    except LocalFileError:
        return                    # gone or replaced meanwhile: the next scan tells
    if not stable:
        wait = window_ns / 1e9
        result.settles_in_s = wait if result.settles_in_s is None \
            else min(result.settles_in_s, wait)
    result.entries[path] = LocalEntry(path, "file", stat_of(info), link_content_id(target),
                                      stable)
    result.changed.add(path)


def hash_file(path: Path) -> tuple[Stat, str]:
    """The file's stat and content id (BLAKE3 of each 4 MiB block, as in the metadata; a
    symbolic link's from its target). Raises LocalFileError; a file that changes while
    read gets the stat from before, so the next scan sees a difference and hashes again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:      # a link now: never followed
            info, target, _ = read_link(path)
            return stat_of(info), link_content_id(target)
        raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        before = stat_of(os.fstat(fd))
        hashes = []
        offset = 0
        while True:
            data = os.pread(fd, BLOCK_SIZE, offset)
            if not data:
                break
            hashes.append(plain_hash_of(data))
            offset += len(data)
        return before, content_id(hashes)
    except OSError as exc:
        raise LocalFileError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
