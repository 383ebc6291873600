"""Re-basing a synced folder after the appliance lost history (agent/sync/rollback.py),
one scenario each, then planned (pure): what the device holds and the appliance lacks is
sent again, never deleted here; an edit made since the recovery is a conflict only when
the copy lacked the version synced here; and a property: no plan after a re-base deletes
a local item, and a file whose synced version the copy had is never made a conflict."""

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
from agent.sync.rollback import (
    CONFLICT_VERSION,
    Rebase,
    copy_versions,
    fresh_edits,
    history_changed,
    rebase,
    unsynced,
)

SINCE = 1000.0       # when the new epoch began
OLD, NEW = 500.0, 2000.0


def at(entry: RemoteEntry, updated_at: float) -> RemoteEntry:
    """ENTRY as last changed at UPDATED_AT (the appliance's clock)."""
    return RemoteEntry(entry.node_id, entry.parent_id, entry.path, entry.kind, entry.version,
                       entry.size, entry.mtime_ns, entry.mode, entry.content, entry.uploaded,
                       entry.device, updated_at)


def rebased(base: list[BaseEntry], remote: list[RemoteEntry],
            since: float | None = SINCE, deleted: tuple[str, ...] = (),
            in_copy: dict[str, int] | None = None) -> tuple[dict[str, BaseEntry], Rebase]:
    """The base after the re-base, by node id, and the re-base itself."""
    by_id = {e.node_id: e for e in base}
    change = rebase(by_id, {e.node_id: e for e in remote}, since, deleted, in_copy)
    for node_id in change.forget:
        del by_id[node_id]
    by_id.update((e.node_id, e) for e in change.entries)
    return by_id, change


def plan_after(local: list[LocalEntry], remote: list[RemoteEntry], base: list[BaseEntry],
               since: float | None = SINCE, deleted: tuple[str, ...] = (),
               in_copy: dict[str, int] | None = None) -> tuple[object, ...]:
    new_base, _ = rebased(base, remote, since, deleted, in_copy)
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


def test_the_copys_version_is_the_one_before_the_first_change_since() -> None:
    since = [("a", 2, "updated"), ("a", 3, "moved"),          # a: the copy had 1
             ("b", 4, "uploaded"), ("b", 5, "updated"),       # b: 4, completed since
             ("c", 7, "shared"),                              # c: 7 (no new version)
             ("d", 1, "created"), ("d", 2, "updated"),        # d: new since, none
             ("e", 9, "a kind unknown here")]                 # e: 8, at most
    assert copy_versions(since) == {"a": 1, "b": 4, "c": 7, "e": 8}
    assert copy_versions(reversed(since)) == copy_versions(since)    # any order
    assert copy_versions([]) == {}


def test_only_files_edited_since_at_another_content_need_the_copys_version() -> None:
    base = [bf("a", "a", 1), bf("b", "b", 2), bf("c", "c", 3), bf("d", "d", 4),
            bd("e", "e", 5)]
    remote = [at(rf("a", "a", 2, "c2"), NEW),     # edited since: which version is it on?
              at(rf("b", "b", 2, "c1"), NEW),     # since, at the same content: merged
              at(rf("c", "c", 2, "c2"), OLD),     # from the copy
              at(rd("e", "e", 2), NEW)]           # a folder: the usual rules anyway
    assert fresh_edits({e.node_id: e for e in base}, {e.node_id: e for e in remote},
                       SINCE) == {nid("a")}
    assert fresh_edits({e.node_id: e for e in base}, {e.node_id: e for e in remote},
                       None) == set()


def test_an_edit_since_the_recovery_on_the_version_synced_here_is_downloaded() -> None:
    """(a) The copy had the version this device synced (B 1 <= c 1): another device's
    edit since is its normal successor — downloaded, not a conflicted copy."""
    base = [bf("a", "a", 1, version=1, content="c1")]
    theirs = at(rf("a", "a", version=2, content="c2"), NEW)
    in_copy = copy_versions([(nid("a"), 2, "updated")])
    new_base, change = rebased(base, [theirs], in_copy=in_copy)
    assert new_base == {nid("a"): base[0]} and change.entries == ()
    assert (change.conflicts, change.successors) == (0, 1)
    assert plan_after([lf("a", 1)], [theirs], base, in_copy=in_copy) == (
        Download(nid("a"), "a", Stat(1, 1, 0o644, 1), 1),)
    # ... and edited here too: the usual rules, a true conflict (hashed, then both kept)
    assert plan_after([lf("a", 1, size=7)], [theirs], base, in_copy=in_copy) == (
        HashLocal(("a",)),)
    # without the copy's version (an appliance before API 1.4): the cautious conflict
    assert rebased(base, [theirs])[0][nid("a")].version == CONFLICT_VERSION


def test_an_edit_since_on_an_older_version_than_the_one_synced_here_is_a_conflict() -> None:
    """(b) This device synced version 2 in the lost window; the copy had 1, and another
    device edited that since (making a new 2): the appliance lost this device's
    content and the other edit is concurrent with it — both are kept."""
    base = [bf("a", "a", 1, version=2, content="mine")]
    theirs = at(rf("a", "a", version=2, content="theirs"), NEW)
    in_copy = copy_versions([(nid("a"), 2, "updated")])
    new_base, change = rebased(base, [theirs], in_copy=in_copy)
    assert new_base[nid("a")].version == CONFLICT_VERSION
    assert (change.conflicts, change.successors) == (1, 0)
    assert plan_after([lf("a", 1, content="mine")], [theirs], base, in_copy=in_copy) == (
        KeepBoth(nid("a"), "a"),)


def test_a_node_made_again_since_the_recovery_has_no_copy_version() -> None:
    base = [bf("a", "a", 1, version=1, content="c1")]
    theirs = at(rf("a", "a", version=2, content="c2"), NEW)
    in_copy = copy_versions([(nid("a"), 1, "created"), (nid("a"), 2, "updated")])
    assert in_copy == {}
    new_base, change = rebased(base, [theirs], in_copy=in_copy)
    assert new_base[nid("a")].version == CONFLICT_VERSION and change.conflicts == 1


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


World = tuple[list[LocalEntry], list[RemoteEntry], list[BaseEntry], float | None,
              dict[str, int]]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    """A folder `dir` and files in it or at the top; each side holds a random subset at
    random versions, contents, places and times, and the copy had some version below the
    appliance's of some of the nodes."""
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
    in_copy = {e.node_id: draw(st.integers(0, e.version - 1)) for e in remote
               if e.updated_at == NEW and draw(st.booleans())}
    return local, remote, base, draw(st.sampled_from((SINCE, None))), in_copy


@settings(max_examples=400, deadline=None)
@given(worlds())
def test_no_plan_after_a_rebase_deletes_a_local_item(world: World) -> None:
    local, remote, base, since, in_copy = world
    new_base, change = rebased(base, remote, since, in_copy=in_copy)
    assert set(new_base) <= {e.node_id for e in remote}     # every entry names a node
    assert all(node_id not in new_base for _, node_id in change.lost_folders)
    for entry in base:             # a version the copy had is never made a conflict
        if entry.node_id in new_base and entry.version <= in_copy.get(entry.node_id, -1):
            assert new_base[entry.node_id].version != CONFLICT_VERSION
    actions = plan_after(local, remote, base, since, in_copy=in_copy)
    assert not [a for a in actions if isinstance(a, DeleteLocal)], actions
    here = {e.path for e in local} | {e.stat.inode for e in local}   # (paths, inodes)
    for action in actions:
        if isinstance(action, DeleteRemote):     # only what is gone here, by path and inode
            entry = new_base[action.node_id]
            assert action.path not in here
            assert entry.stat is None or entry.stat.inode not in here
    assert not [a for a in actions if isinstance(a, Forget) and a.node_id in change.forget]
