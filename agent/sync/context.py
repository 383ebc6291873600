"""What the executor's parts share: the folder they act on, what a pass did (Outcome),
and the helpers every action uses (the remote folder a local path maps to, recording a
synced entry, setting an item aside as a conflicted copy, creating a remote node)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.crypto.nodes import NodeMeta, new_node_key
from agent.errors import (
    CairnAgentError,
)
from agent.remote import RemoteNode, RemoteTree, node_create
from agent.sync import rules
from agent.sync.mirror import Mirror
from agent.sync.model import (
    Action,
    BaseEntry,
    DeleteRemote,
    Forget,
    HashLocal,
    MakeRemoteDir,
    MoveLocal,
    MoveRemote,
    RemoteEntry,
    name_of,
    parent_of,
)
from agent.sync.names import unique_copy_name
from agent.sync.scan import folder_not_local
from agent.sync.state import FolderRecord, SyncDb
from protocol.ids import new_node_id
from protocol.models import NodeWrite

log = logging.getLogger("cairn.sync")


class SkipAction(CairnAgentError):
    """This action cannot run now; the next plan will see why."""
    code = "skipped"


@dataclass
class Outcome:
    """What a pass did (and what it saw: the local paths it may have changed)."""

    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    disk_full: bool = False
    uploaded: int = 0
    downloaded: int = 0
    touched: list[str] = field(default_factory=list)   # local paths the plan may have changed
    reshuffled: bool = False       # something was renamed aside: look at everything again

    def add(self, other: Outcome) -> None:
        """Count OTHER's results in (a round's total over its passes)."""
        self.done += other.done
        self.failed += other.failed
        self.conflicts += other.conflicts
        self.disk_full = self.disk_full or other.disk_full
        self.uploaded += other.uploaded
        self.downloaded += other.downloaded

    def summary(self) -> str | None:
        """One line for the default log level (each file's line is logged with -v)."""
        if not self.done and not self.failed:
            return None
        other = self.done - self.uploaded - self.downloaded
        late = f"; {len(self.failed)} not done yet" if self.failed else ""
        return (f"synced: {self.uploaded} uploaded, {self.downloaded} downloaded, "
                f"{other} other changes{late}")


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


class Context:
    """The synced folder an executor acts on, and the helpers its actions share."""

    def __init__(self, tree: RemoteTree, db: SyncDb, folder: FolderRecord, mirror: Mirror,
                 root: Path, device_name: str, *, downloads_allowed: bool = True,
                 lost_folders: dict[str, str] | None = None) -> None:
        self.tree = tree
        self.lost_folders = {} if lost_folders is None else lost_folders
        self.db = db
        self.folder = folder
        self.mirror = mirror
        self.root = root
        self.device_name = device_name
        self.downloads_allowed = downloads_allowed
        self.reshuffled = False
        self._folders: dict[str, RemoteNode] = {}   # opened once a pass, not once a file

    def local(self, path: str) -> Path:
        return self.root / path if path else self.root

    def within(self, path: str) -> Path:
        """The local PATH, to be read, written, made or removed: raises SkipAction if a
        folder above it is not a real folder here (a symbolic link, through which we would
        act outside DIR: the scan never looks into one, but a folder can be replaced by a
        link after the scan; the next plan sees what is there instead)."""
        found = folder_not_local(self.root, path)
        if found is not None:
            raise SkipAction(f"{found} is not a folder here (a symbolic link?); "
                             f"{path} is left alone")
        return self.local(path)

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
        if folder_id not in self._folders:     # (a folder's id and key never change)
            self._folders[folder_id] = self.mirror.node(folder_id)
        return self._folders[folder_id]

    def _record(self, entry: BaseEntry) -> None:
        with self.db.transaction():
            self.db.put_base(self.folder.id, entry)
            if entry.kind == "file" and entry.stat is not None:
                self.db.cache_content(self.folder.id, entry.path, entry.stat, entry.content)

    def _taken_names(self, folder_id: str | None, local_folder: str) -> set[str]:
        view = self.mirror.view
        names = {view.nodes[c].name for c in view.children.get(folder_id, ())
                 } if folder_id is not None else set()
        with contextlib.suppress(OSError):
            names |= set(os.listdir(self.local(local_folder)))
        return names

    def _remote_folder_at(self, path: str) -> str | None:
        return rules.remote_folder_at(path, self.folder.remote_root,
                                      self.db.base_at(self.folder.id, path),
                                      self._remote_at(path))

    def _remote_at(self, path: str) -> list[RemoteEntry]:
        """The remote node at PATH, if any (the view's index: no pass over the tree)."""
        node_id = self.mirror.view.at.get(path)
        return [] if node_id is None else [self.mirror.view.entries[node_id]]

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

    def _folder_id(self, path: str) -> str:
        """The id for a new remote folder at PATH: the one the appliance lost with recent
        history, once (agent/sync/rollback.py: another device making it again at the same
        moment then meets it, 409, and merges, instead of making a second folder of the
        same name); else a new one."""
        return self.lost_folders.pop(path, None) or new_node_id()

    async def _create_node(self, parent: RemoteNode, meta: NodeMeta,
                           node_id: str | None = None) -> NodeWrite:
        answer = await self.tree.api.create(node_create(node_id or new_node_id(),
                                                        new_node_key(), meta, parent.id,
                                                        parent.key))
        self.mirror.absorb(answer.node)
        return answer
