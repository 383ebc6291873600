#!/usr/bin/env python3
"""Benchmark of whole-file transfers: the `cairn` agent against a real `cairnd serve`.

End to end over HTTPS on 127.0.0.1, in one run, against this machine's own disk:

- the machine's limit: `dd` write of 1 GiB with conv=fdatasync, on the filesystem that
  holds the appliance's disks;
- `cairn put` of a --size-gib GiB file of random content (every block distinct), timed
  as the wall clock of the agent's process: put MB/s / (dd write x k/(k+m)), target 0.8;
- `cairn get` of it to a new path, page cache dropped first: get MB/s / dd write, target
  0.8; the result is hashed and compared with the source;
- a re-put of the unchanged file (it must send no block), then a put after 1 MiB in the
  middle of the file changed, straddling two 4 MiB blocks (at most two may be sent); the
  agent's summary line (`sent N of M blocks`) is checked against the blocks the appliance
  records as stored in its database;
- peak RSS of the agent (each run's own, from wait4) and of the appliance (VmHWM at the
  end), target 150 MB each and flat with the size; CPU seconds per GB of both processes.

Each size gets a fresh appliance (six disk folders, k=4, m=2, `cairnd serve` on
127.0.0.1:0, mDNS advertising off) and a fresh agent joined with a code (CAIRN_DISCOVERY=
off). --big runs 1 GiB and then 10 GiB, for RSS at both sizes. --profile also samples the
agent with py-spy during a put and a get of a second file and says where its CPU goes.
Run as root so the page cache can be dropped; otherwise the files are evicted with
posix_fadvise(DONTNEED). Everything is made in a fresh folder under bench/out/ and deleted.

    .venv/bin/python bench/transfer.py [--size-gib 1] [--big] [--profile]

See docs/benchmarks.md for the figures measured on the project's machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    CAIRN,
    PASSPHRASE,
    Appliance,
    BenchError,
    CacheDropper,
    Figure,
    Layout,
    agent_env,
    file_hash,
    format_table,
    free_bytes,
    machine_info,
    run_dd,
    say,
    write_random_file,
)
from harness import running_appliance as running_home

BENCH = Path(__file__).resolve().parent
MIB = 1024 * 1024
GIB = 1024 * MIB
BLOCK_SIZE = 4 * MIB
DATA_SHARDS, PARITY_SHARDS, DISKS = 4, 2, 6
DD_MIB = 1024
CHANGE_SIZE = MIB
CHANGE_AFTER_MIDDLE = 3 * MIB + MIB // 2   # the change straddles a 4 MiB block boundary
SENT_LINE = re.compile(r"sent (\d+) of (\d+) blocks")
FETCHED_LINE = re.compile(r"fetched (\d+) of (\d+) blocks")
PROFILE_RATE_HZ = 97

TARGET_PUT = 0.8          # x (dd write x k/(k+m))
TARGET_GET = 0.8          # x dd write
TARGET_RSS_MIB = 150e6 / MIB   # 150 MB
TARGET_RSS_FLAT = 1.2     # peak RSS at the largest size / at the smallest, at most


# -- processes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessRun:
    """One finished agent process: wall clock, CPU and peak RSS from wait4 (its own)."""

    stdout: str
    stderr: str
    seconds: float
    cpu_user: float
    cpu_system: float
    peak_rss_mib: float

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_system


def run_process(argv: list[str], env: dict[str, str], timeout: float) -> ProcessRun:
    """Run ARGV to completion (killed after TIMEOUT); its usage from wait4, not shared with
    any other child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   env=env, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                process.returncode = -signal.SIGKILL
                raise BenchError(f"{' '.join(argv[2:5])} ... still running after "
                                 f"{timeout:.0f} s; killed")
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        run = ProcessRun(out.read(), err.read(), seconds, usage.ru_utime, usage.ru_stime,
                         usage.ru_maxrss / 1024)
    if process.returncode != 0 or "Traceback" in run.stderr:
        raise BenchError(f"{' '.join(argv[2:6])} ... exited {process.returncode}:\n"
                         f"{run.stderr.strip()[-2000:]}")
    return run


@dataclass(frozen=True)
class Agent:
    home: Path
    profiler: str | None = None     # py-spy, when this agent is to be sampled

    def run(self, *args: str | Path, timeout: float, profile_to: Path | None = None,
            passphrase: bool = False) -> ProcessRun:
        argv = [*CAIRN, "--home", str(self.home), *map(str, args)]
        if profile_to is not None:
            assert self.profiler is not None
            argv = [self.profiler, "record", "--format", "raw", "--threads", "--idle", "--rate",
                    str(PROFILE_RATE_HZ), "--output", str(profile_to), "--", *argv]
        env = agent_env(CAIRN_PASSPHRASE=PASSPHRASE) if passphrase else agent_env()
        return run_process(argv, env, timeout)


@contextmanager
def running_appliance(run_dir: Path) -> Iterator[tuple[Appliance, str]]:
    """A fresh home, `cairnd serve` on 127.0.0.1:0 (no mDNS), and a join code for a user."""
    with running_home(run_dir, "bench", Layout(DISKS, DATA_SHARDS, PARITY_SHARDS)) as served:
        yield served


# -- files --------------------------------------------------------------------------------


def change_middle(path: Path, size: int) -> tuple[int, set[int]]:
    """Overwrite CHANGE_SIZE bytes at size/2 + 3.5 MiB with new random bytes; the offset
    and the indexes of the blocks it touches."""
    offset = size // 2 + CHANGE_AFTER_MIDDLE
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(CHANGE_SIZE), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset, {offset // BLOCK_SIZE, (offset + CHANGE_SIZE - 1) // BLOCK_SIZE}


def needed_bytes(size: int, profile: bool) -> int:
    """Source file, its blocks on the appliance (x (k+m)/k), the download, dd's file;
    twice the file's share with --profile (a second file is put and got); 10% margin."""
    per_file = size * (1 + (DATA_SHARDS + PARITY_SHARDS) / DATA_SHARDS + 1)
    return int((per_file * (2 if profile else 1) + DD_MIB * MIB) * 1.1)


# -- report -------------------------------------------------------------------------------


# -- where the agent's time goes (py-spy) -------------------------------------------------

# py-spy runs with --idle: every sample of every thread counts, so shares are of wall
# time. Checked from the innermost frame outwards; the first match names the sample.
# SSLSocket.read in a block PUT is the wait for the appliance's answer after the body went
# out; in a block GET it is the wait for the appliance's bytes plus their TLS decryption.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("BLAKE3 hashing", ("plain_hash_of ",)),
    ("HMAC block key", ("block_key ",)),
    ("AES-GCM", ("encrypt_block ", "decrypt_block ")),
    ("TLS read (waiting for the appliance)", ("SSLSocket.read ", "SSLSocket.recv ")),
    ("TLS send", ("SSLSocket.send ", "SSLSocket.sendall ")),
    ("TLS handshake", ("do_handshake ", "wrap_socket ")),
    ("HTTP in Python (httpx, httpcore, h11)", ("httpx/", "httpcore/", "h11/")),
    ("file read", ("read_block ", "_region_matches ")),
    ("file write, fsync", ("_pwrite_all ", "_finish ")),
    ("idle worker (no job)", ("WorkerThread._work ",)),
    ("event loop waiting (epoll)", ("get_events ",)),
    ("start-up (imports)", ("<frozen importlib", "_call_with_frames_removed")),
)
OTHER = "other Python (trio, threads, CLI, metadata)"
PASSES: tuple[tuple[str, str], ...] = (
    ("scan pass (read, hash + encrypt every block)", "scan (agent/upload.py"),
    ("send pass (re-encrypt missing blocks + PUT)", "send (agent/upload.py"),
    ("fetch (GET + verify + decrypt + write)", "place (agent/download.py"),
)


def categorise(stack: str) -> tuple[str, str]:
    """(pass, kind of work) of one sampled stack."""
    frames = stack.split(";")
    category = OTHER
    for frame in reversed(frames):
        match = next((name for name, keys in CATEGORIES if any(k in frame for k in keys)),
                     None)
        if match is not None:
            category = match
            break
    phase = next((name for name, key in PASSES if key in stack),
                 "main thread" if "MainThread" in frames[0] or ": " not in frames[0]
                 else "worker, between jobs")
    return phase, category


def summarise_profile(raw: Path, wall_seconds: float) -> dict[str, Any]:
    """The agent's worker threads' wall time by pass and by kind of work (shares of all
    worker samples), and the main thread's by kind of work."""
    workers: Counter[str] = Counter()
    passes: Counter[str] = Counter()
    main: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        phase, category = categorise(stack)
        if phase == "main thread":
            main[category] += int(count)
        else:
            workers[category] += int(count)
            passes[phase] += int(count)

    def table(counts: Counter[str]) -> list[dict[str, Any]]:
        total = sum(counts.values()) or 1
        return [{"name": name, "thread_seconds": round(n / PROFILE_RATE_HZ, 2),
                 "share": round(n / total, 3)} for name, n in counts.most_common()]

    return {"rate_hz": PROFILE_RATE_HZ, "wall_seconds": round(wall_seconds, 2),
            "workers_by_pass": table(passes), "workers_by_work": table(workers),
            "main_thread_by_work": table(main)}


def crypto_costs(reps: int = 8) -> dict[str, float]:
    """One core's cost of the agent's per-block crypto on a 4 MiB block, in ms (this
    process, the agent's own functions)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from agent.crypto.blocks import (
        BLOCK_FORMAT,
        ZERO_NONCE,
        decrypt_block,
        encrypt_block,
        plain_hash_of,
    )

    data, secret = os.urandom(BLOCK_SIZE), os.urandom(32)
    ref, ciphertext = encrypt_block(secret, data)
    aes = AESGCM(ref.key)

    def ms(fn: Any) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - started) / reps * 1000

    return {"blake3_ms": round(ms(lambda: plain_hash_of(data)), 2),
            "aes_gcm_encrypt_ms": round(ms(lambda: aes.encrypt(ZERO_NONCE, data,
                                                               BLOCK_FORMAT)), 2),
            "encrypt_block_ms": round(ms(lambda: encrypt_block(secret, data)), 2),
            "decrypt_block_ms": round(ms(lambda: decrypt_block(ref, ciphertext)), 2)}


# -- one size -----------------------------------------------------------------------------


@dataclass
class SizeRun:
    size_gib: float
    figures: list[Figure] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    agent_peak_rss_mib: float = 0.0
    appliance_peak_rss_mib: float = 0.0


def bench_size(args: argparse.Namespace, size_gib: float, run_dir: Path,
               dropper: CacheDropper) -> SizeRun:
    size = int(size_gib * GIB) // BLOCK_SIZE * BLOCK_SIZE
    count = size // BLOCK_SIZE
    timeout = args.timeout_per_gib * max(1.0, size / GIB)
    res = SizeRun(size_gib)
    label = f"{size / GIB:g} GiB"
    k, m = DATA_SHARDS, PARITY_SHARDS

    say(f"[{label}] dd write of {DD_MIB} MiB (conv=fdatasync) in {run_dir} ...")
    target = run_dir / "dd.bin"
    try:
        written, seconds = run_dd(["if=/dev/zero", f"of={target}", "bs=4M",
                                   f"count={DD_MIB // 4}", "conv=fdatasync"], timeout)
    finally:
        with contextlib.suppress(OSError):
            target.unlink()
    dd_write = (written or DD_MIB * MIB) / seconds / 1e6
    say(f"  {dd_write:,.0f} MB/s")

    source, copy = run_dir / "source.bin", run_dir / "copy.bin"
    say(f"[{label}] writing {count} blocks of random content to {source.name} ...")
    source_hash = write_random_file(source, size)

    with running_appliance(run_dir) as (appliance, code):
        agent = Agent(run_dir / "agent", args.py_spy)
        say(f"[{label}] cairnd serve at {appliance.url} (pid {appliance.pid}); "
            "joining an agent ...")
        agent.run("join", code, "--url", appliance.url, "--name", "bench",
                  timeout=120, passphrase=True)

        def timed(name: str, *cli: str | Path) -> tuple[ProcessRun, float]:
            dropper.drop(run_dir)
            before = appliance.cpu_seconds()
            run = agent.run(*cli, timeout=timeout)
            return run, appliance.cpu_seconds() - before

        def sent(run: ProcessRun) -> tuple[int, int]:
            match = SENT_LINE.search(run.stdout)
            if match is None:
                raise BenchError(f"no 'sent N of M blocks' in {run.stdout!r}")
            return int(match[1]), int(match[2])

        def cpu_note(run: ProcessRun, server_cpu: float) -> str:
            gb = size / 1e9
            return (f"CPU per GB: agent {run.cpu / gb:.1f} s (user {run.cpu_user / gb:.1f}, "
                    f"sys {run.cpu_system / gb:.1f}), appliance {server_cpu / gb:.1f} s; "
                    f"agent peak RSS {run.peak_rss_mib:.0f} MiB")

        stored_before = appliance.stored_blocks()
        say(f"[{label}] cairn put ({count} blocks), page cache dropped first ...")
        put, put_cpu = timed("put", "put", source, "/bench.bin")
        put_sent, put_total = sent(put)
        stored_after_put = appliance.stored_blocks()
        if (put_sent, put_total) != (count, count) or stored_after_put - stored_before != count:
            raise BenchError(f"put sent {put_sent} of {put_total} blocks and the appliance "
                             f"stored {stored_after_put - stored_before}; expected {count}")
        put_mbs = size / put.seconds / 1e6
        say(f"  {put_mbs:,.0f} MB/s in {put.seconds:.1f} s; {cpu_note(put, put_cpu)}")

        say(f"[{label}] cairn get to a new path, page cache dropped first ...")
        get, get_cpu = timed("get", "get", "/bench.bin", copy)
        fetched = FETCHED_LINE.search(get.stdout)
        if fetched is None or int(fetched[1]) != count:
            raise BenchError(f"get answered {get.stdout!r}; expected {count} fetched")
        get_mbs = size / get.seconds / 1e6
        say(f"  {get_mbs:,.0f} MB/s in {get.seconds:.1f} s; {cpu_note(get, get_cpu)}")
        if file_hash(copy) != source_hash:
            raise BenchError("the downloaded file differs from the source")
        copy.unlink()
        say("  downloaded file identical (BLAKE3)")

        say(f"[{label}] cairn put of the same file again ...")
        reput, reput_cpu = timed("re-put", "put", source, "/bench.bin")
        reput_sent, _ = sent(reput)
        reput_stored = appliance.stored_blocks() - stored_after_put
        say(f"  sent {reput_sent} blocks (appliance stored {reput_stored} new) in "
            f"{reput.seconds:.1f} s")

        offset, touched = change_middle(source, size)
        say(f"[{label}] 1 MiB changed at offset {offset / MIB:g} MiB (blocks "
            f"{sorted(touched)}); cairn put ...")
        stored_before_change = appliance.stored_blocks()
        change, change_cpu = timed("change", "put", source, "/bench.bin")
        change_sent, _ = sent(change)
        change_stored = appliance.stored_blocks() - stored_before_change
        say(f"  sent {change_sent} blocks (appliance stored {change_stored} new) in "
            f"{change.seconds:.1f} s")

        if args.profile:
            profile_phase(res, agent, run_dir, size, timeout, dropper, args.json.parent)
        res.appliance_peak_rss_mib = appliance.peak_rss_mib()

    source.unlink()
    runs = {"put": put, "get": get, "re-put": reput, "change": change}
    res.agent_peak_rss_mib = max(run.peak_rss_mib for run in runs.values())
    dd_share = dd_write * k / (k + m)
    res.figures += [
        Figure("dd write (conv=fdatasync)", dd_write, "MB/s",
               note=f"{DD_MIB} MiB in 4 MiB writes on the appliance's filesystem"),
        Figure(f"put {label}", put_mbs, "MB/s", dd_share, f"MB/s dd write x {k}/{k + m}",
               TARGET_PUT, note=f"{count} blocks in {put.seconds:.1f} s (wall clock of "
                                f"`cairn put`); {cpu_note(put, put_cpu)}"),
        Figure(f"get {label}, cold cache", get_mbs, "MB/s", dd_write, "MB/s dd write",
               TARGET_GET, note=f"{count} blocks in {get.seconds:.1f} s, identical to the "
                                f"source; {cpu_note(get, get_cpu)}"),
        Figure("re-put unchanged: blocks sent", reput_sent, "blocks", target=0, at_most=True,
               note=f"{reput.seconds:.1f} s ({size / reput.seconds / 1e6:,.0f} MB/s scanned); "
                    f"the appliance stored {reput_stored} new blocks; "
                    f"{cpu_note(reput, reput_cpu)}"),
        Figure("put after a 1 MiB change: blocks sent", change_sent, "blocks", target=2,
               at_most=True,
               note=f"{change.seconds:.1f} s; 1 MiB at {offset / MIB:g} MiB, blocks "
                    f"{sorted(touched)}; the appliance stored {change_stored} new blocks; "
                    f"{cpu_note(change, change_cpu)}"),
        Figure(f"peak RSS, agent ({label})", res.agent_peak_rss_mib, "MiB",
               target=TARGET_RSS_MIB, at_most=True,
               note="largest ru_maxrss of the put, get, re-put and changed put; by run: "
                    + ", ".join(f"{n} {r.peak_rss_mib:.0f}" for n, r in runs.items())),
        Figure(f"peak RSS, appliance ({label})", res.appliance_peak_rss_mib, "MiB",
               target=TARGET_RSS_MIB, at_most=True,
               note="VmHWM of the cairnd serve process at the end"),
    ]
    if reput_stored or change_stored > len(touched):
        raise BenchError(f"the appliance stored {reput_stored} blocks on the re-put and "
                         f"{change_stored} after the change")
    res.extra = {
        "size_bytes": size, "blocks": count, "dd_write_mbs": round(dd_write, 1),
        "seconds": {name: round(run.seconds, 2) for name, run in runs.items()},
        "agent_cpu_s": {name: {"user": round(run.cpu_user, 2),
                               "system": round(run.cpu_system, 2)}
                        for name, run in runs.items()},
        "appliance_cpu_s": {"put": round(put_cpu, 2), "get": round(get_cpu, 2),
                            "re-put": round(reput_cpu, 2), "change": round(change_cpu, 2)},
        "agent_peak_rss_mib": {name: round(run.peak_rss_mib, 1) for name, run in runs.items()},
        "blocks_sent": {"put": put_sent, "re-put": reput_sent, "change": change_sent},
        "appliance_new_stored_blocks": {"put": stored_after_put - stored_before,
                                        "re-put": reput_stored, "change": change_stored},
        "change_offset": offset, **res.extra,
    }
    return res


def profile_phase(res: SizeRun, agent: Agent, run_dir: Path, size: int, timeout: float,
                  dropper: CacheDropper, keep_dir: Path) -> None:
    """py-spy on a put and a get of a second random file (the measured runs stay clean)."""
    other, copy = run_dir / "profiled.bin", run_dir / "profiled-copy.bin"
    write_random_file(other, size)
    profiles = {}
    for name, cli in (("put", ("put", other, "/profiled.bin")),
                      ("get", ("get", "/profiled.bin", copy))):
        dropper.drop(run_dir)
        raw = run_dir / f"{name}.raw"
        say(f"  py-spy ({PROFILE_RATE_HZ} Hz) on cairn {name} of a second file ...")
        run = agent.run(*cli, timeout=timeout, profile_to=raw)
        profiles[name] = summarise_profile(raw, run.seconds)
        shutil.copy(raw, keep_dir / f"transfer-{size // GIB}gib-{name}.pyspy.raw")
    other.unlink()
    copy.unlink(missing_ok=True)
    res.extra["profile"] = profiles


def print_profile(profile: dict[str, Any]) -> None:
    titles = {"workers_by_pass": "worker threads, by pass",
              "workers_by_work": "worker threads, by kind of work",
              "main_thread_by_work": "main thread"}
    for name, data in profile.items():
        say(f"  agent {name} under py-spy (--idle): {data['wall_seconds']:.1f} s wall")
        for key, title in titles.items():
            say(f"    {title}:")
            for row in data[key]:
                say(f"      {row['name']:<46} {row['thread_seconds']:6.1f} thread-s  "
                    f"{row['share']:6.1%}")


# -- the run ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0,
                        help="size of the file put and got, in GiB (default 1)")
    parser.add_argument("--big", action="store_true",
                        help="run at 1 GiB and then at 10 GiB (RSS at both sizes)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample the agent with py-spy (a put and a get of a "
                             "second file) and say where its CPU goes")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"),
                        help="the py-spy executable for --profile (default: on PATH)")
    parser.add_argument("--dir", type=Path, default=BENCH / "out",
                        help="parent folder of the run's fresh folder (default bench/out)")
    parser.add_argument("--timeout-per-gib", type=float, default=300.0,
                        help="seconds each agent command may take per GiB (default 300)")
    parser.add_argument("--json", type=Path, default=BENCH / "out" / "transfer.json",
                        help="also write the results here (default bench/out/transfer.json)")
    args = parser.parse_args(argv)
    args.sizes = [1.0, 10.0] if args.big else [args.size_gib]
    if min(args.sizes) * GIB < 16 * MIB:
        parser.error("--size-gib must be at least 1/64 (16 MiB)")
    if args.profile and not args.py_spy:
        parser.error("--profile needs py-spy (pip install py-spy, or --py-spy PATH)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    need = needed_bytes(int(max(args.sizes) * GIB), args.profile)
    free = free_bytes(args.dir)
    if free < need:
        say(f"refusing to run: {args.dir} has {free / 1e9:.1f} GB free, the run needs "
            f"{need / 1e9:.1f} GB (the file, its blocks on the appliance x "
            f"{(DATA_SHARDS + PARITY_SHARDS) / DATA_SHARDS:g}, the download, dd's file)")
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="transfer-", dir=args.dir)).resolve()
    info = machine_info(run_dir)
    fs = info.get("filesystem", {})
    say(f"machine: {info.get('nproc')} CPUs, {info.get('memory_gib')} GiB, "
        f"{fs.get('type', '?')} on {fs.get('device', '?')}; {free / 1e9:.0f} GB free; run "
        f"folder {run_dir}")
    dropper = CacheDropper()
    started = time.monotonic()
    runs: list[SizeRun] = []
    try:
        for size_gib in args.sizes:
            size_dir = run_dir / f"{size_gib:g}gib"
            size_dir.mkdir()
            try:
                runs.append(bench_size(args, size_gib, size_dir, dropper))
            finally:
                shutil.rmtree(size_dir, ignore_errors=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    figures = [f for run in runs for f in run.figures]
    if len(runs) > 1:
        small, big = runs[0], runs[-1]
        for who, attr in (("agent", "agent_peak_rss_mib"),
                          ("appliance", "appliance_peak_rss_mib")):
            figures.append(Figure(
                f"peak RSS, {who}, {big.size_gib:g} GiB vs {small.size_gib:g} GiB",
                getattr(big, attr), "MiB", getattr(small, attr),
                f"MiB at {small.size_gib:g} GiB", TARGET_RSS_FLAT, at_most=True))
    costs = crypto_costs()
    say("")
    say(format_table(figures))
    say("")
    for f in figures:
        if f.note:
            say(f"  {f.name}: {f.note}")
    say(f"  page cache dropped with {dropper.method}")
    say("  agent crypto per 4 MiB block, one core: " + ", ".join(
        f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in costs.items()))
    for run in runs:
        if "profile" in run.extra:
            say(f"  where the agent's time goes at {run.size_gib:g} GiB:")
            print_profile(run.extra["profile"])
    say(f"  total {time.monotonic() - started:.0f} s")
    payload = {
        "machine": info,
        "settings": {"sizes_gib": args.sizes, "data_shards": DATA_SHARDS,
                     "parity_shards": PARITY_SHARDS, "disks": DISKS,
                     "dd_mib": DD_MIB, "cache_drop": dropper.method},
        "figures": [f.to_json() for f in figures],
        "runs": {f"{run.size_gib:g}": run.extra for run in runs},
        "agent_crypto_ms_per_4mib_block": costs,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if any(f.verdict == "MISS" for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
