"""Shared fixtures: the session's appliance and its users, appliance homes in tmp_path, and
the `cairnd` command.

How the suite stays quick (tests/README.md has the whole of it):
- `appliance` is ONE `cairnd serve` for the whole session (127.0.0.1:0, six temporary
  disks, defaults otherwise), checked at the end to stop cleanly with no traceback logged.
  Tests that only need *an* appliance use it with `fresh_user` (a user of their own, so
  nothing they do meets another test's data); tests about the appliance process itself
  (restarts, crashes, disk faults, configuration) start their own with `served_appliance`
  or `serving`.
- `fresh_user(hint, keys=True)` makes a user named HINT plus a unique number, with the key
  bundle stored sealed at a low scrypt cost (agent_helpers.make_user), and
  `user.join(home)` joins a device in-process.
- `cairn` runs in-process (agent_helpers.run_cairn) except where the process is the point.

Helpers that tests import directly live in *_helpers.py (importing conftest by name breaks
as soon as a second conftest.py exists).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import MakeUser, User, make_user
from cairnd_helpers import MakeHome, Served, run_cairnd, served_appliance

from appliance.config import ApplianceConfig
from appliance.home import init_home
from appliance.tls import write_self_signed_certificate

# An agent started by any test must never look for its appliance on the machine's real LAN;
# namespace tests turn discovery back on for the agents they run inside their namespaces.
os.environ["CAIRN_DISCOVERY"] = "off"


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key (the appliance's kind), for TLS tests."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    write_self_signed_certificate(cert, key)
    return cert, key


@pytest.fixture
def appliance_home(tmp_path: Path) -> MakeHome:
    """A factory: `appliance_home(name="appliance", disks=6, ...)` runs init_home in
    tmp_path with test-friendly settings (no free-space reserve, any free port)."""

    def make(name: str = "appliance", **options: Any) -> ApplianceConfig:
        options.setdefault("reserve_free_bytes", 0)
        options.setdefault("listen", "127.0.0.1:0")
        return init_home(tmp_path / name, **options)

    return make


@pytest.fixture
def cairnd() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cairnd


@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The session's appliance (see the module doc); must stop cleanly at the end."""
    with served_appliance(tmp_path_factory.mktemp("session") / "appliance") as served:
        yield served


@pytest.fixture
def fresh_user(appliance: Served) -> MakeUser:
    """A factory: `fresh_user("alice")` is a new user of the session's appliance."""

    def make(hint: str = "user", *, keys: bool = True) -> User:
        return make_user(appliance, hint, keys=keys)

    return make


@pytest.fixture
def drives() -> Iterator[Callable[..., Any]]:
    """A factory: `drives(home, mountpoint)` is a Drive (not started) that is stopped and
    unmounted after the test whatever happens."""
    from drive_helpers import Drive

    made: list[Drive] = []

    def make(home: Path, mountpoint: Path, *extra: str) -> Drive:
        drive = Drive(home, mountpoint, extra)
        made.append(drive)
        return drive

    yield make
    for drive in made:
        drive.cleanup()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, fewest tests first (there, one test is a long one),
    then the others, most tests first. `make test` hands whole files to its workers in
    this order (`--dist loadfile --no-loadscope-reorder`): a minutes-long file with one
    test (the LAN Show, the crash campaign), which xdist's own order (by number of tests)
    starts last, would leave one worker alone at the end; started first, the other
    worker meanwhile gets through the many short files."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    count = Counter(item.path for item in items)
    items.sort(key=lambda item: (0, count[item.path]) if item.path in slow_files
               else (1, -count[item.path]))
