"""The database's epoch: a random id naming its current history.

A home recovered from a copy of its database (`cairnd recover`, or a copy put back by
hand) is *older* than what the devices saw: nodes, versions and changes committed after
the copy was taken are gone, while the devices still hold them. Cursors and versions
alone cannot tell a device so — after the recovery they grow again from the copy's
values, and soon pass the ones a device remembers. So the recovery gives the database a
new epoch (`renew_epoch`, in the same transaction that finishes the recovery), and the
appliance reports it (GET /me, GET /changes): a device that synced against another epoch
knows that the appliance may lack what it had seen, lists the tree again, and re-sends
what it holds instead of taking the missing items for deletions.

`started_at` (unix time, the appliance's clock) says when the epoch began, so a device
can tell a node the copy brought back (changed before) from one changed since the
recovery by another device (after): the first is an old state that the device's newer
view replaces, the second is a concurrent edit that the usual conflict rules settle.
`started_cursor` (the newest change cursor when the epoch began) tells a device more: the
feed after it holds exactly what was changed since the recovery, so each node's first change
there says which version the copy brought back (agent/sync/rollback.py: a device whose
synced version the copy had takes a newer one as a normal successor, not a conflict).

Pure functions on an apsw connection, run inside the caller's transaction; the table is
created by migration 3 (appliance.db), which draws the first epoch.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TypeVar

import apsw

T = TypeVar("T", int, float)

EPOCH_KEY = "epoch"
STARTED_KEY = "epoch_started_at"
STARTED_CURSOR_KEY = "epoch_started_cursor"
EPOCH_BYTES = 16            # 32 hex digits, like the migration's lower(hex(randomblob(16)))
UNKNOWN_EPOCH = "0" * 32


@dataclass(frozen=True)
class Epoch:
    id: str
    started_at: float | None     # None: not recorded (a row written by hand)
    started_cursor: int | None = None   # the newest change when it began (None: not
                                        # recorded: the migration's first epoch, or older)


def _value(db: apsw.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM appliance_state WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _number(text: str | None, kind: type[T]) -> T | None:
    """TEXT as KIND (float or int); None if absent or not a number (a row written by
    hand must not stop /me)."""
    try:
        return None if text is None else kind(text)
    except ValueError:
        return None


def current(db: apsw.Connection) -> Epoch:
    """The epoch, when it began and the newest change cursor then. (A database without
    the row, which the migration writes, reports UNKNOWN_EPOCH: the same answer every
    time, read-only connections included, so devices do not see it change until someone
    renews it.)"""
    epoch = _value(db, EPOCH_KEY)
    if epoch is None:
        return Epoch(UNKNOWN_EPOCH, None)
    return Epoch(epoch, _number(_value(db, STARTED_KEY), float),
                 _number(_value(db, STARTED_CURSOR_KEY), int))


def newest_cursor(db: apsw.Connection) -> int:
    """The newest change's cursor (0: none yet). Cursors are AUTOINCREMENT: every change
    committed later has a greater one."""
    row = db.execute("SELECT max(cursor) FROM changes").fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def renew(db: apsw.Connection, now: float | None = None) -> Epoch:
    """Begin a new epoch (after recovering the database from an older copy), noting when
    and the newest change cursor: what the feed holds after it was changed since."""
    epoch = Epoch(secrets.token_hex(EPOCH_BYTES), time.time() if now is None else now,
                  newest_cursor(db))
    db.executemany("INSERT INTO appliance_state(key, value) VALUES (?, ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   [(EPOCH_KEY, epoch.id), (STARTED_KEY, repr(epoch.started_at)),
                    (STARTED_CURSOR_KEY, str(epoch.started_cursor))])
    return epoch


def current_epoch(db: apsw.Connection) -> str:
    """The current epoch's id (32 hex digits)."""
    return current(db).id


def renew_epoch(db: apsw.Connection) -> str:
    """A new random epoch, recorded; its id. Call it inside the transaction that makes a
    recovered database the appliance's (devices then re-send what the copy lacks)."""
    return renew(db).id
