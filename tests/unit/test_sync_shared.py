"""The one-way plan for `Shared with me` (agent/sync/shared.py's plan_shared), on plain
data."""

from __future__ import annotations

from agent.sync.model import Stat
from agent.sync.shared_plan import Shared, SharedPlan, Written, plan_shared

TOP = "Shared with me/bob"


def st(inode: int, size: int = 1) -> Stat:
    return Stat(size, 1, 0o644, inode)


def test_in_line_plans_nothing() -> None:
    remote = {f"{TOP}/a.txt": Shared("n1", 2, False), TOP: Shared("d", 1, True)}
    written = {f"{TOP}/a.txt": Written("n1", 2, st(1))}
    assert plan_shared(remote, written, {f"{TOP}/a.txt": st(1)}) == SharedPlan(
        folders=(TOP,))


def test_new_and_updated_shares_are_downloaded_over_what_was_written() -> None:
    remote = {f"{TOP}/a.txt": Shared("n1", 3, False), f"{TOP}/new.txt": Shared("n2", 1, False)}
    written = {f"{TOP}/a.txt": Written("n1", 2, st(1))}
    result = plan_shared(remote, written, {f"{TOP}/a.txt": st(1)})
    assert result.downloads == ((f"{TOP}/a.txt", st(1)), (f"{TOP}/new.txt", None))
    assert not result.move_out and not result.remove
    # a written file deleted here comes back
    assert plan_shared(remote, written, {}).downloads[0] == (f"{TOP}/a.txt", None)


def test_a_change_here_is_moved_out_never_overwritten() -> None:
    remote = {f"{TOP}/a.txt": Shared("n1", 3, False)}
    written = {f"{TOP}/a.txt": Written("n1", 2, st(1))}
    local = {f"{TOP}/a.txt": st(1, size=9), f"{TOP}/mine.txt": st(5)}
    result = plan_shared(remote, written, local)
    assert result.move_out == (f"{TOP}/a.txt", f"{TOP}/mine.txt")
    assert result.downloads == ((f"{TOP}/a.txt", None),)   # the original, again


def test_unshared_files_go_only_if_unchanged() -> None:
    written = {f"{TOP}/a.txt": Written("n1", 2, st(1)), f"{TOP}/b.txt": Written("n2", 1, st(2))}
    local = {f"{TOP}/a.txt": st(1), f"{TOP}/b.txt": st(2, size=7)}
    result = plan_shared({}, written, local)
    assert result.remove == (f"{TOP}/a.txt",)
    assert result.move_out == (f"{TOP}/b.txt",)          # edited: kept as the user's own
    assert result.forget == (f"{TOP}/a.txt", f"{TOP}/b.txt")
