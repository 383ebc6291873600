"""appliance/next_steps.py: the lines `make run` prints once the appliance listens, for the
addresses and installs it may meet (pure; the commands themselves are run for real in
tests/integration/test_serve.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from appliance.next_steps import next_steps, program_dir


def test_what_make_run_prints() -> None:
    assert next_steps(Path("var/appliance"), "127.0.0.1", 8443, ".venv/bin/") == [
        "cairnd: next steps, in another terminal, in this folder:",
        "cairnd:   .venv/bin/cairnd user add NAME --home var/appliance"
        "  # prints NAME's one-time code (last line)",
        "cairnd:   .venv/bin/cairn join CODE                          "
        "  # makes this machine a device of NAME",
        "cairnd: Ctrl-C (or SIGTERM) stops the appliance."]


@pytest.mark.parametrize(("host", "port", "join"), [
    ("127.0.0.1", 8443, "cairn join CODE"),             # join tries this address itself
    ("0.0.0.0", 8443, "cairn join CODE"),               # every interface, loopback too
    ("::", 8443, "cairn join CODE"),
    ("127.0.0.1", 9000, "cairn join CODE --url https://127.0.0.1:9000"),
    ("::", 9000, "cairn join CODE --url https://[::1]:9000"),
    ("192.168.1.10", 8443, "cairn join CODE --url https://192.168.1.10:8443"),
])
def test_join_names_the_address_only_when_join_would_not_try_it(host: str, port: int,
                                                                 join: str) -> None:
    lines = next_steps(Path("/srv/cairn home"), host, port, "")
    assert lines[0] == "cairnd: next steps, in another terminal:"
    assert lines[1].startswith("cairnd:   cairnd user add NAME --home '/srv/cairn home'  ")
    assert lines[2].removeprefix("cairnd:   ").split("  # ")[0].rstrip() == join


def test_the_commands_come_from_the_install_that_runs(tmp_path: Path) -> None:
    assert program_dir("/x/appliance/cli.py") == ""              # python -m appliance.cli
    assert program_dir(".venv/bin/cairnd") == ".venv/bin/"       # make run
    assert program_dir("/opt/cairn/bin/cairnd") == "/opt/cairn/bin/"
    on_path = shutil.which("cairnd")
    if on_path is not None:                                      # this one is on PATH
        assert program_dir(os.path.realpath(on_path)) == ""
