"""Plain records read from the metadata tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NodeKind = Literal["file", "dir"]
NodeStatus = Literal["uploading", "uploaded"]


@dataclass(frozen=True)
class User:
    id: int
    name: str
    public_key: bytes | None
    key_bundle: bytes | None
    bundle_version: int
    created_at: float


@dataclass(frozen=True)
class Device:
    id: str
    user_id: int
    user_name: str
    name: str
    created_at: float
    last_seen: float | None
    revoked_at: float | None
    cert_key_sha256: str | None = None   # of its newest device certificate's key


@dataclass(frozen=True)
class BlockRef:
    block_id: str
    size: int


@dataclass(frozen=True)
class Node:
    id: str
    owner_id: int
    owner_name: str
    parent_id: str | None
    kind: NodeKind
    version: int
    status: NodeStatus
    deleted_at: float | None
    metadata: bytes
    wrapped_key: bytes
    size: int
    block_count: int
    content_tag: bytes
    created_at: float
    updated_at: float
    updated_by: str | None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass(frozen=True)
class Change:
    cursor: int
    node_id: str
    version: int
    kind: str
    at: float
    device_id: str | None


@dataclass(frozen=True)
class Grant:
    user_name: str
    node_id: str
    wrapped_key: bytes
    granted_at: float
