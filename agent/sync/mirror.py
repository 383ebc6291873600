"""The remote tree of a synced folder, mirrored in the sync database and kept current from
the appliance's changes feed.

First run: note the newest cursor, then list the remote folder recursively. Afterwards:
pull `/changes` from the cursor; each change carries the node as it is now, so applying
one is an upsert (decrypting with the parent's key, which the mirror holds) or a removal
(deleted, moved out of the folder, or no longer visible). A folder that appears (moved in,
or restored) is listed with everything in it.

`remote_view` turns the rows into the planner's RemoteEntry map: a path for every node,
and — where two nodes share a name in one folder (made on two devices at once) — a
conflicted-copy name for the newer ones (by creation time, then id: every device picks the
same), which the planner then makes real, or deletes if it is a file identical to the
older one.
"""

from __future__ import annotations

import base64
import logging
from collections import defaultdict
from typing import Any

from agent.crypto.nodes import NodeKind, NodeMeta, open_metadata, unwrap_key
from agent.errors import CairnAgentError, IntegrityError, RemoteNotFoundError
from agent.remote import RemoteNode, RemoteTree
from agent.sync.model import RemoteEntry, content_of_refs
from agent.sync.names import unique_copy_name
from agent.sync.state import FolderRecord, RemoteRow, SyncDb

log = logging.getLogger(__name__)

PAGE = 1000
FEED_PAGE = 2000


def row_from(raw: dict[str, Any], key: bytes, meta: NodeMeta) -> RemoteRow:
    return RemoteRow(node_id=raw["id"], parent_id=raw["parent"], name=meta.name,
                     kind=raw["kind"], version=int(raw["version"]),
                     uploaded=raw["status"] == "uploaded", size=meta.size,
                     mtime_ns=meta.mtime_ns, mode=meta.mode,
                     content=content_of_refs(meta.blocks), device=meta.device,
                     created_at=float(raw["created_at"]), updated_at=float(raw["updated_at"]),
                     key=key, meta=base64.b64decode(raw["metadata"]))


def open_row(row: RemoteRow) -> NodeMeta:
    return open_metadata(row.key, row.node_id, row.kind, row.meta)


def remote_view(rows: list[RemoteRow], root_id: str) -> dict[str, RemoteEntry]:
    """node id -> RemoteEntry with its path under the synced folder (the root excluded)."""
    children: dict[str, list[RemoteRow]] = defaultdict(list)
    for row in rows:
        if row.parent_id is not None:
            children[row.parent_id].append(row)
    view: dict[str, RemoteEntry] = {}
    pending = [(root_id, "")]
    while pending:
        folder_id, folder_path = pending.pop()
        by_name: dict[str, list[RemoteRow]] = defaultdict(list)
        for row in children.get(folder_id, []):
            by_name[row.name].append(row)
        taken = set(by_name)
        for name, group in by_name.items():
            path = f"{folder_path}/{name}" if folder_path else name
            group.sort(key=lambda r: (r.created_at, r.node_id))   # the same on every device
            winner = group[0]
            for index, row in enumerate(group):
                duplicate = False
                if index == 0:
                    entry_path, clash = path, False
                else:
                    copy = unique_copy_name(name, row.device, row.created_at, taken)
                    taken.add(copy)
                    entry_path, clash = (f"{folder_path}/{copy}" if folder_path else copy,
                                         True)
                    duplicate = (row.kind == winner.kind == "file" and row.uploaded
                                 and winner.uploaded and row.content == winner.content)
                view[row.node_id] = RemoteEntry(
                    node_id=row.node_id, parent_id=folder_id, path=entry_path,
                    kind=row.kind, version=row.version, size=row.size,
                    mtime_ns=row.mtime_ns, mode=row.mode, content=row.content,
                    uploaded=row.uploaded, device=row.device, updated_at=row.updated_at,
                    name_clash=clash, clash_duplicate=duplicate)
                if row.kind == "dir":
                    pending.append((row.node_id, entry_path))
    return view


class Mirror:
    def __init__(self, tree: RemoteTree, db: SyncDb, folder: FolderRecord) -> None:
        self.tree = tree
        self.db = db
        self.folder = folder
        self.root_id = folder.remote_root
        self.cursor = folder.cursor
        self.listed = folder.listed
        self.foreign_changes = 0      # changes to what others shared with us (or unshares)
        self._view: tuple[int, dict[str, RemoteEntry]] | None = None

    async def refresh(self) -> int:
        """Bring the mirror up to date; the number of changes applied."""
        if not self.listed:
            return await self.list_all()
        return await self.pull()

    async def list_all(self) -> int:
        me = await self.tree.connection.call("GET", "/me")
        cursor = int(me["latest_cursor"])
        root_node = (await self.tree.fetch(self.root_id)).node
        if root_node.deleted:
            raise RemoteNotFoundError("the synced remote folder was deleted; restore it "
                                      "(cairn restore) or sync to another one")
        root = await self.tree.open(root_node)
        root_raw = root_node.model_dump(mode="json")
        rows: list[RemoteRow] = [row_from(root_raw, root.key, root.meta)]
        await self._list_under(root_raw["id"], root.key, rows)
        with self.db.transaction():
            self.db.clear_remote(self.folder.id)
            for row in rows:
                self.db.put_remote(self.folder.id, row)
            self.db.set_cursor(self.folder.id, cursor)
        self.cursor, self.listed = cursor, True
        return len(rows)

    async def _list_under(self, folder_id: str, folder_key: bytes, rows: list[RemoteRow]
                          ) -> None:
        after = ""
        while True:
            page = await self.tree.connection.call(
                "GET", f"/files/{folder_id}/children", params={"after": after, "limit": PAGE})
            for raw in page["nodes"]:
                row = self._open(raw, folder_key)
                if row is None:
                    continue
                rows.append(row)
                if row.kind == "dir":
                    await self._list_under(row.node_id, row.key, rows)
            if not page["next_after"]:
                return
            after = page["next_after"]

    def _open(self, raw: dict[str, Any], parent_key: bytes) -> RemoteRow | None:
        """Decrypt a node under a parent we hold the key of; None (logged) if it does not
        open — a tampered node is left out, never synced."""
        try:
            key = unwrap_key(parent_key, base64.b64decode(raw["wrapped_key"]), raw["id"],
                             raw["parent"])
            kind: NodeKind = raw["kind"]
            meta = open_metadata(key, raw["id"], kind, base64.b64decode(raw["metadata"]))
        except (IntegrityError, ValueError) as exc:
            log.warning("skipping remote node %s: %s", raw.get("id"), exc)
            return None
        return row_from(raw, key, meta)

    async def pull(self) -> int:
        applied = 0
        while True:
            page = await self.tree.connection.call(
                "GET", "/changes", params={"cursor": self.cursor, "limit": FEED_PAGE})
            with self.db.transaction():
                for change in page["changes"]:
                    await self._apply(change)
                    applied += 1
                self.cursor = int(page["cursor"])
                self.db.set_cursor(self.folder.id, self.cursor)
            if not page["has_more"]:
                return applied

    async def _apply(self, change: dict[str, Any]) -> None:
        raw = change.get("node")
        if raw is None or raw["owner"] != self.tree.user:
            self.foreign_changes += 1
        if raw is None or raw["deleted"]:
            self.db.drop_remote_subtree(self.folder.id, change["node_id"])
            return
        self.absorb(raw)
        if raw["kind"] == "dir" and raw["id"] != self.root_id:
            row = self.db.remote_row(self.folder.id, raw["id"])
            if row is not None and not self._has_children(row.node_id):
                rows: list[RemoteRow] = []
                try:
                    await self._list_under(row.node_id, row.key, rows)
                except CairnAgentError as exc:
                    log.warning("cannot list %s: %s", row.name, exc.message)
                for child in rows:
                    self.db.put_remote(self.folder.id, child)

    def _has_children(self, node_id: str) -> bool:
        return self.db.db.execute("SELECT 1 FROM remote WHERE folder = ? AND parent_id = ? "
                                  "LIMIT 1", (self.folder.id, node_id)).fetchone() is not None

    def absorb(self, raw: dict[str, Any]) -> RemoteRow | None:
        """Take the node as the appliance now has it (from the feed or from the answer to
        our own write) into the mirror; the row, or None if it is not (any more) in the
        synced folder."""
        folder = self.folder.id
        if raw["deleted"]:
            self.db.drop_remote_subtree(folder, raw["id"])
            return None
        if raw["id"] == self.root_id:
            root = self.db.remote_row(folder, raw["id"])
            if root is None:
                return None
            try:
                meta = open_metadata(root.key, raw["id"], raw["kind"],
                                     base64.b64decode(raw["metadata"]))
            except (IntegrityError, ValueError) as exc:
                log.warning("the synced folder's own metadata does not open: %s", exc)
                return None
            row = row_from(raw, root.key, meta)
            self.db.put_remote(folder, row)
            return row
        parent = None if raw["parent"] is None else self.db.remote_row(folder, raw["parent"])
        if parent is None or parent.kind != "dir" or raw["owner"] != self.tree.user:
            self.db.drop_remote_subtree(folder, raw["id"])    # moved out of the folder
            return None
        opened = self._open(raw, parent.key)
        if opened is None:
            self.db.drop_remote_subtree(folder, raw["id"])
            return None
        self.db.put_remote(folder, opened)
        return opened

    def entries(self) -> dict[str, RemoteEntry]:
        """The remote view (cached until the mirror changes: do not modify)."""
        if self._view is None or self._view[0] != self.db.remote_revision:
            self._view = (self.db.remote_revision,
                          remote_view(self.db.remote_rows(self.folder.id), self.root_id))
        return self._view[1]

    def node(self, node_id: str) -> RemoteNode:
        """A mirrored node as the transfer code wants it (key and metadata opened)."""
        row = self.db.remote_row(self.folder.id, node_id)
        if row is None:
            raise RemoteNotFoundError(f"node {node_id} is no longer in the synced folder")
        self.tree.remember_key(row.node_id, row.key)
        return RemoteNode(id=row.node_id, parent=row.parent_id, kind=row.kind,
                          version=row.version,
                          status="uploaded" if row.uploaded else "uploading", deleted=False,
                          owner=self.tree.user, created_at=row.created_at,
                          updated_at=row.updated_at, key=row.key, meta=open_row(row))
