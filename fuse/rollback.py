"""The drive after the appliance lost recent history: what this device wrote is sent again.

An appliance recovered from an older copy of its database (agent/sync/rollback.py) lacks
what was committed after the copy. The drive's mirror (agent/sync/mirror.py) notices, lists
the tree again and shows what the appliance has now — no ghost of a lost node. What the
drive itself had written in the lost window would then be gone from the mount too; but its
blocks are usually still in the block cache (ciphertext, kept as they are uploaded), and
the mirror still holds each node's key and metadata until the new listing replaces them.
So, before the listing is written, each such node becomes a pending change again, as if it
had just been written through the mount: its content decrypted from the cache into the
staging area, the same id and key (a node the appliance lost is made again as it was; one
it has at an older version gets this content as its next version), and the uploader sends
it the usual way — a folder before what is in it, a conflict settled as for any change.

Only what this device wrote (the metadata names the device) and only what the cache still
holds whole: a file written elsewhere is for its own device to send again (a `cairn sync`
does); a file whose blocks left the cache cannot be sent and is named in the log. A node
with a pending change of its own is left to that change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from agent.blockcache import BlockCache
from agent.crypto.blocks import decrypt_block
from agent.crypto.nodes import NodeMeta
from agent.errors import CacheFullError, CairnAgentError
from agent.sync.mirror import open_row
from agent.sync.model import RemoteEntry
from agent.sync.rollback import Rollback
from agent.sync.state import RemoteRow
from fuse.index import DriveIndex, Pending
from fuse.staging import Staging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resend:
    """A node this device wrote that the appliance lost (BASE_VERSION None) or has at an
    older version (BASE_VERSION: that version)."""

    row: RemoteRow
    base_version: int | None


def to_resend(old: Iterable[RemoteRow], listed: Mapping[str, RemoteEntry], root_id: str,
              device: str, pending: Callable[[str], bool]) -> tuple[list[Resend], list[str]]:
    """Of the mirror's rows OLD before the listing LISTED, what this DEVICE wrote and the
    appliance lacks, folders before what they hold; and the names of those that cannot be
    placed (their folder is lost and not this device's to make again). PENDING: whether a
    node has a pending change of its own (left to it). Pure."""
    rows = {row.node_id: row for row in old}
    chosen: dict[str, Resend] = {}
    for row in rows.values():
        if row.node_id == root_id or row.device != device or pending(row.node_id):
            continue
        now = listed.get(row.node_id)
        if now is None:
            chosen[row.node_id] = Resend(row, None)
        elif row.kind == "file" and now.version < row.version and now.content != row.content:
            chosen[row.node_id] = Resend(row, now.version)

    def depth(node_id: str) -> int:
        seen = 0
        while node_id in rows and seen < 10_000:
            node_id, seen = rows[node_id].parent_id or "", seen + 1
        return seen

    placed: list[Resend] = []
    unplaced: list[str] = []
    for resend in sorted(chosen.values(), key=lambda r: (r.row.kind != "dir",
                                                         depth(r.row.node_id))):
        parent = resend.row.parent_id or ""
        if parent == root_id or parent in listed or parent in {p.row.node_id for p in placed
                                                                if p.row.kind == "dir"}:
            placed.append(resend)
        else:
            unplaced.append(resend.row.name)
    return placed, unplaced


def _decrypt_into(cache: BlockCache, meta: NodeMeta, temp: Path) -> bool:
    """META's content, from the cache's blocks, into TEMP; False (nothing left) if a block
    is not there any more."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        offset = 0
        for ref in meta.blocks:
            cipher = cache.get(ref.id_hex)
            if cipher is None:
                raise LookupError(ref.id_hex)
            plain = decrypt_block(ref, cipher)
            os.pwrite(fd, plain, offset)
            offset += len(plain)
        os.fsync(fd)
    except (LookupError, CairnAgentError, OSError):
        os.close(fd)
        temp.unlink(missing_ok=True)
        return False
    os.close(fd)
    return True


def resender(index: DriveIndex, staging: Staging, cache: BlockCache, root_id: str,
             folder: int, device: str, wake: Callable[[], None]
             ) -> Callable[[Rollback, Mapping[str, RemoteEntry]],
                           Awaitable[Callable[[], None]]]:
    """The drive's `Mirror.on_rollback`: stage what this device wrote and the appliance
    lost (awaited before the listing is written), and return what records it as pending
    changes (run in the listing's transaction) and wakes the uploader (WAKE)."""

    async def prepare(rollback: Rollback, listed: Mapping[str, RemoteEntry]
                      ) -> Callable[[], None]:
        old = index.sync_db.remote_rows(folder)
        chosen, unplaced = to_resend(old, listed, root_id, device,
                                     lambda node_id: index.pending(node_id) is not None)
        staged: list[tuple[Resend, NodeMeta, Path | None]] = []
        missing: list[str] = list(unplaced)
        for resend in chosen:
            meta = open_row(resend.row)
            if resend.row.kind == "dir" or meta.link is not None:
                staged.append((resend, meta, None))
                continue
            temp = staging.temp_path(resend.row.node_id)
            if await trio.to_thread.run_sync(_decrypt_into, cache, meta, temp):
                staged.append((resend, meta, temp))
            else:
                missing.append(resend.row.name)
        if missing:
            log.warning("cannot send again what the appliance lost of: %s (its content is "
                        "no longer in the cache or its folder is gone)",
                        ", ".join(sorted(missing)[:20]))

        def settle() -> None:
            sent = 0
            for resend, meta, temp in staged:
                row = resend.row
                if temp is not None:
                    try:
                        staging.adopt(row.node_id, temp)
                    except CacheFullError:
                        temp.unlink(missing_ok=True)
                        log.warning("cannot send %s again: the cache is full", row.name)
                        continue
                index.put_pending(Pending(
                    row.node_id, row.parent_id or root_id, row.name, row.kind, meta.size,
                    meta.mtime_ns, meta.mode, resend.base_version, temp is not None, False,
                    row.key, row.created_at, 0.0, 0, 0, "dirty", "", meta.link))
                sent += 1
            if sent:
                log.warning("the appliance lost %d item(s) written here: sending them "
                            "again", sent)
                wake()

        return settle

    return prepare
