"""Group commit: every waiter is covered by a syncfs that started after it called, many
waiters share one syncfs, and a failing syncfs reaches the waiters instead of being lost."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from appliance.storage import group_commit
from appliance.storage.group_commit import GroupCommit


class RecordingSync:
    """Stands in for syncfs(2): records when each call started and ended, and can fail."""

    def __init__(self, duration: float = 0.02) -> None:
        self.duration = duration
        self.calls: list[tuple[float, float]] = []
        self.fail_next = False
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        started = time.monotonic()
        time.sleep(self.duration)
        with self._lock:
            self.calls.append((started, time.monotonic()))
            if self.fail_next:
                self.fail_next = False
                raise OSError(errno.EIO, "Input/output error", str(path))


def test_every_waiter_is_covered_by_a_sync_that_started_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = RecordingSync()
    monkeypatch.setattr(group_commit, "syncfs", fake)
    commit = GroupCommit(tmp_path)
    covered: list[bool] = []

    def writer() -> None:
        for _ in range(5):
            called = time.monotonic()
            commit.wait_durable()
            returned = time.monotonic()
            covered.append(any(called <= start and end <= returned
                               for start, end in fake.calls))

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(covered) == 80 and all(covered)
    assert commit.syncs == len(fake.calls) < 40  # 80 waits shared far fewer syncs


def test_a_failing_sync_reaches_its_caller_and_the_next_one_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = RecordingSync(duration=0)
    monkeypatch.setattr(group_commit, "syncfs", fake)
    commit = GroupCommit(tmp_path)
    fake.fail_next = True
    with pytest.raises(OSError) as caught:
        commit.wait_durable()
    assert caught.value.errno == errno.EIO
    commit.wait_durable()
    assert len(fake.calls) == 2


def test_real_syncfs_and_one_commit_per_filesystem(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = group_commit.for_path(tmp_path / "a")
    assert group_commit.for_path(tmp_path / "b") is first  # same filesystem, same commit
    before = first.syncs
    first.wait_durable()
    assert first.syncs == before + 1
    with pytest.raises(OSError):
        group_commit.syncfs(tmp_path / "missing")
