"""The agent finds its appliance on the LAN by mDNS: `cairn join` without --url, and again
after the appliance moved to another address — on a throwaway LAN of network namespaces.
(One in-process test first: the search for our appliance when another one answers first,
with browse replaced, which the LAN shows only when chance puts the decoy first.)

    cairn-br-SUFFIX:   br0 ── app0, dcy0, agt0
    cairn-app-SUFFIX:  eth0 10.79.0.1/24   the appliance the codes come from (`cairnd serve`)
    cairn-dcy-SUFFIX:  eth0 10.79.0.2/24   a decoy: another appliance, with its own users
    cairn-agt-SUFFIX:  eth0 10.79.0.3/24   the agent (`cairn`, CAIRN_DISCOVERY=on)

Every server and agent runs inside its namespace (`ip netns exec`), and each appliance listens
on its LAN address only, so it advertises there and nowhere else (see netns_helpers). Whether
an agent knocked on an appliance's door is read from that namespace's own TCP counters
(PassiveOpens in /proc/net/snmp, which count connections accepted there and nowhere else).
"""

from __future__ import annotations

import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import CAIRN, PASSPHRASE, agent_env, store_cheap_keys
from api_helpers import add_user, new_code
from cairnd_helpers import CAIRND, SERVE_LINE, RunningAppliance, cairnd_env, read_json
from netns_helpers import Lan, in_netns, ip, lan, netns_available

from agent import discovery
from appliance.config import ApplianceConfig, load_config
from appliance.home import init_home
from protocol.mdns import DiscoveredAppliance

WIRES = (
    ("br0", "app", "eth0", "10.79.0.1"),
    ("br0", "dcy", "eth0", "10.79.0.2"),
    ("br0", "agt", "eth0", "10.79.0.3"),
)
MOVED_ADDRESS = "10.79.0.11"
# Joins in which the agent met the decoy before the right appliance are what show that it
# tries every appliance found; which answers mDNS first is chance, so roles are swapped each
# round (the decoy issues a code too) until that happened, at most this many rounds.
MAX_JOIN_ROUNDS = 4


# --- looking for one appliance among several, with browse replaced (no socket) ----------------

def discovered(appliance_id: str, address: str) -> DiscoveredAppliance:
    return DiscoveredAppliance(appliance_id=appliance_id, api_version="1",
                               fingerprint="ab" * 32, addresses=(address,), port=8443,
                               name=f"Cairn appliance {appliance_id[:8]}._cairn._tcp.local.")


async def test_rediscovery_looks_past_another_appliance_that_answers_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ours, decoy = discovered("1" * 32, "10.79.0.11"), discovered("2" * 32, "10.79.0.2")
    searches: list[dict[str, Any]] = []

    async def browse(seconds: float, interfaces: list[str], *,
                     limit: int | None = None) -> list[DiscoveredAppliance]:
        searches.append({"interfaces": interfaces, "limit": limit})
        return [decoy, ours][:limit]

    monkeypatch.setenv(discovery.DISCOVERY_ENV, "on")
    monkeypatch.setattr(discovery, "browse", browse)
    monkeypatch.setattr(discovery, "local_interface_addresses",
                        lambda: ["127.0.0.1", "10.79.0.3", "fe80::1%eth0"])

    assert await discovery.find_appliances(appliance_id=ours.appliance_id) == [ours]
    # The quick search stopped at the decoy; the full one found ours.
    assert searches == [{"interfaces": ["10.79.0.3"], "limit": 1},
                        {"interfaces": ["10.79.0.3"], "limit": None}]
    assert await discovery.find_appliances(appliance_id="3" * 32) == []
    assert await discovery.find_appliances() == [decoy, ours]


# --- the real thing, between network namespaces -------------------------------------------------

@pytest.fixture
def net() -> Iterator[Lan]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with lan(WIRES) as built:
        yield built


def make_home(path: Path) -> ApplianceConfig:
    return init_home(path, disks=3, data_shards=2, parity_shards=1, reserve_free_bytes=0,
                     listen="127.0.0.1:0")  # each serve below says where it listens


def new_user(home: Path, name: str) -> str:
    """`cairnd user add NAME` with the user's keys stored sealed cheaply (test_agent_join
    joins at the production scrypt cost); the code for the first device."""
    code = add_user(home, name)
    store_cheap_keys(load_config(home).database, name)
    return code


@contextmanager
def serving_in(netns: str, home: Path, address: str,
               timeout: float = 30) -> Iterator[RunningAppliance]:
    """`cairnd serve --listen ADDRESS:0` inside NETNS, once it serves and advertises; killed
    at the end if the test did not stop it."""
    with tempfile.TemporaryFile("w+") as stderr_file:
        process = subprocess.Popen(
            in_netns(netns, *CAIRND, "serve", "--home", home, "--listen", f"{address}:0"),
            stdout=subprocess.PIPE, stderr=stderr_file, text=True, env=cairnd_env())
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], timeout)
            line = process.stdout.readline().rstrip("\n") if ready else ""
            match = SERVE_LINE.match(line)
            running = RunningAppliance(
                process=process, url=match["url"] if match else "",
                port=int(match["port"]) if match else 0,
                appliance_id=match["appliance_id"] if match else "",
                fingerprint=match["fingerprint"] if match else "", line=line,
                stderr_file=stderr_file)
            assert match is not None, f"no serving line: {line!r}\n{running.stderr()}"
            # The record is on the LAN once zeroconf has probed its name (about 1.5 s).
            deadline = time.monotonic() + timeout
            while "advertising _cairn._tcp on" not in running.stderr():
                assert time.monotonic() < deadline, f"not advertising:\n{running.stderr()}"
                assert process.poll() is None, f"serve exited:\n{running.stderr()}"
                time.sleep(0.05)
            yield running
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def cairn_in(netns: str, home: Path, *args: str | Path,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`cairn --home HOME ARGS...` inside NETNS, with mDNS discovery on."""
    return subprocess.run(in_netns(netns, *CAIRN, "--home", home, *args),
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL,
                          env=agent_env(CAIRN_DISCOVERY="on", CAIRN_PASSPHRASE=PASSPHRASE))


def cairn_ok(netns: str, home: Path, *args: str | Path) -> str:
    result = cairn_in(netns, home, *args)
    assert result.returncode == 0, (args, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def passive_opens(netns: str) -> int:
    """TCP connections accepted inside NETNS so far."""
    snmp = subprocess.run(in_netns(netns, "cat", "/proc/net/snmp"), capture_output=True,
                          text=True, timeout=10, check=True).stdout
    header, values = (line.split() for line in snmp.splitlines() if line.startswith("Tcp:"))
    return int(values[header.index("PassiveOpens")])


@pytest.mark.slow
@pytest.mark.root
def test_join_without_url_keeps_the_appliance_the_code_vouches_for(
        net: Lan, tmp_path: Path) -> None:
    app, dcy, agt = (net.hosts[h].netns for h in ("app", "dcy", "agt"))
    homes = {app: make_home(tmp_path / "app").home, dcy: make_home(tmp_path / "dcy").home}
    users = {app: "alice", dcy: "bob"}
    with serving_in(app, homes[app], "10.79.0.1") as appliance, \
            serving_in(dcy, homes[dcy], "10.79.0.2") as decoy:
        served = {app: appliance, dcy: decoy}
        passed_decoy = 0
        for round_ in range(MAX_JOIN_ROUNDS):
            for issuer, other in ((app, dcy), (dcy, app)):
                code = (new_user if round_ == 0 else new_code)(homes[issuer], users[issuer])
                agent = tmp_path / f"agent-{round_}-{users[issuer]}"
                knocks_before = passive_opens(other)

                output = cairn_ok(agt, agent, "join", code, "--name", f"laptop-{round_}")

                device = read_json(agent / "device.json")
                assert (device["appliance_id"], device["url"], device["user"]) == (
                    served[issuer].appliance_id, served[issuer].url, users[issuer]), output
                assert device["fingerprint"] == served[issuer].fingerprint
                assert f"joined {served[issuer].url} as device" in output
                passed_decoy += passive_opens(other) > knocks_before
            if passed_decoy:
                break
        assert passed_decoy, f"the decoy never answered mDNS first in {MAX_JOIN_ROUNDS} rounds"
        # The code was spent where it was made; no appliance enrolled a device it did not
        # vouch for.
        for netns, home in homes.items():
            listed = subprocess.run([*CAIRND, "device", "list", "--home", home, "--json"],
                                    capture_output=True, text=True, timeout=30, check=True)
            assert listed.stdout.count(f'"user": "{users[netns]}"') == round_ + 1, listed.stdout
            assert "Traceback" not in served[netns].stderr()


@pytest.mark.slow
@pytest.mark.root
def test_agent_follows_its_appliance_to_a_new_address(net: Lan, tmp_path: Path) -> None:
    app, dcy, agt = (net.hosts[h].netns for h in ("app", "dcy", "agt"))
    home, decoy_home = make_home(tmp_path / "app").home, make_home(tmp_path / "dcy").home
    agent = tmp_path / "agent"
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"written before the appliance moved\n" * 1000)
    with serving_in(dcy, decoy_home, "10.79.0.2") as decoy:
        with serving_in(app, home, "10.79.0.1") as before:
            cairn_ok(agt, agent, "join", new_user(home, "alice"))
            assert read_json(agent / "device.json")["url"] == before.url
            cairn_ok(agt, agent, "put", notes, "/notes.txt")
            assert before.stop(signal.SIGTERM) == 0

        # A new DHCP lease: the old address is gone from the LAN.
        ip("addr", "del", "10.79.0.1/24", "dev", "eth0", netns=app)
        ip("addr", "add", f"{MOVED_ADDRESS}/24", "dev", "eth0", netns=app)
        with serving_in(app, home, MOVED_ADDRESS) as after:
            assert after.url != before.url and after.appliance_id == before.appliance_id

            started = time.monotonic()
            listing = cairn_in(agt, agent, "ls", "/")
            took = time.monotonic() - started

            assert listing.returncode == 0, listing.stderr
            assert "notes.txt" in listing.stdout
            assert f"the appliance moved from {before.url} to {after.url}" in listing.stderr
            device = read_json(agent / "device.json")
            assert (device["url"], device["appliance_id"]) == (after.url, after.appliance_id)
            # Two connection attempts time out (10 s each), then one mDNS search.
            assert took < 45, f"ls took {took:.1f} s to find the appliance again"

            # Remembered: the next command goes straight to the new address.
            copy = tmp_path / "copy.txt"
            fetched = cairn_in(agt, agent, "get", "/notes.txt", copy)
            assert fetched.returncode == 0, fetched.stderr
            assert "moved" not in fetched.stderr
            assert copy.read_bytes() == notes.read_bytes()
            assert "Traceback" not in after.stderr() + decoy.stderr()
