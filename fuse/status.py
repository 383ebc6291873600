"""The running mount's status file, `HOME/drive/status.json`, for `cairn status`: where it
is mounted, whether the appliance answers, the upload queue with progress, the cache."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATUS_FILE = "status.json"


@dataclass
class Upload:
    name: str
    done: int
    total: int


@dataclass
class DriveStatus:
    mountpoint: str
    pid: int
    online: bool = True
    pending: int = 0
    conflicts: int = 0
    uploads: list[Upload] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    cache_used: int = 0
    cache_pinned: int = 0
    staged: int = 0
    cache_budget: int = 0
    written_at: float = 0.0       # time.time() when the mount wrote this


def write_status(folder: Path, status: DriveStatus) -> None:
    """Replace the status file (0600, atomically; not fsynced: it is rewritten every
    second and means nothing after a crash)."""
    temp = folder / f".{STATUS_FILE}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(asdict(status)).encode())
    finally:
        os.close(fd)
    os.replace(temp, folder / STATUS_FILE)


def read_status(folder: Path) -> DriveStatus | None:
    """The status a running mount wrote; None if there is none or its process is gone."""
    try:
        raw = json.loads((folder / STATUS_FILE).read_text())
        raw["uploads"] = [Upload(**u) for u in raw.get("uploads", [])]
        status = DriveStatus(**raw)
    except (OSError, ValueError, TypeError):
        return None
    try:
        os.kill(status.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return status


def clear_status(folder: Path) -> None:
    (folder / STATUS_FILE).unlink(missing_ok=True)
