"""Garbage collection while serving: purge tombstoned nodes and delete unreferenced blocks
once the grace period has passed (the steps and their safety are in appliance.meta.gc)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from appliance.locks import KeyedLocks
from appliance.meta import gc
from appliance.meta.database import Metadata
from appliance.storage.async_store import AsyncBlockStore

log = logging.getLogger(__name__)
BATCH = 500


@dataclass
class GcReport:
    nodes_purged: int = 0
    blocks_deleted: int = 0


async def collect_garbage(meta: Metadata, store: AsyncBlockStore, locks: KeyedLocks,
                          grace_s: float, now: float | None = None) -> GcReport:
    cutoff = (time.time() if now is None else now) - grace_s
    report = GcReport()
    while True:
        purged = await meta.write(lambda db: gc.purge_deleted_nodes(db, cutoff, BATCH))
        report.nodes_purged += purged
        if purged < BATCH:
            break
    seen: set[str] = set()
    while True:
        candidates = [b for b in await meta.read(
            lambda db: gc.unreferenced_blocks(db, cutoff, BATCH)) if b not in seen]
        if not candidates:
            break
        for block_id in candidates:
            seen.add(block_id)
            async with locks.hold(block_id):
                if not await meta.write(lambda db, b=block_id: gc.claim_block(  # type: ignore[misc]
                        db, b, cutoff)):
                    continue
                await store.delete(block_id)
                await meta.write(lambda db, b=block_id: gc.forget_block(db, b))  # type: ignore[misc]
                report.blocks_deleted += 1
    return report


async def run_gc_loop(meta: Metadata, store: AsyncBlockStore, locks: KeyedLocks,
                      grace_s: float, interval_s: float) -> None:
    while True:
        await trio.sleep(interval_s)
        try:
            report = await collect_garbage(meta, store, locks, grace_s)
        except Exception:
            log.exception("garbage collection failed; trying again in %.0f s", interval_s)
            continue
        if report.nodes_purged or report.blocks_deleted:
            log.info("garbage collection: %d deleted nodes purged, %d blocks deleted",
                     report.nodes_purged, report.blocks_deleted)
