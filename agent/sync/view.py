"""The remote view: the mirror's nodes as the planner's RemoteEntry map (pure).

Every node gets the path it maps to under the synced folder (the root excluded). Where two
nodes share a name in one folder (made on two devices at once), the oldest (by creation
time, then id: every device picks the same) keeps the name and the others get a
conflicted-copy name, which the planner then makes real — or deletes, for a file identical
to the oldest one. Names are handled in sorted order, so copy names do not depend on the
order the nodes arrived in.

`remote_view` builds it from scratch; `RemoteView` keeps it current in place as nodes are
put and dropped (a pull changes a few nodes: only their folders are laid out again, and
the subtree of a folder that moved), and reports the paths whose entry changed.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from agent.sync.model import Kind, RemoteEntry
from agent.sync.names import unique_copy_name


@dataclass(frozen=True, slots=True)
class Node:
    """What the view needs of a mirrored node (the mirror's row without key and metadata)."""

    node_id: str
    parent_id: str | None
    name: str
    kind: Kind
    version: int
    uploaded: bool
    size: int
    mtime_ns: int
    mode: int
    content: str
    device: str
    created_at: float
    updated_at: float


def _layout(folder_id: str, folder_path: str, children: Iterable[Node]
            ) -> list[RemoteEntry]:
    """The entries of one folder's children."""
    by_name: dict[str, list[Node]] = defaultdict(list)
    for node in children:
        by_name[node.name].append(node)
    taken = set(by_name)
    entries = []
    for name in sorted(by_name):
        group = sorted(by_name[name], key=lambda n: (n.created_at, n.node_id))
        winner = group[0]
        for index, node in enumerate(group):
            entry_name, clash, duplicate = name, False, False
            if index:
                entry_name = unique_copy_name(name, node.device, node.created_at, taken)
                taken.add(entry_name)
                clash = True
                duplicate = (node.kind == winner.kind == "file" and node.uploaded
                             and winner.uploaded and node.content == winner.content)
            entries.append(RemoteEntry(
                node_id=node.node_id, parent_id=folder_id,
                path=sys.intern(f"{folder_path}/{entry_name}" if folder_path
                                else entry_name),     # shared with the other trees
                kind=node.kind, version=node.version, size=node.size,
                mtime_ns=node.mtime_ns, mode=node.mode, content=node.content,
                uploaded=node.uploaded, device=node.device, updated_at=node.updated_at,
                name_clash=clash, clash_duplicate=duplicate))
    return entries


def remote_view(nodes: Iterable[Node], root_id: str) -> dict[str, RemoteEntry]:
    """node id -> RemoteEntry, built from scratch."""
    children: dict[str, list[Node]] = defaultdict(list)
    for node in nodes:
        if node.parent_id is not None:
            children[node.parent_id].append(node)
    view: dict[str, RemoteEntry] = {}
    pending = [(root_id, "")]
    while pending:
        folder_id, folder_path = pending.pop()
        for entry in _layout(folder_id, folder_path, children.get(folder_id, [])):
            view[entry.node_id] = entry
            if entry.kind == "dir":
                pending.append((entry.node_id, entry.path))
    return view


class RemoteView:
    """The remote view kept current in place. `put` and `drop` change nodes; `entries`
    and `at` (path -> node id) are brought up to date lazily; `take_touched` hands over
    the paths (old and new) whose entry changed since it was last called."""

    def __init__(self, root_id: str, nodes: Iterable[Node]) -> None:
        self.root_id = root_id
        self.nodes: dict[str, Node] = {}
        self.children: dict[str, set[str]] = defaultdict(set)
        for node in nodes:
            self.nodes[node.node_id] = node
            if node.parent_id is not None:
                self.children[node.parent_id].add(node.node_id)
        self._entries = remote_view(self.nodes.values(), root_id)
        self._at = {entry.path: entry.node_id for entry in self._entries.values()}
        self._dirty: set[str] = set()       # folders to lay out again
        self._gone: set[str] = set()        # nodes dropped or moved out of reach
        self._touched: set[str] = set()

    def put(self, node: Node) -> None:
        old = self.nodes.get(node.node_id)
        if old == node:
            return                          # our own change coming back through the feed
        if old is not None and old.parent_id is not None:
            self.children[old.parent_id].discard(node.node_id)
            self._dirty.add(old.parent_id)
        self.nodes[node.node_id] = node
        if node.parent_id is not None:
            self.children[node.parent_id].add(node.node_id)
            self._dirty.add(node.parent_id)
        self._gone.add(node.node_id)        # unless a layout places it again

    def drop(self, node_id: str) -> None:
        """Drop NODE_ID and everything under it."""
        pending = [node_id]
        while pending:
            current = pending.pop()
            node = self.nodes.pop(current, None)
            if node is not None and node.parent_id is not None:
                self.children[node.parent_id].discard(current)
                self._dirty.add(node.parent_id)
            pending.extend(self.children.pop(current, ()))
            self._gone.add(current)

    @property
    def entries(self) -> dict[str, RemoteEntry]:
        """node id -> RemoteEntry (shared: do not modify)."""
        self._refresh()
        return self._entries

    @property
    def at(self) -> dict[str, str]:
        """path -> node id (shared: do not modify)."""
        self._refresh()
        return self._at

    def take_touched(self) -> set[str]:
        self._refresh()
        touched, self._touched = self._touched, set()
        return touched

    def _refresh(self) -> None:
        if not self._dirty and not self._gone:
            return
        dirty, self._dirty = self._dirty, set()
        placed: set[str] = set()
        laid_out: set[str] = set()
        for folder in sorted(dirty, key=self._depth):
            if folder in laid_out:
                continue
            if folder == self.root_id:
                self._lay_out(folder, "", placed, laid_out)
            elif folder in self._entries and self._entries[folder].kind == "dir":
                self._lay_out(folder, self._entries[folder].path, placed, laid_out)
        gone, self._gone = self._gone - placed, set()
        for node_id in gone:
            self._remove_subtree(node_id, placed)

    def _depth(self, folder: str) -> int:
        entry = self._entries.get(folder)
        return -1 if entry is None else entry.path.count("/")

    def _lay_out(self, folder_id: str, folder_path: str, placed: set[str],
                 laid_out: set[str]) -> None:
        pending = [(folder_id, folder_path)]
        while pending:
            folder, path = pending.pop()
            laid_out.add(folder)
            children = [self.nodes[c] for c in self.children.get(folder, ())]
            for entry in _layout(folder, path, children):
                placed.add(entry.node_id)
                old = self._entries.get(entry.node_id)
                if old == entry:
                    continue
                self._set(entry, old)
                if entry.kind == "dir" and (old is None or old.path != entry.path) \
                        and entry.node_id not in laid_out:
                    pending.append((entry.node_id, entry.path))

    def _set(self, entry: RemoteEntry, old: RemoteEntry | None) -> None:
        if old is not None:
            self._touched.add(old.path)
            if self._at.get(old.path) == old.node_id:
                del self._at[old.path]
        self._entries[entry.node_id] = entry
        self._at[entry.path] = entry.node_id
        self._touched.add(entry.path)

    def _remove_subtree(self, node_id: str, placed: set[str]) -> None:
        """Remove the entries of NODE_ID, no longer placed under the root (dropped, or
        moved under something that is not a synced folder), and of what is under it."""
        pending = [node_id]
        while pending:
            current = pending.pop()
            old = self._entries.pop(current, None)
            if old is None:
                continue
            self._touched.add(old.path)
            if self._at.get(old.path) == current:
                del self._at[old.path]
            pending.extend(c for c in self.children.get(current, ()) if c not in placed)
