"""The sync engine: what wakes a sync round, and the round itself.

Wake-ups come from
- the local watcher (inotify through watchfiles, debounced), plus a full rescan every
  RESCAN_S as a safety net;
- the appliance's event stream, which announces new cursors while the folder is active;
  when the stream is down, or after QUIET_S without remote changes, the changes feed is
  polled instead, with backoff (POLL_S doubling up to POLL_MAX_S);
- timers: a file still being written settles, a retry after a failure or while offline.

A round pulls the changes feed into the mirror, scans DIR, and runs planner phases
(plan → execute → rescan) until the plan is empty. Local edits never wait for the
appliance: they are in the local tree, and the diff against the base *is* the queue, kept
across restarts. Safety stops (nothing is deleted while paused):
- DIR missing or unreadable, or suddenly empty while files were synced (an unmounted
  drive): paused until it is back;
- a plan deleting more than MASS_DELETE_SHARE of the synced files (and at least
  MASS_DELETE_MIN) on the appliance: paused until restarted with --allow-mass-delete;
- a full local disk: downloads pause (uploads go on) and are retried every DISK_RETRY_S.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import trio

from agent.crypto.nodes import check_name
from agent.download import PART_SUFFIX
from agent.errors import (
    CairnAgentError,
    LocalFileError,
    RemoteNotFoundError,
    TransportError,
    UsageError,
)
from agent.operations import make_folder
from agent.remote import RemoteTree, Target
from agent.sync import rules
from agent.sync.executor import Executor, Outcome
from agent.sync.ignore import IGNORE_FILE, IgnoreRules
from agent.sync.mirror import Mirror
from agent.sync.model import (
    BaseEntry,
    Download,
    KeepBoth,
    LocalEntry,
    Upload,
    is_within,
)
from agent.sync.names import is_conflicted_copy
from agent.sync.planner import Plan, plan
from agent.sync.scan import (
    MAX_DIRTY,
    LocalScan,
    changed_between,
    is_dir,
    rescan_paths,
    scan_tree,
)
from agent.sync.schedule import RESCAN_S, Wakeups, poll_interval
from agent.sync.scope import Trees, pending_of, plan_touched
from agent.sync.shared import SHARED_FOLDER, SharedMirror
from agent.sync.state import FolderRecord, SyncDb
from agent.sync.watch import ROOT_GONE, watch_changes

log = logging.getLogger("cairn.sync")

QUIET_S = 600.0
HEARTBEAT_S = 15.0
DISK_RETRY_S = 30.0
BUSY_RETRY_S = 1.0
FAILED_RETRY_S = 5.0
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


async def open_folder(tree: RemoteTree, db: SyncDb, local_dir: Path, remote_path: str
                      ) -> FolderRecord:
    """The folder's record, registering it on first use (and creating the remote folder
    if needed). A folder keeps the remote folder it was first synced with."""
    key = str(local_dir)
    record = db.folder(key)
    wanted = "/" + "/".join(p for p in remote_path.split("/") if p not in ("", "."))
    if record is not None:
        if record.remote_path != wanted:
            raise UsageError(f"{local_dir} is already synced with {record.remote_path}, "
                             f"not {wanted}")
        return record
    if not is_dir(local_dir):
        try:
            os.makedirs(local_dir)
        except OSError as exc:
            raise LocalFileError(f"cannot create {local_dir}: {exc.strerror}") from None
    for other in db.folders():
        if _overlaps(other.local_dir, key):
            raise UsageError(f"{local_dir} overlaps {other.local_dir}, which is already "
                             "synced; pick a folder outside it")
    folder = await tree.root()
    for part in (p for p in wanted.split("/") if p):
        existing = await tree.child(folder, check_name(part))
        if existing is not None and not existing.is_dir:
            raise UsageError(f"{wanted} is a file on the appliance, not a folder")
        if existing is None:
            existing = await make_folder(tree, Target(folder, part, None))
        folder = existing
    return db.add_folder(key, folder.id, wanted)


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class SyncEngine:
    def __init__(self, tree: RemoteTree, db: SyncDb, folder: FolderRecord,
                 options: SyncOptions) -> None:
        self.tree = tree
        self.db = db
        self.folder = folder
        self.root = Path(folder.local_dir)
        self.options = options
        self.mirror = Mirror(tree, db, folder)
        self.device_name = tree.connection.device.device_name
        self.shared = SharedMirror(tree, db, folder.id, self.root, self.device_name)
        self._shares_seen = -1
        self.wakeups = Wakeups()
        self.schedule = self.wakeups.schedule
        self._cleaned_parts = False
        self._local_activity = 0
        self._last_scan: LocalScan | None = None
        self._settled: rules.Quiet | None = None   # what the last idle round saw
        self._shared_touched = False     # the watcher saw a change in Shared with me
        self._dirty: set[str] | None = None     # None: walk everything next time
        self._unsettled: set[str] = set()       # files still being written
        self._conflicts: set[str] = set()       # conflicted copies in the folder
        self._pending: set[str] | None = None   # out of sync at the last plan; None: plan
                                                # everything next time
        self.last_outcome = Outcome()
        self.rounds = 0

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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_local)
            nursery.start_soon(self._follow_remote)
            await self._loop()

    async def _loop(self) -> None:
        self.wake_in("rescan", RESCAN_S)
        self.wake()
        while True:
            if "rescan" in await self.wakeups.next():
                self._shares_seen = -1          # list the shares again,
                self._dirty = None              # walk the whole folder
                self._settled = self._pending = None    # and plan everything (the oracle)
                self.wake_in("rescan", RESCAN_S)
            try:
                await self.sync_round()
                self.schedule.round_done()
            except TransportError as exc:
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
            self._dirty = None
            await trio.sleep(2)      # the folder vanished (or the watcher stopped): retry
            self.wake()

    async def _follow_remote(self) -> None:
        """Hold the event stream while the folder is active; poll the feed with backoff
        when the stream is down or after QUIET_S without a change on either side."""
        failures = 0
        while True:
            quiet = await self._hold_stream()
            failures = 0 if quiet else failures + 1
            await self._poll(until_active=quiet, first_s=poll_interval(failures))

    async def _hold_stream(self) -> bool:
        """True when the stream was closed for being quiet, False when it broke."""
        with trio.move_on_after(QUIET_S) as quiet:
            try:
                await self.tree.connection.follow_events(
                    self.mirror.cursor, HEARTBEAT_S, partial(self._on_cursor, quiet))
            except CairnAgentError as exc:
                log.debug("event stream down: %s", exc.message)
            return False
        log.debug("quiet for %.0f s: polling instead of holding the stream", QUIET_S)
        return True

    def _on_cursor(self, quiet: trio.CancelScope, cursor: int) -> None:
        if cursor > self.mirror.cursor:
            quiet.deadline = trio.current_time() + QUIET_S
            self.wake()

    async def _poll(self, until_active: bool, first_s: float) -> None:
        """Wake rounds (each pulls the feed) at growing intervals; once, or — when the
        folder went quiet — until something changes on either side."""
        interval = first_s
        while True:
            cursor, activity = self.mirror.cursor, self._local_activity
            await trio.sleep(interval)
            self.wake()
            await trio.sleep(0.5)            # the round's pull
            if not until_active or self.mirror.cursor != cursor \
                    or self._local_activity != activity:
                return
            interval = poll_interval(0, interval)

    # --- a round ------------------------------------------------------------------------

    async def sync_round(self) -> Outcome:
        """Bring both sides together as far as possible now. Raises TransportError when
        the appliance cannot be reached (local state is untouched)."""
        self.rounds += 1
        total = Outcome()
        try:
            for _ in range(MAX_PHASES):
                await self._refresh_remote()
                ignore = IgnoreRules.load(self.root)
                scan = self._scan(ignore)
                if scan.settles_in_s is not None:
                    # Before anything may return: this round may have been woken early by
                    # another timer, which consumed the one set for this file.
                    self.wake_in("settle", scan.settles_in_s + 0.02)
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
                        self._dirty = None
                        continue            # edits moved out of Shared with me: sync them
                    self._idle(scan, current)
                    if not current.waiting:
                        self._settled = self._quiet(self._shares_seen)
                    return total
                self._status("syncing", f"{_count_transfers(current)} files",
                             pending=len(current.actions) + len(current.waiting))
                outcome = await self._execute(current)
                _log_summary(outcome)
                _merge(total, outcome)
                self._mark(set(outcome.touched), everything=outcome.reshuffled)
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
            self._status("paused", exc.message)
            return total
        except BaseException:
            self._settled = self._pending = None
            raise
        finally:
            self.last_outcome = total

    async def _refresh_remote(self) -> None:
        """Pull the feed. A deleted remote folder pauses the sync (deleting everything
        here would be the mirror image of a mass deletion); it resumes once restored."""
        gone = rules.remote_folder_gone(self.folder.remote_path, str(self.root))
        try:
            await self.mirror.refresh()
        except RemoteNotFoundError:
            self._pause(gone)
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
        """Paths to look at again in the next scan; a whole walk when that is simpler."""
        if any(is_within(path, SHARED_FOLDER) for path in paths):
            self._shared_touched = True
        if self._dirty is None:
            return
        if everything or ROOT_GONE in paths or IGNORE_FILE in paths \
                or len(self._dirty) + len(paths) > MAX_DIRTY:
            self._dirty = None
        else:
            self._dirty |= paths

    def _scan(self, ignore: IgnoreRules) -> LocalScan:
        """The local tree: a whole walk at first, now and then, and whenever in doubt;
        otherwise the last scan with the paths the watcher and the executor touched
        looked at again (a change costs what it touched, not the folder's size)."""
        if not is_dir(self.root):
            self._dirty = None
            self._pause(rules.folder_missing(str(self.root)))
        reserved = frozenset({SHARED_FOLDER})
        seen: set[str] = set()           # changed in an update that a walk then replaced
        try:
            if self._dirty is None or self._last_scan is None:
                scan = scan_tree(self.root, ignore, self.db.cached_contents(self.folder.id),
                                 time.time_ns(), reserved=reserved)
                scan.complete = True
            else:
                scan = rescan_paths(self.root, ignore, self._last_scan.entries, self._dirty,
                                    partial(self.db.cached_content, self.folder.id),
                                    time.time_ns(), reserved=reserved)
                if scan.vanished:
                    seen = scan.changed
                    scan = scan_tree(self.root, ignore,
                                     self.db.cached_contents(self.folder.id),
                                     time.time_ns(), reserved=reserved)
                    scan.complete = True
        except LocalFileError as exc:
            self._dirty = None
            raise Paused(exc.message + "; waiting") from None
        last, self._last_scan = self._last_scan, scan
        if scan.complete:
            scan.changed = seen | changed_between({} if last is None else last.entries,
                                                  scan.entries)
            looked: Iterable[str] = scan.entries
            self._unsettled, self._conflicts = set(), set()
        else:
            looked = self._unsettled | scan.changed
        for path in looked:
            entry = scan.entries.get(path)
            _put(self._unsettled, path, entry is not None and not entry.stable)
            _put(self._conflicts, path, entry is not None and is_conflicted_copy(path))
        self._dirty = set(self._unsettled)
        return scan

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
                            self.device_name, downloads_allowed=not self._downloads_held())
        outcome = await executor.run(current)
        if outcome.disk_full:
            retry = self.options.disk_retry_s
            self.schedule.hold_downloads(trio.current_time(), retry)
            log.warning("the disk is full: downloads paused (nothing is deleted); retrying "
                        "in %.0f s", retry)
        return outcome

    def _idle(self, scan: LocalScan, current: Plan) -> None:
        conflicts = len(self._conflicts)
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
            _remove_stale_parts(self.root, scan.entries)

    def _status(self, state: str, detail: str = "", pending: int = 0,
                conflicts: int = 0) -> None:
        self.db.set_status(self.folder.id, state, detail, pending, conflicts)


def _put(paths: set[str], path: str, member: bool) -> None:
    if member:
        paths.add(path)
    else:
        paths.discard(path)


def _log_summary(outcome: Outcome) -> None:
    """One line per pass at the default level (each file's line is logged with -v)."""
    other = outcome.done - outcome.uploaded - outcome.downloaded
    if outcome.done or outcome.failed:
        log.info("synced: %d uploaded, %d downloaded, %d other changes%s",
                 outcome.uploaded, outcome.downloaded, other,
                 f"; {len(outcome.failed)} not done yet" if outcome.failed else "")


def _count_transfers(current: Plan) -> int:
    return sum(1 for a in current.actions if isinstance(a, Upload | Download | KeepBoth))


def _merge(total: Outcome, outcome: Outcome) -> None:
    total.done += outcome.done
    total.failed += outcome.failed
    total.conflicts += outcome.conflicts
    total.disk_full = total.disk_full or outcome.disk_full
    total.uploaded += outcome.uploaded
    total.downloaded += outcome.downloaded


def _remove_stale_parts(root: Path, entries: dict[str, LocalEntry]) -> None:
    """Temporary download files left by a killed agent, once nothing needs them."""
    folders = [""] + [p for p, e in entries.items() if e.kind == "dir"]
    for folder in folders:
        try:
            names = os.listdir(root / folder if folder else root)
        except OSError:
            continue
        for name in names:
            if name.endswith(PART_SUFFIX):
                try:
                    os.unlink((root / folder if folder else root) / name)
                    log.info("removed a stale temporary file %s", name)
                except OSError:
                    pass


def describe(record: FolderRecord, alive: Callable[[int], bool]) -> str:
    """One line of `cairn status` for a synced folder."""
    if record.pid is None or not alive(record.pid):
        state = "not running"
    else:
        state = record.state + (f": {record.detail}" if record.detail else "")
    conflicts = f", {record.conflicts} conflicted copies" if record.conflicts else ""
    return f"{record.local_dir} <-> {record.remote_path}: {state}{conflicts}"
