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

import base64
from dataclasses import dataclass
from typing import Any

from agent.client import Connection
from agent.crypto.grants import open_grant
from agent.crypto.keys import UserKeys
from agent.crypto.nodes import NodeKind, NodeMeta, check_name, open_metadata, unwrap_key
from agent.errors import RemoteNotFoundError, UsageError
from agent.home import AgentHome

ID_PREFIX = "id:"
PAGE = 1000


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
        self.keys = keys
        self.home = home
        self.user = connection.device.user
        self._keys: dict[str, bytes] = {}
        self._grants: dict[str, dict[str, Any]] | None = None

    # --- nodes and keys --------------------------------------------------------------

    async def fetch(self, node_id: str) -> dict[str, Any]:
        detail: dict[str, Any] = await self.connection.call("GET", f"/files/{node_id}")
        return detail

    async def node(self, node_id: str) -> RemoteNode:
        return await self.open((await self.fetch(node_id))["node"])

    async def open(self, raw: dict[str, Any]) -> RemoteNode:
        """A node from the API, with its key found and its metadata decrypted and checked."""
        key = await self.key_of(raw)
        kind: NodeKind = raw["kind"]
        meta = open_metadata(key, raw["id"], kind, base64.b64decode(raw["metadata"]))
        return RemoteNode(id=raw["id"], parent=raw["parent"], kind=kind,
                          version=int(raw["version"]), status=raw["status"],
                          deleted=bool(raw["deleted"]), owner=raw["owner"],
                          created_at=float(raw["created_at"]),
                          updated_at=float(raw["updated_at"]), key=key, meta=meta)

    def forget_shares(self) -> None:
        """Ask the appliance again next time: grants come and go while an agent runs."""
        self._grants = None

    def remember_key(self, node_id: str, key: bytes) -> None:
        """A key found elsewhere (the sync mirror), so no walk up is needed for it."""
        self._keys[node_id] = key

    async def key_of(self, raw: dict[str, Any]) -> bytes:
        node_id: str = raw["id"]
        if node_id in self._keys:
            return self._keys[node_id]
        wrapped = base64.b64decode(raw["wrapped_key"])
        parent_id: str | None = raw["parent"]
        if raw["owner"] == self.user and parent_id is None:
            key = unwrap_key(self.keys.root_key, wrapped, node_id, None)
        elif raw["owner"] != self.user and node_id in await self._shared():
            key = await self._open_grant(node_id)
        elif parent_id is None:
            raise RemoteNotFoundError(f"node {node_id} is not shared with you")
        else:
            parent = (await self.fetch(parent_id))["node"]
            key = unwrap_key(await self.key_of(parent), wrapped, node_id, parent_id)
        self._keys[node_id] = key
        return key

    async def _shared(self) -> dict[str, dict[str, Any]]:
        if self._grants is None:
            body = await self.connection.call("GET", "/shared-with-me")
            self._grants = {item["node"]["id"]: item for item in body["items"]}
        return self._grants

    async def owner_public_key(self, owner: str) -> bytes:
        body = await self.connection.call("GET", f"/users/{owner}/public-key")
        return self.home.pin_public_key(owner, base64.b64decode(body["public_key"]))

    async def _open_grant(self, node_id: str) -> bytes:
        item = (await self._shared())[node_id]
        owner = str(item["owner"])
        return open_grant(self.keys.private_key, await self.owner_public_key(owner),
                          base64.b64decode(item["wrapped_key"]), node_id=node_id,
                          owner=owner, recipient=self.user)

    async def shared_with_me(self) -> list[tuple[RemoteNode, str]]:
        items = await self._shared()
        return [(await self.open(item["node"]), str(item["owner"])) for item in items.values()]

    # --- folders and paths ------------------------------------------------------------

    async def root(self) -> RemoteNode:
        return await self.open(await self.connection.call("GET", "/root"))

    async def children(self, folder: RemoteNode) -> list[RemoteNode]:
        entries: list[RemoteNode] = []
        after = ""
        while True:
            page = await self.connection.call("GET", f"/files/{folder.id}/children",
                                              params={"after": after, "limit": PAGE})
            for raw in page["nodes"]:
                if raw["id"] not in self._keys:
                    self._keys[raw["id"]] = unwrap_key(
                        folder.key, base64.b64decode(raw["wrapped_key"]), raw["id"], folder.id)
                entries.append(await self.open(raw))
            if not page["next_after"]:
                return entries
            after = page["next_after"]

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
            if len(node_id) != 32 or any(c not in "0123456789abcdef" for c in node_id):
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
