"""Helpers for tests of the `cairn` agent: run it as a subprocess against a real appliance.

Every agent here gets CAIRN_DISCOVERY=off unless a test says otherwise (namespace tests),
so an agent whose appliance stops answering never sends mDNS to the machine's real LAN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cairnd_helpers import RunningAppliance, serving

from appliance.config import ApplianceConfig
from appliance.home import init_home

CAIRN = (sys.executable, "-m", "agent.cli")
PASSPHRASE = "correct horse battery staple"


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CAIRN_HOME", "CAIRN_PASSPHRASE", "CAIRN_APPLIANCE_HOME")}
    env["CAIRN_DISCOVERY"] = "off"
    env.update(extra)
    return env


def run_cairn(home: Path, *args: str | Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`cairn --home HOME ARGS...` to completion, capturing text output."""
    return subprocess.run([*CAIRN, "--home", str(home), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=env if env is not None else agent_env(), stdin=subprocess.DEVNULL)


def cairn_ok(home: Path, *args: str | Path, timeout: float = 300) -> str:
    """Run `cairn`, assert it succeeded without a traceback; its stdout."""
    result = run_cairn(home, *args, timeout=timeout)
    assert result.returncode == 0, (args, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def join(home: Path, url: str, code: str, *, passphrase: str = PASSPHRASE,
         name: str = "laptop") -> subprocess.CompletedProcess[str]:
    """`cairn join CODE --url URL` with the passphrase in the environment."""
    return run_cairn(home, "join", code, "--url", url, "--name", name,
                     env=agent_env(CAIRN_PASSPHRASE=passphrase))


def joined(home: Path, url: str, code: str, *, passphrase: str = PASSPHRASE,
           name: str = "laptop") -> Path:
    result = join(home, url, code, passphrase=passphrase, name=name)
    assert result.returncode == 0, result.stderr
    return home


@contextmanager
def served_appliance(directory: Path, **options: Any) -> Iterator[
        tuple[ApplianceConfig, RunningAppliance]]:
    """A fresh appliance home in DIRECTORY (init options as given), served on 127.0.0.1
    for the duration; it must stop cleanly and log no traceback."""
    options.setdefault("reserve_free_bytes", 0)
    options.setdefault("listen", "127.0.0.1:0")
    config = init_home(directory, **options)
    with serving(config.home) as server:
        yield config, server
        assert server.stop() == 0
        assert "Traceback" not in server.stderr()


def fails(result: subprocess.CompletedProcess[str], exit_code: int, *words: str) -> str:
    """Assert RESULT is one `cairn: error:` line with EXIT_CODE mentioning WORDS."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cairn: error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def ls_json(home: Path, remote: str = "/") -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(cairn_ok(home, "ls", "--json", remote))
    return entries
