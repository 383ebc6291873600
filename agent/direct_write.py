"""Writing downloaded blocks around the page cache (O_DIRECT), from per-thread buffers.

Why: a buffered write copies every byte into the page cache, and on the test machines that
copy costs ~1.5 CPU-s of kernel time per GiB (page allocation and reclaim included): a fifth
of what a device spent receiving a big file. A download fsyncs its file before renaming it
into place anyway, so the page cache only held the bytes on their way to the disk. Decrypting
straight into a page-aligned buffer of the worker thread (`decrypt_block_into`, buffers.py) and
writing that buffer with O_DIRECT costs neither the copy nor a fresh 4 MiB allocation.

Blocks sit at multiples of 4 MiB in a file, so their offsets are aligned; the tail of a
last, shorter block (less than ALIGN bytes) goes through the ordinary descriptor. A
filesystem that refuses O_DIRECT (tmpfs, most FUSE filesystems: EINVAL at open) gets the
ordinary descriptor for everything, as does a write the device refuses to align.
"""

from __future__ import annotations

import errno
import os

ALIGN = 4096   # memory, offset and length alignment: safe for any device
DIRECT_FROM_BYTES = 256 * 1024   # smaller blocks are decrypted and written as before


def open_direct(path: str | os.PathLike[str]) -> int | None:
    """A second, O_DIRECT write descriptor on the existing file at PATH; None where the
    filesystem does not take O_DIRECT."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_block(fd: int, direct_fd: int | None, data: bytes | memoryview, offset: int) -> None:
    """Write DATA at OFFSET of the file open as FD: what can be, through DIRECT_FD (which
    needs DATA in an aligned buffer: buffers.py), the rest through FD."""
    view = memoryview(data)
    done = 0
    if direct_fd is not None and offset % ALIGN == 0:
        aligned = len(view) - len(view) % ALIGN
        try:
            while done < aligned and done % ALIGN == 0:
                done += os.pwrite(direct_fd, view[done:aligned], offset + done)
        except OSError as exc:   # an alignment this device does not take: buffered
            if exc.errno != errno.EINVAL:
                raise
    pwrite_all(fd, view[done:], offset + done)
