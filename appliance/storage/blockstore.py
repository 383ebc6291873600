"""The block store: content-addressed blocks, erasure-coded over N local disks.

Theory of operation
-------------------
A block is named by the BLAKE3 hash of its bytes (64 hex digits). `put` checks the hash,
then encodes the block:

- blocks larger than `small_block_limit` (default 64 KiB): Reed-Solomon, k data + m parity
  shards (defaults 4 + 2), any k of which rebuild the block;
- smaller blocks: m+1 whole replicas, the same tolerance (any m lost), each a row of its
  disk's pack database rather than a file (pack.py): many puts share one commit, where a new
  durable file per replica capped small puts near the filesystem's file-creation rate
  (docs/architecture.md has the measurements).

Shards go to distinct disks in the block's rendezvous ranking (placement.py), skipping disks
that do not accept writes. The shard files of a large put are written at the same time (each
crash-safe on its own, see disk.py), so a put waits for one shard write, not k+m in a row; a
small put queues its replicas in every pack before waiting on any commit. A put succeeds once
at least k+1 shards (2 replicas) are durable; if fewer than all were written, the block is
queued for repair.

Every operation (get, put, put_many, has, delete, repair) runs in a worker thread that
the caller waits on with a deadline per disk call, so a disk that stops answering is
skipped, never waited on for longer than DISK_TIMEOUT_S (deadline.py).

`get` reads the headers of the block's shards on every readable disk, then takes the fast
path — read k shards, the data shards when they are there, decode (a concatenation of the
data shards for systematic RS), check the BLAKE3 id — and falls back to the careful path only
when that fails: read every shard, verify each checksum, decode from any k healthy ones,
check the id again. A block is never returned unverified. Missing, truncated, corrupt or
disagreeing shards are queued for repair; `repair` (used by the queue and by scrub) rebuilds
them onto writable disks.

Everything here is blocking I/O and CPU work, safe to call from many threads at once;
async_store.py runs it off the trio event loop.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import blake3

from appliance.errors import (
    BlockIdMismatchError,
    BlockNotFoundError,
    BlockUnrecoverableError,
    CairnApplianceError,
    DiskError,
    InsufficientDisksError,
    InvalidBlockIdError,
    ShardFormatError,
    StorageError,
)
from appliance.storage import allocator
from appliance.storage.codec import Codec, ErasureCodec, ReplicaCodec
from appliance.storage.deadline import DiskTimeout, Operations
from appliance.storage.disk import READABLE_STATES, Disk, DiskState, DiskStatus, format_disk
from appliance.storage.placement import Slot, rank
from appliance.storage.repair_queue import RepairQueue
from appliance.storage.settings import StoreSettings
from appliance.storage.shard_format import (
    HEADER_SIZE,
    Scheme,
    ShardHeader,
    parse_header,
    parse_shard,
    serialize_header,
)
from protocol.ids import is_block_id

log = logging.getLogger(__name__)
T = TypeVar("T")
RECENTLY_QUEUED_MAX = 4096
SHARD_WRITERS = 32  # threads writing the shards of concurrent puts (mostly waiting on fsync)

_writers: ThreadPoolExecutor | None = None
_writers_lock = threading.Lock()
_operations = Operations()   # the workers every store's operations run in (deadline.py)


def _shard_writers() -> ThreadPoolExecutor:
    """One pool for the whole process, started on first use: stores come and go (tests,
    `cairnd scrub` beside the server), threads should not multiply with them."""
    global _writers
    with _writers_lock:
        if _writers is None:
            _writers = ThreadPoolExecutor(SHARD_WRITERS, thread_name_prefix="cairn-shard")
        return _writers


def _all_at_once(steps: list[Callable[[], T]]) -> list[T | DiskError]:
    """Run STEPS at the same time (the first in this thread, the rest in the shard
    writers' pool) and wait for all of them, even when one fails (never leave a write
    behind a put); each one's result, or the DiskError it raised."""
    pool = _shard_writers()
    futures = [pool.submit(step) for step in steps[1:]]
    results: list[T | DiskError] = []
    try:
        for step in steps[:1]:
            try:
                results.append(step())
            except DiskError as exc:
                results.append(exc)
    finally:
        wait(futures)
    for future in futures:
        try:
            results.append(future.result())
        except DiskError as exc:
            results.append(exc)
    return results


def parse_block_id(block_id: str) -> bytes:
    """The 32 raw bytes of a hex block id; InvalidBlockIdError for anything else."""
    if not isinstance(block_id, str) or not is_block_id(block_id):
        raise InvalidBlockIdError("a block id is 64 lowercase hex digits (a BLAKE3 digest)")
    return bytes.fromhex(block_id)


def block_id_of(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


@dataclass(frozen=True)
class PutResult:
    block_id: str
    shards_written: int
    shards_total: int
    already_stored: bool = False

    @property
    def degraded(self) -> bool:
        return self.shards_written < self.shards_total


class RepairOutcome(enum.StrEnum):
    HEALTHY = "healthy"            # nothing to do
    REPAIRED = "repaired"          # every missing or bad shard rewritten
    PARTIAL = "partial"            # some rewritten; too few writable disks for the rest
    UNRECOVERABLE = "unrecoverable"  # fewer than k healthy shards
    NOT_FOUND = "not_found"        # no shard anywhere (already deleted)
    REMOVED = "removed"            # tombstoned block: leftover shards deleted


@dataclass(frozen=True)
class RepairResult:
    outcome: RepairOutcome
    bytes_read: int = 0
    shards_written: int = 0


@dataclass
class _StartedPut:
    """A put between `_start_put` and `_finish_put`: its shards (None when the block was
    stored already) and, for a small block, the pack tickets of its replicas."""

    block_id: str
    codec: Codec
    writable: list[Disk]                                  # in ranking order
    shards: list[tuple[bytes, bytes]] | None = None       # (header, payload) by index
    tickets: list[int] = field(default_factory=list)


@dataclass
class _Located:
    """Shards of one block found by reading headers on every readable disk."""

    headers: dict[str, ShardHeader] = field(default_factory=dict)   # disk name -> header
    bad: dict[str, str] = field(default_factory=dict)               # disk name -> reason
    skipped: list[str] = field(default_factory=list)  # disks not readable when looked at


class BlockStore:
    def __init__(self, settings: StoreSettings, repair_queue: RepairQueue | None = None) -> None:
        allocator.tune()  # block-sized buffers: reuse them instead of faulting pages in
        self.settings = settings
        self.repair_queue = repair_queue
        self.disks = [Disk(spec, settings.appliance_id, settings.reserve_free_bytes)
                      for spec in settings.disks]
        self._by_name = {disk.name: disk for disk in self.disks}
        self._slots = [Slot(spec.name, spec.weight) for spec in settings.disks]
        self.erasure = ErasureCodec(settings.data_shards, settings.parity_shards)
        self.replica = ReplicaCodec(settings.parity_shards)
        self._recently_queued: set[str] = set()

    def _bounded(self, operation: Callable[[], T]) -> T:
        """OPERATION run by a worker, given up and run again without a disk that stops
        answering (deadline.py)."""
        def stuck(index: int, error: DiskTimeout) -> None:
            log.warning("%s", self.disks[index].note_timeout(error))

        try:
            return _operations.run(operation, [d.calls for d in self.disks], stuck)
        except DiskTimeout as exc:
            raise StorageError(f"the store is not answering: {exc}") from None

    def close(self) -> None:
        for disk in self.disks:
            disk.close()
        if self.repair_queue is not None:
            self.repair_queue.close()

    # -- helpers -------------------------------------------------------------------------

    def codec_for_length(self, length: int) -> Codec:
        return self.replica if length <= self.settings.small_block_limit else self.erasure

    def _codec_for(self, header: ShardHeader) -> Codec:
        codec: Codec = self.replica if header.scheme is Scheme.REPLICA else self.erasure
        if (codec.k, codec.m) != (header.k, header.m):
            # Written under other settings: build a codec that matches the shards.
            codec = ReplicaCodec(header.m) if header.scheme is Scheme.REPLICA \
                else ErasureCodec(header.k, header.m)
        return codec

    def ranking(self, raw_id: bytes) -> list[Disk]:
        return [self._by_name[name] for name in rank(self._slots, raw_id)]

    def _queue(self, block_hex: str, reason: str) -> None:
        # Reads of a degraded block would queue it again and again; remember recent ones
        # (bounded) so a hot degraded block costs one database write, not one per read.
        if block_hex in self._recently_queued:
            return
        if len(self._recently_queued) >= RECENTLY_QUEUED_MAX:
            self._recently_queued.clear()
        self._recently_queued.add(block_hex)
        if self.repair_queue is not None:
            self.repair_queue.enqueue(block_hex, reason)
        log.warning("block %s queued for repair: %s", block_hex[:16], reason)

    def _locate(self, block_hex: str, raw_id: bytes) -> _Located:
        found = _Located()
        for disk in self.ranking(raw_id):
            if not disk.readable:
                found.skipped.append(disk.name)
                continue
            try:
                raw = disk.read_shard(block_hex, limit=HEADER_SIZE)
            except DiskError as exc:
                found.bad[disk.name] = str(exc)
                continue
            if raw is None:
                continue
            try:
                header, _ = parse_header(raw)
            except ShardFormatError as exc:
                found.bad[disk.name] = exc.message
                continue
            if header.block_id != raw_id:
                found.bad[disk.name] = "header names another block"
                continue
            found.headers[disk.name] = header
        # Shards must agree on how the block was coded; the majority wins.
        shapes = Counter((h.scheme, h.k, h.m, h.block_length) for h in found.headers.values())
        if len(shapes) > 1:
            majority = shapes.most_common(1)[0][0]
            for name, h in list(found.headers.items()):
                if (h.scheme, h.k, h.m, h.block_length) != majority:
                    found.bad[name] = "header disagrees with the block's other shards"
                    del found.headers[name]
        return found

    def _read_payloads(self, block_hex: str, disk_names: list[str], *,
                       verify: bool) -> tuple[dict[int, memoryview], dict[str, str]]:
        """Payloads by shard index from the named disks, plus the disks whose shard is bad.

        With verify=False only the header is parsed and the length checked: the caller checks
        the whole block's hash instead, which covers every data byte at once."""
        payloads: dict[int, memoryview] = {}
        bad: dict[str, str] = {}
        for name in disk_names:
            try:
                raw = self._by_name[name].read_shard(block_hex)
            except DiskError as exc:
                bad[name] = str(exc)
                continue
            if raw is None:
                bad[name] = "shard vanished"
                continue
            try:
                if verify:
                    header, payload = parse_shard(raw)
                else:
                    header, _ = parse_header(raw)
                    payload = memoryview(raw)[HEADER_SIZE:]
                    if len(payload) != header.payload_length:
                        raise ShardFormatError("shard is truncated")
            except ShardFormatError as exc:
                bad[name] = exc.message
                continue
            payloads.setdefault(header.index, payload)
        return payloads, bad

    # -- the four operations -------------------------------------------------------------

    def put(self, block_id: str, data: bytes) -> PutResult:
        return self._bounded(lambda: self._finish_put(self._start_put(block_id, data)))

    def put_many(self, blocks: Mapping[str, bytes]) -> dict[str, PutResult | CairnApplianceError]:
        return self._bounded(partial(self._put_many, blocks))

    def _put_many(self, blocks: Mapping[str, bytes]
                  ) -> dict[str, PutResult | CairnApplianceError]:
        """Put every block of BLOCKS (id -> bytes) in this one thread, each succeeding or
        failing on its own. The replicas of every small block are queued in the packs
        before any commit is awaited, so a batch of small puts costs about one commit per
        disk instead of a commit and a thread hand-off per put."""
        results: dict[str, PutResult | CairnApplianceError] = {}
        started: dict[str, _StartedPut] = {}
        for block_id, data in blocks.items():
            try:
                started[block_id] = self._start_put(block_id, data)
            except CairnApplianceError as exc:
                results[block_id] = exc
        for block_id, put in started.items():
            try:
                results[block_id] = self._finish_put(put)
            except CairnApplianceError as exc:
                results[block_id] = exc
        return results

    def _start_put(self, block_id: str, data: bytes) -> _StartedPut:
        """Check the id, encode, and for a small block queue its replicas in the packs."""
        raw_id = parse_block_id(block_id)
        if blake3.blake3(data).digest() != raw_id:
            raise BlockIdMismatchError("the block's bytes do not hash to its id")
        if self.repair_queue is not None:
            self.repair_queue.clear_tombstone(block_id)
        codec = self.codec_for_length(len(data))
        ranking = self.ranking(raw_id)
        put = _StartedPut(block_id, codec, [d for d in ranking if d.writable])
        if self._already_stored(codec, ranking, block_id):
            return put
        payloads = codec.encode(data)
        put.shards = [(serialize_header(ShardHeader(codec.scheme, index, codec.k, codec.m,
                                                    len(data), len(payload), raw_id), payload),
                       payload) for index, payload in enumerate(payloads)]
        if codec.scheme is Scheme.REPLICA:
            # Shard i goes to the i-th writable disk in the ranking.
            put.tickets = [disk.submit_packed(block_id, header + payload) for disk, (header,
                           payload) in zip(put.writable, put.shards, strict=False)]
        return put

    def _finish_put(self, put: _StartedPut) -> PutResult:
        codec = put.codec
        if put.shards is None:
            return PutResult(put.block_id, codec.total, codec.total, already_stored=True)
        if codec.scheme is Scheme.REPLICA:
            written = self._wait_packed(put)
        else:
            headers = [header for header, _ in put.shards]
            written = self._put_files(put.block_id, put.writable, codec, headers,
                                      [payload for _, payload in put.shards])
        needed = codec.k + 1
        if written < needed:
            raise InsufficientDisksError(
                f"only {written} of the {needed} shards needed could be written; "
                f"check `cairnd disks` ({self._disk_summary()})")
        if written < codec.total:
            self._queue(put.block_id, f"written with {written} of {codec.total} shards")
        return PutResult(put.block_id, written, codec.total)

    @staticmethod
    def _already_stored(codec: Codec, ranking: list[Disk], block_id: str) -> bool:
        """Whether the disks the block's shards go to all hold one. Stops at the first
        miss, so a new block costs one lookup (this runs on every put)."""
        packed = codec.scheme is Scheme.REPLICA
        return all(disk.readable and disk.holds(block_id, packed)
                   for disk in ranking[: codec.total])

    def _wait_packed(self, put: _StartedPut) -> int:
        """Wait for the commits that took a small put's replicas (queued by `_start_put`);
        a replica whose commit failed moves to the next writable disk not in use. Returns
        how many replicas are durable."""
        assert put.shards is not None
        written = 0
        spares = iter(put.writable[put.codec.total:])
        for index, (disk, ticket) in enumerate(zip(put.writable, put.tickets, strict=False)):
            try:
                disk.wait_packed(ticket)
                written += 1
                continue
            except DiskError as exc:
                log.warning("%s; trying the next disk", exc)
            header, payload = put.shards[index]
            for spare in spares:
                try:
                    spare.write_packed(put.block_id, header + payload)
                except DiskError as exc:
                    log.warning("%s; trying the next disk", exc)
                    continue
                written += 1
                break
        return written

    def _put_files(self, block_id: str, writable: list[Disk], codec: Codec,
                   headers: list[bytes], payloads: list[bytes]) -> int:
        """Erasure-coded shards in two phases: stage every shard (temp file, fdatasync) at
        once, then rename them all. A put killed while staging leaves only temp files (never
        a partial block that scrub would have to call unrecoverable), and a put refused for
        want of disks leaves nothing at all. Returns how many shards are durable."""
        staged = self._stage_shards(block_id, list(enumerate(writable[: codec.total])),
                                    headers, payloads)
        spares = iter(writable[codec.total:])
        for index in (i for i in range(codec.total) if i not in staged):
            for disk in spares:
                try:
                    staged[index] = (disk, disk.stage_shard(block_id, headers[index],
                                                            payloads[index]))
                except DiskError as exc:
                    log.warning("%s; trying the next disk", exc)
                    continue
                break
        if len(staged) < codec.k + 1:  # refused: leave nothing behind
            for disk, path in staged.values():
                disk.discard_staged(path)
            return len(staged)
        published: list[tuple[Disk, Path]] = []
        for disk, path in staged.values():  # renames back to back: a tiny crash window
            try:
                published.append((disk, disk.publish_shard(block_id, path)))
            except DiskError as exc:
                log.warning("%s", exc)
        # Then every folder's fsync at once: on ext4 each one is a journal commit, and
        # concurrent ones share it (six in a row made most of a big put's latency).
        synced = _all_at_once([partial(disk.sync_shard_folder, final)
                               for disk, final in published])
        for failure in (r for r in synced if isinstance(r, DiskError)):
            log.warning("%s", failure)
        return sum(1 for r in synced if not isinstance(r, DiskError))

    def _stage_shards(self, block_id: str, assignments: list[tuple[int, Disk]],
                      headers: list[bytes], payloads: list[bytes]
                      ) -> dict[int, tuple[Disk, Path]]:
        """Stage shard `index` on `disk` for every pair at the same time; returns what was
        staged, by index."""
        results = _all_at_once([partial(disk.stage_shard, block_id, headers[index],
                                        payloads[index]) for index, disk in assignments])
        staged: dict[int, tuple[Disk, Path]] = {}
        for (index, disk), result in zip(assignments, results, strict=True):
            if isinstance(result, DiskError):
                log.warning("%s; trying the next disk", result)
            else:
                staged[index] = (disk, result)
        return staged

    @staticmethod
    def _write_one(disk: Disk, scheme: Scheme, block_id: str, header: bytes,
                   payload: bytes) -> None:
        """One shard, durably: small-block replicas into the disk's pack, others as files."""
        if scheme is Scheme.REPLICA:
            disk.write_packed(block_id, header + payload)
        else:
            disk.write_shard(block_id, header, payload)

    def get(self, block_id: str) -> bytes:
        """The block's bytes, verified against its id (see `_get`)."""
        return self._bounded(partial(self._get, block_id))

    def _get(self, block_id: str) -> bytes:
        """The block's bytes, verified against its id.

        A read that comes up short (too few healthy shards, or none found) looks once
        more before it gives up, if some disk was skipped as not readable: disk states
        are probed at most every PROBE_INTERVAL, and a disk that was blank or missing a
        moment ago may just have been formatted and rebuilt (issue 14's false
        "unrecoverable" after a scrub)."""
        raw_id = parse_block_id(block_id)
        block = self._get_small(block_id, raw_id)
        if block is not None:
            return block
        located = self._locate(block_id, raw_id)
        try:
            return self._get_located(block_id, raw_id, located)
        except (BlockUnrecoverableError, BlockNotFoundError):
            if not self._reprobe(located.skipped):
                raise
            log.info("block %s: a skipped disk is readable again; reading it once more",
                     block_id[:16])
        return self._get_located(block_id, raw_id, self._locate(block_id, raw_id))

    def _reprobe(self, names: list[str]) -> bool:
        """Probe the named disks now; True if any of them has become readable (a hung
        disk has not: deadline.py)."""
        disks = [self._by_name[name] for name in names]
        states = [disk.probe() for disk in disks]
        return any(state in READABLE_STATES and not disk.hung
                   for state, disk in zip(states, disks, strict=True))

    def _get_located(self, block_id: str, raw_id: bytes, located: _Located) -> bytes:
        if not located.headers:
            if located.bad:
                raise BlockUnrecoverableError(
                    f"block {block_id}: no healthy shard ({len(located.bad)} bad)")
            raise BlockNotFoundError(f"block {block_id} is not stored here")
        reference = next(iter(located.headers.values()))
        codec = self._codec_for(reference)
        holder: dict[int, str] = {}
        for name, header in located.headers.items():
            holder.setdefault(header.index, name)
        # The data shards (or the first replica) when present, else the first k there are:
        # unverified, since the block's id is checked after decoding.
        wanted = sorted(holder)[: codec.k]
        if len(wanted) == codec.k:
            payloads, bad = self._read_payloads(block_id, [holder[i] for i in wanted],
                                                verify=False)
            if not bad:
                try:
                    block = codec.decode(payloads, reference.block_length)
                except BlockUnrecoverableError:
                    block = None
                if block is not None and blake3.blake3(block).digest() == raw_id:
                    if located.bad or len(holder) < codec.total:
                        self._queue(block_id, self._degradation(located, holder, codec))
                    return block
        return self._careful_get(block_id, raw_id, located, codec, reference.block_length)

    def _get_small(self, block_hex: str, raw_id: bytes) -> bytes | None:
        """The fast path of a small block: its first replica, read whole from the pack of
        the first disk in its ranking and checked against the id, once the headers of the
        replicas on the other disks it belongs on agree with it. None whenever anything is
        out of the ordinary (not a packed replica, a disk not readable, a replica missing,
        moved or bad, a read error): the general path then looks at every disk, reports
        the damage and queues the repair."""
        codec = self.replica
        first: ShardHeader | None = None
        block = b""
        try:
            for index, disk in enumerate(self.ranking(raw_id)[: codec.total]):
                if not disk.readable:
                    return None
                raw = disk.read_packed(block_hex, None if first is None else HEADER_SIZE)
                if raw is None:
                    return None
                header, _ = parse_header(raw)
                if (header.scheme is not Scheme.REPLICA
                        or (header.k, header.m) != (codec.k, codec.m) or header.index != index
                        or header.block_id != raw_id
                        or (first is not None and header.block_length != first.block_length)):
                    return None
                if first is None:
                    first, block = header, raw[HEADER_SIZE:]
                    if (len(block) != header.block_length
                            or blake3.blake3(block).digest() != raw_id):
                        return None
        except (DiskError, ShardFormatError):
            return None
        return block

    def _careful_get(self, block_id: str, raw_id: bytes, located: _Located, codec: Codec,
                     block_length: int) -> bytes:
        payloads, bad = self._read_payloads(block_id, list(located.headers), verify=True)
        bad.update(located.bad)
        if len(payloads) < codec.k:
            self._queue(block_id, "fewer than k healthy shards")
            raise BlockUnrecoverableError(
                f"block {block_id}: {len(payloads)} healthy shards, {codec.k} needed")
        block = codec.decode(payloads, block_length)
        if blake3.blake3(block).digest() != raw_id:
            self._queue(block_id, "decoded bytes do not match the id")
            raise BlockUnrecoverableError(f"block {block_id}: decoded bytes fail verification")
        self._queue(block_id, f"{len(bad)} bad and {codec.total - len(payloads)} "
                              "missing or bad shards seen by a read")
        return block

    @staticmethod
    def _degradation(located: _Located, holder: dict[int, str], codec: Codec) -> str:
        return (f"read found {len(holder)} of {codec.total} shards"
                + (f", {len(located.bad)} bad" if located.bad else ""))

    def has(self, block_id: str) -> bool:
        """True if enough shard headers are present to attempt decoding the block."""
        return self._bounded(partial(self._has, block_id))

    def _has(self, block_id: str) -> bool:
        raw_id = parse_block_id(block_id)
        located = self._locate(block_id, raw_id)
        if not located.headers:
            return False
        codec = self._codec_for(next(iter(located.headers.values())))
        return len({h.index for h in located.headers.values()}) >= codec.k

    def delete(self, block_id: str) -> int:
        """Remove every shard of the block from every reachable disk; returns how many.

        The block is tombstoned first, so shards on a disk that is offline now are removed
        (not repaired) when scrub meets them later."""
        return self._bounded(partial(self._delete, block_id))

    def _delete(self, block_id: str) -> int:
        parse_block_id(block_id)
        if self.repair_queue is not None:
            self.repair_queue.add_tombstone(block_id)
        removed = 0
        for disk in self.disks:
            if disk.state in (DiskState.MISSING, DiskState.BLANK, DiskState.FOREIGN) \
                    or disk.hung:
                continue
            try:
                removed += disk.remove_shard(block_id)
            except DiskError as exc:
                log.warning("delete of %s left a shard behind: %s", block_id[:16], exc)
        return removed

    # -- health and repair ---------------------------------------------------------------

    def disk_status(self, count_shards: bool = True) -> list[DiskStatus]:
        return [disk.status(count_shards) for disk in self.disks]

    def _disk_summary(self) -> str:
        states = Counter(disk.state.value for disk in self.disks)
        return ", ".join(f"{n} {state}" for state, n in sorted(states.items()))

    def format_blank_disks(self) -> list[str]:
        """Format every blank disk (an empty replacement) so repair can rebuild onto it."""
        formatted = []
        for disk in self.disks:
            if disk.probe() is DiskState.BLANK:
                format_disk(disk.spec, self.settings.appliance_id)
                disk.probe()
                formatted.append(disk.name)
                log.info("formatted blank disk %s at %s", disk.name, disk.root)
        return formatted

    def iter_block_ids(self, remove_stale_temp_files: bool = False) -> Iterator[str]:
        """Every block id with a shard on any readable disk, each once, streamed (scrub
        also has crash leftovers removed on the way, see Disk.iter_block_ids)."""
        readable = [d for d in self.disks if d.readable]
        for position, disk in enumerate(readable):
            try:
                for block_hex in disk.iter_block_ids(remove_stale_temp_files):
                    earlier = readable[:position]
                    if not any(d.holds_any(block_hex) for d in earlier):
                        yield block_hex
            except DiskError as exc:   # one disk's listing failed: go on with the others
                log.warning("listing the blocks of a disk stopped early: %s", exc)

    def repair(self, block_id: str) -> RepairResult:
        """Verify every shard of the block and rewrite what is missing or bad."""
        return self._bounded(partial(self._repair, block_id))

    def _repair(self, block_id: str) -> RepairResult:
        raw_id = parse_block_id(block_id)
        self._recently_queued.discard(block_id)
        if self.repair_queue is not None and self.repair_queue.is_tombstoned(block_id):
            self.delete(block_id)
            return RepairResult(RepairOutcome.REMOVED)
        located = self._locate(block_id, raw_id)
        if not located.headers and not located.bad:
            return RepairResult(RepairOutcome.NOT_FOUND)
        if not located.headers:
            return RepairResult(RepairOutcome.UNRECOVERABLE)
        reference = next(iter(located.headers.values()))
        codec = self._codec_for(reference)
        payloads, bad = self._read_payloads(block_id, list(located.headers), verify=True)
        bad.update(located.bad)
        bytes_read = sum(len(p) for p in payloads.values())
        if len(payloads) < codec.k:
            return RepairResult(RepairOutcome.UNRECOVERABLE, bytes_read)
        missing = [i for i in range(codec.total) if i not in payloads]
        if not missing and not bad:
            return RepairResult(RepairOutcome.HEALTHY, bytes_read)
        block = codec.decode(payloads, reference.block_length)
        if blake3.blake3(block).digest() != raw_id:
            return RepairResult(RepairOutcome.UNRECOVERABLE, bytes_read)
        rebuilt = codec.rebuild(payloads, reference.block_length, missing)
        # One keeper per shard index; a disk holding a second copy of an index (a put
        # given up on that finished late, after its retry placed the shards otherwise)
        # is a target like a disk holding nothing, or the block could never be whole.
        keepers: dict[int, str] = {}
        for name, held in located.headers.items():
            if name not in bad:
                keepers.setdefault(held.index, name)
        healthy_holders = set(keepers.values())
        targets = iter([d for d in self.ranking(raw_id)
                        if d.writable and d.name not in healthy_holders])
        written_to: set[str] = set()
        for index in missing:
            payload = rebuilt[index]
            header = serialize_header(ShardHeader(codec.scheme, index, codec.k, codec.m,
                                                  reference.block_length, len(payload),
                                                  raw_id), payload)
            for disk in targets:
                try:
                    self._write_one(disk, codec.scheme, block_id, header, payload)
                except DiskError as exc:
                    log.warning("repair of %s: %s", block_id[:16], exc)
                    continue
                written_to.add(disk.name)
                break
        for name in bad.keys() - written_to:
            disk = self._by_name[name]
            if disk.writable:
                with contextlib.suppress(DiskError):
                    disk.remove_shard(block_id)  # a bad file would be re-detected forever
        outcome = RepairOutcome.REPAIRED if len(written_to) == len(missing) \
            else RepairOutcome.PARTIAL
        return RepairResult(outcome, bytes_read, len(written_to))
