"""The planner: three trees in, actions out. Pure — no I/O, no clock.

One call returns one *phase*; the engine executes it, refreshes the trees and asks again
until nothing is left, so every decision is taken against fresh state:

1. moves — a node whose path differs from its base path on either side (matched locally by
   inode). The remote side wins when both moved. Only the shallowest moves are returned
   (moving a folder moves what is in it). Name clashes on the remote side (two nodes, one
   name) are renamed here too.
2. hashes — content ids of local files a decision depends on (both sides changed, or an
   unsynced local file meets a remote one of the same name).
3. the rest, in an order that executes: records, folders top-down, transfers and conflicts,
   deletions bottom-up.

The rules, per node (L local, R remote, B base):
- only one side changed: that side's change is applied to the other;
- both edited a file: same content → nothing to do; else KeepBoth (the remote version is
  kept as a conflicted copy, the local one becomes the new version: the last writer keeps
  the name);
- edit against delete: the edit wins (re-uploaded or re-downloaded as a new item);
- a folder is deleted only if nothing under it changed on the other side; otherwise it is
  re-created and only the unchanged items in it are deleted;
- an unsynced local item meets a remote one of the same name: identical files merge, else
  the local one is renamed aside as a conflicted copy — nothing is overwritten;
- identical content here and there whose remote version never finished uploading (a device
  killed between making the node and sending its blocks) is uploaded again over it, never
  adopted: adopted, it stayed `uploading` for good and reached no other device.

A symbolic link is a file here (model.py: its content id is made from its target), so
these rules apply to links unchanged.

A remote file still being uploaded by another device is downloaded at once when it is big
(STREAM_FROM_BYTES or more: its blocks are fetched as they arrive, and it is renamed into
place only once complete) and waited for otherwise; where both sides changed, it is always
waited for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

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
    LocalEntry,
    MakeLocalDir,
    MakeRemoteDir,
    MoveLocal,
    MoveRemote,
    RemoteEntry,
    RenameLocalAside,
    Upload,
    is_within,
    parent_of,
)

E = TypeVar("E", BaseEntry, RemoteEntry)
STREAM_FROM_BYTES = 4 * 1024 * 1024   # one block: smaller files are complete in a moment


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    waiting: tuple[str, ...] = ()        # not ready yet: being written, or being uploaded
    remote_deletions: int = 0            # files this plan deletes on the appliance

    @property
    def empty(self) -> bool:
        return not self.actions


def path_key(path: str) -> list[str]:
    """Sort key: a folder before what it holds, siblings by name."""
    return path.split("/")


def match_local(local: Mapping[str, LocalEntry], base: Mapping[str, BaseEntry]
                ) -> dict[str, LocalEntry]:
    """node id -> the local entry that is that node now: at its base path (same kind), or
    else wherever its inode went (a local move)."""
    matched: dict[str, LocalEntry] = {}
    claimed: set[str] = set()
    unmatched: list[BaseEntry] = []
    for entry in base.values():
        here = local.get(entry.path)
        if here is not None and here.kind == entry.kind:
            matched[entry.node_id] = here
            claimed.add(entry.path)
        elif entry.stat is not None:
            unmatched.append(entry)
    by_inode: dict[int, LocalEntry] = {}
    for e in local.values():     # hard links: the first path by name, whatever the order
        if e.path not in claimed and (e.stat.inode not in by_inode
                                      or e.path < by_inode[e.stat.inode].path):
            by_inode[e.stat.inode] = e
    for entry in sorted(unmatched, key=lambda e: (e.path, e.node_id)):
        assert entry.stat is not None
        moved = by_inode.get(entry.stat.inode)
        if moved is not None and moved.kind == entry.kind:
            matched[entry.node_id] = moved
            del by_inode[entry.stat.inode]
    return matched


def _changed(entry: LocalEntry, base: BaseEntry) -> bool:
    if entry.kind == "dir":
        return False   # a folder's own time and mode follow its content; not synced
    return entry.stat != base.stat


@dataclass
class _Trees:
    local: Mapping[str, LocalEntry]
    remote: Mapping[str, RemoteEntry]
    base: Mapping[str, BaseEntry]
    matched: dict[str, LocalEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.matched = match_local(self.local, self.base)


def plan(local: Mapping[str, LocalEntry], remote: Mapping[str, RemoteEntry],
         base: Mapping[str, BaseEntry]) -> Plan:
    trees = _Trees(local, remote, base)
    moves = _moves(trees)
    if moves:
        return Plan(tuple(moves))
    return _reconcile(trees)


# --- phase 1: moves ------------------------------------------------------------------------

def _moves(trees: _Trees) -> list[Action]:
    candidates: list[tuple[str, Action]] = []   # (base path, action)
    records: list[Action] = []
    for entry in _in_path_order(trees.base.values()):
        here = trees.matched.get(entry.node_id)
        there = trees.remote.get(entry.node_id)
        if there is not None and there.name_clash:
            continue                      # renamed (or deleted) below, on both sides
        local_moved = here is not None and here.path != entry.path
        remote_moved = there is not None and there.path != entry.path
        if remote_moved and here is not None:
            assert there is not None
            if here.path != there.path:
                candidates.append((entry.path, MoveLocal(entry.node_id, here.path,
                                                         there.path)))
            else:   # both moved it to the same place: the base follows, and what else
                # changed on either side (an edit) is compared by the next plan
                records.append(Adopt(entry.node_id, there.path, entry.stat, entry.version,
                                     entry.content))
        elif local_moved and there is not None:
            assert here is not None
            candidates.append((entry.path, MoveRemote(entry.node_id, here.path)))
        elif local_moved or (remote_moved and here is None):
            # Moved on one side, deleted on the other: a move is an edit, and the edit
            # wins. Forgetting the base makes the survivor a new item on the next pass.
            records.append(Forget(entry.node_id))
    for node in _in_path_order(n for n in trees.remote.values() if n.name_clash):
        candidates += _clash(trees, node)
    moved_from = [path for path, _ in candidates]
    actions: list[Action] = list(records)
    for path, action in sorted(candidates, key=lambda c: path_key(c[0])):
        if any(other != path and is_within(path, other) for other in moved_from):
            continue   # an ancestor moves first and takes it along
        if isinstance(action, MoveRemote):
            actions += [a for a in _remote_parents(trees, action.to_path) if a not in actions]
        actions.append(action)
    return actions


def _in_path_order(entries: Iterable[E]) -> list[E]:
    """The same order whatever the trees' (a full or a cut-down plan: equal results)."""
    return sorted(entries, key=lambda e: (path_key(e.path), e.node_id))


def _clash(trees: _Trees, node: RemoteEntry) -> list[tuple[str, Action]]:
    """A node sharing its name with an older one: an identical file is deleted (the older
    one stands for it); anything else takes its conflicted-copy name on both sides."""
    if node.clash_duplicate:
        return [(node.path, DeleteRemote(node.node_id, node.path, node.version))]
    moves: list[tuple[str, Action]] = [(node.path, MoveRemote(node.node_id, node.path))]
    here = trees.matched.get(node.node_id)
    if here is not None and here.path != node.path:
        moves.append((here.path, MoveLocal(node.node_id, here.path, node.path)))
    return moves


def _remote_parents(trees: _Trees, path: str) -> list[Action]:
    """Folders to create on the appliance before something can be moved to PATH: missing
    ones, and ones deleted there meanwhile (their stale base entries forgotten first —
    a move into a deleted folder would fail on every pass and hold up everything else)."""
    live = {e.path: e for e in trees.base.values()
            if e.kind == "dir" and e.node_id in trees.remote}
    stale = {e.path: e for e in trees.base.values()
             if e.kind == "dir" and e.node_id not in trees.remote}
    missing: list[Action] = []
    parent = parent_of(path)
    while parent and parent not in live:
        missing.insert(0, MakeRemoteDir(parent))
        if parent in stale:
            missing.insert(0, Forget(stale[parent].node_id))
        parent = parent_of(parent)
    return missing


# --- phase 2 and 3: everything else --------------------------------------------------------

def _dirty_folders(paths: list[str]) -> set[str]:
    folders: set[str] = set()
    for path in paths:
        parent = parent_of(path)
        while parent and parent not in folders:
            folders.add(parent)
            parent = parent_of(parent)
    return folders


@dataclass
class _Buckets:
    hashes: list[str] = field(default_factory=list)
    records: list[Action] = field(default_factory=list)
    folders: list[Action] = field(default_factory=list)
    asides: list[Action] = field(default_factory=list)
    transfers: list[Action] = field(default_factory=list)
    deletions: list[Action] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    remote_deletions: int = 0


def _reconcile(trees: _Trees) -> Plan:
    base_by_path = {e.path: e for e in trees.base.values()}
    remote_by_path = {e.path: e for e in trees.remote.values()}
    unsynced_local = [e.path for e in trees.local.values()
                      if e.path not in base_by_path or _changed(e, base_by_path[e.path])
                      or e.kind != base_by_path[e.path].kind]
    changed_remote = [e.path for e in trees.remote.values()
                      if e.node_id not in trees.base
                      or trees.base[e.node_id].version != e.version]
    local_dirty = _dirty_folders(unsynced_local)
    remote_dirty = _dirty_folders(changed_remote)
    out = _Buckets()
    covered: list[str] = []
    paths = sorted(set(trees.local) | set(base_by_path) | set(remote_by_path), key=path_key)
    for path in paths:
        if any(is_within(path, folder) for folder in covered):
            continue
        _path(trees, path, base_by_path.get(path), remote_by_path.get(path), local_dirty,
              remote_dirty, covered, out)
    if out.hashes:
        return Plan((HashLocal(tuple(out.hashes)),), tuple(out.waiting))
    actions = (out.records + out.folders + out.asides + out.transfers
               + list(reversed(out.deletions)))
    return Plan(tuple(actions), tuple(out.waiting), out.remote_deletions)


def _path(trees: _Trees, path: str, base: BaseEntry | None, there: RemoteEntry | None,
          local_dirty: set[str], remote_dirty: set[str], covered: list[str],
          out: _Buckets) -> None:
    here = trees.local.get(path)
    if base is None:
        _without_base(path, here, there, out)
        return
    kind_changed = here is not None and here.kind != base.kind
    mine = None if kind_changed else here     # a file became a folder: delete, then create
    if there is not None and there.node_id != base.node_id:
        # The base node is gone remotely and another node took the name.
        out.records.append(Forget(base.node_id))
        if mine is not None and not _changed(mine, base):
            _download(there, path, mine, out)
        else:
            _without_base(path, here, there, out)
        return
    _with_base(trees, path, base, mine, trees.remote.get(base.node_id), local_dirty,
               remote_dirty, covered, out)
    if kind_changed:
        out.waiting.append(path)              # created once the old node is deleted


def _with_base(trees: _Trees, path: str, base: BaseEntry, here: LocalEntry | None,
               own: RemoteEntry | None, local_dirty: set[str], remote_dirty: set[str],
               covered: list[str], out: _Buckets) -> None:
    """Decide for a node in the base."""
    node = base.node_id
    if here is None and own is None:
        out.records.append(Forget(node))
        return
    if base.kind == "dir":
        _folder(trees, path, base, here, own, local_dirty, remote_dirty, covered, out)
        return
    remote_changed = own is not None and own.version != base.version
    if here is None:
        assert own is not None
        if remote_changed:          # deleted here, edited there: the edit wins
            out.records.append(Forget(node))
            _download(own, path, None, out)
        else:
            out.deletions.append(DeleteRemote(node, path, base.version))
            out.remote_deletions += 1
        return
    local_changed = _changed(here, base)
    if own is None:
        if local_changed:           # edited here, deleted there: the edit wins
            out.records.append(Forget(node))
            _upload(here, None, None, out)
        else:
            out.deletions.append(DeleteLocal(path, here.stat))
        return
    if local_changed and not remote_changed:
        _upload(here, node, base.version, out)
    elif remote_changed and not local_changed:
        _download(own, path, here, out)
    elif local_changed and remote_changed:
        if here.content is None:
            out.hashes.append(path)
        elif here.content == own.content and own.uploaded:
            out.records.append(Adopt(node, path, here.stat, own.version, own.content))
        elif here.content == own.content:   # an upload of it that never finished
            _upload(here, node, own.version, out)
        elif not here.stable or not own.uploaded:
            out.waiting.append(path)
        else:
            out.transfers.append(KeepBoth(node, path))
    return


def _folder(trees: _Trees, path: str, base: BaseEntry, here: LocalEntry | None,
            own: RemoteEntry | None, local_dirty: set[str], remote_dirty: set[str],
            covered: list[str], out: _Buckets) -> None:
    node = base.node_id
    if here is None:
        assert own is not None
        if path in remote_dirty or own.version != base.version:
            out.folders.append(MakeLocalDir(node, path))    # something new arrived in it
        else:
            files = sum(1 for e in trees.base.values()
                        if e.kind == "file" and is_within(e.path, path))
            out.deletions.append(DeleteRemote(node, path, own.version, files, "dir"))
            out.remote_deletions += files
            covered.append(path)
        return
    if own is None:
        if path in local_dirty:     # something changed in it here: keep it
            out.records.append(Forget(node))
            out.folders.append(MakeRemoteDir(path))
        else:
            out.deletions.append(DeleteLocal(path, None))
            covered.append(path)
        return
    if own.version != base.version:
        out.records.append(Adopt(node, path, here.stat, own.version, own.content))
    return


def _without_base(path: str, here: LocalEntry | None, there: RemoteEntry | None,
                  out: _Buckets) -> None:
    if here is not None and there is not None:
        if here.kind == "dir" and there.kind == "dir":
            out.records.append(Adopt(there.node_id, path, here.stat, there.version,
                                     there.content))
        elif here.kind != there.kind:
            out.asides.append(RenameLocalAside(path))
        elif here.content is None:
            out.hashes.append(path)
        elif here.content == there.content and there.uploaded:
            out.records.append(Adopt(there.node_id, path, here.stat, there.version,
                                     there.content))
        elif here.content == there.content:  # an upload of it that never finished
            _upload(here, there.node_id, there.version, out)
        elif not there.uploaded:
            out.waiting.append(path)
        else:
            out.asides.append(RenameLocalAside(path))
    elif here is not None:
        if here.kind == "dir":
            out.folders.append(MakeRemoteDir(path))
        else:
            _upload(here, None, None, out)
    elif there is not None:
        if there.kind == "dir":
            out.folders.append(MakeLocalDir(there.node_id, path))
        else:
            _download(there, path, None, out)


def _upload(here: LocalEntry, node: str | None, version: int | None, out: _Buckets) -> None:
    if here.stable:
        out.transfers.append(Upload(here.path, node, version, here.stat.size))
    else:
        out.waiting.append(here.path)


def _download(there: RemoteEntry, path: str, here: LocalEntry | None, out: _Buckets
              ) -> None:
    if there.uploaded or there.size >= STREAM_FROM_BYTES:
        out.transfers.append(Download(there.node_id, path,
                                      None if here is None else here.stat, there.size))
    else:
        out.waiting.append(path)
