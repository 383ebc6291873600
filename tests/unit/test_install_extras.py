"""Installs that fit each machine: a device's agent never loads the appliance's packages
(pyeclib, hypercorn, FastAPI), and the appliance never loads the agent's (httpx, tqdm, pathspec),
so `pip install '.[agent]'` and `pip install '.[appliance]'` each suffice on their own."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
APPLIANCE_ONLY = {"pyeclib", "hypercorn", "fastapi", "starlette"}
AGENT_ONLY = {"httpx", "httpcore", "tqdm", "pathspec"}

IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
for package in {packages!r}:
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def loaded_by(*packages: str) -> set[str]:
    """The top-level modules loaded by importing every module of PACKAGES, in a fresh
    interpreter."""
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE.format(
        packages=packages)], capture_output=True, text=True, cwd=PROJECT, check=True)
    return set(json.loads(result.stdout))


def test_the_agent_loads_none_of_the_appliances_packages() -> None:
    loaded = loaded_by("protocol", "agent")
    assert "appliance" not in loaded
    assert loaded & APPLIANCE_ONLY == set()
    assert "httpx" in loaded   # the check does see what the agent does load


def test_the_appliance_loads_none_of_the_agents_packages() -> None:
    loaded = loaded_by("protocol", "appliance")
    assert "agent" not in loaded
    assert loaded & AGENT_ONLY == set()
    assert "fastapi" in loaded


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = requirement.split("[")[0]
        for separator in "<>=!~; ":
            name = name.split(separator)[0]
        names.add(name.lower())
    return names


@pytest.mark.parametrize(("extra", "excluded"), [("agent", APPLIANCE_ONLY),
                                                 ("appliance", AGENT_ONLY)])
def test_each_extra_installs_only_its_side(extra: str, excluded: set[str]) -> None:
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    installed = _requirement_names(project["dependencies"]) \
        | _requirement_names(project["optional-dependencies"][extra])
    assert installed & excluded == set()
    # What the side loads is installed by its extra (the import check above, from the
    # other direction): nothing it needs is left to a package of the other side.
    needed = {"agent": {"httpx", "tqdm", "pathspec", "trio", "apsw",
                        "cryptography", "blake3", "click", "pydantic", "zeroconf"},
              "appliance": {"pyeclib", "hypercorn", "fastapi", "trio", "apsw",
                            "cryptography", "blake3", "click", "pydantic", "zeroconf"}}
    assert needed[extra] <= installed
