"""What the drive sends again after the appliance lost recent history (fuse/rollback.py,
`to_resend`, pure): what this device wrote and the appliance lacks or has older, folders
before what they hold; not other devices' items, not nodes with a change pending, not
what has no folder to go in."""

from __future__ import annotations

from agent.sync.model import Kind, RemoteEntry
from agent.sync.state import RemoteRow
from fuse.rollback import to_resend

ROOT = "r" * 32
ME, OTHER = "laptop", "desktop"


def nid(name: str) -> str:
    return (name.encode().hex() + "0" * 32)[:32]


def row(name: str, kind: Kind = "file", parent: str = ROOT, version: int = 1,
        content: str = "c1", device: str = ME) -> RemoteRow:
    return RemoteRow(nid(name), parent, name, kind, version, True, 1, 1, 0o644, content,
                     device, 1.0, 1.0, b"k" * 32, b"sealed")


def listed(*rows: RemoteRow) -> dict[str, RemoteEntry]:
    return {r.node_id: RemoteEntry(r.node_id, r.parent_id or ROOT, r.name, r.kind,
                                   r.version, 1, 1, 0o644, r.content) for r in rows}


def test_what_the_drive_wrote_and_the_appliance_lacks_goes_again_folders_first() -> None:
    folder, inside = row("made", "dir"), row("inside", parent=nid("made"))
    edited, same = row("edited", version=3, content="c3"), row("same", version=2)
    theirs, pending = row("theirs", device=OTHER), row("pending")
    their_folder = row("their-folder", "dir", device=OTHER)
    stranded = row("stranded", parent=nid("their-folder"))
    old = [inside, edited, same, theirs, pending, their_folder, stranded, folder]
    now = listed(row("edited", version=2, content="c2"), row("same", version=1))
    chosen, unplaced = to_resend(old, now, ROOT, ME, lambda node_id: node_id == nid("pending"))
    assert [(r.row.name, r.base_version) for r in chosen] == [
        ("made", None), ("edited", 2), ("inside", None)]
    assert unplaced == ["stranded"]
    # (same: the appliance has it at an older version with the same content: nothing)
