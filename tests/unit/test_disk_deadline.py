"""Disk calls with a deadline (appliance/storage/deadline.py), and what the store makes of
a disk that stops answering: real threads, calls blocked on events (never on sleeps), a
deadline of a fraction of a second. The same against a real kernel — a FUSE disk that
hangs under a running appliance — is tests/integration/test_disk_faults.py."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from storage_fixtures import (
    MiB,
    assert_full_redundancy,
    disk_specs,
    format_disks,
    make_block,
    open_store,
    shard_index_paths,
)

from appliance.errors import DiskError
from appliance.storage import deadline
from appliance.storage import disk as disk_module
from appliance.storage.blockstore import BlockStore, RepairOutcome
from appliance.storage.deadline import DiskCalls, DiskTimeout
from appliance.storage.disk import DiskState

TIMEOUT = 0.3


def blocked(release: threading.Event, started: threading.Event | None = None,
            value: Any = "late") -> Any:
    if started is not None:
        started.set()
    assert release.wait(30), "never released"
    return value


def until(condition: Any) -> None:
    """Wait (bounded) for CONDITION: a released call's thread clears the overrun."""
    for _ in range(500):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition never held")


def test_a_call_returns_its_value_or_raises_its_error_from_a_daemon_thread() -> None:
    calls = DiskCalls("d", timeout=TIMEOUT)
    assert calls.run("reading", lambda: threading.current_thread().daemon) is True
    with pytest.raises(OSError, match="boom"):
        calls.run("reading", lambda: (_ for _ in ()).throw(OSError("boom")))
    assert calls.hung() is None
    calls.close()


def test_an_overrun_call_is_given_up_and_the_disk_is_hung_until_it_returns() -> None:
    calls = DiskCalls("d", timeout=TIMEOUT)
    release = threading.Event()
    began = time.monotonic()
    with pytest.raises(DiskTimeout) as first:
        calls.run("reading a shard", lambda: blocked(release))
    assert TIMEOUT <= time.monotonic() - began < 10
    assert first.value.new and "no answer" in str(first.value)
    stuck = calls.hung()
    assert stuck is not None and stuck.action == "reading a shard"

    ran = []
    began = time.monotonic()
    with pytest.raises(DiskTimeout) as refused:   # at once, and never run
        calls.run("reading", lambda: ran.append(1))
    assert time.monotonic() - began < TIMEOUT
    assert not refused.value.new and "not answering" in str(refused.value)

    release.set()
    until(lambda: calls.hung() is None)   # cleared by the released thread
    assert calls.run("reading", lambda: 7) == 7
    assert ran == []
    calls.close()


def test_a_call_that_never_got_a_thread_is_cancelled_not_run_later() -> None:
    calls = DiskCalls("d", timeout=TIMEOUT, threads=1)
    release, started = threading.Event(), threading.Event()
    errors: list[DiskTimeout] = []

    def first() -> None:
        with pytest.raises(DiskTimeout) as caught:
            calls.run("reading", lambda: blocked(release, started))
        errors.append(caught.value)

    holder = threading.Thread(target=first)
    holder.start()
    assert started.wait(10)
    ran = []
    with pytest.raises(DiskTimeout) as queued:
        calls.run("writing", lambda: ran.append(1))
    assert queued.value.new and "no free thread" in str(queued.value)
    holder.join(10)
    release.set()
    until(lambda: calls.hung() is None)
    assert calls.run("reading", lambda: 1) == 1   # the one thread is free again
    assert ran == [] and len(errors) == 1
    calls.close()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockStore]:
    monkeypatch.setattr(deadline, "DISK_TIMEOUT_S", TIMEOUT)
    monkeypatch.setattr(disk_module, "PROBE_INTERVAL", 0.0)
    specs = disk_specs(tmp_path / "disks")
    format_disks(specs)
    store = open_store(tmp_path, specs)
    yield store
    store.close()


def test_a_hung_disk_costs_a_get_one_deadline_and_is_failing_until_it_answers(
        store: BlockStore, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    big_id, big = make_block(rng, MiB)
    small_id, small = make_block(rng, 3000)
    store.put(big_id, big)
    store.put(small_id, small)
    sick = store.disks[0]
    release = threading.Event()
    real_read_direct, real_read_upto = disk_module.read_direct, disk_module._read_upto

    def hanging_read_direct(path: Any) -> bytes | None:
        if Path(path).is_relative_to(sick.root):
            blocked(release)
        return real_read_direct(path)

    def hanging_read_upto(path: Path, limit: int) -> bytes:
        if path.is_relative_to(sick.root):
            blocked(release)
        return real_read_upto(path, limit)

    monkeypatch.setattr(disk_module, "read_direct", hanging_read_direct)
    monkeypatch.setattr(disk_module, "_read_upto", hanging_read_upto)
    began = time.monotonic()
    assert store.get(big_id) == big
    first = time.monotonic() - began
    assert TIMEOUT <= first < 10
    assert sick.hung and not sick.readable and not sick.writable
    status = sick.status()
    assert status.state is DiskState.FAILING and "not answering" in status.detail
    assert status.shard_count is None   # not asked: it would hang too

    began = time.monotonic()
    for _ in range(5):   # skipped at once now
        assert store.get(big_id) == big
        assert store.get(small_id) == small
    assert time.monotonic() - began < TIMEOUT * 5
    other_id, other = make_block(rng, 200_000)
    assert store.put(other_id, other).shards_written == 5   # never written while hung

    release.set()
    until(lambda: not sick.hung)
    assert sick.probe() is DiskState.OK   # one call given up on is one error, not three
    assert sick.recent_errors() == 1
    assert store.get(big_id) == big


def test_a_write_that_hangs_moves_the_shard_elsewhere_within_the_deadline(
        store: BlockStore, monkeypatch: pytest.MonkeyPatch) -> None:
    sick = store.disks[3]
    release = threading.Event()
    real_fdatasync = disk_module.os.fdatasync

    def hanging_fdatasync(fd: int) -> None:
        if Path(disk_module.os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(sick.root):
            blocked(release)
        real_fdatasync(fd)

    monkeypatch.setattr(disk_module.os, "fdatasync", hanging_fdatasync)
    rng = random.Random(4)
    try:
        block_id, data = make_block(rng, 300_000)
        began = time.monotonic()
        result = store.put(block_id, data)
        assert time.monotonic() - began < 10
        assert result.shards_written == 5 and sick.hung
        with pytest.raises(DiskError, match="not answering"):
            sick.read_shard(block_id)
        assert store.get(block_id) == data
    finally:
        release.set()


def test_repair_replaces_a_second_copy_of_an_index_when_every_disk_holds_a_shard(
        store: BlockStore) -> None:
    """A put given up on (its disk hung) and run again places the shards anew; when the
    first attempt's write lands after all, one index is on two disks and another on none.
    With every disk holding a shard, repair must overwrite the second copy."""
    block_id, data = make_block(random.Random(5), MiB)
    store.put(block_id, data)
    where = shard_index_paths(store, block_id)
    where[5].write_bytes(where[2].read_bytes() or b"")   # index 2 twice, 5 nowhere
    assert store.repair(block_id).outcome is RepairOutcome.REPAIRED
    assert_full_redundancy(store, {block_id: data})


def test_an_operation_inside_an_operation_runs_in_its_worker(store: BlockStore) -> None:
    outer = store._bounded(lambda: (threading.get_ident(),
                                    store._bounded(threading.get_ident)))
    assert outer[0] == outer[1] != threading.get_ident()


def test_many_operations_calling_one_disk_at_once_never_trip_over_each_other() -> None:
    """Every call asks the disk whether it is hung while other operations' threads come
    and go from its table of calls in progress. Reading that table live raised
    "dictionary changed size during iteration" under load (a 500 on POST /batch/files,
    whose block the client had sent: it then sent it again as a second file)."""
    calls = DiskCalls("stress", timeout=30)
    operations = deadline.Operations(timeout=30, threads=8)
    errors: list[BaseException] = []
    deadline_at = time.monotonic() + 1.5

    def operation() -> None:
        while time.monotonic() < deadline_at:
            calls.run("a call", lambda: time.sleep(0))   # inline: in the table, then out

    def one_worker() -> None:
        try:
            operations.run(operation, [calls], lambda i, e: None)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=one_worker) for _ in range(8)]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)    # threads take turns as often as they can: the race shows
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
    finally:
        sys.setswitchinterval(switching)
    assert errors == []
