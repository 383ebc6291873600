"""The sync planner's rules, one scenario each (pure: three trees in, actions out)."""

from __future__ import annotations

from dataclasses import replace

from agent.sync.model import (
    Adopt,
    BaseEntry,
    DeleteLocal,
    DeleteRemote,
    Download,
    Forget,
    HashLocal,
    KeepBoth,
    LocalEntry,
    MakeLocalDir,
    MakeRemoteDir,
    MoveLocal,
    MoveRemote,
    RemoteEntry,
    RenameLocalAside,
    Stat,
    Upload,
    content_of_refs,
    link_content_id,
)
from agent.sync.planner import STREAM_FROM_BYTES, plan

ROOT = "r" * 32


def nid(name: str) -> str:
    return (name.encode().hex() + "0" * 32)[:32]


def lf(path: str, inode: int, size: int = 1, mtime: int = 1, content: str | None = None,
       stable: bool = True) -> LocalEntry:
    return LocalEntry(path, "file", Stat(size, mtime, 0o644, inode), content, stable)


def ld(path: str, inode: int) -> LocalEntry:
    return LocalEntry(path, "dir", Stat(0, 0, 0o755, inode))


def rf(name: str, path: str, version: int = 1, content: str = "c1", parent: str = ROOT,
       uploaded: bool = True) -> RemoteEntry:
    return RemoteEntry(nid(name), parent, path, "file", version, 1, 1, 0o644, content,
                       uploaded)


def rd(name: str, path: str, version: int = 1, parent: str = ROOT) -> RemoteEntry:
    return RemoteEntry(nid(name), parent, path, "dir", version, 0, 0, 0o755, "")


def bf(name: str, path: str, inode: int, version: int = 1, content: str = "c1",
       size: int = 1, mtime: int = 1) -> BaseEntry:
    return BaseEntry(nid(name), path, "file", version, content,
                     Stat(size, mtime, 0o644, inode))


def bd(name: str, path: str, inode: int, version: int = 1) -> BaseEntry:
    return BaseEntry(nid(name), path, "dir", version, "", Stat(0, 0, 0o755, inode))


def ll(path: str, inode: int, target: str = "t", mtime: int = 1) -> LocalEntry:
    """A symbolic link here: its own stat (lstat), its content id made from its target."""
    return LocalEntry(path, "file", Stat(len(target), mtime, 0o777, inode),
                      link_content_id(target))


def rl(name: str, path: str, target: str = "t", version: int = 1) -> RemoteEntry:
    """A link node: a file node without content (size 0) whose metadata holds the target."""
    return RemoteEntry(nid(name), ROOT, path, "file", version, 0, 1, 0o777,
                       link_content_id(target))


def bl(name: str, path: str, inode: int, target: str = "t", version: int = 1) -> BaseEntry:
    return BaseEntry(nid(name), path, "file", version, link_content_id(target),
                     Stat(len(target), 1, 0o777, inode))


def trees(local: list[LocalEntry], remote: list[RemoteEntry], base: list[BaseEntry]
          ) -> tuple[dict[str, LocalEntry], dict[str, RemoteEntry], dict[str, BaseEntry]]:
    return ({e.path: e for e in local}, {e.node_id: e for e in remote},
            {e.node_id: e for e in base})


def test_in_sync_plans_nothing() -> None:
    result = plan(*trees([lf("a", 1)], [rf("a", "a")], [bf("a", "a", 1)]))
    assert result.empty


def test_one_sided_changes_flow_to_the_other_side() -> None:
    assert plan(*trees([lf("new", 5)], [], [])).actions == (Upload("new", None, None, 1),)
    assert plan(*trees([], [rf("n", "n")], [])).actions == (Download(nid("n"), "n", None, 1),)
    edited = lf("a", 1, size=2)
    assert plan(*trees([edited], [rf("a", "a")], [bf("a", "a", 1)])).actions == (
        Upload("a", nid("a"), 1, 2),)
    assert plan(*trees([lf("a", 1)], [rf("a", "a", version=2, content="c2")],
                       [bf("a", "a", 1)])).actions == (
        Download(nid("a"), "a", Stat(1, 1, 0o644, 1), 1),)


def test_deletes_flow_and_only_unchanged_files_are_deleted_locally() -> None:
    assert plan(*trees([], [rf("a", "a")], [bf("a", "a", 1)])).actions == (
        DeleteRemote(nid("a"), "a", 1),)
    assert plan(*trees([lf("a", 1)], [], [bf("a", "a", 1)])).actions == (
        DeleteLocal("a", Stat(1, 1, 0o644, 1)),)
    assert plan(*trees([], [], [bf("a", "a", 1)])).actions == (Forget(nid("a")),)


def test_edit_beats_delete_both_ways() -> None:
    # edited here, deleted there: uploaded again as a new node
    result = plan(*trees([lf("a", 1, size=9)], [], [bf("a", "a", 1)]))
    assert result.actions == (Forget(nid("a")), Upload("a", None, None, 9))
    # deleted here, edited there: downloaded again
    result = plan(*trees([], [rf("a", "a", version=2, content="c2")], [bf("a", "a", 1)]))
    assert result.actions == (Forget(nid("a")), Download(nid("a"), "a", None, 1))


def test_both_edited_needs_hashes_then_keeps_both_or_merges() -> None:
    local = lf("a", 1, size=3)
    remote = rf("a", "a", version=2, content="theirs")
    assert plan(*trees([local], [remote], [bf("a", "a", 1)])).actions == (HashLocal(("a",)),)
    mine = lf("a", 1, size=3, content="mine")
    assert plan(*trees([mine], [remote], [bf("a", "a", 1)])).actions == (
        KeepBoth(nid("a"), "a"),)
    same = lf("a", 1, size=3, content="theirs")
    assert plan(*trees([same], [remote], [bf("a", "a", 1)])).actions == (
        Adopt(nid("a"), "a", same.stat, 2, "theirs"),)


def test_unsynced_items_with_one_name_merge_or_step_aside() -> None:
    remote = rf("x", "x", content="theirs")
    assert plan(*trees([lf("x", 4)], [remote], [])).actions == (HashLocal(("x",)),)
    identical = lf("x", 4, content="theirs")
    assert plan(*trees([identical], [remote], [])).actions == (
        Adopt(nid("x"), "x", identical.stat, 1, "theirs"),)
    assert plan(*trees([lf("x", 4, content="mine")], [remote], [])).actions == (
        RenameLocalAside("x"),)
    # a folder here, a file there
    assert plan(*trees([ld("x", 4)], [remote], [])).actions == (RenameLocalAside("x"),)


def test_moves_are_moves_and_a_folder_takes_its_content_along() -> None:
    base = [bd("d", "d", 10), bf("f", "d/f", 11)]
    moved_here = [ld("e", 10), lf("e/f", 11)]
    remote = [rd("d", "d"), rf("f", "d/f", parent=nid("d"))]
    assert plan(*trees(moved_here, remote, base)).actions == (MoveRemote(nid("d"), "e"),)
    moved_there = [rd("d", "e"), rf("f", "e/f", parent=nid("d"))]
    assert plan(*trees([ld("d", 10), lf("d/f", 11)], moved_there, base)).actions == (
        MoveLocal(nid("d"), "d", "e"),)


def test_move_into_a_new_local_folder_creates_it_first() -> None:
    local = [ld("new", 20), lf("new/f", 11)]
    result = plan(*trees(local, [rf("f", "f")], [bf("f", "f", 11)]))
    assert result.actions == (MakeRemoteDir("new"), MoveRemote(nid("f"), "new/f"))


def test_both_moved_the_remote_side_wins() -> None:
    result = plan(*trees([lf("mine", 1)], [rf("a", "theirs")], [bf("a", "a", 1)]))
    assert result.actions == (MoveLocal(nid("a"), "mine", "theirs"),)


def test_both_moved_to_one_name_the_base_follows_and_an_edit_there_comes_next() -> None:
    """Seed 337563: moved here and there to the same name, and edited there. Adopting the
    appliance's version recorded its new content against the old bytes here: the edit was
    never downloaded. The base follows the move as it was (version, content, stat), so
    the next plan sees what else changed."""
    synced = bf("a", "a", 1)
    here = lf("b", 1)                                     # moved: same inode, same stat
    there = rf("a", "b", version=3, content="c2")         # moved and edited there
    assert plan(*trees([here], [there], [synced])).actions == (
        Adopt(nid("a"), "b", synced.stat, 1, "c1"),)
    followed = bf("a", "b", 1)
    assert plan(*trees([here], [there], [followed])).actions == (
        Download(nid("a"), "b", here.stat, 1),)
    # edited here as well: compared (hashes, then both kept), never taken as synced
    edited = lf("b", 1, size=7)
    assert plan(*trees([edited], [there], [synced])).actions == (
        Adopt(nid("a"), "b", synced.stat, 1, "c1"),)
    assert plan(*trees([edited], [there], [followed])).actions == (HashLocal(("b",)),)


def test_remote_deleted_folder_keeps_what_changed_here() -> None:
    base = [bd("d", "d", 10), bf("old", "d/old", 11)]
    local = [ld("d", 10), lf("d/old", 11), lf("d/new", 12)]
    result = plan(*trees(local, [], base))
    assert result.actions == (Forget(nid("d")), MakeRemoteDir("d"),
                              Upload("d/new", None, None, 1),
                              DeleteLocal("d/old", Stat(1, 1, 0o644, 11)))
    # nothing changed in it here: the folder goes, with what is in it
    result = plan(*trees([ld("d", 10), lf("d/old", 11)], [], base))
    assert result.actions == (DeleteLocal("d", None),)


def test_local_deleted_folder_keeps_what_arrived_there() -> None:
    base = [bd("d", "d", 10), bf("old", "d/old", 11)]
    remote = [rd("d", "d"), rf("old", "d/old", parent=nid("d")),
              rf("new", "d/new", parent=nid("d"))]
    result = plan(*trees([], remote, base))
    assert result.actions == (MakeLocalDir(nid("d"), "d"),
                              Download(nid("new"), "d/new", None, 1),
                              DeleteRemote(nid("old"), "d/old", 1))
    remote = [rd("d", "d"), rf("old", "d/old", parent=nid("d"))]
    result = plan(*trees([], remote, base))
    assert result.actions == (DeleteRemote(nid("d"), "d", 1, 1, "dir"),)
    assert result.remote_deletions == 1


def test_identical_content_whose_upload_never_finished_is_sent_again() -> None:
    """Killed between the node and its blocks (the crash campaign): no merge with it."""
    unfinished = rf("x", "x", content="mine", uploaded=False)
    here = lf("x", 4, content="mine")
    assert plan(*trees([here], [unfinished], [])).actions == (Upload("x", nid("x"), 1, 1),)
    edited = lf("x", 4, mtime=2, content="mine")
    version_2 = replace(unfinished, version=2)
    assert plan(*trees([edited], [version_2], [bf("x", "x", 4)])).actions == (
        Upload("x", nid("x"), 2, 1),)

def test_files_being_written_or_uploaded_wait() -> None:
    result = plan(*trees([lf("a", 1, stable=False)], [], []))
    assert result.empty and result.waiting == ("a",)
    result = plan(*trees([], [rf("b", "b", uploaded=False)], []))
    assert result.empty and result.waiting == ("b",)


def test_a_big_file_still_uploading_is_downloaded_as_it_arrives_unless_both_changed() -> None:
    big = replace(rf("b", "b", uploaded=False), size=STREAM_FROM_BYTES)
    result = plan(*trees([], [big], []))
    assert result.actions == (Download(nid("b"), "b", None, STREAM_FROM_BYTES),)
    base = [bf("b", "b", 1, content="c0")]
    changed = replace(big, version=2, content="c2")
    result = plan(*trees([lf("b", 1)], [changed], base))      # only the remote changed
    assert [type(a) for a in result.actions] == [Download]
    edited_here = lf("b", 1, mtime=2, content="c3")           # both changed: wait for it
    result = plan(*trees([edited_here], [changed], base))
    assert result.empty and result.waiting == ("b",)


def test_a_name_clash_on_the_appliance_is_renamed() -> None:
    clash = RemoteEntry(nid("b"), ROOT, "x (conflicted copy)", "file", 1, 1, 1, 0o644, "c",
                        name_clash=True)
    result = plan(*trees([], [rf("a", "x"), clash], []))
    assert result.actions == (MoveRemote(nid("b"), "x (conflicted copy)"),)


def test_remote_name_reused_by_another_node_replaces_an_unchanged_local_file() -> None:
    result = plan(*trees([lf("a", 1)], [rf("other", "a", content="c9")], [bf("a", "a", 1)]))
    assert result.actions == (Forget(nid("a")),
                              Download(nid("other"), "a", Stat(1, 1, 0o644, 1), 1))


def test_an_identical_file_under_a_taken_name_is_deleted_not_copied() -> None:
    twin = RemoteEntry(nid("b"), ROOT, "x (conflicted copy)", "file", 1, 1, 1, 0o644, "c1",
                       name_clash=True, clash_duplicate=True)
    result = plan(*trees([lf("x", 7)], [rf("a", "x"), twin], [bf("b", "x", 7)]))
    assert result.actions == (DeleteRemote(nid("b"), "x (conflicted copy)", 1),)


def test_a_clash_renames_the_local_file_too() -> None:
    clash = RemoteEntry(nid("b"), ROOT, "x (copy)", "file", 1, 1, 1, 0o644, "c2",
                        name_clash=True)
    result = plan(*trees([lf("x", 7)], [rf("a", "x"), clash], [bf("b", "x", 7)]))
    assert result.actions == (MoveLocal(nid("b"), "x", "x (copy)"),
                              MoveRemote(nid("b"), "x (copy)"))


def test_moves_into_a_folder_deleted_there_recreate_it_once() -> None:
    base = [bd("d1", "d1", 10), bf("f", "f", 11), bf("g", "g", 12)]
    local = [ld("d1", 10), lf("d1/f", 11), lf("d1/g", 12)]
    remote = [rf("f", "f"), rf("g", "g")]              # d1 was deleted on the appliance
    result = plan(*trees(local, remote, base))
    assert result.actions == (Forget(nid("d1")), MakeRemoteDir("d1"),
                              MoveRemote(nid("f"), "d1/f"), MoveRemote(nid("g"), "d1/g"))


# --- symbolic links: files whose content is their target ---------------------------------

def test_a_link_content_id_is_its_target_and_never_a_file_content() -> None:
    assert link_content_id("../a") == link_content_id("../a")
    assert link_content_id("../a") != link_content_id("../b")
    # the appliance sees a link as an empty file: the ids must still differ
    assert link_content_id("../a") != content_of_refs(())
    assert not set(link_content_id("x")) <= set("0123456789abcdef")   # a file's id is hex


def test_links_in_sync_plan_nothing_and_one_sided_changes_flow() -> None:
    assert plan(*trees([ll("l", 1)], [rl("l", "l")], [bl("l", "l", 1)])).empty
    assert plan(*trees([ll("new", 5, "/abs")], [], [])).actions == (
        Upload("new", None, None, 4),)
    assert plan(*trees([], [rl("n", "n")], [])).actions == (Download(nid("n"), "n", None, 0),)
    # a new target here is a new link (ln -sfn replaces it: another inode)
    retargeted = ll("l", 2, "other")
    assert plan(*trees([retargeted], [rl("l", "l")], [bl("l", "l", 1)])).actions == (
        Upload("l", nid("l"), 1, 5),)
    assert plan(*trees([ll("l", 1)], [rl("l", "l", "other", version=2)],
                       [bl("l", "l", 1)])).actions == (
        Download(nid("l"), "l", Stat(1, 1, 0o777, 1), 0),)


def test_a_link_renamed_or_deleted_travels_like_a_file() -> None:
    assert plan(*trees([ll("moved", 1)], [rl("l", "l")], [bl("l", "l", 1)])).actions == (
        MoveRemote(nid("l"), "moved"),)
    assert plan(*trees([ll("l", 1)], [rl("l", "there")], [bl("l", "l", 1)])).actions == (
        MoveLocal(nid("l"), "l", "there"),)
    assert plan(*trees([], [rl("l", "l")], [bl("l", "l", 1)])).actions == (
        DeleteRemote(nid("l"), "l", 1),)
    assert plan(*trees([ll("l", 1)], [], [bl("l", "l", 1)])).actions == (
        DeleteLocal("l", Stat(1, 1, 0o777, 1)),)


def test_links_on_both_sides_merge_by_target_or_keep_both() -> None:
    # new on both sides: the same target merges (no hashing: a link's id is known at once)
    same = ll("l", 4)
    assert plan(*trees([same], [rl("l", "l")], [])).actions == (
        Adopt(nid("l"), "l", same.stat, 1, link_content_id("t")),)
    assert plan(*trees([ll("l", 4, "mine")], [rl("l", "l")], [])).actions == (
        RenameLocalAside("l"),)
    # a link here, an empty file there (what the appliance cannot tell apart), or the
    # other way round: set aside, never merged
    assert plan(*trees([ll("x", 4)], [rf("x", "x", content=content_of_refs(()))],
                       [])).actions == (RenameLocalAside("x"),)
    assert plan(*trees([lf("x", 4, content=content_of_refs(()))], [rl("x", "x")],
                       [])).actions == (RenameLocalAside("x"),)
    # both changed the target: the same one is recorded, different ones keep both
    both = ll("l", 2, "new")
    assert plan(*trees([both], [rl("l", "l", "new", version=2)],
                       [bl("l", "l", 1)])).actions == (
        Adopt(nid("l"), "l", both.stat, 2, link_content_id("new")),)
    assert plan(*trees([ll("l", 2, "mine")], [rl("l", "l", "theirs", version=2)],
                       [bl("l", "l", 1)])).actions == (KeepBoth(nid("l"), "l"),)


def test_a_file_replaced_by_a_link_is_a_new_version_of_the_node() -> None:
    assert plan(*trees([ll("a", 9, "target")], [rf("a", "a")], [bf("a", "a", 1)])).actions \
        == (Upload("a", nid("a"), 1, 6),)
