"""What the commands do, on top of the remote tree and the transfer pipeline (no printing:
the command line formats the results)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from agent.client import Connection
from agent.crypto.grants import wrap_for_user
from agent.crypto.nodes import NodeMeta, check_name, folder_node_id, new_node_key
from agent.download import DownloadStats, download_file
from agent.errors import (
    ForbiddenError,
    LocalFileError,
    RemoteConflictError,
    RemoteNotFoundError,
    UsageError,
)
from agent.home import AgentHome
from agent.remote import (
    ID_PREFIX,
    RemoteNode,
    RemoteTree,
    Target,
    node_create,
    node_update,
    split_path,
)
from agent.upload import UploadStats, upload_file
from protocol.errors import ErrorCode
from protocol.ids import new_node_id

T = TypeVar("T")


@asynccontextmanager
async def session(home: AgentHome) -> AsyncIterator[RemoteTree]:
    device = home.load_device()
    keys = home.load_keys()
    async with Connection(home, device) as connection:
        yield RemoteTree(connection, keys, home)


def _not_shared(remote: str) -> RemoteNotFoundError:
    return RemoteNotFoundError(f"{remote}: no such file or folder, or not shared with you")


async def resolve(tree: RemoteTree, remote: str) -> RemoteNode:
    try:
        return await tree.resolve(remote)
    except RemoteNotFoundError as exc:
        if remote.startswith(ID_PREFIX):
            raise _not_shared(remote) from None
        raise RemoteNotFoundError(exc.message) from None


# --- folders ---------------------------------------------------------------------------

# How many derived ids a new folder tries (agent.crypto.nodes.folder_node_id) before a
# random one. Ids stay held by deleted folders until the trash is emptied and by renamed
# ones for good, so a name made and removed every day uses a few; sixteen is plenty.
FOLDER_ID_ATTEMPTS = 16


async def make_folder(tree: RemoteTree, target: Target, *, mtime_ns: int | None = None,
                      mode: int = 0o755) -> RemoteNode:
    """Create folder TARGET (or return it if a folder of that name is there), with the
    given modification time (default: now) and mode.

    The new folder's id is derived from its parent and name, the same on every device of
    the user: when another device creates the same folder at the same moment, the appliance
    refuses the second create (409, the id exists) and the folder the other device made is
    returned instead of a second folder of one name."""
    if target.existing is not None:
        if not target.existing.is_dir:
            raise UsageError(f"a file named {target.name!r} is already there")
        return target.existing
    meta = NodeMeta(name=check_name(target.name), kind="dir", mode=mode,
                    mtime_ns=time.time_ns() if mtime_ns is None else mtime_ns)
    parent = target.parent
    for attempt in range(FOLDER_ID_ATTEMPTS):
        node_id = folder_node_id(tree.keys.content_secret, parent.id, meta.name, attempt)
        try:
            return await _create_folder(tree, node_id, meta, parent)
        except RemoteConflictError as conflict:
            holder = await _holder_of(tree, node_id, conflict)
            if holder.is_dir and not holder.deleted and holder.parent == parent.id \
                    and holder.name == meta.name:
                return holder        # made by another device just now: use it
            # else a deleted or renamed folder holds this id: try the next one
    return await _create_folder(tree, new_node_id(), meta, parent)


async def _create_folder(tree: RemoteTree, node_id: str, meta: NodeMeta,
                         parent: RemoteNode) -> RemoteNode:
    answer = await tree.api.create(node_create(node_id, new_node_key(), meta, parent.id,
                                               parent.key))
    return await tree.open(answer.node)


async def _holder_of(tree: RemoteTree, node_id: str, conflict: RemoteConflictError
                     ) -> RemoteNode:
    """The node that holds NODE_ID after a create with it met CONFLICT. No such node: the
    create was refused for another reason (its folder was deleted), so CONFLICT stands."""
    try:
        return await tree.node(node_id)
    except RemoteNotFoundError:
        raise conflict from None


async def folder_at(tree: RemoteTree, parts: list[str], *, create: bool = True
                    ) -> RemoteNode:
    """The folder at path PARTS from the root, making each missing folder on the way if
    CREATE (mkdir -p). Raises UsageError where a file is in the way, RemoteNotFoundError
    for a missing folder when not CREATE."""
    folder = await tree.root()
    for depth, part in enumerate(parts):
        walked = "/" + "/".join(parts[:depth + 1])
        existing = await tree.child(folder, part)
        if existing is not None and not existing.is_dir:
            raise UsageError(f"{walked} is a file, not a folder")
        if existing is None and not create:
            raise RemoteNotFoundError(f"no such folder: {walked}")
        folder = await make_folder(tree, Target(folder, part, existing))
    return folder


async def make_folders(tree: RemoteTree, remote: str, *, parents: bool) -> RemoteNode:
    """mkdir (-p): the folder REMOTE, creating missing parents if PARENTS."""
    if remote.startswith(ID_PREFIX):
        raise UsageError("mkdir takes a path, not an id")
    parts = split_path(remote)
    if not parts:
        raise UsageError("the root folder already exists")
    if parents:
        return await folder_at(tree, parts)
    try:
        parent = await folder_at(tree, parts[:-1], create=False)
    except RemoteNotFoundError as exc:
        raise RemoteNotFoundError(f"{exc.message} (use -p to create parents)") from None
    if await tree.child(parent, parts[-1]) is not None:
        raise UsageError(f"/{'/'.join(parts)} already exists")
    return await make_folder(tree, Target(parent, parts[-1], None))


# --- put -------------------------------------------------------------------------------

async def put(tree: RemoteTree, local: Path, remote: str, *,
              show_progress: bool | None = None) -> UploadStats:
    """Upload LOCAL (a file, or a folder recursively) to REMOTE, like `cp -r`: into REMOTE
    if it is an existing folder (or ends with /), else as REMOTE. Missing folders on the
    way are made."""
    try:
        info = os.lstat(local)
    except OSError as exc:
        raise LocalFileError(f"cannot read {local}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise UsageError(f"{local} is a symbolic link; give the file it points to")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise UsageError(f"{local} is not a regular file or folder")
    target = await _put_target(tree, local, remote)
    if stat.S_ISREG(info.st_mode):
        return await upload_file(tree, local, target, show_progress=show_progress,
                                 device=tree.connection.device.device_name)
    return await _put_folder(tree, local, target, show_progress)


async def _put_target(tree: RemoteTree, local: Path, remote: str) -> Target:
    """Where LOCAL goes for REMOTE. A path's missing folders are made (like rclone copyto
    and aws s3 cp); a file in the way is an error."""
    name = check_name(_local_name(local))
    if remote.startswith(ID_PREFIX):
        node = await resolve(tree, remote)
        if node.is_dir:
            return Target(node, name, await tree.child(node, name))
        return await tree.target(remote)
    parts = split_path(remote)
    if remote.endswith("/") or not parts:
        folder = await folder_at(tree, parts)
        return Target(folder, name, await tree.child(folder, name))
    parent = await folder_at(tree, parts[:-1])
    existing = await tree.child(parent, parts[-1])
    if existing is not None and existing.is_dir:
        return Target(existing, name, await tree.child(existing, name))
    return Target(parent, parts[-1], existing)


async def _put_folder(tree: RemoteTree, local: Path, target: Target,
                      show_progress: bool | None) -> UploadStats:
    stats = UploadStats()
    info = os.stat(local)
    folder = await make_folder(tree, target, mtime_ns=info.st_mtime_ns,
                               mode=stat.S_IMODE(info.st_mode))
    stats.folders += 1
    existing = {c.name: c for c in await tree.children(folder)}
    try:
        entries = sorted(os.scandir(local), key=lambda e: e.name)
    except OSError as exc:
        raise LocalFileError(f"cannot list {local}: {exc.strerror}") from None
    for entry in entries:
        path = Path(entry.path)
        child = Target(folder, check_name(entry.name), existing.get(entry.name))
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            stats.skipped.append(str(path))
        elif entry.is_dir():
            stats.add(await _put_folder(tree, path, child, show_progress))
        else:
            stats.add(await upload_file(tree, path, child, show_progress=show_progress,
                                        device=tree.connection.device.device_name))
    return stats


def _is_dir(path: Path) -> bool:
    return os.path.isdir(path)


def _local_name(path: Path) -> str:
    return os.path.basename(os.path.abspath(path)) or "root"


# --- get -------------------------------------------------------------------------------

async def get(tree: RemoteTree, remote: str, local: Path, *,
              show_progress: bool | None = None) -> DownloadStats:
    """Download REMOTE (a file, or a folder recursively) to LOCAL, like `cp -r`."""
    node = await resolve(tree, remote)
    if node.parent is None and node.owner == tree.user and _is_dir(local):
        destination = local   # the whole tree into an existing folder
    else:
        destination = local / node.name if _is_dir(local) else local
    if not _is_dir(destination.parent):
        raise LocalFileError(f"no such local folder: {destination.parent}")
    if node.is_dir:
        return await _get_folder(tree, node, destination, show_progress)
    return await download_file(tree, node, destination, show_progress=show_progress)


async def _get_folder(tree: RemoteTree, folder: RemoteNode, local: Path,
                      show_progress: bool | None) -> DownloadStats:
    stats = DownloadStats(folders=1)
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as exc:
        raise LocalFileError(f"cannot create {local}: {exc.strerror}") from None
    for child in await tree.children(folder):
        path = local / child.name
        if child.is_dir:
            stats.add(await _get_folder(tree, child, path, show_progress))
        else:
            stats.add(await download_file(tree, child, path, show_progress=show_progress))
    _set_folder_times(local, folder)
    return stats


def _set_folder_times(local: Path, folder: RemoteNode) -> None:
    """Give a downloaded folder its mode and mtime, once its entries are written (writing
    them changes the mtime). A mode without owner access would lock us out: left alone."""
    try:
        if folder.meta.mode & 0o700 == 0o700:
            os.chmod(local, folder.meta.mode & 0o7777)
        if folder.meta.mtime_ns:
            os.utime(local, ns=(folder.meta.mtime_ns, folder.meta.mtime_ns))
    except OSError as exc:
        raise LocalFileError(f"cannot set the time of {local}: {exc.strerror}") from None


# --- rm, mv ----------------------------------------------------------------------------

async def remove(tree: RemoteTree, remote: str, *, recursive: bool) -> RemoteNode:
    node = await resolve(tree, remote)
    if node.parent is None:
        raise UsageError("the root folder cannot be removed")
    if node.is_dir and not recursive:
        raise UsageError(f"{remote} is a folder; use rm -r to remove it and everything "
                         "in it")
    await _owned(remote, tree.api.delete(node.id, node.version))
    return node


async def move(tree: RemoteTree, source: str, destination: str) -> RemoteNode:
    node = await resolve(tree, source)
    if node.parent is None:
        raise UsageError("the root folder cannot be moved")
    if destination.startswith(ID_PREFIX) or destination.endswith("/"):
        folder = await resolve(tree, destination)
        target = Target(folder, node.name, await tree.child(folder, node.name))
    else:
        target = await tree.target(destination)
        if target.existing is not None and target.existing.is_dir \
                and target.existing.id != node.id:
            folder = target.existing
            target = Target(folder, node.name, await tree.child(folder, node.name))
    if not target.parent.is_dir:
        raise UsageError("the destination is not a folder")
    if target.existing is not None:
        if target.existing.id == node.id:
            return node
        raise UsageError(f"{target.name!r} already exists there; remove it first")
    meta = replace(node.meta, name=check_name(target.name))
    update = node_update(node, meta, target.parent, move=target.parent.id != node.parent,
                         content=False)
    answer = await _owned(source, tree.api.update(node.id, update))
    return await tree.open(answer.node)


async def _owned(remote: str, call: Awaitable[T]) -> T:
    """CALL, a change to REMOTE, with the refusals a change may meet said in its words."""
    try:
        return await call
    except ForbiddenError as exc:
        raise ForbiddenError(f"{remote} is shared with you read-only; you cannot change "
                             "it", status=exc.status, api_code=exc.api_code) from None
    except RemoteConflictError as exc:
        raise RemoteConflictError(f"{remote} changed on another device meanwhile; look "
                                  "again and retry", status=exc.status,
                                  api_code=exc.api_code) from None


# --- sharing ---------------------------------------------------------------------------

async def share(tree: RemoteTree, remote: str, users: list[str]) -> RemoteNode:
    node = await resolve(tree, remote)
    if node.owner != tree.user:
        raise ForbiddenError(f"{remote} belongs to {node.owner}; only they can share it",
                             status=403, api_code=ErrorCode.FORBIDDEN)
    if node.parent is None:
        raise UsageError("share a folder or file, not your whole root folder")
    grants = []
    for user in users:
        if user == tree.user:
            raise UsageError("you cannot share with yourself")
        try:
            public_key = await tree.owner_public_key(user)
        except RemoteNotFoundError:
            raise RemoteNotFoundError(f"user {user!r} does not exist or has no device "
                                      "yet") from None
        grants.append((user, wrap_for_user(tree.keys.private_key, public_key, node.key,
                                           node_id=node.id, owner=tree.user,
                                           recipient=user)))
    await _owned(remote, tree.api.share(node.id, grants))
    return node


async def unshare(tree: RemoteTree, remote: str, user: str) -> RemoteNode:
    node = await resolve(tree, remote)
    try:
        await _owned(remote, tree.api.unshare(node.id, user))
    except RemoteNotFoundError:
        raise RemoteNotFoundError(f"{remote} is not shared with {user}") from None
    return node


@dataclass(frozen=True)
class SharedEntry:
    node: RemoteNode
    owner: str

    def to_json(self) -> dict[str, Any]:
        return {**self.node.to_json(), "owner": self.owner}


async def shared(tree: RemoteTree) -> list[SharedEntry]:
    return [SharedEntry(node, owner) for node, owner in await tree.shared_with_me()]
