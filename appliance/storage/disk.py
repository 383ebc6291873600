"""One disk of the block store: its identity, its state, and crash-safe shard files.

Layout of a disk (spec: docs/shard-format.md):

    <disk>/cairn-disk.json          identity marker: format, appliance id, slot name, disk id
    <disk>/shards/ab/cd/<block id>  at most one shard of a block per disk; the header says
                                    which shard index it is
    <disk>/shards/ab/cd/.<block id>.<random>.tmp   a shard being written
    <disk>/small-shards.sqlite      small-block replicas, one row each (pack.py)

A shard is written to a temp file beside its final name, fdatasync'd, renamed into place,
and the folder is fsync'd; only then does `write_shard` return. A crash leaves the old
file, the new file, or a temp file, which is never listed as a shard and which the scrub's
walk removes once it is an hour old. A torn file fails the shard checksum anyway. Temp
files live in the fan-out folders rather than one tmp/ folder because file creation in one
folder is serialised by the kernel: spread over the fan-out, 16 writers create files 3.5x
faster on the test machines.

States (probed at most every PROBE_INTERVAL seconds, and re-probed after an error):
    ok         readable and writable
    missing    folder absent, or a required mount point not mounted
    blank      an empty folder with no marker: a replacement disk waiting for `cairnd scrub`
    foreign    a marker of another appliance or slot, or unknown files and no marker
    read-only  the filesystem refuses writes; still read
    full       free space below the reserve, or the last write hit ENOSPC; still read
    failing    repeated I/O errors recently; still read, never written
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import DiskError
from appliance.storage.direct_io import open_new_file, read_direct, write_direct
from appliance.storage.pack import ShardPack
from appliance.storage.settings import DiskSpec

MARKER_NAME = "cairn-disk.json"
MARKER_FORMAT = 1
SHARDS_DIR = "shards"
TMP_SUFFIX = ".tmp"
PROBE_INTERVAL = 2.0
FAILING_ERRORS = 3           # this many I/O errors ...
FAILING_WINDOW = 600.0       # ... within this many seconds make a disk `failing`
TMP_STALE_AFTER = 3600.0     # temp files older than this are crash leftovers
DIRECT_FROM_BYTES = 256 * 1024   # shards this big bypass the page cache (direct_io.py)
FULL_HOLD = 30.0             # after ENOSPC, stay `full` this long before probing again
_IGNORED_ON_BLANK = {"lost+found"}


class DiskState(enum.StrEnum):
    OK = "ok"
    MISSING = "missing"
    BLANK = "blank"
    FOREIGN = "foreign"
    READ_ONLY = "read-only"
    FULL = "full"
    FAILING = "failing"


READABLE_STATES = frozenset(
    {DiskState.OK, DiskState.READ_ONLY, DiskState.FULL, DiskState.FAILING})


@dataclass(frozen=True)
class DiskStatus:
    name: str
    path: Path
    state: DiskState
    shard_count: int | None
    free_bytes: int | None
    total_bytes: int | None
    recent_errors: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "state": self.state.value,
            "shard_count": self.shard_count,
            "free_bytes": self.free_bytes,
            "total_bytes": self.total_bytes,
            "recent_errors": self.recent_errors,
            "detail": self.detail,
        }


def shard_relative_path(block_hex: str) -> Path:
    return Path(SHARDS_DIR, block_hex[:2], block_hex[2:4], block_hex)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def format_disk(spec: DiskSpec, appliance_id: str) -> None:
    """Make `spec.path` a disk of this appliance: create it if needed and write the marker.

    Refuses a folder that holds anything but an empty filesystem (or this disk's own marker).
    """
    root = spec.path
    if spec.require_mount and not os.path.ismount(root):
        raise DiskError(spec.name, f"{root} is not a mount point; mount the disk first")
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER_NAME
    if marker.exists():
        existing = _read_marker(marker)
        if existing.get("appliance_id") == appliance_id and existing.get("slot") == spec.name:
            return
        raise DiskError(spec.name, f"{root} belongs to another appliance or slot")
    leftovers = {p.name for p in root.iterdir()} - _IGNORED_ON_BLANK
    if leftovers:
        raise DiskError(spec.name, f"{root} is not empty ({len(leftovers)} entries); "
                                   "refusing to format it")
    (root / SHARDS_DIR).mkdir(exist_ok=True)
    body = json.dumps({"format": MARKER_FORMAT, "appliance_id": appliance_id,
                       "slot": spec.name, "disk_id": secrets.token_hex(16),
                       "formatted_at": time.time()}, indent=2).encode()
    tmp = root / (MARKER_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, [body])
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rename(marker)
    _fsync_directory(root)


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Disk:
    """A disk slot, safe to use from many threads at once."""

    def __init__(self, spec: DiskSpec, appliance_id: str, reserve_free_bytes: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.root = spec.path
        self._appliance_id = appliance_id
        self._reserve = reserve_free_bytes
        self._lock = threading.Lock()
        self._errors: deque[float] = deque(maxlen=64)
        self._full_until = 0.0
        self._state = DiskState.MISSING
        self._detail = ""
        self._probed_at = float("-inf")
        self.pack = ShardPack(self.root, self.root / MARKER_NAME)
        self._direct = True   # write big shards with O_DIRECT until the filesystem refuses
        self.probe()

    def close(self) -> None:
        self.pack.close()

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> DiskState:
        if time.monotonic() - self._probed_at > PROBE_INTERVAL:
            self.probe()
        return self._state

    @property
    def readable(self) -> bool:
        return self.state in READABLE_STATES

    @property
    def writable(self) -> bool:
        return self.state is DiskState.OK

    def recent_errors(self) -> int:
        horizon = time.monotonic() - FAILING_WINDOW
        return sum(1 for t in self._errors if t >= horizon)

    def probe(self) -> DiskState:
        state, detail = self._probe()
        with self._lock:
            self._state, self._detail = state, detail
            self._probed_at = time.monotonic()
        return state

    def _probe(self) -> tuple[DiskState, str]:
        root = self.root
        if not root.is_dir():
            return DiskState.MISSING, f"{root} does not exist"
        if self.spec.require_mount and not os.path.ismount(root):
            return DiskState.MISSING, f"{root} is not mounted"
        marker = root / MARKER_NAME
        if not marker.exists():
            try:
                entries = {p.name for p in root.iterdir()} - _IGNORED_ON_BLANK
            except OSError as exc:
                return DiskState.FAILING, f"cannot list {root}: {exc.strerror}"
            if entries:
                return DiskState.FOREIGN, "unknown files and no Cairn marker"
            return DiskState.BLANK, "empty; `cairnd scrub` formats and rebuilds it"
        identity = _read_marker(marker)
        if identity.get("appliance_id") != self._appliance_id:
            return DiskState.FOREIGN, "marker of another appliance"
        if identity.get("slot") != self.name:
            return DiskState.FOREIGN, f"marker of slot {identity.get('slot')!r}"
        if self.recent_errors() >= FAILING_ERRORS:
            return DiskState.FAILING, f"{self.recent_errors()} I/O errors recently"
        try:
            fs = os.statvfs(root)
        except OSError as exc:
            return DiskState.FAILING, f"statvfs failed: {exc.strerror}"
        if fs.f_flag & os.ST_RDONLY:
            return DiskState.READ_ONLY, "filesystem is mounted read-only"
        if time.monotonic() < self._full_until:
            return DiskState.FULL, "last write ran out of space"
        if fs.f_bavail * fs.f_frsize < self._reserve:
            return DiskState.FULL, "free space below the reserve"
        return DiskState.OK, ""

    def _mark(self, state: DiskState, detail: str) -> None:
        with self._lock:
            self._state, self._detail = state, detail
            self._probed_at = time.monotonic()

    def _failed(self, exc: OSError, action: str) -> DiskError:
        """Record what an OSError says about this disk and return the error to raise."""
        code = exc.errno
        if code == errno.EROFS:
            self._mark(DiskState.READ_ONLY, "filesystem refused a write (read-only)")
        elif code in (errno.ENOSPC, errno.EDQUOT):
            self._full_until = time.monotonic() + FULL_HOLD
            self._mark(DiskState.FULL, "a write ran out of space")
        elif code in (errno.ENOENT, errno.ENOTDIR) and not self.root.is_dir():
            self._mark(DiskState.MISSING, f"{self.root} disappeared")
        else:
            self._errors.append(time.monotonic())
            self.probe()
        return DiskError(self.name, f"{action} failed: {exc.strerror or exc}")

    def status(self, count_shards: bool = True) -> DiskStatus:
        state = self.probe()
        free = total = None
        count = None
        if state in READABLE_STATES:
            try:
                fs = os.statvfs(self.root)
                free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
            except OSError:
                pass
            if count_shards:
                count = sum(1 for _ in self.iter_block_ids())
        return DiskStatus(self.name, self.root, state, count, free, total,
                          self.recent_errors(), self._detail)

    # -- shards --------------------------------------------------------------------------

    def shard_path(self, block_hex: str) -> Path:
        return self.root / shard_relative_path(block_hex)

    def write_shard(self, block_hex: str, header: bytes, payload: bytes | memoryview) -> None:
        """Durably write one shard file, replacing any shard of the block on this disk."""
        self.commit_shard(block_hex, self.stage_shard(block_hex, header, payload))

    def stage_shard(self, block_hex: str, header: bytes, payload: bytes | memoryview) -> Path:
        """Write the shard to a temp file beside its final name and fdatasync it. Nothing
        is visible as a shard until `commit_shard` renames it; `discard_staged` drops it."""
        leaf = self.shard_path(block_hex).parent
        tmp = leaf / f".{block_hex}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        wanted = self._direct and len(payload) >= DIRECT_FROM_BYTES
        try:
            try:
                fd, direct = open_new_file(tmp, wanted)
            except FileNotFoundError:
                self._make_dirs(leaf)  # first shard in this fan-out folder
                fd, direct = open_new_file(tmp, wanted)
            if wanted and not direct:
                self._direct = False   # the filesystem does not take O_DIRECT
            try:
                if direct:
                    write_direct(fd, [header, payload])
                else:
                    _write_all(fd, [header, payload])
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.discard_staged(tmp)
            raise self._failed(exc, "writing a shard") from exc
        return tmp

    def commit_shard(self, block_hex: str, staged: Path) -> None:
        """Rename a staged shard into place and fsync its folder."""
        self.sync_shard_folder(self.publish_shard(block_hex, staged))

    def publish_shard(self, block_hex: str, staged: Path) -> Path:
        """Rename a staged shard into place (durable once `sync_shard_folder` returns);
        its final path."""
        final = self.shard_path(block_hex)
        try:
            os.rename(staged, final)
        except OSError as exc:
            self.discard_staged(staged)
            raise self._failed(exc, "committing a shard") from exc
        return final

    def sync_shard_folder(self, final: Path) -> None:
        """Make the rename of the shard at FINAL durable (fsync of its folder)."""
        try:
            _fsync_directory(final.parent)
        except OSError as exc:
            raise self._failed(exc, "committing a shard") from exc

    @staticmethod
    def discard_staged(staged: Path) -> None:
        with contextlib.suppress(OSError):
            staged.unlink()

    def submit_packed(self, block_hex: str, shard: bytes) -> int:
        """Queue a small shard for this disk's pack (pack.py); wait on the ticket with
        `wait_packed` before counting it as written."""
        return self.pack.submit(block_hex, shard)

    def wait_packed(self, ticket: int) -> None:
        try:
            self.pack.wait(ticket)
        except OSError as exc:
            raise self._failed(exc, "committing small shards") from exc

    def write_packed(self, block_hex: str, shard: bytes) -> None:
        """Durably pack one small shard. A shard *file* of the block on this disk (bad, or
        from before packing) is removed first: reads look at files first."""
        try:
            self.shard_path(block_hex).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._failed(exc, "removing an old shard file") from exc
        self.wait_packed(self.submit_packed(block_hex, shard))

    def _make_dirs(self, leaf: Path) -> None:
        """Create shards/ab/cd durably: each new directory's parent is fsync'd."""
        for directory in (leaf.parent, leaf):
            try:
                directory.mkdir()
            except FileExistsError:
                continue
            _fsync_directory(directory.parent)

    def read_shard(self, block_hex: str, limit: int | None = None) -> bytes | None:
        """The shard's bytes (the first `limit` of them) from its file or, for small blocks,
        the pack; None if this disk holds no shard of the block."""
        path = self.shard_path(block_hex)
        try:
            whole = read_direct(path) if limit is None and self._direct else None
            if whole is not None:
                return whole
            with open(path, "rb", buffering=0) as handle:
                return handle.read() if limit is None else handle.read(limit)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._failed(exc, "reading a shard") from exc
        try:
            return self.pack.read(block_hex, limit)
        except OSError as exc:
            raise self._failed(exc, "reading a packed shard") from exc

    def shard_size(self, block_hex: str) -> int | None:
        try:
            return self.shard_path(block_hex).stat().st_size
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._failed(exc, "stat of a shard") from exc
        try:
            return self.pack.size(block_hex)
        except OSError as exc:
            raise self._failed(exc, "looking up a packed shard") from exc

    def has_shard(self, block_hex: str) -> bool:
        return self.shard_size(block_hex) is not None

    def remove_shard(self, block_hex: str) -> bool:
        """Remove the block's shard file and packed shard, whichever exist."""
        path = self.shard_path(block_hex)
        removed = False
        try:
            path.unlink()
            removed = True
            with contextlib.suppress(OSError):
                _fsync_directory(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._failed(exc, "removing a shard") from exc
        try:
            return self.pack.remove(block_hex) or removed
        except OSError as exc:
            raise self._failed(exc, "removing a packed shard") from exc

    def iter_block_ids(self, remove_stale_temp_files: bool = False) -> Iterator[str]:
        """Every block id with a shard on this disk, file or packed (streamed, no list in
        memory).

        With remove_stale_temp_files (scrub does this), temp files older than
        TMP_STALE_AFTER met on the way are deleted: they are writes a crash interrupted,
        never acknowledged. Younger ones may be another process's write in progress."""
        yield from self._iter_shard_files(remove_stale_temp_files)
        try:
            for block_hex in self.pack.block_ids():
                if not self.shard_path(block_hex).exists():  # a file too: listed already
                    yield block_hex
        except OSError as exc:
            raise self._failed(exc, "listing packed shards") from exc

    def _iter_shard_files(self, remove_stale_temp_files: bool) -> Iterator[str]:
        shards = self.root / SHARDS_DIR
        horizon = time.time() - TMP_STALE_AFTER
        try:
            level1 = sorted(os.listdir(shards))
        except OSError:
            return
        for first in level1:
            try:
                level2 = sorted(os.listdir(shards / first))
            except OSError:
                continue
            for second in level2:
                leaf = shards / first / second
                try:
                    names = sorted(os.listdir(leaf))
                except OSError:
                    continue
                for name in names:
                    if len(name) == 64:
                        yield name
                    elif remove_stale_temp_files and name.endswith(TMP_SUFFIX):
                        self._remove_if_stale(leaf / name, horizon)

    @staticmethod
    def _remove_if_stale(path: Path, horizon: float) -> None:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < horizon:
                path.unlink()
