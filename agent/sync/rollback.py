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
- a fresh file at another content: it depends on the version the copy had (c: the
  node's version when the epoch began, learnt from the feed since then, `copy_versions`):
  - B's version is one the copy had (B's version <= c): R is a normal successor of what
    this device synced, made since the recovery by another device — B unchanged, and the
    usual rules apply (download it; a conflict only if the file here changed too);
  - else (B's version was made in the lost window, or c is not known — an appliance
    before API 1.4, a node made again since the recovery): a conflict — the appliance
    lost this device's version and another device edited an older one, or so it may be.
    Version 0 and a base stat no file matches, so both sides count as changed: identical
    content merges, else the usual conflicted copy (the one here keeps the name, R's is
    kept beside it).

**The copy's versions** (`copy_versions`): the appliance reports the newest change cursor
when the epoch began (API 1.4: GET /me's `epoch_started_cursor`), so the feed after it is
exactly what changed since the recovery; a node's first change there was made on top of
the version the copy had (one below the change's version, or the same for a change that
makes no version: `uploaded`, `shared` ...), and a node `created` there is new. A wrong c
could only be too low (a kind not known here counts as one that makes a version), which
falls back to the conflict: never to a download over what this device alone had. The
feed is read only when such fresh edits exist (`fresh_edits`), and only so far (the
mirror's COPY_CHANGES_READ): a node first changed later keeps the conflict. A folder needs
no c: a fresh folder is left to the usual rules either way.

Nothing here deletes what the appliance lost: every base entry left points at a node the
appliance has (alive, or deleted on purpose), so no plan takes a lost node for a remote
delete; a base entry whose local file is gone still sends that local delete, as it should.
What is lost for good: a deletion made in the lost window comes back (the node is in the
copy and no base knows it was deleted — the file is downloaded again), and so does a move
made in the window on a device that does not run any more. A file deleted on the
appliance so long ago that its tombstone was purged looks lost and is sent again. Grants
and shares made in the window are not re-sent. Versions are compared as one history: a
device offline across two recoveries, whose version the first one lost, takes a version
of the same node made later (in the second copy, or since) as the successor of its own
and downloads it — its content, on no appliance any more, is then overwritten.

A place ("path") is derived from the parent's new place and the node's own name, from R
or from B as the node's row above says, so a folder moved back and what is in it agree.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from agent.sync.model import BaseEntry, RemoteEntry, Stat, name_of, parent_of

CONFLICT_VERSION = 0
"""A base version no node has (versions start at 1): the remote counts as changed."""
UNSYNCED_SIZE = -1
"""The size in a base stat that no local file has: the file here counts as changed."""
SAME_VERSION_KINDS = frozenset({"uploaded", "uploading", "shared", "unshared"})
"""Kinds of change that leave the node's version as it was (docs/api.md): every other kind
but `created` makes the next version."""


@dataclass(frozen=True)
class Rollback:
    """The appliance's history changed under a synced folder."""

    epoch: str | None           # the appliance's epoch now (None: it has none)
    started_at: float | None    # when that epoch began (None: not known)
    reason: str                 # for the log
    started_cursor: int | None = None   # the newest change cursor then (None: not known)


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


def copy_versions(changes: Iterable[tuple[str, int, str]]) -> dict[str, int]:
    """Each node's version in the copy, c, from CHANGES — (node id, the version the
    change made, its kind) of every change since the epoch began, in any order: the
    version its first change there was made on. A node created there has none (it is
    new). Every version after c was made since the recovery by some device."""
    before: dict[str, int] = {}
    created: set[str] = set()
    for node_id, version, kind in changes:
        if kind == "created":
            created.add(node_id)
            continue
        copy = version if kind in SAME_VERSION_KINDS else version - 1
        before[node_id] = min(copy, before.get(node_id, copy))
    return {node_id: c for node_id, c in before.items() if node_id not in created}


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
    successors: int = 0              # files changed since on a version synced here

    @property
    def summary(self) -> str:
        return (f"{len(self.forget)} items it lost are sent again as new, {self.resend} "
                f"files at an older version get this device's, {self.conflicts} changed "
                f"since are compared, {self.successors} changed since on the version "
                "synced here are taken as usual")


@dataclass(frozen=True)
class _Decision:
    """What becomes of one base entry: its version, content and stat, and whether its
    place comes from the appliance's node (else from the base)."""

    version: int
    content: str
    stat: Stat | None
    remote_place: bool
    kind: str = "same"              # or "resend", "conflict", "successor" (the counts)


def _fresh(node: RemoteEntry, started_at: float | None) -> bool:
    """Whether NODE was changed since the epoch began (by some device, since the recovery)."""
    return started_at is not None and node.updated_at >= started_at


def _same_content(entry: BaseEntry, node: RemoteEntry) -> bool:
    return node.content == entry.content and node.uploaded


def fresh_edits(base: Mapping[str, BaseEntry], remote: Mapping[str, RemoteEntry],
                started_at: float | None) -> set[str]:
    """The synced files that REMOTE has changed since the epoch began (STARTED_AT) at
    another content than the base's: whether each is a conflict depends on the version
    the copy had of it (`copy_versions`); the others need none."""
    return {node_id for node_id, entry in base.items() if entry.kind == "file"
            and (node := remote.get(node_id)) is not None and node.kind == "file"
            and _fresh(node, started_at) and not _same_content(entry, node)}


def _decide(entry: BaseEntry, node: RemoteEntry, started_at: float | None,
            in_copy: int | None) -> _Decision:
    """IN_COPY: the node's version in the copy (c), if known."""
    fresh = _fresh(node, started_at)
    if entry.kind == "dir":
        if fresh or node.version > entry.version:
            return _Decision(entry.version, entry.content, entry.stat, False)
        return _Decision(node.version, node.content, entry.stat, True)
    same_content = _same_content(entry, node)
    if fresh:
        if same_content:
            return _Decision(node.version, node.content, entry.stat, False)
        if in_copy is None or not entry.version <= in_copy < node.version:
            return _Decision(CONFLICT_VERSION, entry.content, unsynced(entry.stat), False,
                             "conflict")
        # The copy had B's version: R is a normal successor of it.
        return _Decision(entry.version, entry.content, entry.stat, False, "successor")
    if node.version > entry.version:
        return _Decision(entry.version, entry.content, entry.stat, False)
    if same_content:
        return _Decision(node.version, node.content, entry.stat, True)
    return _Decision(node.version, node.content, unsynced(entry.stat), True, "resend")


def rebase(base: Mapping[str, BaseEntry], remote: Mapping[str, RemoteEntry],
           started_at: float | None, deleted: Collection[str] = (),
           in_copy: Mapping[str, int] | None = None) -> Rebase:
    """The base of a folder re-based on the appliance's tree REMOTE (listed again after
    its history changed; STARTED_AT: when its epoch began, None if not known; DELETED:
    the nodes it lacks that it holds as deleted; IN_COPY: the versions the copy had of
    nodes changed since, `copy_versions`, None if not known) — see the module doc.
    Entries that stay exactly as they are are left out."""
    in_copy = {} if in_copy is None else in_copy
    decisions: dict[str, _Decision] = {}
    forget: list[str] = []
    for entry in base.values():
        node = remote.get(entry.node_id)
        if node is None and entry.node_id in deleted:
            continue                       # deleted there: the usual rules
        if node is None or node.kind != entry.kind:
            forget.append(entry.node_id)
        else:
            decisions[entry.node_id] = _decide(entry, node, started_at,
                                               in_copy.get(entry.node_id))
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
                  kinds.count("conflict"), lost_folders, kinds.count("successor"))
