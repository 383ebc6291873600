"""The sync engine: the loop that wakes rounds, and the round itself.

Wake-ups: the local watcher (inotify, debounced; agent/sync/watch.py); the appliance's event
stream or, when it is down or the folder is quiet, polling (agent/sync/follow.py); and the
timers of agent/sync/schedule.py (a file settling, retries with backoff, held downloads,
rechecks, the rescan every RESCAN_S, which walks and plans everything).

A round pulls the changes feed into the mirror, scans DIR, and runs planner phases
(plan → check safety → execute → rescan) until the plan is empty; what the executor
writes it takes into the mirror itself. A plan looks only at
the paths out of sync at the last plan and those touched since (agent/sync/scope.py).
Local edits never wait for the appliance: they are in the local tree, and the diff
against the base *is* the queue, kept across restarts. The safety stops (agent/sync/
rules.py; nothing is deleted while paused): DIR missing, unreadable or suddenly empty;
the remote folder deleted; a mass deletion (more than MASS_DELETE_SHARE of the synced
files, at least MASS_DELETE_MIN) until restarted with --allow-mass-delete; a full disk
holds downloads back (uploads go on), retried every DISK_RETRY_S.

When the appliance lost history (recovered from an older copy of its database: another
epoch, or a cursor above its newest; noticed by the mirror), the tree is listed again and
the base re-based on it in the same transaction (agent/sync/rollback.py), so the next plan
sends what this device holds and the appliance lacks instead of deleting it here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from agent.errors import (
    CairnAgentError,
    LocalFileError,
    RemoteNotFoundError,
    TransportError,
)
from agent.remote import RemoteTree
from agent.sync import rules
from agent.sync.executor import Executor, Outcome
from agent.sync.folders import (
    describe,
    open_folder,
    remake_remote_folder,
    remove_stale_parts,
)
from agent.sync.follow import Follower
from agent.sync.ignore import IgnoreRules
from agent.sync.local import LocalTree
from agent.sync.mirror import Mirror
from agent.sync.model import (
    BaseEntry,
    Download,
    KeepBoth,
    RemoteEntry,
    Upload,
    is_within,
)
from agent.sync.planner import Plan, plan
from agent.sync.rollback import Rollback, fresh_edits, missing_from, rebase
from agent.sync.scan import (
    LocalScan,
    is_dir,
)
from agent.sync.schedule import RESCAN_S
from agent.sync.scope import Trees, pending_of, plan_touched
from agent.sync.shared import SharedMirror
from agent.sync.shared_plan import SHARED_FOLDER
from agent.sync.state import FolderRecord, SyncDb
from agent.sync.wakeups import Wakeups
from agent.sync.watch import watch_changes

__all__ = ["MASS_DELETE_MIN", "MASS_DELETE_SHARE", "Paused", "SyncEngine", "SyncOptions",
           "describe", "open_folder"]

log = logging.getLogger("cairn.sync")

DISK_RETRY_S = 30.0
BUSY_RETRY_S = 1.0
FAILED_RETRY_S = 5.0
SETTLE_MARGIN_S = 0.005   # a settle timer fires this long after the file is stable (a
                          # timer that fires early only costs a round that sets another)
MAX_PHASES = 60
MASS_DELETE_SHARE = 0.5
MASS_DELETE_MIN = 10


@dataclass(frozen=True)
class SyncOptions:
    allow_mass_delete: bool = False
    mass_delete_share: float = MASS_DELETE_SHARE
    mass_delete_min: int = MASS_DELETE_MIN
    once: bool = False            # one round, then return (tests, scripts)
    disk_retry_s: float = float(os.environ.get("CAIRN_SYNC_DISK_RETRY_S", DISK_RETRY_S))


class Paused(CairnAgentError):
    code = "paused"


class SyncEngine:
    def __init__(self, tree: RemoteTree, db: SyncDb, folder: FolderRecord,
                 options: SyncOptions) -> None:
        self.tree = tree
        self.db = db
        self.folder = folder
        self.root = Path(folder.local_dir)
        self.options = options
        self.mirror = Mirror(tree, db, folder)
        self.mirror.on_rollback = self._rebase
        self.device_name = tree.connection.device.device_name
        self.shared = SharedMirror(tree, db, folder.id, self.root, self.device_name)
        self._shares_seen = -1
        self.wakeups = Wakeups()
        self.schedule = self.wakeups.schedule
        self._cleaned_parts = False
        self._local_activity = 0
        self._last_status: tuple[str, str, int, int] | None = None
        self.local = LocalTree(self.root, db, folder.id)
        self._settled: rules.Quiet | None = None   # what the last idle round saw
        self._shared_touched = False     # the watcher saw a change in Shared with me
        self._pending: set[str] | None = None   # out of sync at the last plan; None: plan
                                                # everything next time
        self.follower: Follower | None = None     # None: no stream (one round, tests)
        self._pull_next = True           # pull even if the stream announced nothing new:
                                         # at first, after a failure, on the rescan
        self.last_outcome = Outcome()
        self.rounds = 0
        # Folders the appliance lost with recent history (path -> their id): made again
        # with the same id, so devices making them at once meet (409) instead of making
        # two folders of one name.
        self._lost_folders: dict[str, str] = {}

    # --- wake-ups -----------------------------------------------------------------------

    def wake(self) -> None:
        self.wakeups.wake()

    def wake_in(self, reason: str, seconds: float) -> None:
        self.wakeups.wake_in(reason, seconds)

    @property
    def _next_wake_at(self) -> float:
        """When the first timer is due (for tests that drive rounds one by one)."""
        return self.schedule.due()

    @_next_wake_at.setter
    def _next_wake_at(self, when: float) -> None:
        """Take off the timers due by WHEN, as if they had fired."""
        self.schedule.fire(when)

    def _downloads_held(self) -> bool:
        return self.schedule.downloads_held(trio.current_time())

    async def run(self) -> None:
        if self.options.once:
            await self.sync_round()
            return
        self.follower = Follower(self.tree, self.mirror, self.wake,
                                 lambda: self._local_activity)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_local)
            nursery.start_soon(self.follower.run)
            await self._loop()

    async def _loop(self) -> None:
        self.wake_in("rescan", RESCAN_S)
        self.wake()
        while True:
            if "rescan" in await self.wakeups.next():
                self._shares_seen = -1          # list the shares again,
                self.local.dirty = None         # walk the whole folder
                self._settled = self._pending = None    # and plan everything (the oracle)
                self._pull_next = True                  # and pull whatever was announced
                self.mirror.check_next = True           # (in the same history?)
                self.wake_in("rescan", RESCAN_S)
            try:
                await self.sync_round()
                self.schedule.round_done()
            except TransportError as exc:
                self.mirror.check_next = True   # it may come back recovered from a copy
                self._status("offline", exc.message)
                delay = self.schedule.round_failed(trio.current_time())
                log.warning("offline: %s (retrying in %.0f s; local changes are kept)",
                            exc.message, delay)
            except CairnAgentError as exc:      # the appliance refused something: retry
                self._status("error", exc.message)
                delay = self.schedule.round_failed(trio.current_time(), refused=True)
                log.error("%s (retrying in %.0f s)", exc.message, delay)

    async def _watch_local(self) -> None:
        while True:
            if is_dir(self.root):
                async for paths in watch_changes(self.root,
                                                 lambda: IgnoreRules.load(self.root)):
                    self._local_activity += 1
                    self._mark(paths)
                    self.wake()
            self.local.dirty = None
            await trio.sleep(2)      # the folder vanished (or the watcher stopped): retry
            self.wake()

    # --- a round ------------------------------------------------------------------------

    async def sync_round(self) -> Outcome:
        """Bring both sides together as far as possible now. Raises TransportError when
        the appliance cannot be reached (local state is untouched)."""
        self.rounds += 1
        total = Outcome()
        try:
            for phase in range(MAX_PHASES):
                if self._pull_next or (phase == 0 and self._must_pull()):
                    # Once a round: the executor takes its own writes into the mirror,
                    # and a change from elsewhere meanwhile is announced by the stream and
                    # wakes the next round, which pulls it (every write names its base
                    # version, so nothing stale overwrites it; a folder delete pulls again
                    # just before). And before any pass after one that failed: a write
                    # refused as stale (409) must be planned again against what the
                    # appliance has now, or the same conflict is resolved again every pass
                    # (a conflicted copy each time; seed 317571347 made 60 in one round).
                    await self._refresh_remote()
                    self._pull_next = False
                ignore = IgnoreRules.load(self.root)
                scan = self._scan(ignore)
                if scan.settles_in_s is not None:
                    # Before anything may return: this round may have been woken early by
                    # another timer, which consumed the one set for this file.
                    self.wake_in("settle", scan.settles_in_s + SETTLE_MARGIN_S)
                paused = self._downloads_held()
                if rules.nothing_new(self._settled, self._quiet(self.mirror.foreign_changes),
                                     bool(scan.changed), paused, self._shared_touched):
                    return total
                current = self._plan(scan)
                self._check_safety(scan, current, self.db.base_entries(self.folder.id))
                if paused:
                    current = rules.without_downloads(current)
                if current.empty:
                    if await self._sync_shared():
                        self.local.dirty = None
                        continue            # edits moved out of Shared with me: sync them
                    self._idle(scan, current)
                    if not current.waiting:
                        self._settled = self._quiet(self._shares_seen)
                    return total
                self._status("syncing", f"{_count_transfers(current)} files",
                             pending=len(current.actions) + len(current.waiting))
                outcome = await self._execute(current)
                if outcome.summary():
                    log.info("%s", outcome.summary())
                total.add(outcome)
                self._mark(set(outcome.touched), everything=outcome.reshuffled)
                self._pull_next = self._pull_next or bool(outcome.failed)
                if outcome.done == 0:
                    self._settled = None
                    self.wake_in("retry", FAILED_RETRY_S)
                    self._status("error", "; ".join(m for _, m in outcome.failed[:3]),
                                 pending=len(current.actions))
                    return total
            log.warning("still changing after %d passes; continuing shortly", MAX_PHASES)
            self.wake_in("busy", BUSY_RETRY_S)
            return total
        except Paused as exc:
            self._settled = self._pending = None
            self._pull_next = True
            self._status("paused", exc.message)
            return total
        except BaseException:
            self._settled = self._pending = None
            self._pull_next = True
            raise
        finally:
            self.last_outcome = total

    def _must_pull(self) -> bool:
        return self._pull_next or not self.mirror.listed or self.mirror.check_next \
            or self.follower is None or self.follower.must_pull(self.mirror.cursor)

    async def _rebase(self, rollback: Rollback, listed: Mapping[str, RemoteEntry]
                      ) -> Callable[[], None]:
        """The appliance lost history: re-base the folder on the tree LISTED again (see
        agent/sync/rollback.py). First ask which synced nodes it lacks are deleted there
        (before the copy was taken, or since: their deletes follow the usual rules);
        the rest are gone with the lost window. Then, if files synced here were edited
        since the recovery, read from the feed since then which versions the copy had of
        them (an edit made since on a version this device synced is no conflict). The
        re-base itself is returned, for the mirror to run inside the transaction that
        writes the listing; then the next plan looks at everything, against a whole
        walk."""
        deleted: set[str] = set()
        base = self.db.base_entries(self.folder.id)
        for node_id in missing_from(base, listed):
            try:
                if (await self.tree.fetch(node_id)).node.deleted:
                    deleted.add(node_id)
            except RemoteNotFoundError:
                pass
        edited = fresh_edits(base, listed, rollback.started_at)
        in_copy = await self.mirror.versions_in_copy(rollback, edited) if edited else {}

        def settle() -> None:
            change = rebase(self.db.base_entries(self.folder.id), self.mirror.entries(),
                            rollback.started_at, deleted, in_copy)
            self.db.replace_base(self.folder.id, change.entries, change.forget)
            self._lost_folders.clear()
            self._lost_folders.update(change.lost_folders)
            self._settled = self._pending = None
            self.local.dirty = None
            log.warning("after the restore: %s", change.summary)

        return settle

    async def _refresh_remote(self) -> None:
        """Pull the feed. A deleted remote folder pauses the sync (deleting everything
        here would be the mirror image of a mass deletion); it resumes once restored."""
        gone = rules.remote_folder_gone(self.folder.remote_path, str(self.root))
        try:
            await self.mirror.refresh()
        except RemoteNotFoundError:
            # Lost with the appliance's recent history, not deleted: made again (its id
            # derived from parent and name, as the first time), and listed.
            if self.mirror.lost_history is None \
                    or not await remake_remote_folder(self.tree, self.folder):
                self._pause(gone)
            await self.mirror.list_all()
        if self.db.remote_row(self.folder.id, self.folder.remote_root) is None:
            self.mirror.listed = False       # list it again once it is back
            self._pause(gone)

    def _pause(self, stop: rules.Stop) -> NoReturn:
        if stop.recheck_s is not None:
            self.wake_in("recheck", stop.recheck_s)
        raise Paused(stop.message)

    async def _sync_shared(self) -> int:
        self._shared_touched = False
        refresh = self._shares_seen != self.mirror.foreign_changes
        self._shares_seen = self.mirror.foreign_changes
        return await self.shared.sync(refresh)

    def _quiet(self, shares: int) -> rules.Quiet:
        """The trees' revisions, and SHARES: the foreign changes seen (or listed)."""
        return rules.Quiet(self.db.remote_revision, self.db.base_revision, shares)

    def _mark(self, paths: set[str], everything: bool = False) -> None:
        """Paths to look at again in the next scan (agent/sync/local.py)."""
        if any(is_within(path, SHARED_FOLDER) for path in paths):
            self._shared_touched = True
        self.local.mark(paths, everything)

    def _scan(self, ignore: IgnoreRules) -> LocalScan:
        """The local tree; DIR missing or unreadable pauses the sync (a vanished or
        unmounted folder must not look empty)."""
        if not is_dir(self.root):
            self.local.dirty = None
            self._pause(rules.folder_missing(str(self.root)))
        try:
            return self.local.scan(ignore)
        except LocalFileError as exc:
            raise Paused(exc.message + "; waiting") from None

    def _plan(self, scan: LocalScan) -> Plan:
        """The plan: over every path at first and on the periodic rescan (and to recover
        from anything unusual), else over the paths out of sync at the last plan and those
        any tree changed at since (agent/sync/scope.py)."""
        base = self.db.base_entries(self.folder.id)
        remote = self.mirror.entries()
        touched = (scan.changed | self.mirror.view.take_touched()
                   | self.db.take_base_touched(self.folder.id))
        trees = Trees(scan.entries, remote, self.mirror.view.at, base,
                      self.db.base_paths(self.folder.id))
        if self._pending is None or self.mirror.relisted:
            self.mirror.relisted = False
            self._pending = pending_of(trees)
            return plan(scan.entries, remote, base)
        current, self._pending = plan_touched(trees, self._pending, touched)
        return current

    def _check_safety(self, scan: LocalScan, current: Plan,
                      base: dict[str, BaseEntry]) -> None:
        policy = rules.MassDelete(self.options.allow_mass_delete,
                                  self.options.mass_delete_share, self.options.mass_delete_min)
        stop = rules.safety_stop(str(self.root), len(scan.entries), base, current, policy)
        if stop is not None:
            self._pause(stop)

    async def _execute(self, current: Plan) -> Outcome:
        executor = Executor(self.tree, self.db, self.folder, self.mirror, self.root,
                            self.device_name, downloads_allowed=not self._downloads_held(),
                            lost_folders=self._lost_folders)
        outcome = await executor.run(current)
        if outcome.disk_full:
            retry = self.options.disk_retry_s
            self.schedule.hold_downloads(trio.current_time(), retry)
            log.warning("the disk is full: downloads paused (nothing is deleted); retrying "
                        "in %.0f s", retry)
        return outcome

    def _idle(self, scan: LocalScan, current: Plan) -> None:
        conflicts = len(self.local.conflicts)
        if self._downloads_held():
            self._status("paused", "downloads paused: the disk is full",
                         pending=len(current.waiting), conflicts=conflicts)
        elif current.waiting:
            self._status("syncing", f"waiting for {len(current.waiting)} files to settle",
                         pending=len(current.waiting), conflicts=conflicts)
        else:
            self._status("idle", "", conflicts=conflicts)
        if scan.complete:
            self.db.prune_cache(self.folder.id, set(scan.entries))
        if not self._cleaned_parts and not current.waiting:
            self._cleaned_parts = True
            remove_stale_parts(self.root, scan.entries)

    def _status(self, state: str, detail: str = "", pending: int = 0,
                conflicts: int = 0) -> None:
        """The folder's status line, written only when it changed (its time: since when it
        has been so)."""
        status = (state, detail, pending, conflicts)
        if status != self._last_status:
            self.db.set_status(self.folder.id, *status)
            self._last_status = status


def _count_transfers(current: Plan) -> int:
    return sum(1 for a in current.actions if isinstance(a, Upload | Download | KeepBoth))
