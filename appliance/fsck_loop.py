"""fsck in the serving appliance: the database checks on a schedule, and a whole run with
the server's per-block locks.

- `run_fsck_loop` runs the checks that read only the database (appliance.fsck.
  run_cheap_checks: dangling rows, reference counts, node status and pending rows) every
  `interval_s` — daily by default, the first FIRST_RUN_DELAY_S after start, so a restart
  after a crash is checked soon — and logs what it finds. It repairs nothing: a wrong count
  or an `uploaded` node lacking a block is a bug or damage a person should see, and
  `cairnd fsck --repair` is one command away. The store checks (every referenced block's
  shards, orphans) read every disk and are left to `cairnd fsck` and scrub.
- `TrioBlockGuard` lets `run_fsck`, blocking in a worker thread, take the same per-block
  lock (appliance.locks.KeyedLocks) that the block routes and GC hold around a block's
  store write and commit, so that fsck's store actions never interleave with theirs.
- `run_fsck_in_server` is a whole run on the server's own database and store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import trio

from appliance.fsck import Progress, run_cheap_checks, run_fsck
from appliance.fsck_report import FsckReport
from appliance.locks import KeyedLocks
from appliance.meta.database import Metadata
from appliance.meta.gc import DEFAULT_GRACE_S
from appliance.storage.async_store import AsyncBlockStore

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_INTERVAL_S = 24 * 3600.0
FIRST_RUN_DELAY_S = 15 * 60.0
LOGGED_FINDINGS = 20


class TrioBlockGuard:
    """A BlockGuard (appliance.fsck) for a run in a trio worker thread: each guarded step
    runs while a task on the event loop holds the block's lock in LOCKS — trio locks
    belong to a task, so the task takes it and runs the step in another worker thread."""

    def __init__(self, locks: KeyedLocks,
                 token: trio.lowlevel.TrioToken | None = None) -> None:
        self.locks = locks
        self.token = token   # None: the calling thread was started by trio.to_thread

    def __call__(self, block_id: str, work: Callable[[], T]) -> T:
        async def held() -> T:
            async with self.locks.hold(block_id):
                return await trio.to_thread.run_sync(work)

        return trio.from_thread.run(held, trio_token=self.token)


async def run_fsck_in_server(meta: Metadata, store: AsyncBlockStore, locks: KeyedLocks, *,
                             grace_s: float, repair: bool = False, verify: bool = False,
                             progress: Progress | None = None) -> FsckReport:
    """A whole fsck on the serving appliance's database and store, in a worker thread,
    its store actions under the server's block locks. Whatever PROGRESS raises stops it."""
    return await trio.to_thread.run_sync(partial(
        run_fsck, meta, store.store, grace_s=grace_s, repair=repair, verify=verify,
        progress=progress, guard=TrioBlockGuard(locks)))


def log_report(report: FsckReport) -> None:
    if report.clean:
        log.info("database check: %s", report.summary())
        return
    log.warning("database check: %s\n(`cairnd fsck` checks the store too; "
                "`cairnd fsck --repair` repairs)", report.summary())


async def run_fsck_loop(meta: Metadata, store: AsyncBlockStore,
                        interval_s: float = DEFAULT_INTERVAL_S, *,
                        grace_s: float = DEFAULT_GRACE_S,
                        first_delay_s: float = FIRST_RUN_DELAY_S) -> None:
    """Run the database checks every INTERVAL_S (the first after FIRST_DELAY_S) until
    cancelled, in the store's worker threads (bounded with the rest of its work); a
    failed run is logged and the next one comes at its time."""
    delay = first_delay_s
    while True:
        await trio.sleep(delay)
        delay = interval_s
        try:
            report = await store.run_sync(partial(run_cheap_checks, meta, grace_s=grace_s))
        except Exception:
            log.exception("database check failed; the next one in %.0f s", interval_s)
            continue
        log_report(report)
