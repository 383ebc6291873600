"""Remote changes into the kernel's caches: the mirror reports every row it writes or
drops; this task turns them into FUSE invalidations, off the request path (pyfuse3's
`invalidate_inode` can block, so it runs in a thread).

- a node gone, renamed or moved: its old directory entry is invalidated (the kernel
  forgets the name; a new name is looked up afresh — we never cache negative lookups);
- a file's content changed: its attributes and cached pages, or only its attributes while
  it is open (a reader does not see pages change under it; its next open starts with a
  clean page cache);
- anything else (mode, time): its attributes.
"""

from __future__ import annotations

import logging
import os

import pyfuse3
import trio

from agent.sync.state import RemoteRow
from fuse.fs import DriveFs

log = logging.getLogger("cairn.drive")


class Invalidator:
    def __init__(self, fs: DriveFs) -> None:
        self.fs = fs
        self._changes: list[tuple[RemoteRow | None, RemoteRow | None]] = []
        self._wake = trio.Event()
        self.sent = 0

    def note(self, old: RemoteRow | None, new: RemoteRow | None) -> None:
        """Mirror.on_change: remember, and wake the task."""
        self._changes.append((old, new))
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            changes, self._changes = self._changes, []
            for old, new in changes:
                try:
                    await self._invalidate(old, new)
                except OSError as exc:      # the kernel forgot it already: nothing to do
                    log.debug("invalidation skipped: %s", exc)

    async def _invalidate(self, old: RemoteRow | None, new: RemoteRow | None) -> None:
        fs = self.fs
        if old is not None and (new is None or old.parent_id != new.parent_id
                                or old.name != new.name):
            parent = None if old.parent_id is None else fs.known_ino(old.parent_id)
            if parent is not None:
                pyfuse3.invalidate_entry_async(parent, os.fsencode(old.name),
                                               ignore_enoent=True)
                self.sent += 1
        if new is None:
            return
        ino = fs.known_ino(new.node_id)
        if ino is None:
            return
        content = old is None or old.content != new.content or old.size != new.size
        attr_only = not content or fs.is_open(new.node_id)
        if content and attr_only:
            fs.stale.add(new.node_id)
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, attr_only)
        self.sent += 1
