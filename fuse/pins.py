"""Pinned files stay available offline: their blocks are fetched into the cache and pinned
there (never evicted), and unpinned when the pin goes or the file changes.

A pin is recorded on a node (`cairn pin PATH`, through the mount's `user.cairn.pin`
attribute) and covers everything under it, including files added later. The pinner keeps
one pin in the cache per block that some pinned file needs (`pin_blocks` in drive.db): at
each round it walks the pinned subtrees, pins and fetches what is newly needed, and
unpins what no pinned file needs any more (an old version, an unpinned folder).
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from agent.blockcache import BlockCache
from agent.crypto.blocks import BlockRef
from agent.errors import CacheFullError, CairnAgentError
from fuse.blocks import BlockSource
from fuse.index import DriveIndex

log = logging.getLogger("cairn.drive")

SCHEMA = "CREATE TABLE IF NOT EXISTS pin_blocks (block_id TEXT PRIMARY KEY);"
RETRY_S = 30.0


class Pinner:
    def __init__(self, index: DriveIndex, cache: BlockCache, blocks: BlockSource) -> None:
        self.index = index
        self.cache = cache
        self.blocks = blocks
        self.index.db.execute(SCHEMA)
        self._wake = trio.Event()
        self.missing = 0           # blocks wanted pinned and not here yet

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
                wait = RETRY_S if self.missing else 3600.0
            except CairnAgentError as exc:
                log.info("pinning waits: %s", exc.message)
                wait = RETRY_S
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()

    def wanted(self) -> dict[str, tuple[str, int, BlockRef]]:
        """block id -> (node id, version, ref) for every block a pinned file needs."""
        wanted: dict[str, tuple[str, int, BlockRef]] = {}
        todo = list(self.index.pinned_ids())
        seen: set[str] = set()
        while todo:
            node_id = todo.pop()
            if node_id in seen:
                continue
            seen.add(node_id)
            entry = self.index.entry(node_id)
            if entry is None:
                continue
            if entry.is_dir:
                todo.extend(child.node_id for child in
                            self.index.children(node_id).values())
                continue
            opened = self.index.remote_meta(node_id)
            if entry.staged or opened is None or entry.version is None:
                continue           # staged content stays local until it is uploaded
            for ref in opened[1].blocks:
                wanted.setdefault(ref.id_hex, (node_id, entry.version, ref))
        return wanted

    async def reconcile(self) -> None:
        wanted = self.wanted()
        held = {row[0] for row in self.index.db.execute("SELECT block_id FROM pin_blocks")}
        gone = held - set(wanted)
        if gone:
            self.cache.unpin(gone)
            with self.index.transaction():
                for block_id in gone:
                    self.index.db.execute("DELETE FROM pin_blocks WHERE block_id = ?",
                                          (block_id,))
        new = [block_id for block_id in wanted if block_id not in held]
        self.missing = 0
        for block_id in new:
            if not self.cache.pin([block_id]):
                self._record(block_id)
                continue
            node_id, version, _ = wanted[block_id]
            try:
                data = await self.blocks.fetch_cipher(node_id, version, block_id)
                await trio.to_thread.run_sync(partial(self.cache.put, block_id, data,
                                                      pin=True))
            except CacheFullError as exc:
                log.warning("cannot pin more: %s", exc.message)
                self.missing += 1
                continue
            except CairnAgentError:
                self.missing += 1
                raise
            self._record(block_id)

    def _record(self, block_id: str) -> None:
        self.index.db.execute("INSERT OR IGNORE INTO pin_blocks (block_id) VALUES (?)",
                              (block_id,))
