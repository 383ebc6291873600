"""What every bench script shares: one error type, the figures and their table, the
machine's own limits (dd, page cache), a process's (or process tree's) CPU and memory from
/proc and waiting for processes to go quiet, random files and their BLAKE3, waiting for a
file's bytes, a running appliance on 127.0.0.1, and `cairn` agents joined to it.

Nothing here imports the tests' helpers: a benchmark drives the real commands (`cairnd`,
`cairn`) as a user would, and the appliance's own modules only to lay out a home.
Only loopback networking: every server listens on 127.0.0.1 with a port the kernel picks.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import apsw  # noqa: E402
import blake3  # noqa: E402

from appliance.config import load_config, write_config  # noqa: E402
from appliance.home import init_home  # noqa: E402

MIB = 1024 * 1024
CAIRND = (sys.executable, "-m", "appliance.cli")
CAIRN = (sys.executable, "-m", "agent.cli")
PASSPHRASE = "bench passphrase, not a secret"
SERVE_LINE = re.compile(r"^cairnd: serving (?P<url>https://127\.0\.0\.1:(?P<port>\d+)) ")


class BenchError(Exception):
    """A figure could not be obtained: a command failed, a bounded wait ran out."""


def ensure_debian_package(binary: str, package: str | None = None,
                          timeout: float = 600.0) -> str:
    """BINARY's path, installed with `apt-get install -y PACKAGE` (default: BINARY) first
    when it is missing (the yardsticks: Syncthing, rclone). Raises BenchError."""
    found = shutil.which(binary)
    if found is not None:
        return found
    package = package or binary
    say(f"  {binary} is missing: apt-get install -y {package} ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(["apt-get", "install", "-y", package], capture_output=True,
                            text=True, timeout=timeout, env=env, check=False)
    found = shutil.which(binary)
    if result.returncode != 0 or found is None:
        raise BenchError(f"apt-get install -y {package} exited {result.returncode}: "
                         f"{result.stderr.strip()[-1000:]}")
    return found


def say(text: str) -> None:
    print(text, flush=True)


# -- figures ------------------------------------------------------------------------------

@dataclass
class Figure:
    """A value, the machine's own limit it is judged against (if any), and a target: a
    ratio to the limit, or the value itself when there is no limit."""

    name: str
    value: float
    unit: str
    limit: float | None = None
    limit_name: str = ""
    target: float | None = None
    at_most: bool = False
    note: str = ""
    target_on_value: bool = False     # judge the value even though a limit is shown

    @property
    def ratio(self) -> float | None:
        return self.value / self.limit if self.limit else None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        on_value = self.target_on_value or self.limit is None
        measured = self.value if on_value else self.ratio
        if measured is None:
            return "MISS"
        met = measured <= self.target if self.at_most else measured >= self.target
        return "PASS" if met else "MISS"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(value=round(self.value, 4), verdict=self.verdict,
                    ratio=None if self.ratio is None else round(self.ratio, 3))
        if self.limit is not None:
            data["limit"] = round(self.limit, 4)
        return data


def _number(value: float, unit: str) -> str:
    if value >= 100:
        return f"{value:,.0f} {unit}"
    if value >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}" if value >= 0.1 else f"{value:.3f} {unit}"


def format_table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "limit", "ratio", "target", "result")]
    for f in figures:
        limit = _number(f.limit, f.limit_name) if f.limit is not None else "-"
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
        if f.target is None:
            target = "-"
        else:
            target = f"{'<=' if f.at_most else '>='} {f.target:g}"
            if f.limit is None or f.target_on_value:
                target += f" {f.unit}"
        rows.append((f.name, _number(f.value, f.unit), limit, ratio, target, f.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- processes ----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of PID so far (its threads, not its children); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mib(pid: int | str, key: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib(pid: int) -> float:
    """PID's peak resident memory (VmHWM)."""
    return _status_mib(pid, "VmHWM:")


def rss_mib(pid: int) -> float:
    """PID's resident memory now (VmRSS)."""
    return _status_mib(pid, "VmRSS:")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def own_rss_mib() -> float:
    return _status_mib("self", "VmRSS:")


def own_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def process_tree(pid: int) -> list[int]:
    """PID and its descendants alive now (from /proc/PID/task/*/children), PID first; []
    once PID is gone. A child's CPU counts in its parent only after the parent reaps it,
    so a process that forks a worker is measured as the sum over this tree."""
    found: list[int] = []
    pending = [pid]
    while pending and len(found) < 10_000:
        current = pending.pop()
        if not Path(f"/proc/{current}").exists():
            continue
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pending += [int(c) for c in (task / "children").read_text().split()]
    return found


def settle(cpu: Callable[[], Mapping[str, float]], check: Callable[[], None] = lambda: None,
           window_s: float = 2.0, cpu_s: float = 0.04, timeout_s: float = 120.0) -> float:
    """Wait until every process that CPU names (name -> its CPU seconds so far) used at most
    CPU_S over one WINDOW_S; the seconds waited. CHECK runs before every window (it raises
    if a process is gone). Raises BenchError once TIMEOUT_S has passed without that."""
    started = time.monotonic()
    while True:
        check()
        before = cpu()
        time.sleep(window_s)
        used = {name: seconds - before.get(name, 0.0) for name, seconds in cpu().items()}
        if max(used.values(), default=0.0) <= cpu_s:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise BenchError(f"the processes did not settle in {timeout_s:.0f} s (CPU-s in "
                             f"the last {window_s:g} s: "
                             + ", ".join(f"{name} {u:.2f}" for name, u in used.items()) + ")")


def nearest_rank(values: list[float], share: float) -> float:
    """The nearest-rank percentile SHARE (0.5 = the median) of VALUES (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


# -- the machine ----------------------------------------------------------------------------

def machine_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True,
                             timeout=10, check=True).stdout.splitlines()[-1].split()
        info["filesystem"] = {"device": out[0], "type": out[1],
                              "size_gib": round(int(out[2]) / 1024 / 1024),
                              "mounted_on": out[-1]}
    return info


_DD_LINE = re.compile(r"(\d+) bytes .* copied, ([0-9.]+) s")


def run_dd(args: list[str], timeout: float) -> tuple[int, float]:
    """(bytes, seconds) as dd reports them; our own clock if dd's line is not found."""
    started = time.perf_counter()
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"dd {' '.join(args)} failed: {proc.stderr.strip()}")
    match = _DD_LINE.search(proc.stderr)
    if match:
        return int(match.group(1)), float(match.group(2))
    return 0, elapsed


def dd_write_mbs(folder: Path, size_mib: int) -> float:
    """`dd if=/dev/zero bs=4M oflag=direct conv=fdatasync` of SIZE_MIB into FOLDER: MB/s."""
    target = folder / "dd.bin"
    try:
        written, seconds = run_dd(["if=/dev/zero", f"of={target}", "bs=4M",
                                   f"count={size_mib // 4}", "oflag=direct",
                                   "conv=fdatasync"], timeout=600)
    finally:
        with contextlib.suppress(OSError):
            target.unlink()
    return (written or size_mib * MIB) / seconds / 1e6


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


# -- files ----------------------------------------------------------------------------------

def write_random_file(path: Path, size: int) -> bytes:
    """SIZE bytes of fresh randomness (so every block is distinct), fsynced; its BLAKE3."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(16 * MIB, left))
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.digest()


def file_hash(path: Path) -> bytes:
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * MIB):
            digest.update(chunk)
    return digest.digest()


def wait_bytes(path: Path, expected: bytes, deadline: float, poll_s: float = 0.002
               ) -> float | None:
    """perf_counter() when PATH first holds exactly EXPECTED (read every POLL_S); None
    once perf_counter() is past DEADLINE."""
    while True:
        with contextlib.suppress(OSError):
            if path.read_bytes() == expected:
                return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(poll_s)


class CacheDropper:
    """Evicts the page cache: drop_caches if permitted, else fadvise(DONTNEED) per file."""

    def __init__(self) -> None:
        self.method = "none yet"

    def drop(self, root: Path) -> None:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as handle:
                handle.write("3\n")
            self.method = "drop_caches"
            return
        except OSError:
            pass
        for folder, _, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                    try:
                        os.fdatasync(fd)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
        self.method = "posix_fadvise(DONTNEED) per file"


# -- the appliance --------------------------------------------------------------------------

def cairnd_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CAIRN_APPLIANCE_HOME"}


def cairnd(home: Path, *args: str, timeout: float = 120) -> str:
    """`cairnd ARGS... --home HOME` to completion; its stdout. Raises BenchError."""
    result = subprocess.run([*CAIRND, *args, "--home", str(home)], capture_output=True,
                            text=True, timeout=timeout, env=cairnd_env(), check=False)
    if result.returncode != 0:
        raise BenchError(f"cairnd {' '.join(args)} exited {result.returncode}: "
                         f"{result.stderr.strip()[-1000:]}")
    return result.stdout


def add_user(home: Path, name: str) -> str:
    """`cairnd user add NAME`: the user's first enrollment code."""
    return cairnd(home, "user", "add", name).strip().splitlines()[-1]


def new_code(home: Path, name: str) -> str:
    """`cairnd user code NAME`: a code for another device of NAME."""
    return cairnd(home, "user", "code", name).strip().splitlines()[-1]


@dataclass
class Appliance:
    """`cairnd serve` running on 127.0.0.1."""

    process: subprocess.Popen[str]
    url: str
    home: Path
    stderr_file: IO[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def database(self) -> Path:
        return self.home / "appliance.db"

    @property
    def certificate(self) -> Path:
        return load_config(self.home).tls_certificate

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.pid)

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def stored_blocks(self) -> int:
        """Blocks the appliance records as durable in its store (its own count, read-only)."""
        connection = apsw.Connection(str(self.database), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            connection.set_busy_timeout(30_000)
            row = connection.execute("SELECT count(*) FROM blocks WHERE stored = 1").fetchone()
        finally:
            connection.close()
        assert row is not None
        return int(row[0])

    def stop(self, timeout: float = 30) -> None:
        terminate(self.process, timeout)


def terminate(process: subprocess.Popen[Any], timeout: float) -> int:
    """End a process this bench started: SIGTERM, then SIGKILL after TIMEOUT; its exit
    code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=timeout)


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    stdout = process.stdout
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0].rstrip("\n") if lines else ""


@contextlib.contextmanager
def serving(home: Path, *extra: str, timeout: float = 60) -> Iterator[Appliance]:
    """`cairnd serve --home HOME --listen 127.0.0.1:0` until the block ends (SIGTERM, then
    killed if it does not stop); on an error, the last lines of its log on stderr."""
    with tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(
            [*CAIRND, "serve", "--home", str(home), "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=stderr_file, text=True, env=cairnd_env())
        appliance = None
        try:
            line = _first_line(process, timeout)
            match = SERVE_LINE.match(line)
            if match is None:
                stderr_file.seek(0)
                raise BenchError(f"cairnd serve did not start: {line!r}\n"
                                 f"{stderr_file.read()[-2000:]}")
            appliance = Appliance(process, match["url"], home, stderr_file)
            yield appliance
        except BaseException:
            if appliance is not None:
                tail = appliance.stderr().strip().splitlines()[-20:]
                if tail:
                    print("appliance log (last lines):\n  " + "\n  ".join(tail),
                          file=sys.stderr)
            raise
        finally:
            if appliance is not None:
                appliance.stop()
            elif process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


@dataclass(frozen=True)
class Layout:
    disks: int = 6
    data_shards: int = 4
    parity_shards: int = 2


@contextlib.contextmanager
def running_appliance(run_dir: Path, user: str = "bench", layout: Layout = Layout(),
                      **settings: Any) -> Iterator[tuple[Appliance, str]]:
    """A fresh home under RUN_DIR (its disks folders there too), served on 127.0.0.1 without
    mDNS (SETTINGS: other config values), and USER's first enrollment code."""
    config = init_home(run_dir / "home", disks=layout.disks, data_shards=layout.data_shards,
                       parity_shards=layout.parity_shards, listen="127.0.0.1:0")
    write_config(replace(config, advertise=False, **settings))
    code = add_user(config.home, user)
    with serving(config.home) as appliance:
        yield appliance, code


def pinned_context(certificate: Path) -> ssl.SSLContext:
    """TLS to exactly this certificate (the appliance's self-signed one)."""
    context = ssl.create_default_context(cafile=str(certificate))
    context.check_hostname = False
    return context


# -- agents -------------------------------------------------------------------------------

def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CAIRN_HOME", "CAIRN_PASSPHRASE", "CAIRN_APPLIANCE_HOME")}
    env["CAIRN_DISCOVERY"] = "off"
    env.update(extra)
    return env


def join(home: Path, url: str, code: str, name: str, timeout: float = 120) -> Path:
    """`cairn --home HOME join CODE --url URL --name NAME`, as a user would (the real
    passphrase cost included); returns HOME."""
    result = subprocess.run([*CAIRN, "--home", str(home), "join", code, "--url", url,
                             "--name", name], capture_output=True, text=True,
                            timeout=timeout, env=agent_env(CAIRN_PASSPHRASE=PASSPHRASE),
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise BenchError(f"cairn join ({name}) exited {result.returncode}: "
                         f"{result.stderr.strip()[-1000:]}")
    return home


@dataclass
class SyncAgent:
    """A joined agent home and its folder; `start` runs `cairn sync DIR -v` (log in
    HOME/sync.log; without -v when VERBOSE is false: the defaults a user runs), `stop`
    ends it with SIGTERM."""

    home: Path
    folder: Path
    name: str
    process: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = field(default=())
    verbose: bool = True

    @property
    def log(self) -> Path:
        return self.home / "sync.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError(f"agent {self.name} is not running")
        return self.process.pid

    def start(self) -> SyncAgent:
        if self.process is not None:
            raise BenchError(f"agent {self.name} is already running")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*CAIRN, "--home", str(self.home), "sync", str(self.folder),
                 *(["-v"] if self.verbose else []), *self.extra], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL,
                env=agent_env())
        return self

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None:
            return None
        code = terminate(self.process, timeout)
        self.process = None
        return code

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def sync_agent(base: Path, appliance: Appliance, code: str, name: str) -> SyncAgent:
    """A new device joined with CODE (BASE/NAME-home) with an empty folder BASE/NAME-folder."""
    home = join(base / f"{name}-home", appliance.url, code, name)
    folder = base / f"{name}-folder"
    folder.mkdir(parents=True, exist_ok=True)
    return SyncAgent(home, folder, name)
