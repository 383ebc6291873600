"""The real `cairnd serve` as a subprocess on 127.0.0.1:0, spoken to over verified TLS."""

from __future__ import annotations

import os
import shlex
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from agent_helpers import PASSPHRASE, agent_env
from api_helpers import add_user, enroll
from cairnd_helpers import MakeHome, read_json, read_line, run_cairnd, serving

from appliance.config import ApplianceConfig
from appliance.serve import RUN_DIR, SERVE_INFO_NAME
from appliance.tls import read_certificate_fingerprint


def verifying_client(config: ApplianceConfig) -> httpx.Client:
    """Trusts only the home's own certificate (as an enrolled agent pins it)."""
    context = ssl.create_default_context(cafile=str(config.tls_certificate))
    return httpx.Client(verify=context, timeout=10)


@pytest.fixture
def home(appliance_home: MakeHome) -> ApplianceConfig:
    return appliance_home(disks=4, data_shards=2, parity_shards=1)


def test_serve_health_disks_and_sigterm(home: ApplianceConfig) -> None:
    with serving(home.home) as server:
        assert server.url == f"https://127.0.0.1:{server.port}"
        assert server.appliance_id == home.appliance_id
        assert server.fingerprint == read_certificate_fingerprint(home.tls_certificate)

        info = read_json(home.home / RUN_DIR / SERVE_INFO_NAME)
        assert info["url"] == server.url
        assert info["port"] == server.port
        assert info["pid"] == server.process.pid
        assert info["fingerprint"] == server.fingerprint

        with verifying_client(home) as http:
            health = http.get(f"{server.url}/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert health.json()["appliance_id"] == home.appliance_id
            assert health.json()["disks"] == {"ok": 4, "total": 4}

            assert http.get(f"{server.url}/disks").status_code == 401  # devices only
            device = enroll(server.url, home.tls_certificate, add_user(home.home, "admin"))
            disks = device.ok(device.get("/disks"))
            device.close()
            assert [d["name"] for d in disks] == ["disk0", "disk1", "disk2", "disk3"]
            assert {d["state"] for d in disks} == {"ok"}

            # The name "localhost" is in the certificate too.
            assert http.get(f"https://localhost:{server.port}/health").status_code == 200

            missing = http.get(f"{server.url}/no/such/route")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
            assert set(missing.json()["error"]) == {"code", "message"}

        # Without the pinned certificate, TLS verification fails: it is self-signed.
        with pytest.raises(httpx.ConnectError), httpx.Client(timeout=10) as stranger:
            stranger.get(f"{server.url}/health")

        assert server.stop(signal.SIGTERM, timeout=10) == 0
        assert server.process.stdout is not None
        assert server.process.stdout.read() == ""  # exactly one line on stdout
        assert "Traceback" not in server.stderr()
        assert "SIGTERM: shutting down" in server.stderr()
    assert not (home.home / RUN_DIR / SERVE_INFO_NAME).exists()


def test_health_is_degraded_with_a_disk_missing(home: ApplianceConfig) -> None:
    disk = home.store.disks[3].path
    disk.rename(disk.with_name("disk3.away"))
    with serving(home.home) as server, verifying_client(home) as http:
        body = http.get(f"{server.url}/health").json()
        assert body["status"] == "degraded"
        assert body["disks"] == {"ok": 3, "total": 4}
        device = enroll(server.url, home.tls_certificate, add_user(home.home, "admin"))
        states = [d["state"] for d in device.ok(device.get("/disks"))]
        device.close()
        assert states == ["ok", "ok", "ok", "missing"]
        assert server.stop(signal.SIGINT) == 0


def test_second_server_on_one_home_is_refused(home: ApplianceConfig) -> None:
    with serving(home.home) as server:
        second = run_cairnd("serve", "--home", home.home, "--listen", "127.0.0.1:0")
        assert second.returncode == 3
        assert second.stderr.strip().splitlines()[-1] == (
            f"cairnd: error: another cairnd serve (pid {server.process.pid}) is already "
            f"running for {home.home}")
        assert server.stop() == 0


def test_port_in_use_is_one_clear_line(home: ApplianceConfig,
                                       appliance_home: MakeHome) -> None:
    other = appliance_home("other", disks=2, data_shards=1, parity_shards=1)
    with serving(home.home) as server:
        result = run_cairnd("serve", "--home", other.home, "--listen",
                            f"127.0.0.1:{server.port}")
        assert result.returncode == 3
        assert result.stderr.strip().splitlines()[-1].startswith(
            f"cairnd: error: cannot listen on 127.0.0.1:{server.port}: Address already in use")
        assert "Traceback" not in result.stderr
        assert server.stop() == 0


def test_certificate_is_made_at_first_start_when_absent(home: ApplianceConfig) -> None:
    os.unlink(home.tls_certificate)
    os.unlink(home.tls_key)
    with serving(home.home) as server:
        assert Path(home.tls_certificate).is_file()
        assert server.fingerprint == read_certificate_fingerprint(home.tls_certificate)
        with verifying_client(home) as http:
            assert http.get(f"{server.url}/health").status_code == 200
        assert server.stop() == 0


def test_next_steps_are_printed_once_and_work_as_printed(home: ApplianceConfig,
                                                         tmp_path: Path) -> None:
    """What `make run` shows once the appliance listens: run literally (with NAME and CODE
    filled in), the two commands add a user and join this machine as their device."""
    with serving(home.home, "--next-steps") as server:
        lines = [read_line(server.process, 10).rstrip("\n") for _ in range(4)]
        assert lines[0] == "cairnd: next steps, in another terminal:"
        assert lines[3] == "cairnd: Ctrl-C (or SIGTERM) stops the appliance."
        add, join = (line.removeprefix("cairnd:   ").split("  # ")[0].rstrip()
                     for line in lines[1:3])
        assert add == f"cairnd user add NAME --home {home.home}"
        assert join == f"cairn join CODE --url {server.url}"    # not the default port

        env = agent_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                        CAIRN_HOME=str(tmp_path / "agent"), CAIRN_PASSPHRASE=PASSPHRASE)
        added = subprocess.run(shlex.split(add.replace("NAME", "newcomer")), env=env,
                               capture_output=True, text=True, timeout=60, check=False)
        assert added.returncode == 0, added.stderr
        code = added.stdout.strip().splitlines()[-1]
        joined = subprocess.run(shlex.split(join.replace("CODE", code)), env=env,
                                capture_output=True, text=True, timeout=60, check=False,
                                stdin=subprocess.DEVNULL)
        assert joined.returncode == 0, joined.stderr
        assert "as device" in joined.stdout and "of user newcomer" in joined.stdout
        assert read_line(server.process, 0.5) == ""      # once: nothing more on stdout
        assert server.stop() == 0
