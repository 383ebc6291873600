"""Fault tests of the block store against real disk folders: missing disks, corrupt and
truncated shards, a read-only disk, a full disk, kill -9 in the middle of writes, and
concurrent puts. Each checks that every acknowledged block reads back byte-exact and that
scrub restores full redundancy, judged by parsing the shard files on disk.

Tests marked `root` mount filesystems (a read-only bind mount, a small tmpfs) and unmount
them in `finally` blocks. EIO, which real folders cannot produce on demand, is covered by
tests/unit/test_blockstore_eio.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from storage_fixtures import (
    APPLIANCE_ID,
    LARGE_SIZES,
    SMALL_SIZES,
    MiB,
    assert_full_redundancy,
    assert_reads_back,
    deterministic_block,
    disk_specs,
    flip_byte,
    format_disks,
    make_block,
    mounted,
    open_store,
    packed_ids,
    payload_offset,
    remount,
    shard_dir_files,
    shard_files,
    shard_index_paths,
    temp_files,
    truncate,
)

from appliance.errors import BlockUnrecoverableError, InsufficientDisksError
from appliance.storage import disk as disk_module
from appliance.storage.blockstore import BlockStore, block_id_of
from appliance.storage.disk import DiskState, format_disk
from appliance.storage.scrub import Scrubber
from appliance.storage.settings import DiskSpec
from appliance.storage.shard_format import HEADER_SIZE

REPO = Path(__file__).resolve().parents[2]



def needs_root(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that mounts filesystems; skipped unless running as root."""
    skip = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a filesystem: needs root")
    marked: Callable[..., None] = pytest.mark.root(skip(test))
    return marked


@pytest.fixture
def fresh_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk state is cached for PROBE_INTERVAL; the tests change disks faster than that."""
    monkeypatch.setattr(disk_module, "PROBE_INTERVAL", 0.0)


@pytest.fixture
def specs(tmp_path: Path) -> tuple[DiskSpec, ...]:
    specs = disk_specs(tmp_path / "disks")
    format_disks(specs)
    return specs


@pytest.fixture
def store(tmp_path: Path, specs: tuple[DiskSpec, ...]) -> Iterator[BlockStore]:
    store = open_store(tmp_path, specs)
    yield store
    store.close()


def put_blocks(store: BlockStore, rng: random.Random,
               sizes: tuple[int, ...]) -> dict[str, bytes]:
    blocks = {}
    for size in sizes:
        block_id, data = make_block(rng, size)
        store.put(block_id, data)
        blocks[block_id] = data
    return blocks


def disk_named(store: BlockStore, name: str) -> disk_module.Disk:
    return next(d for d in store.disks if d.name == name)


def scrub_until_clean(store: BlockStore, blocks: dict[str, bytes]) -> None:
    """After a repairing scrub: full redundancy, every block reads, and a second scrub finds
    nothing to do."""
    assert_full_redundancy(store, blocks)
    assert_reads_back(store, blocks)
    again = Scrubber(store).run()
    assert (again.repaired, again.partial, again.unrecoverable) == (0, 0, 0), again.summary()
    assert again.healthy == again.checked


# -- 1. two disks deleted --------------------------------------------------------------


@pytest.mark.usefixtures("fresh_probes")
def test_two_deleted_disks_still_serve_every_block_and_scrub_rebuilds_replacements(
        store: BlockStore, specs: tuple[DiskSpec, ...]) -> None:
    rng = random.Random(1)
    blocks = put_blocks(store, rng, LARGE_SIZES * 2 + SMALL_SIZES * 3)
    assert_full_redundancy(store, blocks)

    gone = [specs[1], specs[4]]
    for spec in gone:
        shutil.rmtree(spec.path)
    assert [d.state for d in store.disks].count(DiskState.MISSING) == 2
    assert_reads_back(store, blocks)

    # Only 4 disks accept writes: fewer than the k+1 = 5 an erasure-coded block needs.
    block_id, data = make_block(rng, 4 * MiB)
    with pytest.raises(InsufficientDisksError) as refused:
        store.put(block_id, data)
    message = refused.value.message
    assert "4 of the 5 shards needed" in message and "2 missing" in message, message
    # Refused before anything became visible: no shard and no temp file is left behind.
    assert shard_files(store, block_id) == []
    assert [p for spec in specs if spec.path.exists() for p in temp_files(spec.path)] == []
    assert "cairnd disks" in message
    # A small block needs only 2 replicas and gets all 3 on the 4 remaining disks.
    small_id, small = make_block(rng, 2000)
    assert store.put(small_id, small).shards_written == 3
    blocks[small_id] = small

    for spec in gone:  # replacement disks: empty folders
        spec.path.mkdir()
    assert {disk_named(store, s.name).state for s in gone} == {DiskState.BLANK}
    report = Scrubber(store).run()
    assert sorted(report.formatted_disks) == [gone[0].name, gone[1].name]
    assert (report.unrecoverable, report.partial) == (0, 0), report.summary()
    assert report.repaired >= len(LARGE_SIZES) * 2, report.summary()
    assert {d.state for d in store.disks} == {DiskState.OK}
    scrub_until_clean(store, blocks)


# -- 2. one disk deleted ---------------------------------------------------------------


@pytest.mark.usefixtures("fresh_probes")
def test_writes_stay_available_with_one_disk_missing_and_are_repaired_on_return(
        store: BlockStore, specs: tuple[DiskSpec, ...]) -> None:
    assert store.repair_queue is not None
    shutil.rmtree(specs[2].path)
    rng = random.Random(2)
    blocks: dict[str, bytes] = {}
    degraded = set()
    for size in LARGE_SIZES + SMALL_SIZES:
        block_id, data = make_block(rng, size)
        result = store.put(block_id, data)
        blocks[block_id] = data
        if size > store.settings.small_block_limit:
            assert (result.shards_written, result.shards_total) == (5, 6)
            degraded.add(block_id)
        else:
            assert result.shards_written == 3 and not result.degraded
    assert degraded <= set(store.repair_queue.pending(limit=1000))
    assert_reads_back(store, blocks)

    specs[2].path.mkdir()
    report = Scrubber(store).run()
    assert report.formatted_disks == [specs[2].name]
    assert (report.repaired, report.unrecoverable, report.partial) == (len(degraded), 0, 0)
    assert len(store.repair_queue) == 0
    scrub_until_clean(store, blocks)


# -- 3. corrupt and truncated shards ---------------------------------------------------


@pytest.mark.usefixtures("fresh_probes")
def test_corrupt_and_truncated_shards_are_served_around_and_rewritten(
        store: BlockStore) -> None:
    assert store.repair_queue is not None
    rng = random.Random(3)
    sizes = {"A": 4 * MiB, "B": 4 * MiB + 1, "C": MiB - 3, "D": 100_003, "G": 4 * MiB,
             "H": MiB - 3, "P": 4 * MiB, "E": 3 * 1024, "F": 2049,
             "U": 4 * MiB + 1, "U2": 1500, "ok1": 4 * MiB, "ok2": 4096}
    named = {name: make_block(rng, size) for name, size in sizes.items()}
    for block_id, data in named.values():
        store.put(block_id, data)
    shards = {name: shard_index_paths(store, block_id)
              for name, (block_id, _) in named.items()}

    def damage(name: str, index: int, how: str) -> None:
        path = shards[name][index]
        match how:
            case "magic":
                flip_byte(path, 0)
            case "block_length":
                flip_byte(path, 20)
            case "k":
                flip_byte(path, 12)
            case "checksum":
                flip_byte(path, 70)
            case "payload":
                flip_byte(path, payload_offset(path, 0.5))
            case "erasure_metadata":  # pyeclib's own fragment header, inside our payload
                flip_byte(path, HEADER_SIZE + 8)
            case "truncate_0":
                truncate(path, 0)
            case "truncate_header":
                truncate(path, 50)
            case "truncate_payload":
                truncate(path, payload_offset(path, 0.5))

    # Data shards are 0..3, parity 4..5; replicas 0..2. At most m = 2 bad per block ...
    damage("A", 1, "magic")
    damage("A", 4, "payload")
    damage("B", 0, "payload")
    damage("B", 5, "truncate_payload")
    damage("C", 2, "truncate_0")
    damage("C", 3, "truncate_header")
    damage("D", 0, "truncate_payload")
    damage("D", 5, "block_length")
    damage("G", 3, "erasure_metadata")
    damage("G", 4, "checksum")
    damage("H", 1, "checksum")
    damage("P", 4, "truncate_payload")
    damage("P", 5, "payload")
    damage("E", 0, "payload")
    damage("E", 1, "truncate_payload")
    damage("F", 2, "k")
    # ... except U and U2, with m+1 = 3 bad shards.
    damage("U", 0, "payload")
    damage("U", 1, "payload")
    damage("U", 4, "truncate_0")
    for index in range(3):
        damage("U2", index, "payload")

    lost = {named["U"][0], named["U2"][0]}
    alive = {block_id: data for block_id, data in named.values() if block_id not in lost}
    assert_reads_back(store, alive)
    for block_id in lost:
        with pytest.raises(BlockUnrecoverableError) as unrecoverable:
            store.get(block_id)
        assert block_id in unrecoverable.value.message
        assert "healthy shards" in unrecoverable.value.message
        assert "needed" in unrecoverable.value.message

    # A read queues the bad shards it meets: every header (all are read), and the data
    # shards (or the first replica). Damage in parity payloads or in a checksum field is
    # left to scrub: the fast path trusts the block's BLAKE3 id instead of shard checksums.
    met_by_reads = {named[n][0] for n in ("A", "B", "C", "D", "G", "E", "F", "U", "U2")}
    queued = set(store.repair_queue.pending(limit=1000))
    assert met_by_reads <= queued, {n for n, (b, _) in named.items() if b in met_by_reads - queued}

    report = Scrubber(store).run()
    assert report.unrecoverable == 2 and set(report.unrecoverable_ids) == lost
    assert report.repaired == 9 and report.partial == 0, report.summary()
    assert report.healthy == 2
    assert "unrecoverable 2" in report.summary()
    assert_full_redundancy(store, alive)
    assert_reads_back(store, alive)

    again = Scrubber(store).run()
    assert (again.repaired, again.unrecoverable, again.healthy) == (0, 2, len(alive))
    # A lost block's files are all kept, damaged ones too: they are all there is to
    # recover it from by hand, and a missing disk may still bring it back.
    assert len(shard_files(store, named["U"][0])) == 6
    assert len(shard_files(store, named["U2"][0])) == 3


# -- 4. a read-only disk ---------------------------------------------------------------


@needs_root
def test_read_only_disk_is_read_but_not_written_and_repaired_when_writable_again(
        store: BlockStore, specs: tuple[DiskSpec, ...],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A long probe interval: the first put meets the read-only filesystem (EROFS) itself.
    monkeypatch.setattr(disk_module, "PROBE_INTERVAL", 3600.0)
    rng = random.Random(4)
    before = put_blocks(store, rng, LARGE_SIZES + SMALL_SIZES)
    ro_disk = disk_named(store, specs[3].name)
    root = specs[3].path
    with mounted("--bind", str(root), target=root):
        remount(root, "ro,bind")
        assert ro_disk.writable  # not probed since the remount
        block_id, data = make_block(rng, 4 * MiB)
        first = store.put(block_id, data)
        assert (first.shards_written, first.shards_total) == (5, 6)
        assert ro_disk.state is DiskState.READ_ONLY and not ro_disk.writable
        assert ro_disk.probe() is DiskState.READ_ONLY  # statvfs agrees
        after = {block_id: data} | put_blocks(store, rng, LARGE_SIZES + SMALL_SIZES)
        assert not ro_disk.shard_path(block_id).exists()
        blocks = before | after
        assert_reads_back(store, blocks)
        assert store.repair_queue is not None
        degraded = {b for b, d in after.items() if len(d) > store.settings.small_block_limit}
        assert degraded <= set(store.repair_queue.pending(limit=1000))

        # Scrub cannot finish while the disk is read-only, and says so.
        stuck = Scrubber(store).run()
        assert stuck.partial == len(degraded) and stuck.unrecoverable == 0, stuck.summary()

        remount(root, "rw,bind")
        assert ro_disk.probe() is DiskState.OK
        report = Scrubber(store).run()
        assert (report.repaired, report.partial, report.unrecoverable) == (len(degraded), 0, 0)
        scrub_until_clean(store, blocks)


# -- 5. a full disk ----------------------------------------------------------------------


@needs_root
@pytest.mark.usefixtures("fresh_probes")
def test_full_disk_is_skipped_and_refilled_after_it_grows(tmp_path: Path) -> None:
    specs = disk_specs(tmp_path / "disks")
    small_root = specs[5].path
    format_disks(specs[:5])
    small_root.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=small_root):
        format_disk(specs[5], APPLIANCE_ID)
        store = open_store(tmp_path, specs)
        try:
            small_disk = disk_named(store, specs[5].name)
            rng = random.Random(5)
            sizes = [MiB - 3] * 10 + [4 * MiB + 1] * 3 + [1024, 3000, 4096] * 6
            rng.shuffle(sizes)
            blocks: dict[str, bytes] = {}
            degraded = set()
            for size in sizes:  # about 5 MiB of shards are meant for the 2 MiB disk
                block_id, data = make_block(rng, size)
                result = store.put(block_id, data)
                blocks[block_id] = data
                if result.degraded:
                    degraded.add(block_id)
            status = small_disk.status()
            assert status.state is DiskState.FULL, status
            assert "space" in status.detail
            assert degraded, "no put was refused by the full disk"
            assert store.repair_queue is not None
            assert degraded <= set(store.repair_queue.pending(limit=1000))
            assert temp_files(small_root) == []  # failed writes leave no temp file
            assert_reads_back(store, blocks)
            # Whatever did land on the full disk is whole: ENOSPC never leaves a torn shard.
            for path in shard_dir_files(small_root):
                assert all(f.header is not None for f in shard_files(store, path.name))
        finally:
            store.close()

        remount(small_root, "size=64m")
        # `cairnd scrub` after the disk grew: a new process, so no memory of the ENOSPC.
        store = open_store(tmp_path, specs)
        try:
            assert disk_named(store, specs[5].name).state is DiskState.OK
            report = Scrubber(store).run()
            assert report.repaired == len(degraded), report.summary()
            assert (report.partial, report.unrecoverable) == (0, 0), report.summary()
            scrub_until_clean(store, blocks)
        finally:
            store.close()


# -- 6. kill -9 in the middle of writes ------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path

    from appliance.storage.blockstore import block_id_of
    from storage_fixtures import deterministic_block, disk_specs, open_store

    root, seed = Path(sys.argv[1]), int(sys.argv[2])
    store = open_store(root, disk_specs(root / "disks"))
    counter = 0
    while True:
        data = deterministic_block(seed, counter)
        block_id = block_id_of(data)
        store.put(block_id, data)
        sys.stdout.write(f"{counter} {block_id}\\n")  # acknowledged only after put returned
        sys.stdout.flush()
        counter += 1
""")


def run_and_kill(script: Path, root: Path, seed: int, rng: random.Random) -> list[str]:
    """Run the writer until it acknowledged 30..60 blocks, SIGKILL it at a random moment,
    and return the lines it acknowledged before dying."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with open(root / f"child-{seed}.err", "wb") as errors:
        child = subprocess.Popen([sys.executable, str(script), str(root), str(seed)],
                                 stdout=subprocess.PIPE, stderr=errors, env=env, text=True)
    assert child.stdout is not None
    lines: list[str] = []
    try:
        target = rng.randint(30, 60)
        while len(lines) < target:
            line = child.stdout.readline()
            if not line:
                child.wait(10)
                pytest.fail("writer died: " + (root / f"child-{seed}.err").read_text())
            lines.append(line)
        time.sleep(rng.uniform(0.0, 0.03))
    finally:
        child.send_signal(signal.SIGKILL)
        lines += child.stdout.readlines()
        child.wait(10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return [line for line in lines if line.endswith("\n")]


@pytest.mark.usefixtures("fresh_probes")
@pytest.mark.slow
def test_kill_9_mid_writes_loses_no_acknowledged_block(
        tmp_path: Path, specs: tuple[DiskSpec, ...]) -> None:
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    rng = random.Random(6)
    acknowledged: dict[str, bytes] = {}
    for seed in (61, 62, 63, 64):
        for line in run_and_kill(script, tmp_path, seed, rng):
            counter, block_id = line.split()
            data = deterministic_block(seed, int(counter))
            assert block_id_of(data) == block_id
            acknowledged[block_id] = data
    assert len(acknowledged) >= 4 * 30

    store = open_store(tmp_path, specs)
    try:
        assert_reads_back(store, acknowledged)
        # Half-written shards stay temp files and are never listed or read as shards.
        leftovers = [p for d in specs for p in temp_files(d.path)]
        for disk in store.disks:
            on_disk = {p.name for p in shard_dir_files(disk.root)}
            assert set(disk.iter_block_ids()) == on_disk | packed_ids(disk.root)
            assert all(len(name) == 64 for name in on_disk)
        assert not any(p.name in {q.name for d in specs for q in shard_dir_files(d.path)}
                       for p in leftovers)

        report = Scrubber(store).run()
        print(f"{len(acknowledged)} acknowledged, {len(leftovers)} temp files left, "
              f"scrub: {report.summary()}")  # shown when the test fails
        assert not set(report.unrecoverable_ids) & acknowledged.keys(), report.summary()
        assert report.partial == 0, report.summary()
        assert_full_redundancy(store, acknowledged)
        assert_reads_back(store, acknowledged)
    finally:
        store.close()

    # An hour later, the scrub's walk removes the crash leftovers.
    stale = time.time() - 2 * disk_module.TMP_STALE_AFTER
    for path in leftovers:
        os.utime(path, (stale, stale))
    store = open_store(tmp_path, specs)
    try:
        Scrubber(store).run()
        assert [p for d in specs for p in temp_files(d.path)] == []
        assert_reads_back(store, acknowledged)
    finally:
        store.close()


# -- 7. concurrent puts ------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_probes")
def test_sixteen_threads_putting_the_same_blocks_at_once(store: BlockStore) -> None:
    rng = random.Random(7)
    blocks = dict(make_block(rng, size) for size in LARGE_SIZES * 2 + SMALL_SIZES * 4)
    ids = sorted(blocks)
    start = threading.Barrier(16)
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        # Thread i takes two blocks of every three, shifted by i: each block is put by
        # 10 or 11 threads, in a different order in each.
        order = [b for j, b in enumerate(ids) if (number + j) % 3]
        random.Random(number).shuffle(order)
        try:
            start.wait()
            for block_id in order:
                store.put(block_id, blocks[block_id])
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    assert all(store.has(block_id) for block_id in ids)
    assert_reads_back(store, blocks)
    assert_full_redundancy(store, blocks)
    for block_id, data in blocks.items():  # exactly one shard per index, one per disk
        assert len(shard_files(store, block_id)) == store.codec_for_length(len(data)).total
    assert [p for d in store.disks for p in temp_files(d.root)] == []
