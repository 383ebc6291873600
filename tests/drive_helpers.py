"""Real `cairn mount` processes for the drive's tests.

`Drive.start` runs `cairn --home HOME mount MOUNTPOINT -v` as a subprocess (log in
HOME/mount.log) and waits for its "drive mounted" line; `stop` unmounts it the way a user
does (`cairn umount`, or a signal) and waits for the process; `kill` is `kill -9`. The
`drives` fixture (conftest) stops whatever a test left running and always lazily unmounts
every mount point it made, so a failing test never leaves a mount behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent_helpers import CAIRN, agent_env

MOUNTED_LINE = "drive mounted at"


def lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                   check=False)


@dataclass
class Drive:
    home: Path
    mountpoint: Path
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    started: list[float] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.home / "mount.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, *extra: str, timeout: float = 60) -> Drive:
        assert self.process is None or self.process.poll() is not None, "already running"
        if not self.started:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        seen = self.log_text().count(MOUNTED_LINE)
        log = open(self.log, "ab")  # noqa: SIM115 — the child keeps it
        self.started.append(time.monotonic())
        self.process = subprocess.Popen(
            [*CAIRN, "--home", str(self.home), "mount", str(self.mountpoint), "-v",
             *(extra or self.extra)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=agent_env())
        log.close()
        deadline = time.monotonic() + timeout
        while self.log_text().count(MOUNTED_LINE) <= seen:
            if self.process.poll() is not None:
                raise AssertionError(f"cairn mount exited {self.process.returncode}:\n"
                                     f"{self.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not mounted within {timeout} s:\n"
                                     f"{self.log_text()[-4000:]}")
            time.sleep(0.05)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int | None = None, timeout: float = 120) -> int | None:
        """Unmount (`cairn umount`, or send SIG) and wait for the process; its exit code."""
        if self.process is None:
            return None
        if sig is None:
            result = subprocess.run([*CAIRN, "--home", str(self.home), "umount",
                                     str(self.mountpoint)], capture_output=True, text=True,
                                    env=agent_env(), check=False, timeout=60)
            assert result.returncode == 0, result.stderr
        else:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=30)
            lazy_unmount(self.mountpoint)
            raise AssertionError(f"cairn mount did not exit:\n{self.log_text()[-4000:]}"
                                 ) from None
        self.process = None
        return code

    def kill(self) -> None:
        """kill -9, as a crash; the mount is left stale (the next start clears it)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        lazy_unmount(self.mountpoint)


def state_of(path: Path) -> str:
    return os.getxattr(path, "user.cairn.state").decode()
