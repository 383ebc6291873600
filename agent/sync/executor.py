"""The executor: performs a plan's actions and records each one's outcome in the base.

Every action re-checks what it touches just before acting — a download is renamed into
place only if the local file still looks as the plan saw it, a local delete only removes
files unchanged since they were synced, a remote write names the version it is based on
— so a plan made a moment ago never overwrites a newer change: the action is skipped and
the next plan sees the change. What to do with what it sees is decided by pure rules
(agent/sync/rules.py: what a folder delete keeps, when to set an item aside, ...).

Transfers (uploads, downloads, conflicts; agent/sync/transfers.py) run several at once;
the rest runs in order. An unreachable appliance stops the plan (TransportError
propagates: the engine goes offline and retries); other failures skip one action and
are reported.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import trio

from agent.crypto.nodes import NodeMeta
from agent.download import PART_SUFFIX
from agent.errors import (
    CairnAgentError,
    DiskFullError,
    FileChangedError,
    TransportError,
)
from agent.remote import node_update
from agent.sync import rules
from agent.sync.context import Outcome, SkipAction, action_path, local_paths
from agent.sync.model import (
    Action,
    Adopt,
    BaseEntry,
    DeleteLocal,
    DeleteRemote,
    Download,
    Forget,
    HashLocal,
    KeepBoth,
    MakeLocalDir,
    MakeRemoteDir,
    MoveLocal,
    MoveRemote,
    RenameLocalAside,
    Upload,
    name_of,
)
from agent.sync.planner import Plan
from agent.sync.scan import hash_file, kind_at, lstat_or_none, stat_of
from agent.sync.transfers import TRANSFER_ACTIONS, Transfers

__all__ = ["Executor", "Outcome", "SkipAction"]

log = logging.getLogger("cairn.sync")


def _run_of(actions: list[Action], start: int, kind: type[MakeRemoteDir]
            ) -> list[MakeRemoteDir]:
    """The consecutive actions of KIND from START on."""
    run: list[MakeRemoteDir] = []
    for action in actions[start:]:
        if not isinstance(action, kind):
            break
        run.append(action)
    return run


class Executor(Transfers):
    """Carries out a plan (the transfer and shared parts are its bases)."""

    async def run(self, plan: Plan) -> Outcome:
        outcome = Outcome()
        actions = list(plan.actions)
        index = 0
        while index < len(actions):
            folders = _run_of(actions, index, MakeRemoteDir)
            if len(folders) > 1:
                await self._make_remote_dirs(folders, outcome)
                index += len(folders)
                continue
            if isinstance(actions[index], TRANSFER_ACTIONS):
                end = index
                while end < len(actions) and isinstance(actions[end], TRANSFER_ACTIONS):
                    end += 1
                await self._transfers(actions[index:end], outcome)
                index = end
            else:
                await self._one(actions[index], outcome)
                index += 1
        outcome.touched = [path for action in actions for path in local_paths(action)]
        outcome.reshuffled = self.reshuffled
        return outcome

    async def _one(self, action: Action, outcome: Outcome) -> None:
        try:
            await self._dispatch(action, outcome)
            outcome.done += 1
        except TransportError:
            raise
        except DiskFullError as exc:
            outcome.disk_full = True
            outcome.failed.append((action_path(action), exc.message))
        except CairnAgentError as exc:
            level = logging.DEBUG if isinstance(exc, SkipAction | FileChangedError) \
                else logging.WARNING
            log.log(level, "%s: %s", action_path(action), exc.message)
            outcome.failed.append((action_path(action), exc.message))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                outcome.disk_full = True
            log.warning("%s: %s", action_path(action), exc.strerror or exc)
            outcome.failed.append((action_path(action), str(exc.strerror or exc)))

    async def _dispatch(self, action: Action, outcome: Outcome) -> None:
        handlers: dict[type, Callable[[Any, Outcome], Awaitable[None]]] = {
            HashLocal: self._hash, MoveRemote: self._move_remote, MoveLocal: self._move_local,
            MakeRemoteDir: self._make_remote_dir, MakeLocalDir: self._make_local_dir,
            Upload: self._upload, Download: self._download, KeepBoth: self._keep_both,
            RenameLocalAside: self._rename_aside, DeleteRemote: self._delete_remote,
            DeleteLocal: self._delete_local, Adopt: self._adopt, Forget: self._forget}
        await handlers[type(action)](action, outcome)

    async def _hash(self, action: HashLocal, outcome: Outcome) -> None:
        for path in action.paths:
            file_stat, content = await trio.to_thread.run_sync(hash_file, self.local(path))
            self.db.cache_content(self.folder.id, path, file_stat, content)

    async def _rename_aside(self, action: RenameLocalAside, outcome: Outcome) -> None:
        outcome.conflicts.append(self._set_aside(action.path))

    async def _move_remote(self, action: MoveRemote, outcome: Outcome) -> None:
        row = self.db.remote_row(self.folder.id, action.node_id)
        if row is None:
            raise SkipAction("the node is gone")
        node = self.mirror.node(action.node_id)
        parent = self._folder_node(action.to_path)
        meta = replace(node.meta, name=name_of(action.to_path))
        answer = await self.tree.api.update(node.id, node_update(
            node, meta, parent, move=parent.id != row.parent_id, content=False))
        self.mirror.absorb(answer.node)
        self._repath(action.node_id, action.to_path, row.version, answer.node.version)
        log.debug("moved %s on the appliance", action.to_path)

    def _repath(self, node_id: str, new_path: str, remote_version: int,
                new_version: int) -> None:
        """Record that NODE_ID (and what is under it) now lives at NEW_PATH on both sides.
        The base version advances only if the remote had nothing else new for it."""
        entry = self.db.base_of(self.folder.id, node_id)
        if entry is None:
            return
        with self.db.transaction():
            self.db.move_base(self.folder.id, entry.path, new_path)
            self.db.put_base(self.folder.id, rules.repathed_base(
                entry, new_path, remote_version, new_version))

    async def _move_local(self, action: MoveLocal, outcome: Outcome) -> None:
        source = self.within(action.from_path)
        destination = self.within(action.to_path)
        row = self.db.remote_row(self.folder.id, action.node_id)
        entry = self.db.base_of(self.folder.id, action.node_id)
        if row is None or entry is None:
            raise SkipAction("the node is gone")
        steps = rules.local_move_steps(action.from_path, action.to_path,
                                       kind_at(destination))
        if steps.step_aside_first:
            stepped = source.with_name(f".cairn-move-{action.node_id[:12]}")
            os.rename(source, stepped)
            source = stepped
        os.makedirs(destination.parent, exist_ok=True)
        if steps.set_destination_aside:
            self._set_aside(action.to_path)
        os.rename(source, destination)
        with self.db.transaction():
            self.db.move_base(self.folder.id, entry.path, action.to_path)
            self.db.put_base(self.folder.id, rules.moved_base(
                entry, action.to_path, row.version, row.content))
        log.debug("moved %s to %s", action.from_path, action.to_path)

    async def _make_remote_dir(self, action: MakeRemoteDir, outcome: Outcome) -> None:
        parent = self._folder_node(action.path)
        info = os.lstat(self.local(action.path))
        if not stat.S_ISDIR(info.st_mode):
            raise SkipAction("no longer a folder")
        answer = await self._create_node(parent, NodeMeta(
            name=name_of(action.path), kind="dir", mtime_ns=info.st_mtime_ns,
            mode=stat.S_IMODE(info.st_mode), device=self.device_name),
            self._folder_id(action.path))
        row = self.db.remote_row(self.folder.id, answer.node.id)
        assert row is not None
        self._record(BaseEntry(row.node_id, action.path, "dir", row.version, row.content,
                               stat_of(info)))

    async def _make_local_dir(self, action: MakeLocalDir, outcome: Outcome) -> None:
        row = self.db.remote_row(self.folder.id, action.node_id)
        if row is None:
            raise SkipAction("the folder is gone")
        target = self.within(action.path)
        if rules.folder_sets_aside(kind_at(target)):
            self._set_aside(action.path)
        os.makedirs(target, exist_ok=True)
        self._record(BaseEntry(row.node_id, action.path, "dir", row.version, row.content,
                               stat_of(os.lstat(target))))

    async def _delete_remote(self, action: DeleteRemote, outcome: Outcome) -> None:
        if action.kind == "dir":     # a file's own version check suffices
            await self.mirror.pull()     # what changed under it since the plan was made
            changed = rules.changed_under(action.path, self.mirror.entries(),
                                          self.db.base_entries(self.folder.id))
            if changed is not None:
                raise SkipAction(f"{changed} changed on another device meanwhile; "
                                 f"{action.path} is kept")
        # ... and the appliance checks that again atomically: a change that lands after
        # the pull above (an edit, a file moved in) refuses the delete (seed 638)
        self.mirror.absorb(await self.tree.api.delete(
            action.node_id, action.version,
            unchanged_since=self.mirror.cursor if action.kind == "dir" else None))
        with self.db.transaction():
            self.db.forget_base_under(self.folder.id, action.path)
            self.db.forget_base(self.folder.id, action.node_id)
        log.debug("deleted %s on the appliance (restorable: cairn restore)", action.path)

    async def _delete_local(self, action: DeleteLocal, outcome: Outcome) -> None:
        target = self.within(action.path)
        if action.expect is not None:
            if lstat_or_none(target) != action.expect:
                raise SkipAction(f"{action.path} changed here; kept")
            os.unlink(target)      # a symbolic link itself, never what it points to
            self.db.forget_base_under(self.folder.id, action.path)
        else:
            if kind_at(target) not in ("dir", None):     # a link to a folder, say
                raise SkipAction(f"{action.path} is no longer a folder here; kept")
            self._delete_folder(action.path)
        log.debug("deleted %s (deleted on another device)", action.path)

    def _delete_folder(self, path: str) -> None:
        """Remove what is unchanged since it was synced under PATH, bottom up; anything
        else stays (and syncs back as new). A symbolic link is removed itself (os.walk
        lists one to a folder among the folders, and never goes into it)."""
        walked = list(os.walk(self.local(path), topdown=False))
        found = {relative: lstat_or_none(self.local(relative)) for relative in (
            f"{os.path.relpath(folder, self.root)}/{name}"
            for folder, dirs, files in walked
            for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))])}
        synced = {p: e for p in found if (e := self.db.base_at(self.folder.id, p))}
        for file_path in rules.removable(found, synced, PART_SUFFIX):
            os.unlink(self.local(file_path))
            self.db.forget_base_under(self.folder.id, file_path)
        for folder, _dirs, _files in walked:
            relative = os.path.relpath(folder, self.root)
            try:
                os.rmdir(folder)
                self.db.forget_base_under(self.folder.id, relative)
            except OSError:
                self.db.forget_base(self.folder.id, self._base_id(relative))

    def _base_id(self, path: str) -> str:
        entry = self.db.base_at(self.folder.id, path)
        return "" if entry is None else entry.node_id

    async def _adopt(self, action: Adopt, outcome: Outcome) -> None:
        row = self.db.remote_row(self.folder.id, action.node_id)
        if row is None:
            raise SkipAction("the node is gone")
        self._record(BaseEntry(row.node_id, action.path, row.kind, action.version,
                               action.content, action.stat))

    async def _forget(self, action: Forget, outcome: Outcome) -> None:
        self.db.forget_base(self.folder.id, action.node_id)
