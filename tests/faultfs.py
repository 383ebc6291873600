"""faultfs: a pass-through FUSE file system that breaks on command, for disk fault tests.

    python tests/faultfs.py BACKING MOUNTPOINT --control SOCKET

mirrors the folder BACKING at MOUNTPOINT (pyfuse3 on trio) until unmounted or SIGTERM, and
takes orders on the unix socket SOCKET: one JSON line in, one JSON line out. A request
`{"faults": [...]}` replaces the faults in force (`[]` clears them); every answer carries
the counts of operations seen and faults injected so far. `FaultyDisk`, at the end of this
file, is the test side: it starts the process, sets faults, reads the counts, and always
unmounts (`fusermount3 -u`, then lazily).

A fault (`Fault`) has a kind, the operations it hits and a glob on the path relative to
the root ("shards/*", "small-shards.sqlite*", "*"):
    eio      the operation fails with EIO;
    short    a read returns the first half of what it read (never at end of file);
    hang     the operation waits SECONDS first (or until the faults change), then goes
             on (or fails, with `fail`);
    flip     one byte of the data read is inverted;
    vanish   every operation, lookups and statfs included, fails with `errno` (ENOTCONN as
             a dead FUSE daemon, EIO or ENOENT as a pulled disk) until cleared.
Operations: "read" is read; "write" is write and every change to the tree (create, mkdir,
rename, link, unlink, rmdir, truncate); "fsync" is fsync and fsyncdir. `rate` is the share
of matching operations hit (1.0: all). `FaultyDisk.pull` kills the process instead, which is
what a crashed FUSE daemon looks like (ENOTCONN everywhere), and `plug` mounts it again.

What the store needs, and how it gets it: the kernel caches nothing (entry and attribute
timeouts 0, files opened with direct_io), so every lookup, read and write reaches the
faults; O_DIRECT opens are taken (the backing file is opened without it); SQLite's `-shm`
file, which SQLite maps shared and writable, is the one file opened through the page cache
(a direct_io file cannot be mapped shared) and kept cached across opens, so every process
sees one copy of it. Short reads and flips leave that file alone: it is memory SQLite
shares between processes, not data read back from a disk, and a short read of a page-cache
file is taken by the kernel for its end (the mapping process dies of SIGBUS). POSIX
locks are the kernel's own (faultfs implements none), which is right for processes on one
machine. Renaming a folder is not supported (the store never does): paths under it would
go stale.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

KINDS = ("eio", "short", "hang", "flip", "vanish")
READ, WRITE, FSYNC, META = "read", "write", "fsync", "meta"


@dataclass(frozen=True)
class Fault:
    kind: str
    ops: tuple[str, ...] = (READ, WRITE, FSYNC)
    pattern: str = "*"
    rate: float = 1.0
    seconds: float = 0.0      # hang: how long
    fail: bool = False        # hang: then EIO
    errno: int = errno.ENOTCONN   # vanish: what every operation fails with

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def hits(self, op: str, path: str, rng: random.Random) -> bool:
        if self.kind != "vanish" and op not in self.ops:
            return False
        return fnmatch.fnmatchcase(path, self.pattern) and rng.random() < self.rate


@dataclass
class Faults:
    """The faults in force and what they did: the pure part, driven by the handlers."""

    active: list[Fault] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    changed: trio.Event = field(default_factory=trio.Event)   # set when faults are replaced

    def replace(self, faults: list[Fault]) -> None:
        self.active = faults
        self.changed.set()
        self.changed = trio.Event()

    def matching(self, op: str, path: str) -> list[Fault]:
        self.counts[op] += 1
        return [f for f in self.active if f.hits(op, path, self.rng)]

    def flip(self, data: bytes) -> bytes:
        if not data:
            return data
        at = self.rng.randrange(len(data))
        self.counts["flip"] += 1
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _shared_map(rel: str) -> bool:
    """SQLite's -shm file: opened through the page cache (see the module doc)."""
    return rel.endswith("-shm")


class FaultFs(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, backing: Path, faults: Faults) -> None:
        super().__init__()
        self.backing = str(backing)
        self.faults = faults
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}   # inode -> relative path
        self._open: dict[int, tuple[int, str]] = {}              # fh (backing fd) -> ino, path

    # --- the faults ----------------------------------------------------------------------

    async def _gate(self, op: str, path: str) -> list[Fault]:
        """Apply the faults that hit OP on PATH before it runs; the ones left for after
        (short, flip)."""
        after = []
        for fault in self.faults.matching(op, path):
            if fault.kind in ("short", "flip"):   # counted when they change data
                after.append(fault)
                continue
            self.faults.counts[fault.kind] += 1
            if fault.kind == "vanish":
                raise _fail(fault.errno)
            if fault.kind == "hang":
                with trio.move_on_after(fault.seconds):
                    await self.faults.changed.wait()   # clearing a hang ends it at once
                if fault.fail:
                    raise _fail(errno.EIO)
            else:
                raise _fail(errno.EIO)
        return after

    # --- paths and attributes ------------------------------------------------------------

    def _rel(self, ino: int) -> str:
        try:
            return self._paths[ino]
        except KeyError:
            raise _fail(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        base = self._rel(parent)
        return os.fsdecode(name) if not base else f"{base}/{os.fsdecode(name)}"

    def _real(self, rel: str) -> str:
        return os.path.join(self.backing, rel) if rel else self.backing

    def _attrs(self, rel: str, fd: int | None = None) -> pyfuse3.EntryAttributes:
        try:
            st = os.fstat(fd) if fd is not None else os.lstat(self._real(rel))
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None
        ino = pyfuse3.ROOT_INODE if not rel else st.st_ino
        self._paths[ino] = rel
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(ino)
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks"):
            setattr(attr, name, getattr(st, name))
        attr.entry_timeout = attr.attr_timeout = 0
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        await self._gate(META, rel)
        return self._attrs(rel)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        rel = self._rel(inode)
        await self._gate(META, rel)
        try:
            return self._attrs(rel)
        except pyfuse3.FUSEError:   # unlinked while open: the open file's own attributes
            for fh, (ino, _) in self._open.items():
                if ino == inode:
                    return self._attrs(rel, fh)
            raise

    async def forget(self, inode_list: Any) -> None:
        return None   # paths are re-learnt at every lookup (nothing is cached)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        await self._gate(META, "")
        fs = os.statvfs(self.backing)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(fs, name))
        return data

    async def opendir(self, inode: int, ctx: Any) -> pyfuse3.FileHandleT:
        await self._gate(META, self._rel(inode))
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        rel = self._rel(fh)
        await self._gate(META, rel)
        try:
            names = sorted(os.listdir(self._real(rel)))
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None
        for index in range(start_id, len(names)):
            child = f"{rel}/{names[index]}" if rel else names[index]
            try:
                attrs = self._attrs(child)
            except pyfuse3.FUSEError:
                continue   # gone since the listing
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attrs, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        rel = self._rel(fh)
        await self._gate(FSYNC, rel)
        await self._os(self._fsync_path, self._real(rel))

    @staticmethod
    def _fsync_path(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    async def _os(fn: Any, *args: Any) -> Any:
        """A blocking call in a thread (fsync can take a while: other requests go on)."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None

    # --- changes to the tree -------------------------------------------------------------

    async def _change(self, rel: str, fn: Any, *args: Any) -> None:
        await self._gate(WRITE, rel)
        try:
            fn(*args)
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        await self._change(rel, os.mkdir, self._real(rel), mode & ~ctx.umask)
        return self._attrs(rel)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        rel = self._child(parent_inode, name)
        await self._change(rel, os.unlink, self._real(rel))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        rel = self._child(parent_inode, name)
        await self._change(rel, os.rmdir, self._real(rel))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags:
            raise _fail(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new,
                                                                        name_new)
        await self._change(new, os.rename, self._real(old), self._real(new))
        self._attrs(new)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        rel = self._child(new_parent_inode, new_name)
        await self._change(rel, os.link, self._real(self._rel(inode)), self._real(rel))
        return self._attrs(rel)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        rel = self._rel(inode)
        target: int | str = fh if fh is not None else self._real(rel)
        if fields.update_size:
            await self._change(rel, os.truncate, target, attr.st_size)
        if fields.update_mode:
            await self._change(rel, os.chmod, target, stat.S_IMODE(attr.st_mode))
        if fields.update_mtime or fields.update_atime:
            now = os.stat(target)
            times = (attr.st_atime_ns if fields.update_atime else now.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns)
            await self._change(rel, lambda: os.utime(target, ns=times))
        return self._attrs(rel, fh)

    # --- files ---------------------------------------------------------------------------

    def _info(self, fd: int, ino: int, rel: str) -> pyfuse3.FileInfo:
        self._open[fd] = (ino, rel)
        shared = _shared_map(rel)   # SQLite maps it: page cache, kept across opens
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fd), direct_io=not shared,
                                keep_cache=shared)

    @staticmethod
    def _flags(flags: int) -> int:
        return flags & ~(os.O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_EXCL)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        rel = self._rel(inode)
        await self._gate(META, rel)
        try:
            fd = os.open(self._real(rel), self._flags(flags))
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None
        return self._info(fd, inode, rel)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        rel = self._child(parent_inode, name)
        await self._gate(WRITE, rel)
        try:
            fd = os.open(self._real(rel), self._flags(flags) | os.O_CREAT | os.O_EXCL,
                         mode & ~ctx.umask)
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None
        attrs = self._attrs(rel, fd)
        return self._info(fd, attrs.st_ino, rel), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        rel = self._open[fh][1]
        after = await self._gate(READ, rel)
        data = os.pread(fh, size, off)
        if _shared_map(rel):
            return data   # memory shared between processes, not data read from the disk
        for fault in after:
            if fault.kind == "short" and len(data) > 1:
                data = data[: len(data) // 2]
                self.faults.counts["short"] += 1
            elif fault.kind == "flip":
                data = self.faults.flip(data)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await self._gate(WRITE, self._open[fh][1])
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._gate(FSYNC, self._open[fh][1])
        await self._os(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)
        os.close(fh)


# --- the process ---------------------------------------------------------------------------

async def _control(listener: trio.SocketListener, faults: Faults) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            request = json.loads(data)
            if "faults" in request:
                faults.replace([Fault(**{**f, "ops": tuple(f["ops"])})
                                for f in request["faults"]])
            await stream.send_all(json.dumps({"counts": faults.counts}).encode() + b"\n")

    await trio.serve_listeners(serve, [listener])


async def _serve(backing: Path, mountpoint: Path, control: Path) -> None:
    faults = Faults()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(control))
    sock.listen()
    pyfuse3.init(FaultFs(backing, faults), str(mountpoint),
                 {"fsname=faultfs", "subtype=faultfs"})
    try:
        print("faultfs: mounted", flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_control, trio.SocketListener(sock), faults)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                nursery.start_soon(_stop_on, signals)
                await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=_mounted(mountpoint))   # not if fusermount3 -u did it


async def _stop_on(signals: Any) -> None:
    async for _ in signals:
        pyfuse3.terminate()
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", type=Path, required=True)
    args = parser.parse_args()
    with contextlib.suppress(FileNotFoundError):
        args.control.unlink()
    trio.run(_serve, args.backing.resolve(), args.mountpoint.resolve(), args.control)


# --- the test side -------------------------------------------------------------------------

def _fusermount(*args: str | Path) -> bool:
    return subprocess.run(["fusermount3", *map(str, args)], capture_output=True,
                          check=False).returncode == 0


def _mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == target for line in mounts)


class FaultyDisk:
    """A faultfs mount of BACKING at MOUNTPOINT, run as a child process (use as a context
    manager, or call `stop` in a fixture: it always unmounts)."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing, self.mountpoint = backing, mountpoint
        self.control = mountpoint.parent / f".{mountpoint.name}.control"
        self.injected: Counter[str] = Counter()   # faults of earlier runs (before a pull)
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> FaultyDisk:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> FaultyDisk:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(self.backing), str(self.mountpoint),
             "--control", str(self.control)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()   # the child prints it, or dies (EOF)
        deadline = time.monotonic() + timeout
        while not (line and _mounted(self.mountpoint)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _mounted(self.mountpoint):
            self.stop()
            raise RuntimeError(f"faultfs did not mount {self.mountpoint}: {line!r}")
        return self

    def request(self, body: dict[str, Any]) -> Counter[str]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.control))
            sock.sendall(json.dumps(body).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("faultfs closed the control connection")
                data += chunk
        return Counter(json.loads(data)["counts"])

    def set(self, *faults: Fault) -> None:
        self.request({"faults": [asdict(f) for f in faults]})

    def clear(self) -> None:
        self.set()

    def counts(self) -> Counter[str]:
        """Operations seen and faults injected, this run and earlier ones."""
        live = self.request({}) if self.alive else Counter()
        return live + self.injected

    @contextlib.contextmanager
    def fault(self, *faults: Fault) -> Iterator[None]:
        self.set(*faults)
        try:
            yield
        finally:
            self.clear()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pull(self) -> None:
        """Kill the file system process (kill -9): every access then fails with ENOTCONN,
        as for a crashed daemon, until `plug`."""
        if self.alive:
            self.injected += self.request({})
            self.injected["pulled"] += 1
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def plug(self) -> None:
        """Mount again after `pull`."""
        _fusermount("-u", "-z", self.mountpoint)
        self.start()

    def stop(self) -> None:
        """Unmount (lazily if busy) and end the process, whatever state it is in."""
        if _mounted(self.mountpoint) and not _fusermount("-u", self.mountpoint):
            _fusermount("-u", "-z", self.mountpoint)
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            if self.process.stdout is not None:
                self.process.stdout.close()


if __name__ == "__main__":
    main()
