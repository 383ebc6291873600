"""The workloads of bench/compare.py, for any system of two syncing devices A and B.

A system is given as a `Pair`: A's and B's folders, the processes to measure (a name ->
the pids of its process tree now), a check that raises if one of them died, and its logs'
last lines for a failure. Every workload writes on A and awaits the result on B,
byte for byte, with bounded waits (a wait that runs out raises BenchError: that figure is
not obtained). Each measures, from its first write until the system settled again (every
process under SETTLE_CPU_S over SETTLE_WINDOW_S, at most SETTLE_TIMEOUT_S; not settling is
noted, not fatal), the CPU seconds of every process (utime + stime from /proc, summed over
its tree) and each one's peak RSS, sampled every RSS_SAMPLE_S in a thread (VmRSS summed over
its tree: VmHWM would cover the process's whole life, not the workload).

- `near_empty`: COUNT small edits (200-800 random bytes) of three files in an otherwise
  empty folder, each awaited on B (read every 2 ms), EDIT_SPACING_S apart: p50. The
  spacing matters to Syncthing: its watcher's timer ticks every fsWatcherDelayS and stops
  when a tick finds nothing, so an edit after a quiet second is scanned exactly one delay
  later (as a user's occasional edit would be), while edits 0.5 s after the previous one
  arrived lock to its timer's phase and wait 1.5 delays;
- `small_files`: COUNT files of 4 KiB (random) written into 100 new subfolders of A (no
  fsync), from the first write until B has them all: every POLL_TREE_S, which of the
  expected names B has with their size (`Presence`: a download's temporary name, such as
  Syncthing's `.syncthing.NAME.tmp` or Cairn's `NAME.cairn-part`, is never one of them),
  and once every one has, every file is read and compared: files/s;
- `edits`: COUNT edits of random files among those (200-800 new bytes each), each awaited
  on B, EDIT_SPACING_S apart: p50, and the CPU of the whole phase (idle time between the
  edits included) per edit;
- `big_file`: SIZE random bytes written and fsynced on A; from the end of the fsync until
  B's file has the size (checked every 20 ms), then BLAKE3 compared: MB/s, CPU per GB
  (from the first byte written until settled).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    BenchError,
    cpu_seconds,
    file_hash,
    nearest_rank,
    own_cpu_seconds,
    rss_mib,
    say,
    settle,
    wait_bytes,
    write_random_file,
)

MIB = 1024 * 1024
SMALL_FILE = 4096
SUBFOLDERS = 100
POLL_TREE_S = 0.25
STAT_NAMES = 32                  # a folder missing at most this many: stat them, not list it
MTIME_MARGIN_NS = 50_000_000     # >> the file system clock's tick (a jiffy)
REPORT_S = 30.0
POLL_BIG_S = 0.02
RSS_SAMPLE_S = 0.2
CHANGE_TIMEOUT_S = 20.0
WARMUP_TIMEOUT_S = 60.0
NEAR_EMPTY_FILES = 3
EDIT_SPACING_S = 1.5
SETTLE_WINDOW_S = 2.0
SETTLE_CPU_S = 0.04
SETTLE_TIMEOUT_S = 180.0
STALL_S = 90.0


@dataclass
class Pair:
    """Two running devices of one system."""

    system: str
    a: Path                                          # A's synced folder
    b: Path                                          # B's synced folder
    processes: Callable[[], dict[str, list[int]]]    # name -> pids of its tree, now
    check: Callable[[], None]                        # raises BenchError if one died
    diagnostics: Callable[[], str]                   # the logs' last lines, for a failure


@dataclass
class Result:
    """One workload on one system: its headline figure, and the CPU and memory it cost."""

    value: float                   # files/s, s (a p50) or MB/s
    unit: str
    count: float                   # what the CPU is divided by: files, edits or GB
    per: str                       # "file", "edit", "GB"
    cpu_s: dict[str, float]        # each process, over the workload
    peak_rss_mib: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def cpu_per(self) -> float:
        return self.total_cpu_s / self.count

    def to_json(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "unit": self.unit, "count": self.count,
                "per": self.per, "cpu_s": {k: round(v, 3) for k, v in self.cpu_s.items()},
                "total_cpu_s": round(self.total_cpu_s, 3),
                "cpu_s_per": round(self.cpu_per, 5),
                "peak_rss_mib": {k: round(v, 1) for k, v in self.peak_rss_mib.items()},
                "details": self.details}


def tree_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def tree_rss(pids: list[int]) -> float:
    return sum(rss_mib(pid) for pid in pids)


class Meter:
    """CPU seconds of every process of PAIR from `start` to `stop`, and peak RSS sampled
    in a thread in between."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.before: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.own_before = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> Meter:
        self.before = {name: tree_cpu(pids) for name, pids in self.pair.processes().items()}
        self.own_before = own_cpu_seconds()
        self._thread.start()
        return self

    def used(self) -> dict[str, float]:
        """CPU seconds of each process since `start`."""
        return {name: tree_cpu(pids) - self.before.get(name, 0.0)
                for name, pids in self.pair.processes().items()}

    def _sample(self) -> None:
        while not self._done.is_set():
            for name, pids in self.pair.processes().items():
                self.peaks[name] = max(self.peaks.get(name, 0.0), tree_rss(pids))
            self._done.wait(RSS_SAMPLE_S)

    def stop(self) -> tuple[dict[str, float], dict[str, float], float]:
        """(CPU seconds, peak RSS MiB) of each process, and this script's own CPU."""
        used = self.used()
        self._done.set()
        self._thread.join(timeout=10)
        return used, dict(self.peaks), own_cpu_seconds() - self.own_before


def quiet(pair: Pair, details: dict[str, Any], key: str = "settled_s") -> None:
    """Wait until PAIR's processes settle; how long (or why not) goes into DETAILS."""
    def cpu() -> dict[str, float]:
        return {name: tree_cpu(pids) for name, pids in pair.processes().items()}
    try:
        details[key] = round(settle(cpu, pair.check, SETTLE_WINDOW_S, SETTLE_CPU_S,
                                    SETTLE_TIMEOUT_S), 1)
    except BenchError as exc:
        pair.check()             # a process that died is a failure, not a busy one
        details[key] = None
        details["not_settled"] = str(exc)
        say(f"  {exc}")


def warm_up(pair: Pair) -> float:
    """A first file A -> B, then settle: seconds it took to arrive."""
    data = os.urandom(64)
    written = time.perf_counter()
    (pair.a / "warm-up.txt").write_bytes(data)
    arrived = wait_bytes(pair.b / "warm-up.txt", data, written + WARMUP_TIMEOUT_S)
    pair.check()
    if arrived is None:
        raise BenchError(f"a first file did not reach B in {WARMUP_TIMEOUT_S:.0f} s")
    details: dict[str, Any] = {}
    quiet(pair, details)
    return arrived - written


def _edit(pair: Pair, relative: str, data: bytes, what: str) -> float:
    """Write DATA into A's RELATIVE (open, write, close); seconds until B has it."""
    written = time.perf_counter()
    with open(pair.a / relative, "wb") as handle:
        handle.write(data)
    arrived = wait_bytes(pair.b / relative, data, written + CHANGE_TIMEOUT_S)
    pair.check()
    if arrived is None:
        raise BenchError(f"{what} ({relative}) did not reach B in {CHANGE_TIMEOUT_S:g} s")
    return arrived - written


def _latencies(seconds: list[float]) -> dict[str, Any]:
    return {"p50_s": round(nearest_rank(seconds, 0.5), 4), "max_s": round(max(seconds), 4),
            "mean_s": round(statistics.mean(seconds), 4),
            "samples_s": [round(s, 4) for s in seconds]}


def near_empty(pair: Pair, count: int) -> Result:
    folder = pair.a / "near-empty"
    folder.mkdir()
    names = [f"near-empty/note-{i}.txt" for i in range(NEAR_EMPTY_FILES)]
    for name in names:
        _edit(pair, name, os.urandom(100), "a new file")
    return _timed_edits(pair, count, random.Random(20261205), {},
                        lambda i, _: names[i % len(names)])


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def small_files(pair: Pair, count: int) -> tuple[Result, list[str]]:
    """COUNT files into `small-COUNT/dNNN/` of A, awaited on B; the result and the files."""
    top = f"small-{count}"
    expected: dict[str, bytes] = {}
    meter = Meter(pair).start()
    started = time.perf_counter()
    for i in range(SUBFOLDERS):
        (pair.a / top / f"d{i:03d}").mkdir(parents=True)
    for i in range(count):
        relative = f"{top}/d{i % SUBFOLDERS:03d}/f{i:06d}.bin"
        data = os.urandom(SMALL_FILE)
        (pair.a / relative).write_bytes(data)
        expected[relative] = _digest(data)
    details: dict[str, Any] = {"write_s": round(time.perf_counter() - started, 2)}
    say(f"  written in {details['write_s']:.1f} s; awaiting them on B ...")
    arrivals = await_files(pair, expected, started, timeout=max(180.0, count / 25))
    details["cpu_s_when_all_on_b"] = {k: round(v, 2) for k, v in meter.used().items()}
    details["on_b_s"] = {k: round(v, 2) for k, v in arrivals.items()}
    seconds = arrivals["all"]
    say(f"  all {count:,} on B after {seconds:.1f} s ({count / seconds:,.0f} files/s); "
        "settling ...")
    quiet(pair, details)
    cpu, peaks, own = meter.stop()
    details["bench_cpu_s"] = round(own, 2)
    return (Result(count / seconds, "files/s", count, "file", cpu, peaks, details),
            sorted(expected))


class Presence:
    """Which of the files expected under ROOT are there with their SIZE, found cheaply
    enough to ask every POLL_TREE_S about 100,000 files: a folder missing at most
    STAT_NAMES files has those stat'ed; a bigger one is listed (names only, then a stat of
    each expected name present), but not again while its mtime stays what it was when a
    listing began at least MTIME_MARGIN_NS after it (a later rename into it would have
    changed it). Other names (a download's temporary file) are never looked at."""

    def __init__(self, root: Path, relatives: list[str], size: int) -> None:
        self.root, self.size, self.total, self.found = root, size, len(relatives), 0
        self.missing: dict[str, set[str]] = {}
        for relative in relatives:
            folder, name = relative.rsplit("/", 1)
            self.missing.setdefault(folder, set()).add(name)
        self.listed: dict[str, tuple[int, int]] = {}    # folder -> (mtime, listed at), ns
        self.verified: set[str] = set()                   # read and found identical

    def poll(self) -> None:
        for folder, names in self.missing.items():
            if names:
                self._poll(folder, names)

    def _poll(self, folder: str, names: set[str]) -> None:
        path = os.path.join(self.root, folder)
        candidates: set[str] | list[str] = list(names)
        if len(names) > STAT_NAMES:
            listed_at = time.time_ns()
            try:
                mtime = os.stat(path).st_mtime_ns
                seen = self.listed.get(folder)
                if seen is not None and seen[0] == mtime and seen[1] - mtime > MTIME_MARGIN_NS:
                    return
                candidates = names.intersection(os.listdir(path))
            except FileNotFoundError:
                return
            self.listed[folder] = (mtime, listed_at)
        for name in candidates:
            try:
                size = os.stat(os.path.join(path, name)).st_size
            except OSError:
                continue
            if size == self.size:
                names.discard(name)
                self.found += 1
            else:                  # written in place, perhaps: list the folder again
                self.listed.pop(folder, None)

    def verify(self, expected: dict[str, bytes]) -> int:
        """Read every file of EXPECTED (relative path -> BLAKE2b of its bytes) not verified
        yet; those with other bytes are missing again. How many were."""
        wrong = 0
        for relative, digest in expected.items():
            if relative in self.verified:
                continue
            try:
                same = _digest((self.root / relative).read_bytes()) == digest
            except OSError:
                same = False
            if same:
                self.verified.add(relative)
                continue
            folder, name = relative.rsplit("/", 1)
            self.missing[folder].add(name)
            self.listed.pop(folder, None)
            self.found -= 1
            wrong += 1
        return wrong


def await_files(pair: Pair, expected: dict[str, bytes], started: float,
                timeout: float) -> dict[str, float]:
    """Wait until B has every file of EXPECTED (relative path -> BLAKE2b of its bytes):
    every POLL_TREE_S, which have their size (`Presence`); once all have, read and compare
    them all (those with other bytes are awaited again). The seconds after STARTED at
    which the first, half and all were there. Raises BenchError past TIMEOUT or after
    STALL_S without progress."""
    presence = Presence(pair.b, list(expected), SMALL_FILE)
    total = presence.total
    arrivals: dict[str, float] = {}
    last_progress = last_report = time.perf_counter()
    progress = last_wrong = 0
    while True:
        presence.poll()
        now = time.perf_counter()
        if presence.found + len(presence.verified) > progress:
            progress = presence.found + len(presence.verified)
            last_progress = now
        for key, share in (("first", 1 / total), ("half", 0.5), ("all", 1.0)):
            if key not in arrivals and presence.found >= share * total:
                arrivals[key] = now - started
        if presence.found == total:
            wrong = presence.verify(expected)
            if not wrong:
                return arrivals
            if wrong != last_wrong:
                say(f"  {wrong} files on B have other bytes; awaiting them again")
            last_wrong = wrong
            del arrivals["all"]
        if now - last_report >= REPORT_S:
            last_report = now
            say(f"  B has {presence.found:,}/{total:,} after {now - started:.0f} s")
        pair.check()
        if now - started > timeout or now - last_progress > STALL_S:
            why = "in" if now - started > timeout else "with no progress for"
            raise BenchError(f"B had {presence.found:,} of {total:,} files "
                             f"({len(presence.verified):,} verified) {why} "
                             f"{min(now - started, now - last_progress):.0f} s")
        time.sleep(POLL_TREE_S)


def edits(pair: Pair, files: list[str], count: int) -> Result:
    """COUNT edits among FILES (synced by `small_files`), EDIT_SPACING_S apart."""
    return _timed_edits(pair, count, random.Random(20261206), {"files": len(files)},
                        lambda _, rng: rng.choice(files))


def _timed_edits(pair: Pair, count: int, rng: random.Random, details: dict[str, Any],
                 pick: Callable[[int, random.Random], str]) -> Result:
    """Once settled, COUNT edits (200-800 random bytes) of the files PICK names for edit
    i, each awaited on B, EDIT_SPACING_S apart: p50, and the CPU of the whole phase."""
    quiet(pair, details, "settled_before_s")
    meter = Meter(pair).start()
    seconds = []
    for i in range(count):
        data = os.urandom(rng.randint(200, 800))
        seconds.append(_edit(pair, pick(i, rng), data, f"edit {i}"))
        time.sleep(EDIT_SPACING_S)
    cpu, peaks, own = meter.stop()
    details.update(_latencies(seconds), bench_cpu_s=round(own, 2))
    return Result(nearest_rank(seconds, 0.5), "s", count, "edit", cpu, peaks, details)


def big_file(pair: Pair, size: int) -> Result:
    details: dict[str, Any] = {"bytes": size}
    quiet(pair, details, "settled_before_s")
    meter = Meter(pair).start()
    begun = time.perf_counter()
    digest = write_random_file(pair.a / "big.bin", size)
    written = time.perf_counter()
    details["write_s"] = round(written - begun, 2)
    say(f"  written and fsynced in {written - begun:.1f} s; awaiting it on B ...")
    target = pair.b / "big.bin"
    deadline = written + 60 + 300 * size / (1024 * MIB)
    checked: tuple[int, int] | None = None
    last_report = written
    while True:
        now = time.perf_counter()
        with contextlib.suppress(OSError):
            stat = target.stat()
            if stat.st_size == size and (stat.st_ino, stat.st_mtime_ns) != checked:
                if file_hash(target) == digest:
                    break
                checked = (stat.st_ino, stat.st_mtime_ns)
                say("  B's big.bin has the size but other bytes (BLAKE3); waiting on")
        pair.check()
        if now > deadline:
            raise BenchError(f"B had no identical {size / MIB:,.0f} MiB file after "
                             f"{now - written:.0f} s")
        if now - last_report >= 10:
            last_report = now
            say(f"  {now - written:.0f} s: not on B yet")
        time.sleep(POLL_BIG_S)
    seconds = now - written
    details["seconds"] = round(seconds, 2)
    details["cpu_s_when_on_b"] = {k: round(v, 2) for k, v in meter.used().items()}
    say(f"  on B after {seconds:.1f} s ({size / seconds / 1e6:,.0f} MB/s); settling ...")
    quiet(pair, details)
    cpu, peaks, own = meter.stop()
    details["bench_cpu_s"] = round(own, 2)
    return Result(size / seconds / 1e6, "MB/s", size / 1e9, "GB", cpu, peaks, details)
