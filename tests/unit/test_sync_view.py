"""The remote view kept in place (agent/sync/view.py) equals the view built from scratch,
whatever nodes are put and dropped, and it reports every path whose entry changed."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sync.model import RemoteEntry
from agent.sync.view import Node, RemoteView, remote_view

ROOT = "root"
NAMES = ["a", "b", "c.txt", "d"]


def node(rng: random.Random, node_id: str, folders: list[str]) -> Node:
    """A random node; a folder goes only into folders made before it (the appliance
    refuses a move into one's own subtree)."""
    kind = "dir" if node_id.startswith("dir") else "file"
    if kind == "dir":
        folders = folders[:folders.index(node_id)] if node_id in folders else folders
    return Node(node_id, rng.choice(folders), rng.choice(NAMES), kind,  # type: ignore[arg-type]
                rng.randint(1, 3), rng.random() < 0.9, 1, 1, 0o644, rng.choice(["x", "y"]),
                rng.choice(["laptop", "desktop"]), float(rng.randint(1, 3)), 0.0)


def changed_paths(before: dict[str, RemoteEntry], after: dict[str, RemoteEntry]) -> set[str]:
    return {e.path for node_id in set(before) | set(after)
            if before.get(node_id) != after.get(node_id)
            for e in (before.get(node_id), after.get(node_id)) if e is not None}


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_the_view_kept_in_place_equals_the_view_built_anew(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"dir{i}" for i in range(4)] + [f"file{i}" for i in range(8)]
    nodes = {i: node(rng, i, [ROOT, *ids[:4]]) for i in ids if rng.random() < 0.7}
    view = RemoteView(ROOT, list(nodes.values()))
    assert view.entries == remote_view(nodes.values(), ROOT)
    for _ in range(rng.randint(1, 12)):
        before = dict(view.entries)
        target = rng.choice(ids)
        if rng.random() < 0.25:
            view.drop(target)
            stack = [target]
            while stack:                 # the mirror drops a subtree as one
                current = stack.pop()
                nodes.pop(current, None)
                stack += [n.node_id for n in nodes.values() if n.parent_id == current]
        else:
            nodes[target] = node(rng, target, [ROOT, *ids[:4]])
            view.put(nodes[target])
        expected = remote_view(nodes.values(), ROOT)
        assert view.entries == expected
        assert view.at == {e.path: e.node_id for e in expected.values()}
        assert view.take_touched() >= changed_paths(before, expected)
