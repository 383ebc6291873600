"""Transfers: uploads, downloads and conflicts (several at once; small files in
batches), and new remote folders a thousand per request.

A download is renamed into place only if the local file still looks as the plan saw it;
an upload names the version it is based on; an upload stopped by a change records the
version it began (rules.began_upload). A symbolic link goes the small files' way, both
ways (agent/sync/batch.py): a link node up, a link placed down, never followed; nothing is
read or written under a folder that is a link here (`Context.within`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import trio

from agent.api import create_op, item_error
from agent.crypto.nodes import NodeMeta, new_node_key
from agent.download import download_file
from agent.errors import (
    CairnAgentError,
    DiskFullError,
    FileChangedError,
    LocalFileError,
    TransportError,
    UploadStalledError,
)
from agent.remote import Target, node_create
from agent.sync import rules
from agent.sync.batch import (
    SMALL_FILE,
    SmallDownload,
    SmallUpload,
    download_small,
    upload_small,
)
from agent.sync.context import Context, Outcome, SkipAction, _id_and_key
from agent.sync.model import (
    Action,
    BaseEntry,
    Download,
    KeepBoth,
    MakeRemoteDir,
    Upload,
    content_of_node,
    content_of_refs,
    name_of,
    parent_of,
)
from agent.sync.names import unique_copy_name
from agent.sync.scan import is_link, lstat_or_none, stat_of
from agent.upload import upload_file
from protocol.limits import MAX_BATCH_OPERATIONS
from protocol.models import BatchCreate, NodeOut

log = logging.getLogger("cairn.sync")

TRANSFERS_AT_ONCE = 4
TRANSFER_ACTIONS = (Upload, Download, KeepBoth)
CHUNK = 5000
"""Small files prepared, sent and recorded at once (ten batches): each holds its opened
node until recorded, so a first sync of 100,000 files holds 5,000 of them, not all."""


def _unchanged_guard(target: Path, action: Download) -> Callable[[], None]:
    """Raises FileChangedError if TARGET no longer looks as the plan saw it."""
    def check() -> None:
        if lstat_or_none(target) != action.expect:
            raise FileChangedError(f"{action.path} changed while it was being downloaded; "
                                   "kept as it is")
    return check


class Transfers(Context):
    async def _one(self, action: Action, outcome: Outcome) -> None:
        """Carry out one action, its failure recorded in OUTCOME (the executor's)."""
        raise NotImplementedError

    async def _transfers(self, actions: list[Action], outcome: Outcome) -> None:
        small_up = [a for a in actions if isinstance(a, Upload) and a.size <= SMALL_FILE]
        small_down = [a for a in actions if isinstance(a, Download) and a.size <= SMALL_FILE]
        if small_up:
            await self._guarded(self._upload_batch(small_up, outcome))
        if small_down and self.downloads_allowed:
            await self._guarded(self._download_batch(small_down, outcome))
        else:
            small_down = []
        batched = {id(a) for a in small_up + small_down}
        actions = [a for a in actions if id(a) not in batched]
        limiter = trio.CapacityLimiter(TRANSFERS_AT_ONCE)

        async def one(action: Action) -> None:
            async with limiter:
                await self._one(action, outcome)

        async with trio.open_nursery() as nursery:
            for action in actions:
                nursery.start_soon(one, action)

    async def _make_remote_dirs(self, actions: list[MakeRemoteDir], outcome: Outcome) -> None:
        """Many new folders in one request per thousand: ids and keys are chosen here, so
        a folder and what goes in it can be created in the same batch."""
        made: dict[str, tuple[str, bytes]] = {}
        operations: list[BatchCreate] = []
        planned: list[tuple[MakeRemoteDir, os.stat_result]] = []
        for action in actions:
            try:
                parent_id, parent_key = made.get(parent_of(action.path)) or _id_and_key(
                    self._folder_node(action.path))
                info = os.lstat(self.local(action.path))
            except (CairnAgentError, OSError) as exc:
                outcome.failed.append((action.path, str(exc)))
                continue
            if not stat.S_ISDIR(info.st_mode):
                continue
            node_id, key = self._folder_id(action.path), new_node_key()
            meta = NodeMeta(name=name_of(action.path), kind="dir", mtime_ns=info.st_mtime_ns,
                            mode=stat.S_IMODE(info.st_mode), device=self.device_name)
            operations.append(create_op(node_create(node_id, key, meta, parent_id,
                                                    parent_key)))
            made[action.path] = (node_id, key)
            planned.append((action, info))
        for start in range(0, len(operations), MAX_BATCH_OPERATIONS):
            end = start + MAX_BATCH_OPERATIONS
            results = (await self.tree.api.batch(operations[start:end])).results
            with self.db.transaction():
                for (action, info), result in zip(planned[start:end], results, strict=True):
                    if not result.ok or result.result is None:
                        outcome.failed.append((action.path, item_error(result.error)))
                        continue
                    row = self.mirror.absorb(result.result.node)
                    if row is None:
                        continue
                    self._record(BaseEntry(row.node_id, action.path, "dir", row.version,
                                           row.content, stat_of(info)))
                    outcome.done += 1

    async def _guarded(self, work: Awaitable[None]) -> None:
        """A whole batch; per-file failures are recorded inside, a refused request skips
        the batch (its files are planned again)."""
        try:
            await work
        except TransportError:
            raise
        except CairnAgentError as exc:
            log.warning("a batch failed: %s", exc.message)

    async def _upload_batch(self, actions: list[Upload], outcome: Outcome) -> None:
        for start in range(0, len(actions), CHUNK):
            await self._upload_chunk(actions[start:start + CHUNK], outcome)

    async def _upload_chunk(self, actions: list[Upload], outcome: Outcome) -> None:
        items: list[tuple[Upload, SmallUpload]] = []
        for action in actions:
            try:
                existing = None
                if action.node_id is not None:
                    assert action.base_version is not None
                    existing = replace(self.mirror.node(action.node_id),
                                       version=action.base_version)
                items.append((action, SmallUpload(self.within(action.path),
                                                  name_of(action.path),
                                                  self._folder_node(action.path), existing)))
            except CairnAgentError as exc:
                outcome.failed.append((action.path, exc.message))
        spans = await upload_small(self.tree, [item for _, item in items], self.device_name)
        with self.db.transaction():
            self._record_uploads(items, outcome)
            self.mirror.pass_own(spans)     # our own changes need not come back by a pull
        log.debug("uploaded %d small files in a batch", sum(
            1 for _, i in items if i.error is None))

    def _record_uploads(self, items: list[tuple[Upload, SmallUpload]],
                        outcome: Outcome) -> None:
        for action, item in items:
            error = self._record_upload(action, item)
            if error is not None:
                outcome.failed.append((action.path, error))
                continue
            outcome.uploaded += 1
            outcome.done += 1

    def _record_upload(self, action: Upload, item: SmallUpload) -> str | None:
        """Record ITEM, sent for ACTION, as synced; or why it was not sent."""
        if item.error is not None or item.source is None:
            return item.error or "not read"
        if item.node is None:
            assert item.existing is not None
            version, node_id = item.existing.version, item.existing.id
        else:
            if item.written is None:
                self.mirror.absorb(item.node)
            else:
                self.mirror.absorb_written(item.node, item.written.key, item.written.meta,
                                           item.written.sealed)
            version, node_id = item.node.version, item.node.id
        self._record(BaseEntry(node_id, action.path, "file", version,
                               content_of_node(item.refs, item.link), stat_of(item.source)))
        log.debug("uploaded %s", action.path)
        return None

    async def _download_batch(self, actions: list[Download], outcome: Outcome) -> None:
        for start in range(0, len(actions), CHUNK):
            await self._download_chunk(actions[start:start + CHUNK], outcome)

    async def _download_chunk(self, actions: list[Download], outcome: Outcome) -> None:
        items: list[tuple[Download, SmallDownload]] = []
        for action in actions:
            try:
                node = self.mirror.node(action.node_id)
                target = self.within(action.path)
                os.makedirs(target.parent, exist_ok=True)
            except (CairnAgentError, OSError) as exc:
                outcome.failed.append((action.path, str(exc)))
                continue
            items.append((action, SmallDownload(node, target,
                                                _unchanged_guard(target, action))))
        await download_small(self.tree, [item for _, item in items])
        with self.db.transaction():
            self._record_downloads(items, outcome)
        log.debug("downloaded %d small files in a batch", sum(
            1 for _, i in items if i.written is not None))

    def _record_downloads(self, items: list[tuple[Download, SmallDownload]],
                          outcome: Outcome) -> None:
        for action, item in items:
            if item.written is None:
                outcome.disk_full = outcome.disk_full or item.disk_full
                outcome.failed.append((action.path, item.error or "not written"))
                continue
            self._record(BaseEntry(item.node.id, action.path, "file", item.node.version,
                                   content_of_node(item.node.meta.blocks,
                                                   item.node.meta.link),
                                   stat_of(item.written)))
            log.debug("downloaded %s", action.path)
            outcome.downloaded += 1
            outcome.done += 1

    async def _upload(self, action: Upload, outcome: Outcome) -> None:
        parent = self._folder_node(action.path)
        existing = None
        if action.node_id is not None:
            assert action.base_version is not None
            existing = replace(self.mirror.node(action.node_id), version=action.base_version)
        source = self.within(action.path)
        if is_link(source):     # (a conflict's local side, say)
            await self._upload_link(action, SmallUpload(source, name_of(action.path), parent,
                                                        existing), outcome)
            return
        target = Target(parent, name_of(action.path), existing)
        try:
            stats = await upload_file(self.tree, source, target,
                                      show_progress=False, device=self.device_name)
        except FileChangedError as exc:
            if exc.written is not None:
                self._began(action.path, exc.written)
            raise
        assert stats.source is not None
        if stats.node is None:         # the appliance already had exactly this
            assert existing is not None
            version = existing.version
            node_id = existing.id
        else:
            self.mirror.absorb(stats.node)
            version, node_id = stats.node.version, stats.node.id
        self._record(BaseEntry(node_id, action.path, "file", version,
                               content_of_refs(stats.refs), stat_of(stats.source)))
        outcome.uploaded += 1
        log.debug("uploaded %s", action.path)

    async def _upload_link(self, action: Upload, item: SmallUpload, outcome: Outcome
                           ) -> None:
        """A symbolic link sent on its own, the way a batch sends it."""
        spans = await upload_small(self.tree, [item], self.device_name)
        with self.db.transaction():
            error = self._record_upload(action, item)
            self.mirror.pass_own(spans)
        if error is not None:
            raise LocalFileError(error)
        outcome.uploaded += 1

    def _began(self, path: str, written: NodeOut) -> None:
        row = self.mirror.absorb(written)
        if row is not None:
            self._record(rules.began_upload(row.node_id, path, row.version, row.content))

    async def _download(self, action: Download, outcome: Outcome) -> None:
        if not self.downloads_allowed:
            raise DiskFullError("downloads are paused: the disk is full")
        node = self.mirror.node(action.node_id)
        target = self.within(action.path)
        unchanged_meanwhile = _unchanged_guard(target, action)
        try:
            os.makedirs(target.parent, exist_ok=True)
        except OSError as exc:
            raise LocalFileError(f"cannot create {target.parent}: {exc.strerror}") from None
        streamed = (node.id, node.version)
        if node.status != "uploaded" and streamed in self.mirror.stalled:
            raise SkipAction(f"{action.path} is still being uploaded by another device")
        try:
            stats = await download_file(self.tree, node, target, show_progress=False,
                                        guard=unchanged_meanwhile, stream=True)
        except UploadStalledError:
            # Not again for this version until it is complete: a round must not wait
            # STREAM_STALL_S each time for an upload that stopped.
            self.mirror.stalled.add(streamed)
            raise
        written = stats.node or node
        assert stats.written is not None
        self._record(BaseEntry(written.id, action.path, "file", written.version,
                               content_of_node(written.meta.blocks, written.meta.link),
                               stat_of(stats.written)))
        outcome.downloaded += 1
        log.debug("downloaded %s", action.path)

    async def _keep_both(self, action: KeepBoth, outcome: Outcome) -> None:
        row = self.db.remote_row(self.folder.id, action.node_id)
        if row is None or row.parent_id is None:
            raise SkipAction("the node is gone")
        node = self.mirror.node(action.node_id)
        parent = self.mirror.node(row.parent_id)
        taken = self._taken_names(parent.id, parent_of(action.path))
        copy = unique_copy_name(row.name, row.device, row.updated_at, taken)
        await self._create_node(parent, replace(node.meta, name=copy))
        log.warning("conflict: %s was changed here and on %s; their version is kept as %s",
                    action.path, row.device or "another device", copy)
        outcome.conflicts.append(copy)
        await self._upload(Upload(action.path, action.node_id, row.version), outcome)
