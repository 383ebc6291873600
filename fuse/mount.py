"""`cairn mount`: everything the drive runs, in one trio process, until unmounted.

1. Check the mount point (missing, not a folder, not empty: one line; a stale mount of a
   crashed drive is cleared, with a message), take `HOME/drive/lock` (one drive per home).
2. Open the index, the block cache and the staging area; reconcile them (a crash may
   leave a staged file without its row, or a row whose file grew after its last record).
3. The first mount lists the user's tree (this needs the appliance); later mounts start
   from the index at once, offline or not, and catch up from the changes feed.
4. Mount, and run beside the FUSE loop: the follower (event stream, polling), the puller
   (the feed into the mirror, invalidating the kernel's caches), the uploader, the pinner
   and the status file.
5. Unmounted (`cairn umount`, `fusermount3 -u`), or SIGTERM / SIGINT (which unmount
   first): the pending changes are uploaded, a line per file on stderr, when the
   appliance answers; otherwise they stay staged for the next mount. A second signal
   exits at once (everything is staged: nothing is lost).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from agent.blockcache import BlockCache
from agent.client import Connection, RetryPolicy
from agent.crypto.keys import UserKeys
from agent.errors import CairnAgentError, TransportError, UsageError
from agent.home import AgentHome, DeviceRecord
from agent.peers.service import peers_if_wanted
from agent.peers.sources import CacheBlocks
from agent.remote import RemoteTree
from agent.sync.follow import Follower
from agent.sync.mirror import Mirror
from fuse.blocks import BlockSource
from fuse.fs import DriveFs
from fuse.index import DB_FILE, DriveIndex
from fuse.kernel import Invalidator
from fuse.mountpoint import prepare
from fuse.pins import Pinner
from fuse.rollback import resender
from fuse.shared import SharedTree
from fuse.staging import Staging
from fuse.status import DriveStatus, Upload, clear_status, write_status
from fuse.uploader import Uploader

log = logging.getLogger("cairn.drive")

DEFAULT_CACHE_SIZE = 4 * 1024 ** 3
MIN_CACHE_SIZE = 8 * 1024 ** 2
READ_AHEAD_KB = 4096
FUSE_TASKS = 16
FLUSH_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class MountOptions:
    mountpoint: Path
    cache_size: int = DEFAULT_CACHE_SIZE
    peers: bool = True           # serve the cache to this user's LAN peers (--no-peers)


def drive_folder(home: AgentHome) -> Path:
    return home.path / "drive"


@contextlib.contextmanager
def _drive_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError("this device's drive is mounted already (one `cairn mount` per "
                         "home); see `cairn status`") from None
    try:
        yield
    finally:
        os.close(fd)


def _reconcile(index: DriveIndex, staging: Staging) -> None:
    """Staging and pending rows agree again after a crash: a staged file without a row
    (killed between the two) goes; a row's size follows its file (written after the
    last record)."""
    staged = set(index.staged_ids())
    for node_id in staging.known() - staged:
        staging.remove(node_id)
    with index.transaction():
        for node_id in staged:
            if not staging.has(node_id):
                os.close(staging.open(node_id))          # lost before any write: empty
            change = index.pending(node_id)
            if change is not None and change.size != staging.size(node_id):
                index.set_size(node_id, staging.size(node_id),
                               os.stat(staging.path(node_id)).st_mtime_ns)


def _tune_read_ahead(mountpoint: Path) -> None:
    """A bigger read-ahead for the drive's backing device (root only; pyfuse3 does not
    expose the INIT parameters, so the bdi's sysfs knob is the way). The device number
    comes from /proc/self/mountinfo: a stat of the mount point would wait on this very
    process's FUSE loop."""
    device = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if fields[4].replace("\\040", " ") == str(mountpoint):
                    device = fields[2]
    except OSError:
        return
    if device is None:
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.debug("read-ahead left as it is: %s", exc)


async def run_mount(home: AgentHome, options: MountOptions) -> int:
    """Mount and serve until unmounted; the number of changes left staged."""
    mountpoint = options.mountpoint.absolute()
    folder = drive_folder(home)
    device = home.load_device()
    keys = home.load_keys()
    with _drive_lock(folder):
        message = prepare(mountpoint)
        if message is not None:
            print(f"cairn: {message}", file=sys.stderr, flush=True)
        index = DriveIndex(folder / DB_FILE, device.device_name)
        try:
            cache = BlockCache(folder / "cache", options.cache_size)
            try:
                staging = Staging(folder / "staging", cache)
                _reconcile(index, staging)
                return await _serve(home, device, keys, index, cache, staging, mountpoint,
                                    folder, peers=options.peers)
            finally:
                cache.close()
        finally:
            index.close()
            clear_status(folder)


async def _serve(home: AgentHome, device: DeviceRecord, keys: UserKeys, index: DriveIndex,
                 cache: BlockCache, staging: Staging, mountpoint: Path, folder: Path, *,
                 peers: bool = True) -> int:
    async with Connection(home, device) as connection, \
            Connection(home, device, retry=RetryPolicy(attempts=2, first_delay_s=0.1,
                                                       max_delay_s=0.2)) as reads:
        tree = RemoteTree(connection, keys, home)
        record = index.folder()
        if record is None:
            try:
                me = await tree.api.me()
            except TransportError as exc:
                raise TransportError(f"the first mount needs the appliance: {exc.message}"
                                     ) from None
            if me.root_id is None:
                raise UsageError("this user has no root folder yet: run `cairn unlock`")
            record = index.start(me.root_id)
        mirror = Mirror(tree, index.sync_db, record)
        if not mirror.listed:
            log.info("listing your files for the first mount")
            await mirror.list_all()
        blocks = BlockSource(cache, reads, RemoteTree(reads, keys, home).api)
        pinner = Pinner(index, cache, blocks)
        fs: DriveFs
        uploader = Uploader(index, tree, mirror, staging, cache, device.device_name,
                            busy=lambda node_id: bool(fs.writers.get(node_id)),
                            write_generation=lambda node_id: fs.writes[node_id])
        fs = DriveFs(index, record.remote_root, blocks, cache, staging,
                     wake_uploads=uploader.wake, transfers=lambda: uploader.transfers,
                     pins_changed=pinner.wake)
        invalidator = Invalidator(fs)
        mirror.on_change = invalidator.note
        mirror.on_rollback = resender(index, staging, cache, record.remote_root, record.id,
                                      device.device_name, uploader.wake)
        shared = SharedTree(tree, index, record.remote_root, invalidator.note)
        index.forget_folders()
        pull_wanted = trio.Event()

        def wake_pull() -> None:
            pull_wanted.set()

        follower = Follower(tree, mirror, wake_pull, lambda: uploader.uploaded)

        async def puller() -> None:
            nonlocal pull_wanted
            shares_seen = -1             # list what is shared at the start, then on changes
            while True:
                await pull_wanted.wait()
                pull_wanted = trio.Event()
                try:
                    # refresh: the feed, and whether the appliance still has the history
                    # the mirror belongs to (if it was recovered from an older copy, the
                    # tree is listed again and the kernel told what changed: no ghosts)
                    if (follower.must_pull(mirror.cursor) or mirror.check_next) \
                            and await mirror.refresh():
                        pinner.wake()
                    if mirror.foreign_changes != shares_seen:
                        shares_seen = mirror.foreign_changes
                        if await shared.refresh():
                            pinner.wake()
                except CairnAgentError as exc:
                    log.info("cannot pull changes: %s", exc.message)
                    shares_seen = -1

        async def status_writer() -> None:
            while True:
                write_status(folder, _status(mountpoint, index, uploader, cache, staging))
                await trio.sleep(1.0)

        pyfuse3.init(fs, str(mountpoint), {*pyfuse3.default_options, "fsname=cairn",
                                           "subtype=cairn", "noatime"})
        mounted = True
        # The kernel sets the read-ahead when it gets the answer to INIT, which goes out
        # after `init` is called: tune it a moment later.
        async def tune_later() -> None:
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(_tune_read_ahead, mountpoint)

        fs.on_init = lambda: fs.nursery.start_soon(tune_later) if fs.nursery else None
        try:
            print(f"cairn: drive mounted at {mountpoint} (stop with `cairn umount "
                  f"{mountpoint}` or Ctrl-C)", file=sys.stderr, flush=True)
            async with trio.open_nursery() as nursery:
                fs.nursery = nursery
                for task in (follower.run, puller, uploader.run, invalidator.run,
                             pinner.run, status_writer):
                    nursery.start_soon(task)
                nursery.start_soon(_on_signals, nursery.cancel_scope)
                # LAN peers: the cache served to this user's other devices, started in
                # the background (a drive works offline and must not wait for the
                # certificate; peers never fail the mount). Stopped, shielded, when the
                # nursery is cancelled at the unmount, before the cache is closed.
                async def serve_peers() -> None:
                    async with peers_if_wanted(home, tree.api, CacheBlocks(cache),
                                               wanted=peers):
                        await trio.sleep_forever()

                nursery.start_soon(serve_peers)
                pull_wanted.set()
                await pyfuse3.main(min_tasks=2, max_tasks=FUSE_TASKS)
                nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=True)
            mounted = False
        finally:
            if mounted:
                pyfuse3.close(unmount=True)
        return await _flush(uploader, index)


async def _on_signals(scope: trio.CancelScope) -> None:
    """The first SIGTERM/SIGINT ends the FUSE loop (the mount is then detached and the
    pending uploads finish); a second exits at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        stopping = False
        async for signum in signals:
            if stopping:
                os.write(2, f"cairn: {signal.Signals(signum).name} again: stopping at once; "
                         "unsent changes stay staged for the next mount\n".encode())
                os._exit(128 + signum)
            stopping = True
            print(f"cairn: {signal.Signals(signum).name}: unmounting", file=sys.stderr,
                  flush=True)
            pyfuse3.terminate()


async def _flush(uploader: Uploader, index: DriveIndex) -> int:
    """Upload what is pending before the mount exits; what is left. Says "all changes
    uploaded" whenever nothing is left, also when nothing was pending at all: a stop must
    not read differently because the uploads happened to finish a moment before it."""
    left = index.pending_count()
    if not left:
        print("cairn: all changes uploaded", file=sys.stderr, flush=True)
        return 0
    print(f"cairn: uploading {left} pending change(s) before exiting", file=sys.stderr,
          flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals, \
            trio.move_on_after(FLUSH_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            async def exit_on_signal() -> None:
                async for signum in signals:
                    os.write(2, b"cairn: stopping at once; unsent changes stay staged for "
                                b"the next mount\n")
                    os._exit(128 + signum)

            nursery.start_soon(exit_on_signal)
            try:
                left = await uploader.flush()
            except TransportError as exc:
                print(f"cairn: the appliance is unreachable ({exc.message}); {left} "
                      "change(s) stay staged and are uploaded at the next mount",
                      file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()
    left = index.pending_count()
    if left:
        print(f"cairn: {left} change(s) stay staged for the next mount", file=sys.stderr,
              flush=True)
    else:
        print("cairn: all changes uploaded", file=sys.stderr, flush=True)
    return left


def _status(mountpoint: Path, index: DriveIndex, uploader: Uploader, cache: BlockCache,
            staging: Staging) -> DriveStatus:
    pending, conflicts, queued = index.pending_summary(20)
    return DriveStatus(
        mountpoint=str(mountpoint), pid=os.getpid(), online=uploader.online,
        pending=pending, conflicts=conflicts,
        uploads=[Upload(t.name, t.done, t.total) for t in uploader.transfers.values()],
        queued=queued, cache_used=cache.used_bytes,
        cache_pinned=cache.pinned_bytes(), staged=staging.staged_bytes,
        cache_budget=cache.budget, written_at=time.time())


def parse_size(text: str) -> int:
    """`4G`, `512M`, `100k`, `1073741824` -> bytes (binary units)."""
    units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in units:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise UsageError(f"not a size: {text!r} (try 4G, 512M)") from None
    if value < MIN_CACHE_SIZE:
        raise UsageError(f"cache size {text} is too small: at least 8M (two blocks)")
    return value
