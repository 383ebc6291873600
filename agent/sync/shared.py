"""What others shared with this user, mirrored read-only under `DIR/Shared with me/OWNER/`.

One way only: the appliance's shared items (files, and folders with everything in them)
are downloaded there, kept current, and removed when unshared or deleted. The user cannot
change them on the appliance, so a local change there is not lost but moved out: an edited
or new file becomes a conflicted copy at the top of DIR (the user's own tree, so it syncs
like any file), with a warning saying so, and the shared original is downloaded again.

The name `Shared with me` is reserved at the top of a synced folder; the main sync never
looks inside it. A table `shared` records what was written here (path, node, version, and
the file's stat), which is how a local change is told apart from an old download.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from agent.download import download_file
from agent.errors import CairnAgentError, FileChangedError
from agent.remote import RemoteNode, RemoteTree
from agent.sync.ignore import IgnoreRules
from agent.sync.model import Stat, name_of, parent_of
from agent.sync.names import unique_copy_name
from agent.sync.scan import is_dir, lstat_or_none, scan_tree, stat_of
from agent.sync.shared_plan import SHARED_FOLDER, Shared, Written, plan_shared
from agent.sync.state import SyncDb

log = logging.getLogger("cairn.sync")

SCHEMA = """
CREATE TABLE IF NOT EXISTS shared (
    folder INTEGER NOT NULL, path TEXT NOT NULL, node_id TEXT NOT NULL,
    version INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    mode INTEGER NOT NULL, inode INTEGER NOT NULL, PRIMARY KEY (folder, path));
"""


async def list_shared(tree: RemoteTree) -> dict[str, RemoteNode]:
    """relative path under DIR -> node, for everything shared with the user."""
    tree.forget_shares()
    found: dict[str, RemoteNode] = {}
    for node, owner in sorted(await tree.shared_with_me(), key=lambda i: (i[1], i[0].id)):
        if node.deleted:
            continue
        path = f"{SHARED_FOLDER}/{owner}/{node.name}"
        if path in found:
            path = f"{path} ({node.id[:8]})"
        found[path] = node
        if node.is_dir:
            await _walk(tree, node, path, found)
    return found


async def _walk(tree: RemoteTree, folder: RemoteNode, path: str,
                found: dict[str, RemoteNode]) -> None:
    for child in await tree.children(folder):
        child_path = f"{path}/{child.name}"
        if child_path in found:
            continue
        found[child_path] = child
        if child.is_dir:
            await _walk(tree, child, child_path, found)


class SharedMirror:
    def __init__(self, tree: RemoteTree, db: SyncDb, folder_id: int, root: Path,
                 device_name: str) -> None:
        self.tree = tree
        self.db = db
        self.folder_id = folder_id
        self.root = root
        self.device_name = device_name
        self.remote: dict[str, RemoteNode] | None = None
        db.db.execute(SCHEMA)

    def _written(self) -> dict[str, Written]:
        return {str(path): Written(str(node), int(version), Stat(size, mtime, mode, inode))
                for path, node, version, size, mtime, mode, inode in self.db.db.execute(
                    "SELECT path, node_id, version, size, mtime_ns, mode, inode FROM shared"
                    " WHERE folder = ?", (self.folder_id,))}

    def _record(self, path: str, node: RemoteNode, file_stat: Stat) -> None:
        self.db.db.execute("INSERT OR REPLACE INTO shared VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (self.folder_id, path, node.id, node.version, file_stat.size,
                            file_stat.mtime_ns, file_stat.mode, file_stat.inode))

    def _drop(self, path: str) -> None:
        self.db.db.execute("DELETE FROM shared WHERE folder = ? AND path = ?",
                           (self.folder_id, path))

    async def sync(self, refresh: bool) -> int:
        """Bring `Shared with me` in line; REFRESH lists the shares again (after a change
        to something not ours came through the feed). The number of files changed here."""
        if refresh or self.remote is None:
            self.remote = await list_shared(self.tree)
        if not self.remote and not is_dir(self.root / SHARED_FOLDER):
            return 0
        shared = {path: Shared(node.id, node.version, node.is_dir)
                  for path, node in self.remote.items()}
        steps = plan_shared(shared, self._written(), self._local_files())
        changed = sum(self._move_out(path) for path in steps.move_out)
        for folder in steps.folders:
            os.makedirs(self.root / folder, exist_ok=True)
        for path, expect in steps.downloads:
            changed += await self._download(path, self.remote[path], expect)
        changed += sum(self._remove(path) for path in steps.remove)
        for path in steps.forget:
            self._drop(path)
        self._remove_empty_folders(self.remote)
        return changed

    def _local_files(self) -> dict[str, Stat]:
        top = self.root / SHARED_FOLDER
        if not is_dir(top):
            return {}
        scan = scan_tree(top, IgnoreRules.from_text(""), {}, time.time_ns(), 0.0)
        return {f"{SHARED_FOLDER}/{path}": entry.stat for path, entry in scan.entries.items()
                if entry.kind == "file"}

    def _move_out(self, path: str) -> int:
        taken = set(os.listdir(self.root))
        copy = unique_copy_name(name_of(path), self.device_name, time.time(), taken)
        try:
            os.rename(self.root / path, self.root / copy)
        except OSError as exc:
            log.warning("cannot move %s out of %s: %s", path, SHARED_FOLDER, exc.strerror)
            return 0
        log.warning("%s is shared with you read-only: your change is kept as %s in your "
                    "own files", path, copy)
        self._drop(path)
        return 1

    async def _download(self, path: str, node: RemoteNode, expect: Stat | None) -> int:
        target = self.root / path

        def unchanged() -> None:
            if lstat_or_none(target) != expect:
                raise FileChangedError(f"{target} changed meanwhile")

        try:
            unchanged()
            os.makedirs(target.parent, exist_ok=True)
            stats = await download_file(self.tree, node, target, show_progress=False,
                                        guard=unchanged)
        except CairnAgentError as exc:
            log.warning("cannot download %s: %s", path, exc.message)
            return 0
        assert stats.written is not None     # (as written: an edit just after is new)
        self._record(path, stats.node or node, stat_of(stats.written))
        log.debug("downloaded %s", path)
        return 1

    def _remove(self, path: str) -> int:
        known = self._written().get(path)
        target = self.root / path
        if known is None or lstat_or_none(target) != known.stat:
            return 0                         # changed meanwhile: moved out next time
        os.unlink(target)
        log.debug("removed %s (no longer shared with you)", path)
        return 1

    def _remove_empty_folders(self, remote: dict[str, RemoteNode]) -> None:
        top = self.root / SHARED_FOLDER
        if not is_dir(top):
            return
        keep = {parent_of(p) for p in remote} | set(remote)
        for folder, _dirs, _files in os.walk(top, topdown=False):
            relative = os.path.relpath(folder, self.root)
            if relative not in keep and not any(k.startswith(relative + "/") for k in keep):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        if not remote and is_dir(top) and not os.listdir(top):
            shutil.rmtree(top, ignore_errors=True)
