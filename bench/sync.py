#!/usr/bin/env python3
"""Benchmark of `cairn sync DIR`: two agents of one user, each syncing its own folder
continuously, against a real `cairnd serve` on 127.0.0.1.

Agents A and B (`cairn --home H sync DIR -v`, CAIRN_DISCOVERY=off) run for the whole
benchmark; everything is written on A and awaited on B. In one run, beside this machine's
own limits measured in the same run:

- propagation latency: CHANGES small changes on A (a new file or an edit of one, 200-800
  random bytes, write + close), one at a time at least SPACING_S apart; for each, the time
  from the write on A to B's file holding exactly those bytes (B's file read every 2 ms).
  p50 <= 0.5 s and p99 <= 2 s; no machine limit applies, so the ratio is to the target.
  The appliance's change journal splits each latency into A's side (write -> the change is
  recorded) and B's side (recorded -> the file is on B);
- many small files: FILES files of 4 KiB (random) written into 100 subfolders of A; from
  the first write until B has them all with the right bytes: files/s end to end, target
  >= 1,000/s, and its ratio to this machine's create + write 4 KiB + fsync rate (2,000
  files, one thread, same filesystem, the better of a run at the start and one at the end);
  then CHANGES/5 more latency changes with those files in the folder (for information:
  every round scans the whole folder);
- edits among many (issue 11): once those FILES are synced and both agents settled,
  EDITS small edits of random files among them (200-800 new bytes each, awaited on B,
  1.5 s apart): the CPU that A, B and the appliance used over the phase, per edit (target
  <= 0.05 CPU-s with 10,000 files), propagation p50 (<= 0.3 s with 10,000 files, <= 0.5 s
  with 100,000), each agent's peak RSS (<= 200 MiB with 100,000 files); and the
  near-empty p50 of the first latency phase no worse than 0.26 s;
- one big file (1 GiB of random bytes) written and fsynced on A: from the end of writing
  until B has the complete file (size, then BLAKE3 compared): MB/s and its ratio to a
  `dd bs=4M oflag=direct conv=fdatasync` write on the same filesystem (the better of
  the start and the end);
- idle CPU: once both agents settled, their CPU time (utime + stime, /proc/PID/stat) over
  IDLE_S with no change: CPU-s per minute and % of one core, target <= 1% (no busy
  polling); and each agent's peak RSS (VmHWM) after the big file;
- conflicted copies in either folder: A is the only writer, so there must be none.

Each phase prints where its time went: the CPU seconds of A, B, the appliance and this
script, and what the agents' -v logs say they did (per-file lines, batches, other lines).

A figure that cannot be obtained (a bounded wait ran out, an agent died) is reported as
such, with the last lines of the agents' logs, and the other figures are still measured.
Everything happens in a fresh folder under /tmp (--dir), deleted at the end unless --keep;
the results go to bench/out/sync.json and the agents' -v logs to bench/out/sync-A.log and
sync-B.log. Exits 1 if a target is missed or a figure could not be obtained.

    .venv/bin/python bench/sync.py [--quick] [--files N] [--edits E] [--phases LIST]
                                   [--keep] [--dir DIR]

e.g. the 100,000-file figures alone: --files 100000 --phases many,edits

See docs/benchmarks.md ("Sync") for the figures measured on the project's machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import apsw
from harness import (
    Appliance,
    BenchError,
    Figure,
    SyncAgent,
    dd_write_mbs,
    file_hash,
    format_table,
    free_bytes,
    machine_info,
    nearest_rank,
    new_code,
    own_cpu_seconds,
    peak_rss_mib,
    rss_mib,
    say,
    sync_agent,
    wait_bytes,
    write_random_file,
)
from harness import cpu_seconds as process_cpu_seconds
from harness import settle as harness_settle
from transfer import running_appliance

BENCH = Path(__file__).resolve().parent
PART = ".cairn-part"           # agent/download.py PART_SUFFIX: a download in progress
MIB = 1024 * 1024
GIB = 1024 * MIB
USER = "bench"                 # the user running_appliance adds
SPACING_S = 0.3                # between two latency changes, at least
POLL_TREE_S = 0.25             # B's folder, while waiting for many files
POLL_BIG_S = 0.02              # B's big file (a stat)
CHANGE_TIMEOUT_S = 10.0
MISSES_IN_A_ROW = 3            # latency changes that never arrived: give up the figure
SMALL_FILE = 4096
SUBFOLDERS = 100
FSYNC_PROBE_FILES = 2000
SETTLE_WINDOW_S = 2.0
SETTLE_CPU_S = 0.04            # per agent over the window: "settled"
SETTLE_TIMEOUT_S = 120.0
WARMUP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 15
CONFLICT_MARKER = "conflicted copy from"    # agent/sync/names.py MARKER
LOG_GRACE_S = 0.5

TARGET_P50_S = 0.5
TARGET_P99_S = 2.0
TARGET_FILES_PER_S = 1000.0
TARGET_IDLE_CORE_PCT = 1.0
# Issue 11 (a sync core whose cost follows the change): a small edit of one file among N
# synced, all three processes' CPU per edit and its propagation; and the near-empty p50
# no worse than before the rebuild.
TARGET_NEAR_EMPTY_P50_S = 0.26
TARGET_EDIT_CPU_S = 0.05           # with 10,000 files synced
TARGET_EDIT_P50_S = 0.3            # with 10,000 files synced
TARGET_EDIT_P50_100K_S = 0.5       # with 100,000 files synced
TARGET_AGENT_RSS_MIB = 200.0       # with 100,000 files synced
EDIT_SPACING_S = 1.5               # after each edit arrived, before the next
PHASES = ("latency", "many", "edits", "big", "idle")


@dataclass(frozen=True)
class Sizes:
    changes: int
    files: int
    big_bytes: int
    idle_s: float
    dd_mib: int
    edits: int


FULL = Sizes(changes=100, files=10_000, big_bytes=GIB, idle_s=30.0, dd_mib=1024, edits=20)
QUICK = Sizes(changes=20, files=1_000, big_bytes=64 * MIB, idle_s=10.0, dd_mib=256,
              edits=10)


class PhaseFailed(BenchError):
    """A figure could not be obtained (a bounded wait ran out, an agent exited...)."""


# -- processes ----------------------------------------------------------------------------


def cpu_seconds(device: SyncAgent) -> float:
    return process_cpu_seconds(device.pid)


def check_running(*devices: SyncAgent) -> None:
    for device in devices:
        if not device.running():
            code = None if device.process is None else device.process.poll()
            raise PhaseFailed(f"agent {device.name} is not running (exit code {code})")


def log_size(device: SyncAgent) -> int:
    try:
        return device.log.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(device: SyncAgent, offset: int) -> str:
    with contextlib.suppress(FileNotFoundError), open(device.log, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")
    return ""


def log_tail(device: SyncAgent, lines: int = LOG_TAIL_LINES) -> list[str]:
    return device.log_text().strip().splitlines()[-lines:]


BATCH_UP = re.compile(r"uploaded (\d+) small files in a batch")
BATCH_DOWN = re.compile(r"downloaded (\d+) small files in a batch")
ONE_UP = re.compile(r"\d\d:\d\d:\d\d uploaded (?!\d+ small files in a batch)")
ONE_DOWN = re.compile(r"\d\d:\d\d:\d\d downloaded (?!\d+ small files in a batch)")


def summarise_log(text: str) -> str:
    """What an agent's -v log says it did: per-file transfer lines, batches, other lines."""
    up = [int(m[1]) for m in BATCH_UP.finditer(text)]
    down = [int(m[1]) for m in BATCH_DOWN.finditer(text)]
    files_up, files_down = len(ONE_UP.findall(text)), len(ONE_DOWN.findall(text))
    known = (BATCH_UP, BATCH_DOWN, ONE_UP, ONE_DOWN)
    other = [line for line in text.splitlines()
             if line.strip() and not any(p.search(line) for p in known)]
    parts = []
    if files_up or files_down:
        parts.append(f"{files_up} 'uploaded PATH' and {files_down} 'downloaded PATH' lines")
    if up:
        parts.append(f"{len(up)} upload batches ({sum(up)} files, largest {max(up)})")
    if down:
        parts.append(f"{len(down)} download batches ({sum(down)} files, largest {max(down)})")
    if other:
        parts.append(f"{len(other)} other lines, e.g. {other[-1][:160]!r}")
    return "; ".join(parts) or "nothing logged"


# -- the appliance's journal --------------------------------------------------------------


def journal(database: Path) -> tuple[int, float]:
    """(latest cursor, its wall-clock time) of the appliance's change journal."""
    rows = _query(database, "SELECT coalesce(max(cursor), 0), coalesce(max(at), 0) "
                            "FROM changes")
    return int(rows[0][0]), float(rows[0][1])


def journal_timeline(database: Path, after: int, since: float) -> str:
    """The changes recorded after cursor AFTER, by kind of change and of node, with their
    first and last times in seconds after the wall-clock time SINCE."""
    rows = _query(database, "SELECT c.kind, n.kind, count(*), min(c.at), max(c.at) "
                            "FROM changes c JOIN nodes n ON n.id = c.node_id "
                            "WHERE c.cursor > ? GROUP BY 1, 2 ORDER BY 4", (after,))
    return ", ".join(f"{count:,} {change} {kind} at {first - since:.2f}-{last - since:.2f} s"
                     for change, kind, count, first, last in rows) or "none"


def _query(database: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    connection = apsw.Connection(str(database), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        connection.set_busy_timeout(10_000)
        return [tuple(row) for row in connection.execute(sql, args)]
    finally:
        connection.close()


# -- machine limits -----------------------------------------------------------------------


def fsync_files_per_s(folder: Path, count: int = FSYNC_PROBE_FILES) -> float:
    """Create + write 4 KiB + fsync, one file after another, in 20 folders (one thread)."""
    probe = folder / "fsync-probe"
    data = [os.urandom(SMALL_FILE) for _ in range(16)]
    try:
        for i in range(20):
            (probe / f"d{i:02d}").mkdir(parents=True)
        started = time.perf_counter()
        for i in range(count):
            fd = os.open(probe / f"d{i % 20:02d}" / f"f{i:05d}", os.O_WRONLY | os.O_CREAT
                         | os.O_EXCL, 0o644)
            try:
                os.write(fd, data[i % len(data)])
                os.fsync(fd)
            finally:
                os.close(fd)
        return count / (time.perf_counter() - started)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# -- waiting on B -------------------------------------------------------------------------


def settle(devices: tuple[SyncAgent, ...], timeout: float = SETTLE_TIMEOUT_S) -> float:
    """Wait until every agent used under SETTLE_CPU_S over SETTLE_WINDOW_S; seconds
    waited. Raises a BenchError after TIMEOUT (PhaseFailed if an agent exited)."""
    return harness_settle(lambda: {d.name: cpu_seconds(d) for d in devices},
                          check=lambda: check_running(*devices), window_s=SETTLE_WINDOW_S,
                          cpu_s=SETTLE_CPU_S, timeout_s=timeout)


# -- the run ------------------------------------------------------------------------------


@dataclass
class SyncBench:
    sizes: Sizes
    run_dir: Path
    figures: list[Figure] = field(default_factory=list)
    ratio_to: list[tuple[Figure, str]] = field(default_factory=list)   # limit set at the end
    measured_limits: dict[str, list[float]] = field(
        default_factory=lambda: {"dd": [], "fsync": []})
    failures: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    appliance: Appliance | None = None
    many_files: list[str] = field(default_factory=list)     # synced by `small_files`
    a: SyncAgent | None = None
    b: SyncAgent | None = None

    @property
    def devices(self) -> tuple[SyncAgent, SyncAgent]:
        assert self.a is not None and self.b is not None
        return self.a, self.b

    @property
    def database(self) -> Path:
        assert self.appliance is not None
        return self.appliance.database

    def phase(self, name: str, work: Callable[[], None]) -> bool:
        """Run one phase; a failure is recorded with the agents' log tails, not raised."""
        offsets = {d.name: log_size(d) for d in self.devices} if self.a else {}
        cpu_before = self._cpu_now()
        started = time.monotonic()
        try:
            work()
            return True
        except (BenchError, AssertionError, OSError, apsw.Error) as exc:
            tails = {d.name: log_tail(d) for d in self.devices} if self.a else {}
            self.failures.append({"figure": name, "why": str(exc), "log_tails": tails})
            say(f"  FAILED ({name}): {exc}")
            for who, lines in tails.items():
                say(f"  agent {who} log (last lines):\n    " + "\n    ".join(lines))
            return False
        finally:
            if offsets:
                time.sleep(LOG_GRACE_S)      # B logs a download just after its rename
                wall = time.monotonic() - started
                cpu = {who: used - cpu_before.get(who, 0.0)
                       for who, used in self._cpu_now().items()}
                self.extra.setdefault("phase_cpu_s", {})[name] = {
                    "wall": round(wall, 2), **{k: round(v, 2) for k, v in cpu.items()}}
                say(f"  [{name}: {wall:.1f} s wall; CPU-s " + ", ".join(
                    f"{who} {used:.1f}" for who, used in cpu.items()) + "] " + " | ".join(
                    f"{d.name}: {summarise_log(log_since(d, offsets[d.name]))}"
                    for d in self.devices))

    def _cpu_now(self) -> dict[str, float]:
        """CPU seconds so far of each agent, the appliance and this script."""
        used = {}
        for device in (self.a, self.b):
            if device is not None and device.running():
                with contextlib.suppress(OSError):
                    used[f"agent {device.name}"] = cpu_seconds(device)
        if self.appliance is not None:
            used["appliance"] = self.appliance.cpu_seconds()
        used["bench"] = own_cpu_seconds()
        return used

    # -- machine limits --

    def limits(self, when: str) -> None:
        """dd write and the fsync'd small-file rate, at the start and again at the end
        (the disk is shared): the better of the two is the limit."""
        say(f"[limits, {when}] dd write of {self.sizes.dd_mib} MiB (oflag=direct, "
            f"conv=fdatasync) in {self.run_dir} ...")
        dd = dd_write_mbs(self.run_dir, self.sizes.dd_mib)
        say(f"  {dd:,.0f} MB/s")
        say(f"[limits, {when}] create + write 4 KiB + fsync of {FSYNC_PROBE_FILES} files ...")
        rate = fsync_files_per_s(self.run_dir)
        say(f"  {rate:,.0f} files/s")
        self.measured_limits["dd"].append(dd)
        self.measured_limits["fsync"].append(rate)

    def limit_figures(self) -> list[Figure]:
        """The limits' rows, and each ratio figure's limit set to the better measurement."""
        dd, fsync = self.measured_limits["dd"], self.measured_limits["fsync"]
        best = {"dd": max(dd, default=math.nan), "fsync": max(fsync, default=math.nan)}
        for figure, key in self.ratio_to:
            figure.limit = best[key]
        self.extra.update(dd_write_mbs=[round(v, 1) for v in dd],
                          fsync_files_per_s=[round(v, 1) for v in fsync])
        rows = []
        if dd:
            rows.append(Figure("dd write (oflag=direct, fdatasync)", best["dd"], "MB/s",
                               note=f"{self.sizes.dd_mib} MiB in 4 MiB writes in the run's "
                                    "folder; the better of the start and the end: "
                                    + ", ".join(f"{v:,.0f}" for v in dd) + " MB/s"))
        if fsync:
            rows.append(Figure("create+write+fsync, 4 KiB files", best["fsync"], "files/s",
                               note=f"{FSYNC_PROBE_FILES} files in 20 folders, one thread, "
                                    "same filesystem; the better of the start and the end: "
                                    + ", ".join(f"{v:,.0f}" for v in fsync) + " files/s"))
        return rows

    # -- start --

    def warm_up(self) -> None:
        a, b = self.devices
        a.start()
        b.start()
        say(f"[start] cairn sync running: A pid {a.pid}, B pid {b.pid}; a first "
            "file A -> B ...")
        data = os.urandom(64)
        written = time.perf_counter()
        (a.folder / "warm-up.txt").write_bytes(data)
        arrived = wait_bytes(b.folder / "warm-up.txt", data, written + WARMUP_TIMEOUT_S)
        check_running(a, b)
        if arrived is None:
            raise PhaseFailed(f"a first file did not reach B in {WARMUP_TIMEOUT_S:.0f} s")
        say(f"  arrived in {arrived - written:.2f} s; settling ...")
        say(f"  settled after {settle(self.devices):.1f} s")

    # -- 1. latency --

    def latency(self) -> None:
        self._latency(self.sizes.changes, "note", judged=True)

    def latency_among_many(self) -> None:
        """Again, once the small files are synced: every round scans the whole folder."""
        self._latency(max(10, self.sizes.changes // 5), "busy", judged=False)

    def _latency(self, count: int, prefix: str, judged: bool) -> None:
        a, b = self.devices
        say(f"[latency] {count} changes on A, at least {SPACING_S} s apart, each awaited on "
            f"B (read every 2 ms); {sum(1 for _ in a.folder.rglob('*')):,} items in the "
            "folder ...")
        rng = random.Random(20261124)
        created: list[str] = []
        samples: list[dict[str, Any]] = []
        misses = missed_in_a_row = 0
        next_at = time.perf_counter()
        for i in range(count):
            time.sleep(max(0.0, next_at - time.perf_counter()))
            edit = bool(created) and i % 3 == 2
            name = rng.choice(created) if edit else f"{prefix}-{i:03d}.txt"
            data = os.urandom(rng.randint(200, 800))
            wall, written = time.time(), time.perf_counter()
            with open(a.folder / name, "wb") as handle:
                handle.write(data)
            arrived = wait_bytes(b.folder / name, data, written + CHANGE_TIMEOUT_S)
            next_at = written + SPACING_S
            if arrived is None:
                misses += 1
                missed_in_a_row += 1
                say(f"  change {i} ({'edit' if edit else 'new'} {name}) not on B after "
                    f"{CHANGE_TIMEOUT_S:g} s")
                check_running(a, b)
                if missed_in_a_row >= MISSES_IN_A_ROW:
                    raise PhaseFailed(f"{missed_in_a_row} changes in a row did not reach B "
                                      f"within {CHANGE_TIMEOUT_S:g} s each ({len(samples)} "
                                      f"of {i + 1} arrived)")
                continue
            missed_in_a_row = 0
            if not edit:
                created.append(name)
            seconds = arrived - written
            _, recorded_at = journal(self.database)
            a_side = recorded_at - wall
            samples.append({"i": i, "kind": "edit" if edit else "new", "size": len(data),
                            "seconds": seconds, "a_side": a_side, "b_side": seconds - a_side})
            if (i + 1) % 10 == 0 or i + 1 == count:
                so_far = [s["seconds"] for s in samples]
                say(f"  {i + 1}/{count}: last {seconds:.3f} s, median so far "
                    f"{statistics.median(so_far):.3f} s, max {max(so_far):.3f} s")
        if misses:
            raise PhaseFailed(f"{misses} of {count} changes never reached B within "
                              f"{CHANGE_TIMEOUT_S:g} s")
        self._latency_figures(samples, judged)

    def _latency_figures(self, samples: list[dict[str, Any]], judged: bool) -> None:
        """p50 and p99 against their targets (JUDGED), or p50 for information."""
        seconds = [s["seconds"] for s in samples]
        p50, p99 = nearest_rank(seconds, 0.50), nearest_rank(seconds, 0.99)

        def median_of(key: str, kind: str | None = None) -> float:
            chosen = [float(s[key]) for s in samples if kind in (None, s["kind"])]
            return statistics.median(chosen) if chosen else math.nan

        new, edits = (sum(1 for s in samples if s["kind"] == k) for k in ("new", "edit"))
        note = (f"{len(samples)} changes ({new} new files, {edits} edits of 200-800 B); "
                f"median new {median_of('seconds', 'new'):.3f} s, edit "
                f"{median_of('seconds', 'edit'):.3f} s; mean {statistics.mean(seconds):.3f}"
                f" s, max {max(seconds):.3f} s; median A side (write -> recorded by the "
                f"appliance) {median_of('a_side'):.3f} s, B side (recorded -> on B) "
                f"{median_of('b_side'):.3f} s")
        say(f"  p50 {p50:.3f} s, p99 {p99:.3f} s; {note}")
        limit_name = "s = the target (no machine limit)"
        if not judged:
            files = self.sizes.files
            self.figures.append(Figure(
                f"propagation p50, {files:,} more files synced", p50, "s", TARGET_P50_S,
                limit_name, note=f"p99 {p99:.3f} s; {note}"))
            self.extra["latency_among_many"] = {"p50_s": round(p50, 4), "p99_s": round(p99, 4)}
            return
        self.figures += [
            Figure(f"propagation A -> B, p50 ({len(samples)} changes)", p50, "s",
                   TARGET_P50_S, limit_name, 1.0, at_most=True, note=note),
            Figure("near-empty p50, no worse than before the sync core rebuild", p50, "s",
                   target=TARGET_NEAR_EMPTY_P50_S, at_most=True,
                   note="0.26 s before issue 11"),
            Figure(f"propagation A -> B, p99 ({len(samples)} changes)", p99, "s",
                   TARGET_P99_S, limit_name, 1.0, at_most=True),
        ]
        self.extra["latency"] = {"p50_s": round(p50, 4), "p99_s": round(p99, 4),
                                 "samples": [{k: round(v, 4) if isinstance(v, float) else v
                                              for k, v in s.items()} for s in samples]}

    # -- 2. many small files --

    def small_files(self) -> None:
        a, b = self.devices
        count = self.sizes.files
        say(f"[small files] {count:,} files of 4 KiB into {SUBFOLDERS} folders of A; "
            "awaiting all of them on B ...")
        cursor, _ = journal(self.database)
        expected: dict[str, bytes] = {}
        wall, started = time.time(), time.perf_counter()
        for i in range(SUBFOLDERS):
            (a.folder / "many" / f"d{i:03d}").mkdir(parents=True)
        for i in range(count):
            relative = f"many/d{i % SUBFOLDERS:03d}/f{i:05d}.bin"
            data = os.urandom(SMALL_FILE)
            (a.folder / relative).write_bytes(data)
            expected[relative] = data
        self.many_files = sorted(expected)
        write_s = time.perf_counter() - started
        say(f"  written in {write_s:.2f} s")
        arrivals: dict[str, float] = {}
        try:
            wrong = self._await_files(b, expected, started, arrivals,
                                      timeout=max(120.0, count / 25))
        finally:
            timeline = journal_timeline(self.database, cursor, wall)
            on_b = ", ".join(f"{k} at {v:.2f} s" for k, v in arrivals.items())
            say(f"  appliance journal (s after the first write): {timeline}")
            say(f"  on B: {on_b or 'nothing'}")
        seconds = arrivals["all"]
        rate = count / seconds
        rss = {d.name: round(peak_rss_mib(d.pid), 1) for d in self.devices}
        note = (f"{count:,} x 4 KiB in {SUBFOLDERS} folders in {seconds:.1f} s (writing on A "
                f"{write_s:.1f} s); appliance journal: {timeline}; on B: {on_b}; {wrong} "
                "reads on B saw other bytes before the right ones; peak RSS so far "
                + ", ".join(f"{who} {mib:.0f} MiB" for who, mib in rss.items()))
        say(f"  {rate:,.0f} files/s end to end")
        versus_fsync = Figure("small files A -> B vs create+write+fsync", rate, "files/s",
                              limit_name="files/s fsynced")
        self.figures += [
            Figure(f"small files A -> B ({count:,} x 4 KiB), end to end", rate, "files/s",
                   target=TARGET_FILES_PER_S, note=note),
            versus_fsync,
        ]
        self.ratio_to.append((versus_fsync, "fsync"))
        self.extra["small_files"] = {"files": count, "write_seconds": round(write_s, 2),
                                     "on_b_s": {k: round(v, 2) for k, v in arrivals.items()},
                                     "journal": timeline, "peak_rss_mib": rss}

    def _await_files(self, b: SyncAgent, expected: dict[str, bytes], started: float,
                     arrivals: dict[str, float], timeout: float) -> int:
        """Wait until every file of EXPECTED is on B with its bytes; ARRIVALS gets the
        seconds after STARTED at which the first, half and all were there. How many reads
        saw other bytes first. Raises PhaseFailed past TIMEOUT or after a stall."""
        verified: set[str] = set()
        wrong = 0
        last_progress = last_report = time.perf_counter()
        stall_s = min(timeout, 90.0)
        while True:
            found_before = len(verified)
            for current, _, names in os.walk(b.folder / "many"):
                prefix = os.path.relpath(current, b.folder) + "/"
                for name in names:
                    relative = prefix + name
                    if relative in verified or name.endswith(PART) or relative not in expected:
                        continue
                    with contextlib.suppress(OSError):
                        if (b.folder / relative).read_bytes() == expected[relative]:
                            verified.add(relative)
                        else:
                            wrong += 1
            now = time.perf_counter()
            for key, share in (("first", 1 / len(expected)), ("half", 0.5), ("all", 1.0)):
                if key not in arrivals and len(verified) >= share * len(expected):
                    arrivals[key] = now - started
            if len(verified) == len(expected):
                return wrong
            if len(verified) > found_before:
                last_progress = now
            if now - last_report >= 5:
                last_report = now
                say(f"  B has {len(verified):,}/{len(expected):,} after {now - started:.0f} s")
            check_running(*self.devices)
            if now - started > timeout or now - last_progress > stall_s:
                why = "in" if now - started > timeout else "with no progress for"
                raise PhaseFailed(f"B had {len(verified):,} of {len(expected):,} files "
                                  f"{why} {min(now - started, now - last_progress):.0f} s")
            time.sleep(POLL_TREE_S)

    # -- 2b. one edit among many --

    def edits(self) -> None:
        """Small edits of files among the FILES synced: each rewrites one with 200-800 new
        bytes, is awaited on B, then EDIT_SPACING_S pass. The CPU every process used over
        the whole phase (idle time between edits included, as a user's machine would see
        it), per edit; propagation p50; and each process's memory."""
        a, b = self.devices
        assert self.appliance is not None
        if not self.many_files:
            raise PhaseFailed("no synced files to edit (the small files phase did not run)")
        files, count = len(self.many_files), self.sizes.edits
        say(f"[edits] {count} edits among {files:,} synced files, each awaited on B, "
            f"{EDIT_SPACING_S:g} s apart; settling first ...")
        say(f"  settled after {settle(self.devices):.1f} s")
        rng = random.Random(20261205)
        processes = {"A": a.pid, "B": b.pid, "appliance": self.appliance.pid}
        before = {who: process_cpu_seconds(pid) for who, pid in processes.items()}
        seconds: list[float] = []
        for i in range(count):
            name = rng.choice(self.many_files)
            data = os.urandom(rng.randint(200, 800))
            written = time.perf_counter()
            with open(a.folder / name, "wb") as handle:
                handle.write(data)
            arrived = wait_bytes(b.folder / name, data, written + CHANGE_TIMEOUT_S)
            check_running(a, b)
            if arrived is None:
                raise PhaseFailed(f"edit {i} of {name} did not reach B in "
                                  f"{CHANGE_TIMEOUT_S:g} s")
            seconds.append(arrived - written)
            time.sleep(EDIT_SPACING_S)
        used = {who: (process_cpu_seconds(pid) - before[who]) / count
                for who, pid in processes.items()}
        total = sum(used.values())
        p50 = nearest_rank(seconds, 0.5)
        many = files >= 100_000
        per = ", ".join(f"{who} {cpu:.3f}" for who, cpu in used.items())
        memory = {who: (peak_rss_mib(pid), rss_mib(pid)) for who, pid in processes.items()}
        say(f"  p50 {p50:.3f} s, max {max(seconds):.3f} s; CPU-s per edit {per}; total "
            f"{total:.3f}; RSS peak/now MiB " + ", ".join(
                f"{who} {peak:.0f}/{now:.0f}" for who, (peak, now) in memory.items()))
        self.figures += [
            Figure(f"edit propagation p50, {files:,} files synced", p50, "s",
                   target=TARGET_EDIT_P50_100K_S if many else TARGET_EDIT_P50_S,
                   at_most=True, note=f"{count} edits; max {max(seconds):.3f} s"),
            Figure(f"CPU per edit, A + B + appliance, {files:,} files synced", total,
                   "CPU-s", target=None if many else TARGET_EDIT_CPU_S, at_most=True,
                   note=f"{per} (over {count} edits {EDIT_SPACING_S:g} s apart, idle "
                        "time included)"),
        ]
        for who in ("A", "B"):
            peak, now = memory[who]
            self.figures.append(Figure(
                f"peak RSS, agent {who}, {files:,} files synced", peak, "MiB",
                target=TARGET_AGENT_RSS_MIB if many else None, at_most=True,
                note=f"now {now:.0f} MiB (VmHWM covers every phase so far)"))
        self.extra["edits"] = {"files": files, "edits": count, "p50_s": round(p50, 4),
                               "max_s": round(max(seconds), 4),
                               "cpu_s_per_edit": {k: round(v, 4) for k, v in used.items()},
                               "rss_mib_peak_now": {k: [round(x, 1) for x in v]
                                                    for k, v in memory.items()}}

    # -- 3. one big file --

    def big_file(self) -> None:
        a, b = self.devices
        size = self.sizes.big_bytes
        label = f"{size / MIB:,.0f} MiB"
        say(f"[big file] {label} of random bytes written and fsynced on A; awaiting it on B")
        cursor, _ = journal(self.database)
        begun = time.perf_counter()
        digest = write_random_file(a.folder / "big.bin", size)
        wall, written = time.time(), time.perf_counter()
        self.extra["big_file_write_s"] = round(written - begun, 2)
        say("  written; waiting for B ...")
        target = b.folder / "big.bin"
        deadline = written + 60 + 300 * size / GIB
        last_report = written
        while True:
            with contextlib.suppress(OSError):
                if target.stat().st_size == size:
                    break
            now = time.perf_counter()
            check_running(a, b)
            if now > deadline:
                raise PhaseFailed(f"B had no complete {label} file after "
                                  f"{now - written:.0f} s (parts: {self._parts(b)})")
            if now - last_report >= 5:
                last_report = now
                say(f"  {now - written:.0f} s: B's parts {self._parts(b)}")
            time.sleep(POLL_BIG_S)
        seconds = time.perf_counter() - written
        if file_hash(target) != digest:
            raise PhaseFailed("B's big.bin has the right size but other bytes (BLAKE3)")
        _, recorded_at = journal(self.database)
        mbs = size / seconds / 1e6
        note = (f"{label} in {seconds:.1f} s after A's fsync (writing took "
                f"{written - begun:.1f} s), identical (BLAKE3); appliance journal (s after "
                f"the fsync): {journal_timeline(self.database, cursor, wall)}; so A's side "
                f"{recorded_at - wall:.1f} s, B's side {seconds - (recorded_at - wall):.1f} s")
        say(f"  {mbs:,.0f} MB/s; {note}")
        big = Figure(f"big file A -> B ({label})", mbs, "MB/s", limit_name="MB/s dd write",
                     note=note)
        self.figures.append(big)
        self.ratio_to.append((big, "dd"))
        self.extra["big_file"] = {"bytes": size, "seconds": round(seconds, 2),
                                  "a_side_s": round(recorded_at - wall, 2)}
        say(f"  settled after {settle(self.devices):.1f} s")
        for device in self.devices:
            rss = peak_rss_mib(device.pid)
            self.figures.append(Figure(f"peak RSS, agent {device.name}", rss, "MiB",
                                       note="VmHWM after the big file (all phases so far)"))
            self.extra[f"peak_rss_mib_{device.name}"] = round(rss, 1)
        say("  peak RSS: " + ", ".join(f"{d.name} {peak_rss_mib(d.pid):.0f} MiB"
                                       for d in self.devices))

    @staticmethod
    def _parts(device: SyncAgent) -> str:
        sizes = []
        for current, _, names in os.walk(device.folder):
            for name in names:
                if name.endswith(PART):
                    with contextlib.suppress(OSError):
                        sizes.append(os.stat(os.path.join(current, name)).st_blocks * 512)
        return ", ".join(f"{s / MIB:,.0f} MiB written" for s in sizes) or "none"

    # -- correctness --

    def conflicts(self) -> None:
        """Only A writes, so no conflicted copy should ever appear: count them, and quote
        the agents' log lines that made them."""
        copies = sorted({name for device in self.devices
                         for _, _, names in os.walk(device.folder)
                         for name in names if CONFLICT_MARKER in name})
        lines = [f"{d.name}: {line}" for d in self.devices
                 for line in d.log_text().splitlines() if "conflict" in line]
        say(f"[conflicts] {len(copies)} conflicted copies" + "".join(
            f"\n  {line[:300]}" for line in lines[:6]))
        self.figures.append(Figure(
            "conflicted copies (A is the only writer)", len(copies), "files", target=0,
            at_most=True, note="; ".join([*copies[:5], *lines[:3]]) or "none"))
        self.extra["conflicts"] = {"copies": copies, "log_lines": lines}

    # -- 4. idle --

    def idle(self) -> None:
        seconds = self.sizes.idle_s
        say(f"[idle] settling, then {seconds:g} s without changes ...")
        say(f"  settled after {settle(self.devices):.1f} s")
        assert self.appliance is not None
        pids = {d.name: d.pid for d in self.devices}
        before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        server_before = self.appliance.cpu_seconds()
        started = time.monotonic()
        time.sleep(seconds)
        check_running(*self.devices)
        elapsed = time.monotonic() - started
        for name, pid in pids.items():
            used = process_cpu_seconds(pid) - before[name]
            per_minute, share = used * 60 / elapsed, 100 * used / elapsed
            say(f"  agent {name}: {used:.2f} CPU-s in {elapsed:.1f} s = {per_minute:.2f} "
                f"CPU-s/min, {share:.2f}% of a core")
            self.figures.append(Figure(f"idle CPU, agent {name}", share, "% of a core",
                                       target=TARGET_IDLE_CORE_PCT, at_most=True,
                                       note=f"{per_minute:.2f} CPU-s per minute over "
                                            f"{elapsed:.0f} s without changes"))
            self.extra[f"idle_cpu_s_per_min_{name}"] = round(per_minute, 3)
        server = (self.appliance.cpu_seconds() - server_before) * 60 / elapsed
        self.figures.append(Figure("idle CPU, appliance", server / 60 * 100, "% of a core",
                                   note=f"{server:.2f} CPU-s per minute, same window"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller run: {QUICK.changes} changes, {QUICK.files:,} files, "
                             f"{QUICK.big_bytes // MIB} MiB, {QUICK.idle_s:g} s idle")
    parser.add_argument("--files", type=int, default=None, metavar="N",
                        help="files of 4 KiB in the small-files phase, which the edits phase "
                             f"then edits among (default {FULL.files:,}; --quick "
                             f"{QUICK.files:,}); 100000 judges the 100k targets")
    parser.add_argument("--edits", type=int, default=None, metavar="E",
                        help=f"edits in the edits phase (default {FULL.edits}; --quick "
                             f"{QUICK.edits})")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="which phases to run, comma-separated, of "
                             f"{', '.join(PHASES)} (default all; edits needs many); the "
                             "start and the conflicted-copies check always run")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's folder (homes, folders, logs) at the end")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="parent of the run's fresh folder (default /tmp)")
    parser.add_argument("--json", type=Path, default=BENCH / "out" / "sync.json",
                        help="also write the results here (default bench/out/sync.json); "
                             "the agents' logs are copied beside it (sync-A.log, sync-B.log)")
    args = parser.parse_args(argv)
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = args.phases - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))} (known: "
                     f"{', '.join(PHASES)})")
    if "edits" in args.phases and "many" not in args.phases:
        parser.error("the edits phase edits the files the many phase synced: add many")
    if (args.files is not None and args.files < 1) or (args.edits is not None and args.edits < 1):
        parser.error("--files and --edits take a positive number")
    return args


def report(bench: SyncBench, started: float) -> None:
    bench.figures[:0] = bench.limit_figures()
    say("")
    say(format_table(bench.figures))
    say("")
    for f in bench.figures:
        if f.note:
            say(f"  {f.name}: {f.note}")
    for failure in bench.failures:
        say(f"  NOT OBTAINED: {failure['figure']}: {failure['why']}")
    say(f"  total {time.monotonic() - started:.0f} s")


def run_phases(bench: SyncBench, phases: set[str]) -> None:
    if "latency" in phases:
        bench.phase("propagation latency", bench.latency)
    if "many" in phases and bench.phase("small files", bench.small_files):
        if "edits" in phases:
            bench.phase("edits among many files", bench.edits)
        if "latency" in phases:
            bench.phase("propagation latency among many files", bench.latency_among_many)
    if "big" in phases:
        bench.phase("big file and peak RSS", bench.big_file)
    if "idle" in phases:
        bench.phase("idle CPU", bench.idle)
    bench.phase("conflicted copies", bench.conflicts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sizes = replace(sizes, files=args.files or sizes.files, edits=args.edits or sizes.edits,
                    big_bytes=sizes.big_bytes if "big" in args.phases else 0)
    args.dir.mkdir(parents=True, exist_ok=True)
    need = int((3.5 * sizes.big_bytes + sizes.dd_mib * MIB + 4 * sizes.files * 8192) * 1.1)
    free = free_bytes(args.dir)
    if free < need:
        say(f"refusing to run: {args.dir} has {free / 1e9:.1f} GB free, the run needs "
            f"{need / 1e9:.1f} GB")
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="cairn-bench-sync-", dir=args.dir)).resolve()
    info = machine_info(run_dir)
    fs = info.get("filesystem", {})
    say(f"machine: {info.get('nproc')} CPUs, {info.get('memory_gib')} GiB, "
        f"{fs.get('type', '?')} on {fs.get('device', '?')}, load {os.getloadavg()[0]:.1f}; "
        f"run folder {run_dir}")
    bench = SyncBench(sizes, run_dir)
    started = time.monotonic()
    try:
        bench.limits("start")
        with running_appliance(run_dir) as (appliance, code):
            bench.appliance = appliance
            say(f"[start] cairnd serve at {appliance.url} (pid {appliance.pid}); joining A "
                "and B ...")
            bench.a = sync_agent(run_dir, appliance, code, "A")
            bench.b = sync_agent(run_dir, appliance, new_code(appliance.home, USER), "B")
            try:
                if bench.phase("start (first file A -> B)", bench.warm_up):
                    run_phases(bench, args.phases)
            finally:
                for device in (bench.a, bench.b):
                    if device is not None:
                        device.stop()
        try:
            bench.limits("end")
        except Exception as exc:     # the start's limits stand; say why there is no second
            say(f"  the limits could not be measured again at the end: {exc}")
    finally:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for joined in (bench.a, bench.b):
            if joined is not None and joined.log.exists():
                shutil.copy(joined.log, args.json.parent / f"sync-{joined.name}.log")
        if args.keep:
            say(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    report(bench, started)
    payload = {"machine": info, "settings": asdict(sizes) | {"spacing_s": SPACING_S,
                                                             "phases": sorted(args.phases)},
               "figures": [f.to_json() for f in bench.figures], "failures": bench.failures,
               "details": bench.extra, "seconds": round(time.monotonic() - started, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    missed = any(f.verdict == "MISS" for f in bench.figures)
    return 1 if missed or bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
