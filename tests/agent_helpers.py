"""Helpers for tests of the `cairn` agent against a real appliance on 127.0.0.1.

- `run_cairn` / `cairn_ok` / `fails`: `cairn --home HOME ARGS...` run in the test process
  (in_process.py: a worker thread with its own trio.run, captured output, exit code, the
  environment replaced), for tests about what a command does. `run_cairn_binary` runs the
  real `python -m agent.cli` as a subprocess, for tests about the process itself.
- Users: `make_user` (the `fresh_user` fixture) adds a user with a unique name; unless told
  otherwise it also stores the user's key bundle sealed at TEST_SCRYPT_LOG2_N, so every
  `cairn join` of that user opens it in about a millisecond instead of paying the
  production scrypt cost (SCRYPT_LOG2_N). The cost is a parameter of seal_bundle, read
  back from the bundle by open_bundle: nothing a user's install reads (no environment
  variable, no config key) can lower it.

Every agent here gets CAIRN_DISCOVERY=off unless a test says otherwise (namespace tests),
so an agent whose appliance stops answering never sends mDNS to the machine's real LAN.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api_helpers import add_user, new_code
from cairnd_helpers import Served
from in_process import run_click

from agent.cli import cli
from agent.crypto.keys import UserKeys, seal_bundle
from appliance.meta import accounts
from appliance.meta.database import Metadata

CAIRN = (sys.executable, "-m", "agent.cli")
PASSPHRASE = "correct horse battery staple"
TEST_SCRYPT_LOG2_N = 10     # the least open_bundle accepts; production seals at 17


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CAIRN_HOME", "CAIRN_PASSPHRASE", "CAIRN_APPLIANCE_HOME")}
    env["CAIRN_DISCOVERY"] = "off"
    env.update(extra)
    return env


def _argv(home: Path, args: tuple[str | Path, ...]) -> list[str]:
    return ["--home", str(home), *map(str, args)]


def run_cairn(home: Path, *args: str | Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`cairn --home HOME ARGS...` to completion, in-process, capturing text output."""
    return run_click(cli, "cairn", _argv(home, args),
                     env if env is not None else agent_env(), timeout)


def run_cairn_binary(home: Path, *args: str | Path, env: dict[str, str] | None = None,
                     timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`cairn --home HOME ARGS...` as a subprocess (the real entry point)."""
    return subprocess.run([*CAIRN, *_argv(home, args)],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=env if env is not None else agent_env(), stdin=subprocess.DEVNULL)


def cairn_ok(home: Path, *args: str | Path, timeout: float = 300) -> str:
    """Run `cairn` (in-process), assert it succeeded without a traceback; its stdout."""
    result = run_cairn(home, *args, timeout=timeout)
    assert result.returncode == 0, (args, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def join(home: Path, url: str, code: str, *, passphrase: str = PASSPHRASE,
         name: str = "laptop") -> subprocess.CompletedProcess[str]:
    """`cairn join CODE --url URL` (in-process) with the passphrase in the environment.
    (Every test joins from 127.0.0.1, against the appliance's per-address enrollment rate
    limit: `cairn join` itself waits out a refusal for going too fast.)"""
    return run_cairn(home, "join", code, "--url", url, "--name", name,
                     env=agent_env(CAIRN_PASSPHRASE=passphrase))


def joined(home: Path, url: str, code: str, *, passphrase: str = PASSPHRASE,
           name: str = "laptop") -> Path:
    result = join(home, url, code, passphrase=passphrase, name=name)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return home


def fails(result: subprocess.CompletedProcess[str], exit_code: int, *words: str) -> str:
    """Assert RESULT is one `cairn: error:` line with EXIT_CODE mentioning WORDS."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cairn: error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def write(path: Path, data: bytes | str) -> Path:
    """PATH with DATA (text as UTF-8), its folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def ls_json(home: Path, remote: str = "/") -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(cairn_ok(home, "ls", "--json", remote))
    return entries


# --- users ---------------------------------------------------------------------------------

_serial = itertools.count(1)


@dataclass(frozen=True)
class User:
    """A user of a served appliance. `keys` are the user's keys when the harness made them
    (sealed cheaply, see the module doc); None when the user's first device will."""

    name: str
    appliance: Served
    keys: UserKeys | None

    def code(self) -> str:
        """A fresh one-time code for another device of this user."""
        return new_code(self.appliance.home, self.name)

    def join(self, home: Path, device: str = "laptop", *,
             passphrase: str = PASSPHRASE) -> Path:
        """A new device of this user: `cairn join` into HOME; returns HOME."""
        return joined(home, self.appliance.url, self.code(), passphrase=passphrase,
                      name=device)


MakeUser = Callable[..., User]   # the fresh_user fixture


def make_user(appliance: Served, hint: str = "user", *, keys: bool = True) -> User:
    """A new user named HINT plus a number unique in this session (tests use `.name`).
    With KEYS, the user's key bundle (PASSPHRASE, TEST_SCRYPT_LOG2_N) is already stored."""
    name = f"{hint}{next(_serial)}"
    add_user(appliance.home, name)
    if not keys:
        return User(name, appliance, None)
    return User(name, appliance, store_cheap_keys(appliance.config.database, name))


def store_cheap_keys(database: Path, name: str) -> UserKeys:
    """What a user's first device does in `cairn join` (agent.enroll.unlock_keys: keys made,
    sealed, stored with the public key), but sealed at the lowest cost open_bundle accepts,
    and written the way `cairnd user` commands write (the database is shared through WAL):
    enrolling a harness device instead would spend the appliance's enrollment rate limit
    (2 per second per address), which the tests' own joins need."""
    user_keys = UserKeys.generate()
    bundle = seal_bundle(user_keys, PASSPHRASE, name, log2_n=TEST_SCRYPT_LOG2_N)
    meta = Metadata(database)
    try:
        meta.write_sync(lambda db: accounts.set_key_bundle(
            db, accounts.user_by_name(db, name), user_keys.public_key, bundle, 0))
    finally:
        meta.close()
    return user_keys
