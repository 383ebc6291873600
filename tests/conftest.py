"""Shared fixtures: appliance homes in tmp_path and the `cairnd` command.

Helpers that tests import directly live in cairnd_helpers.py (importing conftest by name
breaks as soon as a second conftest.py exists).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cairnd_helpers import MakeHome, run_cairnd

from appliance.config import ApplianceConfig
from appliance.home import init_home

# An agent started by any test must never look for its appliance on the machine's real LAN;
# namespace tests turn discovery back on for the agents they run inside their namespaces.
os.environ["CAIRN_DISCOVERY"] = "off"


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
