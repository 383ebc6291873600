"""`Shared with me/OWNER/…` on the drive, read-only.

What others shared with the user lives outside the user's tree, so the mirror does not
hold it. This keeps it in the same `remote` table under a folder record of its own
(`<shared>`), with two synthetic folders above the shared items — `Shared with me` under
the user's root and one per owner — so the index serves it with the same queries, offline
too. It is listed again whenever the feed shows a change to a node the user does not own
(or an unshare): the new rows are compared with the old and each difference is reported
like a mirror change, so the kernel's caches follow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from agent.crypto.nodes import open_metadata
from agent.errors import CairnAgentError, IntegrityError
from agent.remote import RemoteTree, child_key
from agent.sync.mirror import row_from
from agent.sync.shared_plan import SHARED_FOLDER
from agent.sync.state import RemoteRow
from fuse.index import SHARED_RECORD, DriveIndex
from protocol.ids import b64decode
from protocol.models import NodeOut

log = logging.getLogger("cairn.drive")

SHARED_ROOT_ID = "shared-with-me"


def owner_folder_id(owner: str) -> str:
    return f"{SHARED_ROOT_ID}/{owner}"


def _folder_row(node_id: str, parent_id: str, name: str) -> RemoteRow:
    return RemoteRow(node_id=node_id, parent_id=parent_id, name=name, kind="dir", version=1,
                     uploaded=True, size=0, mtime_ns=0, mode=0o555, content="", device="",
                     created_at=0.0, updated_at=0.0, key=b"", meta=b"")


class SharedTree:
    def __init__(self, tree: RemoteTree, index: DriveIndex, root_id: str,
                 on_change: Callable[[RemoteRow | None, RemoteRow | None], None]) -> None:
        self.tree = tree
        self.index = index
        self.root_id = root_id
        self.on_change = on_change
        self.record = index.sync_db.folder(SHARED_RECORD) or \
            index.sync_db.add_folder(SHARED_RECORD, SHARED_ROOT_ID, SHARED_FOLDER)

    async def refresh(self) -> int:
        """List what is shared with the user again; the number of rows that changed."""
        self.tree.forget_shares()
        rows: dict[str, RemoteRow] = {}
        for item in await self.tree.api.shared_with_me():
            if item.node.deleted:
                continue
            try:
                key = await self.tree.key_of(item.node)
                top = self._row(item.node, key, owner_folder_id(item.owner))
            except (CairnAgentError, ValueError) as exc:
                log.warning("skipping an item %s shared: %s", item.owner, exc)
                continue
            owner = owner_folder_id(item.owner)
            rows.setdefault(SHARED_ROOT_ID, _folder_row(SHARED_ROOT_ID, self.root_id,
                                                        SHARED_FOLDER))
            rows.setdefault(owner, _folder_row(owner, SHARED_ROOT_ID, item.owner))
            rows[top.node_id] = top
            if top.kind == "dir":
                await self._walk(top, rows)
        return self._store(rows)

    def _row(self, raw: NodeOut, key: bytes, parent_id: str) -> RemoteRow:
        meta = open_metadata(key, raw.id, raw.kind, b64decode(raw.metadata))
        row = row_from(raw, key, meta)
        return replace(row, parent_id=parent_id)

    async def _walk(self, folder: RemoteRow, rows: dict[str, RemoteRow]) -> None:
        async for raw in self.tree.api.children(folder.node_id):
            if raw.deleted:
                continue
            try:
                row = self._row(raw, child_key(folder.key, raw), folder.node_id)
            except (IntegrityError, ValueError) as exc:
                log.warning("skipping a shared node %s: %s", raw.id, exc)
                continue
            rows[row.node_id] = row
            if row.kind == "dir":
                await self._walk(row, rows)

    def _store(self, rows: dict[str, RemoteRow]) -> int:
        db = self.index.sync_db
        folder = self.record.id
        old = {row.node_id: row for row in db.remote_rows(folder)}
        changed = 0
        with db.transaction():
            for node_id, before in old.items():
                if node_id not in rows:
                    self.on_change(before, None)
                    db.db.execute("DELETE FROM remote WHERE folder = ? AND node_id = ?",
                                  (folder, node_id))
                    changed += 1
            for node_id, row in rows.items():
                known = old.get(node_id)
                if known != row:
                    self.on_change(known, row)
                    db.put_remote(folder, row)
                    changed += 1
            db.set_cursor(folder, 0)
        return changed
