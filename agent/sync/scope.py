"""Planning only what changed (pure): the incremental plan over touched paths.

The full plan (`planner.plan`) looks at every path of the folder; most are *in sync* —
the local item, the base entry and the remote node at that path agree — and the planner
decides nothing for them. A path is *out of sync* when any of these differ (see
`out_of_sync`); only such paths get actions.

So the engine keeps `pending`, the paths found out of sync by the last plan, and every
change to a tree reports the paths it touched (a local scan the paths it saw change, the
remote view the old and new paths of every node it changed, the base the paths it wrote).
A path neither pending nor touched was in sync and none of its three entries changed, so
it is in sync still. The next plan is the full planner run on the trees cut down to

    C = pending + touched, closed under: the other path of a node found at a C path in
        one tree (a move), the ancestors of every C path (a move's destination folders),
        and everything under a synced folder gone from one side (a folder delete counts
        and covers what is in it);

and it equals the full plan (a hypothesis property in tests/unit/test_sync_scope.py
checks that on random trees and changes). The full plan stays for the periodic rescan,
which also recomputes `pending` from scratch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from agent.sync.model import BaseEntry, LocalEntry, RemoteEntry, parent_of
from agent.sync.planner import Plan, plan


@dataclass(frozen=True)
class Trees:
    """The three trees with the indexes that let a plan look at a few paths only.
    `remote_at` and `base_at`: path -> node id (the base may briefly hold two nodes at
    one path; `base_at` keeps each)."""

    local: Mapping[str, LocalEntry]
    remote: Mapping[str, RemoteEntry]
    remote_at: Mapping[str, str]
    base: Mapping[str, BaseEntry]
    base_at: Mapping[str, Collection[str]]


def index_base(base: Mapping[str, BaseEntry]) -> dict[str, tuple[str, ...]]:
    at: dict[str, tuple[str, ...]] = {}
    for entry in base.values():
        at[entry.path] = (*at.get(entry.path, ()), entry.node_id)
    return at


def index_remote(remote: Mapping[str, RemoteEntry]) -> dict[str, str]:
    return {entry.path: entry.node_id for entry in remote.values()}


def out_of_sync(trees: Trees, path: str) -> bool:
    """Whether the planner may decide something at PATH: its local item, base entry and
    remote node do not all agree (a file's stat, a node's version and place)."""
    here = trees.local.get(path)
    there = trees.remote_at.get(path)
    synced = trees.base_at.get(path)
    if not synced:
        return here is not None or there is not None
    if len(synced) > 1 or there not in synced:
        return True
    entry = trees.base[next(iter(synced))]
    own = trees.remote.get(entry.node_id)
    if here is None or here.kind != entry.kind or own is None:
        return True
    if entry.kind == "file" and here.stat != entry.stat:
        return True
    return own.path != path or own.version != entry.version or own.name_clash


def pending_of(trees: Trees) -> set[str]:
    """Every path out of sync (a whole pass: at start and on the periodic rescan)."""
    paths = set(trees.local) | set(trees.remote_at) | set(trees.base_at)
    return {path for path in paths if out_of_sync(trees, path)}


def _ancestors(path: str) -> Iterable[str]:
    parent = parent_of(path)
    while parent:
        yield parent
        parent = parent_of(parent)


def scope(trees: Trees, paths: set[str]) -> set[str]:
    """PATHS closed as the module docstring says."""
    found = set(paths)
    for path in paths:
        for node_id in trees.base_at.get(path, ()):
            own = trees.remote.get(node_id)
            if own is not None:
                found.add(own.path)
        there = trees.remote_at.get(path)
        if there is not None and there in trees.base:
            found.add(trees.base[there].path)
    for path in list(found):
        found.update(_ancestors(path))
    for folder in [p for p in found if _folder_gone_on_a_side(trees, p)]:
        found.update(_under(trees, folder))
    return found


def _folder_gone_on_a_side(trees: Trees, path: str) -> bool:
    for node_id in trees.base_at.get(path, ()):
        entry = trees.base[node_id]
        here = trees.local.get(path)
        if entry.kind == "dir" and (here is None or here.kind != "dir"
                                    or node_id not in trees.remote):
            return True
    return False


def _under(trees: Trees, folder: str) -> set[str]:
    """Every path under FOLDER in any tree (a scan of the indexes: a folder delete is rare
    and touches all of it anyway)."""
    prefix = folder + "/"
    return {path for index in (trees.local, trees.remote_at, trees.base_at)
            for path in index if path.startswith(prefix)}


def plan_touched(trees: Trees, pending: set[str], touched: set[str]
                 ) -> tuple[Plan, set[str]]:
    """The plan for the paths PENDING (out of sync at the last plan) and TOUCHED (changed
    since in any tree), and the paths out of sync now."""
    paths = scope(trees, pending | touched)
    local = {p: trees.local[p] for p in sorted(paths) if p in trees.local}
    base: dict[str, BaseEntry] = {}
    remote: dict[str, RemoteEntry] = {}
    for path in sorted(paths):
        for node_id in sorted(trees.base_at.get(path, ())):
            base[node_id] = trees.base[node_id]
        there = trees.remote_at.get(path)
        if there is not None:
            remote[there] = trees.remote[there]
    for node_id in list(base):
        own = trees.remote.get(node_id)
        if own is not None:
            remote.setdefault(node_id, own)
    result = plan(local, remote, base)
    return result, {p for p in paths if out_of_sync(trees, p)}
