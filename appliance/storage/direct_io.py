"""Writing new shard files around the page cache (O_DIRECT).

Why: a buffered write copies every byte into the page cache, and on the test machines that
copy (page allocation, LRU and reclaim included) costs the writer ~1.5 CPU-s of kernel time
per GiB: 1.5 GiB of 1 MiB files, each fdatasync'd, took 2.33 s of system time buffered and
0.23 s with O_DIRECT, at the same speed (the disk's). A big put writes 1.5 x its block in
shards (4+2), so that copy was the largest single cost of an upload on the appliance
(docs/benchmarks.md, "Issue 12, second session"). Every shard is fdatasync'd before it
counts anyway, so the page cache only held data on its way to the disk.

How: the parts are copied into a page-aligned buffer from a small pool (a user-space copy
costs ~0.1 CPU-s per GiB), the aligned prefix goes out with O_DIRECT, then O_DIRECT is
cleared (F_SETFL) and the tail of less than ALIGN bytes is written through the page cache
(as is everything left if the device refuses the alignment).
A filesystem that refuses O_DIRECT at open (tmpfs, some FUSE filesystems: EINVAL) gets a
plain descriptor instead, and the caller remembers not to ask again.

The caller still fdatasyncs: O_DIRECT bypasses the page cache, not the device's cache, and
the file's size and extents are metadata.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

ALIGN = 4096                  # memory, offset and length alignment: safe for any device
POOL_KEEP = 8                 # free buffers kept for reuse (each about one shard)
_ROUND = 64 * 1024            # buffer sizes are rounded up to this, so they are reusable


def open_new_file(path: str | os.PathLike[str], direct: bool) -> tuple[int, bool]:
    """A write descriptor on a new file at PATH (which must not exist), with O_DIRECT if
    DIRECT and the filesystem takes it; (fd, whether it is direct)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # Linux refuses O_DIRECT after creating the file: open what is now there.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    return os.open(path, flags, 0o644), False


class _BufferPool:
    """Page-aligned buffers (anonymous mmaps), reused so their pages stay faulted in."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextmanager
    def buffer(self, size: int) -> Iterator[mmap.mmap]:
        with self._lock:
            fitting = [b for b in self._free if len(b) >= size]
            chosen = min(fitting, key=len) if fitting else None
            if chosen is not None:
                self._free.remove(chosen)
        if chosen is None:
            chosen = mmap.mmap(-1, -(-size // _ROUND) * _ROUND)
        try:
            yield chosen
        finally:
            with self._lock:
                self._free.append(chosen)
                if len(self._free) > self._keep:
                    self._free.sort(key=len)
                    self._free.pop(0).close()


_pool = _BufferPool(POOL_KEEP)


def write_direct(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write PARTS, one after the other, from the start of the O_DIRECT descriptor FD
    (from `open_new_file`): the aligned prefix directly, the rest through the page cache."""
    total = sum(len(part) for part in parts)
    with _pool.buffer(total) as buffer:
        view = memoryview(buffer)
        try:
            position = 0
            for part in parts:
                view[position:position + len(part)] = part
                position += len(part)
            aligned = total - total % ALIGN
            done = 0
            try:
                while done < aligned and done % ALIGN == 0:
                    done += os.write(fd, view[done:aligned])
            except OSError as exc:  # an alignment this device does not take: buffered
                if exc.errno != errno.EINVAL:
                    raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            while done < total:
                done += os.write(fd, view[done:total])
        finally:
            view.release()


def read_direct(path: str | os.PathLike[str]) -> bytes | None:
    """The whole file at PATH read with O_DIRECT (through a pooled aligned buffer: the
    page cache would cost more than the one copy out of it); None if the filesystem does
    not take O_DIRECT. Raises OSError as open and read do (FileNotFoundError included)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    try:
        size = os.fstat(fd).st_size
        with _pool.buffer(size + ALIGN) as buffer:
            view = memoryview(buffer)
            try:
                done = 0
                while done % ALIGN == 0:   # a short read ends at the end of the file
                    count = os.readv(fd, [view[done:len(view)]])
                    if count == 0:
                        break
                    done += count
                if done % ALIGN:   # a short read before the end: buffered for the rest
                    fcntl.fcntl(fd, fcntl.F_SETFL,
                                fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    while count := os.readv(fd, [view[done:len(view)]]):
                        done += count
                return bytes(view[:done])
            finally:
                view.release()
    finally:
        os.close(fd)
