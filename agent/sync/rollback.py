"""After the appliance lost recent history: noticing it, and re-basing a synced folder so
that what the device holds is sent again (pure: plain data in, a decision out).

An appliance recovered from an older copy of its database (`cairnd recover` rebuilds a lost
home from the copy on its data disks) lacks what was committed after the copy: nodes,
versions, changes. The devices still have all of it — in their files and in their base,
the last state both sides agreed on. Planned against that base as usual, the appliance's
older tree would look like remote changes: a node it lacks like a remote delete (the file
here deleted!), an older version like a remote edit (the device's newer file overwritten).

**Noticing** (`history_changed`): the appliance names its database's history with an
*epoch*, a new one after a recovery (API 1.3: GET /me, every GET /changes page); a device
records the epoch it synced against. Another epoch, or a feed cursor above the appliance's
newest (a copy put back by hand), means the history the device synced against is gone.

**Re-basing** (`rebase`): the mirror lists the remote tree again, and the base is rewritten
to describe what the appliance has *now* as if the device had just synced it and then made
its own changes — so the usual planner sends those changes, and the usual rules settle
what is truly concurrent. Per node of the base (B: its base entry; R: the node on the
appliance now; *fresh*: R changed after the epoch began, so some device changed it since
the recovery — else R is as the copy brought it back):

- R lacks the node and has no tombstone of it (it was created in the lost window):
  forgotten — the file here is then a new local item and is uploaded as a new node (or
  merged with one of the same name); a folder is made again with its old id, so that
  devices making it at the same moment meet (the second is refused, 409, and merges)
  instead of making two folders of one name;
- R has the node deleted (a tombstone: deleted before the copy was taken, or since the
  recovery): the base entry stays, and the delete follows the usual rules (the file here
  is deleted if unchanged, sent again if edited);
- a folder: R's version and place (older than B's if the window moved it; the local
  folder is then found by inode and moved back), unless R is fresh or newer than B;
- a file R has at B's content: R's version and place (a move in the window is re-sent);
- a file R has at an older version (R's version below B's, not fresh) or still uploading:
  R's version, and a base stat no local file matches — the file here counts as changed,
  so *it* is uploaded as the node's next version (the device's content wins: it is newer
  than what came back, not a concurrent edit; not a conflicted copy);
- a file R has at a newer version, not fresh: B unchanged — the device was behind the copy
  (offline since before it), and the usual rules apply (download, or a conflict);
- a fresh file at another content: a conflict — version 0 and a base stat no file
  matches, so both sides count as changed: identical content merges, else the usual
  conflicted copy (the one here keeps the name, R's is kept beside it).

Nothing here deletes what the appliance lost: every base entry left points at a node the
appliance has (alive, or deleted on purpose), so no plan takes a lost node for a remote
delete; a base entry whose local file is gone still sends that local delete, as it should.
What is lost for good: a deletion made in the lost window comes back (the node is in the
copy and no base knows it was deleted — the file is downloaded again), and so does a move
made in the window on a device that does not run any more. A file deleted on the
appliance so long ago that its tombstone was purged looks lost and is sent again. Grants
and shares made in the window are not re-sent.

A place ("path") is derived from the parent's new place and the node's own name, from R
or from B as the node's row above says, so a folder moved back and what is in it agree.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from agent.sync.model import BaseEntry, RemoteEntry, Stat, name_of, parent_of

CONFLICT_VERSION = 0
"""A base version no node has (versions start at 1): the remote counts as changed."""
UNSYNCED_SIZE = -1
"""The size in a base stat that no local file has: the file here counts as changed."""


@dataclass(frozen=True)
class Rollback:
    """The appliance's history changed under a synced folder."""

    epoch: str | None           # the appliance's epoch now (None: it has none)
    started_at: float | None    # when that epoch began (None: not known)
    reason: str                 # for the log


def history_changed(synced_epoch: str | None, epoch: str | None, cursor: int,
                    latest_cursor: int | None) -> str | None:
    """Why the history a folder was synced against (SYNCED_EPOCH, at feed CURSOR) is not
    the appliance's any more (it reports EPOCH and LATEST_CURSOR; None: unknown), or
    None if it still is."""
    if synced_epoch is not None and epoch is not None and synced_epoch != epoch:
        return f"its epoch changed from {synced_epoch[:8]} to {epoch[:8]}"
    if latest_cursor is not None and cursor > latest_cursor:
        return f"its newest change is {latest_cursor}, older than {cursor} seen here"
    return None


def unsynced(stat: Stat | None) -> Stat | None:
    """STAT as a base stat that no local file matches (the planner takes the file as
    changed since the base), keeping the inode so that a file moved here is still found."""
    return None if stat is None else replace(stat, size=UNSYNCED_SIZE)


def missing_from(base: Mapping[str, BaseEntry], remote: Mapping[str, RemoteEntry]
                 ) -> list[str]:
    """The synced nodes the appliance's tree lacks (lost, or deleted there: ask which)."""
    return [node_id for node_id in base if node_id not in remote]


@dataclass(frozen=True)
class Rebase:
    entries: tuple[BaseEntry, ...]   # base entries to write (each replaces its node's)
    forget: tuple[str, ...]          # node ids the appliance lost
    resend: int = 0                  # files whose content here is sent as a new version
    conflicts: int = 0               # files changed since the recovery at other content
    lost_folders: tuple[tuple[str, str], ...] = ()   # (path, id) of folders it lost

    @property
    def summary(self) -> str:
        return (f"{len(self.forget)} items it lost are sent again as new, {self.resend} "
                f"files at an older version get this device's, {self.conflicts} changed "
                "since are compared")


@dataclass(frozen=True)
class _Decision:
    """What becomes of one base entry: its version, content and stat, and whether its
    place comes from the appliance's node (else from the base)."""

    version: int
    content: str
    stat: Stat | None
    remote_place: bool
    kind: str = "same"              # or "resend", "conflict" (for the counts)


def _decide(entry: BaseEntry, node: RemoteEntry, started_at: float | None) -> _Decision:
    fresh = started_at is not None and node.updated_at >= started_at
    if entry.kind == "dir":
        if fresh or node.version > entry.version:
            return _Decision(entry.version, entry.content, entry.stat, False)
        return _Decision(node.version, node.content, entry.stat, True)
    same_content = node.content == entry.content and node.uploaded
    if fresh:
        if same_content:
            return _Decision(node.version, node.content, entry.stat, False)
        return _Decision(CONFLICT_VERSION, entry.content, unsynced(entry.stat), False,
                         "conflict")
    if node.version > entry.version:
        return _Decision(entry.version, entry.content, entry.stat, False)
    if same_content:
        return _Decision(node.version, node.content, entry.stat, True)
    return _Decision(node.version, node.content, unsynced(entry.stat), True, "resend")


def rebase(base: Mapping[str, BaseEntry], remote: Mapping[str, RemoteEntry],
           started_at: float | None, deleted: Collection[str] = ()) -> Rebase:
    """The base of a folder re-based on the appliance's tree REMOTE (listed again after
    its history changed; STARTED_AT: when its epoch began, None if not known; DELETED:
    the nodes it lacks that it holds as deleted) — see the module doc. Entries that stay
    exactly as they are are left out."""
    decisions: dict[str, _Decision] = {}
    forget: list[str] = []
    for entry in base.values():
        node = remote.get(entry.node_id)
        if node is None and entry.node_id in deleted:
            continue                       # deleted there: the usual rules
        if node is None or node.kind != entry.kind:
            forget.append(entry.node_id)
        else:
            decisions[entry.node_id] = _decide(entry, node, started_at)
    folders = {e.path: e.node_id for e in base.values()
               if e.kind == "dir" and e.node_id in decisions}
    places: dict[str, str] = {}

    def place(node_id: str, seen: frozenset[str] = frozenset()) -> str:
        """The node's new path: its parent's new path and its own name."""
        if node_id in places:
            return places[node_id]
        entry, node = base[node_id], remote[node_id]
        if decisions[node_id].remote_place:
            parent, name, fallback = node.parent_id, name_of(node.path), parent_of(node.path)
        else:
            fallback, name = parent_of(entry.path), name_of(entry.path)
            parent = folders.get(fallback, "")
        if parent in decisions and parent not in seen and base[parent].kind == "dir":
            folder = place(parent, seen | {node_id})
        else:
            folder = fallback
        places[node_id] = f"{folder}/{name}" if folder else name
        return places[node_id]

    entries: list[BaseEntry] = []
    for node_id, decision in decisions.items():
        entry = base[node_id]
        new = BaseEntry(node_id, place(node_id), entry.kind, decision.version,
                        decision.content, decision.stat)
        if new != entry:
            entries.append(new)
    kinds = [d.kind for d in decisions.values()]
    lost_folders = tuple((base[i].path, i) for i in forget
                         if base[i].kind == "dir" and i not in remote)
    return Rebase(tuple(entries), tuple(forget), kinds.count("resend"),
                  kinds.count("conflict"), lost_folders)
