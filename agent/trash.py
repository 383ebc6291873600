"""`cairn trash` and `cairn restore`: what was deleted on any device, and bringing it back
within the appliance's grace period (`[gc] grace_days`, 7 by default).

What the appliance gives us, and what we make of it:

- `GET /trash` lists *deletion roots* only — a node deleted by itself, or the folder a
  recursive delete started from — newest first, in a single answer of at most 5,000 (it
  does not page: `next_after` is always null).
- A folder's delete tombstones its live subtree, every member with the folder's own
  `deleted_at`. The API does not expose `deleted_root`, so the members of a deletion are
  the deleted descendants reached through deleted folders that share the root's
  `deleted_at` (one timestamp per delete transaction). Something deleted by itself
  earlier inside that folder has an older `deleted_at`: it is a root of its own.
- Tombstones stay readable (`GET /files/{id}`, `children?include_deleted=true`) until
  they are purged, so the path a node had is found by walking up parent ids through
  deleted and live folders, decrypting each name with the key of the folder above. A
  folder above that was purged takes the keys with it: such a node shows as `…/id:<id>`.
- `POST /files/{id}/restore` brings back a root and exactly the members of its deletion,
  and refuses (409) while the node's folder is deleted. So a node inside a deleted folder
  is restored by restoring its deleted folders top-down first: each either is a root of
  its own or came back with the one above it.
- After the grace period, garbage collection purges the tombstones first and the blocks
  after, so what a user usually meets then is *nothing in the trash* (404); 410 (blocks
  reclaimed, tombstone not yet purged) is the narrow case in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.crypto.nodes import NodeKind
from agent.errors import (
    ApiError,
    ForbiddenError,
    RemoteConflictError,
    RemoteNotFoundError,
    UsageError,
)
from agent.remote import ID_PREFIX, RemoteNode, RemoteTree, child_key, open_node, split_path
from protocol.errors import ErrorCode
from protocol.limits import MAX_TRASH_PAGE
from protocol.models import NodeOut

TRASH_PAGE = MAX_TRASH_PAGE  # the most `GET /trash` answers at once
UNKNOWN_FOLDER = "…"       # stands for folders above a node that were purged
Raw = NodeOut              # a node as the API answers it


# --- values ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrashEntry:
    """One line of `cairn trash`."""

    id: str
    kind: NodeKind
    path: str                         # the path it had; `…/id:<id>` if a folder above is gone
    size: int                         # a file's size; a folder's: the files it took along
    deleted_at: float                 # the appliance's clock, seconds since the epoch
    items_inside: int                 # a folder: how many items its deletion took along
    deleted_with: str | None = None   # (--all) the path of the folder whose deletion took it

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "path": self.path, "size": self.size,
                "deleted_at": self.deleted_at, "items_inside": self.items_inside,
                "deleted_with": self.deleted_with}


@dataclass(frozen=True)
class Restored:
    """A node one restore call brought back, with the ITEMS_INSIDE its deletion took."""

    id: str
    kind: NodeKind
    path: str
    items_inside: int


@dataclass(frozen=True)
class RestoreResult:
    """What `cairn restore` did. FOLDERS are deleted folders above the node, restored first
    (top-down); CAME_WITH is the one whose deletion the node was part of, if any. OTHERS
    counts further deleted items that had the same path (the newest was taken). NAME_TAKEN
    holds the paths at which a live item already had the restored name."""

    node: Restored
    folders: tuple[Restored, ...] = ()
    came_with: str | None = None
    others: int = 0
    name_taken: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        node = self.node
        out = [f"restored {node.path}{_inside(node.items_inside)}"]
        if self.others:
            out.append(f"{self.others + 1} deleted items had that path; restored the most "
                       f"recently deleted (the other{'s are' if self.others > 1 else ' is'}"
                       " still in the trash)")
        for folder in self.folders:
            if folder.path == self.came_with:
                out.append(f"it was deleted with its folder {folder.path}: restored that"
                           f"{_inside(folder.items_inside)}")
            else:
                out.append(f"its folder {folder.path} was deleted too: restored it first"
                           f"{_inside(folder.items_inside)}")
        for path in self.name_taken:
            out.append(f"note: a live item is also named {path}; both are kept (syncing "
                       "devices give one a conflicted-copy name; name them by id: in "
                       "`cairn ls --json`)")
        return out


def _inside(count: int) -> str:
    if not count:
        return ""
    return f" (and {count} item{'s' if count != 1 else ''} inside)"


@dataclass(frozen=True)
class _Deleted:
    """A deleted node as we can see it: the path it had and, for a folder, the MEMBERS its
    deletion took along. NODE is None when a folder above it is gone (no key)."""

    raw: Raw
    node: RemoteNode | None
    path: str
    members: tuple[_Deleted, ...] = ()

    @property
    def id(self) -> str:
        return self.raw.id

    @property
    def kind(self) -> NodeKind:
        return self.raw.kind

    @property
    def deleted_at(self) -> float:
        return self.raw.deleted_at or 0.0

    @property
    def size(self) -> int:
        """A file's size (from its metadata when we can read it); a folder's: its files'."""
        own = self.raw.size if self.node is None else self.node.meta.size
        return own + sum(m.size for m in self.members)

    @property
    def items_inside(self) -> int:
        return sum(1 + m.items_inside for m in self.members)

    def walk(self) -> Iterator[_Deleted]:
        """This node, then its members, depth first."""
        yield self
        for member in self.members:
            yield from member.walk()

    def restored(self) -> Restored:
        return Restored(self.id, self.kind, self.path, self.items_inside)

    def entries(self, expand: bool) -> list[TrashEntry]:
        own = TrashEntry(self.id, self.kind, self.path, self.size, self.deleted_at,
                         self.items_inside)
        if not expand:
            return [own]
        return [own] + [TrashEntry(m.id, m.kind, m.path, m.size, m.deleted_at,
                                   m.items_inside, deleted_with=self.path)
                        for member in self.members for m in member.walk()]


# --- pure helpers ---------------------------------------------------------------------------

def join_path(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def normal_path(path: str) -> str:
    """`docs//a.txt/` → `/docs/a.txt`: how paths are compared with the ones nodes had."""
    return "/" + "/".join(split_path(path))


def is_within(path: str, folder: str) -> bool:
    """PATH lies strictly inside FOLDER."""
    return path.startswith(folder.rstrip("/") + "/")


def is_member(deleted_at: float, raw: Raw) -> bool:
    """RAW went with the deletion that happened at DELETED_AT (see the module docstring)."""
    return raw.deleted and raw.deleted_at == deleted_at


def newest(candidates: list[_Deleted]) -> _Deleted:
    return max(candidates, key=lambda d: d.deleted_at)


def open_child(parent: RemoteNode, raw: Raw) -> RemoteNode:
    """RemoteTree.open for a node whose parent is open already: no walk up, no request."""
    return open_node(raw, child_key(parent.key, raw))


# --- reading the trash ----------------------------------------------------------------------

class _Nodes:
    """Nodes by id, each fetched once, opened top-down from the root so that every key comes
    from the folder above (already open), and the paths they had."""

    def __init__(self, tree: RemoteTree) -> None:
        self.tree = tree
        self._raw: dict[str, Raw | None] = {}
        self._opened: dict[str, tuple[RemoteNode | None, str]] = {}

    async def raw(self, node_id: str) -> Raw | None:
        """The node as the appliance has it now; None once it is purged."""
        if node_id not in self._raw:
            try:
                self._raw[node_id] = (await self.tree.fetch(node_id)).node
            except RemoteNotFoundError:
                self._raw[node_id] = None
        return self._raw[node_id]

    async def opened(self, raw: Raw) -> tuple[RemoteNode | None, str]:
        """RAW opened (None if a folder above it is gone) and the path it had."""
        node_id = raw.id
        if node_id not in self._opened:
            self._raw.setdefault(node_id, raw)
            self._opened[node_id] = await self._open(raw)
        return self._opened[node_id]

    async def _open(self, raw: Raw) -> tuple[RemoteNode | None, str]:
        if raw.parent is None:
            return await self.tree.open(raw), "/"
        parent_raw = await self.raw(raw.parent)
        if parent_raw is None:
            return None, join_path(UNKNOWN_FOLDER, f"{ID_PREFIX}{raw.id}")
        parent, parent_path = await self.opened(parent_raw)
        if parent is None:
            return None, join_path(parent_path, f"{ID_PREFIX}{raw.id}")
        node = open_child(parent, raw)
        return node, join_path(parent_path, node.name)

    async def deleted_children(self, folder_id: str) -> list[Raw]:
        return [raw async for raw in self.tree.api.children(folder_id, include_deleted=True)
                if raw.deleted]

    async def deletion(self, raw: Raw) -> _Deleted:
        """Deleted RAW with the path it had and the members its deletion took along."""
        node, path = await self.opened(raw)
        return await self._with_members(raw, node, path, raw.deleted_at or 0.0)

    async def _with_members(self, raw: Raw, node: RemoteNode | None, path: str,
                            deleted_at: float) -> _Deleted:
        if raw.kind != "dir":
            return _Deleted(raw, node, path)
        members = []
        for child in await self.deleted_children(raw.id):
            if not is_member(deleted_at, child):
                continue   # deleted by itself before the folder: a trash entry of its own
            child_node = None if node is None else open_child(node, child)
            child_path = join_path(path, child_node.name if child_node is not None
                                   else f"{ID_PREFIX}{child.id}")
            self._raw[child.id] = child
            self._opened[child.id] = (child_node, child_path)
            members.append(await self._with_members(child, child_node, child_path,
                                                    deleted_at))
        return _Deleted(raw, node, path, tuple(members))


async def _trash_roots(tree: RemoteTree) -> list[Raw]:
    """Every deletion root the appliance lists, newest first."""
    return sorted(await tree.api.trash(), key=lambda raw: -(raw.deleted_at or 0.0))


async def trash(tree: RemoteTree, *, expand: bool = False) -> list[TrashEntry]:
    """What was deleted, newest first, with the paths the items had. A folder deleted with
    its contents is one entry with the number of items it took along; EXPAND also lists
    those items (each with `deleted_with`, the folder's path)."""
    nodes = _Nodes(tree)
    entries: list[TrashEntry] = []
    for raw in await _trash_roots(tree):
        entries.extend((await nodes.deletion(raw)).entries(expand))
    return entries


# --- restoring ------------------------------------------------------------------------------

def _nothing_at(what: str) -> RemoteNotFoundError:
    return RemoteNotFoundError(f"nothing deleted at {what} (`cairn trash` lists what can be "
                               "restored; deleted items are kept for the appliance's grace "
                               "period, 7 days by default)")


async def _by_path(tree: RemoteTree, nodes: _Nodes, path: str) -> tuple[_Deleted, int]:
    """The most recently deleted node that had PATH, and how many others had it."""
    target = normal_path(path)
    if target == "/":
        raise UsageError("the root folder is never in the trash")
    candidates: list[_Deleted] = []
    for raw in await _trash_roots(tree):
        _, had = await nodes.opened(raw)
        if had == target or (raw.kind == "dir" and is_within(target, had)):
            deletion = await nodes.deletion(raw)
            candidates.extend(d for d in deletion.walk() if d.path == target)
    if not candidates:
        raise _nothing_at(target)
    return newest(candidates), len(candidates) - 1


async def _by_id(tree: RemoteTree, nodes: _Nodes, remote: str) -> _Deleted:
    node_id = remote[len(ID_PREFIX):].strip().lower()
    if len(node_id) != 32 or any(c not in "0123456789abcdef" for c in node_id):
        raise UsageError(f"{remote!r}: a node id has 32 hex digits")
    raw = await nodes.raw(node_id)
    if raw is None:
        raise _nothing_at(remote)
    if raw.owner != tree.user:
        raise _not_yours(remote, raw)
    if not raw.deleted:
        _, path = await nodes.opened(raw)
        raise UsageError(f"{remote} is not deleted: it is {path}")
    return await nodes.deletion(raw)


def _not_yours(what: str, raw: Raw) -> ForbiddenError:
    return ForbiddenError(f"{what} belongs to {raw.owner}; only they can restore it",
                          status=403, api_code=ErrorCode.FORBIDDEN)


async def _deleted_folders_above(nodes: _Nodes, deleted: _Deleted) -> list[_Deleted]:
    """The deleted folders above DELETED, top-down, up to the first live one."""
    chain: list[_Deleted] = []
    parent_id = deleted.raw.parent
    while parent_id is not None:
        raw = await nodes.raw(parent_id)
        if raw is None:
            raise ApiError(f"{deleted.path} can no longer be restored: the folder it was in "
                           "was purged after the grace period", status=410,
                           api_code=ErrorCode.GONE)
        if not raw.deleted:
            break
        node, path = await nodes.opened(raw)
        chain.append(_Deleted(raw, node, path))
        parent_id = raw.parent
    return chain[::-1]


async def _restore_one(tree: RemoteTree, nodes: _Nodes, deleted: _Deleted
                       ) -> Restored | None:
    """Restore DELETED (with what its deletion took along) unless it is back already
    (with a folder above it, or by another device); what came back."""
    fresh = (await tree.fetch(deleted.id)).node
    if not fresh.deleted:
        return None
    deletion = await nodes.deletion(fresh)
    try:
        await tree.api.restore(deleted.id, fresh.version)
    except ForbiddenError:
        raise _not_yours(deleted.path, fresh) from None
    except RemoteNotFoundError:
        raise RemoteNotFoundError(f"{deleted.path} is no longer in the trash (purged after "
                                  "the grace period)") from None
    except RemoteConflictError as exc:
        raise RemoteConflictError(f"{deleted.path} cannot be restored: {exc.message}",
                                  status=exc.status, api_code=exc.api_code,
                                  details=exc.details) from None
    except ApiError as exc:
        if exc.api_code != ErrorCode.GONE:
            raise
        raise ApiError(f"{deleted.path} can no longer be restored: the appliance reclaimed "
                       "its data after the grace period", status=exc.status,
                       api_code=ErrorCode.GONE) from None
    return deletion.restored()


async def _name_taken(tree: RemoteTree, nodes: _Nodes, restored: Restored) -> bool:
    """Whether a live node other than RESTORED has its name in its folder now."""
    raw = await nodes.raw(restored.id)
    assert raw is not None
    node, _ = await nodes.opened(raw)
    parent_raw = None if raw.parent is None else await nodes.raw(raw.parent)
    if node is None or parent_raw is None:
        return False
    parent, _ = await nodes.opened(parent_raw)
    if parent is None:
        return False
    return any(c.name == node.name and c.id != node.id for c in await tree.children(parent))


async def restore(tree: RemoteTree, path_or_id: str) -> RestoreResult:
    """Bring back what was deleted at PATH_OR_ID (the path it had, or `id:<node>`): the most
    recently deleted node of that path, its deleted folders first (top-down), and whatever
    its deletion took along. A live item with the same name does not stop it (the API
    allows two nodes with one name; syncing devices rename one): the result says so.

    Raises RemoteNotFoundError when nothing deleted had that path, ForbiddenError for
    another user's node, and ApiError (status 410) once the data is reclaimed."""
    nodes = _Nodes(tree)
    if path_or_id.startswith(ID_PREFIX):
        chosen, others = await _by_id(tree, nodes, path_or_id), 0
    else:
        chosen, others = await _by_path(tree, nodes, path_or_id)
    folders = [restored for folder in await _deleted_folders_above(nodes, chosen)
               if (restored := await _restore_one(tree, nodes, folder)) is not None]
    node = await _restore_one(tree, nodes, chosen)
    came_with = None
    if node is None:   # it came back with a folder above it (or another device was quicker)
        node = chosen.restored()
        came_with = next((f.path for f in reversed(folders)
                          if is_within(chosen.path, f.path)), None)
    # Only what a restore call brought back by itself can meet a live namesake: nothing
    # can be created inside a deleted folder, so the members of a deletion cannot.
    own_calls = folders if came_with is not None else [*folders, node]
    name_taken = tuple([r.path for r in own_calls if await _name_taken(tree, nodes, r)])
    return RestoreResult(node=node, folders=tuple(folders), came_with=came_with,
                         others=others, name_taken=name_taken)
