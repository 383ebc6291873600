"""The database's epoch (appliance.meta.epoch): drawn by the migration, stable until
renewed, and renewed to a new random id with the time it began and the newest change
cursor then."""

from __future__ import annotations

import re
import time

import apsw
from meta_helpers import memory_db

from appliance.db import MIGRATIONS, migrate, schema_version
from appliance.meta import epoch

HEX32 = re.compile("[0-9a-f]{32}")


def test_the_migration_draws_an_epoch_that_stays_until_renewed() -> None:
    db = memory_db()
    first = epoch.current(db)
    assert HEX32.fullmatch(first.id)
    assert first.started_at is not None and abs(first.started_at - time.time()) < 60
    assert epoch.current_epoch(db) == first.id == epoch.current_epoch(db)
    assert epoch.current_epoch(memory_db()) != first.id      # random per database


def test_renewing_gives_a_new_epoch_and_when_it_began() -> None:
    db = memory_db()
    before = epoch.current(db)
    renewed = epoch.renew_epoch(db)
    assert HEX32.fullmatch(renewed) and renewed != before.id
    assert epoch.current_epoch(db) == renewed
    assert epoch.renew(db, now=1234.5) == epoch.current(db)
    assert epoch.current(db).started_at == 1234.5


def test_a_renewed_epoch_notes_the_newest_change_cursor() -> None:
    db = memory_db()
    assert epoch.current(db).started_cursor is None        # the migration's: not known
    assert epoch.renew(db).started_cursor == 0 == epoch.current(db).started_cursor
    db.executemany("INSERT INTO changes(node_id, version, kind, at) VALUES (?, ?, ?, 0)",
                   [("a" * 32, 1, "created"), ("a" * 32, 2, "updated")])
    newest = int(db.execute("SELECT max(cursor) FROM changes").fetchone()[0])
    assert epoch.renew(db).started_cursor == newest == epoch.current(db).started_cursor
    db.execute("INSERT INTO changes(node_id, version, kind, at) VALUES (?, 3, 'moved', 0)",
               ("a" * 32,))
    assert epoch.current(db).started_cursor == newest       # later changes come after it
    db.execute("UPDATE appliance_state SET value = 'x' WHERE key = 'epoch_started_cursor'")
    assert epoch.current(db).started_cursor is None         # a row spoiled by hand


def test_a_database_from_before_the_epoch_gets_one_when_migrated() -> None:
    db = apsw.Connection(":memory:")
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.execute(script)
        db.execute(f"PRAGMA user_version={number}")
    migrate(db)
    assert schema_version(db) == len(MIGRATIONS)
    assert HEX32.fullmatch(epoch.current_epoch(db))


def test_a_database_without_the_row_reports_the_same_unknown_epoch() -> None:
    db = memory_db()
    db.execute("DELETE FROM appliance_state")
    assert epoch.current(db) == epoch.Epoch(epoch.UNKNOWN_EPOCH, None)
    assert epoch.current_epoch(db) == epoch.current_epoch(db)
