"""The local tree: a walk of DIR (stat only), and content ids of files on demand.

Symbolic links and special files (sockets, fifos, devices) are skipped and never followed,
so nothing outside DIR is read or written through them; ignored paths (.cairnignore and the
built-in temporary-file patterns) are skipped with everything under them.

A file is *stable* once its ctime is STABLE_S old: one still being written (or just
copied in with an old mtime) waits, and the engine looks again when the window has passed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.crypto.blocks import BLOCK_SIZE, plain_hash_of
from agent.errors import LocalFileError
from agent.sync.ignore import IgnoreRules
from agent.sync.model import LocalEntry, Stat, content_id

log = logging.getLogger(__name__)

STABLE_S = 0.2


@dataclass
class LocalScan:
    entries: dict[str, LocalEntry] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)     # symlinks and special files
    unreadable: list[str] = field(default_factory=list)
    settles_in_s: float | None = None     # when the first unstable file becomes stable


def stat_of(info: os.stat_result) -> Stat:
    return Stat(info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode), info.st_ino)


def lstat_or_none(path: Path) -> Stat | None:
    """What is at PATH now (a link is not followed), or None."""
    try:
        return stat_of(os.lstat(path))
    except FileNotFoundError:
        return None


def is_dir(path: Path) -> bool:
    return os.path.isdir(path)


def scan_tree(root: Path, rules: IgnoreRules, cached: Mapping[str, tuple[Stat, str]],
              now_ns: int, stable_s: float = STABLE_S,
              reserved: frozenset[str] = frozenset()) -> LocalScan:
    """Everything under ROOT worth syncing, except the top-level names in RESERVED.
    Raises LocalFileError if ROOT itself cannot be read (the caller pauses: a vanished or
    unmounted folder must not look empty)."""
    result = LocalScan()
    window_ns = int(stable_s * 1e9)
    pending = [""]
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
            path = f"{folder}/{item.name}" if folder else item.name
            try:
                info = item.stat(follow_symlinks=False)
            except OSError:
                continue   # gone between listing and stat: the next scan tells
            if stat.S_ISDIR(info.st_mode):
                if rules.ignores(path, True):
                    continue
                result.entries[path] = LocalEntry(path, "dir", stat_of(info))
                pending.append(path)
            elif stat.S_ISREG(info.st_mode):
                if rules.ignores(path, False):
                    continue
                _add_file(result, path, stat_of(info), info.st_ctime_ns, cached, now_ns,
                          window_ns)
            elif not rules.ignores(path, False):
                result.skipped.append(path)
    return result


def _add_file(result: LocalScan, path: str, file_stat: Stat, ctime_ns: int,
              cached: Mapping[str, tuple[Stat, str]], now_ns: int, window_ns: int) -> None:
    known = cached.get(path)
    content = known[1] if known is not None and known[0] == file_stat else None
    age_ns = now_ns - max(ctime_ns, file_stat.mtime_ns)
    stable = age_ns >= window_ns
    if not stable:
        wait = (window_ns - age_ns) / 1e9
        result.settles_in_s = wait if result.settles_in_s is None \
            else min(result.settles_in_s, wait)
    result.entries[path] = LocalEntry(path, "file", file_stat, content, stable)


def hash_file(path: Path) -> tuple[Stat, str]:
    """The file's stat and content id (BLAKE3 of each 4 MiB block, as in the metadata).
    Raises LocalFileError; a file that changes while read gets the stat from before, so
    the next scan sees a difference and hashes again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
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
