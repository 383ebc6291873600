"""Connections to the metadata database for trio code.

Writes go through one connection, one transaction at a time (`write`), in a worker thread,
with `synchronous=FULL` so that an acknowledged change survives a power cut, not only a
crash. Reads (`read`) use a read-only connection per worker thread and run in parallel with
the writer (WAL). Functions passed in get the connection and run inside one transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import apsw
import trio

from appliance.db import open_database

T = TypeVar("T")
READ_THREADS = 4


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = open_database(path)
        self._writer.execute("PRAGMA synchronous=FULL")
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(READ_THREADS)
        self._local = threading.local()
        self._readers: list[apsw.Connection] = []
        self._lock = threading.Lock()
        self._writer_lock = threading.Lock()  # also serialises CLI-style sync callers

    def _reader(self) -> apsw.Connection:
        reader: apsw.Connection | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
            reader.setbusytimeout(10_000)
            self._local.reader = reader
            with self._lock:
                self._readers.append(reader)
        return reader

    def write_sync(self, fn: Callable[[apsw.Connection], T]) -> T:
        """Run fn in one IMMEDIATE transaction (the write lock is taken up front, so a
        transaction that reads before it writes never fails on a stale snapshot)."""
        with self._writer_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._writer)
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
            return result

    def read_sync(self, fn: Callable[[apsw.Connection], T]) -> T:
        reader = self._reader()
        reader.execute("BEGIN")  # one read transaction: a consistent snapshot
        try:
            return fn(reader)
        finally:
            reader.execute("COMMIT")

    async def write(self, fn: Callable[[apsw.Connection], T]) -> T:
        return await trio.to_thread.run_sync(self.write_sync, fn,
                                             limiter=self._write_limiter)

    async def read(self, fn: Callable[[apsw.Connection], T]) -> T:
        return await trio.to_thread.run_sync(self.read_sync, fn, limiter=self._read_limiter)

    def close(self) -> None:
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
        self._writer.close()
