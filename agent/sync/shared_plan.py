"""The one-way plan for `DIR/Shared with me/OWNER/` (pure): what to download, what to
move out because it changed here, what to remove. `agent.sync.shared` carries it out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.sync.model import Stat

SHARED_FOLDER = "Shared with me"


@dataclass(frozen=True)
class Written:
    node_id: str
    version: int
    stat: Stat


@dataclass(frozen=True)
class Shared:
    """A node shared with the user, as the one-way plan needs it."""

    node_id: str
    version: int
    is_dir: bool


@dataclass(frozen=True)
class SharedPlan:
    move_out: tuple[str, ...] = ()          # changed or new here: becomes the user's own
    folders: tuple[str, ...] = ()           # to create
    downloads: tuple[tuple[str, Stat | None], ...] = ()   # (path, expected there now)
    remove: tuple[str, ...] = ()            # no longer shared, unchanged here: deleted
    forget: tuple[str, ...] = ()            # no longer shared: its record goes


def plan_shared(remote: Mapping[str, Shared], written: Mapping[str, Written],
                local: Mapping[str, Stat]) -> SharedPlan:
    """One way, from the appliance to `Shared with me` (pure). REMOTE: what is shared, by
    path; WRITTEN: what this device wrote there; LOCAL: the files there now. A file that is
    not as it was written is moved out (never overwritten, never deleted); a shared file
    that is new or has a new version is downloaded; a file no longer shared is deleted
    if unchanged."""
    move_out = tuple(sorted(path for path, now in local.items()
                            if path not in written or written[path].stat != now))
    present = {path: now for path, now in local.items() if path not in move_out}
    downloads = []
    for path in sorted(p for p, node in remote.items() if not node.is_dir):
        known, current = written.get(path), present.get(path)
        if known is not None and known.version == remote[path].version \
                and current == known.stat:
            continue
        downloads.append((path, current))
    gone = sorted(path for path in written if path not in remote)
    return SharedPlan(
        move_out=move_out,
        folders=tuple(sorted(p for p, node in remote.items() if node.is_dir)),
        downloads=tuple(downloads),
        remove=tuple(p for p in gone if p in present and present[p] == written[p].stat),
        forget=tuple(gone))
