"""The incremental plan (agent/sync/scope.py) equals the full plan: random trees, random
changes to them, and the plan over the pending and touched paths only."""

from __future__ import annotations

import random
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sync.model import BaseEntry, LocalEntry, RemoteEntry, Stat, parent_of
from agent.sync.planner import plan
from agent.sync.scope import Trees, index_base, index_remote, pending_of, plan_touched

T = TypeVar("T", RemoteEntry, BaseEntry)
ROOT = "root"
FOLDERS = ["a", "a/d", "b", "b/e"]
FILES = ["x", "y", "a/f", "a/g", "a/d/h", "b/i", "b/e/j", "b/e/k"]
KIND = {**{p: "dir" for p in FOLDERS}, **{p: "file" for p in FILES}}


def _with_parents(paths: set[str]) -> set[str]:
    out = set(paths)
    for path in paths:
        parent = parent_of(path)
        while parent:
            out.add(parent)
            parent = parent_of(parent)
    return out


def _same_kind_elsewhere(rng: random.Random, path: str) -> str:
    return rng.choice([p for p in KIND if KIND[p] == KIND[path]])


def random_trees(rng: random.Random) -> tuple[dict[str, LocalEntry], dict[str, RemoteEntry],
                                              dict[str, BaseEntry]]:
    """Base: some paths, node `n:PATH` at PATH. Remote and local: each base node kept,
    edited, moved or deleted, plus new items; the parents of everything present."""
    inode = {p: i + 1 for i, p in enumerate(KIND)}
    synced = {p for p in sorted(KIND) if rng.random() < 0.6}
    base = {}
    for path in sorted(_with_parents(synced)):
        stat = None if rng.random() < 0.05 else Stat(1, 1, 0o644, inode[path])
        base[f"n:{path}"] = BaseEntry(f"n:{path}", path, KIND[path],  # type: ignore[arg-type]
                                      rng.choice([1, 2]), "c1", stat)
    remote: dict[str, RemoteEntry] = {}
    taken: set[str] = set()
    for entry in base.values():
        roll = rng.random()
        if roll < 0.15:
            continue                                    # deleted there
        path = _same_kind_elsewhere(rng, entry.path) if roll < 0.3 else entry.path
        if path in taken:
            path = entry.path
        if path in taken:
            continue
        taken.add(path)
        version = entry.version + (1 if rng.random() < 0.3 else 0)
        remote[entry.node_id] = _remote(entry.node_id, path, version, rng)
    for path in KIND:
        if path not in taken and rng.random() < 0.2:
            taken.add(path)
            remote[f"r:{path}"] = _remote(f"r:{path}", path, 1, rng)
    for path in sorted(_with_parents(taken) - taken):
        remote[f"p:{path}"] = _remote(f"p:{path}", path, 1, rng)
    if remote and rng.random() < 0.2:
        victim = rng.choice(sorted(remote))
        e = remote[victim]
        remote[victim] = RemoteEntry(e.node_id, e.parent_id, e.path + " (copy)", e.kind,
                                     e.version, e.size, e.mtime_ns, e.mode, e.content,
                                     e.uploaded, name_clash=True,
                                     clash_duplicate=rng.random() < 0.5)
    local: dict[str, LocalEntry] = {}
    for entry in base.values():
        roll = rng.random()
        if roll < 0.15:
            continue                                    # deleted here
        path = _same_kind_elsewhere(rng, entry.path) if roll < 0.3 else entry.path
        if path in local:
            continue
        size = 2 if rng.random() < 0.3 else 1
        local[path] = _local(path, KIND[entry.path], inode[entry.path], size, rng)
    for path in KIND:
        if path not in local and rng.random() < 0.2:
            local[path] = _local(path, KIND[path], 100 + inode[path], 1, rng)
    for path in sorted(_with_parents(set(local)) - set(local)):
        local[path] = _local(path, "dir", 200 + inode[path], 0, rng)
    return local, remote, base


def _remote(node_id: str, path: str, version: int, rng: random.Random) -> RemoteEntry:
    return RemoteEntry(node_id, ROOT, path, KIND[path], version, 1, 1,  # type: ignore[arg-type]
                       0o644, rng.choice(["c1", "c2"]), rng.random() < 0.9)


def _local(path: str, kind: str, inode: int, size: int, rng: random.Random) -> LocalEntry:
    content = rng.choice([None, "c1", "c2"]) if kind == "file" else None
    return LocalEntry(path, kind, Stat(size, 1, 0o644, inode),  # type: ignore[arg-type]
                      content, rng.random() < 0.9)


def trees_of(local: dict[str, LocalEntry], remote: dict[str, RemoteEntry],
             base: dict[str, BaseEntry]) -> Trees:
    """The trees, one node per path in the remote view and in the base, as the mirror and
    the database keep them."""
    remote, base = _one_per_path(remote), _one_per_path(base)
    return Trees(local, remote, index_remote(remote), base, index_base(base))


def _one_per_path(nodes: dict[str, T]) -> dict[str, T]:
    seen: set[str] = set()
    kept = {}
    for node_id, entry in sorted(nodes.items()):
        if entry.path not in seen:
            seen.add(entry.path)
            kept[node_id] = entry
    return kept


def mixed(rng: random.Random, old: dict[str, object], new: dict[str, object]
          ) -> dict[str, object]:
    """OLD with a random few of its keys taken from NEW (added, replaced or removed)."""
    out = dict(old)
    for key in sorted(set(old) | set(new)):
        if rng.random() < 0.2:
            if key in new:
                out[key] = new[key]
            else:
                out.pop(key, None)
    return out


def touched_between(before: Trees, after: Trees) -> set[str]:
    """What the engine hears of: every path whose entry changed in any tree (old and new
    paths of a node)."""
    touched = {p for p in set(before.local) | set(after.local)
               if before.local.get(p) != after.local.get(p)}
    for old, new in ((before.remote, after.remote), (before.base, after.base)):
        for node_id in set(old) | set(new):
            if old.get(node_id) != new.get(node_id):  # type: ignore[comparison-overlap]
                touched.update(e.path for e in (old.get(node_id), new.get(node_id))
                               if e is not None)
    return touched


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_the_incremental_plan_equals_the_full_plan(seed: int) -> None:
    rng = random.Random(seed)
    before = trees_of(*random_trees(rng))
    other = random_trees(rng)
    after_parts = [mixed(rng, old, new) for old, new in  # type: ignore[arg-type]
                   zip((before.local, before.remote, before.base), other, strict=True)]
    after = trees_of(*after_parts)  # type: ignore[arg-type]
    pending = pending_of(before)
    incremental, pending_now = plan_touched(after, pending, touched_between(before, after))
    assert incremental == plan(after.local, after.remote, after.base)
    assert pending_now >= pending_of(after)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_nothing_touched_and_nothing_pending_plans_nothing(seed: int) -> None:
    trees = trees_of(*random_trees(random.Random(seed)))
    full = plan(trees.local, trees.remote, trees.base)
    if not pending_of(trees):
        assert full.empty and not full.waiting
    assert plan_touched(trees, pending_of(trees), set())[0] == full
