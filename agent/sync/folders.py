"""Synced folders: registering one, its line in `cairn status`, and the temporary files a
killed agent left in it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from agent.crypto.nodes import check_name
from agent.download import PART_SUFFIX
from agent.errors import CairnAgentError, LocalFileError, TransportError, UsageError
from agent.operations import folder_at, make_folder
from agent.remote import RemoteTree, Target
from agent.sync.model import LocalEntry
from agent.sync.scan import is_dir
from agent.sync.state import FolderRecord, SyncDb

log = logging.getLogger("cairn.sync")

async def open_folder(tree: RemoteTree, db: SyncDb, local_dir: Path, remote_path: str
                      ) -> FolderRecord:
    """The folder's record, registering it on first use (and creating the remote folder
    if needed). A folder keeps the remote folder it was first synced with."""
    key = str(local_dir)
    record = db.folder(key)
    wanted = "/" + "/".join(p for p in remote_path.split("/") if p not in ("", "."))
    if record is not None:
        if record.remote_path != wanted:
            raise UsageError(f"{local_dir} is already synced with {record.remote_path}, "
                             f"not {wanted}")
        return record
    if not is_dir(local_dir):
        try:
            os.makedirs(local_dir)
        except OSError as exc:
            raise LocalFileError(f"cannot create {local_dir}: {exc.strerror}") from None
    for other in db.folders():
        if _overlaps(other.local_dir, key):
            raise UsageError(f"{local_dir} overlaps {other.local_dir}, which is already "
                             "synced; pick a folder outside it")
    folder = await tree.root()
    for part in (p for p in wanted.split("/") if p):
        existing = await tree.child(folder, check_name(part))
        if existing is not None and not existing.is_dir:
            raise UsageError(f"{wanted} is a file on the appliance, not a folder")
        if existing is None:
            existing = await make_folder(tree, Target(folder, part, None))
        folder = existing
    return db.add_folder(key, folder.id, wanted)


async def remake_remote_folder(tree: RemoteTree, record: FolderRecord) -> bool:
    """Make the synced remote folder again after the appliance lost it with recent history
    (it was first synced in the lost window): its id is derived from its parent and name,
    as when `open_folder` made it, so the folder made again is the one this record names.
    Whether it is (False: it cannot be made, or it got another id)."""
    parts = [p for p in record.remote_path.split("/") if p]
    if not parts:
        return False                 # the user's root itself: nothing to make it in
    try:
        folder = await folder_at(tree, parts)
    except TransportError:
        raise
    except (CairnAgentError, ValueError) as exc:
        log.warning("cannot make %s again: %s", record.remote_path, exc)
        return False
    if folder.id != record.remote_root:
        log.warning("%s was made again, but as another folder than the one synced here",
                    record.remote_path)
        return False
    log.warning("made %s again: the appliance lost it with its recent history",
                record.remote_path)
    return True


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def describe(record: FolderRecord, alive: Callable[[int], bool]) -> str:
    """One line of `cairn status` for a synced folder."""
    if record.pid is None or not alive(record.pid):
        state = "not running"
    else:
        state = record.state + (f": {record.detail}" if record.detail else "")
    conflicts = f", {record.conflicts} conflicted copies" if record.conflicts else ""
    return f"{record.local_dir} <-> {record.remote_path}: {state}{conflicts}"


def remove_stale_parts(root: Path, entries: dict[str, LocalEntry]) -> None:
    """Temporary download files left by a killed agent, once nothing needs them."""
    folders = [""] + [p for p, e in entries.items() if e.kind == "dir"]
    for folder in folders:
        try:
            names = os.listdir(root / folder if folder else root)
        except OSError:
            continue
        for name in names:
            if name.endswith(PART_SUFFIX):
                try:
                    os.unlink((root / folder if folder else root) / name)
                    log.info("removed a stale temporary file %s", name)
                except OSError:
                    pass
