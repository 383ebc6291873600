"""The mount point: checked before mounting, a stale one (a crashed mount) cleared, and
`cairn umount`."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from agent.errors import LocalFileError, UsageError


def _fusermount() -> str:
    found = shutil.which("fusermount3") or shutil.which("fusermount")
    if found is None:
        raise LocalFileError("fusermount3 is missing: install the fuse3 package "
                             "(apt-get install fuse3)")
    return found


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            return any(line.split()[1].replace("\\040", " ") == target for line in mounts)
    except OSError:
        return os.path.ismount(mountpoint)


def prepare(mountpoint: Path) -> str | None:
    """Check MOUNTPOINT can take the drive; a message if a stale mount was cleared.
    Raises UsageError (one line) for a missing, non-directory or non-empty one."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            unmount(mountpoint, lazy=True)
            return (f"cleared a stale mount at {mountpoint} (a `cairn mount` that "
                    "ended without unmounting)")
        if exc.errno == errno.ENOENT:
            raise UsageError(f"mount point {mountpoint} does not exist; create it "
                             "first (mkdir)") from None
        raise UsageError(f"cannot use mount point {mountpoint}: {exc.strerror}") from None
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise UsageError(f"something is already mounted at {mountpoint} (`cairn umount "
                         f"{mountpoint}` if it is a drive)")
    if any(True for _ in os.scandir(mountpoint)):
        raise UsageError(f"mount point {mountpoint} is not empty; use an empty "
                         "directory")
    return None


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount the drive at MOUNTPOINT (LAZY: even if busy, detached at once)."""
    if not is_mounted(mountpoint):
        raise UsageError(f"nothing is mounted at {mountpoint}")
    args = [_fusermount(), "-u", *(["-z"] if lazy else []), str(mountpoint)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["failed"])[-1]
        if "not found in" in reason or "not mounted" in reason:
            raise UsageError(f"nothing is mounted at {mountpoint}")
        if "busy" in reason.lower():
            raise UsageError(f"{mountpoint} is busy (a program has a file or folder "
                             "open there); close it, or `cairn umount --lazy`")
        raise LocalFileError(f"cannot unmount {mountpoint}: {reason}")
