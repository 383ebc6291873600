"""Background upkeep while the appliance serves: prompt repair of blocks queued as degraded,
and a full scrub every `full_scrub_interval_s`, both at a bounded rate so that users' reads
and writes keep the disks. Runs until cancelled; each step runs in a worker thread."""

from __future__ import annotations

import itertools
import logging
import time

import trio

from appliance.storage.async_store import AsyncBlockStore
from appliance.storage.scrub import Scrubber, ScrubReport

log = logging.getLogger(__name__)
REPAIR_POLL_S = 5.0
FIRST_SCRUB_DELAY_S = 600.0  # a fresh appliance scrubs first after ten quiet minutes
SCAN_BATCH = 64


def pause_needed(bytes_done: int, elapsed_s: float, rate_bytes_per_s: float) -> float:
    """Seconds to sleep so that `bytes_done` over the elapsed time stays within the rate."""
    if rate_bytes_per_s <= 0:
        return 0.0
    return max(0.0, bytes_done / rate_bytes_per_s - elapsed_s)


def next_scrub_delay(last_finished: float | None, now: float, interval_s: float) -> float:
    if last_finished is None:
        return FIRST_SCRUB_DELAY_S
    return max(0.0, last_finished + interval_s - now)


async def run_maintenance(store: AsyncBlockStore, *, rate_bytes_per_s: float,
                          full_scrub_interval_s: float) -> None:
    scrubber = Scrubber(store.store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_repair_loop, store, scrubber, rate_bytes_per_s)
        nursery.start_soon(_scrub_loop, store, scrubber, rate_bytes_per_s,
                           full_scrub_interval_s)


async def _repair_loop(store: AsyncBlockStore, scrubber: Scrubber, rate: float) -> None:
    queue = store.store.repair_queue
    if queue is None:
        return
    while True:
        pending = await store.run_sync(lambda: queue.pending(limit=SCAN_BATCH))
        started, done = time.monotonic(), 0
        for block_id in pending:
            result = await store.run_sync(lambda b=block_id: scrubber.check(b))  # type: ignore[misc]
            done += result.bytes_read
            log.info("repair of %s: %s", block_id[:16], result.outcome.value)
            await trio.sleep(pause_needed(done, time.monotonic() - started, rate))
        if len(pending) < SCAN_BATCH:
            await trio.sleep(REPAIR_POLL_S)


async def _scrub_loop(store: AsyncBlockStore, scrubber: Scrubber, rate: float,
                      interval_s: float) -> None:
    queue = store.store.repair_queue
    while True:
        last = await store.run_sync(queue.last_scrub_finished) if queue else None
        await trio.sleep(next_scrub_delay(last, time.time(), interval_s))
        report = await scrub_in_background(store, scrubber, rate)
        log.info("background scrub: %s", report.summary())


async def scrub_in_background(store: AsyncBlockStore, scrubber: Scrubber,
                              rate: float) -> ScrubReport:
    queue = store.store.repair_queue
    run_id = await store.run_sync(queue.scrub_started) if queue else None
    report = ScrubReport()
    report.formatted_disks = await store.run_sync(store.store.format_blank_disks)
    started = time.monotonic()
    blocks = store.store.iter_block_ids(remove_stale_temp_files=True)
    while batch := await store.run_sync(lambda: list(itertools.islice(blocks, SCAN_BATCH))):
        for block_id in batch:
            report.add(block_id, await store.run_sync(lambda b=block_id: scrubber.check(b)))  # type: ignore[misc]
            await trio.sleep(pause_needed(report.bytes_verified,
                                          time.monotonic() - started, rate))
    report.seconds = time.monotonic() - started
    if queue is not None and run_id is not None:
        rid = run_id
        await store.run_sync(lambda: queue.scrub_finished(
            rid, report.checked, report.repaired, report.unrecoverable))
    return report
