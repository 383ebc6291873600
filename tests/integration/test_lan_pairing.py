"""A new device admitted from an existing one on the LAN (`cairn join --lan`, `cairn approve`),
on a throwaway LAN of network namespaces (tests/lan_helpers.py's, with a fourth host)::

    cairn-app-SUFFIX  10.79.0.1   the appliance (`cairnd serve`)
    cairn-dva-SUFFIX  10.79.0.2   E, an enrolled device of alice's (the approver)
    cairn-dvb-SUFFIX  10.79.0.3   N, the new device (`cairn join --lan`)
    cairn-rog-SUFFIX  10.79.0.4   a rogue: a script that answers N's request first

N never has CAIRN_PASSPHRASE in its environment and its stdin is closed: it must join without
anything typed. Requests are made short-lived with CAIRN_JOIN_LIFETIME_S where a test waits
for one to expire (agent/pairing/request.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lan_helpers import (
    APPLIANCE_ADDRESS,
    CAIRN,
    CAIRND,
    SERVE_LINE,
    Device,
    Started,
    ThreeHosts,
    three_hosts,
)
from netns_helpers import in_netns, netns_available

WIRES = (
    ("br0", "app", "eth0", APPLIANCE_ADDRESS),
    ("br0", "dva", "eth0", "10.79.0.2"),
    ("br0", "dvb", "eth0", "10.79.0.3"),
    ("br0", "rog", "eth0", "10.79.0.4"),
)
CODE_LINE = re.compile(r"Code: (\d{3}) (\d{3}) — type it on the device that approves")
ASKING = "On one of your devices run: cairn approve "
TESTS = Path(__file__).resolve().parent.parent
ROGUE = TESTS / "pairing_rogue.py"
DIFFER = "another device may have answered this request; nothing was admitted"
ENROLLMENT_EXIT = 3

pytestmark = [pytest.mark.slow, pytest.mark.root]


def env(**extra: str) -> dict[str, str]:
    """An agent's environment on the test LAN: no passphrase, no home, mDNS on (only the
    namespaces' interfaces exist where it runs)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    clean["CAIRN_DISCOVERY"] = "on"
    clean.update(extra)
    return clean


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[ThreeHosts]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with three_hosts(tmp_path / "lan", wires=WIRES, disks=3, data_shards=2,
                     parity_shards=1) as built:
        yield built


@pytest.fixture
def laptop(hosts: ThreeHosts) -> Device:
    """E: alice's first device, joined with a code."""
    return hosts.device("dva", "laptop", hosts.add_user("alice"))


def start(hosts: ThreeHosts, host: str, home: Path, *args: str, log: str,
          stdin: bool = False, extra: dict[str, str] | None = None) -> Started:
    """`cairn --home HOME ARGS...` left running in HOST's namespace, output in BASE/LOG
    (ended with the LAN at the latest)."""
    home.mkdir(parents=True, exist_ok=True)
    path = hosts.base / log
    with open(path, "ab") as out:
        process = subprocess.Popen(
            in_netns(hosts.netns(host), *CAIRN, "--home", home, *args), stdout=out,
            stderr=subprocess.STDOUT, text=True, env=env(**(extra or {})),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
    run = Started(process, path)
    hosts.processes.started.append(run)
    return run


def ask(hosts: ThreeHosts, name: str, **extra: str) -> Started:
    """N: `cairn join --lan --name NAME` on dvb, once its request is out."""
    run = start(hosts, "dvb", hosts.base / name, "join", "--lan", "--name", name,
                log=f"{name}-join.log", extra=extra)
    wait_for(run, re.escape(ASKING + name))
    return run


def approve(hosts: ThreeHosts, laptop: Device, name: str) -> Started:
    """E: `cairn approve NAME`, which will read the code from its stdin."""
    return start(hosts, "dva", laptop.home, "approve", name, log=f"approve-{name}.log",
                 stdin=True)


def wait_for(run: Started, pattern: str, timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, run.text())
        if found:
            return found
        if not run.running():
            found = re.search(pattern, run.text())
            assert found, f"exited {run.process.returncode} without {pattern!r}:\n{run.text()}"
            return found
        assert time.monotonic() < deadline, f"no {pattern!r} in {timeout} s:\n{run.text()}"
        time.sleep(0.05)


def type_code(run: Started, code: str) -> None:
    assert run.process.stdin is not None
    run.process.stdin.write(code + "\n")
    run.process.stdin.flush()


def ended(run: Started, timeout: float = 60) -> int:
    try:
        return run.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{run.text()}") from None


def shown_code(run: Started) -> str:
    found = wait_for(run, CODE_LINE.pattern)
    return found[1] + found[2]


def devices(hosts: ThreeHosts) -> list[tuple[str, str, str, bool]]:
    """The appliance's devices: (id, user, name, revoked) each."""
    listed: list[dict[str, Any]] = json.loads(hosts.cairnd("device", "list", "--json"))
    return sorted((d["id"], d["user"], d["name"], d["revoked"]) for d in listed)


def no_traceback(*runs: Started) -> None:
    for run in runs:
        assert "Traceback" not in run.text(), run.text()


# --- the tests -------------------------------------------------------------------------------


def test_a_device_admitted_with_the_matching_code_then_syncs_both_ways(
        hosts: ThreeHosts, laptop: Device) -> None:
    started = time.monotonic()
    phone = ask(hosts, "phone")

    pending = json.loads(laptop.ok("devices", "pending", "--json").stdout)
    assert [(p["name"], p["expires_in_s"] > 500) for p in pending] == [("phone", True)]
    status = laptop.ok("status", "--pending").stdout
    assert "join requests: 1 pending (phone)" in status

    approver = approve(hosts, laptop, "phone")
    code = shown_code(phone)
    wait_for(approver, "Type the code shown on phone: ")
    type_code(approver, f"{code[:3]} {code[3:]}")

    assert ended(approver) == 0, approver.text()
    assert ended(phone) == 0, phone.text()
    assert "Admitted phone (device " in approver.text()
    assert "Joined as phone (user alice)" in phone.text()
    assert "passphrase" not in phone.text().lower()
    no_traceback(approver, phone)
    admitted_in = time.monotonic() - started
    print(f"asked, approved and joined in {admitted_in:.1f} s")

    [(phone_id, user, _, revoked)] = [d for d in devices(hosts) if d[2] == "phone"]
    assert (user, revoked) == ("alice", False)
    home = hosts.base / "phone"
    device = json.loads((home / "device.json").read_text())
    assert (device["device_id"], device["user"]) == (phone_id, "alice")
    for name in ("keys", "device-key.pem", "device-cert.pem", "device-ca.pem"):
        assert (home / name).stat().st_mode & 0o077 == 0, name
    assert (home / "device-ca.pem").read_bytes() == (laptop.home / "device-ca.pem").read_bytes()
    assert (home / "keys").read_bytes() == (laptop.home / "keys").read_bytes()

    # N syncs both ways with E, with the keys E handed over.
    phone_device = Device(name="phone", netns=hosts.netns("dvb"), address="10.79.0.3",
                          home=home, processes=hosts.processes)
    on_laptop, on_phone = hosts.base / "laptop-files", hosts.base / "phone-files"
    on_laptop.mkdir()
    on_phone.mkdir()
    (on_laptop / "from-laptop.txt").write_text("written on the laptop\n")
    laptop.ok("sync", on_laptop, "--remote", "/lan", "--once")
    phone_device.ok("sync", on_phone, "--remote", "/lan", "--once")
    assert (on_phone / "from-laptop.txt").read_text() == "written on the laptop\n"
    (on_phone / "from-phone.txt").write_text("written on the phone\n")
    phone_device.ok("sync", on_phone, "--remote", "/lan", "--once")
    laptop.ok("sync", on_laptop, "--remote", "/lan", "--once")
    assert (on_laptop / "from-phone.txt").read_text() == "written on the phone\n"


def test_a_wrong_code_an_expired_request_and_an_ignored_one_admit_nothing(
        hosts: ThreeHosts, laptop: Device) -> None:
    before = devices(hosts)

    # A wrong code (a typo, or someone in between): refused on both sides.
    phone = ask(hosts, "phone")
    approver = approve(hosts, laptop, "phone")
    code = shown_code(phone)
    wait_for(approver, "Type the code shown on phone: ")
    type_code(approver, f"{(int(code) + 1) % 10 ** 6:06d}")
    assert ended(approver) == ENROLLMENT_EXIT, approver.text()
    assert f"cairn: error: the codes differ: {DIFFER}" in approver.text()
    assert ended(phone) == ENROLLMENT_EXIT, phone.text()
    assert "the codes differ" in phone.text()
    assert not (hosts.base / "phone" / "device.json").exists()

    # An expired request: the new device gives up, and the approver refuses it even with
    # the right code typed.
    tablet = ask(hosts, "tablet", CAIRN_JOIN_LIFETIME_S="20")
    approver = approve(hosts, laptop, "tablet")
    code = shown_code(tablet)
    wait_for(approver, "Type the code shown on tablet: ")
    assert ended(tablet, timeout=40) == ENROLLMENT_EXIT, tablet.text()
    assert "the request expired after" in tablet.text()
    type_code(approver, code)
    assert ended(approver) == ENROLLMENT_EXIT, approver.text()
    assert "tablet's request expired" in approver.text()

    # An ignored request is no longer listed; one request per home at a time; SIGTERM
    # ends a request cleanly.
    watch = ask(hosts, "watch")
    again = start(hosts, "dvb", hosts.base / "watch", "join", "--lan", "--name", "watch",
                  log="watch-again.log")
    assert ended(again) == 2, again.text()
    assert "another `cairn join --lan` is already asking for" in again.text()
    listed = json.loads(laptop.ok("devices", "pending", "--json").stdout)
    assert [p["name"] for p in listed] == ["watch"]
    assert "ignoring watch's request" in laptop.ok("devices", "ignore", "watch").stdout
    assert json.loads(laptop.ok("devices", "pending", "--json").stdout) == []
    assert "join requests: none" in laptop.ok("status", "--pending").stdout
    assert watch.stop() == 128 + 15, watch.text()
    assert "interrupted by SIGTERM" in watch.text()

    no_traceback(phone, tablet, watch, approver)
    assert devices(hosts) == before


def restart_without_lan_admission(hosts: ThreeHosts) -> Started:
    """The appliance stopped, `[enrollment] lan_admission = false` in its config, and served
    again at the same address (devices keep their URL)."""
    port = hosts.url.rsplit(":", 1)[1]
    assert hosts.server.stop() == 0, hosts.server.text()
    config = hosts.home / "config.toml"
    text = config.read_text()
    assert "lan_admission = true" in text
    config.write_text(text.replace("lan_admission = true", "lan_admission = false"))
    log = hosts.base / "cairnd-again.log"
    with open(log, "a") as err:
        process = subprocess.Popen(
            in_netns(hosts.netns("app"), *CAIRND, "serve", "--home", hosts.home, "--listen",
                     f"{APPLIANCE_ADDRESS}:{port}"),
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            env=env())
    run = Started(process, log)
    hosts.processes.started.append(run)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert SERVE_LINE.match(line.strip()), (line, run.text())
    return run


def test_a_rogue_answering_first_is_caught_and_the_appliance_may_forbid_lan_admission(
        hosts: ThreeHosts, laptop: Device) -> None:
    before = devices(hosts)

    phone = ask(hosts, "phone")
    rogue = subprocess.run(in_netns(hosts.netns("rog"), sys.executable, ROGUE, "10.79.0.4"),
                           capture_output=True, text=True, timeout=60, check=False,
                           env=env(PYTHONPATH=str(TESTS.parent)))
    assert rogue.returncode == 0, rogue.stderr
    assert json.loads(rogue.stdout) == {"hellos": [200]}
    code = shown_code(phone)   # what the new device shows: made with the rogue's keys

    approver = approve(hosts, laptop, "phone")
    type_code(approver, code)
    assert ended(approver) == ENROLLMENT_EXIT, approver.text()
    assert "another device already answered phone's request" in approver.text()
    assert DIFFER in approver.text()
    assert ended(phone) == ENROLLMENT_EXIT, phone.text()
    assert "two devices answered this request" in phone.text()
    assert not (hosts.base / "phone" / "device.json").exists()
    assert devices(hosts) == before

    # The appliance's config forbids admitting devices from the LAN: E says so, N ends.
    server = restart_without_lan_admission(hosts)
    tablet = ask(hosts, "tablet")
    approver = approve(hosts, laptop, "tablet")
    code = shown_code(tablet)
    wait_for(approver, "Type the code shown on tablet: ")
    type_code(approver, code)
    assert ended(approver) != 0, approver.text()
    assert "does not admit devices from the LAN" in approver.text()
    assert ended(tablet) == ENROLLMENT_EXIT, tablet.text()
    assert "does not admit devices from the LAN" in tablet.text()
    no_traceback(phone, tablet, approver)
    assert devices(hosts) == before
    assert "admitted new device" not in server.text()
