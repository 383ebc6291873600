"""The user's remote tree as the agent sees it: nodes with their keys and decrypted metadata.

The appliance stores nodes with opaque metadata and wrapped keys. A node's key is found by
walking up: the root's key is wrapped by the user's root key; any other node's key by its
parent's key; a node someone shared with us by the grant they made for our public key
(checked against their public key, pinned on first use). Keys are cached per RemoteTree.

A REMOTE argument is a path from the user's root (`/docs/a.txt`, `docs/a.txt`) or
`id:<node id>` — the only way to name what others shared with us, which lies outside our
tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.api import Api
from agent.client import Connection
from agent.crypto.grants import open_grant
from agent.crypto.keys import UserKeys
from agent.crypto.nodes import (
    NodeKind,
    NodeMeta,
    check_name,
    open_metadata,
    seal_metadata,
    unwrap_key,
    wrap_key,
)
from agent.errors import RemoteNotFoundError, UsageError
from agent.home import AgentHome
from protocol.ids import b64decode, b64encode, is_node_id
from protocol.models import BlockIn, NodeCreate, NodeDetail, NodeOut, NodeUpdate, SharedItem

if TYPE_CHECKING:
    from agent.peers.transfer import PeerAccess

ID_PREFIX = "id:"


@dataclass(frozen=True)
class RemoteNode:
    id: str
    parent: str | None
    kind: NodeKind
    version: int
    status: str
    deleted: bool
    owner: str
    created_at: float
    updated_at: float
    key: bytes
    meta: NodeMeta

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "size": self.meta.size,
                "mtime": self.meta.mtime_ns / 1e9, "mtime_ns": self.meta.mtime_ns,
                "mode": self.meta.mode, "version": self.version,
                "status": self.status, "owner": self.owner, "parent": self.parent,
                "updated_at": self.updated_at}


def open_node(raw: NodeOut, key: bytes) -> RemoteNode:
    """The node an API answer describes, its metadata decrypted and checked with KEY (the
    one place a RemoteNode is made from the wire). Raises IntegrityError if it does not
    open: tampered with, or moved between nodes."""
    meta = open_metadata(key, raw.id, raw.kind, b64decode(raw.metadata))
    return RemoteNode(id=raw.id, parent=raw.parent, kind=raw.kind, version=raw.version,
                      status=raw.status, deleted=raw.deleted, owner=raw.owner,
                      created_at=raw.created_at, updated_at=raw.updated_at, key=key,
                      meta=meta)


def child_key(parent_key: bytes, raw: NodeOut) -> bytes:
    """The key of a node whose parent's key we hold."""
    return unwrap_key(parent_key, b64decode(raw.wrapped_key), raw.id, raw.parent)


def node_create(node_id: str, node_key: bytes, meta: NodeMeta, parent_id: str | None,
                parent_key: bytes) -> NodeCreate:
    """The request that creates a node: META sealed with its key, the key wrapped with its
    parent's (the user's root key for the root, PARENT_ID None)."""
    return NodeCreate(id=node_id, parent=parent_id, kind=meta.kind,
                      metadata=b64encode(seal_metadata(node_key, node_id, meta)),
                      wrapped_key=b64encode(wrap_key(parent_key, node_key, node_id,
                                                     parent_id)),
                      **_content_of(meta))


def node_update(node: RemoteNode, meta: NodeMeta, parent: RemoteNode, *,
                move: bool = False, content: bool = True) -> NodeUpdate:
    """The request that gives NODE a new version with META under PARENT: with its size and
    blocks for a file (CONTENT; without, they stay as they are: a rename or a move); MOVE
    says PARENT is a new one (a move re-wraps the key)."""
    return NodeUpdate(base_version=node.version,
                      metadata=b64encode(seal_metadata(node.key, node.id, meta)),
                      wrapped_key=b64encode(wrap_key(parent.key, node.key, node.id,
                                                     parent.id)),
                      **({"parent": parent.id} if move else {}),
                      **(_content_of(meta) if content else {}))


def _content_of(meta: NodeMeta) -> dict[str, Any]:
    """A file's size and block list (a folder has none: the fields stay unset)."""
    if meta.kind != "file":
        return {}
    return {"size": meta.size,
            "blocks": [BlockIn(id=ref.id_hex, size=ref.cipher_size) for ref in meta.blocks]}


@dataclass(frozen=True)
class Target:
    """Where a new node named NAME would go under PARENT; EXISTING if the name is taken."""

    parent: RemoteNode
    name: str
    existing: RemoteNode | None


def split_path(path: str) -> list[str]:
    return [check_name(part) for part in path.split("/") if part not in ("", ".")]


class RemoteTree:
    def __init__(self, connection: Connection, keys: UserKeys, home: AgentHome) -> None:
        self.connection = connection
        self.api = Api(connection)
        self.keys = keys
        self.home = home
        self.user = connection.device.user
        self._keys: dict[str, bytes] = {}
        self._grants: dict[str, SharedItem] | None = None
        # LAN peers downloads may also fetch from (agent/peers/transfer.py); None: the
        # appliance only. Set by whoever runs a peer service or a short browse.
        self.peers: PeerAccess | None = None

    # --- nodes and keys --------------------------------------------------------------

    async def fetch(self, node_id: str) -> NodeDetail:
        return await self.api.node(node_id)

    async def node(self, node_id: str) -> RemoteNode:
        return await self.open((await self.fetch(node_id)).node)

    async def open(self, raw: NodeOut) -> RemoteNode:
        """A node from the API, with its key found and its metadata decrypted and checked."""
        return open_node(raw, await self.key_of(raw))

    def forget_shares(self) -> None:
        """Ask the appliance again next time: grants come and go while an agent runs."""
        self._grants = None

    def forget_keys(self) -> None:
        """Forget the node keys found so far: after the appliance lost recent history an
        id may come back as another node (made again with its old or derived id, and a
        new key; agent/sync/rollback.py)."""
        self._keys.clear()

    def remember_key(self, node_id: str, key: bytes) -> None:
        """A key found elsewhere (the sync mirror), so no walk up is needed for it."""
        self._keys[node_id] = key

    async def key_of(self, raw: NodeOut) -> bytes:
        node_id = raw.id
        if node_id in self._keys:
            return self._keys[node_id]
        wrapped = b64decode(raw.wrapped_key)
        parent_id = raw.parent
        if raw.owner == self.user and parent_id is None:
            key = unwrap_key(self.keys.root_key, wrapped, node_id, None)
        elif raw.owner != self.user and node_id in await self._shared():
            key = await self._open_grant(node_id)
        elif parent_id is None:
            raise RemoteNotFoundError(f"node {node_id} is not shared with you")
        else:
            parent = (await self.fetch(parent_id)).node
            key = unwrap_key(await self.key_of(parent), wrapped, node_id, parent_id)
        self._keys[node_id] = key
        return key

    async def _shared(self) -> dict[str, SharedItem]:
        if self._grants is None:
            self._grants = {item.node.id: item for item in await self.api.shared_with_me()}
        return self._grants

    async def owner_public_key(self, owner: str) -> bytes:
        return self.home.pin_public_key(owner, await self.api.public_key(owner))

    async def _open_grant(self, node_id: str) -> bytes:
        item = (await self._shared())[node_id]
        return open_grant(self.keys.private_key, await self.owner_public_key(item.owner),
                          b64decode(item.wrapped_key), node_id=node_id, owner=item.owner,
                          recipient=self.user)

    async def shared_with_me(self) -> list[tuple[RemoteNode, str]]:
        items = await self._shared()
        return [(await self.open(item.node), item.owner) for item in items.values()]

    # --- folders and paths ------------------------------------------------------------

    async def root(self) -> RemoteNode:
        return await self.open(await self.api.root())

    async def children(self, folder: RemoteNode) -> list[RemoteNode]:
        entries: list[RemoteNode] = []
        async for raw in self.api.children(folder.id):
            if raw.id not in self._keys:
                self._keys[raw.id] = child_key(folder.key, raw)
            entries.append(await self.open(raw))
        return entries

    async def child(self, folder: RemoteNode, name: str) -> RemoteNode | None:
        matches = [c for c in await self.children(folder) if c.name == name]
        if len(matches) > 1:
            ids = ", ".join(f"id:{m.id}" for m in matches)
            raise UsageError(f"{len(matches)} items are named {name!r} in that folder "
                             f"(made on two devices at once); name one by id: {ids}")
        return matches[0] if matches else None

    async def resolve(self, remote: str) -> RemoteNode:
        """The node REMOTE names. Raises RemoteNotFoundError."""
        if remote.startswith(ID_PREFIX):
            node_id = remote[len(ID_PREFIX):].strip().lower()
            if not is_node_id(node_id):
                raise UsageError(f"{remote!r}: a node id has 32 hex digits")
            node = await self.node(node_id)
            if node.deleted:
                raise RemoteNotFoundError(f"{remote} was deleted")
            return node
        node = await self.root()
        walked = ""
        for part in split_path(remote):
            if not node.is_dir:
                raise RemoteNotFoundError(f"{walked} is a file, not a folder")
            walked += "/" + part
            found = await self.child(node, part)
            if found is None:
                raise RemoteNotFoundError(f"no such file or folder: {walked}")
            node = found
        return node

    async def target(self, remote: str) -> Target:
        """Where REMOTE would be created: its parent folder (which must exist) and name."""
        if remote.startswith(ID_PREFIX):
            existing = await self.resolve(remote)
            if existing.parent is None:
                raise UsageError("the root folder cannot be replaced")
            return Target(await self.node(existing.parent), existing.name, existing)
        parts = split_path(remote)
        if not parts:
            raise UsageError("that names the root folder itself")
        parent = await self.resolve("/" + "/".join(parts[:-1]))
        if not parent.is_dir:
            raise UsageError(f"/{'/'.join(parts[:-1])} is a file, not a folder")
        return Target(parent, parts[-1], await self.child(parent, parts[-1]))
