"""Group commit: one `syncfs` makes many writers' files durable at once.

A durable small file costs an fdatasync and a folder fsync, each a journal commit and a
cache flush; this machine manages ~3,000 such files a second, and a small block is three
replica files. Writers of small shards therefore skip their own fsyncs: they write the
temp file, rename it into place, and then call `wait_durable()`, which returns once a
`syncfs(2)` that *started after the call* has finished. syncfs writes back every dirty
page and inode of the filesystem and commits its journal (ext4, XFS and btrfs all force
their log), so both the data and the rename are on stable storage when it returns. One
syncfs covers every writer that was waiting, so the cost per file falls as concurrency
rises (see docs/architecture.md for the figures).

Crash safety is unchanged from the caller's point of view: nothing is acknowledged before
wait_durable returns; a power cut before then can leave a torn file under its final name,
which fails its shard checksum (shard_format.py) and is repaired or reported by scrub.

One GroupCommit per filesystem (st_dev), shared by every disk folder on it and by every
store in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


def syncfs(path: Path) -> None:
    """syncfs(2) on the filesystem holding `path`; OSError on failure (e.g. EIO)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


class GroupCommit:
    """Makes files on one filesystem durable, one syncfs for all concurrent waiters."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._started = 0      # generation of the newest syncfs begun
        self._finished = 0     # generation of the newest syncfs completed successfully
        self._running = False
        self.syncs = 0         # how many syncfs calls ran (for tests and benchmarks)

    def wait_durable(self) -> None:
        """Return once everything written before this call is on stable storage."""
        with self._cond:
            # A syncfs already running may have started before our writes: we need the
            # generation after the newest one begun.
            target = self._started + 1
            while self._finished < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                generation = self._started
                self._cond.release()
                try:
                    syncfs(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self.syncs += 1
                self._finished = generation


_registry: dict[int, GroupCommit] = {}
_registry_lock = threading.Lock()


def for_path(path: Path) -> GroupCommit:
    """The GroupCommit of the filesystem holding `path` (one per st_dev, process-wide)."""
    device = os.stat(path).st_dev
    with _registry_lock:
        commit = _registry.get(device)
        if commit is None:
            commit = _registry[device] = GroupCommit(path)
        return commit
