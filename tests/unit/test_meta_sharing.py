"""appliance.meta.sharing and appliance.meta.journal on an in-memory database with the
migrations applied: grants and their refusals, and the change journal's fan-out — each
change lands in the feed of the owner and of everyone holding a grant above the node."""

from __future__ import annotations

from collections.abc import Iterator

import apsw
import pytest
from meta_helpers import (
    block_ref,
    content,
    journal,
    memory_db,
    mkdir,
    mkfile,
    mkroot,
    new_user,
    store,
)

from appliance.errors import BadRequestError, ForbiddenError, NotFoundError
from appliance.meta import journal as journals
from appliance.meta import sharing, tree
from appliance.meta.records import User

A = block_ref(b"a" * 100)


@pytest.fixture
def db() -> Iterator[apsw.Connection]:
    connection = memory_db()
    yield connection
    connection.close()


def feed_of(db: apsw.Connection, user: User) -> list[tuple[str, str]]:
    """(node id, kind) of every change in the user's feed, oldest first."""
    return [(c.node_id, c.kind) for c in journals.feed_page(db, user.id, 0, 1000)]


def test_share_and_unshare(db: apsw.Connection) -> None:
    alice, bob, carol = (new_user(db, n) for n in ("alice", "bob", "carol"))
    folder = mkdir(db, alice, mkroot(db, alice))
    granted = sharing.share(db, alice, journal(db), folder.id,
                            [("carol", b"for-carol"), ("bob", b"for-bob")])
    assert [(g.user_name, g.node_id, g.wrapped_key) for g in granted] == \
        [("bob", folder.id, b"for-bob"), ("carol", folder.id, b"for-carol")]
    again = sharing.share(db, alice, journal(db), folder.id, [("bob", b"rewrapped")])
    assert [(g.user_name, g.wrapped_key) for g in again] == \
        [("bob", b"rewrapped"), ("carol", b"for-carol")]           # replaced, not added
    [(node, grant)] = sharing.shared_with(db, bob.id)
    assert node.id == folder.id and (grant.user_name, grant.wrapped_key) == \
        ("bob", b"rewrapped")

    sharing.unshare(db, alice, journal(db), folder.id, "bob")
    assert sharing.shared_with(db, bob.id) == []
    assert [n.id for n, _ in sharing.shared_with(db, carol.id)] == [folder.id]
    with pytest.raises(NotFoundError, match="not shared with bob"):
        sharing.unshare(db, alice, journal(db), folder.id, "bob")


def test_what_cannot_be_shared(db: apsw.Connection) -> None:
    alice, bob = new_user(db, "alice"), new_user(db, "bob")
    root = mkroot(db, alice)
    folder = mkdir(db, alice, root)
    refusals = {
        "yourself": [("alice", b"k")],
        "1-100 users": [],
        "wrapped key for bob": [("bob", b"")],
    }
    for message, grants in refusals.items():
        with pytest.raises(BadRequestError, match=message):
            sharing.share(db, alice, journal(db), folder.id, grants)
    with pytest.raises(BadRequestError, match="1-100 users"):
        sharing.share(db, alice, journal(db), folder.id,
                      [("bob", b"k")] * (sharing.MAX_GRANTS_PER_REQUEST + 1))
    with pytest.raises(NotFoundError, match="no user named"):
        sharing.share(db, alice, journal(db), folder.id, [("nobody", b"k")])
    sharing.share(db, alice, journal(db), folder.id, [("bob", b"k")])
    with pytest.raises(ForbiddenError):                          # bob may read, not share
        sharing.share(db, bob, journal(db), folder.id, [("alice", b"k")])
    tree.delete_node(db, alice, journal(db), folder.id, folder.version)
    with pytest.raises(BadRequestError, match="deleted"):
        sharing.share(db, alice, journal(db), folder.id, [("bob", b"k")])
    assert sharing.shared_with(db, bob.id) == []                 # deleted: not listed


def test_changes_fan_out_to_the_owner_and_grantees_above(db: apsw.Connection) -> None:
    alice, bob, carol = (new_user(db, n) for n in ("alice", "bob", "carol"))
    root = mkroot(db, alice)
    shared = mkdir(db, alice, root)
    sharing.share(db, alice, journal(db), shared.id, [("bob", b"k")])
    inside = mkfile(db, alice, mkdir(db, alice, shared), A)
    outside = mkdir(db, alice, root)
    store(db, A)

    alices = feed_of(db, alice)
    assert (inside.id, "created") in alices and (inside.id, "uploaded") in alices
    assert (outside.id, "created") in alices
    bobs = feed_of(db, bob)
    assert (shared.id, "shared") in bobs
    assert (inside.id, "uploaded") in bobs and (outside.id, "created") not in bobs
    assert feed_of(db, carol) == []
    assert journals.latest_cursor(db, carol.id) == 0
    # the newest change (inside's upload) is in both feeds
    assert journals.latest_cursor(db, alice.id) == journals.latest_cursor(db, bob.id) > 0

    sharing.unshare(db, alice, journal(db), shared.id, "bob")     # bob is told, once more
    assert feed_of(db, bob)[-1] == (shared.id, "unshared")
    mkdir(db, alice, shared)
    assert feed_of(db, bob)[-1] == (shared.id, "unshared")        # and then no more


def test_the_feed_pages_by_cursor_and_publishes_the_newest(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    root = mkroot(db, alice)
    recorder = journal(db, "dev_pc")
    made = [tree.create_node(db, alice, recorder, kind="dir", parent_id=root.id,
                             content=content(), node_id=f"{i:032x}")[0]
            for i in range(5)]
    everything = journals.feed_page(db, alice.id, 0, 100)
    assert [c.cursor for c in everything] == sorted(c.cursor for c in everything)
    first = journals.feed_page(db, alice.id, 0, 3)
    rest = journals.feed_page(db, alice.id, first[-1].cursor, 100)
    assert first + rest == everything
    assert recorder.published == {alice.id: everything[-1].cursor}
    assert all(c.device_id == "dev_pc" for c in everything[1:])
    assert journals.latest_cursor(db, alice.id) == everything[-1].cursor
    node = made[0]
    tree.delete_node(db, alice, journal(db), node.id, 1)
    history = journals.node_history(db, node.id, 0, 10)
    assert [(c.version, c.kind) for c in history] == [(1, "created"), (2, "deleted")]
    assert [c.kind for c in journals.node_history(db, node.id, 1, 10)] == ["deleted"]
