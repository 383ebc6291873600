"""`cairn join CODE` without `--url` on the machine that runs the appliance: mDNS finds
nothing (`make run`'s appliance listens on 127.0.0.1 and advertises nothing; tests turn
discovery off), so the agent tries this machine's default address, where the code's proof
tells it the appliance is the one that made the code.

These tests need the default port (8443) on 127.0.0.1; a machine where something else holds
it (a `make run` appliance left running) skips them rather than failing for that."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from agent_helpers import PASSPHRASE, agent_env, fails, run_cairn
from api_helpers import add_user
from cairnd_helpers import serving

from appliance.home import init_home
from protocol.enrollment import EnrollmentCode
from protocol.mdns import DEFAULT_PORT


def _default_port_free() -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            return False
    return True


needs_default_port = pytest.mark.skipif(not _default_port_free(),
                                        reason=f"127.0.0.1:{DEFAULT_PORT} is in use here")


@needs_default_port
def test_join_without_url_finds_the_appliance_on_this_machine(tmp_path: Path) -> None:
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    # A later --listen wins over the helper's 127.0.0.1:0.
    with serving(config.home, "--listen", f"127.0.0.1:{DEFAULT_PORT}") as server:
        code = add_user(config.home, "alice")
        home = tmp_path / "home"
        joined = run_cairn(home, "join", code, "--name", "laptop",
                           env=agent_env(CAIRN_PASSPHRASE=PASSPHRASE))
        assert joined.returncode == 0, joined.stderr
        device = json.loads((home / "device.json").read_text())
        assert device["url"] == server.url == f"https://127.0.0.1:{DEFAULT_PORT}"
        # A code this appliance did not make is refused there, with the reason.
        refused = run_cairn(tmp_path / "other", "join", EnrollmentCode.generate().format(),
                            "--name", "x", env=agent_env(CAIRN_PASSPHRASE=PASSPHRASE))
        fails(refused, 3, "no appliance accepted this code", server.url)
        assert not (tmp_path / "other" / "device.json").exists()
        assert server.stop() == 0


@needs_default_port
def test_join_without_url_and_no_appliance_says_where_it_looked(tmp_path: Path) -> None:
    # A well-formed code (its check character matches) that no appliance made.
    code = EnrollmentCode.generate().format()
    result = run_cairn(tmp_path / "home", "join", code, "--name", "laptop",
                       env=agent_env(CAIRN_PASSPHRASE=PASSPHRASE))
    line = fails(result, 4, "no Cairn appliance answered", f"127.0.0.1:{DEFAULT_PORT}",
                 "--url")
    assert "mDNS discovery is off" in line
