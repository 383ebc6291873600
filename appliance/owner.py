"""One owner of an appliance's disks at a time.

Two processes writing shards, formatting disks or repairing blocks at once each act on a
view of the disks that the other one changes under it: issue 14 met a read that called a
block unrecoverable because the serving process still saw as blank two disks that a
`cairnd scrub` in another process had just rebuilt. So the disks have one owner:

- `cairnd serve` holds HOME/run/serve.lock (an exclusive flock) for its whole life, and
  takes store work from other commands through its admin socket (appliance/admin.py);
- a command that touches the store (`cairnd scrub`, `disks`, `fsck`) asks the server when
  one runs (appliance/admin_client.py), and otherwise takes the same lock itself while it
  works on the disks directly, so that no server can start under it.

Commands that only touch the database (`cairnd user ...`) need neither: SQLite's own
locking keeps them safe beside a server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from appliance.errors import HomeBusyError

RUN_DIR = "run"
LOCK_NAME = "serve.lock"


def run_dir(home: Path) -> Path:
    return home / RUN_DIR


@contextlib.contextmanager
def own_disks(home: Path, holder: str) -> Iterator[None]:
    """Hold the home's owner lock for the block; HomeBusyError if another process has it.
    HOLDER ("cairnd serve", "cairnd scrub") goes into the lock file for the next one's
    error message."""
    folder = run_dir(home)
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another cairnd"
            raise HomeBusyError(f"another {other} is already running for {home}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()})\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def disks_owned(home: Path) -> bool:
    """Whether some process holds the owner lock right now (a server, or a command working
    on the disks directly)."""
    path = run_dir(home) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
