"""Running real `cairn sync` processes against a real appliance, and reading their folders.

A Device is one agent home joined to the appliance (in-process, `make_device` /
`devices_of`) plus its synced folder; `start` runs `cairn sync DIR` as a subprocess (log in
HOME/sync.log) — the process running on its own is the point — and `stop` ends it (SIGTERM,
or -9 to simulate a crash). `wait_for` polls a condition with a deadline; `tree_of` reads a folder
as {relative path: bytes} (folders as None, a symbolic link as `link_to(target)`: never
followed), skipping Cairn's temporary files.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent_helpers import CAIRN, User, agent_env, joined

T = TypeVar("T")
PART = ".cairn-part"
LINK = b"\0symbolic link to\0"    # what no test writes into a file


def link_to(target: str) -> bytes:
    """How `tree_of` shows a symbolic link to TARGET."""
    return LINK + os.fsencode(target)


@dataclass
class Device:
    home: Path
    folder: Path
    name: str
    process: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()
    logs: list[Path] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.home / "sync.log"

    def start(self, *extra: str) -> Device:
        assert self.process is None, "already running"
        args = extra or self.extra
        log = open(self.log, "ab")   # noqa: SIM115 — the child keeps it
        self.process = subprocess.Popen(
            [*CAIRN, "--home", str(self.home), "sync", str(self.folder), "-v", *args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=agent_env())
        log.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send SIG and wait; the exit code (None if it was not running; -9 if it had to
        be killed after 15 s)."""
        if self.process is None:
            return None
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=15)
        self.process = None
        return code

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def make_device(base: Path, url: str, code: str, name: str) -> Device:
    """A new device joined with CODE to the appliance at URL (BASE/NAME-home), with an
    empty folder BASE/NAME-folder."""
    home = base / f"{name}-home"
    joined(home, url, code, name=name)
    folder = base / f"{name}-folder"
    folder.mkdir(parents=True, exist_ok=True)
    return Device(home=home, folder=folder, name=name)


def devices_of(user: User, base: Path, *names: str) -> list[Device]:
    """A new device of USER for each name, each with an empty folder."""
    return [make_device(base, user.appliance.url, user.code(), name) for name in names]


def tree_of(folder: Path) -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}
    for current, dirs, files in os.walk(folder):     # (never into a link to a folder)
        relative = os.path.relpath(current, folder)
        prefix = "" if relative == "." else relative + "/"
        for name in dirs + files:
            path = Path(current) / name
            if name.endswith(PART):
                continue
            try:
                if path.is_symlink():
                    tree[prefix + name] = link_to(os.readlink(path))
                elif name in dirs:
                    tree[prefix + name] = None
                else:
                    tree[prefix + name] = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                continue                 # replaced meanwhile
            except OSError as exc:       # readlink: not a link any more
                if exc.errno != errno.EINVAL:
                    raise
    return tree


def part_files(folder: Path) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names
            if n.endswith(PART)]


def wait_for(condition: Callable[[], T], timeout: float = 30, what: str = "condition",
             every: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def converged(*devices: Device) -> bool:
    first = tree_of(devices[0].folder)
    return all(tree_of(d.folder) == first for d in devices[1:])


def wait_converged(*devices: Device, timeout: float = 30) -> dict[str, bytes | None]:
    def check() -> bool:
        return converged(*devices)
    try:
        wait_for(check, timeout, "the devices to converge", every=0.1)
    except AssertionError:
        detail = "\n".join(f"--- {d.name}: {sorted(tree_of(d.folder))}\n"
                           f"{d.log_text()[-3000:]}" for d in devices)
        raise AssertionError(f"devices did not converge in {timeout} s\n{detail}") from None
    return tree_of(devices[0].folder)


def stop_all(*devices: Device) -> None:
    for device in devices:
        device.stop()


def kill(device: Device) -> None:
    device.stop(signal.SIGKILL)
