"""The remote tree of a synced folder, mirrored in the sync database and kept current from
the appliance's changes feed.

First run: note the newest cursor, then list the remote folder recursively. Afterwards:
pull `/changes` from the cursor; each change carries the node as it is now, so applying
one is an upsert (decrypting with the parent's key, which the mirror holds) or a removal
(deleted, moved out of the folder, or no longer visible). A folder that appears (moved in,
or restored) is listed with everything in it.

The planner's view of the rows (agent/sync/view.py) is kept in memory and updated in
place with every row written or dropped here; a pull that changes one node costs what
that node's folder holds, not what the whole folder holds. A whole listing rebuilds it
and says so (`relisted`): the engine then plans everything.

The cursor belongs to the appliance's history, named by its epoch (agent/sync/rollback.py).
Every feed page names its epoch; `check_history` (at the start, after the appliance was
out of reach, on the rescan) also compares the cursor with the appliance's newest. When
the history changed (the appliance was recovered from an older copy), the tree is listed
again and `on_rollback` — the sync engine re-basing the folder, the drive staging what it
wrote again — prepares (asking the appliance what it needs) and then runs in the same
transaction that writes the new listing and records the new epoch: a crash in between
leaves the old listing and the old epoch, and the next start notices again.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping

from agent.crypto.nodes import NodeMeta, open_metadata
from agent.errors import CairnAgentError, IntegrityError, RemoteNotFoundError
from agent.remote import RemoteNode, RemoteTree, child_key, open_node
from agent.sync.model import RemoteEntry, content_of_node
from agent.sync.rollback import Rollback, copy_versions, history_changed
from agent.sync.state import FolderRecord, RemoteRow, SyncDb
from agent.sync.view import Node, RemoteView
from protocol.ids import b64decode
from protocol.models import ChangeOut, FeedSpan, NodeOut

log = logging.getLogger(__name__)
OPENED_KEPT = 4096   # opened node metadata kept for the transfers that follow a pull
COPY_CHANGES_READ = 100_000   # changes since a restore read to learn the copy's versions


def row_from(raw: NodeOut, key: bytes, meta: NodeMeta) -> RemoteRow:
    return RemoteRow(node_id=raw.id, parent_id=raw.parent, name=meta.name, kind=raw.kind,
                     version=raw.version, uploaded=raw.status == "uploaded", size=meta.size,
                     mtime_ns=meta.mtime_ns, mode=meta.mode,
                     content=content_of_node(meta.blocks, meta.link), device=meta.device,
                     created_at=raw.created_at, updated_at=raw.updated_at,
                     key=key, meta=b64decode(raw.metadata), link=meta.link)


def _same_node(row: RemoteRow, raw: NodeOut) -> bool:
    """Whether RAW is the node as mirrored in ROW (same version, place, status and the
    very metadata bytes already opened and checked): decrypting it again is waste — a
    device's own uploads all come back through the feed."""
    return (row.version == raw.version and row.parent_id == raw.parent
            and row.uploaded == (raw.status == "uploaded")
            and row.updated_at == raw.updated_at
            and row.meta == b64decode(raw.metadata))


def open_row(row: RemoteRow) -> NodeMeta:
    return open_metadata(row.key, row.node_id, row.kind, row.meta)


def node_of(row: RemoteRow) -> Node:
    parent_id = None if row.parent_id is None else sys.intern(row.parent_id)
    return Node(sys.intern(row.node_id), parent_id, row.name, row.kind, row.version, row.uploaded,
                row.size, row.mtime_ns, row.mode, sys.intern(row.content),
                sys.intern(row.device), row.created_at, row.updated_at)


class Mirror:
    def __init__(self, tree: RemoteTree, db: SyncDb, folder: FolderRecord) -> None:
        self.tree = tree
        self.db = db
        self.folder = folder
        self.root_id = folder.remote_root
        self.cursor = folder.cursor
        self.listed = folder.listed
        self.foreign_changes = 0      # changes to what others shared with us (or unshares)
        self._view: RemoteView | None = None
        self.relisted = True          # the view was rebuilt: plan everything
        # Metadata opened lately (node id -> the sealed bytes and what they say): a node
        # pulled is about to be downloaded, and opening it twice is waste. Bounded.
        self._opened: dict[str, tuple[bytes, NodeMeta]] = {}
        # (node id, version) of files whose upload by another device stalled while we
        # fetched them as they arrived: waited for until complete, not fetched again.
        self.stalled: set[tuple[str, int]] = set()
        # Told of every row written or dropped (the row before, the row after; None for
        # none): the drive invalidates the kernel's caches from it.
        self.on_change: Callable[[RemoteRow | None, RemoteRow | None], None] | None = None
        self.epoch = folder.epoch     # the appliance's history the cursor belongs to
        self.check_next = True        # ask whether that is still so before the next pull
        self.lost_history: str | None = None    # why, while a listing after a loss is due
        # When the appliance's history changed: awaited with the new listing's entries
        # before it is written; what it returns runs inside the transaction that writes
        # it (the view then shows it), before the new epoch is recorded.
        self.on_rollback: Callable[[Rollback, Mapping[str, RemoteEntry]],
                                   Awaitable[Callable[[], None]]] | None = None

    async def refresh(self) -> int:
        """Bring the mirror up to date; the number of changes applied."""
        if not self.listed:
            return await self.list_all()
        if self.check_next:
            listed = await self.check_history()
            if listed is not None:
                return listed
        return await self.pull()

    async def check_history(self) -> int | None:
        """Whether the appliance lost history since the mirror was last current (another
        epoch, or a newest cursor below ours): if so, the tree is listed again (the rows
        listed), else None."""
        me = await self.tree.api.me()
        self.check_next = False
        if history_changed(self.epoch, me.epoch, self.cursor, me.latest_cursor) is None:
            self._adopt_epoch(me.epoch)
            return None
        return await self.list_all()

    def _adopt_epoch(self, epoch: str | None) -> None:
        """Record the appliance's epoch where none was known yet (a folder synced before
        the appliance had epochs: nothing to compare with)."""
        if self.epoch is None and epoch is not None:
            self.db.set_epoch(self.folder.id, epoch)
            self.epoch = epoch

    async def list_all(self) -> int:
        me = await self.tree.api.me()
        cursor = me.latest_cursor
        reason = history_changed(self.epoch, me.epoch, self.cursor, me.latest_cursor)
        if reason is not None and self.lost_history is None:
            log.warning("the appliance was restored from an older copy (%s); checking what "
                        "it lost", reason)
        if reason is not None:
            self.tree.forget_keys()    # an id may come back as another node, another key
        self.lost_history = reason     # (until the listing is written: the synced folder
        root_node = (await self.tree.fetch(self.root_id)).node    # itself may be lost)
        if root_node.deleted:
            raise RemoteNotFoundError("the synced remote folder was deleted; restore it "
                                      "(cairn restore) or sync to another one")
        root = await self.tree.open(root_node)
        rows: list[RemoteRow] = [row_from(root_node, root.key, root.meta)]
        await self._list_under(root_node.id, root.key, rows)
        settle: Callable[[], None] | None = None
        if reason is not None and self.on_rollback is not None:
            listed = RemoteView(self.root_id, map(node_of, rows)).entries
            settle = await self.on_rollback(
                Rollback(me.epoch, me.epoch_started_at, reason, me.epoch_started_cursor),
                listed)
        before = {row.node_id: row for row in self.db.remote_rows(self.folder.id)} \
            if self.on_change is not None and self.listed else {}
        with self.db.transaction():
            self.db.clear_remote(self.folder.id)
            for row in rows:
                self.db.put_remote(self.folder.id, row)
            self.db.set_cursor(self.folder.id, cursor)
            self._view, self.relisted = None, True
            if settle is not None:
                settle()
            if me.epoch is not None and (reason is not None or self.epoch is None):
                self.db.set_epoch(self.folder.id, me.epoch)
        self.cursor, self.listed = cursor, True
        self.lost_history = None
        if me.epoch is not None and (reason is not None or self.epoch is None):
            self.epoch = me.epoch
        self.check_next = False
        self._tell_relisted(before, rows)
        return len(rows)

    async def versions_in_copy(self, rollback: Rollback, wanted: Collection[str]
                               ) -> dict[str, int]:
        """The versions the copy had of the nodes in WANTED changed since ROLLBACK's epoch
        began (agent/sync/rollback.py `copy_versions`), from the feed after its start
        cursor — what changed since the recovery; empty if the appliance does not say
        (before API 1.4) or its history changed again meanwhile. At most
        COPY_CHANGES_READ changes are read: a node first changed after them has no
        version here, which only keeps the cautious answer (a conflict) for it."""
        if rollback.started_cursor is None:
            return {}
        changes: list[tuple[str, int, str]] = []
        read = 0
        async for page in self.tree.api.change_pages(rollback.started_cursor):
            if page.epoch != rollback.epoch:
                return {}
            changes.extend((c.node_id, c.version, c.kind) for c in page.changes
                           if c.node_id in wanted)
            read += len(page.changes)
            if read >= COPY_CHANGES_READ:
                log.warning("read the first %d changes since the restore only", read)
                break
        return copy_versions(changes)

    def _tell_relisted(self, before: dict[str, RemoteRow], rows: list[RemoteRow]) -> None:
        """Tell `on_change` what a listing that replaced the mirror changed in it."""
        if self.on_change is None or not before:
            return
        after = {row.node_id: row for row in rows}
        for node_id, old in before.items():
            if after.get(node_id) != old:
                self.on_change(old, after.get(node_id))
        for node_id, new in after.items():
            if node_id not in before:
                self.on_change(None, new)

    async def _list_under(self, folder_id: str, folder_key: bytes, rows: list[RemoteRow]
                          ) -> None:
        async for raw in self.tree.api.children(folder_id):
            opened = self._open(raw, folder_key)
            if opened is None:
                continue
            row = opened[0]
            rows.append(row)
            if row.kind == "dir":
                await self._list_under(row.node_id, row.key, rows)

    def _open(self, raw: NodeOut, parent_key: bytes) -> tuple[RemoteRow, NodeMeta] | None:
        """Decrypt a node under a parent we hold the key of; None (logged) if it does not
        open — a tampered node is left out, never synced."""
        try:
            node = open_node(raw, child_key(parent_key, raw))
        except (IntegrityError, ValueError) as exc:
            log.warning("skipping remote node %s: %s", raw.id, exc)
            return None
        return row_from(raw, node.key, node.meta), node.meta

    async def pull(self) -> int:
        """Apply the feed from the cursor. No transaction stays open across a request
        (the drive writes to the same database between them): a page's changes commit
        together, then the folders that appeared are listed, and only then the cursor
        moves past the page — after a crash in between, the page is applied again (its
        changes are upserts) and the folders are listed then."""
        applied = 0
        history_lost = False
        async for page in self.tree.api.change_pages(self.cursor):
            if page.epoch is not None and self.epoch is not None and page.epoch != self.epoch:
                history_lost = True     # the cursor means nothing in this history
                break
            self._adopt_epoch(page.epoch)
            appeared: list[RemoteRow] = []
            with self.db.transaction():
                for change in page.changes:
                    self._apply(change, appeared)
                    applied += 1
            for row in appeared:
                rows: list[RemoteRow] = []
                try:
                    await self._list_under(row.node_id, row.key, rows)
                except CairnAgentError as exc:
                    log.warning("cannot list %s: %s", row.name, exc.message)
                with self.db.transaction():
                    if self.db.remote_row(self.folder.id, row.node_id) is not None:
                        for child in rows:
                            self._put(child)
            with self.db.transaction():
                self.cursor = page.cursor
                self.db.set_cursor(self.folder.id, self.cursor)
        if history_lost:
            await self.list_all()
        return applied

    def _apply(self, change: ChangeOut, appeared: list[RemoteRow]) -> None:
        """Apply one change; a folder that appeared without contents (moved in, restored)
        goes to APPEARED, to be listed."""
        raw = change.node
        if raw is None or raw.owner != self.tree.user:
            self.foreign_changes += 1
        if raw is None or raw.deleted:
            self._drop(change.node_id)
            return
        self.absorb(raw)
        if raw.kind == "dir" and raw.id != self.root_id:
            row = self.db.remote_row(self.folder.id, raw.id)
            if row is not None and not self._has_children(row.node_id) \
                    and all(other.node_id != row.node_id for other in appeared):
                appeared.append(row)

    def _has_children(self, node_id: str) -> bool:
        return self.db.db.execute("SELECT 1 FROM remote WHERE folder = ? AND parent_id = ? "
                                  "LIMIT 1", (self.folder.id, node_id)).fetchone() is not None

    def pass_own(self, spans: Iterable[FeedSpan]) -> None:
        """SPANS: feed positions only our own writes filled, whose nodes are absorbed
        already. The cursor moves past each that starts where it stands (nothing from
        anyone else can be in between), so the feed is not pulled just to bring our own
        changes back; a gap stops it, and the next pull covers the rest."""
        moved = False
        for span in sorted(spans, key=lambda s: s.before):
            if not self.listed or span.before != self.cursor:
                break
            self.cursor, moved = span.after, True
        if moved:
            self.db.set_cursor(self.folder.id, self.cursor)

    def absorb(self, raw: NodeOut) -> RemoteRow | None:
        """Take the node as the appliance now has it (from the feed or from the answer to
        our own write) into the mirror; the row, or None if it is not (any more) in the
        synced folder."""
        folder = self.folder.id
        if raw.deleted:
            self._drop(raw.id)
            return None
        if raw.id == self.root_id:
            root = self.db.remote_row(folder, raw.id)
            if root is None:
                return None
            try:
                meta = open_metadata(root.key, raw.id, raw.kind, b64decode(raw.metadata))
            except (IntegrityError, ValueError) as exc:
                log.warning("the synced folder's own metadata does not open: %s", exc)
                return None
            row = row_from(raw, root.key, meta)
            self._put(row, meta)
            return row
        parent = self._parent_in_folder(raw)
        if parent is None:
            self._drop(raw.id)       # moved out of the folder
            return None
        known = self.db.remote_row(folder, raw.id)
        if known is not None and _same_node(known, raw):
            return known             # our own write coming back: nothing to open again
        opened = self._open(raw, parent.key)
        if opened is None:
            self._drop(raw.id)
            return None
        self._put(*opened)
        return opened[0]

    def absorb_written(self, raw: NodeOut, key: bytes, meta: NodeMeta,
                       sealed: str) -> RemoteRow | None:
        """Our own write as the appliance answered it. KEY and META are what we sealed
        (SEALED, base64) into it: when the answer carries exactly those bytes, its row is
        made from them instead of opening what we have just encrypted; anything else goes
        through `absorb`."""
        if raw.deleted or raw.id == self.root_id or raw.metadata != sealed \
                or raw.kind != meta.kind or self._parent_in_folder(raw) is None:
            return self.absorb(raw)
        row = row_from(raw, key, meta)
        self._put(row, meta)
        return row

    def _parent_in_folder(self, raw: NodeOut) -> RemoteRow | None:
        """RAW's parent if it is one of ours, a folder in the synced folder's mirror."""
        parent = None if raw.parent is None else self.db.remote_row(self.folder.id,
                                                                    raw.parent)
        if parent is None or parent.kind != "dir" or raw.owner != self.tree.user:
            return None
        return parent

    def _put(self, row: RemoteRow, meta: NodeMeta | None = None) -> None:
        if self.on_change is not None:
            old = self.db.remote_row(self.folder.id, row.node_id)
            if old != row:
                self.on_change(old, row)
        self.db.put_remote(self.folder.id, row)
        if self._view is not None:
            self._view.put(node_of(row))
        if meta is None:
            return
        if len(self._opened) >= OPENED_KEPT:
            del self._opened[next(iter(self._opened))]
        self._opened[row.node_id] = (row.meta, meta)

    def forget(self, node_id: str) -> None:
        """Drop a node (and what is under it) that the appliance no longer has."""
        self._drop(node_id)

    def _drop(self, node_id: str) -> None:
        if self.on_change is not None:
            old = self.db.remote_row(self.folder.id, node_id)
            if old is not None:
                self.on_change(old, None)
        self.db.drop_remote_subtree(self.folder.id, node_id)
        if self._view is not None:
            self._view.drop(node_id)

    @property
    def view(self) -> RemoteView:
        if self._view is None:
            self._view = RemoteView(self.root_id,
                                    map(node_of, self.db.remote_rows(self.folder.id)))
            self.relisted = True
        return self._view

    def entries(self) -> dict[str, RemoteEntry]:
        """The remote view by node id (kept current in place: do not modify)."""
        return self.view.entries

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
                          updated_at=row.updated_at, key=row.key, meta=self._meta_of(row))

    def _meta_of(self, row: RemoteRow) -> NodeMeta:
        sealed, meta = self._opened.get(row.node_id, (b"", None))
        return meta if meta is not None and sealed == row.meta else open_row(row)
