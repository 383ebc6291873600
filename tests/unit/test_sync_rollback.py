"""Re-basing a synced folder after the appliance lost history (agent/sync/rollback.py),
one scenario each, then planned (pure): what the device holds and the appliance lacks is
sent again, never deleted here; and a property: no plan after a re-base deletes a local
item."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_sync_planner import ROOT, bd, bf, ld, lf, nid, rd, rf, trees

from agent.sync.model import (
    BaseEntry,
    DeleteLocal,
    DeleteRemote,
    Download,
    Forget,
    HashLocal,
    KeepBoth,
    LocalEntry,
    MakeRemoteDir,
    MoveRemote,
    RemoteEntry,
    Stat,
    Upload,
)
from agent.sync.planner import plan
from agent.sync.rollback import CONFLICT_VERSION, Rebase, history_changed, rebase, unsynced

SINCE = 1000.0       # when the new epoch began
OLD, NEW = 500.0, 2000.0


def at(entry: RemoteEntry, updated_at: float) -> RemoteEntry:
    """ENTRY as last changed at UPDATED_AT (the appliance's clock)."""
    return RemoteEntry(entry.node_id, entry.parent_id, entry.path, entry.kind, entry.version,
                       entry.size, entry.mtime_ns, entry.mode, entry.content, entry.uploaded,
                       entry.device, updated_at)


def rebased(base: list[BaseEntry], remote: list[RemoteEntry],
            since: float | None = SINCE, deleted: tuple[str, ...] = ()
            ) -> tuple[dict[str, BaseEntry], Rebase]:
    """The base after the re-base, by node id, and the re-base itself."""
    by_id = {e.node_id: e for e in base}
    change = rebase(by_id, {e.node_id: e for e in remote}, since, deleted)
    for node_id in change.forget:
        del by_id[node_id]
    by_id.update((e.node_id, e) for e in change.entries)
    return by_id, change


def plan_after(local: list[LocalEntry], remote: list[RemoteEntry], base: list[BaseEntry],
               since: float | None = SINCE, deleted: tuple[str, ...] = ()
               ) -> tuple[object, ...]:
    new_base, _ = rebased(base, remote, since, deleted)
    return plan({e.path: e for e in local}, {e.node_id: e for e in remote}, new_base).actions


def test_noticing_another_history() -> None:
    assert history_changed("a" * 32, "a" * 32, 10, 12) is None
    assert history_changed(None, "b" * 32, 10, 12) is None          # nothing to compare
    assert history_changed("a" * 32, None, 10, 12) is None          # an appliance before 1.3
    assert "epoch" in (history_changed("a" * 32, "b" * 32, 10, 12) or "")
    assert "older" in (history_changed("a" * 32, "a" * 32, 15, 12) or "")
    assert history_changed(None, None, 15, None) is None


def test_a_file_the_appliance_lost_is_uploaded_again_not_deleted_here() -> None:
    local, base = [lf("new", 5)], [bf("new", "new", 5)]
    # planned against the old base, the appliance's lack looks like a remote delete:
    assert plan(*trees(local, [], base)).actions == (DeleteLocal("new", Stat(1, 1, 0o644, 5)),)
    assert plan_after(local, [], base) == (Upload("new", None, None, 1),)


def test_an_older_version_gets_the_devices_content_as_its_next_version() -> None:
    local = [lf("a", 1, size=3, mtime=3)]
    base = [bf("a", "a", 1, version=3, content="c3", size=3, mtime=3)]
    older = at(rf("a", "a", version=2, content="c2"), OLD)
    # planned against the old base, the older version looks like a remote edit:
    assert plan(*trees(local, [older], base)).actions == (
        Download(nid("a"), "a", Stat(3, 3, 0o644, 1), 1),)
    assert plan_after(local, [older], base) == (Upload("a", nid("a"), 2, 3),)
    _, change = rebased(base, [older])
    assert (change.resend, change.conflicts, change.forget) == (1, 0, ())


def test_a_file_still_uploading_in_the_copy_is_sent_again() -> None:
    local, base = [lf("a", 1)], [bf("a", "a", 1)]
    uploading = at(rf("a", "a", uploaded=False), OLD)
    assert plan(*trees(local, [uploading], base)).empty      # would wait forever
    assert plan_after(local, [uploading], base) == (Upload("a", nid("a"), 1, 1),)


def test_an_edit_made_since_the_recovery_is_a_conflict_settled_as_usual() -> None:
    base = [bf("a", "a", 1, version=3, content="c3")]
    theirs = at(rf("a", "a", version=3, content="c9"), NEW)    # a version number reused
    new_base, change = rebased(base, [theirs])
    assert new_base[nid("a")].version == CONFLICT_VERSION and change.conflicts == 1
    assert plan_after([lf("a", 1)], [theirs], base) == (HashLocal(("a",)),)
    hashed = lf("a", 1, content="c3")
    assert plan_after([hashed], [theirs], base) == (KeepBoth(nid("a"), "a"),)
    same = lf("a", 1, content="c9")                          # identical: merged
    assert all(type(a).__name__ == "Adopt" for a in plan_after([same], [theirs], base))


def test_a_device_behind_the_copy_follows_the_usual_rules() -> None:
    base = [bf("a", "a", 1, version=2, content="c2")]
    newer = at(rf("a", "a", version=5, content="c5"), OLD)   # in the copy already
    new_base, change = rebased(base, [newer])
    assert new_base == {nid("a"): base[0]} and change.entries == ()
    assert plan_after([lf("a", 1)], [newer], base) == (
        Download(nid("a"), "a", Stat(1, 1, 0o644, 1), 1),)


def test_nothing_changes_for_what_the_copy_has_as_synced() -> None:
    base = [bd("d", "d", 7), bf("a", "d/a", 1)]
    remote = [at(rd("d", "d"), OLD), at(rf("a", "d/a", parent=nid("d")), OLD)]
    assert rebased(base, remote)[1] == Rebase((), ())
    assert plan_after([ld("d", 7), lf("d/a", 1)], remote, base) == ()


def test_a_folder_made_in_the_lost_window_is_made_again_with_its_files() -> None:
    base = [bd("d", "d", 7), bf("a", "d/a", 1)]
    local = [ld("d", 7), lf("d/a", 1)]
    assert plan_after(local, [], base) == (MakeRemoteDir("d"), Upload("d/a", None, None, 1))
    # ... with its old id, so that two devices making it at once meet rather than clash
    assert rebased(base, [])[1].lost_folders == (("d", nid("d")),)


def test_what_the_appliance_holds_as_deleted_follows_the_usual_rules() -> None:
    base = [bf("a", "a", 1), bf("b", "b", 2)]
    local = [lf("a", 1), lf("b", 2, size=5)]          # b edited here since
    deleted = (nid("a"), nid("b"))                    # both deleted there on purpose
    new_base, change = rebased(base, [], deleted=deleted)
    assert change == Rebase((), ()) and set(new_base) == set(deleted)
    assert plan_after(local, [], base, deleted=deleted) == (
        Forget(nid("b")), Upload("b", None, None, 5), DeleteLocal("a", Stat(1, 1, 0o644, 1)))


def test_a_folder_renamed_in_the_window_is_renamed_again_with_what_is_in_it() -> None:
    base = [bd("d", "new", 7, version=2), bf("a", "new/a", 1)]
    remote = [at(rd("d", "old", version=1), OLD), at(rf("a", "old/a", parent=nid("d")), OLD)]
    new_base, _ = rebased(base, remote)
    assert new_base[nid("d")].path == "old" and new_base[nid("a")].path == "old/a"
    assert plan_after([ld("new", 7), lf("new/a", 1)], remote, base) == (
        MoveRemote(nid("d"), "new"),)


def test_a_file_moved_into_a_lost_folder_goes_there_again() -> None:
    base = [bd("n", "n", 7), bf("a", "n/a", 1, version=2)]
    remote = [at(rf("a", "a", version=1), OLD)]               # the copy: at the top
    new_base, change = rebased(base, remote)
    assert change.forget == (nid("n"),)
    assert new_base[nid("a")] == BaseEntry(nid("a"), "a", "file", 1, "c1",
                                           Stat(1, 1, 0o644, 1))
    assert plan_after([ld("n", 7), lf("n/a", 1)], remote, base) == (
        MakeRemoteDir("n"), MoveRemote(nid("a"), "n/a"))


def test_a_local_delete_after_the_window_is_still_sent() -> None:
    base = [bf("a", "a", 1, version=3, content="c3")]
    older = at(rf("a", "a", version=2, content="c2"), OLD)
    assert plan_after([], [older], base) == (DeleteRemote(nid("a"), "a", 2),)


def test_without_the_epochs_start_every_node_counts_as_from_the_copy() -> None:
    base = [bf("a", "a", 1, version=3, content="c3")]
    older = at(rf("a", "a", version=2, content="c2"), NEW)
    assert plan_after([lf("a", 1)], [older], base, since=None) == (
        Upload("a", nid("a"), 2, 1),)


def test_an_unsynced_stat_keeps_the_inode() -> None:
    stat = Stat(5, 6, 0o644, 42)
    assert unsynced(stat) == Stat(-1, 6, 0o644, 42) and unsynced(None) is None


# --- property: a re-based folder's plan never deletes a local item -----------------------

NAMES = ("a", "b", "c", "d")


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[LocalEntry], list[RemoteEntry], list[BaseEntry],
                                     float | None]:
    """A folder `dir` and files in it or at the top; each side holds a random subset at
    random versions, contents, places and times."""
    folder_in = {side: draw(st.booleans()) for side in ("local", "remote", "base")}
    local: list[LocalEntry] = [ld("dir", 99)] if folder_in["local"] else []
    remote: list[RemoteEntry] = [at(rd("dir", "dir", draw(st.integers(1, 3))),
                                    draw(st.sampled_from((OLD, NEW))))] \
        if folder_in["remote"] else []
    base: list[BaseEntry] = [bd("dir", "dir", 99, draw(st.integers(1, 3)))] \
        if folder_in["base"] else []
    for inode, name in enumerate(NAMES, start=1):
        def place(side: str, name: str = name) -> str:
            inside = folder_in[side] and draw(st.booleans())
            return f"dir/{name}" if inside else name
        if draw(st.booleans()):
            local.append(lf(place("local"), inode, size=draw(st.integers(1, 3)),
                            content=draw(st.sampled_from((None, "c1", "c2", "c3")))))
        if draw(st.booleans()):
            path = place("remote")
            remote.append(at(rf(name, path, draw(st.integers(1, 4)),
                                draw(st.sampled_from(("c1", "c2", "c3"))),
                                parent=nid("dir") if path.startswith("dir/") else ROOT,
                                uploaded=draw(st.booleans())),
                             draw(st.sampled_from((OLD, NEW)))))
        if draw(st.booleans()):
            base.append(bf(name, place("base"), inode, draw(st.integers(1, 4)),
                           draw(st.sampled_from(("c1", "c2", "c3"))),
                           size=draw(st.integers(1, 3))))
    return local, remote, base, draw(st.sampled_from((SINCE, None)))


@settings(max_examples=400, deadline=None)
@given(worlds())
def test_no_plan_after_a_rebase_deletes_a_local_item(
        world: tuple[list[LocalEntry], list[RemoteEntry], list[BaseEntry], float | None]
) -> None:
    local, remote, base, since = world
    new_base, change = rebased(base, remote, since)
    assert set(new_base) <= {e.node_id for e in remote}     # every entry names a node
    assert all(node_id not in new_base for _, node_id in change.lost_folders)
    actions = plan_after(local, remote, base, since)
    assert not [a for a in actions if isinstance(a, DeleteLocal)], actions
    here = {e.path for e in local} | {e.stat.inode for e in local}   # (paths, inodes)
    for action in actions:
        if isinstance(action, DeleteRemote):     # only what is gone here, by path and inode
            entry = new_base[action.node_id]
            assert action.path not in here
            assert entry.stat is None or entry.stat.inode not in here
    assert not [a for a in actions if isinstance(a, Forget) and a.node_id in change.forget]
