"""Write-back: the pending changes made through the mount go to the appliance.

A change is sent once its file has no writer left and WRITE_BACK_S passed since its last
change (an editor's save, a build's output: a burst of writes becomes one version), in the
order the changes were made, a folder before what was made in it. Each is the request the
command line would make for it — create, a new version (content, or just name, place,
mode and time), delete — naming the version it was based on, so the appliance refuses it
if another device changed the node meanwhile; then:

- a newer version of a file we changed: that version is kept as a conflicted copy (the
  sync engine's naming; a new node with the same blocks, nothing re-sent), and ours
  becomes the node's next version;
- a file deleted elsewhere that we changed: restored from the trash, then updated (an edit
  beats a delete);
- a delete of a node changed elsewhere: not done (the edit wins) and the node comes back;
- anything else the appliance refuses: kept, marked `conflict` with the reason (in
  `cairn status`), tried again later.

Content is read from the staging area; the blocks go into the block cache as they are
uploaded (the file stays readable offline) and the staged copy is dropped once the
appliance has the version and no newer change came in meanwhile (compared by generation:
a write during the upload keeps the row for the next round). An unreachable appliance
stops the round; it is tried again with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from agent.api import create_op, item_error, update_op
from agent.blockcache import BlockCache
from agent.crypto.blocks import BlockRef, encrypt_block
from agent.crypto.nodes import NodeMeta, new_node_key
from agent.errors import (
    CacheFullError,
    CairnAgentError,
    FileChangedError,
    LocalFileError,
    RemoteConflictError,
    RemoteNotFoundError,
    TransportError,
)
from agent.progress import Progress
from agent.remote import RemoteNode, RemoteTree, node_create, node_update
from agent.sync.batch import SMALL_FILE, own_span
from agent.sync.mirror import Mirror
from agent.sync.names import unique_copy_name
from agent.upload import scan_file, send_missing
from fuse.index import DriveIndex, Pending
from fuse.staging import Staging
from protocol.ids import new_node_id
from protocol.limits import MAX_BATCH_BLOCKS, MAX_BLOCKS_BODY_BYTES
from protocol.models import BatchCreate, BatchUpdate, NodeCreate, NodeOut, NodeUpdate, NodeWrite

log = logging.getLogger("cairn.drive")

WRITE_BACK_S = 1.0          # quiet time after a file's last close before it is uploaded
ROUND_GAP_S = 0.5           # the least time between two rounds while changes keep coming
RETRY_S = (1.0, 10.0)       # offline: first and longest wait before trying again
ATTEMPTS = 3                # conflicts resolved per change in one go
PROGRESS_S = 2.0            # between progress lines while the mount finishes its uploads
BATCH_FILES = 500           # changes per POST /batch/files
BATCH_BYTES = MAX_BLOCKS_BODY_BYTES // 2   # inline block data per batch (base64 adds a third)


@dataclass
class _Item:
    """A change in a batch: what it seals, and the answer."""

    change: Pending
    meta: NodeMeta
    operation: BatchCreate | BatchUpdate
    cipher: bytes
    node: NodeOut | None = None


@dataclass
class Transfer:
    """An upload in progress, for `cairn status`."""

    name: str
    total: int
    done: int = 0


class _Counting(Progress):
    def __init__(self, transfer: Transfer, total: int) -> None:
        super().__init__(total, "", enabled=False)
        self.transfer = transfer
        transfer.total, transfer.done = total, 0

    def advance(self, nbytes: int) -> None:
        self.transfer.done += nbytes


def _stub(node_id: str, key: bytes, version: int, kind: str, owner: str) -> RemoteNode:
    """What node_update needs of a node: its id, key and the version we change."""
    return RemoteNode(id=node_id, parent=None, kind="dir" if kind == "dir" else "file",
                      version=version, status="uploaded", deleted=False, owner=owner,
                      created_at=0.0, updated_at=0.0, key=key,
                      meta=NodeMeta(name="-", kind="dir" if kind == "dir" else "file"))


@dataclass
class Uploader:
    index: DriveIndex
    tree: RemoteTree
    mirror: Mirror
    staging: Staging
    cache: BlockCache
    device_name: str
    busy: Callable[[str], bool]           # whether a node is open for writing
    write_generation: Callable[[str], int]   # writes so far to a node (in memory)
    wake_event: trio.Event = field(default_factory=trio.Event)
    transfers: dict[str, Transfer] = field(default_factory=dict)
    online: bool = True
    uploaded: int = 0

    def wake(self) -> None:
        self.wake_event.set()

    async def run(self) -> None:
        """Send what is due, forever; back off while the appliance is unreachable. A wake
        (a change made) only makes the loop look at when the next change falls due."""
        failures = 0
        while True:
            try:
                next_due = await self.round(flush=False)
                failures, self.online = 0, True
            except TransportError as exc:
                failures += 1
                self.online = False
                next_due = min(RETRY_S[1], RETRY_S[0] * 2 ** (failures - 1))
                log.info("uploads wait: %s (trying again in %.0f s)", exc.message, next_due)
            deadline = trio.current_time() + next_due
            while trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await self.wake_event.wait()
                self.wake_event = trio.Event()
                if failures == 0:        # a new change may fall due before the deadline
                    deadline = min(deadline, trio.current_time() + WRITE_BACK_S)

    async def round(self, *, flush: bool, report: Callable[[str], None] | None = None
                    ) -> float:
        """Send every change that is due (all of them if FLUSH: the mount is going away);
        the seconds until the next one is. Small changes go in batches, the rest one by
        one. Raises TransportError when offline."""
        uploaded_before = self.uploaded
        for _ in range(100):                 # each pass may unblock changes under new folders
            now = time.time()
            due: list[Pending] = []
            for change in self.index.changed_before(now if flush else now - WRITE_BACK_S):
                if not flush and self.busy(change.node_id):
                    continue
                if change.state == "conflict" and not flush \
                        and change.changed_at + RETRY_S[1] > now:
                    continue
                due.append(change)
            progressed = await self._send_due(due, report)
            if not progressed:
                break
        if self.uploaded > uploaded_before:
            log.info("uploaded %d change(s)", self.uploaded - uploaded_before)
        later = self.index.first_change_after(time.time() - WRITE_BACK_S)
        # Rounds at most every ROUND_GAP_S while changes keep coming: a burst of small
        # files goes in a few big batches, not in many small ones.
        wait = 3600.0 if later is None else \
            max(ROUND_GAP_S, later + WRITE_BACK_S - time.time())
        if self.index.pending_count() > 0:  # busy, in conflict or waiting on a folder
            wait = min(wait, RETRY_S[1])
        return max(0.05, wait)

    async def _send_due(self, due: list[Pending], report: Callable[[str], None] | None
                        ) -> bool:
        """DUE in order: runs of small changes as batches, the others alone; whether any
        went (a change under a folder not yet on the appliance waits for the next pass)."""
        progressed = False
        batch: list[Pending] = []
        in_batch: set[str] = set()
        for change in due:
            if not self._parent_ready(change, in_batch):
                continue
            if report is not None:
                report(change.name)
            if self._batchable(change):
                batch.append(change)
                in_batch.add(change.node_id)
                if len(batch) >= BATCH_FILES:
                    progressed |= await self._send_batch(batch)
                    batch, in_batch = [], set()
                continue
            if batch:
                progressed |= await self._send_batch(batch)
                batch, in_batch = [], set()
                if not self._parent_ready(change, in_batch):
                    continue
            progressed |= await self._push_logged(change)
        if batch:
            progressed |= await self._send_batch(batch)
        return progressed

    def _batchable(self, change: Pending) -> bool:
        if change.deleted or change.state == "conflict":
            return False
        return not change.staged or self.staging.size(change.node_id) <= SMALL_FILE

    async def _send_batch(self, batch: list[Pending]) -> bool:
        """BATCH as one `POST /batch/files`, the small files' blocks inline; what the
        appliance refuses goes again alone (which settles conflicts)."""
        items: list[_Item] = []
        inline: dict[str, bytes] = {}
        room = BATCH_BYTES
        for change in batch:
            item = self._item(change)
            if item is None:
                continue
            items.append(item)
            if item.cipher and len(item.cipher) <= room:
                inline[item.meta.blocks[0].id_hex] = item.cipher
                room -= len(item.cipher)
        if not items:
            return False
        answer = await self.tree.api.batch([item.operation for item in items],
                                           list(inline.items()))
        wanted: list[tuple[str, bytes]] = []
        for item, result in zip(items, answer.results, strict=True):
            if result.ok and result.result is not None:
                item.node = result.result.node
                wanted.extend((e.block_id, item.cipher) for e in result.result.upload)
        for start in range(0, len(wanted), MAX_BATCH_BLOCKS):
            stored = await self.tree.api.put_blocks(wanted[start:start + MAX_BATCH_BLOCKS])
            missing = [r for r in stored if not r.ok]
            if missing:
                raise LocalFileError(f"the appliance refused {len(missing)} blocks: "
                                     f"{item_error(missing[0].error)}")
        done = [item for item in items if item.node is not None]
        await trio.to_thread.run_sync(self._keep_small, done)
        with self.index.transaction():
            for item in done:
                assert item.node is not None
                node = item.node
                if item.cipher and node.status != "uploaded":   # its one block is in now
                    node = node.model_copy(update={"status": "uploaded"})
                self._done(item.change, node, item.meta)
        for item in items:
            if item.node is None:
                await self._push_logged(item.change)       # refused: alone, to settle it
        span = own_span(answer)
        if span is not None:          # only our own changes: the feed need not bring them
            self.mirror.pass_own([span])
        return True

    def _keep_small(self, items: list[_Item]) -> None:
        """The small files' blocks into the cache: readable offline (if there is room)."""
        self.cache.put_many((item.meta.blocks[0].id_hex, item.cipher)
                            for item in items if item.cipher)

    def _item(self, change: Pending) -> _Item | None:
        """The batch operation for CHANGE (a small file's content read from the staging
        area in one go, on the event loop: no write can come in between)."""
        parent_key = self.index.key_of(change.parent_id)
        if parent_key is None:
            return None
        cipher = b""
        if change.staged:
            try:
                data = self.staging.read_small(change.node_id, SMALL_FILE)
            except OSError:
                return None
            refs: tuple[BlockRef, ...] = ()
            if data:
                ref, cipher = encrypt_block(self.tree.keys.content_secret, data)
                refs = (ref,)
            meta = NodeMeta(name=change.name, kind="file", size=len(data),
                            mtime_ns=change.mtime_ns, mode=change.mode, blocks=refs,
                            device=self.device_name)
        else:
            try:
                meta = self._metadata_only(change)
            except CairnAgentError:
                return None
        request = self._request(change, meta, parent_key, content=change.staged)
        operation = create_op(request) if isinstance(request, NodeCreate) \
            else update_op(change.node_id, request)
        return _Item(change, meta, operation, cipher)

    def _request(self, change: Pending, meta: NodeMeta, parent_key: bytes, *,
                 content: bool) -> NodeCreate | NodeUpdate:
        """The request that puts CHANGE (sealed as META) on the appliance: a create for a
        node made here, else a new version of the one it was based on (a move if its
        folder changed; with its size and blocks if CONTENT)."""
        if change.base_version is None:
            return node_create(change.node_id, change.key, meta, change.parent_id,
                               parent_key)
        remote = self.index.remote_row(change.node_id)
        moved = remote is not None and remote.parent_id != change.parent_id
        return node_update(
            _stub(change.node_id, change.key, change.base_version, change.kind,
                  self.tree.user), meta,
            _stub(change.parent_id, parent_key, 0, "dir", self.tree.user),
            move=moved, content=content)

    async def _write(self, change: Pending, request: NodeCreate | NodeUpdate) -> NodeWrite:
        if isinstance(request, NodeCreate):
            return await self.tree.api.create(request)
        return await self.tree.api.update(change.node_id, request)

    def _parent_ready(self, change: Pending, in_batch: set[str]) -> bool:
        """A change under a folder made here waits until that folder is on the appliance
        (or goes in the same batch after it)."""
        if change.parent_id in in_batch:
            return True
        parent = self.index.pending(change.parent_id)
        return parent is None or parent.base_version is not None

    async def _push_logged(self, change: Pending) -> bool:
        try:
            await self._push(change)
        except (TransportError, trio.Cancelled):
            raise
        except CairnAgentError as exc:
            log.warning("could not upload %s: %s", change.name, exc.message)
            self.index.set_state(change.node_id, "conflict", exc.message)
            return False
        finally:
            self.transfers.pop(change.node_id, None)
        return True

    async def _push(self, change: Pending) -> None:
        for _ in range(ATTEMPTS):
            current = self.index.pending(change.node_id)
            if current is None or current.generation != change.generation:
                return                         # changed again meanwhile: the next round
            try:
                await self._send(change)
                return
            except RemoteConflictError:
                change = await self._resolve(change)
        raise RemoteConflictError(f"{change.name} keeps changing on the appliance; will try "
                                  "again")

    async def _send(self, change: Pending) -> None:
        if change.deleted:
            await self._delete(change)
            return
        parent_key = self.index.key_of(change.parent_id)
        if parent_key is None:
            raise RemoteNotFoundError(f"the folder of {change.name} is gone")
        if change.kind == "dir" or not change.staged:
            meta = self._metadata_only(change)
            answer = await self._write(change, self._request(change, meta, parent_key,
                                                             content=False))
            self._done(change, answer.node, meta)
            return
        await self._send_content(change, parent_key)

    def _metadata_only(self, change: Pending) -> NodeMeta:
        if change.kind == "dir":
            return NodeMeta(name=change.name, kind="dir", mtime_ns=change.mtime_ns,
                            mode=change.mode, device=self.device_name)
        if change.link is not None and change.base_version is None:
            return NodeMeta(name=change.name, kind="file", mtime_ns=change.mtime_ns,
                            mode=change.mode, device=self.device_name, link=change.link)
        opened = self.index.remote_meta(change.node_id)
        if opened is None:
            raise RemoteNotFoundError(f"{change.name}: its content is neither staged nor on "
                                      "the appliance")
        return replace(opened[1], name=change.name, mtime_ns=change.mtime_ns,
                       mode=change.mode, device=self.device_name)

    async def _send_content(self, change: Pending, parent_key: bytes) -> None:
        path = self.staging.path(change.node_id)
        transfer = Transfer(change.name, 0)      # listed once the appliance took it
        written_before = self.write_generation(change.node_id)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            transfer.total = size
            refs = await scan_file(fd, path, size, self.tree.keys.content_secret,
                                   _Counting(transfer, size), 4, keep=self._keep_block)
            if self.write_generation(change.node_id) != written_before:
                raise FileChangedError(f"{change.name} was written to while it was read")
            meta = NodeMeta(name=change.name, kind="file", size=size,
                            mtime_ns=change.mtime_ns, mode=change.mode,
                            blocks=tuple(refs), device=self.device_name)
            answer = await self._write(change, self._request(change, meta, parent_key,
                                                             content=True))
            self.index.rebase(change.node_id, answer.node.version)
            self.transfers[change.node_id] = transfer
            node, _ = await send_missing(self.tree, fd, path, refs, answer,
                                         lambda total: _Counting(transfer, total))
        except FileChangedError:
            return                              # the next round sends the newer content
        finally:
            os.close(fd)
        self._done(change, node, meta)

    def _keep_block(self, ref: BlockRef, cipher: memoryview) -> None:
        """A block the scan just encrypted into the cache (in its worker thread), so the
        file stays readable offline once its staged copy is gone (a full cache keeps
        fewer)."""
        with contextlib.suppress(CacheFullError):
            self.cache.put(ref.id_hex, cipher, checked=True)

    def _done(self, change: Pending, node: NodeOut, meta: NodeMeta) -> None:
        """The appliance has the change: into the mirror, and the pending row (and staged
        copy) gone unless something newer came in meanwhile."""
        with self.index.transaction():
            self._absorb_own(node)
            if self.busy(change.node_id) \
                    or not self.index.drop_pending(change.node_id, change.generation):
                self.index.rebase(change.node_id, node.version)   # newer content pending
                return
        if change.staged:
            self.staging.remove(change.node_id)
        self.uploaded += 1
        log.debug("uploaded %s", change.name)

    def _absorb_own(self, node: NodeOut) -> None:
        """Our own change as the appliance took it, into the mirror without invalidating
        the kernel's caches: they hold what we wrote already."""
        observer, self.mirror.on_change = self.mirror.on_change, None
        try:
            self.mirror.absorb(node)
        finally:
            self.mirror.on_change = observer

    async def _delete(self, change: Pending) -> None:
        node: NodeOut | None = None
        if change.base_version is not None:
            try:
                node = await self.tree.api.delete(change.node_id, change.base_version)
            except RemoteNotFoundError:
                node = None                    # gone already
            except RemoteConflictError:        # changed elsewhere: the edit wins
                log.warning("%s changed on another device; not deleted", change.name)
                node = (await self.tree.fetch(change.node_id)).node
        with self.index.transaction():
            if node is not None:
                self.mirror.absorb(node)
            else:
                self.mirror.forget(change.node_id)
            self.index.drop_pending(change.node_id, change.generation)
        self.staging.remove(change.node_id)

    async def _resolve(self, change: Pending) -> Pending:
        """The appliance refused CHANGE as based on an old version (or an id it holds):
        settle it as the module says; the change to send next."""
        try:
            current = (await self.tree.fetch(change.node_id)).node
        except RemoteNotFoundError:
            if change.base_version is None:
                raise                             # a create refused for another reason
            current = None
        if current is None:
            self.index.rebase(change.node_id, None)
        elif current.deleted:
            log.info("%s was deleted on another device; restoring it", change.name)
            current = await self.tree.api.restore(change.node_id, current.version)
        elif change.base_version is not None and change.staged \
                and current.version != change.base_version:
            await self._keep_theirs(current)
        if current is not None:
            with self.index.transaction():
                self.mirror.absorb(current)
            self.index.rebase(change.node_id, current.version)
        found = self.index.pending(change.node_id)
        if found is None:
            raise RemoteNotFoundError(f"{change.name}: the change is gone")
        return found

    async def _keep_theirs(self, current: NodeOut) -> None:
        """Another device's version of a file we changed, kept as a conflicted copy."""
        theirs = await self.tree.open(current)
        parent_id = current.parent
        parent_key = None if parent_id is None else self.index.key_of(parent_id)
        if parent_id is None or parent_key is None:
            return
        taken = set(self.index.children(parent_id))
        name = unique_copy_name(theirs.name, theirs.meta.device, current.updated_at, taken)
        meta = replace(theirs.meta, name=name)
        answer = await self.tree.api.create(node_create(new_node_id(), new_node_key(), meta,
                                                        parent_id, parent_key))
        with self.index.transaction():
            self.mirror.absorb(answer.node)
        log.warning("%s changed here and on %s: their version is kept as %s", theirs.name,
                    theirs.meta.device or "another device", name)

    async def flush(self) -> int:
        """Send everything pending now (the mount is going away), with the count left and
        the file in hand on stderr every PROGRESS_S; the changes left (0 unless the
        appliance is unreachable)."""
        def report(name: str) -> None:
            now = time.monotonic()
            if now - shown[0] >= PROGRESS_S:
                shown[0] = now
                print(f"cairn: {self.index.pending_count()} change(s) left to upload "
                      f"(now {name})", file=sys.stderr, flush=True)

        shown = [time.monotonic()]
        await self.round(flush=True, report=report)
        return self.index.pending_count()
