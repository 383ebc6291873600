"""Uploading a local file as a node: scan, announce, send what is missing.

1. Scan (worker threads, several blocks at once): cut the file into 4 MiB blocks, encrypt
   each (convergent, crypto/blocks.py) and keep only its reference (id, key, hashes); the
   ciphertext is dropped, so memory does not grow with the file.
2. Announce: create the node (client-chosen id, so a retried request is recognised) or give
   the existing one a new version. The appliance answers upload URLs for the blocks it does
   not hold: deduplication and resumption are the same mechanism. An interrupted upload
   leaves an `uploading` node under the name, which the next `put` updates.
3. Send: re-read and re-encrypt only the missing blocks and PUT them, several in flight. A
   block whose id differs from the scan means the file changed under us: stop and say so.
   Expired URLs (a long upload) are refreshed once from GET /files/{id}.
4. A re-put of an unchanged file (same blocks, size, mtime and mode) changes nothing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.buffers import thread_buffer
from agent.crypto.blocks import (
    BLOCK_SIZE,
    TAG_BYTES,
    BlockRef,
    encrypt_again_into,
    encrypt_block_into,
)
from agent.crypto.nodes import NodeMeta, new_node_key
from agent.errors import FileChangedError, ForbiddenError, LocalFileError, UsageError
from agent.pipeline import DEFAULT_PARALLEL, run_jobs
from agent.progress import Progress
from agent.remote import RemoteNode, RemoteTree, Target, node_create, node_update
from protocol.ids import new_node_id
from protocol.models import BlockUrl, NodeOut, NodeWrite

MAX_SEND_ROUNDS = 3


@dataclass
class UploadStats:
    files: int = 0
    bytes: int = 0
    blocks: int = 0
    blocks_sent: int = 0
    folders: int = 0
    skipped: list[str] = field(default_factory=list)
    node: NodeOut | None = None              # the node as written (None: unchanged)
    refs: tuple[BlockRef, ...] = ()
    source: os.stat_result | None = None     # the file as it was read

    def add(self, other: UploadStats) -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.blocks += other.blocks
        self.blocks_sent += other.blocks_sent
        self.folders += other.folders
        self.skipped += other.skipped


def _local_error(path: Path, exc: OSError) -> LocalFileError:
    return LocalFileError(f"cannot read {path}: {exc.strerror or exc}")


def _fingerprint(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def read_block(fd: int, index: int, path: Path) -> memoryview:
    """Block INDEX of the file, as far as it goes, in this thread's `plain` buffer."""
    buffer = thread_buffer(BLOCK_SIZE, "plain")[:BLOCK_SIZE]
    done = 0
    try:
        while done < BLOCK_SIZE and (count := os.preadv(fd, [buffer[done:]],
                                                        index * BLOCK_SIZE + done)):
            done += count
    except OSError as exc:
        raise _local_error(path, exc) from None
    return buffer[:done]


def block_count(size: int) -> int:
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE


async def scan_file(fd: int, path: Path, size: int, content_secret: bytes,
                    progress: Progress, parallel: int,
                    keep: Callable[[BlockRef, memoryview], None] | None = None
                    ) -> list[BlockRef]:
    """The block references of the file (FD, SIZE bytes). KEEP(ref, ciphertext), if given,
    sees each block's ciphertext in the worker thread that made it (the drive caches it)."""
    refs: list[BlockRef | None] = [None] * block_count(size)

    def scan(index: int) -> BlockRef:
        data = read_block(fd, index, path)
        expected = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
        if len(data) != expected:
            raise FileChangedError(f"{path} changed while it was being read; try again")
        ref, cipher = encrypt_block_into(content_secret, data,
                                         thread_buffer(len(data) + TAG_BYTES, "cipher"))
        if keep is not None:
            keep(ref, cipher)
        return ref

    def done(index: int, ref: BlockRef) -> None:
        refs[index] = ref
        progress.advance(ref.plain_size)

    await run_jobs(range(len(refs)), scan, parallel=parallel, done=done)
    return [ref for ref in refs if ref is not None]


async def announce(tree: RemoteTree, target: Target, meta: NodeMeta) -> NodeWrite:
    """Create the node or version the existing one; the appliance's answer."""
    parent = target.parent
    existing = target.existing
    if existing is None:
        return await tree.api.create(node_create(new_node_id(), new_node_key(), meta,
                                                 parent.id, parent.key))
    return await tree.api.update(existing.id, node_update(existing, meta, parent))


def _unchanged(existing: RemoteNode | None, meta: NodeMeta) -> bool:
    return (existing is not None and existing.status == "uploaded" and not existing.deleted
            and existing.meta.blocks == meta.blocks and existing.meta.size == meta.size
            and existing.meta.mtime_ns == meta.mtime_ns and existing.meta.mode == meta.mode)


async def upload_file(tree: RemoteTree, path: Path, target: Target, *,
                      show_progress: bool | None = None,
                      parallel: int = DEFAULT_PARALLEL, device: str = "") -> UploadStats:
    """Upload PATH as TARGET. Progress bars (hashing, then sending) on a terminal. DEVICE
    (this device's name) goes into the metadata, for naming conflicted copies."""
    if target.existing is not None and target.existing.is_dir:
        raise UsageError(f"a folder named {target.name!r} is already there")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)   # a link is never read through
    except OSError as exc:
        raise _local_error(path, exc) from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise UsageError(f"{path} is not a regular file")
        secret = tree.keys.content_secret
        progress = Progress(before.st_size, f"hashing {path.name}", enabled=show_progress)
        try:
            refs = await scan_file(fd, path, before.st_size, secret, progress, parallel)
        finally:
            progress.close()
        if _fingerprint(os.fstat(fd)) != _fingerprint(before):
            raise FileChangedError(f"{path} changed while it was being read; try again "
                                   "once it is complete")
        meta = NodeMeta(name=target.name, kind="file", size=before.st_size,
                        mtime_ns=before.st_mtime_ns, mode=stat.S_IMODE(before.st_mode),
                        blocks=tuple(refs), device=device)
        stats = UploadStats(files=1, bytes=before.st_size, blocks=len(refs),
                            refs=tuple(refs), source=before)
        if _unchanged(target.existing, meta):
            return stats
        answer = await announce(tree, target, meta)
        stats.node = answer.node
        try:
            stats.node, stats.blocks_sent = await send_missing(
                tree, fd, path, refs, answer,
                lambda total: Progress(total, f"sending {path.name}", enabled=show_progress),
                parallel)
            if _fingerprint(os.fstat(fd)) != _fingerprint(before):
                raise FileChangedError(f"{path} changed while it was being uploaded; run put "
                                       "again once it is complete")
        except FileChangedError as exc:
            if exc.written is None:     # the version this put began: the next one builds on it
                exc.written = stats.node
            raise
        return stats
    finally:
        os.close(fd)


async def send_missing(tree: RemoteTree, fd: int, path: Path, refs: list[BlockRef],
                       answer: NodeWrite, progress_for: Callable[[int], Progress],
                       parallel: int = DEFAULT_PARALLEL) -> tuple[NodeOut, int]:
    """Send the blocks ANSWER (to the announce of REFS, read from FD) asks for, and any
    the appliance still lacks after that (a few rounds); the node as it is then and the
    number of blocks sent. PROGRESS_FOR(bytes to send) reports each round."""
    node = answer.node
    first_index: dict[str, int] = {}
    for index, ref in enumerate(refs):
        first_index.setdefault(ref.id_hex, index)
    urls = answer.upload
    sent = 0
    for _ in range(MAX_SEND_ROUNDS):
        if not urls:
            break
        progress = progress_for(sum(e.size for e in urls))
        try:
            sent += await _send(tree, fd, path, refs, first_index, urls, progress, parallel,
                                node.id)
        except FileChangedError as exc:
            exc.written = node
            raise
        finally:
            progress.close()
        detail = await tree.fetch(node.id)
        node = detail.node
        urls = detail.blocks if detail.method == "PUT" else []
    if urls:
        raise LocalFileError(f"{path}: the appliance still lacks {len(urls)} blocks "
                             "after several rounds; try again")
    return node, sent


async def _send(tree: RemoteTree, fd: int, path: Path, refs: list[BlockRef],
                first_index: dict[str, int],
                urls: list[BlockUrl], progress: Progress, parallel: int,
                node_id: str) -> int:
    connection = tree.connection
    refreshed: dict[str, str] = {}

    def send(entry: BlockUrl) -> int:
        block_id = entry.block_id
        index = first_index.get(block_id)
        if index is None:
            raise LocalFileError(f"the appliance asked for block {block_id[:16]}, which "
                                 f"is not in {path}")
        ref = refs[index]
        ciphertext = encrypt_again_into(ref, read_block(fd, index, path),
                                        thread_buffer(ref.cipher_size, "cipher"))
        if ciphertext is None:
            raise FileChangedError(f"{path} changed while it was being uploaded; run put "
                                   "again once it is complete")
        try:
            connection.put_block(refreshed.get(block_id, entry.url), ciphertext)
        except ForbiddenError:   # the URL expired during a long upload: one fresh try
            refreshed.update(_fresh_urls(node_id))
            connection.put_block(refreshed[block_id], ciphertext)
        return len(ciphertext)

    def _fresh_urls(node: str) -> dict[str, str]:
        detail = trio.from_thread.run(tree.fetch, node)
        return {e.block_id: e.url for e in detail.blocks}

    sent = 0

    def done(entry: BlockUrl, cipher_size: int) -> None:
        nonlocal sent
        sent += 1
        progress.advance(cipher_size)

    await run_jobs(urls, send, parallel=parallel, done=done)
    return sent
