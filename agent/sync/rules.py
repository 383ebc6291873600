"""The sync engine's rules outside the planner (pure: plain data in, a decision out).

Safety stops — nothing is deleted while the sync is paused:
- DIR missing or unreadable, or suddenly empty while items were synced (an unmounted
  drive): paused, looked at again shortly;
- the remote folder deleted on the appliance (the mirror image of a mass deletion):
  paused until it is restored;
- a plan deleting more than `share` of the synced files (and at least `minimum`) on the
  appliance: paused until restarted with --allow-mass-delete;
- a full local disk: downloads are held back (uploads go on) until a retry.

The executor's preconditions, decided here from what it saw just before acting:
- a remote folder is deleted only if nothing under it is new or changed since it was
  synced (the appliance checks the folder's own version only);
- a local folder delete removes only what is unchanged since it was synced (and stale
  temporary files); everything else stays and syncs back as new;
- an item in the way of a move or of a new folder is set aside as a conflicted copy; a
  folder moved into its own old place steps aside first;
- a stopped upload's new version becomes the base of the next upload.

And the round's shortcut: a wake-up that would only confirm the last empty plan ends
before planning (`nothing_new`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.sync.model import (
    BaseEntry,
    Download,
    KeepBoth,
    Kind,
    MakeLocalDir,
    RemoteEntry,
    Stat,
    is_within,
)
from agent.sync.planner import Plan

EMPTY_RECHECK_S = 5.0
REMOTE_GONE_RECHECK_S = 30.0


@dataclass(frozen=True)
class Stop:
    """Why the sync pauses, and when to look again (None: only on a new event)."""

    message: str
    recheck_s: float | None = None


@dataclass(frozen=True)
class MassDelete:
    allowed: bool = False
    share: float = 0.5
    minimum: int = 10


# --- safety ----------------------------------------------------------------------------------

def folder_missing(root: str) -> Stop:
    return Stop(f"{root} is missing (an unmounted drive?); waiting for it — nothing is "
                "deleted meanwhile")


def remote_folder_gone(remote_path: str, root: str) -> Stop:
    return Stop(f"the remote folder {remote_path} was deleted; nothing is deleted here. "
                f"Restore it (cairn restore {remote_path}) or sync {root} elsewhere",
                REMOTE_GONE_RECHECK_S)


def safety_stop(root: str, local_items: int, base: Mapping[str, BaseEntry], plan: Plan,
                policy: MassDelete) -> Stop | None:
    """Whether PLAN must not run: DIR emptied while items were synced, or too many
    deletions on the appliance at once. None: go ahead."""
    if policy.allowed:
        return None
    synced = len(base)
    if not local_items and synced:
        return Stop(f"{root} is empty but {synced} items were synced (an unmounted "
                    "drive?); nothing is deleted. If you emptied it on purpose, run "
                    "`cairn sync --allow-mass-delete`", EMPTY_RECHECK_S)
    deletions = plan.remote_deletions
    if deletions >= policy.minimum:
        files = sum(1 for e in base.values() if e.kind == "file")
        if deletions > policy.share * files:
            return Stop(f"{deletions} of {files} files were deleted here at once; to delete"
                        " them on every device run `cairn sync --allow-mass-delete`, or put"
                        " them back")
    return None


def without_downloads(plan: Plan) -> Plan:
    """PLAN minus what writes remote content here (the disk is full): those paths wait."""
    held = [a for a in plan.actions if isinstance(a, Download | KeepBoth | MakeLocalDir)]
    return Plan(tuple(a for a in plan.actions if a not in held),
                plan.waiting + tuple(a.path for a in held), plan.remote_deletions)


@dataclass(frozen=True)
class Quiet:
    """What a round saw when it ended with an empty plan and nothing waiting."""

    remote_revision: int
    base_revision: int
    shares_seen: int


def nothing_new(quiet: Quiet | None, now: Quiet, local_changed: bool,
                downloads_paused: bool, shared_touched: bool) -> bool:
    """Whether a round would only confirm the last empty plan: neither tree changed since
    (our own change coming back through the feed, the watcher reporting a file we just
    wrote). Planning is what costs with many files."""
    return (quiet == now and not local_changed and not downloads_paused
            and not shared_touched)


# --- the executor's preconditions -----------------------------------------------------------

def changed_under(folder: str, remote: Mapping[str, RemoteEntry],
                  base: Mapping[str, BaseEntry]) -> str | None:
    """The first remote item under FOLDER that is new or changed since it was synced
    (a folder delete must then not go ahead), or None."""
    for node_id, entry in remote.items():
        if is_within(entry.path, folder):
            synced = base.get(node_id)
            if synced is None or synced.version != entry.version:
                return entry.path
    return None


def removable(found: Mapping[str, Stat | None], base_by_path: Mapping[str, BaseEntry],
              part_suffix: str) -> set[str]:
    """Of the files FOUND under a folder deleted elsewhere (path -> stat now), those a
    local delete removes: unchanged since synced, or a stale temporary download."""
    return {path for path, now in found.items()
            if path.endswith(part_suffix)
            or (path in base_by_path and now is not None and base_by_path[path].stat == now)}


@dataclass(frozen=True)
class MoveSteps:
    """How a local move is carried out."""

    step_aside_first: bool     # the item moves into its own old place: rename it away first
    set_destination_aside: bool    # something unsynced is in the way: a conflicted copy


def local_move_steps(from_path: str, to_path: str, destination: Kind | None) -> MoveSteps:
    return MoveSteps(step_aside_first=is_within(to_path, from_path),
                     set_destination_aside=destination is not None)


def folder_sets_aside(found: Kind | None) -> bool:
    """A new local folder finds a file (or anything not a folder) in its place."""
    return found is not None and found != "dir"


def moved_base(entry: BaseEntry, to_path: str, remote_version: int, remote_content: str
               ) -> BaseEntry:
    """The base of a node moved here to match the appliance: its version advances only if
    the content did not change there meanwhile (a folder's content is its children)."""
    same = entry.kind == "dir" or remote_content == entry.content
    return BaseEntry(entry.node_id, to_path, entry.kind,
                     remote_version if same else entry.version, entry.content, entry.stat)


def repathed_base(entry: BaseEntry, to_path: str, version_moved: int, new_version: int
                  ) -> BaseEntry:
    """The base of a node moved on the appliance to match here: the base version advances
    only if the remote had nothing else new for it."""
    version = new_version if entry.version == version_moved else entry.version
    return BaseEntry(entry.node_id, to_path, entry.kind, version, entry.content, entry.stat)


def began_upload(node_id: str, path: str, version: int, content: str) -> BaseEntry:
    """An upload stopped because the file changed under it, after the appliance gave the
    node a new version (still `uploading`, or complete with the old content). That version
    is the base of the next upload, which supersedes it — not a change from elsewhere:
    otherwise every device would wait for the unfinished version, or this one would set
    its own upload aside. No local stat: the file here counts as changed."""
    return BaseEntry(node_id, path, "file", version, content, None)


def remote_folder_at(path: str, root_id: str, synced: BaseEntry | None,
                     remote: Iterable[RemoteEntry]) -> str | None:
    """The id of the remote folder that the local folder PATH maps to (SYNCED: the base
    entry at PATH), synced or not (a folder new on both sides has no base entry yet, and
    asking for one made a move onto a file there fail on every round), or None."""
    if not path:
        return root_id
    if synced is not None and synced.kind == "dir":
        return synced.node_id
    return next((e.node_id for e in remote if e.path == path and e.kind == "dir"), None)
