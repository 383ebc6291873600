"""The executor: performs a plan's actions and records each one's outcome in the base.

Every action re-checks what it touches just before acting — a download is renamed into
place only if the local file still looks as the plan saw it, a local delete only removes
files unchanged since they were synced, a remote write names the version it is based on
— so a plan made a moment ago never overwrites a newer change: the action is skipped and
the next plan sees the change.

Transfers (uploads, downloads, conflicts) run several at once; the rest runs in order.
An unreachable appliance stops the plan (TransportError propagates: the engine goes
offline and retries); other failures skip one action and are reported.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from agent.crypto.nodes import NodeMeta, new_node_key, seal_metadata, wrap_key
from agent.download import PART_SUFFIX, download_file
from agent.errors import (
    CairnAgentError,
    DiskFullError,
    FileChangedError,
    LocalFileError,
    TransportError,
)
from agent.remote import RemoteNode, RemoteTree, Target
from agent.sync import rules
from agent.sync.batch import (
    SMALL_FILE,
    SmallDownload,
    SmallUpload,
    download_small,
    upload_small,
)
from agent.sync.mirror import Mirror
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
    content_of_refs,
    name_of,
    parent_of,
)
from agent.sync.names import unique_copy_name
from agent.sync.planner import Plan
from agent.sync.scan import hash_file, kind_at, lstat_or_none, stat_of
from agent.sync.state import FolderRecord, SyncDb
from agent.upload import upload_file

log = logging.getLogger("cairn.sync")

TRANSFERS_AT_ONCE = 4
TRANSFER_ACTIONS = (Upload, Download, KeepBoth)


class SkipAction(CairnAgentError):
    """This action cannot run now; the next plan will see why."""
    code = "skipped"


@dataclass
class Outcome:
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    disk_full: bool = False
    uploaded: int = 0
    downloaded: int = 0
    touched: list[str] = field(default_factory=list)   # local paths the plan may have changed
    reshuffled: bool = False       # something was renamed aside: look at everything again


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unchanged_guard(target: Path, action: Download) -> Callable[[], None]:
    """Raises FileChangedError if TARGET no longer looks as the plan saw it."""
    def check() -> None:
        if lstat_or_none(target) != action.expect:
            raise FileChangedError(f"{action.path} changed while it was being downloaded; "
                                   "kept as it is")
    return check


def _run_of(actions: list[Action], start: int, kind: type[MakeRemoteDir]
            ) -> list[MakeRemoteDir]:
    """The consecutive actions of KIND from START on."""
    run: list[MakeRemoteDir] = []
    for action in actions[start:]:
        if not isinstance(action, kind):
            break
        run.append(action)
    return run


def _id_and_key(node: RemoteNode) -> tuple[str, bytes]:
    return node.id, node.key


def local_paths(action: Action) -> tuple[str, ...]:
    """The local paths ACTION may change (for the next, incremental, scan)."""
    if isinstance(action, HashLocal):
        return action.paths
    if isinstance(action, MoveLocal):
        return (action.from_path, action.to_path)
    if isinstance(action, Forget | MoveRemote | MakeRemoteDir | DeleteRemote):
        return ()
    return (action.path,)


def action_path(action: Action) -> str:
    if isinstance(action, HashLocal):
        return ", ".join(action.paths[:3])
    if isinstance(action, MoveRemote):
        return action.to_path
    if isinstance(action, MoveLocal):
        return action.to_path
    if isinstance(action, Forget):
        return action.node_id
    return action.path


class Executor:
    def __init__(self, tree: RemoteTree, db: SyncDb, folder: FolderRecord, mirror: Mirror,
                 root: Path, device_name: str, *, downloads_allowed: bool = True) -> None:
        self.tree = tree
        self.db = db
        self.folder = folder
        self.mirror = mirror
        self.root = root
        self.device_name = device_name
        self.downloads_allowed = downloads_allowed
        self.reshuffled = False

    def local(self, path: str) -> Path:
        return self.root / path if path else self.root

    # --- running a plan -----------------------------------------------------------------

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

    async def _transfers(self, actions: list[Action], outcome: Outcome) -> None:
        small_up = [a for a in actions if isinstance(a, Upload) and a.size <= SMALL_FILE]
        small_down = [a for a in actions if isinstance(a, Download) and a.size <= SMALL_FILE]
        if len(small_up) > 1:
            await self._guarded(self._upload_batch(small_up, outcome))
        else:
            small_up = []
        if len(small_down) > 1 and self.downloads_allowed:
            await self._guarded(self._download_batch(small_down, outcome))
        else:
            small_down = []
        batched = {id(a) for a in small_up + small_down}
        actions = [a for a in actions if id(a) not in batched]
        limiter = trio.CapacityLimiter(TRANSFERS_AT_ONCE)

        async def one(action: Action) -> None:
            async with limiter:
                await self._one(action, outcome)

        async with trio.open_nursery() as nursery:
            for action in actions:
                nursery.start_soon(one, action)

    async def _make_remote_dirs(self, actions: list[MakeRemoteDir], outcome: Outcome) -> None:
        """Many new folders in one request per thousand: ids and keys are chosen here, so
        a folder and what goes in it can be created in the same batch."""
        made: dict[str, tuple[str, bytes]] = {}
        operations: list[dict[str, Any]] = []
        planned: list[tuple[MakeRemoteDir, os.stat_result]] = []
        for action in actions:
            try:
                parent_id, parent_key = made.get(parent_of(action.path)) or _id_and_key(
                    self._folder_node(action.path))
                info = os.lstat(self.local(action.path))
            except (CairnAgentError, OSError) as exc:
                outcome.failed.append((action.path, str(exc)))
                continue
            if not stat.S_ISDIR(info.st_mode):
                continue
            node_id, key = os.urandom(16).hex(), new_node_key()
            meta = NodeMeta(name=name_of(action.path), kind="dir", mtime_ns=info.st_mtime_ns,
                            mode=stat.S_IMODE(info.st_mode), device=self.device_name)
            operations.append({
                "op": "create", "id": node_id, "parent": parent_id, "kind": "dir",
                "metadata": _b64(seal_metadata(key, node_id, meta)),
                "wrapped_key": _b64(wrap_key(parent_key, key, node_id, parent_id))})
            made[action.path] = (node_id, key)
            planned.append((action, info))
        for start in range(0, len(operations), 1000):
            answer = await self.tree.connection.call("POST", "/batch/files", json={
                "operations": operations[start:start + 1000]})
            with self.db.transaction():
                for (action, info), result in zip(planned[start:start + 1000],
                                                  answer["results"], strict=True):
                    if not result["ok"]:
                        outcome.failed.append((action.path, result["error"]["message"]))
                        continue
                    row = self.mirror.absorb(result["result"]["node"])
                    if row is None:
                        continue
                    self._record(BaseEntry(row.node_id, action.path, "dir", row.version,
                                           row.content, stat_of(info)))
                    outcome.done += 1

    async def _guarded(self, work: Awaitable[None]) -> None:
        """A whole batch; per-file failures are recorded inside, a refused request skips
        the batch (its files are planned again)."""
        try:
            await work
        except TransportError:
            raise
        except CairnAgentError as exc:
            log.warning("a batch failed: %s", exc.message)

    async def _upload_batch(self, actions: list[Upload], outcome: Outcome) -> None:
        items: list[tuple[Upload, SmallUpload]] = []
        for action in actions:
            try:
                existing = None
                if action.node_id is not None:
                    assert action.base_version is not None
                    existing = replace(self.mirror.node(action.node_id),
                                       version=action.base_version)
                items.append((action, SmallUpload(self.local(action.path),
                                                  name_of(action.path),
                                                  self._folder_node(action.path), existing)))
            except CairnAgentError as exc:
                outcome.failed.append((action.path, exc.message))
        await upload_small(self.tree, [item for _, item in items], self.device_name)
        with self.db.transaction():
            self._record_uploads(items, outcome)
        log.debug("uploaded %d small files in a batch", sum(
            1 for _, i in items if i.error is None))

    def _record_uploads(self, items: list[tuple[Upload, SmallUpload]],
                        outcome: Outcome) -> None:
        for action, item in items:
            if item.error is not None or item.source is None:
                outcome.failed.append((action.path, item.error or "not read"))
                continue
            if item.node is None:
                assert item.existing is not None
                version, node_id = item.existing.version, item.existing.id
            else:
                self.mirror.absorb(item.node)
                version, node_id = int(item.node["version"]), str(item.node["id"])
            self._record(BaseEntry(node_id, action.path, "file", version,
                                   content_of_refs(item.refs), stat_of(item.source)))
            log.debug("uploaded %s", action.path)
            outcome.uploaded += 1
            outcome.done += 1

    async def _download_batch(self, actions: list[Download], outcome: Outcome) -> None:
        items: list[tuple[Download, SmallDownload]] = []
        for action in actions:
            try:
                node = self.mirror.node(action.node_id)
                target = self.local(action.path)
                os.makedirs(target.parent, exist_ok=True)
            except (CairnAgentError, OSError) as exc:
                outcome.failed.append((action.path, str(exc)))
                continue
            items.append((action, SmallDownload(node, target,
                                                _unchanged_guard(target, action))))
        await download_small(self.tree, [item for _, item in items])
        with self.db.transaction():
            self._record_downloads(items, outcome)
        log.debug("downloaded %d small files in a batch", sum(
            1 for _, i in items if i.written is not None))

    def _record_downloads(self, items: list[tuple[Download, SmallDownload]],
                          outcome: Outcome) -> None:
        for action, item in items:
            if item.written is None:
                outcome.disk_full = outcome.disk_full or item.disk_full
                outcome.failed.append((action.path, item.error or "not written"))
                continue
            self._record(BaseEntry(item.node.id, action.path, "file", item.node.version,
                                   content_of_refs(item.node.meta.blocks),
                                   stat_of(item.written)))
            log.debug("downloaded %s", action.path)
            outcome.downloaded += 1
            outcome.done += 1

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

    # --- helpers ------------------------------------------------------------------------

    def _synced_folder_at(self, path: str) -> str | None:
        """The id of the remote folder that the synced local folder PATH maps to."""
        if not path:
            return self.folder.remote_root
        entry = self.db.base_at(self.folder.id, path)
        return entry.node_id if entry is not None and entry.kind == "dir" else None

    def _folder_node(self, path: str) -> RemoteNode:
        """The remote folder that PATH's parent maps to."""
        folder_id = self._synced_folder_at(parent_of(path))
        if folder_id is None:
            raise SkipAction(f"its folder {parent_of(path)} is not synced yet")
        return self.mirror.node(folder_id)

    def _record(self, entry: BaseEntry) -> None:
        with self.db.transaction():
            self.db.put_base(self.folder.id, entry)
            if entry.kind == "file" and entry.stat is not None:
                self.db.cache_content(self.folder.id, entry.path, entry.stat, entry.content)

    def _taken_names(self, folder_id: str | None, local_folder: str) -> set[str]:
        names = {row.name for row in self.db.remote_rows(self.folder.id)
                 if row.parent_id == folder_id} if folder_id is not None else set()
        with contextlib.suppress(OSError):
            names |= set(os.listdir(self.local(local_folder)))
        return names

    def _remote_folder_at(self, path: str) -> str | None:
        return rules.remote_folder_at(path, self.folder.remote_root,
                                      self.db.base_at(self.folder.id, path),
                                      self.mirror.entries().values())

    def _set_aside(self, path: str) -> str:
        """Rename the local item at PATH to a conflicted copy (from this device). Needs no
        synced parent: a move may land in a folder that is new on both sides."""
        taken = self._taken_names(self._remote_folder_at(parent_of(path)), parent_of(path))
        copy = unique_copy_name(name_of(path), self.device_name, time.time(), taken)
        new_path = f"{parent_of(path)}/{copy}" if parent_of(path) else copy
        os.rename(self.local(path), self.local(new_path))
        self.reshuffled = True
        log.warning("conflict: %s exists on both sides with different content; this "
                    "device's version is kept as %s", path, new_path)
        return new_path

    # --- the actions --------------------------------------------------------------------

    async def _hash(self, action: HashLocal, outcome: Outcome) -> None:
        for path in action.paths:
            file_stat, content = await trio.to_thread.run_sync(hash_file, self.local(path))
            self.db.cache_content(self.folder.id, path, file_stat, content)

    async def _upload(self, action: Upload, outcome: Outcome) -> None:
        parent = self._folder_node(action.path)
        existing = None
        if action.node_id is not None:
            assert action.base_version is not None
            existing = replace(self.mirror.node(action.node_id), version=action.base_version)
        target = Target(parent, name_of(action.path), existing)
        try:
            stats = await upload_file(self.tree, self.local(action.path), target,
                                      show_progress=False, device=self.device_name)
        except FileChangedError as exc:
            if exc.written is not None:
                self._began(action.path, exc.written)
            raise
        assert stats.source is not None
        if stats.node is None:         # the appliance already had exactly this
            assert existing is not None
            version = existing.version
            node_id = existing.id
        else:
            self.mirror.absorb(stats.node)
            version, node_id = int(stats.node["version"]), str(stats.node["id"])
        self._record(BaseEntry(node_id, action.path, "file", version,
                               content_of_refs(stats.refs), stat_of(stats.source)))
        outcome.uploaded += 1
        log.debug("uploaded %s", action.path)

    def _began(self, path: str, written: dict[str, Any]) -> None:
        row = self.mirror.absorb(written)
        if row is not None:
            self._record(rules.began_upload(row.node_id, path, row.version, row.content))

    async def _download(self, action: Download, outcome: Outcome) -> None:
        if not self.downloads_allowed:
            raise DiskFullError("downloads are paused: the disk is full")
        node = self.mirror.node(action.node_id)
        target = self.local(action.path)
        unchanged_meanwhile = _unchanged_guard(target, action)
        try:
            os.makedirs(target.parent, exist_ok=True)
        except OSError as exc:
            raise LocalFileError(f"cannot create {target.parent}: {exc.strerror}") from None
        stats = await download_file(self.tree, node, target, show_progress=False,
                                    guard=unchanged_meanwhile)
        written = stats.node or node
        self._record(BaseEntry(written.id, action.path, "file", written.version,
                               content_of_refs(written.meta.blocks),
                               stat_of(os.lstat(target))))
        outcome.downloaded += 1
        log.debug("downloaded %s", action.path)

    async def _keep_both(self, action: KeepBoth, outcome: Outcome) -> None:
        row = self.db.remote_row(self.folder.id, action.node_id)
        if row is None or row.parent_id is None:
            raise SkipAction("the node is gone")
        node = self.mirror.node(action.node_id)
        parent = self.mirror.node(row.parent_id)
        taken = self._taken_names(parent.id, parent_of(action.path))
        copy = unique_copy_name(row.name, row.device, row.updated_at, taken)
        await self._create_node(parent, replace(node.meta, name=copy))
        log.warning("conflict: %s was changed here and on %s; their version is kept as %s",
                    action.path, row.device or "another device", copy)
        outcome.conflicts.append(copy)
        await self._upload(Upload(action.path, action.node_id, row.version), outcome)

    async def _create_node(self, parent: RemoteNode, meta: NodeMeta) -> dict[str, Any]:
        node_id = os.urandom(16).hex()
        key = new_node_key()
        answer: dict[str, Any] = await self.tree.connection.call("POST", "/files", json={
            "id": node_id, "parent": parent.id, "kind": meta.kind,
            "metadata": _b64(seal_metadata(key, node_id, meta)),
            "wrapped_key": _b64(wrap_key(parent.key, key, node_id, parent.id)),
            "size": meta.size,
            "blocks": [{"id": r.id_hex, "size": r.cipher_size} for r in meta.blocks]})
        self.mirror.absorb(answer["node"])
        return answer

    async def _rename_aside(self, action: RenameLocalAside, outcome: Outcome) -> None:
        outcome.conflicts.append(self._set_aside(action.path))

    async def _move_remote(self, action: MoveRemote, outcome: Outcome) -> None:
        row = self.db.remote_row(self.folder.id, action.node_id)
        if row is None:
            raise SkipAction("the node is gone")
        node = self.mirror.node(action.node_id)
        parent = self._folder_node(action.to_path)
        meta = replace(node.meta, name=name_of(action.to_path))
        body: dict[str, Any] = {
            "base_version": row.version,
            "metadata": _b64(seal_metadata(node.key, node.id, meta)),
            "wrapped_key": _b64(wrap_key(parent.key, node.key, node.id, parent.id))}
        if parent.id != row.parent_id:
            body["parent"] = parent.id
        answer = await self.tree.connection.call("PUT", f"/files/{node.id}", json=body)
        self.mirror.absorb(answer["node"])
        self._repath(action.node_id, action.to_path, row.version, int(answer["node"]["version"]))
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
        source, destination = self.local(action.from_path), self.local(action.to_path)
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
            mode=stat.S_IMODE(info.st_mode), device=self.device_name))
        row = self.db.remote_row(self.folder.id, answer["node"]["id"])
        assert row is not None
        self._record(BaseEntry(row.node_id, action.path, "dir", row.version, row.content,
                               stat_of(info)))

    async def _make_local_dir(self, action: MakeLocalDir, outcome: Outcome) -> None:
        row = self.db.remote_row(self.folder.id, action.node_id)
        if row is None:
            raise SkipAction("the folder is gone")
        target = self.local(action.path)
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
        answer = await self.tree.connection.call(
            "DELETE", f"/files/{action.node_id}", params={"base_version": action.version})
        self.mirror.absorb(answer)
        with self.db.transaction():
            self.db.forget_base_under(self.folder.id, action.path)
            self.db.forget_base(self.folder.id, action.node_id)
        log.debug("deleted %s on the appliance (restorable: cairn restore)", action.path)

    async def _delete_local(self, action: DeleteLocal, outcome: Outcome) -> None:
        target = self.local(action.path)
        if action.expect is not None:
            if lstat_or_none(target) != action.expect:
                raise SkipAction(f"{action.path} changed here; kept")
            os.unlink(target)
            self.db.forget_base_under(self.folder.id, action.path)
        else:
            self._delete_folder(action.path)
        log.debug("deleted %s (deleted on another device)", action.path)

    def _delete_folder(self, path: str) -> None:
        """Remove what is unchanged since it was synced under PATH, bottom up; anything
        else stays (and syncs back as new)."""
        walked = list(os.walk(self.local(path), topdown=False))
        found = {relative: lstat_or_none(self.local(relative)) for relative in (
            f"{os.path.relpath(folder, self.root)}/{name}"
            for folder, _dirs, files in walked for name in files)}
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
        self._record(BaseEntry(row.node_id, action.path, row.kind, row.version, row.content,
                               action.stat))

    async def _forget(self, action: Forget, outcome: Outcome) -> None:
        self.db.forget_base(self.folder.id, action.node_id)
