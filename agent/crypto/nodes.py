"""Node metadata and node keys, format v1.

Every node (file or folder) has its own random 32-byte node key.

Sealed metadata:  0x01 ‖ nonce (12) ‖ AES-256-GCM(node key, plaintext) ‖ tag (16)
    associated data: "cairn-meta-v1" ‖ node id (16 bytes) ‖ kind ("file" or "dir")
    plaintext:       length of H (4, big-endian) ‖ H ‖ block table
    H:               UTF-8 JSON {"name", "size", "mtime_ns", "mode"[, "device"][, "link"]}
                     — device: the name of the device that wrote this version (conflicted
                     copies are named after it); optional, absent in older metadata.
                     link: a symbolic link's target; the node is then a "file" node with
                     no blocks (size 0), so the appliance cannot tell a link from an
                     empty file, and the target is as private as a name
    block table:     per block, in file order: plain size (4) ‖ block id (32) ‖ key (32)
                     ‖ plain hash (32) — see blocks.py; empty for folders and empty files

Wrapped node key: 0x01 ‖ nonce (12) ‖ AES-256-GCM(parent key, node key) ‖ tag (16)
    associated data: "cairn-wrap-v1" ‖ node id (16) ‖ parent id (16; zeros for a root,
                     whose "parent key" is the user's root key)

Binding node id and kind into the metadata means the appliance cannot show one node's
metadata (name, block list) under another node; binding node and parent ids into the
wrapped key means a key cannot be moved under another parent. Moving a node re-wraps its
key for the new parent (one small operation, whatever the subtree's size).

Folder ids made by commands (`mkdir -p`, `put`, the folder `sync` starts from):

    id = first 16 bytes of HMAC-SHA256(content secret, "cairn-folder-id-v1" ‖ parent id (16)
         ‖ attempt (4, big-endian) ‖ name UTF-8)

Two devices creating the same missing folder at once choose the same id, so the appliance
takes one create and refuses the other (409: the id exists), and the loser uses the
winner's folder instead of making a second one of that name. `attempt` counts up past ids
already held by another node (a deleted or renamed folder). The appliance cannot compute
the ids (it lacks the content secret); all it sees is an id that looks random.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Literal

from agent.crypto.aead import open_sealed, random_key, seal
from agent.crypto.blocks import BlockRef, pack_refs, unpack_refs
from agent.errors import IntegrityError, UsageError

FORMAT_VERSION = 1
META_FORMAT = b"cairn-meta-v1"
FOLDER_ID_FORMAT = b"cairn-folder-id-v1"
WRAP_FORMAT = b"cairn-wrap-v1"
NO_PARENT = bytes(16)
MAX_NAME_BYTES = 255
MAX_LINK_BYTES = 4095        # PATH_MAX less its NUL
NodeKind = Literal["file", "dir"]


@dataclass(frozen=True)
class NodeMeta:
    """What only key holders may know about a node."""

    name: str
    kind: NodeKind
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644
    blocks: tuple[BlockRef, ...] = field(default=())
    device: str = ""
    link: str | None = None      # a symbolic link's target (kind "file", no blocks)


def check_name(name: str) -> str:
    """A single path component we can create on any Linux file system. Applied to names we
    write and to names we read (another user's metadata may hold anything)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"{name!r} is not a valid file name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UsageError(f"file name {name[:40]!r}… is over {MAX_NAME_BYTES} bytes")
    return name


def check_link(target: str) -> str:
    """A symbolic link's target we can create on Linux (never followed by Cairn)."""
    size = len(target.encode("utf-8", "surrogateescape"))
    if not 0 < size <= MAX_LINK_BYTES or "\0" in target:
        raise UsageError(f"{target[:40]!r} is not a usable link target")
    return target


def new_node_key() -> bytes:
    return random_key()


def folder_node_id(content_secret: bytes, parent_id: str, name: str, attempt: int = 0
                   ) -> str:
    """The id a command gives a new folder NAME under PARENT_ID (see the module doc): the
    same on every device of the user, different for each ATTEMPT."""
    message = (FOLDER_ID_FORMAT + bytes.fromhex(parent_id) + attempt.to_bytes(4, "big")
               + check_name(name).encode("utf-8", "surrogateescape"))
    return hmac.new(content_secret, message, hashlib.sha256).digest()[:16].hex()


def _meta_ad(node_id: str, kind: NodeKind) -> bytes:
    return META_FORMAT + bytes.fromhex(node_id) + kind.encode()


def seal_metadata(node_key: bytes, node_id: str, meta: NodeMeta) -> bytes:
    check_name(meta.name)
    fields: dict[str, object] = {"name": meta.name, "size": meta.size,
                                 "mtime_ns": meta.mtime_ns, "mode": meta.mode}
    if meta.device:
        fields["device"] = meta.device
    if meta.link is not None:
        if meta.kind != "file" or meta.blocks:
            raise UsageError("a link is a file node without content")
        fields["link"] = check_link(meta.link)
    header = json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogateescape")
    plaintext = struct.pack(">I", len(header)) + header + pack_refs(list(meta.blocks))
    return bytes([FORMAT_VERSION]) + seal(node_key, plaintext, _meta_ad(node_id, meta.kind))


def open_metadata(node_key: bytes, node_id: str, kind: NodeKind, sealed: bytes) -> NodeMeta:
    """The metadata of node NODE_ID. Raises IntegrityError if it was altered or belongs to
    another node."""
    if not sealed or sealed[0] != FORMAT_VERSION:
        raise IntegrityError(f"metadata of node {node_id} has an unknown format")
    plain = open_sealed(node_key, sealed[1:], _meta_ad(node_id, kind),
                        f"the metadata of node {node_id}")
    try:
        (header_size,) = struct.unpack_from(">I", plain)
        header = json.loads(plain[4:4 + header_size].decode("utf-8", "surrogateescape"))
        blocks = tuple(unpack_refs(plain[4 + header_size:]))
        link = header.get("link")
        meta = NodeMeta(name=str(header["name"]), kind=kind, size=int(header["size"]),
                        mtime_ns=int(header["mtime_ns"]), mode=int(header["mode"]) & 0o7777,
                        blocks=blocks, device=str(header.get("device", ""))[:64],
                        link=None if link is None else str(link))
    except (struct.error, ValueError, KeyError, TypeError):
        raise IntegrityError(f"metadata of node {node_id} is malformed") from None
    try:
        check_name(meta.name)
    except UsageError:
        raise IntegrityError(f"node {node_id} has an unusable name {meta.name[:40]!r}"
                             ) from None
    if meta.link is not None:
        try:
            check_link(meta.link)
        except UsageError:
            raise IntegrityError(f"node {node_id} has an unusable link target") from None
        if kind != "file" or blocks or meta.size:
            raise IntegrityError(f"node {node_id}: a link with content")
    if sum(b.plain_size for b in blocks) != meta.size:
        raise IntegrityError(f"node {node_id}: block sizes do not add up to its size")
    return meta


def _wrap_ad(node_id: str, parent_id: str | None) -> bytes:
    parent = NO_PARENT if parent_id is None else bytes.fromhex(parent_id)
    return WRAP_FORMAT + bytes.fromhex(node_id) + parent


def wrap_key(parent_key: bytes, node_key: bytes, node_id: str, parent_id: str | None
             ) -> bytes:
    return bytes([FORMAT_VERSION]) + seal(parent_key, node_key, _wrap_ad(node_id, parent_id))


def unwrap_key(parent_key: bytes, wrapped: bytes, node_id: str, parent_id: str | None
               ) -> bytes:
    if not wrapped or wrapped[0] != FORMAT_VERSION:
        raise IntegrityError(f"the key of node {node_id} has an unknown format")
    return open_sealed(parent_key, wrapped[1:], _wrap_ad(node_id, parent_id),
                       f"the key of node {node_id}")
