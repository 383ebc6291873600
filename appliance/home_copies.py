"""Copies of the appliance's home on its data disks, so that losing the system disk loses
no user's files (`cairnd recover` rebuilds a home from them: appliance/recover.py).

Blocks survive any m disks; what makes them readable — every node's sealed metadata,
wrapped keys and block lists in the database, the TLS key pair devices pin, the URL
signing key, the config — lives in the home. While serving, `HomeCopier` keeps a complete
copy of it on m+1 data disks (the first writable ones in an order fixed by the appliance
id), in `<disk>/cairn-home/`:

    cairn-home/copy-000000000042/appliance.db     a consistent snapshot (SQLite backup)
                                /config.toml
                                /tls/cert.pem, tls/key.pem (0600)
                                /secrets/url.key (0600)
                                /manifest.json    last: appliance id, sequence number,
                                                  time, clean stop or not, and every
                                                  file's size and BLAKE3 hash
    cairn-home/.partial-...                       a copy being written (never read)

A copy is written under a temporary name, fsync'd, and renamed into place; the manifest's
hashes let `recover` skip a copy a failing disk damaged. The two newest copies are kept
on each disk. A copy is made at start, then whenever the database (PRAGMA data_version)
or one of the files changed, at most every `home_copy_interval_s` (and never more often
than 4x the last copy's duration, so a big database costs at most a fifth of a disk's
time), and once more at a clean stop. So a crash together with the loss of the home loses
at most the last interval's changes, which the devices then send again (the epoch,
appliance/meta/epoch.py); a clean stop loses nothing.

The disks are the appliance's own, so the copies are not encrypted; file modes are kept
(folders 0700, keys and database 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import blake3

from appliance.config import CONFIG_NAME, ApplianceConfig
from appliance.storage.disk import Disk

log = logging.getLogger(__name__)

COPIES_DIR = "cairn-home"
COPY_PREFIX = "copy-"
PARTIAL_PREFIX = ".partial-"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
KEEP_COPIES = 2
DATABASE_NAME = "appliance.db"
CERTIFICATE_NAME = "tls/cert.pem"
KEY_NAME = "tls/key.pem"
SECRETS_DIR = "secrets"
SLOWDOWN = 4.0          # wait at least this many times the last copy's duration
CHUNK = 1 << 20


@dataclass(frozen=True)
class CopyResult:
    sequence: int
    disks: list[str]
    seconds: float
    database_bytes: int


def copy_order(appliance_id: str, names: list[str]) -> list[str]:
    """The disks in the order copies go to them: fixed for an appliance, different between
    appliances (a hash of id and name), so that copies do not all favour disk0."""
    return sorted(names, key=lambda name: hashlib.sha256(
        f"{appliance_id}/{name}".encode()).digest())


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def copy_file(source: Path, target: Path, mode: int) -> None:
    """SOURCE to a new file TARGET of MODE (never an existing one), streamed and fsync'd."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with open(source, "rb") as reader:
            while chunk := reader.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def copies_on(disk_root: Path) -> Iterator[tuple[int, Path]]:
    """(sequence, folder) of every complete copy on a disk, newest first."""
    folder = disk_root / COPIES_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return
    found = []
    for name in names:
        if name.startswith(COPY_PREFIX) and name[len(COPY_PREFIX):].isdigit():
            found.append((int(name[len(COPY_PREFIX):]), folder / name))
    yield from sorted(found, reverse=True)


def read_manifest(copy: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((copy / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_copy(copy: Path) -> str | None:
    """None if every file the manifest lists is there with its size and hash; else why not."""
    manifest = read_manifest(copy)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return "no readable manifest"
    files = manifest.get("files")
    if not isinstance(files, dict) or DATABASE_NAME not in files or CONFIG_NAME not in files:
        return "manifest lists no database or config"
    for name, entry in files.items():
        path = copy / name
        try:
            if path.stat().st_size != entry["size"] or _hash_file(path) != entry["blake3"]:
                return f"{name} does not match the manifest"
        except (OSError, KeyError, TypeError):
            return f"{name} is missing or unreadable"
    return None


class HomeCopier:
    """Makes the copies; `copy_if_changed` and `copy_now` block (run them in a thread).
    One copy at a time: the periodic copy's thread is abandoned, not stopped, when the
    server stops, and the last copy then waits for it (two at once shared the database
    connection and SQLite refused the second backup on every disk: a clean stop right
    after a periodic copy began left no copy of its own)."""

    def __init__(self, config: ApplianceConfig, disks: list[Disk]) -> None:
        self.config = config
        by_name = {disk.name: disk for disk in disks}
        self.disks = [by_name[name] for name in copy_order(config.appliance_id, list(by_name))]
        self.wanted = config.store.parity_shards + 1
        self._watch = apsw.Connection(str(config.database), flags=apsw.SQLITE_OPEN_READONLY)
        self._watch.setbusytimeout(10_000)
        self._seen: tuple[object, ...] | None = None
        self.sequence = max((seq for disk in self.disks for seq, _ in copies_on(disk.root)),
                            default=0)
        self.last: CopyResult | None = None
        self._one_at_a_time = threading.RLock()

    def close(self) -> None:
        with self._one_at_a_time:
            self._watch.close()

    def delay(self) -> float:
        """Seconds to wait before looking for changes again."""
        last = self.last.seconds if self.last is not None else 0.0
        return max(self.config.home_copy_interval_s, SLOWDOWN * last)

    def _sources(self) -> dict[str, tuple[Path, int]]:
        """The home's files besides the database: name in the copy -> (path, mode)."""
        config = self.config
        files = {CONFIG_NAME: (config.config_path, 0o600),
                 CERTIFICATE_NAME: (config.tls_certificate, 0o644),
                 KEY_NAME: (config.tls_key, 0o600)}
        secrets_dir = config.home / SECRETS_DIR
        with contextlib.suppress(OSError):
            for entry in sorted(secrets_dir.iterdir()):
                if entry.is_file() and not entry.name.endswith(".tmp"):
                    files[f"{SECRETS_DIR}/{entry.name}"] = (entry, 0o600)
        return files

    def _state(self) -> tuple[object, ...]:
        version = self._watch.execute("PRAGMA data_version").fetchone()
        stats = []
        for name, (path, _) in sorted(self._sources().items()):
            try:
                st = path.stat()
                stats.append((name, st.st_mtime_ns, st.st_size))
            except OSError:
                stats.append((name, 0, 0))
        return (version, tuple(stats))

    def copy_if_changed(self) -> CopyResult | None:
        with self._one_at_a_time:
            state = self._state()
            if state == self._seen:
                return None
            result = self.copy_now(clean=False)
            self._seen = state
            return result

    def copy_now(self, clean: bool) -> CopyResult | None:
        """Write a new copy to m+1 writable disks (fewer if fewer are writable: logged);
        None if no disk took it."""
        with self._one_at_a_time:
            return self._copy_now(clean)

    def _copy_now(self, clean: bool) -> CopyResult | None:
        started = time.monotonic()
        state = self._state()
        self.sequence += 1
        targets = [disk for disk in self.disks if disk.writable]
        written: list[str] = []
        first: Path | None = None
        manifest: dict[str, Any] = {}
        for disk in targets:
            if len(written) >= self.wanted:
                break
            try:
                if first is None:
                    first, manifest = self._write_first(disk.root, clean)
                else:
                    self._write_from(first, disk.root, manifest)
            except (OSError, apsw.Error) as exc:
                log.warning("home copy on %s failed: %s", disk.name, exc)
                continue
            written.append(disk.name)
            self._prune(disk.root)
        self._seen = state
        if not written:
            log.error("no disk took a copy of the home: %d writable of %d", len(targets),
                      len(self.disks))
            return None
        if len(written) < self.wanted:
            log.warning("the home is copied to %d disks, not %d: too few writable disks",
                        len(written), self.wanted)
        result = CopyResult(self.sequence, written, time.monotonic() - started,
                            int(manifest["files"][DATABASE_NAME]["size"]))
        self.last = result
        return result

    def _partial(self, disk_root: Path) -> Path:
        folder = disk_root / COPIES_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        partial = folder / f"{PARTIAL_PREFIX}{self.sequence}-{secrets.token_hex(4)}"
        partial.mkdir(mode=0o700)
        return partial

    def _write_first(self, disk_root: Path, clean: bool) -> tuple[Path, dict[str, Any]]:
        partial = self._partial(disk_root)
        try:
            database = partial / DATABASE_NAME
            self._backup_database(database)
            files = {DATABASE_NAME: database}
            for name, (source, mode) in self._sources().items():
                copy_file(source, partial / name, mode)
                files[name] = partial / name
            manifest = {
                "format": MANIFEST_FORMAT, "appliance_id": self.config.appliance_id,
                "sequence": self.sequence, "written_at": time.time(), "clean_stop": clean,
                "files": {name: {"size": path.stat().st_size, "blake3": _hash_file(path),
                                 "mode": path.stat().st_mode & 0o777}
                          for name, path in files.items()},
            }
            return self._publish(partial, manifest), manifest
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def _write_from(self, first: Path, disk_root: Path, manifest: dict[str, Any]) -> None:
        partial = self._partial(disk_root)
        try:
            for name, entry in manifest["files"].items():
                copy_file(first / name, partial / name, int(entry["mode"]))
            self._publish(partial, manifest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def _backup_database(self, target: Path) -> None:
        """A consistent snapshot of the live database (WAL: writers go on meanwhile)."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        destination = apsw.Connection(str(target))
        try:
            with destination.backup("main", self._watch, "main") as backup:
                backup.step(-1)
            destination.execute("PRAGMA journal_mode=DELETE")
        finally:
            destination.close()
        _fsync_path(target)

    @staticmethod
    def _publish(partial: Path, manifest: dict[str, Any]) -> Path:
        path = partial / MANIFEST_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(manifest, indent=2).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        for folder in {p.parent for p in partial.rglob("*") if p.is_file()}:
            _fsync_path(folder, directory=True)
        final = partial.parent / f"{COPY_PREFIX}{manifest['sequence']:012d}"
        os.rename(partial, final)
        _fsync_path(partial.parent, directory=True)
        return final

    @staticmethod
    def _prune(disk_root: Path) -> None:
        """Keep the KEEP_COPIES newest copies; drop older ones, and partial copies (only
        this process writes copies, one at a time: any other partial one is a crash's)."""
        for _, old in list(copies_on(disk_root))[KEEP_COPIES:]:
            shutil.rmtree(old, ignore_errors=True)
        folder = disk_root / COPIES_DIR
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                if entry.name.startswith(PARTIAL_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True)
