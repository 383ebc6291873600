"""The staging area: the content of files written through the mount and not yet uploaded.

`HOME/drive/staging/<node id>`, 0600, one whole file each. A file's first writable open
copies its content here (or starts empty when opened with O_TRUNC or new); writes go here
by `pwrite`; `fsync` on the mount is `fsync` here; the upload reads from here and the file
is removed once the appliance has the version and the pending change is gone. A process
killed at any point leaves the file and its pending row; the next mount uploads it.

The bytes staged are held out of the block cache's budget (`BlockCache.reserve`): when
they and the pinned blocks fill it, a write that would grow a file fails with ENOSPC
before the device fills up.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.blockcache import BlockCache


class Staging:
    def __init__(self, folder: Path, cache: BlockCache) -> None:
        self.folder = folder
        self.cache = cache
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sizes: dict[str, int] = {}
        for entry in folder.iterdir():
            if entry.name.endswith(".part"):
                entry.unlink(missing_ok=True)     # a copy-in that a crash cut short
            else:
                self._sizes[entry.name] = entry.stat().st_size
        self._total = sum(self._sizes.values())

    def path(self, node_id: str) -> Path:
        return self.folder / node_id

    def has(self, node_id: str) -> bool:
        return node_id in self._sizes

    @property
    def staged_bytes(self) -> int:
        return self._total

    def _set(self, node_id: str, size: int) -> None:
        self._total += size - self._sizes.get(node_id, 0)
        self._sizes[node_id] = size

    def size(self, node_id: str) -> int:
        return self._sizes.get(node_id, 0)

    def known(self) -> set[str]:
        return set(self._sizes)

    def open(self, node_id: str, *, truncate: bool = False) -> int:
        """A read-write descriptor on the node's staged content (created empty if new)."""
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        fd = os.open(self.path(node_id), flags, 0o600)
        if truncate or node_id not in self._sizes:
            before = self._total
            self._set(node_id, os.fstat(fd).st_size)
            if self._total != before:
                self.cache.reserve(self._total)
        return fd

    def read_small(self, node_id: str, limit: int) -> bytes:
        """The whole staged content of a file of at most LIMIT bytes (OSError if it is
        bigger now)."""
        fd = os.open(self.path(node_id), os.O_RDONLY)
        try:
            data = os.pread(fd, limit + 1, 0)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise OSError(f"{node_id} grew past {limit} bytes")
        return data

    def temp_path(self, node_id: str) -> Path:
        return self.folder / f"{node_id}.part"

    def adopt(self, node_id: str, temp: Path) -> None:
        """TEMP (filled by a copy-in) becomes the node's staged content."""
        size = temp.stat().st_size
        self.grow(node_id, size)
        os.replace(temp, self.path(node_id))

    def grow(self, node_id: str, size: int) -> None:
        """The node's staged content is SIZE bytes now. Raises CacheFullError (nothing
        changed) if that does not fit in the budget."""
        old = self._sizes.get(node_id, 0)
        if size > old:
            self.cache.reserve(self._total - old + size)
        self._set(node_id, size)
        if size < old:
            self.cache.reserve(self._total)

    def rename(self, source: str, target: str) -> None:
        """The content staged for SOURCE becomes TARGET's (a save by rename)."""
        os.replace(self.path(source), self.path(target))
        moved = self._sizes.pop(source, 0)
        self._total -= moved
        self._set(target, moved)

    def remove(self, node_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(node_id).unlink()
        size = self._sizes.pop(node_id, None)
        if size is not None:
            self._total -= size
            if size:
                self.cache.reserve(self._total)
