"""One owner of the disks: while `cairnd serve` runs, `cairnd scrub` and `cairnd disks` run
inside it through HOME/run/admin.sock; without a server they work on the disks directly,
holding the owner lock so that no server starts under them."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest

from appliance import admin_client
from appliance.admin import socket_path
from appliance.config import ApplianceConfig
from appliance.errors import HomeBusyError
from appliance.owner import own_disks
from tests.cairnd_helpers import MakeHome, run_cairnd, serving


@pytest.fixture
def home(appliance_home: MakeHome) -> ApplianceConfig:
    return appliance_home()


def test_scrub_and_disks_run_inside_the_server_while_it_serves(home: ApplianceConfig) -> None:
    with serving(home.home) as server:
        path = socket_path(home.home)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        scrub = run_cairnd("scrub", "--home", home.home, "--json")
        assert scrub.returncode == 0, scrub.stderr
        assert json.loads(scrub.stdout)["unrecoverable"] == 0
        disks = run_cairnd("disks", "--home", home.home, "--json")
        assert disks.returncode == 0, disks.stderr
        assert [row["state"] for row in json.loads(disks.stdout)] == ["ok"] * 6
        log = server.stderr()
        assert "admin socket: scrub" in log and "admin socket: disks" in log

        # Garbage and unknown commands get an answer, never a hang or a crash.
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(str(path))
            raw.sendall(b'{"command": "format-everything"}\n')
            reply = json.loads(raw.makefile("rb").readline())
        assert reply["error"]["message"] == "unknown admin command 'format-everything'"
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(str(path))
            raw.sendall(b"not json\n")
            assert raw.recv(100) == b""          # closed, logged
        assert server.stop() == 0
    assert not path.exists()


def test_without_a_server_the_command_owns_the_disks(home: ApplianceConfig) -> None:
    scrub = run_cairnd("scrub", "--home", home.home)
    assert scrub.returncode == 0, scrub.stderr
    assert scrub.stdout.startswith("cairnd: scrub: checked 0 blocks")
    # While a command works on the disks directly, a server cannot start...
    with own_disks(home.home, "cairnd scrub"):
        refused = run_cairnd("serve", "--home", home.home, "--listen", "127.0.0.1:0")
        assert refused.returncode == 3
        assert "another cairnd scrub (pid" in refused.stderr


def test_a_lock_held_without_a_socket_is_reported_not_waited_on_forever(
        home: ApplianceConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_client, "STARTUP_WAIT_S", 0.5)
    with own_disks(home.home, "cairnd fsck"), pytest.raises(HomeBusyError) as refused:
        admin_client.run_store_command(home.home, "disks", {}, lambda fields: None)
    assert "another cairnd fsck (pid" in refused.value.message
    assert "admin socket" in refused.value.message


def test_a_stale_socket_from_a_killed_server_is_not_mistaken_for_one(
        home: ApplianceConfig, tmp_path: Path) -> None:
    path = socket_path(home.home)
    path.parent.mkdir(exist_ok=True)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))                     # a socket file nobody listens on
    result, by_server = admin_client.run_store_command(home.home, "disks", {},
                                                       lambda fields: None)
    assert by_server is False and len(result["disks"]) == 6
