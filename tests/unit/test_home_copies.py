"""The copies of the home on the data disks (appliance/home_copies.py) and the choice of
copy in a recovery (appliance/recover.py), on a real home with real disk folders."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.db import open_database
from appliance.errors import RecoverError
from appliance.home import init_home
from appliance.home_copies import (
    DATABASE_NAME,
    KEEP_COPIES,
    KEY_NAME,
    HomeCopier,
    copies_on,
    copy_order,
    verify_copy,
)
from appliance.meta import epoch
from appliance.recover import newest_copy, recover_home
from appliance.storage.blockstore import BlockStore


@pytest.fixture
def home(tmp_path: Path) -> ApplianceConfig:
    disks = [tmp_path / "disks" / f"disk{i}" for i in range(6)]
    for disk in disks:
        disk.mkdir(parents=True)
    return init_home(tmp_path / "home", disk_paths=disks, reserve_free_bytes=0,
                     listen="127.0.0.1:0")


def add_user(config: ApplianceConfig, name: str) -> None:
    db = open_database(config.database)
    try:
        db.execute("INSERT INTO users(name, created_at) VALUES (?, 0)", (name,))
    finally:
        db.close()


def users_in(database: Path) -> list[str]:
    db = open_database(database)
    try:
        return [str(row[0]) for row in db.execute("SELECT name FROM users ORDER BY name")]
    finally:
        db.close()


def copier_of(config: ApplianceConfig) -> tuple[HomeCopier, BlockStore]:
    store = BlockStore(config.store)
    return HomeCopier(config, store.disks), store


def test_copies_go_to_m_plus_one_disks_only_when_something_changed(
        home: ApplianceConfig) -> None:
    copier, store = copier_of(home)
    try:
        first = copier.copy_if_changed()
        assert first is not None and len(first.disks) == home.store.parity_shards + 1
        assert first.disks == copy_order(home.appliance_id,
                                         [d.name for d in store.disks])[:3]
        assert copier.copy_if_changed() is None                  # nothing changed
        add_user(home, "alice")
        second = copier.copy_if_changed()
        assert second is not None and second.sequence == first.sequence + 1
        (home.home / "secrets").mkdir(exist_ok=True)
        (home.home / "secrets" / "url.key").write_bytes(os.urandom(32))
        assert copier.copy_if_changed() is not None              # a new secret
        for _ in range(3):
            copier.copy_now(clean=False)
    finally:
        copier.close()
        store.close()
    disk = next(d for d in home.store.disks if d.name == first.disks[0]).path
    kept = list(copies_on(disk))
    assert len(kept) == KEEP_COPIES
    newest = kept[0][1]
    assert verify_copy(newest) is None
    assert users_in(newest / DATABASE_NAME) == ["alice"]
    assert stat.S_IMODE((newest / KEY_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((newest / DATABASE_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE(newest.stat().st_mode) == 0o700


def test_recovery_skips_a_damaged_copy_and_renews_the_epoch(home: ApplianceConfig,
                                                            tmp_path: Path) -> None:
    copier, store = copier_of(home)
    try:
        copier.copy_now(clean=False)
        add_user(home, "alice")
        newest = copier.copy_now(clean=True)
    finally:
        copier.close()
        store.close()
    assert newest is not None
    disks = [spec.path for spec in home.store.disks]
    # Bit rot in the newest copy on every disk that has it: the older copy is used.
    for name in newest.disks:
        copy = next(copies_on(next(p for p in disks if p.name == name)))[1]
        data = bytearray((copy / DATABASE_NAME).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / DATABASE_NAME).write_bytes(bytes(data))
        assert verify_copy(copy) == f"{DATABASE_NAME} does not match the manifest"
    copy, manifest, skipped = newest_copy(home.appliance_id, disks)
    assert manifest["sequence"] == newest.sequence - 1 and len(skipped) == 3

    db = open_database(home.database)
    try:
        old_epoch = epoch.current_epoch(db)
    finally:
        db.close()
    recovered = recover_home(tmp_path / "again", disks[::-1])
    assert users_in(recovered.config.database) == []            # the older copy's
    assert recovered.epoch != old_epoch
    assert [d.path for d in recovered.config.store.disks] == disks  # matched by slot


def test_recovery_refuses_disks_of_two_appliances_and_disks_without_copies(
        home: ApplianceConfig, tmp_path: Path) -> None:
    disks = [spec.path for spec in home.store.disks]
    with pytest.raises(RecoverError, match="no intact copy of the home"):
        recover_home(tmp_path / "new", disks)
    assert not (tmp_path / "new").exists()                         # nothing half made
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    with pytest.raises(RecoverError, match="is not a Cairn disk"):
        recover_home(tmp_path / "new", [*disks, stranger])
    other = init_home(tmp_path / "other-home", disks=2, data_shards=1, parity_shards=1,
                      reserve_free_bytes=0, listen="127.0.0.1:0")
    with pytest.raises(RecoverError, match="belong to different appliances"):
        recover_home(tmp_path / "new", [*disks[1:], other.store.disks[0].path])


def test_copies_made_at_once_from_two_threads_take_turns(home: ApplianceConfig) -> None:
    """At a stop the last copy starts while the abandoned periodic one may still run: both
    must succeed (they shared the database connection, and SQLite refused the second
    backup on every disk)."""
    db = open_database(home.database)
    try:
        with db:               # a database whose backup takes a moment
            db.executemany("INSERT INTO users(name, created_at) VALUES (?, 0)",
                           [(f"user{i:05d}",) for i in range(20_000)])
    finally:
        db.close()
    copier, store = copier_of(home)
    results: list[object] = []
    start = threading.Barrier(2)

    def copy() -> None:
        start.wait()
        results.extend(copier.copy_now(clean=False) for _ in range(3))

    try:
        workers = [threading.Thread(target=copy) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    finally:
        copier.close()
        store.close()
    assert len(results) == 6 and all(result is not None for result in results)
    assert len({result.sequence for result in results}) == 6   # type: ignore[attr-defined]
