"""The mirror takes an upload's answer from the key and metadata the agent sealed into it
(agent/sync/mirror.py absorb_written) — and only when the answer carries exactly those
bytes; anything else is opened as any node from the appliance is."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from agent.crypto.nodes import NodeMeta, new_node_key, seal_metadata, wrap_key
from agent.remote import RemoteTree
from agent.sync.mirror import Mirror
from agent.sync.state import RemoteRow, SyncDb
from protocol.ids import b64encode
from protocol.models import NodeOut

ROOT, FOLDER, FILE = "a" * 32, "b" * 32, "c" * 32


def _mirror(tmp_path: Path) -> tuple[Mirror, bytes]:
    tmp_path.mkdir(exist_ok=True)
    db = SyncDb(tmp_path / "sync.db")
    record = db.add_folder(str(tmp_path / "dir"), ROOT, "/")
    folder_key = new_node_key()
    db.put_remote(record.id, RemoteRow(FOLDER, ROOT, "docs", "dir", 1, True, 0, 0, 0o755,
                                       "", "", 1.0, 1.0, folder_key, b"sealed"))
    tree = cast(RemoteTree, SimpleNamespace(user="ann", remember_key=lambda *_: None))
    return Mirror(tree, db, record), folder_key


def _answer(metadata: bytes, wrapped: bytes, **changes: Any) -> NodeOut:
    return NodeOut.model_validate({
        "id": FILE, "owner": "ann", "parent": FOLDER, "kind": "file", "version": 3,
        "status": "uploaded", "deleted": False, "deleted_at": None, "size": 0,
        "block_count": 0, "metadata": b64encode(metadata), "wrapped_key": b64encode(wrapped),
        "created_at": 1.0, "updated_at": 2.0, "updated_by": None, **changes})


def test_our_own_answer_is_taken_from_what_we_sealed_without_opening_it(
        tmp_path: Path) -> None:
    mirror, _ = _mirror(tmp_path)
    key = new_node_key()
    meta = NodeMeta(name="a.txt", kind="file", size=0, mtime_ns=7, mode=0o600, device="A")
    sealed = seal_metadata(key, FILE, meta)
    # The wrapped key is garbage: opening the node would fail, so a row proves that the
    # sealed key and metadata were used as they are.
    row = mirror.absorb_written(_answer(sealed, b"not a wrapped key"), key, meta,
                                b64encode(sealed))
    assert row is not None
    assert (row.name, row.size, row.mtime_ns, row.mode, row.version) == ("a.txt", 0, 7,
                                                                          0o600, 3)
    assert row.key == key and row.meta == sealed
    assert mirror.node(FILE).meta == meta


def test_an_answer_that_is_not_what_we_sealed_is_opened_like_any_other(
        tmp_path: Path) -> None:
    mirror, folder_key = _mirror(tmp_path)
    key = new_node_key()
    meta = NodeMeta(name="a.txt", kind="file", size=0)
    sealed = seal_metadata(key, FILE, meta)
    other = NodeMeta(name="b.txt", kind="file", size=0)
    served = seal_metadata(key, FILE, other)       # the appliance answered other bytes
    wrapped = wrap_key(folder_key, key, FILE, FOLDER)
    row = mirror.absorb_written(_answer(served, wrapped), key, meta, b64encode(sealed))
    assert row is not None and row.name == "b.txt"     # what the appliance holds, opened
    # ... and when it does not open (garbage wrapped key), it is left out, not trusted.
    fresh, _ = _mirror(tmp_path / "again")
    assert fresh.absorb_written(_answer(served, b"garbage"), key, meta,
                                b64encode(sealed)) is None
