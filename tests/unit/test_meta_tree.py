"""appliance.meta.tree and appliance.meta.gc on an in-memory database with the migrations
applied: creating (and retrying), updating, moving, deleting and restoring nodes; block
references and upload progress; who may see what; and garbage collection after the grace
period."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import apsw
import pytest
from meta_helpers import (
    block_ref,
    block_row,
    content,
    journal,
    memory_db,
    mkdir,
    mkfile,
    mkroot,
    new_id,
    new_user,
    node_of,
    store,
)

from appliance.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    GoneError,
    NotFoundError,
)
from appliance.meta import gc, sharing, tree
from appliance.meta.records import User

A, B, C = block_ref(b"a" * 100), block_ref(b"b" * 200), block_ref(b"c" * 300)


@pytest.fixture
def db() -> Iterator[apsw.Connection]:
    connection = memory_db()
    yield connection
    connection.close()


def kinds_of_changes(db: apsw.Connection, node_id: str) -> list[str]:
    return [str(row[0]) for row in db.execute(
        "SELECT kind FROM changes WHERE node_id = ? ORDER BY cursor", (node_id,))]


def version(db: apsw.Connection, node_id: str) -> int:
    return node_of(db, node_id).version


def delete(db: apsw.Connection, user: User, node_id: str) -> None:
    tree.delete_node(db, user, journal(db), node_id, version(db, node_id))


def restore(db: apsw.Connection, user: User, node_id: str) -> None:
    tree.restore_node(db, user, journal(db), node_id, version(db, node_id))


# --- creating ---------------------------------------------------------------------------------

def test_one_root_per_user_and_only_folders_are_roots(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    assert (root.kind, root.parent_id, root.status, root.version) == ("dir", None, "uploaded", 1)
    assert tree.root_node(db, alice.id) == root
    with pytest.raises(ConflictError, match="already has a root") as second:
        mkroot(db, alice)
    assert second.value.details == {"root_id": root.id}
    with pytest.raises(BadRequestError, match="only a folder"):
        tree.create_node(db, alice, journal(db), kind="file", parent_id=None,
                         content=content(), node_id=new_id())


def test_a_file_waits_for_its_blocks_then_is_uploaded(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    node = mkfile(db, alice, root, A, B, A)        # A twice: one pending entry, two refs
    assert (node.status, node.size, node.block_count) == ("uploading", 400, 3)
    assert tree.node_blocks(db, node.id) == [A, B, A]
    assert tree.missing_blocks(db, node.id) == sorted([A, B], key=lambda b: b.block_id)
    assert block_row(db, A.block_id) == (0, 2, None)
    assert tree.user_awaits_block(db, alice.id, A.block_id)

    assert store(db, A) == []                      # B still missing
    [completed] = store(db, B)
    assert completed.id == node.id and completed.status == "uploaded"
    assert tree.missing_blocks(db, node.id) == []
    assert tree.block_is_stored(db, A.block_id) and tree.block_is_stored(db, B.block_id)
    assert kinds_of_changes(db, node.id) == ["created", "uploaded"]
    assert store(db, B) == []                      # storing again completes nothing new
    assert not tree.user_awaits_block(db, alice.id, A.block_id)


def test_blocks_stored_already_are_not_asked_for_again(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    first = mkfile(db, alice, root, A)
    store(db, A)
    again = mkfile(db, alice, root, A)             # dedup: uploaded at once
    assert again.status == "uploaded" and tree.missing_blocks(db, again.id) == []
    assert block_row(db, A.block_id) == (1, 2, None)
    assert first.id != again.id


def test_a_retried_create_is_recognised_and_a_clashing_id_refused(
        db: apsw.Connection) -> None:
    alice, bob = new_user(db, "alice"), new_user(db, "bob")
    root = mkroot(db, alice)
    node_id = new_id()
    made, created = tree.create_node(db, alice, journal(db), kind="file", parent_id=root.id,
                                     content=content(A), node_id=node_id)
    again, created_again = tree.create_node(db, alice, journal(db), kind="file",
                                            parent_id=root.id, content=content(A),
                                            node_id=node_id)
    assert (created, created_again) == (True, False) and again == made
    assert block_row(db, A.block_id) == (0, 1, None)          # not referenced twice
    with pytest.raises(ConflictError, match="already exists") as other:
        tree.create_node(db, alice, journal(db), kind="file", parent_id=root.id,
                         content=content(B), node_id=node_id)
    assert other.value.details == {"current_version": 1}
    with pytest.raises(ConflictError) as foreign:     # someone else's id: no version leaked
        tree.create_node(db, bob, journal(db), kind="file", parent_id=mkroot(db, bob).id,
                         content=content(A), node_id=node_id)
    assert foreign.value.details == {"current_version": None}


def test_where_a_node_may_be_created(db: apsw.Connection) -> None:
    alice, bob = new_user(db, "alice"), new_user(db, "bob")
    root = mkroot(db, alice)
    a_file = mkfile(db, alice, root, A)
    with pytest.raises(BadRequestError, match="is a file"):
        mkfile(db, alice, a_file, B)
    gone = mkdir(db, alice, root)
    delete(db, alice, gone.id)
    with pytest.raises(ConflictError, match="deleted"):
        mkfile(db, alice, gone, B)
    with pytest.raises(NotFoundError):               # not even told it exists
        mkfile(db, bob, root, B)
    shared = mkdir(db, alice, root)
    mkroot(db, bob)
    sharing.share(db, alice, journal(db), shared.id, [("bob", b"wrapped-for-bob")])
    with pytest.raises(ForbiddenError, match="read-only"):
        mkfile(db, bob, shared, B)
    with pytest.raises(NotFoundError, match="32 hex digits"):
        mkfile(db, alice, "../etc", B)


def test_content_limits_are_checked(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    too_big = replace(A, size=tree.MAX_BLOCK_BYTES + 1)
    bad = {
        "metadata is over": content(metadata=b"m" * (tree.MAX_METADATA_BYTES + 1)),
        "wrapped_key must have": content(key=b""),
        "size must be": content(too_big),
        "invalid block id": content(replace(A, block_id="A" * 64)),
        "size is out of range": replace(content(A), size=-1),
    }
    for message, sent in bad.items():
        with pytest.raises(BadRequestError, match=message):
            tree.create_node(db, alice, journal(db), kind="file", parent_id=root.id,
                             content=sent, node_id=new_id())
    with pytest.raises(BadRequestError, match="a directory has no blocks"):
        tree.create_node(db, alice, journal(db), kind="dir", parent_id=root.id,
                         content=content(A), node_id=new_id())


# --- reading and visibility ------------------------------------------------------------------

def test_a_grant_on_a_folder_opens_its_subtree_only(db: apsw.Connection) -> None:
    alice, bob = new_user(db, "alice"), new_user(db, "bob")
    root = mkroot(db, alice)
    shared = mkdir(db, alice, root)
    inner = mkfile(db, alice, mkdir(db, alice, shared), A)
    private = mkfile(db, alice, root, B)
    sharing.share(db, alice, journal(db), shared.id, [("bob", b"k")])
    assert tree.readable_node(db, bob.id, inner.id) == inner
    with pytest.raises(NotFoundError):
        tree.readable_node(db, bob.id, private.id)
    with pytest.raises(NotFoundError):
        tree.readable_node(db, bob.id, new_id())      # the same answer as a missing node
    with pytest.raises(ForbiddenError, match="owner \\(alice\\)"):
        tree.owned_node(db, bob.id, inner.id)
    assert tree.user_may_read_block(db, bob.id, A.block_id)
    assert not tree.user_may_read_block(db, bob.id, B.block_id)
    assert tree.user_may_read_block(db, alice.id, B.block_id)


def test_children_are_paged_and_deleted_ones_left_out_unless_asked(
        db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    made = sorted(mkdir(db, alice, root).id for _ in range(5))
    delete(db, alice, made[2])
    live = [n.id for n in tree.children(db, root.id, False, "", 100)]
    assert live == made[:2] + made[3:]
    first = tree.children(db, root.id, True, "", 2)
    rest = tree.children(db, root.id, True, first[-1].id, 100)
    assert [n.id for n in first + rest] == made


# --- updating and moving -----------------------------------------------------------------------

def test_an_update_needs_the_current_version_and_a_retry_is_recognised(
        db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    node = mkfile(db, alice, root, A)
    store(db, A)
    update = content(B, metadata=b"v2")
    updated = tree.update_node(db, alice, journal(db), node.id, base_version=1,
                               parent_id=None, content=update, move=False)
    assert (updated.version, updated.status, updated.metadata) == (2, "uploading", b"v2")
    assert tree.node_blocks(db, node.id) == [B]
    assert block_row(db, A.block_id)[:2] == (1, 0)            # type: ignore[index]
    assert block_row(db, B.block_id) == (0, 1, None)
    retried = tree.update_node(db, alice, journal(db), node.id, base_version=1,
                               parent_id=None, content=update, move=False)
    assert retried == updated
    with pytest.raises(ConflictError, match="version 2, not 1") as stale:   # another device
        tree.update_node(db, alice, journal(db, "dev_other"), node.id, base_version=1,
                         parent_id=None, content=update, move=False)
    assert stale.value.details == {"current_version": 2}
    with pytest.raises(BadRequestError, match="nothing to change"):
        tree.update_node(db, alice, journal(db), node.id, base_version=2, parent_id=None,
                         content=None, move=False)
    assert kinds_of_changes(db, node.id) == ["created", "uploaded", "updated"]


def test_metadata_only_updates_keep_the_blocks(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    node = mkfile(db, alice, root, A, B)
    store(db, A, B)
    keep = tree.NodeContent(metadata=b"renamed", wrapped_key=b"wrapped", size=-1)
    assert version(db, node.id) == 1               # completing an upload is no new version
    updated = tree.update_node(db, alice, journal(db), node.id, base_version=1,
                               parent_id=None, content=keep, move=False)
    assert (updated.size, updated.block_count, updated.status) == (300, 2, "uploaded")
    assert tree.node_blocks(db, node.id) == [A, B]
    assert block_row(db, A.block_id) == (1, 1, None)


def test_moves_rewrap_and_refuse_cycles_and_roots(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    outer = mkdir(db, alice, root)
    inner = mkdir(db, alice, outer)
    moved_key = content(key=b"rewrapped")
    with pytest.raises(BadRequestError, match="into itself"):
        tree.update_node(db, alice, journal(db), outer.id, base_version=1,
                         parent_id=inner.id, content=moved_key, move=True)
    with pytest.raises(BadRequestError, match="root folder cannot be moved"):
        tree.update_node(db, alice, journal(db), root.id, base_version=1,
                         parent_id=outer.id, content=moved_key, move=True)
    with pytest.raises(BadRequestError, match="re-wrapped"):
        tree.update_node(db, alice, journal(db), inner.id, base_version=1,
                         parent_id=root.id, content=None, move=True)
    with pytest.raises(BadRequestError, match="new parent"):
        tree.update_node(db, alice, journal(db), inner.id, base_version=1,
                         parent_id=None, content=moved_key, move=True)
    moved = tree.update_node(db, alice, journal(db), inner.id, base_version=1,
                             parent_id=root.id, content=moved_key, move=True)
    assert (moved.parent_id, moved.wrapped_key, moved.version) == (root.id, b"rewrapped", 2)
    assert kinds_of_changes(db, inner.id) == ["created", "moved"]


# --- deleting and restoring --------------------------------------------------------------------

def test_deleting_a_folder_tombstones_its_subtree_and_frees_its_blocks(
        db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    folder = mkdir(db, alice, root)
    inner = mkfile(db, alice, mkdir(db, alice, folder), A)
    elsewhere = mkfile(db, alice, root, B)
    store(db, A, B)
    delete(db, alice, folder.id)
    assert node_of(db, inner.id).deleted and node_of(db, folder.id).deleted
    assert not node_of(db, elsewhere.id).deleted
    stored, refs, since = block_row(db, A.block_id)            # type: ignore[misc]
    assert (stored, refs) == (1, 0) and since is not None and since <= time.time()
    assert block_row(db, B.block_id) == (1, 1, None)
    assert [n.id for n in tree.trash(db, alice.id, 10)] == [folder.id]   # roots only
    before = version(db, folder.id)
    assert tree.delete_node(db, alice, journal(db), folder.id, 1).version == before  # twice
    with pytest.raises(ConflictError, match="deleted; restore"):
        tree.update_node(db, alice, journal(db), folder.id, base_version=before,
                         parent_id=None, content=content(), move=False)


def test_restore_brings_back_what_the_deletion_took(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    folder = mkdir(db, alice, root)
    inner = mkfile(db, alice, folder, A)
    store(db, A)
    delete(db, alice, inner.id)      # first by itself: its own deletion
    delete(db, alice, folder.id)     # then the folder: takes only what was live
    with pytest.raises(ConflictError, match="restore the folder first"):
        restore(db, alice, inner.id)
    restore(db, alice, folder.id)
    assert not node_of(db, folder.id).deleted and node_of(db, inner.id).deleted
    restore(db, alice, inner.id)
    assert node_of(db, inner.id).status == "uploaded"
    assert block_row(db, A.block_id) == (1, 1, None)
    assert kinds_of_changes(db, inner.id) == ["created", "uploaded", "deleted", "restored"]
    assert tree.trash(db, alice.id, 10) == []


def test_restore_after_the_blocks_were_reclaimed_is_gone(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    node = mkfile(db, alice, mkroot(db, alice), A)
    store(db, A)
    delete(db, alice, node.id)
    db.execute("DELETE FROM blocks WHERE block_id = ?", (A.block_id,))
    with pytest.raises(GoneError, match="reclaimed"):
        restore(db, alice, node.id)


# --- garbage collection ------------------------------------------------------------------------

def test_gc_purges_old_tombstones_and_collects_unreferenced_blocks(
        db: apsw.Connection) -> None:
    alice, bob = new_user(db, "alice"), new_user(db, "bob")
    root = mkroot(db, alice)
    mkroot(db, bob)
    old = mkfile(db, alice, root, A)
    kept = mkfile(db, alice, root, B)
    store(db, A, B)
    sharing.share(db, alice, journal(db), old.id, [("bob", b"k")])
    delete(db, alice, old.id)
    cutoff = time.time() + 1                                    # the grace period is over
    assert gc.unreferenced_blocks(db, cutoff, 10) == [A.block_id]
    assert gc.unreferenced_blocks(db, cutoff - 3600, 10) == []  # not yet
    assert gc.purge_deleted_nodes(db, cutoff - 3600) == 0
    assert gc.purge_deleted_nodes(db, cutoff) == 1
    assert tree.find_node(db, old.id) is None
    assert sharing.grants_of(db, old.id) == []
    assert tree.node_blocks(db, old.id) == []

    assert gc.claim_block(db, A.block_id, cutoff)
    assert not tree.block_is_stored(db, A.block_id)
    gc.forget_block(db, A.block_id)
    assert block_row(db, A.block_id) is None
    assert not gc.claim_block(db, B.block_id, cutoff)           # referenced: left alone
    assert node_of(db, kept.id).status == "uploaded"


def test_a_block_referenced_again_during_collection_is_asked_for_again(
        db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    old = mkfile(db, alice, root, A)
    store(db, A)
    delete(db, alice, old.id)
    cutoff = time.time() + 1
    assert gc.claim_block(db, A.block_id, cutoff)               # step 1: not stored now
    newer = mkfile(db, alice, root, A)                          # referenced meanwhile
    assert newer.status == "uploading"                          # so it must be uploaded
    gc.forget_block(db, A.block_id)                             # step 3 keeps the row
    assert block_row(db, A.block_id) == (0, 1, None)
    assert tree.missing_blocks(db, newer.id) == [A]
    [completed] = store(db, A)
    assert completed.id == newer.id
