"""Symbolic links in the sync engine's pieces below the planner: the mirror's row of a link
node, a database from before links were synced, and a link read for a batch upload (never
followed) or placed by a batch download — which, for a link as for a file, reports what
it wrote, not an edit landing just after."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.crypto.nodes import NodeMeta, new_node_key, open_metadata, seal_metadata
from agent.errors import FileChangedError
from agent.remote import RemoteNode, RemoteTree
from agent.sync import batch
from agent.sync.mirror import Mirror
from agent.sync.model import content_of_refs, link_content_id
from agent.sync.state import RemoteRow, SyncDb
from protocol.ids import b64decode, b64encode
from protocol.models import BatchCreate, NodeOut

ROOT, FOLDER, LINK = "a" * 32, "b" * 32, "c" * 32


def remote_node(node_id: str, meta: NodeMeta, key: bytes | None = None) -> RemoteNode:
    return RemoteNode(id=node_id, parent=FOLDER, kind=meta.kind, version=1,
                      status="uploaded", deleted=False, owner="ann", created_at=1.0,
                      updated_at=1.0, key=key or new_node_key(), meta=meta)


def answer(metadata: bytes, **changes: Any) -> NodeOut:
    return NodeOut.model_validate({
        "id": LINK, "owner": "ann", "parent": FOLDER, "kind": "file", "version": 1,
        "status": "uploaded", "deleted": False, "deleted_at": None, "size": 0,
        "block_count": 0, "metadata": b64encode(metadata), "wrapped_key": "a2V5",
        "created_at": 1.0, "updated_at": 2.0, "updated_by": None, **changes})


def test_a_link_node_is_mirrored_with_its_target_as_content(tmp_path: Path) -> None:
    db = SyncDb(tmp_path / "sync.db")
    record = db.add_folder(str(tmp_path / "dir"), ROOT, "/")
    db.put_remote(record.id, RemoteRow(FOLDER, ROOT, "docs", "dir", 1, True, 0, 0, 0o755,
                                       "", "", 1.0, 1.0, new_node_key(), b"sealed"))
    mirror = Mirror(cast(RemoteTree, SimpleNamespace(user="ann")), db, record)
    key = new_node_key()
    meta = NodeMeta(name="l", kind="file", mtime_ns=5, mode=0o777, link="../target")
    sealed = seal_metadata(key, LINK, meta)
    row = mirror.absorb_written(answer(sealed), key, meta, b64encode(sealed))
    assert row is not None and row.link == "../target"
    assert row.content == link_content_id("../target") != content_of_refs(())
    assert mirror.entries()[LINK].content == row.content


def test_link_rows_mirrored_before_links_were_synced_get_their_content(
        tmp_path: Path) -> None:
    db = SyncDb(tmp_path / "sync.db")
    record = db.add_folder(str(tmp_path / "dir"), ROOT, "/")
    db.put_remote(record.id, RemoteRow(LINK, ROOT, "l", "file", 1, True, 0, 0, 0o777,
                                       content_of_refs(()), "", 1.0, 1.0, new_node_key(),
                                       b"sealed", link="../target"))
    db.db.execute("PRAGMA user_version = 0")
    db.close()
    again = SyncDb(tmp_path / "sync.db")
    row = again.remote_row(record.id, LINK)
    assert row is not None and row.content == link_content_id("../target")


def test_a_link_is_read_for_upload_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("never uploaded")
    os.symlink(secret, tmp_path / "l")
    parent = remote_node(FOLDER, NodeMeta(name="docs", kind="dir"))
    item = batch.SmallUpload(tmp_path / "l", "l", parent, None)
    batch._read_and_encrypt(b"s" * 32, item)
    assert item.link == str(secret) and not item.refs and not item._cipher
    assert item.source is not None and item.source.st_ino == os.lstat(tmp_path / "l").st_ino
    operation = batch._operation(item, "laptop")
    assert isinstance(operation, BatchCreate)
    assert operation.size == 0 and operation.blocks == []
    assert item.written is not None
    sealed = open_metadata(item.written.key, operation.id, "file",
                           b64decode(operation.metadata))
    assert sealed.link == str(secret) and sealed.size == 0 and sealed.mode == 0o777
    assert sealed.mtime_ns == os.lstat(tmp_path / "l").st_mtime_ns
    # unchanged against a node that already holds that link; not against an empty file
    item.existing = remote_node(LINK, sealed)
    assert batch._unchanged(item)
    item.existing = remote_node(LINK, NodeMeta(name="l", kind="file", mode=0o777,
                                               mtime_ns=sealed.mtime_ns))
    assert not batch._unchanged(item)


def test_a_link_node_is_placed_as_a_link_if_the_target_is_unchanged(
        tmp_path: Path) -> None:
    node = remote_node(LINK, NodeMeta(name="l", kind="file", mtime_ns=1_500_000_000_000_000_000,
                                      link="../elsewhere"))
    target = tmp_path / "l"
    placed = batch._write_file(batch.SmallDownload(node, target, lambda: None), {})
    assert os.readlink(target) == "../elsewhere"
    assert placed.st_ino == os.lstat(target).st_ino
    assert os.lstat(target).st_mtime_ns == 1_500_000_000_000_000_000

    def changed() -> None:
        raise FileChangedError("changed meanwhile")

    target.unlink()
    target.write_text("written here meanwhile")
    with pytest.raises(FileChangedError):
        batch._write_file(batch.SmallDownload(node, target, changed), {})
    assert target.read_text() == "written here meanwhile" and not target.is_symlink()
    assert [p.name for p in tmp_path.iterdir()] == ["l"]     # no temporary left


@pytest.mark.parametrize("link", [None, "../elsewhere"])
def test_a_download_reports_what_it_wrote_not_an_edit_just_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: str | None) -> None:
    """The stat a download reports becomes the base: were it taken after the rename, an
    edit landing in between would count as synced and never be sent."""
    node = remote_node(LINK, NodeMeta(name="f", kind="file", link=link))
    target = tmp_path / "f"
    replace = os.replace

    def replace_then_edit(source: Any, destination: Any) -> None:
        replace(source, destination)
        os.unlink(destination)
        destination.write_text("edited at once")

    monkeypatch.setattr(os, "replace", replace_then_edit)
    written = batch._write_file(batch.SmallDownload(node, target, lambda: None), {})
    assert (written.st_size, written.st_ino) != (os.lstat(target).st_size,
                                                 os.lstat(target).st_ino)
