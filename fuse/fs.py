"""The FUSE file system (pyfuse3 on trio): kernel requests in, index queries, staged
writes and block reads out.

- Metadata requests (lookup, getattr, readdir) are answered from the index (index.py) and
  never wait on the network; the kernel may keep entries and attributes for
  ENTRY_TIMEOUT_S because remote changes are pushed to it by invalidation (mount.py).
- Reads of a clean file fetch only the blocks they touch (blocks.py); a sequential reader
  gets the next PREFETCH_BLOCKS fetched in the background. A file opened for writing is
  staged first (staging.py) and read and written there.
- Every change (create, write, truncate, rename, unlink, mkdir, rmdir, chmod, utimens) is
  a pending row at once; the uploader sends it later (uploader.py).
- Every handler runs under `_guarded`: an error we did not foresee is logged and answered
  EIO, and the mount goes on.
- Refused on purpose: hard links and special files (EPERM), extended attributes other
  than ours (ENOTSUP), RENAME_EXCHANGE (EINVAL).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from agent.blockcache import BlockCache
from agent.crypto.blocks import BLOCK_SIZE, BlockRef
from agent.crypto.nodes import MAX_LINK_BYTES, MAX_NAME_BYTES, check_link, new_node_key
from agent.errors import CacheFullError, CairnAgentError, UsageError
from agent.sync.names import is_conflicted_copy
from fuse.blocks import PREFETCH_BLOCKS, BlockSource
from fuse.index import DriveIndex, Entry, Pending
from fuse.staging import Staging
from protocol.ids import new_node_id

log = logging.getLogger("cairn.drive")

ENTRY_TIMEOUT_S = 300.0
ATTR_TIMEOUT_S = 300.0
STATE_XATTR = b"user.cairn.state"
PIN_XATTR = b"user.cairn.pin"        # written by `cairn pin`/`unpin` (b"1"/b"0")
FREE_XATTR = b"user.cairn.free"      # written by `cairn free`

P = ParamSpec("P")
Ctx = pyfuse3.RequestContext
R = TypeVar("R")


def _guarded(handler: Callable[P, Coroutine[Any, Any, R]]
             ) -> Callable[P, Coroutine[Any, Any, R]]:
    """FUSE errors pass; our errors and anything unforeseen become EIO, logged."""

    @functools.wraps(handler)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except CacheFullError as exc:
            log.warning("%s: %s", handler.__name__, exc.message)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except CairnAgentError as exc:
            log.warning("%s failed: %s", handler.__name__, exc.message)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            log.warning("%s failed: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return run


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def name_of(raw: bytes) -> str:
    name = os.fsdecode(raw)
    if len(raw) > MAX_NAME_BYTES:
        raise fail(errno.ENAMETOOLONG)
    if name in ("", ".", "..") or "/" in name:
        raise fail(errno.EINVAL)
    return name


@dataclass
class Handle:
    node_id: str
    writable: bool
    fd: int | None = None                 # the staged content, if staged
    version: int | None = None            # the remote version read (clean files)
    refs: tuple[BlockRef, ...] = ()
    next_offset: int = 0                  # where a sequential reader reads next
    fresh_change: bool = False            # this open made the pending change
    writes_at_open: int = 0


@dataclass
class Listing:
    node_id: str
    entries: list[tuple[str, Entry]] = field(default_factory=list)


class DriveFs(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = True

    def __init__(self, index: DriveIndex, root_id: str, blocks: BlockSource,
                 cache: BlockCache, staging: Staging, *, wake_uploads: Callable[[], None],
                 transfers: Callable[[], dict[str, Any]],
                 pins_changed: Callable[[], None]) -> None:
        super().__init__()
        self.index = index
        self.root_id = root_id
        self.blocks = blocks
        self.cache = cache
        self.staging = staging
        self.wake_uploads = wake_uploads
        self.transfers = transfers
        self.pins_changed = pins_changed
        self.uid, self.gid = os.getuid(), os.getgid()
        self._node_of: dict[int, str] = {pyfuse3.ROOT_INODE: root_id}
        self._ino_of: dict[str, int] = {root_id: pyfuse3.ROOT_INODE}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, Handle | Listing] = {}
        self._next_fh = 1
        self.writers: Counter[str] = Counter()      # open writable handles per node
        self.writes: Counter[str] = Counter()       # writes per node (uploads compare)
        self._mtimes: dict[str, int] = {}           # written, not yet recorded
        self.stale: set[str] = set()                # content changed remotely while open
        self.nursery: trio.Nursery | None = None    # for read-ahead
        self.on_init: Callable[[], None] | None = None

    def init(self) -> None:
        """The kernel's INIT is answered: what it set up may be tuned now."""
        if self.on_init is not None:
            self.on_init()

    # --- inodes ------------------------------------------------------------------------

    def ino(self, node_id: str) -> int:
        found = self._ino_of.get(node_id)
        if found is None:
            found = self._ino_of[node_id] = self._next_ino
            self._node_of[found] = node_id
            self._next_ino += 1
        return found

    def known_ino(self, node_id: str) -> int | None:
        return self._ino_of.get(node_id)

    def is_open(self, node_id: str) -> bool:
        return any(isinstance(h, Handle) and h.node_id == node_id
                   for h in self._handles.values())

    def node(self, ino: int) -> str:
        found = self._node_of.get(ino)
        if found is None:
            raise fail(errno.ENOENT)
        return found

    def entry(self, ino: int) -> Entry:
        found = self.index.entry(self.node(ino))
        if found is None:
            raise fail(errno.ENOENT)
        return found

    @staticmethod
    def writable(entry: Entry) -> Entry:
        """ENTRY, if it may be changed: what others shared is read-only (EROFS)."""
        if entry.readonly:
            raise fail(errno.EROFS)
        return entry

    def attrs(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(self.ino(entry.node_id))
        attr.entry_timeout = ENTRY_TIMEOUT_S
        attr.attr_timeout = ATTR_TIMEOUT_S
        size = self.staging.size(entry.node_id) if entry.staged else entry.size
        mask = 0o7555 if entry.readonly else 0o7777
        if entry.link is not None:
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            size = len(os.fsencode(entry.link))
        elif entry.is_dir:
            attr.st_mode = stat.S_IFDIR | ((stat.S_IMODE(entry.mode) or 0o755) & mask)
            attr.st_nlink = 2
            size = 0
        else:
            attr.st_mode = stat.S_IFREG | (stat.S_IMODE(entry.mode) & mask)
            attr.st_nlink = 1
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = size
        attr.st_blksize = 128 * 1024
        attr.st_blocks = (size + 511) // 512
        mtime = self._mtimes.get(entry.node_id, entry.mtime_ns)
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = mtime
        return attr

    # --- metadata ----------------------------------------------------------------------

    @_guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: Ctx
                     ) -> pyfuse3.EntryAttributes:
        found = self.index.lookup(self.node(parent_inode), os.fsdecode(name))
        if found is None:
            raise fail(errno.ENOENT)
        return self.attrs(found)

    @_guarded
    async def getattr(self, inode: int, ctx: Ctx) -> pyfuse3.EntryAttributes:
        return self.attrs(self.entry(inode))

    async def forget(self, inode_list: Any) -> None:
        return None       # inode numbers stay assigned for the mount's lifetime

    @_guarded
    async def opendir(self, inode: int, ctx: Ctx) -> pyfuse3.FileHandleT:
        entry = self.entry(inode)
        if not entry.is_dir:
            raise fail(errno.ENOTDIR)
        listing = Listing(entry.node_id, sorted(self.index.children(entry.node_id).items()))
        return self._new_handle(listing)

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._handles.get(fh)
        if not isinstance(listing, Listing):
            raise fail(errno.EBADF)
        for index in range(start_id, len(listing.entries)):
            name, entry = listing.entries[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs(entry),
                                         index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_guarded
    async def statfs(self, ctx: Ctx) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        block = 4096
        data.f_bsize = data.f_frsize = block
        data.f_blocks = self.cache.budget // block
        free = max(0, self.cache.budget - self.cache.pinned_bytes()
                   - self.cache.reserved_bytes)
        data.f_bfree = data.f_bavail = free // block
        data.f_files = data.f_ffree = data.f_favail = 1 << 30
        data.f_namemax = MAX_NAME_BYTES
        return data

    # --- reading -----------------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx: Ctx) -> pyfuse3.FileInfo:
        entry = self.entry(inode)
        if entry.is_dir:
            raise fail(errno.EISDIR)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            self.writable(entry)
        handle = Handle(entry.node_id, writable)
        node_id = entry.node_id
        if writable:
            self.writers[node_id] += 1
            try:
                handle.fresh_change = await self._stage(entry,
                                                        truncate=bool(flags & os.O_TRUNC))
            except BaseException:
                self._writer_gone(node_id)
                raise
            handle.writes_at_open = self.writes[node_id]
        if self.staging.has(node_id):
            handle.fd = self.staging.open(node_id)
        else:
            opened = self.index.remote_meta(node_id)
            if opened is None or entry.version is None:
                raise fail(errno.ENOENT)
            handle.version, handle.refs = entry.version, opened[1].blocks
        keep = node_id not in self.stale
        self.stale.discard(node_id)
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=keep)

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._file(fh)
        if handle.fd is not None:
            return os.pread(handle.fd, size, off)
        return await self._read_remote(handle, off, size)

    async def _read_remote(self, handle: Handle, off: int, size: int) -> bytes:
        refs = handle.refs
        total = sum(ref.plain_size for ref in refs)
        end = min(off + size, total)
        if off >= end:
            return b""
        sequential = off == handle.next_offset or off == 0
        handle.next_offset = end
        parts = []
        first, last = off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        for index in range(first, last + 1):
            plain = await self.blocks.plaintext(handle.node_id, handle.version or 0,
                                                refs[index])
            start = max(off - index * BLOCK_SIZE, 0)
            stop = min(end - index * BLOCK_SIZE, len(plain))
            parts.append(plain[start:stop])
        if sequential and self.nursery is not None:
            for ahead in range(last + 1, min(last + 1 + PREFETCH_BLOCKS, len(refs))):
                if self.blocks.is_wanted(refs[ahead]):
                    self.nursery.start_soon(self._prefetch, handle.node_id,
                                            handle.version or 0, refs[ahead])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _prefetch(self, node_id: str, version: int, ref: BlockRef) -> None:
        try:
            await self.blocks.plaintext(node_id, version, ref)
        except CairnAgentError as exc:
            log.debug("read-ahead of %s… failed: %s", ref.id_hex[:16], exc.message)

    # --- staging and writing -----------------------------------------------------------

    async def _stage(self, entry: Entry, *, truncate: bool) -> bool:
        """Make sure the file's content is staged (copied in from its blocks unless
        TRUNCATE) and a pending change records it; whether this call made the change."""
        node_id = entry.node_id
        if self.staging.has(node_id):
            if truncate:
                os.close(self.staging.open(node_id, truncate=True))
                self._record_content(node_id)
            return False
        if truncate or entry.size == 0:
            os.close(self.staging.open(node_id, truncate=True))
            if entry.size:               # emptied: a change even if nothing is written
                self._mtimes[node_id] = time.time_ns()
        else:
            await self._copy_in(entry)
        self._change(entry, staged=True, size=self.staging.size(node_id))
        return True

    async def _copy_in(self, entry: Entry) -> None:
        opened = self.index.remote_meta(entry.node_id)
        if opened is None or entry.version is None:
            raise fail(errno.ENOENT)
        temp = self.staging.temp_path(entry.node_id)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            offset = 0
            for ref in opened[1].blocks:
                plain = await self.blocks.plaintext(entry.node_id, entry.version, ref)
                os.pwrite(fd, plain, offset)
                offset += len(plain)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.staging.adopt(entry.node_id, temp)

    def _change(self, entry: Entry, **fields: Any) -> Pending:
        """A pending change for ENTRY (replacing its current one) with FIELDS changed."""
        current = self.index.pending(entry.node_id)
        if current is None:
            key = self.index.key_of(entry.node_id)
            if key is None:
                raise fail(errno.ENOENT)
            current = Pending(entry.node_id, entry.parent_id or self.root_id, entry.name,
                              entry.kind, entry.size, entry.mtime_ns, entry.mode,
                              entry.version, entry.staged, False, key, entry.created_at,
                              time.time(), 0, 0, "dirty", "", entry.link)
        change = self.index.put_pending(replace(current, **fields))
        self.wake_uploads()
        return change

    def _record_content(self, node_id: str) -> None:
        entry = self.index.entry(node_id)
        if entry is not None:
            self._change(entry, size=self.staging.size(node_id),
                         mtime_ns=self._mtimes.pop(node_id, time.time_ns()))

    @_guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._file(fh)
        if not handle.writable or handle.fd is None:
            raise fail(errno.EBADF)
        node_id = handle.node_id
        end = off + len(buf)
        if end > self.staging.size(node_id):
            self.staging.grow(node_id, end)
        written = os.pwrite(handle.fd, buf, off)
        self.writes[node_id] += 1
        self._mtimes[node_id] = time.time_ns()
        return written

    @_guarded
    async def flush(self, fh: int) -> None:
        return None

    @_guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._file(fh)
        if handle.fd is not None:
            os.fsync(handle.fd)
            if handle.writable:
                self._record_content(handle.node_id)

    @_guarded
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if not isinstance(handle, Handle):
            return
        if handle.fd is not None:
            os.close(handle.fd)
        if not handle.writable:
            return
        node_id = handle.node_id
        self._writer_gone(node_id)
        if self.writers[node_id]:
            return
        pending = self.index.pending(node_id)
        if pending is None or pending.deleted:
            self.staging.remove(node_id)            # removed while it was open
            return
        if handle.fresh_change and self.writes[node_id] == handle.writes_at_open \
                and pending.base_version is not None and pending.size == \
                self.staging.size(node_id) and node_id not in self._mtimes:
            self.index.drop_pending(node_id)        # opened for writing, nothing written
            self.staging.remove(node_id)
            return
        if node_id in self._mtimes or handle.fresh_change:
            self._record_content(node_id)

    def _writer_gone(self, node_id: str) -> None:
        self.writers[node_id] -= 1
        if self.writers[node_id] <= 0:
            del self.writers[node_id]

    def _file(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if not isinstance(handle, Handle):
            raise fail(errno.EBADF)
        return handle

    def _new_handle(self, handle: Handle | Listing) -> pyfuse3.FileHandleT:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileHandleT(fh)

    # --- creating, removing, renaming ----------------------------------------------------

    def _new(self, parent_inode: int, raw_name: bytes, kind: str, mode: int,
             link: str | None = None) -> Entry:
        parent = self.writable(self.entry(parent_inode))
        if not parent.is_dir:
            raise fail(errno.ENOTDIR)
        name = name_of(raw_name)
        if self.index.lookup(parent.node_id, name) is not None:
            raise fail(errno.EEXIST)
        now = time.time()
        node_id = new_node_id()
        self.index.put_pending(Pending(
            node_id, parent.node_id, name, "dir" if kind == "dir" else "file", 0,
            time.time_ns(), stat.S_IMODE(mode), None, kind == "file", False, new_node_key(),
            now, now, 0, 0, "dirty", "", link))
        self.wake_uploads()
        created = self.index.entry(node_id)
        assert created is not None
        return created

    @_guarded
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Ctx
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        entry = self._new(parent_inode, name, "file", mode)
        handle = Handle(entry.node_id, True)
        self.writers[entry.node_id] += 1
        handle.fd = self.staging.open(entry.node_id, truncate=True)
        handle.writes_at_open = self.writes[entry.node_id]
        return pyfuse3.FileInfo(fh=self._new_handle(handle)), self.attrs(entry)

    @_guarded
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Ctx
                    ) -> pyfuse3.EntryAttributes:
        return self.attrs(self._new(parent_inode, name, "dir", mode))

    @_guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: Ctx) -> None:
        entry = self._removable_child(parent_inode, name)
        if entry.is_dir:
            raise fail(errno.EISDIR)
        self._remove(entry)

    @_guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Ctx) -> None:
        entry = self._removable_child(parent_inode, name)
        if not entry.is_dir:
            raise fail(errno.ENOTDIR)
        if self.index.has_children(entry.node_id):
            raise fail(errno.ENOTEMPTY)
        self._remove(entry)

    def _child(self, parent_inode: int, raw_name: bytes) -> Entry:
        found = self.index.lookup(self.node(parent_inode), os.fsdecode(raw_name))
        if found is None:
            raise fail(errno.ENOENT)
        return found

    def _removable_child(self, parent_inode: int, raw_name: bytes) -> Entry:
        return self.writable(self._child(parent_inode, raw_name))

    def _remove(self, entry: Entry) -> None:
        pending = self.index.pending(entry.node_id)
        base = pending.base_version if pending is not None else entry.version
        if base is None:
            self.index.drop_pending(entry.node_id)   # never left this device
        else:
            self._change(entry, deleted=True, base_version=base, staged=False)
        if not self.writers[entry.node_id]:
            self.staging.remove(entry.node_id)
        self.wake_uploads()

    @_guarded
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Ctx) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise fail(errno.EINVAL)
        source = self._removable_child(parent_inode_old, name_old)
        new_parent = self.writable(self.entry(parent_inode_new))
        if not new_parent.is_dir:
            raise fail(errno.ENOTDIR)
        new_name = name_of(name_new)
        target = self.index.lookup(new_parent.node_id, new_name)
        if target is not None and target.node_id == source.node_id:
            return
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise fail(errno.EEXIST)
            self.writable(target)
            if target.is_dir:
                if not source.is_dir:
                    raise fail(errno.EISDIR)
                if self.index.has_children(target.node_id):
                    raise fail(errno.ENOTEMPTY)
            elif source.is_dir:
                raise fail(errno.ENOTDIR)
            elif source.staged and target.version is not None:
                self._save_over(source, target)
                return
            self._remove(target)
        self._change(source, parent_id=new_parent.node_id, name=new_name)

    def _save_over(self, source: Entry, target: Entry) -> None:
        """A staged file renamed over a file the appliance has (an editor's or rsync's
        save): TARGET's next version gets SOURCE's content, and SOURCE goes — the
        target keeps its node, history and shares, and nothing is lost."""
        self.staging.rename(source.node_id, target.node_id)
        self._change(target, staged=True, size=self.staging.size(target.node_id),
                     mtime_ns=self._mtimes.pop(source.node_id, source.mtime_ns),
                     mode=source.mode)
        if source.version is None:
            self.index.drop_pending(source.node_id)
        else:
            self._change(source, deleted=True, staged=False)
        # The kernel now has SOURCE's inode under the target's name: that inode is the
        # target's node from here on; open handles follow.
        ino = self.ino(source.node_id)
        self._node_of[ino] = target.node_id
        self._ino_of[target.node_id] = ino
        for handle in self._handles.values():
            if isinstance(handle, Handle) and handle.node_id == source.node_id:
                handle.node_id = target.node_id
        for counter in (self.writers, self.writes):
            if source.node_id in counter:
                counter[target.node_id] += counter.pop(source.node_id)

    # --- attributes ----------------------------------------------------------------------

    @_guarded
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Ctx
                      ) -> pyfuse3.EntryAttributes:
        entry = self.writable(self.entry(inode))
        changes: dict[str, Any] = {}
        if fields.update_size:
            if entry.is_dir:
                raise fail(errno.EISDIR)
            await self._truncate(entry, attr.st_size, fh)
            entry = self.entry(inode)
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            self._mtimes.pop(entry.node_id, None)
        if (fields.update_uid and attr.st_uid != self.uid) or \
                (fields.update_gid and attr.st_gid != self.gid):
            raise fail(errno.EPERM)          # one owner: the user who mounted
        if changes:
            self._change(entry, **changes)
            entry = self.entry(inode)
        return self.attrs(entry)

    async def _truncate(self, entry: Entry, size: int, fh: int | None) -> None:
        node_id = entry.node_id
        self.writers[node_id] += 1              # no upload may take the staged copy now
        try:
            await self._stage(entry, truncate=size == 0)
            self.staging.grow(node_id, size)
            fd = self.staging.open(node_id)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            self.writes[node_id] += 1
            self._mtimes[node_id] = time.time_ns()
            if self.writers[node_id] == 1:
                self._record_content(node_id)
        finally:
            self._writer_gone(node_id)

    @_guarded
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Ctx
                      ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(target)
        try:
            check_link(text)
        except UsageError:
            raise fail(errno.ENAMETOOLONG if len(target) > MAX_LINK_BYTES
                       else errno.EINVAL) from None
        return self.attrs(self._new(parent_inode, name, "link", 0o777, link=text))

    @_guarded
    async def readlink(self, inode: int, ctx: Ctx) -> bytes:
        entry = self.entry(inode)
        if entry.link is None:
            raise fail(errno.EINVAL)
        return os.fsencode(entry.link)

    # --- refused -------------------------------------------------------------------------

    @_guarded
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Ctx
                   ) -> pyfuse3.EntryAttributes:
        raise fail(errno.EPERM)        # hard links: one node has one place

    @_guarded
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Ctx
                    ) -> pyfuse3.EntryAttributes:
        raise fail(errno.EPERM)        # devices, fifos, sockets: not files to sync

    # --- extended attributes: the state, and the pin / free requests ---------------------

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: Ctx) -> bytes:
        if name != STATE_XATTR:
            raise fail(pyfuse3.ENOATTR)
        return self.state(self.entry(inode)).encode()

    @_guarded
    async def listxattr(self, inode: int, ctx: Ctx
                        ) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(STATE_XATTR)]

    @_guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Ctx) -> None:
        entry = self.entry(inode)
        if name == PIN_XATTR:
            with self.index.transaction():
                self.index.set_pinned(entry.node_id, value.strip() == b"1")
            self.pins_changed()
        elif name == FREE_XATTR:
            self.free(entry)
        else:
            raise fail(errno.ENOTSUP)

    @_guarded
    async def removexattr(self, inode: int, name: bytes, ctx: Ctx) -> None:
        raise fail(pyfuse3.ENOATTR)

    def state(self, entry: Entry) -> str:
        """cloud, cached, pinned, dirty, uploading or conflict (see the README)."""
        pending = self.index.pending(entry.node_id)
        if pending is not None:
            if entry.node_id in self.transfers():
                return "uploading"
            return "conflict" if pending.state == "conflict" else "dirty"
        if is_conflicted_copy(entry.name):
            return "conflict"
        pinned = self.pinned(entry.node_id)
        if entry.is_dir:
            return "pinned" if pinned else "cached"
        opened = self.index.remote_meta(entry.node_id)
        if opened is None or not self.cache.holds_all(ref.id_hex for ref in opened[1].blocks):
            return "cloud"                  # a pinned one: still being fetched
        return "pinned" if pinned else "cached"

    def pinned(self, node_id: str) -> bool:
        """Whether the node or a folder above it is pinned."""
        current: str | None = node_id
        for _ in range(256):
            if current is None:
                return False
            if self.index.pinned(current):
                return True
            entry = self.index.entry(current)
            current = None if entry is None else entry.parent_id
        return False

    def free(self, entry: Entry) -> int:
        """Drop the cached blocks of the clean files at or under ENTRY (pinned ones stay);
        the bytes freed."""
        freed = 0
        pending = [entry]
        while pending:
            current = pending.pop()
            if current.is_dir:
                pending.extend(self.index.children(current.node_id).values())
                continue
            if current.local:
                continue
            opened = self.index.remote_meta(current.node_id)
            if opened is not None:
                ids = [ref.id_hex for ref in opened[1].blocks]
                freed += self.cache.free(ids)
                self.blocks.forget(ids)
        return freed
