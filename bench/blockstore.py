#!/usr/bin/env python3
"""Benchmark of the block store against this machine's own disk, in one run.

Measures, on one filesystem and in one process:

- the machine's limits: `dd` sequential write (conv=fdatasync) and `dd` cold read;
- put throughput of --size-mib MiB in 4 MiB blocks with --concurrency puts in flight;
- healthy get throughput (page cache dropped first), and again from the page cache;
- a plain cold read of the same shard files, the ceiling a cold get cannot beat;
- degraded get throughput with two disk folders missing;
- rebuild speed of one replaced (empty) disk by a scrub;
- durable 4 KiB puts per second at concurrency 16;
- the process's peak RSS (it must not grow with --size-mib).

Every figure is printed beside the limit it is compared with, as a ratio, against the
targets of issue 2. Run as root so the page cache can be dropped (`/proc/sys/vm/drop_caches`);
otherwise each file is evicted with posix_fadvise(DONTNEED) and the report says so.

    .venv/bin/python bench/blockstore.py [--size-mib 1024] [--concurrency 8] [--json out.json]

See docs/benchmarks.md for the figures measured on the project's machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import blake3  # noqa: E402
from harness import (  # noqa: E402
    BenchError,
    CacheDropper,
    Figure,
    format_table,
    machine_info,
    own_peak_rss_mib,
    own_rss_mib,
    run_dd,
)

from appliance.storage.blockstore import BlockStore  # noqa: E402
from appliance.storage.disk import format_disk  # noqa: E402
from appliance.storage.repair_queue import RepairQueue  # noqa: E402
from appliance.storage.scrub import Scrubber  # noqa: E402
from appliance.storage.settings import DiskSpec, StoreSettings  # noqa: E402

MIB = 1024 * 1024
BLOCK_SIZE = 4 * MIB
SMALL_SIZE = 4096
SMALL_CONCURRENCY = 16
DISTINCT_BASES = 4  # random 4 MiB buffers; block i is base[i % 4] with i patched in
APPLIANCE_ID = "bench-appliance"

# Targets of issue 2 (ratios unless said otherwise).
TARGET_PUT = 0.8        # x (dd write x k/(k+m))
TARGET_GET = 0.8        # x dd cold read
TARGET_DEGRADED = 0.5   # x healthy get
TARGET_SMALL = 1000.0   # durable 4 KiB puts per second


def _walk_files(root: Path) -> Iterator[str]:
    for folder, _, files in os.walk(root):
        for name in files:
            yield os.path.join(folder, name)


# -- machine ---------------------------------------------------------------------------


def measure_dd(folder: Path, size_mib: int, dropper: CacheDropper,
               timeout: float) -> tuple[float, float]:
    """dd write (fdatasync) and cold read speeds, in MB/s, of one size_mib file."""
    target = folder / "dd.bin"
    count = max(1, size_mib // 4)
    try:
        written, seconds = run_dd(["if=/dev/zero", f"of={target}", "bs=4M", f"count={count}",
                                   "conv=fdatasync"], timeout)
        written = written or count * BLOCK_SIZE
        write_mbs = written / seconds / 1e6
        dropper.drop(folder)
        read, seconds = run_dd([f"if={target}", "of=/dev/null", "bs=4M"], timeout)
        read = read or count * BLOCK_SIZE
        read_mbs = read / seconds / 1e6
    finally:
        with contextlib.suppress(OSError):
            target.unlink()
    return write_mbs, read_mbs


def measure_small_files(folder: Path, count: int, concurrency: int, timeout: float) -> float:
    """Durable 4 KiB files per second, the way a shard is written (temp file, fdatasync,
    rename, fsync of the folder), `concurrency` at a time, into existing folders: the
    filesystem's own ceiling for small shards."""
    data = os.urandom(SMALL_SIZE)
    folders = [folder / f"f{i}" for i in range(concurrency)]
    for f in folders:
        f.mkdir(parents=True)

    def write(index: int) -> None:
        target = folders[index % concurrency]
        tmp = target / f"{index}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target / str(index))
        dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    try:
        run = parallel(write, count, concurrency, timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return run.done / run.seconds


# -- workload --------------------------------------------------------------------------


class Blocks:
    """n distinct 4 MiB blocks without holding them: block i is one of a few random
    buffers with i written into its first 8 bytes. Ids are computed up front."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self._bases = [os.urandom(size) for _ in range(DISTINCT_BASES)]
        self.ids = [blake3.blake3(self.make(i), max_threads=blake3.blake3.AUTO).hexdigest()
                    for i in range(count)]

    def make(self, index: int) -> bytes:
        base = memoryview(self._bases[index % DISTINCT_BASES])
        return b"".join((index.to_bytes(8, "little"), base[8:]))

    def check(self, index: int, data: bytes) -> None:
        if len(data) != self.size or int.from_bytes(data[:8], "little") != index:
            raise BenchError(f"block {index} read back wrong")

    def generation_ms(self) -> float:
        """Cost of make() per block (it runs inside the timed put, so it is counted)."""
        started = time.perf_counter()
        for i in range(16):
            self.make(i)
        return (time.perf_counter() - started) / 16 * 1000


@dataclass
class Run:
    done: int
    seconds: float
    timed_out: bool


def parallel(fn: Callable[[int], None], count: int, concurrency: int,
             timeout: float) -> Run:
    """Call fn(0..count-1) with `concurrency` calls in flight; stop early at the timeout."""
    lock = threading.Lock()
    next_index = 0
    done = 0
    deadline = time.monotonic() + timeout
    timed_out = False

    def worker() -> None:
        nonlocal next_index, done, timed_out
        while True:
            with lock:
                if next_index >= count:
                    return
                if time.monotonic() > deadline:
                    timed_out = True
                    return
                index = next_index
                next_index += 1
            fn(index)
            with lock:
                done += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        for future in futures:
            future.result()  # re-raises the first error
    return Run(done, time.perf_counter() - started, timed_out)


def make_store(root: Path, disks: int, k: int, m: int) -> BlockStore:
    specs = tuple(DiskSpec(f"disk{i}", root / f"disk{i}") for i in range(disks))
    for spec in specs:
        format_disk(spec, APPLIANCE_ID)
    settings = StoreSettings(APPLIANCE_ID, specs, data_shards=k, parity_shards=m)
    return BlockStore(settings, RepairQueue(root / "appliance.db"))


def probe_all(store: BlockStore) -> dict[str, str]:
    return {disk.name: disk.probe().value for disk in store.disks}


# -- the run ---------------------------------------------------------------------------


def bench(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    k, m = args.data_shards, args.parity_shards
    disks = args.disks or k + m
    dropper = CacheDropper()
    timeout = args.phase_timeout
    figures: list[Figure] = []
    notes: list[str] = []
    rss: dict[str, float] = {}

    def say(text: str) -> None:
        print(text, flush=True)

    # 1. The machine's limits.
    say(f"dd: write and cold read of {args.size_mib} MiB in {run_dir} ...")
    dd_write, dd_read = measure_dd(run_dir, args.size_mib, dropper, timeout)
    say(f"  dd write {dd_write:,.0f} MB/s, cold read {dd_read:,.0f} MB/s "
        f"(cache dropped with {dropper.method})")
    raw_count = min(args.small_count * 3, 6000)
    say(f"raw durable 4 KiB files: {raw_count}, {SMALL_CONCURRENCY} at a time ...")
    raw_files = measure_small_files(run_dir / "raw-files", raw_count, SMALL_CONCURRENCY,
                                    timeout)
    say(f"  {raw_files:,.0f} files/s")

    store = make_store(run_dir, disks, k, m)
    try:
        count = max(1, args.size_mib * MIB // BLOCK_SIZE)
        say(f"generating ids of {count} distinct 4 MiB blocks ...")
        blocks = Blocks(count, BLOCK_SIZE)
        gen_ms = blocks.generation_ms()
        data_bytes = count * BLOCK_SIZE
        rss["before_puts"] = own_rss_mib()

        # 2. Put.
        def put(index: int) -> None:
            result = store.put(blocks.ids[index], blocks.make(index))
            if result.degraded or result.already_stored:
                raise BenchError(f"put {index}: {result}")

        say(f"put: {count} blocks, {args.concurrency} in flight ...")
        run = parallel(put, count, args.concurrency, timeout)
        put_mbs = run.done * BLOCK_SIZE / run.seconds / 1e6
        figures.append(Figure(f"put 4 MiB blocks (x{args.concurrency})", put_mbs, "MB/s",
                              dd_write * k / (k + m), f"MB/s dd write x {k}/{k + m}",
                              TARGET_PUT,
                              note=f"{run.done} blocks in {run.seconds:.2f} s; block generation "
                              f"{gen_ms:.2f} ms/block counted in"))
        rss["after_puts"] = own_rss_mib()
        if run.timed_out:
            notes.append(f"put stopped at the {timeout:.0f} s limit after {run.done} blocks")
        stored = run.done

        # 3. Healthy get.
        def get(index: int) -> None:
            blocks.check(index, store.get(blocks.ids[index]))

        dropper.drop(run_dir)
        say(f"healthy get: {stored} blocks, {args.concurrency} in flight, cold cache ...")
        run = parallel(get, stored, args.concurrency, timeout)
        get_mbs = run.done * BLOCK_SIZE / run.seconds / 1e6
        figures.append(Figure(f"get, healthy, cold (x{args.concurrency})", get_mbs, "MB/s",
                              dd_read, "MB/s dd cold read", TARGET_GET,
                              note=f"{run.done} blocks in {run.seconds:.2f} s"))
        rss["after_get"] = own_rss_mib()

        # 3a. The layout's own read ceiling: the same data shard files read cold with plain
        # reads, nothing verified or decoded. One file per 1 MiB shard reads slower than
        # dd's one sequential file; a get cannot beat this.
        data_files = [disk.shard_path(block_id) for block_id in blocks.ids[:stored]
                      for disk in store.disks if disk.shard_path(block_id).exists()]
        dropper.drop(run_dir)
        say(f"raw cold read of the {len(data_files)} shard files ...")

        def read_file(index: int) -> None:
            with open(data_files[index], "rb", buffering=0) as handle:
                handle.read()

        run = parallel(read_file, len(data_files), args.concurrency, timeout)
        file_bytes = sum(path.stat().st_size for path in data_files[: run.done])
        figures.append(Figure(f"raw cold read of shard files (x{args.concurrency})",
                              file_bytes / run.seconds / 1e6, "MB/s", dd_read,
                              "MB/s dd cold read", None,
                              note=f"{run.done} files in {run.seconds:.2f} s, plain reads, no "
                              "verification: the ceiling for a cold get of file shards"))

        # 3b. The same gets again from the page cache: no disk at all, so this is what the
        # CPU allows (verification, copies); a cold get cannot beat it.
        say(f"healthy get again, warm cache ({args.concurrency} in flight) ...")
        run = parallel(get, stored, args.concurrency, timeout)
        warm_mbs = run.done * BLOCK_SIZE / run.seconds / 1e6
        figures.append(Figure(f"get, healthy, warm (x{args.concurrency})", warm_mbs, "MB/s",
                              dd_read, "MB/s dd cold read", None,
                              note=f"{run.done} blocks in {run.seconds:.2f} s from the page cache: "
                              "what the CPU allows at this concurrency"))

        # 4. Degraded get: two disk folders renamed away.
        away = [store.disks[i] for i in range(min(m, 2))]
        for disk in away:
            disk.root.rename(disk.root.with_name(disk.root.name + ".away"))
        states = probe_all(store)
        missing = [name for name, state in states.items() if state == "missing"]
        dropper.drop(run_dir)
        say(f"degraded get: {', '.join(missing)} missing, cold cache ...")
        try:
            run = parallel(get, stored, args.concurrency, timeout)
        finally:
            for disk in away:
                disk.root.with_name(disk.root.name + ".away").rename(disk.root)
            probe_all(store)
        degraded_mbs = run.done * BLOCK_SIZE / run.seconds / 1e6
        figures.append(Figure(f"get, {len(missing)} disks missing (x{args.concurrency})",
                              degraded_mbs, "MB/s", get_mbs, "MB/s healthy get",
                              TARGET_DEGRADED, note=f"{run.done} blocks in {run.seconds:.2f} s"))
        rss["after_degraded_get"] = own_rss_mib()

        # 5. Rebuild one disk: replace it with an empty folder and scrub.
        victim = store.disks[min(m, 2) % disks]
        old = victim.root.with_name(victim.root.name + ".old")
        victim.root.rename(old)
        victim.root.mkdir()
        probe_all(store)
        shutil.rmtree(old)
        dropper.drop(run_dir)
        say(f"rebuild: {victim.name} replaced by an empty folder, scrub ...")
        report = Scrubber(store).run()
        rebuilt = sum(os.path.getsize(p) for p in _walk_files(victim.root / "shards"))
        rebuild_mbs = rebuilt / report.seconds / 1e6 if report.seconds else 0.0
        if report.unrecoverable or report.partial:
            raise BenchError(f"rebuild left blocks behind: {report.summary()}")
        figures.append(Figure("rebuild one disk (scrub)", rebuild_mbs, "MB/s", dd_write,
                              "MB/s dd write", None,
                              note=f"{rebuilt / 1e6:,.0f} MB of shards rewritten "
                              f"({report.shards_rewritten} shards) in {report.seconds:.2f} s; "
                              f"{report.bytes_verified / 1e6:,.0f} MB read and verified"))
        rss["after_rebuild"] = own_rss_mib()

        # 6. Durable small puts.
        small_count = args.small_count
        say(f"small puts: {small_count} distinct 4 KiB blocks, {SMALL_CONCURRENCY} in flight ...")
        pool = os.urandom(SMALL_SIZE * small_count)
        small = [pool[i * SMALL_SIZE:(i + 1) * SMALL_SIZE] for i in range(small_count)]
        del pool
        small_ids = [blake3.blake3(b).hexdigest() for b in small]

        def small_put(index: int) -> None:
            result = store.put(small_ids[index], small[index])
            if result.degraded or result.already_stored:
                raise BenchError(f"small put {index}: {result}")

        run = parallel(small_put, small_count, SMALL_CONCURRENCY, timeout)
        small_rate = run.done / run.seconds
        copies = store.replica.total
        figures.append(Figure(f"durable 4 KiB puts (x{SMALL_CONCURRENCY})", small_rate,
                              "puts/s", raw_files / copies,
                              f"/s raw durable 4 KiB files / {copies}", TARGET_SMALL,
                              note=f"{run.done} puts in {run.seconds:.2f} s, {copies} replicas "
                              f"each, packed (group-committed rows of each disk's pack); "
                              f"for scale, the filesystem made {raw_files:,.0f} new "
                              f"durable 4 KiB files/s on its own",
                              target_on_value=True))
        rss["after_small_puts"] = own_rss_mib()
    finally:
        store.close()

    peak = own_peak_rss_mib()
    figures.append(Figure("peak RSS", peak, "MiB", None, "", None,
                          note=f"data set {data_bytes / MIB:,.0f} MiB; must not grow with it"))
    return {"figures": figures, "dd_write_mbs": dd_write, "dd_read_mbs": dd_read,
            "raw_small_files_per_s": raw_files,
            "cache_drop": dropper.method, "rss_mib": rss, "notes": notes}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=PROJECT / "bench" / "out",
                        help="parent folder of the run's fresh folder; keep it on the "
                             "filesystem you want to measure (default: bench/out)")
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="data put and read back, in MiB (4 MiB blocks; default 1024)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="puts or gets in flight for the 4 MiB figures (default 8)")
    parser.add_argument("--small-count", type=int, default=5000,
                        help="distinct 4 KiB blocks for the small-put figure (default 5000)")
    parser.add_argument("--disks", type=int, default=0,
                        help="disk folders (default data + parity shards)")
    parser.add_argument("--data-shards", type=int, default=4)
    parser.add_argument("--parity-shards", type=int, default=2)
    parser.add_argument("--phase-timeout", type=float, default=600.0,
                        help="seconds after which a phase stops early (default 600)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder")
    args = parser.parse_args(argv)
    if args.size_mib < 4 or args.concurrency < 1 or args.small_count < 1:
        parser.error("--size-mib must be >= 4, --concurrency and --small-count >= 1")
    if args.parity_shards < 2:
        parser.error("the degraded figure removes two disks: --parity-shards must be >= 2")
    if args.disks and args.disks < args.data_shards + args.parity_shards:
        parser.error("--disks must be at least data + parity shards")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # degraded reads log one warning per block
    args.dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.dir)).resolve()
    if os.stat(run_dir).st_dev != os.stat(PROJECT).st_dev:
        print(f"note: {run_dir} is not on the project's filesystem", file=sys.stderr)
    info = machine_info(run_dir)
    fs = info.get("filesystem", {})
    print(f"machine: {info.get('nproc')} CPUs, {info.get('memory_gib')} GiB, "
          f"{fs.get('type', '?')} on {fs.get('device', '?')}; "
          f"k={args.data_shards} m={args.parity_shards}; run folder {run_dir}")
    try:
        result = bench(args, run_dir)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    figures: list[Figure] = result["figures"]
    print()
    print(format_table(figures))
    print()
    for f in figures:
        if f.note:
            print(f"  {f.name}: {f.note}")
    print(f"  page cache dropped with: {result['cache_drop']}")
    print("  RSS (MiB) by phase: " + ", ".join(f"{k} {v:.0f}"
                                              for k, v in result["rss_mib"].items()))
    for note in result["notes"]:
        print(f"  note: {note}")
    if args.json:
        payload = {
            "machine": info,
            "settings": {"size_mib": args.size_mib, "concurrency": args.concurrency,
                         "small_count": args.small_count, "small_concurrency":
                         SMALL_CONCURRENCY, "data_shards": args.data_shards,
                         "parity_shards": args.parity_shards,
                         "disks": args.disks or args.data_shards + args.parity_shards},
            "dd_write_mbs": round(result["dd_write_mbs"], 1),
            "dd_cold_read_mbs": round(result["dd_read_mbs"], 1),
            "raw_durable_4k_files_per_s": round(result["raw_small_files_per_s"], 1),
            "cache_drop": result["cache_drop"],
            "rss_mib": {k: round(v, 1) for k, v in result["rss_mib"].items()},
            "figures": [f.to_json() for f in figures],
            "notes": result["notes"],
            "kept": str(run_dir) if args.keep else None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    missed = [f.name for f in figures if f.verdict == "MISS"]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
