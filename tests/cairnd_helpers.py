"""Helpers for tests of the `cairnd` command: run it as a subprocess (`run_cairnd`) or in
the test process (`run_cairnd_in_process`, for account commands a test only needs done),
and run a real appliance on 127.0.0.1 with a port the kernel picks (`serving`, and
`served_appliance` for a fresh home served until the end of a block).

Only loopback networking: every server here listens on 127.0.0.1:0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import apsw
from in_process import run_click

from appliance.config import ApplianceConfig
from appliance.home import init_home

CAIRND = (sys.executable, "-m", "appliance.cli")
SERVE_LINE = re.compile(
    r"^cairnd: serving (?P<url>https://(?P<host>[^ ]+):(?P<port>\d+)) "
    r"\(appliance (?P<appliance_id>[^,]+), certificate sha256 (?P<fingerprint>[0-9a-f]{64})\)$")

MakeHome = Callable[..., ApplianceConfig]


def cairnd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CAIRN_APPLIANCE_HOME"}
    env.update(extra)
    return env


def run_cairnd(*args: str | Path, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `cairnd ARGS...` to completion, capturing text output."""
    return subprocess.run([*CAIRND, *map(str, args)], capture_output=True, text=True,
                          env=env if env is not None else cairnd_env(), timeout=timeout,
                          check=False)


def run_cairnd_in_process(*args: str | Path, timeout: float = 60
                          ) -> subprocess.CompletedProcess[str]:
    """`cairnd ARGS...` run inside the test process (see in_process.py)."""
    from appliance.cli import cli
    return run_click(cli, "cairnd", [str(a) for a in args], cairnd_env(), timeout)


@dataclass
class RunningAppliance:
    process: subprocess.Popen[str]
    url: str
    port: int
    appliance_id: str
    fingerprint: str
    line: str
    stderr_file: Any

    def stderr(self) -> str:
        """What the server logged so far (its stderr goes to a file: a pipe could fill)."""
        self.stderr_file.seek(0)
        return str(self.stderr_file.read())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The next line PROCESS writes on stdout within TIMEOUT seconds ("" if none). Read by
    a thread: select() on the pipe cannot see lines already in its read buffer, so a second
    line that arrived with the first would look like none. After a timeout the thread waits
    on, and takes the next line."""
    assert process.stdout is not None
    stdout = process.stdout
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


@contextmanager
def serving(home: Path, *extra: str, timeout: float = 30) -> Iterator[RunningAppliance]:
    """`cairnd serve --home HOME --listen 127.0.0.1:0` as a subprocess, until its serving
    line; killed at the end if the test did not stop it."""
    with tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(
            [*CAIRND, "serve", "--home", str(home), "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=stderr_file, text=True, env=cairnd_env())
        try:
            line = read_line(process, timeout).rstrip("\n")
            match = SERVE_LINE.match(line)
            if match is None:
                process.kill()
                process.wait(timeout=10)
                stderr_file.seek(0)
                raise AssertionError(f"no serving line; stdout {line!r}, stderr:\n"
                                     f"{stderr_file.read()}")
            yield RunningAppliance(process=process, url=match["url"], port=int(match["port"]),
                                   appliance_id=match["appliance_id"],
                                   fingerprint=match["fingerprint"], line=line,
                                   stderr_file=stderr_file)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def free_port() -> int:
    """A port free on 127.0.0.1 now (for an appliance that must keep its address across a
    restart)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Served(NamedTuple):
    """An appliance home and its running server (unpacks as `config, server`)."""

    config: ApplianceConfig
    server: RunningAppliance

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def home(self) -> Path:
        return self.config.home


@contextmanager
def served_appliance(directory: Path, **options: Any) -> Iterator[Served]:
    """A fresh appliance home in DIRECTORY (init options as given; no free-space reserve),
    served on 127.0.0.1 for the duration; it must stop cleanly and log no traceback."""
    options.setdefault("reserve_free_bytes", 0)
    options.setdefault("listen", "127.0.0.1:0")
    config = init_home(directory, **options)
    with serving(config.home) as server:
        yield Served(config, server)
        assert server.stop() == 0
        assert "Traceback" not in server.stderr(), server.stderr()[-5000:]


@contextmanager
def appliance_database(config: ApplianceConfig, *, write: bool = False
                       ) -> Iterator[apsw.Connection]:
    """A connection to an appliance's database beside its running server (WAL: each side
    sees what the other commits), read-only unless WRITE — for tests that check what the
    server stored or tamper with it. apsw, never the standard library's sqlite3: two
    SQLite copies in one process break each other's POSIX locks."""
    flags = apsw.SQLITE_OPEN_READWRITE if write else apsw.SQLITE_OPEN_READONLY
    with closing(apsw.Connection(str(config.database), flags=flags)) as db:
        db.setbusytimeout(10_000)
        yield db


def database_rows(config: ApplianceConfig, sql: str, *params: object) -> list[Any]:
    """The rows of a read-only query on the appliance's database."""
    with appliance_database(config) as db:
        return list(db.execute(sql, params))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
