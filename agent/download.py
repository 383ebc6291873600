"""Downloading a file node to a local path, verified, atomically, resumably.

1. GET /files/{id} gives download URLs in block order. Each must name the block the node's
   (authenticated) metadata lists at that position; otherwise the appliance is serving
   another node's blocks and we stop.
2. Blocks land in a temporary file beside the target, `.NAME.<node>-v<version>.cairn-part`,
   written at their offsets by several workers. Each block is checked — BLAKE3 of the
   ciphertext against its id, the AEAD tag, BLAKE3 of the plaintext against the metadata —
   before a byte of it is written. A block that occurs several times is fetched once.
3. Resumption: if the temporary file exists (an interrupted get of the same version), or the
   target already holds some of the blocks (an older copy of the file), regions whose plain
   hash matches the metadata are kept or copied instead of fetched.
4. Done: fsync, set mode and mtime, rename over the target, fsync the folder. A crash leaves
   the old file intact and, at worst, a temporary file the next get resumes from.

Streaming (`stream=True`, the sync engine, API 1.2): a file another device is still
uploading is fetched as its blocks arrive — the blocks stored so far, then again every
moment, until every block is in — so the two hops (device → appliance → device) overlap
instead of running one after the other. Each block is verified exactly as above, and the
file is renamed into place only once all of them are in; a node that moves on to another
version, or one that gets no new block for STREAM_STALL_S, stops the download (the
temporary file stays for the next try).

LAN peers (`tree.peers`, agent/peers/transfer.py): when the appliance sends block grants
with the URLs and the file has MIN_PEER_BLOCKS or more, the download starts on the
appliance at once while the peers found are asked (HAVE) which blocks they hold; each
answer adds its peer to the fetch plan (agent/peers/fetch.py), which from then on gives
every free worker the block whose best source has room. A block from a peer is checked
exactly like one from the appliance; one that fails drops the peer for this transfer.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import trio

from agent.buffers import thread_buffer
from agent.crypto.blocks import BlockRef, decrypt_block, decrypt_block_into, plain_hash_of
from agent.direct_write import DIRECT_FROM_BYTES, open_direct, write_block
from agent.errors import (
    CairnAgentError,
    DiskFullError,
    FileChangedError,
    ForbiddenError,
    IntegrityError,
    LocalFileError,
    RemoteNotFoundError,
    UploadStalledError,
)
from agent.peers.fetch import APPLIANCE, Assignment, FetchPlan
from agent.peers.peer_client import GRANT_MARGIN_S, PeerClient, index_grants
from agent.peers.transfer import (
    MIN_PEER_BLOCKS,
    PeerAccess,
    limits_for,
    run_plan,
    service_access,
    workers_for,
)
from agent.pipeline import first_error, run_jobs
from agent.progress import Progress
from agent.remote import RemoteNode, RemoteTree
from protocol.models import BlockUrl, NodeDetail
from protocol.version import STORED_BLOCK_URLS

log = logging.getLogger(__name__)

PART_SUFFIX = ".cairn-part"
# Blocks in flight. A download waits mostly on the appliance's reads, so more in flight than
# an upload's 4 pays: 1 GiB took ~16 s with 4 and ~12 s with 6 (8: no faster, more memory).
DOWNLOAD_PARALLEL = 6
STREAM_POLL_S = 0.2          # between two looks at what is stored, for a file of few blocks
STREAM_POLL_PER_BLOCK_S = 0.0005   # ... and this much longer per block (50 GB: ~6.6 s)
STREAM_STALL_S = 60.0        # no new block stored for this long: give up for now
HAVE_GRACE_S = 0.5           # peers' HAVE answers waited for before the appliance starts


@dataclass
class DownloadStats:
    files: int = 0
    bytes: int = 0
    blocks: int = 0
    blocks_fetched: int = 0
    blocks_from_peers: int = 0         # of blocks_fetched, those LAN peers sent
    folders: int = 0
    node: RemoteNode | None = None     # the version written (a newer one than asked, if
                                       # it changed meanwhile)
    written: os.stat_result | None = None   # the file as written, taken before the rename:
                                       # a change right after it is not this download's

    def add(self, other: DownloadStats) -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.blocks += other.blocks
        self.blocks_fetched += other.blocks_fetched
        self.blocks_from_peers += other.blocks_from_peers
        self.folders += other.folders


@dataclass(frozen=True)
class BlockJob:
    ref: BlockRef
    offsets: tuple[int, ...]
    url: str


def partial_path(target: Path, node: RemoteNode) -> Path:
    return target.with_name(f".{target.name}.{node.id[:12]}-v{node.version}{PART_SUFFIX}")


def plan_blocks(node: RemoteNode, urls: list[BlockUrl]) -> list[BlockJob]:
    """One job per distinct block, with every offset it fills. Raises IntegrityError if
    the appliance's list is not the metadata's."""
    refs = node.meta.blocks
    if len(urls) != len(refs):
        raise IntegrityError(f"the appliance lists {len(urls)} blocks for {node.name}, its "
                             f"metadata {len(refs)}: tampered with")
    if any(entry.block_id != ref.id_hex for ref, entry in zip(refs, urls, strict=True)):
        raise IntegrityError(f"the appliance serves other blocks for {node.name} than "
                             "its metadata lists: tampered with")
    return plan_some(node, urls)


def plan_some(node: RemoteNode, urls: list[BlockUrl]) -> list[BlockJob]:
    """Jobs for the distinct blocks of URLS, each with every offset it fills in NODE.
    Raises IntegrityError for a block the metadata does not list."""
    offsets: dict[str, list[int]] = defaultdict(list)
    refs: dict[str, BlockRef] = {}
    position = 0
    for ref in node.meta.blocks:
        offsets[ref.id_hex].append(position)
        refs.setdefault(ref.id_hex, ref)
        position += ref.plain_size
    jobs: dict[str, BlockJob] = {}
    for entry in urls:
        listed = refs.get(entry.block_id)
        if listed is None:
            raise IntegrityError(f"the appliance serves a block for {node.name} that its "
                                 "metadata does not list: tampered with")
        jobs.setdefault(entry.block_id, BlockJob(listed, tuple(offsets[entry.block_id]),
                                                 entry.url))
    return list(jobs.values())


def _region_matches(fd: int, ref: BlockRef, offset: int) -> bytes | None:
    """The plaintext at OFFSET of FD if it is exactly REF's block."""
    try:
        data = os.pread(fd, ref.plain_size, offset)
    except OSError:
        return None
    if len(data) == ref.plain_size and hmac.compare_digest(plain_hash_of(data),
                                                           ref.plain_hash):
        return data
    return None


def _open_existing(path: Path) -> int | None:
    """A descriptor on the file at PATH if one is there (a source of blocks we have; a
    symbolic link there is not followed: what it points to is not ours to read)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)


def _write_error(path: Path, exc: OSError) -> LocalFileError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left to write {path}; free some and run get "
                             "again (it resumes where it stopped)")
    return LocalFileError(f"cannot write {path}: {exc.strerror or exc}")


def place_link(node: RemoteNode, link: str, target: Path,
               guard: Callable[[], None] | None = None) -> os.stat_result:
    """A link node becomes a symbolic link at TARGET (made beside it, then renamed into
    place; never followed). The link's own stat, as made (before the rename)."""
    part = partial_path(target, node)
    try:
        part.unlink(missing_ok=True)
        os.symlink(link, part)
        os.utime(part, ns=(node.meta.mtime_ns, node.meta.mtime_ns), follow_symlinks=False)
        made = os.lstat(part)
        if guard is not None:
            guard()
        os.replace(part, target)
        return made
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise _write_error(target, exc) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise


async def download_file(tree: RemoteTree, node: RemoteNode, target: Path, *,
                        show_progress: bool | None = None,
                        parallel: int = DOWNLOAD_PARALLEL,
                        guard: Callable[[], None] | None = None,
                        stream: bool = False) -> DownloadStats:
    """Download NODE to TARGET. GUARD, if given, runs just before the rename into place
    and may raise to keep the target as it is (the sync engine checks that the local file
    did not change meanwhile); the temporary file is then removed. STREAM: a file still
    being uploaded is fetched as its blocks arrive (see the module's docstring) instead of
    being refused."""
    if node.is_dir:
        raise LocalFileError(f"{node.name} is a folder")
    peers = (tree.peers or service_access()) \
        if len(node.meta.blocks) >= MIN_PEER_BLOCKS else None
    if peers is not None:
        peers.finder.start()     # a short browse runs while the URLs are asked for
    detail = await tree.fetch(node.id)
    if detail.node.version != node.version:
        node = await tree.open(detail.node)   # changed since it was listed
    if node.deleted:
        raise RemoteNotFoundError(f"{node.name} was deleted")
    if node.meta.link is not None:
        return DownloadStats(files=1, bytes=0, blocks=0, node=node,
                             written=place_link(node, node.meta.link, target, guard))
    streaming = detail.method != "GET" and bool(node.meta.blocks)
    if streaming and not (stream and tree.api.supports(STORED_BLOCK_URLS)):
        raise LocalFileError(f"{node.name} is still being uploaded by another device; try "
                             "again when it is complete")
    jobs = [] if streaming else plan_blocks(node, detail.blocks)
    part = partial_path(target, node)
    try:
        resuming = part.exists()
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _write_error(part, exc) from None
    stats = DownloadStats(files=1, bytes=node.meta.size, blocks=len(node.meta.blocks),
                          node=node)
    progress = Progress(node.meta.size, target.name, enabled=show_progress)
    try:
        try:
            os.ftruncate(fd, node.meta.size)
        except OSError as exc:
            raise _write_error(part, exc) from None
        if streaming:
            stats.blocks_fetched = await _stream(tree, node, fd, part, target, resuming,
                                                 progress, parallel)
        else:
            stats.blocks_fetched, stats.blocks_from_peers = await _fetch(
                tree, node, jobs, fd, part, target, resuming, progress, parallel,
                peers=peers, grants=detail.peer_grants)
            if stats.blocks_from_peers:
                log.info("%s: %d of %d blocks from peers", node.name,
                         stats.blocks_from_peers, stats.blocks_fetched)
        stats.written = _finish(fd, part, target, node, guard)
    finally:
        progress.close()
        os.close(fd)
    return stats


async def _stream(tree: RemoteTree, node: RemoteNode, fd: int, part: Path, target: Path,
                  resuming: bool, progress: Progress, parallel: int) -> int:
    """Fetch the blocks of NODE, still being uploaded, as they are stored: how many came
    over the network. Raises FileChangedError if the node moved on to another version,
    RemoteNotFoundError if it was deleted, UploadStalledError if nothing new was stored for
    STREAM_STALL_S."""
    left = {ref.id_hex for ref in node.meta.blocks}
    interval = STREAM_POLL_S + STREAM_POLL_PER_BLOCK_S * len(node.meta.blocks)
    fetched = 0
    last_news = trio.current_time()

    async def look() -> NodeDetail:
        detail = await tree.api.stored_urls(node.id)
        if detail.node.deleted:
            raise RemoteNotFoundError(f"{node.name} was deleted")
        if detail.node.version != node.version:
            raise FileChangedError(f"{node.name} changed again while it was fetched")
        return detail

    while left:
        detail = await look()
        jobs = [job for job in plan_some(node, detail.blocks) if job.ref.id_hex in left]
        if jobs:
            fetched += (await _fetch(tree, node, jobs, fd, part, target, resuming,
                                     progress, parallel, refresh=look))[0]
            left.difference_update(job.ref.id_hex for job in jobs)
            last_news = trio.current_time()
        elif trio.current_time() - last_news > STREAM_STALL_S:
            raise UploadStalledError(f"{node.name} is still being uploaded by another "
                                     "device and no new part of it arrived for "
                                     f"{STREAM_STALL_S:.0f} s; it is fetched once it is "
                                     "complete")
        if left:
            await trio.sleep(interval)
    return fetched


class _Placed(NamedTuple):
    size: int          # plaintext bytes written (the block times its offsets)
    fetched: bool      # came over the network (not found on disk)


async def _fetch(tree: RemoteTree, node: RemoteNode, jobs: list[BlockJob], fd: int,
                 part: Path, target: Path, resuming: bool, progress: Progress,
                 parallel: int,
                 refresh: Callable[[], Awaitable[NodeDetail]] | None = None, *,
                 peers: PeerAccess | None = None, grants: list[str] | None = None
                 ) -> tuple[int, int]:
    """Fetch and place JOBS: how many came over the network, and how many of those from
    LAN peers (PEERS, with the node's GRANTS). REFRESH gives fresh URLs (default: the
    node's detail) when one expired."""
    connection = tree.connection
    try:
        old_fd: int | None = _open_existing(target)
    except OSError:
        old_fd = None
    fresh_urls: dict[str, str] = {}
    try:
        direct_fd = open_direct(part) if any(job.ref.plain_size >= DIRECT_FROM_BYTES
                                             for job in jobs) else None
    except OSError:
        direct_fd = None

    clients: dict[str, PeerClient] = {}
    grant_of: dict[str, str] = {}
    grants_until = [float("inf")]     # when the first grant in GRANT_OF expires
    grant_lock = threading.Lock()

    def grant_for(block_id: str) -> str:
        """BLOCK_ID's grant, all of them renewed (with the URLs) shortly before the
        first expires: a download longer than GRANT_LIFETIME_S keeps its peers."""
        with grant_lock:
            identity = peers.identity() if peers is not None else None
            if identity is not None and time.time() + GRANT_MARGIN_S >= grants_until[0]:
                detail = trio.from_thread.run(refresh) if refresh is not None \
                    else trio.from_thread.run(tree.fetch, node.id)
                fresh_urls.update({e.block_id: e.url for e in detail.blocks})
                renewed, grants_until[0] = index_grants(detail.peer_grants, identity,
                                                        time.time())
                grant_of.update(renewed)
            return grant_of[block_id]

    def obtain(job: BlockJob, origin: str = APPLIANCE) -> tuple[bytes | memoryview, bool]:
        """The block's plaintext and whether it came over the network (from ORIGIN: the
        appliance, or a peer named in CLIENTS; a peer's wrong bytes raise
        IntegrityError, which drops that peer)."""
        for source, offsets in ((fd if resuming else None, job.offsets),
                                (old_fd, job.offsets)):
            if source is None:
                continue
            for offset in offsets:
                data = _region_matches(source, job.ref, offset)
                if data is not None:
                    return data, False
        big = job.ref.plain_size >= DIRECT_FROM_BYTES

        def get(url: str) -> bytes | memoryview:   # a big block: into this thread's buffer
            return connection.get_block_into(url, partial(thread_buffer, use="cipher")) \
                if big else connection.get_block(url)

        try:
            if origin != APPLIANCE:
                ciphertext = clients[origin].block(
                    job.ref.id_hex, grant_for(job.ref.id_hex),
                    partial(thread_buffer, use="cipher") if big else None)
            else:
                ciphertext = get(fresh_urls.get(job.ref.id_hex, job.url))
        except ForbiddenError:   # expired during a long download, or access revoked
            detail = trio.from_thread.run(refresh) if refresh is not None \
                else trio.from_thread.run(tree.fetch, node.id)
            fresh_urls.update({e.block_id: e.url for e in detail.blocks})
            ciphertext = get(fresh_urls[job.ref.id_hex])
        if big:   # decrypted into this thread's aligned buffer, written from it directly
            return decrypt_block_into(job.ref, ciphertext,
                                      thread_buffer(job.ref.plain_size, "plain")), True
        return decrypt_block(job.ref, bytes(ciphertext)), True

    def place(job: BlockJob, origin: str = APPLIANCE) -> _Placed:
        plaintext, fetched = obtain(job, origin)
        # Only a thread buffer is aligned for O_DIRECT; bytes (a small block, or a region
        # kept from a partial file) go through the page cache.
        direct = direct_fd if isinstance(plaintext, memoryview) else None
        try:
            for offset in job.offsets:
                write_block(fd, direct, plaintext, offset)
        except OSError as exc:
            raise _write_error(part, exc) from None
        return _Placed(len(plaintext) * len(job.offsets), fetched)

    fetched_count = 0

    def done(job: BlockJob, result: _Placed) -> None:
        nonlocal fetched_count
        progress.advance(result.size)
        fetched_count += result.fetched

    from_peers = 0
    try:
        if peers is not None and grants and len(jobs) >= MIN_PEER_BLOCKS:
            from_peers = await _fetch_with_peers(peers, grants, jobs, parallel, place,
                                                 done, clients, grant_of, grants_until)
        else:
            await run_jobs(jobs, place, parallel=parallel, done=done)
    finally:
        for extra in (old_fd, direct_fd):
            if extra is not None:
                os.close(extra)
    return fetched_count, from_peers


async def _fetch_with_peers(peers: PeerAccess, grants: list[str], jobs: list[BlockJob],
                            parallel: int, place: Callable[[BlockJob, str], _Placed],
                            done: Callable[[BlockJob, _Placed], None],
                            clients: dict[str, PeerClient], grant_of: dict[str, str],
                            grants_until: list[float]) -> int:
    """Fetch JOBS from the appliance and the peers PEERS finds at once (fills CLIENTS
    and GRANT_OF for PLACE, and GRANTS_UNTIL[0]: when the first grant expires): how many
    blocks came from peers. The appliance starts once
    every peer answered HAVE, or after HAVE_GRACE_S (a silent peer costs no more); a
    peer answering later joins the plan then."""
    identity = peers.identity()
    found = await peers.clients() if identity is not None else []
    if identity is not None:
        covering, grants_until[0] = index_grants(grants, identity, time.time())
        grant_of.update(covering)
    by_id = {job.ref.id_hex: job for job in jobs}
    asked = [block for block in by_id if block in grant_of]
    if not found or not asked:
        await run_jobs(jobs, lambda job: place(job, APPLIANCE), parallel=parallel,
                       done=done)
        return 0
    plan = FetchPlan(list(by_id), {}, limits_for(parallel), now=trio.current_time())

    unanswered = len(found)
    all_answered = trio.Event()

    async def ask(client: PeerClient) -> None:
        nonlocal unanswered
        try:
            held = await trio.to_thread.run_sync(client.have, asked, grant_of,
                                                 abandon_on_cancel=True)
        except CairnAgentError as exc:
            log.info("peer not used: %s", exc.message)
            held = set()
        finally:
            unanswered -= 1
            if not unanswered:
                all_answered.set()
        if held and client.name not in clients:
            clients[client.name] = client
            plan.add_peer(client.name, held, trio.current_time())
            log.debug("%s holds %d of %d blocks", client.name, len(held), len(asked))

    def work(assignment: Assignment) -> _Placed:
        return place(by_id[assignment.block_id], assignment.source)

    try:
        async with trio.open_nursery() as nursery:
            for client in found:
                nursery.start_soon(ask, client)
            with trio.move_on_after(HAVE_GRACE_S):   # a LAN answers in milliseconds
                await all_answered.wait()
            await run_plan(plan, work, workers=workers_for(len(found), parallel),
                           done=lambda assignment, result: done(
                               by_id[assignment.block_id], result))
            nursery.cancel_scope.cancel()      # a HAVE still unanswered is not waited for
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return plan.blocks_from_peers


def _finish(fd: int, part: Path, target: Path, node: RemoteNode,
            guard: Callable[[], None] | None) -> os.stat_result:
    """Rename the complete temporary file into place; its stat as written (the rename
    keeps inode, size, mode and mtime)."""
    try:
        os.fsync(fd)
        os.fchmod(fd, node.meta.mode & 0o7777)
        os.utime(fd, ns=(node.meta.mtime_ns, node.meta.mtime_ns))
        written = os.fstat(fd)
        if guard is not None:
            try:
                guard()
            except BaseException:
                os.unlink(part)
                raise
        os.replace(part, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise _write_error(target, exc) from None
    return written



