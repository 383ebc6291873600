"""The FUSE mounts bench/mount.py measures: a `cairn mount` process (the drive) and an
`rclone mount` of a local folder (Debian's rclone, the passthrough it is compared with),
each started, awaited and always unmounted; a process's peak RSS over one piece of work;
and the small timed operations (first byte, `ls -l`, many creates).

Every wait is bounded. Only the processes started here are ended, by their own handles;
a mount that will not go is detached with `fusermount3 -u -z` as a last resort.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from harness import (
    CAIRN,
    BenchError,
    agent_env,
    cpu_seconds,
    ensure_debian_package,
    process_tree,
    rss_mib,
    terminate,
)

T = TypeVar("T")

MOUNTED_LINE = "drive mounted at"
STATE_XATTR = "user.cairn.state"
UPLOADING_STATES = ("dirty", "uploading")
INSTALL_TIMEOUT_S = 600
# rclone's VFS with no cache of its own: every read and write goes straight to the local
# folder (full or writes would first copy the file into rclone's cache folder). Everything
# else is rclone's default, as a user gets it (16 MiB read buffer per open file, 128 KiB
# kernel read-ahead, directory cache 5 min, attributes 1 s). Tried on this machine for a
# 512 MiB cold read (187 MB/s as chosen): --buffer-size 0 or 64M, --max-read-ahead 1M,
# --async-read=false all gave 157-221 MB/s, the drive's own 4 MiB bdi read-ahead 59 MB/s;
# so no tuning is left out that would make rclone clearly faster.
RCLONE_FLAGS = ("--vfs-cache-mode", "off")


# -- mounts -----------------------------------------------------------------------------------

def mount_points() -> set[str]:
    """Every mount point of this process's namespace now."""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return {line.split()[1].replace("\\040", " ") for line in mounts if line.strip()}


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def lazy_unmount(path: Path) -> None:
    """`fusermount3 -u -z`: the last resort, detaches PATH even if busy."""
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30,
                   check=False)


def mounts_under(folder: Path) -> list[str]:
    prefix = f"{folder}/"
    return sorted(p for p in mount_points() if p.startswith(prefix))


@dataclass
class Uploaded:
    """When the drive reported a wait's uploads done (its status file's `written_at`,
    time.time()), and when the watched file's state left dirty/uploading (None if none
    was watched)."""

    status_at: float
    state_at: float | None


@dataclass
class Drive:
    """`cairn --home HOME mount MOUNTPOINT` (no -v: the defaults a user runs), its log in
    LOG."""

    home: Path
    mountpoint: Path
    log: Path
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError("the drive is not running")
        return self.process.pid

    @property
    def status_file(self) -> Path:
        return self.home / "drive" / "status.json"

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n    ".join(text.strip().splitlines()[-lines:]) or "(empty)"

    def start(self, timeout: float) -> float:
        """Mount and wait for the "drive mounted at" line; the seconds it took."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        seen = self._mounted_lines()       # the log keeps earlier mounts' lines
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*CAIRN, "--home", str(self.home), "mount", str(self.mountpoint), *self.extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=agent_env())
        while self._mounted_lines() <= seen:
            self.check()
            if time.monotonic() - started > timeout:
                raise BenchError(f"cairn mount: not mounted in {timeout:.0f} s:\n    "
                                 f"{self.log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - started

    def _mounted_lines(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count(MOUNTED_LINE)

    def check(self) -> None:
        """Raises BenchError if the mount process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise BenchError(f"cairn mount exited {code}:\n    {self.log_tail()}")

    def cpu(self) -> float:
        """CPU seconds of the mount process (and any child) so far."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.pid))

    def status(self) -> dict[str, Any] | None:
        """The status the mount writes every second (what `cairn status --json` shows as
        "drive"); None if there is none yet."""
        try:
            data = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def cli(self, *args: str, timeout: float = 60) -> str:
        """`cairn --home HOME ARGS...` to completion; its stdout. Raises BenchError."""
        result = subprocess.run([*CAIRN, "--home", str(self.home), *args], capture_output=True,
                                text=True, timeout=timeout, env=agent_env(), check=False,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BenchError(f"cairn {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr.strip()[-1000:]}")
        return result.stdout

    def wait_uploaded(self, after: float, timeout: float, watch: Path | None = None
                      ) -> Uploaded:
        """Wait until a status written after AFTER (time.time()) says nothing is pending,
        polling every 50 ms; WATCH's state is polled too. Raises BenchError after
        TIMEOUT seconds, with how many changes were still pending."""
        deadline = time.monotonic() + timeout
        state_at: float | None = None
        pending: object = "no status"
        while time.monotonic() < deadline:
            self.check()
            now = time.time()
            if watch is not None and state_at is None:
                with contextlib.suppress(OSError):
                    if os.getxattr(watch, STATE_XATTR).decode() not in UPLOADING_STATES:
                        state_at = now
            status = self.status()
            if status is not None and status.get("written_at", 0.0) > after:
                pending = status.get("pending")
                if pending == 0:
                    return Uploaded(float(status["written_at"]), state_at)
            time.sleep(0.05)
        raise BenchError(f"the drive still had {pending} change(s) pending after "
                         f"{timeout:.0f} s")

    def stop(self, timeout: float = 300) -> int | None:
        """`cairn umount` and wait for the process (it uploads what is pending first); its
        exit code. Falls back to SIGTERM, then SIGKILL and a lazy unmount."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None and is_mounted(self.mountpoint):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([*CAIRN, "--home", str(self.home), "umount",
                                str(self.mountpoint)], capture_output=True, timeout=60,
                               env=agent_env(), check=False)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return terminate(process, 30)
        finally:
            if is_mounted(self.mountpoint):
                lazy_unmount(self.mountpoint)


# -- rclone -----------------------------------------------------------------------------------

def ensure_rclone() -> str:
    """The `rclone` binary's path, installed from Debian first when missing. Raises
    BenchError if it cannot be installed."""
    return ensure_debian_package("rclone", timeout=INSTALL_TIMEOUT_S)


def rclone_version(binary: str) -> str:
    result = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30,
                            check=False)
    return (result.stdout.strip().splitlines() or ["?"])[0]


@contextlib.contextmanager
def rclone_mount(binary: str, source: Path, mountpoint: Path, work: Path,
                 timeout: float = 30) -> Iterator[subprocess.Popen[bytes]]:
    """`rclone mount SOURCE MOUNTPOINT --vfs-cache-mode off` in the background (an empty
    config file and its log in WORK) until the block ends: then `fusermount3 -u`, the
    process awaited (SIGTERM, SIGKILL if it will not go), a lazy unmount if still there."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    config, log = work / "rclone.conf", work / "rclone.log"
    config.touch()
    process = subprocess.Popen(
        [binary, "mount", str(source), str(mountpoint), *RCLONE_FLAGS, "--config", str(config),
         "--log-file", str(log)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise BenchError(f"rclone mount did not mount in {timeout:.0f} s (exit "
                                 f"{process.poll()}): {tail}")
            time.sleep(0.05)
        yield process
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                           timeout=30, check=False)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            terminate(process, 10)
        if is_mounted(mountpoint):
            lazy_unmount(mountpoint)


# -- measuring --------------------------------------------------------------------------------

def _peak_by_sampling(pid: int, work: Callable[[], T]) -> tuple[T, float]:
    peak = rss_mib(pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, rss_mib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        stop.set()
        sampler.join(5)
    return result, max(peak, rss_mib(pid))


def peak_rss_during(pid: int, work: Callable[[], T]) -> tuple[T, float, str]:
    """WORK's result, PID's peak RSS in MiB while it ran, and how that was taken: VmHWM
    reset first by writing 5 to /proc/PID/clear_refs (exact), or VmRSS sampled every 50 ms
    where that is refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
    except OSError:
        result, peak = _peak_by_sampling(pid, work)
        return result, peak, "VmRSS sampled every 50 ms"
    result = work()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return result, int(line.split()[1]) / 1024, "VmHWM after clear_refs"
    raise BenchError(f"no VmHWM for process {pid}")


def first_byte_ms(path: Path) -> float:
    """open + read of 1 byte + close of PATH, in ms."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, 1)
    finally:
        os.close(fd)
    elapsed = (time.perf_counter() - started) * 1000
    if len(data) != 1:
        raise BenchError(f"{path}: read {len(data)} bytes, expected 1")
    return elapsed


def ls_ms(folder: Path, timeout: float = 120) -> float:
    """`ls -l FOLDER` (output discarded) from start to exit, in ms."""
    started = time.perf_counter()
    result = subprocess.run(["ls", "-l", str(folder)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=timeout, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise BenchError(f"ls -l {folder} exited {result.returncode}: {result.stderr[-500:]}")
    return elapsed


def create_files(root: Path, payloads: list[bytes], folders: int = 100
                 ) -> tuple[float, float]:
    """PAYLOADS as files spread over FOLDERS new subfolders of ROOT (made inside the
    timing), each opened, written and closed, no fsync; the seconds it took, and the
    seconds when half of the files were written (whether the pace holds)."""
    started = time.perf_counter()
    half = 0.0
    subfolders = [root / f"d{i:03d}" for i in range(folders)]
    for folder in subfolders:
        folder.mkdir(parents=True)
    for i, data in enumerate(payloads):
        if i == len(payloads) // 2:
            half = time.perf_counter() - started
        with open(subfolders[i % folders] / f"f{i:05d}.bin", "wb") as handle:
            handle.write(data)
    return time.perf_counter() - started, half
