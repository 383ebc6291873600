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
    failing    repeated I/O errors recently; still read, never written. Also while the
               disk is hung (a call has not returned within its deadline): then neither
               read nor written until that call returns (deadline.py)

Every call into the disk is made with a deadline (deadline.py: inline in a store
operation's worker, or in the disk's own threads), so a disk that stops answering costs a
request DISK_TIMEOUT_S once, not forever.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from appliance.errors import DiskError
from appliance.storage.deadline import DiskCalls, DiskTimeout
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
# What a disk whose filesystem went away answers: a dead FUSE daemon or network mount
# (ENOTCONN), a stale NFS handle, a removed device.
_GONE = (errno.ENOTCONN, errno.ESTALE, errno.ENODEV, errno.ENXIO)
T = TypeVar("T")


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
        try:
            existing = _read_marker(marker)
        except OSError as exc:
            raise DiskError(spec.name, f"cannot read {marker}: {exc.strerror}") from exc
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
    """The marker's fields ({} if it is not a JSON object); OSError if it cannot be read
    (a disk that fails reads is failing, not another appliance's)."""
    try:
        data = json.loads(marker.read_bytes())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_upto(path: Path, limit: int) -> bytes:
    """The first LIMIT bytes of the file (fewer only at its end): a read may legally
    return less than asked, and a header read short would look like a torn shard."""
    with open(path, "rb", buffering=0) as handle:
        parts = []
        while limit > 0 and (part := handle.read(limit)):
            parts.append(part)
            limit -= len(part)
        return b"".join(parts)


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
        self.calls = DiskCalls(self.name)
        self.probe()

    def close(self) -> None:
        self.pack.close()
        self.calls.close()

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        """FN run with a deadline (deadline.py); its OSError, or its not answering,
        recorded and raised as a DiskError."""
        try:
            return self.calls.run(action, fn)
        except DiskTimeout as exc:
            raise self.note_timeout(exc) from None
        except OSError as exc:
            raise self._failed(exc, action) from exc

    def note_timeout(self, exc: DiskTimeout) -> DiskError:
        """Record a call that did not answer (the disk reads `failing` while it is hung);
        the DiskError to raise."""
        if exc.new:   # one error per call given up on, not per call refused since
            self._errors.append(time.monotonic())
        self._mark(DiskState.FAILING, str(exc))
        return DiskError(self.name, str(exc))

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> DiskState:
        if time.monotonic() - self._probed_at > PROBE_INTERVAL:
            self.probe()
        return self._state

    @property
    def readable(self) -> bool:
        return self.state in READABLE_STATES and not self.hung

    @property
    def writable(self) -> bool:
        return self.state is DiskState.OK and not self.hung

    @property
    def hung(self) -> bool:
        """A call into the disk is still out past its deadline (deadline.py)."""
        return self.calls.hung() is not None

    def recent_errors(self) -> int:
        horizon = time.monotonic() - FAILING_WINDOW
        return sum(1 for t in self._errors if t >= horizon)

    def probe(self) -> DiskState:
        stuck = self.calls.hung()
        if stuck is not None:
            state, detail = DiskState.FAILING, stuck.describe()
        else:
            try:
                state, detail = self.calls.run("probing", self._probe)
            except DiskTimeout as exc:
                self.note_timeout(exc)
                state, detail = DiskState.FAILING, str(exc)
            except OSError as exc:   # not even the folder answers (pathlib lets these out)
                gone = exc.errno in _GONE
                state = DiskState.MISSING if gone else DiskState.FAILING
                detail = f"{self.root}: {exc.strerror}"
        with self._lock:
            if state is not self._state:   # replaced, formatted, back: no stale readers
                self.pack.recheck_readers()
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
        try:
            identity = _read_marker(marker)
        except OSError as exc:
            return DiskState.FAILING, f"cannot read the marker: {exc.strerror}"
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
        elif code in (errno.ENOENT, errno.ENOTDIR, *_GONE) and not self._root_is_dir():
            self._mark(DiskState.MISSING, f"{self.root} disappeared")
        else:
            self._errors.append(time.monotonic())
            self.probe()
        return DiskError(self.name, f"{action} failed: {exc.strerror or exc}")

    def _root_is_dir(self) -> bool:
        try:
            return self.calls.run("looking at the disk", self.root.is_dir)
        except DiskTimeout:
            return True   # there, but not answering: not "missing"
        except OSError as exc:
            return exc.errno not in _GONE

    def status(self, count_shards: bool = True) -> DiskStatus:
        state = self.probe()
        free = total = None
        count = None
        if state in READABLE_STATES and not self.hung:
            try:
                fs = self.calls.run("statvfs", partial(os.statvfs, self.root))
                free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
            except (OSError, DiskTimeout):
                pass
            if count_shards:
                with contextlib.suppress(DiskError):
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
        return self._call("writing a shard", partial(self._stage, block_hex, header, payload))

    def _stage(self, block_hex: str, header: bytes, payload: bytes | memoryview) -> Path:
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
        except OSError:
            self._unlink_quietly(tmp)
            raise
        return tmp

    def commit_shard(self, block_hex: str, staged: Path) -> None:
        """Rename a staged shard into place and fsync its folder."""
        self.sync_shard_folder(self.publish_shard(block_hex, staged))

    def publish_shard(self, block_hex: str, staged: Path) -> Path:
        """Rename a staged shard into place (durable once `sync_shard_folder` returns);
        its final path."""
        final = self.shard_path(block_hex)

        def rename() -> Path:
            try:
                os.rename(staged, final)
            except OSError:
                self._unlink_quietly(staged)
                raise
            return final

        return self._call("committing a shard", rename)

    def sync_shard_folder(self, final: Path) -> None:
        """Make the rename of the shard at FINAL durable (fsync of its folder)."""
        self._call("committing a shard", partial(_fsync_directory, final.parent))

    def discard_staged(self, staged: Path) -> None:
        with contextlib.suppress(DiskError):
            self._call("removing a staged shard", partial(self._unlink_quietly, staged))

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def submit_packed(self, block_hex: str, shard: bytes) -> int:
        """Queue a small shard for this disk's pack (pack.py); wait on the ticket with
        `wait_packed` before counting it as written."""
        return self.pack.submit(block_hex, shard)

    def wait_packed(self, ticket: int) -> None:
        self._call("committing small shards", partial(self.pack.wait, ticket))

    def write_packed(self, block_hex: str, shard: bytes) -> None:
        """Durably pack one small shard. A shard *file* of the block on this disk (bad, or
        from before packing) is removed first: reads look at files first."""
        def write() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.shard_path(block_hex).unlink()
            self.pack.wait(self.pack.submit(block_hex, shard))

        self._call("packing a small shard", write)

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
        return self._call("reading a shard", partial(self._read_shard, block_hex, limit))

    def _read_shard(self, block_hex: str, limit: int | None) -> bytes | None:
        path = self.shard_path(block_hex)
        try:
            whole = read_direct(path) if limit is None and self._direct else None
            if whole is not None:
                return whole
            if limit is not None:
                return _read_upto(path, limit)
            with open(path, "rb", buffering=0) as handle:
                return handle.read()
        except FileNotFoundError:
            return self.pack.read(block_hex, limit)

    def read_packed(self, block_hex: str, limit: int | None = None) -> bytes | None:
        """The block's packed shard only (the small-block fast path); None if not packed
        here."""
        return self._call("reading a packed shard", partial(self.pack.read, block_hex, limit))

    def shard_size(self, block_hex: str) -> int | None:
        def size() -> int | None:
            try:
                return self.shard_path(block_hex).stat().st_size
            except FileNotFoundError:
                return self.pack.size(block_hex)

        return self._call("looking up a shard", size)

    def has_shard(self, block_hex: str) -> bool:
        return self.shard_size(block_hex) is not None

    def holds_any(self, block_hex: str) -> bool:
        """Whether the disk has a shard of the block; False if it cannot say."""
        try:
            return self.has_shard(block_hex)
        except DiskError:
            return False

    def holds(self, block_hex: str, packed: bool) -> bool:
        """Whether the disk has the block's packed shard (PACKED) or shard file; False if
        it cannot say (an error, no answer)."""
        def look() -> bool:
            if packed:
                return self.pack.size(block_hex) is not None
            return self.shard_path(block_hex).exists()

        try:
            return self.calls.run("looking up a shard", look)
        except (OSError, DiskTimeout):
            return False

    def remove_shard(self, block_hex: str) -> bool:
        """Remove the block's shard file and packed shard, whichever exist."""
        def remove() -> bool:
            path = self.shard_path(block_hex)
            removed = False
            try:
                path.unlink()
                removed = True
                with contextlib.suppress(OSError):
                    _fsync_directory(path.parent)
            except FileNotFoundError:
                pass
            return self.pack.remove(block_hex) or removed

        return self._call("removing a shard", remove)

    def iter_block_ids(self, remove_stale_temp_files: bool = False) -> Iterator[str]:
        """Every block id with a shard on this disk, file or packed (streamed, no list in
        memory).

        With remove_stale_temp_files (scrub does this), temp files older than
        TMP_STALE_AFTER met on the way are deleted: they are writes a crash interrupted,
        never acknowledged. Younger ones may be another process's write in progress."""
        yield from self._iter_shard_files(remove_stale_temp_files)

        def only_packed(after: str) -> tuple[str | None, list[str]]:
            batch = self.pack.block_id_batch(after)
            return (batch[-1] if batch else None,   # a file too: listed already
                    [b for b in batch if not self.shard_path(b).exists()])

        after: str | None = ""
        while after is not None:
            after, packed = self._call("listing packed shards", partial(only_packed, after))
            yield from packed

    def _listing(self, folder: Path) -> list[str]:
        """The sorted names in FOLDER; [] if it cannot be listed (gone, an error, no
        answer: the walk goes on with the other folders)."""
        try:
            return sorted(self.calls.run("listing shards", partial(os.listdir, folder)))
        except OSError:
            return []
        except DiskTimeout as exc:
            self.note_timeout(exc)
            return []

    def _iter_shard_files(self, remove_stale_temp_files: bool) -> Iterator[str]:
        shards = self.root / SHARDS_DIR
        horizon = time.time() - TMP_STALE_AFTER
        for first in self._listing(shards):
            for second in self._listing(shards / first):
                leaf = shards / first / second
                stale = []
                for name in self._listing(leaf):
                    if len(name) == 64:
                        yield name
                    elif remove_stale_temp_files and name.endswith(TMP_SUFFIX):
                        stale.append(leaf / name)
                if stale:
                    with contextlib.suppress(DiskError):
                        self._call("removing stale temp files",
                                   partial(self._remove_stale, stale, horizon))

    @staticmethod
    def _remove_stale(paths: list[Path], horizon: float) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < horizon:
                    path.unlink()
