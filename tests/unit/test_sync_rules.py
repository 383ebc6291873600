"""The sync rules outside the planner (pure), and the bugs the randomized sync test found,
each replayed here on plain data beside its end-to-end test in
tests/integration/test_sync_random.py."""

from __future__ import annotations

from test_sync_planner import ROOT, bd, bf, ld, lf, nid, rd, rf, trees

from agent.sync import rules
from agent.sync.model import (
    DeleteRemote,
    Download,
    Forget,
    HashLocal,
    KeepBoth,
    MakeLocalDir,
    MakeRemoteDir,
    MoveLocal,
    MoveRemote,
    RemoteEntry,
    Stat,
    Upload,
)
from agent.sync.planner import Plan, plan

POLICY = rules.MassDelete(allowed=False, share=0.5, minimum=3)


# --- safety ----------------------------------------------------------------------------------

def test_an_emptied_folder_with_synced_items_pauses_and_looks_again_soon() -> None:
    base = {e.node_id: e for e in [bf("a", "a", 1)]}
    stop = rules.safety_stop("/d", 0, base, Plan(()), POLICY)
    assert stop is not None and "is empty but 1 items were synced" in stop.message
    assert stop.recheck_s == rules.EMPTY_RECHECK_S
    assert rules.safety_stop("/d", 0, {}, Plan(()), POLICY) is None      # never synced
    assert rules.safety_stop("/d", 0, base, Plan(()),
                             rules.MassDelete(allowed=True)) is None


def test_mass_deletion_needs_both_the_share_and_the_minimum() -> None:
    base = {nid(f"f{i}"): bf(f"f{i}", f"f{i}", i) for i in range(6)}
    deleting = [DeleteRemote(nid(f"f{i}"), f"f{i}", 1) for i in range(4)]
    stop = rules.safety_stop("/d", 2, base, Plan(tuple(deleting), (), 4), POLICY)
    assert stop is not None and "4 of 6 files were deleted" in stop.message
    assert stop.recheck_s is None            # only a restart with the flag resumes
    assert rules.safety_stop("/d", 3, base, Plan(tuple(deleting[:3]), (), 3), POLICY) is None
    few = {nid(f"f{i}"): bf(f"f{i}", f"f{i}", i) for i in range(2)}
    two = Plan(tuple(deleting[:2]), (), 2)
    assert rules.safety_stop("/d", 1, few, two, POLICY) is None   # under the minimum


def test_a_full_disk_holds_back_what_writes_here_and_nothing_else() -> None:
    actions = (Upload("u", None, None, 1), Download(nid("d"), "d", None, 1),
               KeepBoth(nid("k"), "k"), MakeLocalDir(nid("m"), "m"),
               DeleteRemote(nid("x"), "x", 1))
    held = rules.without_downloads(Plan(actions, ("w",), 1))
    assert held.actions == (Upload("u", None, None, 1), DeleteRemote(nid("x"), "x", 1))
    assert held.waiting == ("w", "d", "k", "m")
    assert held.remote_deletions == 1


def test_nothing_new_only_when_no_tree_changed_since_the_last_empty_plan() -> None:
    quiet = rules.Quiet(3, 4, 0)
    assert rules.nothing_new(quiet, rules.Quiet(3, 4, 0), False, False, False)
    assert not rules.nothing_new(None, quiet, False, False, False)     # never settled
    assert not rules.nothing_new(quiet, rules.Quiet(4, 4, 0), False, False, False)
    assert not rules.nothing_new(quiet, rules.Quiet(3, 5, 0), False, False, False)
    assert not rules.nothing_new(quiet, rules.Quiet(3, 4, 1), False, False, False)
    assert not rules.nothing_new(quiet, quiet, True, False, False)     # a local change
    assert not rules.nothing_new(quiet, quiet, False, True, False)     # downloads held
    assert not rules.nothing_new(quiet, quiet, False, False, True)     # Shared with me


# --- preconditions ---------------------------------------------------------------------------

def test_a_local_folder_delete_removes_only_unchanged_files_and_stale_parts() -> None:
    synced = {"d/a": bf("a", "d/a", 1), "d/b": bf("b", "d/b", 2)}
    found = {"d/a": Stat(1, 1, 0o644, 1), "d/b": Stat(9, 9, 0o644, 2),
             "d/new": Stat(1, 1, 0o644, 3), "d/x.cairn-part": Stat(1, 1, 0o644, 4),
             "d/gone": None}
    assert rules.removable(found, synced, ".cairn-part") == {"d/a", "d/x.cairn-part"}


def test_a_new_folder_sets_aside_anything_but_a_folder() -> None:
    assert rules.folder_sets_aside("file")
    assert not rules.folder_sets_aside("dir")
    assert not rules.folder_sets_aside(None)


def test_base_versions_after_moves() -> None:
    entry = bf("a", "a", 1, version=3, content="c1")
    moved = rules.moved_base(entry, "b", 5, "c1")
    assert (moved.path, moved.version) == ("b", 5)
    # the content changed there too: the download still has to come
    assert rules.moved_base(entry, "b", 5, "c2").version == 3
    assert rules.moved_base(bd("d", "d", 1, version=3), "e", 7, "").version == 7
    assert rules.repathed_base(entry, "b", 3, 4).version == 4
    assert rules.repathed_base(entry, "b", 2, 4).version == 3   # something else was new


# --- the randomized test's bugs, on plain data -----------------------------------------------

def test_seed_413_an_upload_stopped_by_a_change_is_the_base_of_the_next_one() -> None:
    """93b01fb: the version a stopped upload created (here still uploading) is recorded
    as the base, so the next plan uploads again over it — no waiting for a version that
    never completes, no conflicted copy of this device's own upload."""
    began = rules.began_upload(nid("big"), "big.bin", 4, "half-written")
    local = lf("big.bin", 7, size=32)
    remote = rf("big", "big.bin", version=4, content="half-written", uploaded=False)
    result = plan(*trees([local], [remote], [began]))
    assert result.actions == (Upload("big.bin", nid("big"), 4, 32),)
    # without it, the device waits for its own unfinished version for ever
    stale = bf("big", "big.bin", 7, version=3, content="old")
    assert plan(*trees([local], [remote], [stale])).actions == (HashLocal(("big.bin",)),)


def test_seed_1305_a_folder_moved_into_the_name_it_got_elsewhere_steps_aside() -> None:
    """93b01fb: here d1/ became d2/; there, d1/ went into a new d2/. The remote side
    wins: d2/ -> d2/d1/, a folder into its own old place, which must step aside first."""
    base = [bd("d1", "d1", 10), bf("a", "d1/a.txt", 11)]
    local = [ld("d2", 10), lf("d2/a.txt", 11)]
    remote = [rd("new-d2", "d2"), rd("d1", "d2/d1", parent=nid("new-d2")),
              rf("a", "d2/d1/a.txt", parent=nid("d1"))]
    result = plan(*trees(local, remote, base))
    assert result.actions == (MoveLocal(nid("d1"), "d2", "d2/d1"),)
    steps = rules.local_move_steps("d2", "d2/d1", "dir")
    assert steps.step_aside_first and steps.set_destination_aside
    assert not rules.local_move_steps("a", "b/a", None).step_aside_first


def test_seed_1510_an_edit_under_a_folder_deleted_here_keeps_the_folder() -> None:
    """93b01fb: the folder delete is planned; an edit inside it arrives before it runs.
    The executor pulls the feed and this rule stops the delete."""
    base = {e.node_id: e for e in [bd("d", "d", 10), bf("c", "d/c.txt", 11)]}
    remote = {e.node_id: e for e in [rd("d", "d"),
                                     rf("c", "d/c.txt", version=2, parent=nid("d"))]}
    assert rules.changed_under("d", remote, base) == "d/c.txt"
    remote[nid("c")] = rf("c", "d/c.txt", parent=nid("d"))
    assert rules.changed_under("d", remote, base) is None
    remote[nid("n")] = rf("n", "d/new.txt", parent=nid("d"))           # new there
    assert rules.changed_under("d", remote, base) == "d/new.txt"
    assert rules.changed_under("e", remote, base) is None


def test_seed_931_a_move_into_a_folder_deleted_there_recreates_it_first() -> None:
    """b4107f3: d2/ moved into d1/ here while d1/ was deleted there; the move needs d1/
    on the appliance again (its stale base entry forgotten), else it fails every pass."""
    base = [bd("d1", "d1", 10), bf("a1", "d1/a.txt", 11), bd("d2", "d2", 20),
            bf("a2", "d2/a.txt", 21)]
    local = [ld("d1", 10), lf("d1/a.txt", 11), ld("d1/d2", 20), lf("d1/d2/a.txt", 21),
             lf("c.txt", 30)]
    remote = [rd("d2", "d2"), rf("a2", "d2/a.txt", parent=nid("d2"))]
    result = plan(*trees(local, remote, base))
    assert result.actions == (Forget(nid("d1")), MakeRemoteDir("d1"),
                              MoveRemote(nid("d2"), "d1/d2"))


def test_seed_1_a_move_onto_a_new_file_in_a_folder_new_on_both_sides() -> None:
    """8c1b181: a.txt -> d2/a.txt there; here d2/a.txt is new and d2/ has no base entry
    yet. The file in the way is set aside, and its copy's name is checked against the
    remote folder d2/ maps to — found in the remote view, not the base."""
    base = [bf("a", "a.txt", 1)]
    local = [lf("a.txt", 1), ld("d2", 20), lf("d2/a.txt", 21, content="mine")]
    remote = [rd("d2", "d2"), rf("a", "d2/a.txt", parent=nid("d2"))]
    assert plan(*trees(local, remote, base)).actions == (
        MoveLocal(nid("a"), "a.txt", "d2/a.txt"),)
    assert rules.local_move_steps("a.txt", "d2/a.txt", "file").set_destination_aside
    views = {e.node_id: e for e in remote}.values()
    assert rules.remote_folder_at("d2", ROOT, None, views) == nid("d2")
    assert rules.remote_folder_at("", ROOT, None, views) == ROOT
    assert rules.remote_folder_at("d9", ROOT, None, views) is None
    synced = bd("d2", "d2", 20)
    assert rules.remote_folder_at("d2", ROOT, synced, []) == nid("d2")


def test_seed_2315_deleting_a_duplicate_file_is_not_checked_like_a_folder() -> None:
    """706c41d: the twin of a file (same name and content, made on two devices at once)
    is deleted as a file: the folder check looked for its base entry, found none, and
    skipped it on every pass, holding up the move phase."""
    twin = RemoteEntry(nid("b"), ROOT, "x (conflicted copy)", "file", 1, 1, 1, 0o644, "c1",
                       name_clash=True, clash_duplicate=True)
    result = plan(*trees([lf("x", 7)], [rf("a", "x"), twin], [bf("b", "x", 7)]))
    assert result.actions == (DeleteRemote(nid("b"), "x (conflicted copy)", 1),)
    assert all(a.kind == "file" for a in result.actions if isinstance(a, DeleteRemote))
    folder = plan(*trees([], [rd("d", "d")], [bd("d", "d", 10)]))
    assert folder.actions == (DeleteRemote(nid("d"), "d", 1, 0, "dir"),)
