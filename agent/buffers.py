"""Per-thread, page-aligned block buffers, reused from one block to the next.

A transfer worker handles one 4 MiB block after another: read, hash, encrypt and send, or
fetch, verify, decrypt and write. Fresh `bytes` for each step cost a 4 MiB allocation that
glibc serves with a new mmap, faulted in and zeroed page by page, and freed a moment later
(~7% of a device's CPU receiving a big file). Each worker thread instead keeps one buffer per
use (`plain`, `cipher`) and fills it in place (`os.preadv`, AES-GCM's `*_into`). The
buffers are anonymous mmaps, so they are page-aligned, as O_DIRECT needs (direct_write.py).

Memory: at most one buffer per use per worker thread, each the size of the largest block it
held (rounded up to ROUND); a thread's buffers go when it ends.
"""

from __future__ import annotations

import mmap
import threading

ROUND = 1024 * 1024   # buffer sizes are rounded up to this, so they are reused

_local = threading.local()


def thread_buffer(size: int, use: str) -> memoryview:
    """A page-aligned buffer of at least SIZE bytes, this thread's own for USE. Valid until
    this thread asks for a bigger one for the same use."""
    buffers: dict[str, mmap.mmap] = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(use)
    if buffer is None or len(buffer) < size:
        buffer = mmap.mmap(-1, -(-size // ROUND) * ROUND)
        buffers[use] = buffer   # the old one goes once no view of it is left
    return memoryview(buffer)
