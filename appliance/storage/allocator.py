"""Keep glibc from handing block-sized buffers back to the kernel after every use.

Every put and get allocates a few MiB-sized buffers (the block, its shards, the reads) and
frees them a moment later. glibc serves allocations above its mmap threshold (128 KiB at
first, adapting up to 32 MiB) with fresh mmaps, and trims freed memory at the top of a heap
back to the kernel; with several worker threads the buffers land in different arenas and
the churn never settles. Each fresh 4 KiB page then costs a page fault and a clearing: on
the 2-core test machines about 3 µs, so a 4 MiB buffer costs ~3 ms, which made pyeclib's
encode run at ~0.5 GB/s instead of ~4 GB/s and halved degraded reads (docs/benchmarks.md).

`tune` raises the mmap threshold to 32 MiB (so block buffers come from the heap arenas) and
the trim threshold to 64 MiB (so freed buffers are reused instead of returned: a degraded
decode frees ~20 MiB at once, and with 16 MiB it still faulted and ran 4x slower). Memory
kept this way is bounded by the buffers in use at once (threads x block size) plus 64 MiB per
arena, not by how much data passes through. A no-op outside glibc or when the environment
already sets these (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_).

It also caps glibc at ARENA_MAX arenas (M_ARENA_MAX; the environment's MALLOC_ARENA_MAX
wins). glibc gives threads that meet contention arenas of their own, up to 8 per core, and
each keeps its own freed block buffers: with the store's 32 shard writers and 16 store
threads the appliance's peak RSS was 300-400 MiB for 8 transfers in flight, and with two
arenas ~80 MiB less, at the same speed (docs/benchmarks.md, "API"). Most allocations happen
under the GIL anyway, so threads rarely contend for an arena. Call `tune` before threads
start (`cairnd serve` does, first thing): arenas that exist already stay.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1   # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 32 * 1024 * 1024   # glibc's ceiling for this setting on 64-bit
TRIM_THRESHOLD = 64 * 1024 * 1024

_accepted: bool | None = None  # None until tune() first runs
_lock = threading.Lock()


def tune() -> bool:
    """Apply the settings once per process; True if glibc accepted them."""
    global _accepted
    with _lock:
        if _accepted is None:
            _accepted = _apply()
        return _accepted


def _apply() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if "MALLOC_ARENA_MAX" not in os.environ and not mallopt(M_ARENA_MAX, ARENA_MAX):
        log.info("mallopt refused M_ARENA_MAX; continuing without it")
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the operator chose; leave it
    accepted = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not accepted:
        log.info("mallopt refused the block-buffer settings; continuing without them")
    return accepted
