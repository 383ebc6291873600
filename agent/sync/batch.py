"""Small files in batches: a thousand files in a few requests instead of a few thousand.

Upload: read and encrypt each file (one block, at most SMALL_FILE bytes) in worker threads,
then one `POST /batch/files` with every create or new version, then one `POST /blocks`
with the blocks the appliance lacks. Download: one `POST /blocks/read` for the blocks,
then each file is verified (id, tag, plain hash), written to a temporary file beside its
target, and renamed into place if the target still looks as the plan saw it. Folders are
fsynced once per batch, not once per file.

A symbolic link rides along as what it is on the appliance, a file node without content
whose metadata holds the target: read with lstat and readlink (never followed), and
placed as a link (`place_link`) on the way down.

Results are per file: a file that fails (changed meanwhile, a version conflict) is left
for the next plan; the rest of the batch stands.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from agent.api import create_op, item_error, update_op
from agent.crypto.blocks import BlockRef, decrypt_block, encrypt_block
from agent.crypto.nodes import NodeMeta, check_link, new_node_key
from agent.download import partial_path, place_link
from agent.errors import (
    CairnAgentError,
    DiskFullError,
    FileChangedError,
    IntegrityError,
    LocalFileError,
)
from agent.pipeline import first_error, run_jobs
from agent.remote import RemoteNode, RemoteTree, node_create, node_update
from agent.sync.scan import read_link
from protocol import version
from protocol.ids import b64decode, new_node_id
from protocol.limits import (
    MAX_BATCH_BLOCKS,
    MAX_BATCH_OPERATIONS,
    MAX_BATCH_READ_BYTES,
    MAX_BLOCKS_BODY_BYTES,
    MAX_INLINE_BLOCK_BYTES,
    KiB,
)
from protocol.models import BatchCreate, BatchResponse, BatchUpdate, FeedSpan, NodeOut

SMALL_FILE = 48 * KiB           # one block whose ciphertext fits POST /blocks inline
BATCH_FILES = 500
BATCH_BYTES = MAX_BLOCKS_BODY_BYTES // 2   # of block data per request (base64 adds a third)
assert SMALL_FILE < MAX_INLINE_BLOCK_BYTES
assert min(MAX_BATCH_OPERATIONS, MAX_BATCH_BLOCKS) >= BATCH_FILES
BATCHES_AT_ONCE = 3
WORKERS = 4
T = TypeVar("T")


@dataclass
class SmallUpload:
    path: Path
    name: str
    parent: RemoteNode
    existing: RemoteNode | None        # with the version the change is based on
    error: str | None = None
    node: NodeOut | None = None        # as written (None with no error: unchanged)
    refs: tuple[BlockRef, ...] = ()
    source: os.stat_result | None = None   # the file as read (a link's own stat)
    link: str | None = None            # the target, when it was a symbolic link
    written: Written | None = None     # what the batch's operation sealed
    _cipher: bytes = b""


@dataclass(frozen=True)
class Written:
    """The key and metadata an upload sealed into its node, and the sealed bytes (base64):
    the mirror takes the answer's node from them instead of decrypting it again."""

    key: bytes
    meta: NodeMeta
    sealed: str


def _read_and_encrypt(secret: bytes, item: SmallUpload) -> None:
    try:
        fd = os.open(item.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:       # a symbolic link: its target, never followed
            item.source, item.link, together = read_link(item.path)
            if not together:
                raise FileChangedError(f"{item.path} keeps being replaced") from None
            check_link(item.link)
            return
        raise LocalFileError(f"cannot read {item.path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > SMALL_FILE:
            raise FileChangedError(f"{item.path} changed")
        data = os.pread(fd, SMALL_FILE + 1, 0)
        if len(data) != info.st_size:
            raise FileChangedError(f"{item.path} changed while it was read")
    finally:
        os.close(fd)
    item.source = info
    if data:
        ref, item._cipher = encrypt_block(secret, data)
        item.refs = (ref,)


def _operation(item: SmallUpload, device: str) -> BatchCreate | BatchUpdate:
    assert item.source is not None
    meta = NodeMeta(name=item.name, kind="file", size=_size(item),
                    mtime_ns=item.source.st_mtime_ns, mode=stat.S_IMODE(item.source.st_mode),
                    blocks=item.refs, device=device, link=item.link)
    if item.existing is None:
        key = new_node_key()
        create = node_create(new_node_id(), key, meta, item.parent.id, item.parent.key)
        item.written = Written(key, meta, create.metadata)
        return create_op(create)
    update = node_update(item.existing, meta, item.parent)
    item.written = Written(item.existing.key, meta, update.metadata)
    return update_op(item.existing.id, update)


def _size(item: SmallUpload) -> int:
    """The node's size: the file's (a link has no content: 0)."""
    assert item.source is not None
    return 0 if item.link is not None else item.source.st_size


def _unchanged(item: SmallUpload) -> bool:
    node, info = item.existing, item.source
    return (node is not None and info is not None and node.status == "uploaded"
            and node.meta.blocks == item.refs and node.meta.size == _size(item)
            and node.meta.link == item.link
            and node.meta.mtime_ns == info.st_mtime_ns
            and node.meta.mode == stat.S_IMODE(info.st_mode))


async def upload_small(tree: RemoteTree, items: list[SmallUpload], device: str
                       ) -> list[FeedSpan]:
    """Upload ITEMS (each SMALL_FILE bytes or less); results are set on each item.
    Batches overlap (BATCHES_AT_ONCE): one is read and encrypted while another is on the
    wire, and only their ciphertexts are in memory. The feed spans that only these
    uploads filled (own_span): once their nodes are in the mirror, its cursor may pass
    them."""
    secret = tree.keys.content_secret

    def prepare(item: SmallUpload) -> None:
        try:
            _read_and_encrypt(secret, item)
        except CairnAgentError as exc:
            item.error = exc.message

    spans: list[FeedSpan] = []

    async def one_batch(batch: list[SmallUpload]) -> None:
        await run_jobs(batch, prepare, parallel=WORKERS)
        ready = [i for i in batch if i.error is None and not _unchanged(i)]
        if ready:
            span = await _send_batch(tree, ready, device)
            if span is not None:
                spans.append(span)
        for item in batch:
            item._cipher = b""

    await _in_batches(items, one_batch)
    return spans


async def _in_batches(items: list[T], work: Callable[[list[T]], Awaitable[None]]) -> None:
    """WORK on BATCH_FILES items at a time, BATCHES_AT_ONCE batches in flight."""
    limiter = trio.CapacityLimiter(BATCHES_AT_ONCE)

    async def limited(batch: list[T]) -> None:
        async with limiter:
            await work(batch)

    try:
        async with trio.open_nursery() as nursery:
            for start in range(0, len(items), BATCH_FILES):
                nursery.start_soon(limited, items[start:start + BATCH_FILES])
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def _send_batch(tree: RemoteTree, items: list[SmallUpload], device: str
                      ) -> FeedSpan | None:
    """The batch's creates and updates with as many of their blocks inline as fit (API
    1.1: those files are uploaded at once, one change each); what the appliance still
    lacks then goes by POST /blocks. The feed span the batch filled when it holds exactly
    the changes of these items, each complete as its answer says (see own_span)."""
    inline: dict[str, bytes] = {}
    if tree.api.supports(version.INLINE_BATCH_BLOCKS):
        room = BATCH_BYTES
        for item in items:
            if item.refs and len(item._cipher) <= room:
                inline[item.refs[0].id_hex] = item._cipher
                room -= len(item._cipher)
    answer = await tree.api.batch([_operation(item, device) for item in items],
                                  list(inline.items()))
    results = answer.results
    span = own_span(answer)
    wanted: dict[str, bytes] = {}
    for item, result in zip(items, results, strict=True):
        if not result.ok or result.result is None:
            item.error = item_error(result.error)
            continue
        item.node = result.result.node
        for entry in result.result.upload:
            wanted[entry.block_id] = item._cipher
    batch: list[tuple[str, bytes]] = []
    size = 0
    for block_id, cipher in wanted.items():
        if batch and (size + len(cipher) > BATCH_BYTES or len(batch) >= MAX_BATCH_BLOCKS):
            await _post_blocks(tree, batch)
            batch, size = [], 0
        batch.append((block_id, cipher))
        size += len(cipher)
    if batch:
        await _post_blocks(tree, batch)
    for item in items:
        if item.node is not None and item.refs and item.node.status != "uploaded":
            # its one block is now stored
            item.node = item.node.model_copy(update={"status": "uploaded"})
    return span


def own_span(answer: BatchResponse) -> FeedSpan | None:
    """ANSWER's feed span if it is only this batch's doing: one change per operation that
    succeeded (a create or an update records exactly one), each file complete in its
    answer (nothing left to send: the feed will not say more of it). None otherwise — a
    block that completed someone else's upload added a change we did not see, say."""
    span = answer.feed
    done = [r.result for r in answer.results if r.ok and r.result is not None]
    if span is None or span.added != len(done) or any(w.upload for w in done) \
            or any(w.node.status != "uploaded" for w in done):
        return None
    return span


async def _post_blocks(tree: RemoteTree, blocks: list[tuple[str, bytes]]) -> None:
    failed = [r for r in await tree.api.put_blocks(blocks) if not r.ok]
    if failed:
        raise LocalFileError(f"the appliance refused {len(failed)} blocks: "
                             f"{item_error(failed[0].error)}")


# --- downloads -----------------------------------------------------------------------------

@dataclass
class SmallDownload:
    node: RemoteNode
    target: Path
    guard: Callable[[], None]
    error: str | None = None
    disk_full: bool = False
    written: os.stat_result | None = None


def read_requests(sizes: dict[str, int]) -> list[list[str]]:
    """The block ids of SIZES (id -> ciphertext bytes) in `POST /blocks/read` requests of at
    most MAX_BATCH_READ_BYTES each (the appliance refuses what goes over)."""
    requests: list[list[str]] = []
    room = 0
    for block_id, size in sizes.items():
        if not requests or size > room:
            requests.append([])
            room = MAX_BATCH_READ_BYTES
        requests[-1].append(block_id)
        room -= size
    return requests


async def download_small(tree: RemoteTree, items: list[SmallDownload]) -> None:
    """Fetch ITEMS' blocks in batches and write each file; results set on each item."""

    async def one_batch(batch: list[SmallDownload]) -> None:
        wanted = {item.node.meta.blocks[0].id_hex: item.node.meta.blocks[0].cipher_size
                  for item in batch if item.node.meta.blocks}
        blocks: dict[str, bytes] = {}
        for request in read_requests(wanted):
            blocks.update((entry.id, b64decode(entry.data))
                          for entry in await tree.api.read_blocks(request)
                          if entry.data is not None)

        def write(item: SmallDownload) -> None:
            try:
                item.written = _write_file(item, blocks)
            except CairnAgentError as exc:
                item.error = exc.message
                item.disk_full = isinstance(exc, DiskFullError)

        await run_jobs(batch, write, parallel=WORKERS)

    await _in_batches(items, one_batch)
    for folder in {item.target.parent for item in items if item.written is not None}:
        _fsync_folder(folder)


def _write_file(item: SmallDownload, blocks: dict[str, bytes]) -> os.stat_result:
    node = item.node
    if node.meta.link is not None:
        return place_link(node, node.meta.link, item.target, item.guard)
    data = b""
    if node.meta.blocks:
        ref = node.meta.blocks[0]
        cipher = blocks.get(ref.id_hex)
        if cipher is None:
            raise LocalFileError(f"the appliance did not send the block of {node.name}")
        data = decrypt_block(ref, cipher)
    if len(data) != node.meta.size:
        raise IntegrityError(f"{node.name}: the block is not the file's size")
    part = partial_path(item.target, node)
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.fchmod(fd, node.meta.mode & 0o7777)
            os.utime(fd, ns=(node.meta.mtime_ns, node.meta.mtime_ns))
            written = os.fstat(fd)   # as written: an edit right after the rename is new
        finally:
            os.close(fd)
        try:
            item.guard()
        except BaseException:
            os.unlink(part)
            raise
        os.replace(part, item.target)
        return written
    except OSError as exc:
        if os.path.exists(part):
            os.unlink(part)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left to write {item.target}") from None
        raise LocalFileError(f"cannot write {item.target}: {exc.strerror}") from None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
