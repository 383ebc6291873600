#!/usr/bin/env python3
"""Cairn and Syncthing side by side (issue 12): the same workloads, two devices A and B on
127.0.0.1, each system ALONE on the machine (started, its workloads run, stopped; never both
running at once), everything written on A and awaited on B byte for byte.

Cairn: a fresh `cairnd serve` (harness.running_appliance: six disk folders, k=4, m=2, mDNS
off) and two `cairn sync DIR` agents joined with codes (harness.sync_agent,
CAIRN_DISCOVERY=off), all at their defaults (no -v: a line per file costs CPU that a user
does not pay, and Syncthing logs nothing per file either); processes measured: A, B and
the appliance.
Syncthing: 1.19.2 from Debian (installed with apt-get when missing), two devices driven by
bench/syncthing.py: only 127.0.0.1 (GUI/REST and one tcp:// listen address each, the peer at
an explicit address), global and local discovery, relays, NAT traversal, usage and crash
reporting and upgrades off; one shared sendreceive folder whose watcher is on with a 1 s
delay (fsWatcherDelayS 1, the default is 10 s): those are the fairness settings; everything
else is Syncthing's default (fsync on, setLowPriority on). Processes measured: A and B, each
the sum of Syncthing's monitor process and the syncer it runs.

Two sessions, each on fresh devices (a new appliance and agents, or new Syncthing homes):

1. with FILES (10,000) files, in this order:
   - near-empty: 20 small edits of three files in an otherwise empty folder, each awaited
     on B, 1.5 s apart: p50;
   - small files: FILES x 4 KiB random files into 100 new subfolders of A, from the first
     write until B has them all with identical bytes: files/s;
   - edits: E (20) small edits of random files among those, awaited on B, 1.5 s apart:
     p50 and CPU-s per edit;
   - big file: BIG (1 GiB) of random bytes written and fsynced on A, from the end of the
     fsync until B has it (size, then BLAKE3): MB/s and CPU-s per GB;
2. with LARGE (100,000) files: small files and edits again (--skip-large leaves it out).

The sessions run one after the other, each system in turn (Cairn's session 1, Syncthing's
session 1, Cairn's session 2, ...). Every workload measures the CPU seconds of every process
from its first write until the system settled again, and each process's peak RSS sampled
every 0.2 s over that time (bench/workloads.py says exactly how). `dd` write (bs=4M,
oflag=direct, conv=fdatasync) at the start and at the end, the better counts.

The output: one table per workload, both systems' figures and Cairn ÷ Syncthing (for speed,
CPU and memory), then issue 12's targets judged: small files (at FILES and LARGE) >= 1,500
files/s, >= 2 x Syncthing's files/s, CPU per file <= 2 x Syncthing's, and every Cairn
process's peak RSS <= 200 MiB; the big file's MB/s >= Syncthing's and all Cairn processes
<= 10 CPU-s per GB. Every wait is bounded; a figure that cannot be obtained is reported as
NOT OBTAINED (with the logs' last lines) and the others are still measured. Results in
bench/out/compare.json, the devices' logs in bench/out/compare-logs/. Exits 1 if a target
is missed or a figure could not be obtained (everything is printed first).

    .venv/bin/python bench/compare.py [--quick] [--systems cairn,syncthing]
        [--workloads near-empty,small,edits,big] [--files N] [--large-files N]
        [--skip-large] [--edits E] [--dir DIR] [--keep]

--quick: 1,000 files, a 64 MiB big file, no large session. See docs/benchmarks.md
("Cairn vs Syncthing") for the figures measured on the project's machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import syncthing
import workloads
from harness import (
    BenchError,
    Figure,
    Layout,
    SyncAgent,
    dd_write_mbs,
    format_table,
    free_bytes,
    machine_info,
    new_code,
    process_tree,
    running_appliance,
    say,
    sync_agent,
)
from workloads import Pair, Result

BENCH = Path(__file__).resolve().parent
MIB = 1024 * 1024
GIB = 1024 * MIB
USER = "bench"                     # the user running_appliance adds
SYSTEMS = ("cairn", "syncthing")
DISPLAY = {"cairn": "Cairn", "syncthing": "Syncthing"}
WORKLOADS = ("near-empty", "small", "edits", "big")
LOG_TAIL_LINES = 8

TARGET_FILES_PER_S = 1500.0
TARGET_FILES_VS_SYNCTHING = 2.0
TARGET_CPU_PER_FILE_VS_SYNCTHING = 2.0
TARGET_RSS_MIB = 200.0
TARGET_BIG_VS_SYNCTHING = 1.0
TARGET_CPU_PER_GB = 10.0
LAYOUT = Layout()   # the appliance's disks: the harness's default, 4+2 on six folders


@dataclass(frozen=True)
class Sizes:
    files: int
    large_files: int            # 0: no large session
    big_bytes: int
    edits: int
    near_empty_edits: int
    dd_mib: int


FULL = Sizes(files=10_000, large_files=100_000, big_bytes=GIB, edits=20,
             near_empty_edits=20, dd_mib=1024)
QUICK = Sizes(files=1_000, large_files=0, big_bytes=64 * MIB, edits=20, near_empty_edits=20,
              dd_mib=256)


# -- the two systems ------------------------------------------------------------------------


def _tail(text: str) -> str:
    return "\n    ".join(text.strip().splitlines()[-LOG_TAIL_LINES:]) or "(empty)"


def _agent_pids(agent: SyncAgent) -> list[int]:
    return process_tree(agent.process.pid) if agent.running() and agent.process else []


@contextlib.contextmanager
def cairn_pair(run_dir: Path, log_dir: Path) -> Iterator[Pair]:
    with running_appliance(run_dir, USER, LAYOUT) as (appliance, code):
        a = sync_agent(run_dir, appliance, code, "A")
        b = sync_agent(run_dir, appliance, new_code(appliance.home, USER), "B")
        a.verbose = b.verbose = False       # the defaults

        def check() -> None:
            for agent in (a, b):
                if not agent.running():
                    code = None if agent.process is None else agent.process.poll()
                    raise BenchError(f"cairn agent {agent.name} exited {code}")
            if appliance.process.poll() is not None:
                raise BenchError(f"cairnd exited {appliance.process.returncode}")

        def diagnostics() -> str:
            return "".join(f"\n  agent {agent.name}:\n    {_tail(agent.log_text())}"
                           for agent in (a, b)) + f"\n  appliance:\n    {_tail(appliance.stderr())}"

        try:
            a.start()
            b.start()
            yield Pair("cairn", a.folder, b.folder,
                       lambda: {"A": _agent_pids(a), "B": _agent_pids(b),
                                "appliance": process_tree(appliance.pid)},
                       check, diagnostics)
        finally:
            for agent in (a, b):
                agent.stop()
                with contextlib.suppress(OSError):
                    shutil.copy(agent.log, log_dir / f"{run_dir.name}-{agent.name}.log")


@contextlib.contextmanager
def syncthing_devices(run_dir: Path, log_dir: Path) -> Iterator[Pair]:
    with syncthing.syncthing_pair(run_dir) as (a, b):

        def check() -> None:
            a.check()
            b.check()

        def diagnostics() -> str:
            return "".join(f"\n  syncthing {d.name} ({d.folder_status()}):\n    "
                           + "\n    ".join(d.log_tail(LOG_TAIL_LINES)) for d in (a, b))

        try:
            yield Pair("syncthing", a.folder, b.folder,
                       lambda: {"A": a.pids(), "B": b.pids()}, check,
                       diagnostics)
        finally:
            for device in (a, b):
                with contextlib.suppress(OSError):
                    shutil.copy(device.log, log_dir / f"{run_dir.name}-{device.name}.log")


STARTERS: dict[str, Callable[[Path, Path], contextlib.AbstractContextManager[Pair]]] = {
    "cairn": cairn_pair, "syncthing": syncthing_devices}


# -- one run --------------------------------------------------------------------------------


@dataclass
class Session:
    name: str
    files: int
    workloads: frozenset[str]


class Comparison:
    def __init__(self, sizes: Sizes, run_dir: Path, log_dir: Path, keep: bool) -> None:
        self.sizes = sizes
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.keep = keep
        self.results: dict[str, dict[str, Result]] = {}
        self.failures: list[dict[str, str]] = []
        self.dd: list[float] = []

    def fail(self, system: str, workload: str, why: str, diagnostics: str = "") -> None:
        self.failures.append({"system": system, "workload": workload, "why": why,
                              "diagnostics": diagnostics})
        say(f"  NOT OBTAINED ({system}, {workload}): {why}{diagnostics}")

    def measure_dd(self, when: str) -> None:
        try:
            self.dd.append(dd_write_mbs(self.run_dir, self.sizes.dd_mib))
            say(f"[dd, {when}] {self.dd[-1]:,.0f} MB/s ({self.sizes.dd_mib} MiB, bs=4M, "
                "oflag=direct, conv=fdatasync)")
        except (BenchError, OSError) as exc:
            say(f"[dd, {when}] failed: {exc}")

    def session(self, system: str, session: Session) -> None:
        folder = self.run_dir / f"{system}-{session.name}"
        folder.mkdir()
        say(f"\n[{system}, {session.name}] starting two devices (alone on the machine) ...")
        keys = self._keys(session)
        try:
            with STARTERS[system](folder, self.log_dir) as pair:
                seconds = workloads.warm_up(pair)
                say(f"  running; a first file A -> B in {seconds:.2f} s, settled")
                self._workloads(pair, session)
        except (BenchError, OSError) as exc:
            failed = {f["workload"] for f in self.failures if f["system"] == system}
            missing = [k for k in keys if system not in self.results.get(k, {})
                       and k not in failed]
            self.fail(system, ", ".join(missing) or session.name, f"the session ended: {exc}")
        finally:
            if not self.keep:
                shutil.rmtree(folder, ignore_errors=True)

    def _keys(self, session: Session) -> list[str]:
        keys = []
        if "near-empty" in session.workloads:
            keys.append("near-empty")
        keys += [f"{w}-{session.files}" for w in ("small", "edits") if w in session.workloads]
        if "big" in session.workloads:
            keys.append("big")
        return keys

    def _workloads(self, pair: Pair, session: Session) -> None:
        chosen, files = session.workloads, session.files
        if "near-empty" in chosen:
            count = self.sizes.near_empty_edits
            say(f"[{pair.system}] near-empty: {count} small edits, each awaited on B ...")
            self._run(pair, "near-empty", lambda: workloads.near_empty(pair, count))
        synced: list[str] = []
        if "small" in chosen:
            say(f"[{pair.system}] small files: {files:,} x 4 KiB into 100 folders of A ...")

            def small() -> Result:
                result, names = workloads.small_files(pair, files)
                synced.extend(names)
                return result
            self._run(pair, f"small-{files}", small)
        if "edits" in chosen:
            if synced:
                say(f"[{pair.system}] edits: {self.sizes.edits} among {files:,} synced "
                    "files, 1.5 s apart ...")
                self._run(pair, f"edits-{files}",
                          lambda: workloads.edits(pair, synced, self.sizes.edits))
            else:
                self.fail(pair.system, f"edits-{files}", "no synced files to edit")
        if "big" in chosen:
            size = self.sizes.big_bytes
            say(f"[{pair.system}] big file: {size_label(size)} written on A ...")
            self._run(pair, "big", lambda: workloads.big_file(pair, size))

    def _run(self, pair: Pair, key: str, work: Callable[[], Result]) -> None:
        started = time.monotonic()
        try:
            result = work()
        except (BenchError, OSError) as exc:
            self.fail(pair.system, key, str(exc), pair.diagnostics())
            pair.check()          # a device that died ends the session
            return
        result.details["wall_s"] = round(time.monotonic() - started, 1)
        self.results.setdefault(key, {})[pair.system] = result
        say(f"  {result.value:,.3g} {result.unit}; CPU-s " + ", ".join(
            f"{k} {v:.2f}" for k, v in result.cpu_s.items()) + "; peak RSS MiB " + ", ".join(
            f"{k} {v:.0f}" for k, v in result.peak_rss_mib.items()))


# -- the report -----------------------------------------------------------------------------


def size_label(size: int) -> str:
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size / MIB:,.0f} MiB"


def title(key: str, sizes: Sizes) -> str:
    if key == "near-empty":
        return f"one small edit in a near-empty folder (p50 of {sizes.near_empty_edits})"
    if key == "big":
        return f"one {size_label(sizes.big_bytes)} file, A -> B"
    kind, files = key.split("-")
    if kind == "small":
        return f"{int(files):,} x 4 KiB files, A -> B"
    return f"one small edit among {int(files):,} synced files (p50 of {sizes.edits})"


def _cell(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _getter(field: str, name: str) -> Callable[[Result], float | None]:
    """A result's FIELD (cpu_s or peak_rss_mib) of process NAME, None if it has none."""
    return lambda result: getattr(result, field).get(name)


def comparison_table(key: str, results: dict[str, Result], sizes: Sizes) -> str:
    """Both systems' figures for one workload and Cairn ÷ Syncthing."""
    cairn, other = results.get("cairn"), results.get("syncthing")
    some = cairn or other
    assert some is not None
    per_scale, per_unit = (1000.0, "CPU-ms") if some.per == "file" else (1.0, "CPU-s")
    rows: list[tuple[str, Callable[[Result], float | None]]] = [
        (f"{'p50 latency' if some.unit == 's' else 'speed'} ({some.unit})",
         lambda r: r.value),
        ("CPU, all processes (CPU-s)", lambda r: r.total_cpu_s),
        (f"CPU per {some.per} ({per_unit})", lambda r: r.cpu_per * per_scale)]
    names = list(dict.fromkeys(name for r in (cairn, other) if r for name in r.cpu_s))
    rows += [(f"  CPU-s {name}", _getter("cpu_s", name)) for name in names]
    rows += [("peak RSS, largest process (MiB)",
              lambda r: max(r.peak_rss_mib.values(), default=math.nan)),
             ("peak RSS, all processes (MiB)", lambda r: sum(r.peak_rss_mib.values()))]
    rows += [(f"  peak RSS {name} (MiB)", _getter("peak_rss_mib", name)) for name in names]
    table = [("", "Cairn", "Syncthing", "Cairn ÷ Syncthing")]
    for label, get in rows:
        mine = get(cairn) if cairn else None
        theirs = get(other) if other else None
        ratio = (f"{mine / theirs:.2f}" if mine is not None and theirs
                 and not math.isnan(theirs) else "-")
        table.append((label, _cell(mine), _cell(theirs), ratio))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [f"[{title(key, sizes)}]"]
    lines += ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                        for i, c in enumerate(row)) for row in table]
    return "\n".join(lines)


def target_figures(bench: Comparison, sizes: Sizes) -> tuple[list[Figure], list[str]]:
    """Issue 12's targets as figures (Syncthing's figure as the limit of a ratio), and the
    targets that could not be judged (a figure missing)."""
    figures: list[Figure] = []
    unjudged: list[str] = []
    if bench.dd:
        figures.append(Figure("dd write (oflag=direct, fdatasync)", max(bench.dd), "MB/s",
                              note="start, end: " + ", ".join(f"{v:,.0f}" for v in bench.dd)))
    for key, results in bench.results.items():
        cairn, other = results.get("cairn"), results.get("syncthing")
        if key.startswith("small-"):
            label = f"small files {int(key.split('-')[1]):,}"
            if cairn is None:
                unjudged.append(f"{label}: Cairn's figures are missing")
                continue
            figures.append(Figure(f"{label}: Cairn files/s", cairn.value, "files/s",
                                  target=TARGET_FILES_PER_S))
            if other is None:
                unjudged.append(f"{label}: vs Syncthing (its figures are missing)")
            else:
                figures += [
                    Figure(f"{label}: Cairn files/s vs Syncthing's", cairn.value, "files/s",
                           limit=other.value, limit_name="files/s Syncthing",
                           target=TARGET_FILES_VS_SYNCTHING),
                    Figure(f"{label}: Cairn CPU per file vs Syncthing's",
                           cairn.cpu_per * 1000, "CPU-ms", limit=other.cpu_per * 1000,
                           limit_name="CPU-ms Syncthing",
                           target=TARGET_CPU_PER_FILE_VS_SYNCTHING, at_most=True)]
            figures += [Figure(f"{label}: peak RSS, Cairn {name}", rss, "MiB",
                               target=TARGET_RSS_MIB, at_most=True)
                        for name, rss in cairn.peak_rss_mib.items()]
        elif key == "big":
            label = f"{size_label(sizes.big_bytes)} A -> B"
            for system, result in results.items():
                if bench.dd:
                    figures.append(Figure(f"{label}: {DISPLAY[system]} MB/s vs dd write",
                                          result.value,
                                          "MB/s", limit=max(bench.dd),
                                          limit_name="MB/s dd write"))
            if bench.dd and cairn is not None:
                # Everything lands on this machine's one disk: B writes the file once and
                # the appliance (k+m)/k times it in shards; Syncthing's B writes it once.
                written = 1 + (LAYOUT.data_shards + LAYOUT.parity_shards) / LAYOUT.data_shards
                figures.append(Figure(f"{label}: Cairn MB/s vs its disk bound", cairn.value,
                                      "MB/s", limit=max(bench.dd) / written,
                                      limit_name=f"MB/s dd write / {written:g}",
                                      note=f"B writes the file once and the appliance "
                                      f"{written - 1:g} x it in shards, on one disk here"))
            if cairn is None:
                unjudged.append(f"{label}: Cairn's figures are missing")
                continue
            if other is None:
                unjudged.append(f"{label}: vs Syncthing (its figures are missing)")
            else:
                figures.append(Figure(f"{label}: Cairn MB/s vs Syncthing's", cairn.value,
                                      "MB/s", limit=other.value, limit_name="MB/s Syncthing",
                                      target=TARGET_BIG_VS_SYNCTHING))
            figures.append(Figure(f"{label}: Cairn CPU per GB, all processes",
                                  cairn.cpu_per, "CPU-s/GB", target=TARGET_CPU_PER_GB,
                                  at_most=True, note=", ".join(
                                      f"{k} {v:.1f}" for k, v in cairn.cpu_s.items())))
    return figures, unjudged


def report(bench: Comparison, sizes: Sizes) -> list[Figure]:
    say("")
    for key, results in bench.results.items():
        say(comparison_table(key, results, sizes))
        say("")
    figures, unjudged = target_figures(bench, sizes)
    say(format_table(figures))
    for figure in figures:
        if figure.note:
            say(f"  {figure.name}: {figure.note}")
    for line in unjudged:
        say(f"  NOT JUDGED: {line}")
    for failure in bench.failures:
        say(f"  NOT OBTAINED: {failure['system']}, {failure['workload']}: {failure['why']}")
    return figures


# -- the command ----------------------------------------------------------------------------


def _names(text: str, known: tuple[str, ...], parser: argparse.ArgumentParser,
           what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = set(names) - set(known)
    if unknown or not names:
        parser.error(f"{what}: one or more of {', '.join(known)} (not "
                     f"{', '.join(sorted(unknown)) or 'nothing'})")
    return [n for n in known if n in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1,000 files, a 64 MiB big file, no large session")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, of cairn, syncthing (default both)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)} (default all; "
                             "edits needs small)")
    parser.add_argument("--files", type=int, default=None, metavar="N",
                        help="files in the first session (default 10,000; --quick 1,000)")
    parser.add_argument("--large-files", type=int, default=None, metavar="N",
                        help="files in the large session (default 100,000)")
    parser.add_argument("--skip-large", action="store_true", help="no large session")
    parser.add_argument("--edits", type=int, default=None, metavar="E",
                        help="edits among the synced files (default 20)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="parent of the run's fresh folder (default /tmp)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's folder (homes, folders, logs) at the end")
    parser.add_argument("--json", type=Path, default=BENCH / "out" / "compare.json",
                        help="write the results here (default bench/out/compare.json)")
    args = parser.parse_args(argv)
    args.systems = _names(args.systems, SYSTEMS, parser, "--systems")
    args.workloads = frozenset(_names(args.workloads, WORKLOADS, parser, "--workloads"))
    if "edits" in args.workloads and "small" not in args.workloads:
        parser.error("the edits workload edits the files the small workload synced: add small")
    for value in (args.files, args.large_files, args.edits):
        if value is not None and value < 1:
            parser.error("--files, --large-files and --edits take a positive number")
    return args


def choose_sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    large = args.large_files or sizes.large_files
    if args.quick and args.large_files is None:
        large = 0
    return replace(sizes, files=args.files or sizes.files, edits=args.edits or sizes.edits,
                   large_files=0 if args.skip_large else large)


def sessions(sizes: Sizes, chosen: frozenset[str]) -> list[Session]:
    first = Session("session-1", sizes.files, chosen)
    large = chosen & {"small", "edits"}
    if not sizes.large_files or not large:
        return [first]
    return [first, Session("session-2", sizes.large_files, frozenset(large))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = choose_sizes(args)
    args.dir.mkdir(parents=True, exist_ok=True)
    most_files = max(sizes.files, sizes.large_files)
    need = int((3.5 * sizes.big_bytes + sizes.dd_mib * MIB + 4 * 8192 * most_files) * 1.1)
    if args.keep:
        need *= 2 * len(args.systems)
    if free_bytes(args.dir) < need:
        say(f"refusing to run: {args.dir} has {free_bytes(args.dir) / 1e9:.1f} GB free, the "
            f"run needs {need / 1e9:.1f} GB")
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="cairn-bench-compare-", dir=args.dir)).resolve()
    log_dir = args.json.parent / "compare-logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    info = machine_info(run_dir)
    fs = info.get("filesystem", {})
    say(f"machine: {info.get('nproc')} CPUs, {info.get('memory_gib')} GiB, "
        f"{fs.get('type', '?')} on {fs.get('device', '?')}, load {os.getloadavg()[0]:.1f}; "
        f"run folder {run_dir}")
    versions: dict[str, str] = {}
    bench = Comparison(sizes, run_dir, log_dir, args.keep)
    started = time.monotonic()
    try:
        if "syncthing" in args.systems:
            try:
                versions["syncthing"] = syncthing.version(syncthing.ensure_installed())
                say(f"syncthing: {versions['syncthing']}")
            except (BenchError, OSError) as exc:
                bench.fail("syncthing", "all", f"not installed: {exc}")
                args.systems.remove("syncthing")
        bench.measure_dd("start")
        for session in sessions(sizes, args.workloads):
            for system in args.systems:
                bench.session(system, session)
        bench.measure_dd("end")
    finally:
        if args.keep:
            say(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    figures = report(bench, sizes)
    say(f"  total {time.monotonic() - started:.0f} s")
    payload = {
        "machine": info, "sizes": asdict(sizes), "systems": args.systems,
        "workloads": sorted(args.workloads), "versions": versions,
        "fairness": {"syncthing_options": syncthing.OPTIONS,
                     "syncthing_folder": syncthing.FOLDER_SETTINGS,
                     "cairn": "defaults; cairnd with six disk folders, k=4, m=2"},
        "dd_write_mbs": [round(v, 1) for v in bench.dd],
        "results": {key: {system: result.to_json() for system, result in results.items()}
                    for key, results in bench.results.items()},
        "figures": [f.to_json() for f in figures], "failures": bench.failures,
        "seconds": round(time.monotonic() - started, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    missed = any(f.verdict == "MISS" for f in figures)
    return 1 if missed or bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
