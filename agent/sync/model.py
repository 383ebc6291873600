"""The three trees of a synced folder and the actions that reconcile them (pure data).

- local:  what is on disk under DIR now, by relative path ('/'-separated, no leading '/');
- remote: the appliance's nodes under the synced remote folder, decrypted, by node id, each
          with the relative path it maps to;
- base:   the last state both sides agreed on (the merge base), by node id.

Nodes are followed by id: a base entry remembers the node's path, version, content and the
local file's inode, so a rename on either side is recognised as a move of the same node.

A symbolic link is a "file" in all three trees (on the appliance, a file node without
content whose metadata holds the target; here, the link itself, never followed): its
content id is made from its target (`link_content_id`), so the planner's rules for files
apply to links unchanged — an edit is a new target, a conflicted copy of a link is a link.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import blake3

from agent.crypto.blocks import BlockRef

Kind = Literal["file", "dir"]


def content_id(plain_hashes: Iterable[bytes]) -> str:
    """What identifies a file's content across devices: the hash of its blocks' plain
    hashes (4 MiB blocks, so equal files give equal lists). Computable from the metadata
    and from the local file alike; it says nothing the appliance could use."""
    digest = blake3.blake3(b"cairn-content-v1")
    for plain_hash in plain_hashes:
        digest.update(plain_hash)
    return digest.hexdigest()[:32]


def content_of_refs(refs: Iterable[BlockRef]) -> str:
    return content_id(ref.plain_hash for ref in refs)


LINK_CONTENT = "link:"
"""What begins a symbolic link's content id. A file's content id is hex digits only, so
the two never compare equal — not even a link against an empty file, which is what the
appliance sees a link as."""


def link_content_id(target: str) -> str:
    """What identifies a symbolic link across devices: its target (hashed, so an id stays
    short however long the target; the same on every device, from the link here or from
    the metadata alike)."""
    digest = blake3.blake3(b"cairn-link-v1")
    digest.update(target.encode("utf-8", "surrogateescape"))
    return LINK_CONTENT + digest.hexdigest()[:32]


def content_of_node(refs: Iterable[BlockRef], link: str | None) -> str:
    """The content id of a file node: its blocks', or its target's for a link."""
    return content_of_refs(refs) if link is None else link_content_id(link)


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> str:
    return path.rpartition("/")[2]


def is_within(path: str, folder: str) -> bool:
    """Whether PATH is FOLDER or lies under it."""
    return path == folder or path.startswith(folder + "/")


@dataclass(frozen=True, slots=True)
class Stat:
    """What a local file looked like; any difference means it changed."""

    size: int
    mtime_ns: int
    mode: int
    inode: int


@dataclass(frozen=True, slots=True)
class LocalEntry:
    path: str
    kind: Kind
    stat: Stat
    content: str | None = None     # known when hashed (cached by stat)
    stable: bool = True            # False while a file may still be being written


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    node_id: str
    parent_id: str
    path: str
    kind: Kind
    version: int
    size: int
    mtime_ns: int
    mode: int
    content: str
    uploaded: bool = True
    device: str = ""               # who wrote this version (from the metadata)
    updated_at: float = 0.0
    name_clash: bool = False       # shares its name with an older node: path is a copy name
    clash_duplicate: bool = False  # ... and is a file with the very content of that node


@dataclass(frozen=True, slots=True)
class BaseEntry:
    node_id: str
    path: str
    kind: Kind
    version: int
    content: str
    stat: Stat | None              # the local file as it was when last in sync


# --- actions -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HashLocal:
    """Compute the content id of local files (a decision depends on it)."""
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MoveRemote:
    node_id: str
    to_path: str


@dataclass(frozen=True, slots=True)
class MoveLocal:
    node_id: str
    from_path: str
    to_path: str


@dataclass(frozen=True, slots=True)
class MakeRemoteDir:
    path: str


@dataclass(frozen=True, slots=True)
class MakeLocalDir:
    node_id: str
    path: str


@dataclass(frozen=True, slots=True)
class Upload:
    """Send the local file at PATH: a new node (NODE_ID None) or a new version."""
    path: str
    node_id: str | None = None
    base_version: int | None = None
    size: int = 0


@dataclass(frozen=True, slots=True)
class Download:
    """Fetch node NODE_ID into PATH, renamed into place only if the local file still looks
    as EXPECT (None: absent)."""
    node_id: str
    path: str
    expect: Stat | None
    size: int = 0


@dataclass(frozen=True, slots=True)
class KeepBoth:
    """Both sides edited node NODE_ID: the remote version is kept as a conflicted copy
    beside it, and the local one (the last writer) becomes the node's new version."""
    node_id: str
    path: str


@dataclass(frozen=True, slots=True)
class RenameLocalAside:
    """A local item clashes with a remote one of the same name it cannot merge with: it
    becomes a conflicted copy (from this device) and syncs as a new item."""
    path: str


@dataclass(frozen=True, slots=True)
class DeleteRemote:
    """Delete node NODE_ID (based on VERSION) on the appliance; a folder (KIND) goes only
    if nothing under it changed there since it was synced."""
    node_id: str
    path: str
    version: int
    files: int = 1
    kind: Kind = "file"


@dataclass(frozen=True, slots=True)
class DeleteLocal:
    path: str
    expect: Stat | None           # files: deleted only if unchanged; folders: None


@dataclass(frozen=True, slots=True)
class Adopt:
    """Both sides already agree: record it as synced, as the planner saw it (VERSION and
    CONTENT: what the appliance had then; a newer version arriving meanwhile is still
    new to the next plan)."""
    node_id: str
    path: str
    stat: Stat | None
    version: int
    content: str


@dataclass(frozen=True, slots=True)
class Forget:
    """The node is gone on both sides, or the base entry no longer means anything."""
    node_id: str


Action = (HashLocal | MoveRemote | MoveLocal | MakeRemoteDir | MakeLocalDir | Upload
          | Download | KeepBoth | RenameLocalAside | DeleteRemote | DeleteLocal | Adopt
          | Forget)
