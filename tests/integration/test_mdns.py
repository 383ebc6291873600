"""LAN advertisement over mDNS: the pure decisions, `advertising` with a fake zeroconf, and the
real thing between network namespaces that the tests build (see netns_helpers.lan).

No zeroconf instance is ever made in the machine's own network namespace: the tests that open
sockets run as subprocesses inside the throwaway namespaces, and the in-process tests replace
`Zeroconf` with fakes.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import trio
from netns_helpers import Lan, lan, netns_available, read_json_line, reap, spawn_in
from zeroconf import ServiceInfo

from agent.discovery import parse_service_info
from appliance import advertise
from appliance.advertise import (
    advertised_addresses,
    advertising,
    build_service_info,
    is_loopback_host,
)
from protocol.mdns import SERVICE_TYPE, DiscoveredAppliance
from protocol.version import API_VERSION

APPLIANCE_ID = "3f5e0c1a-8d2b-4c6e-9a7f-0b1c2d3e4f50"
FINGERPRINT = "0123456789abcdef" * 4
PORT = 8443
MACHINE = ["127.0.0.1", "::1", "192.168.1.20", "10.0.0.5", "fd00::2", "fe80::1%eth0"]


# --- where to advertise ---------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "localhost",
                                  "LOCALHOST."])
def test_loopback_hosts_advertise_nothing(host: str) -> None:
    assert is_loopback_host(host)
    assert advertised_addresses(host, MACHINE) == []


@pytest.mark.parametrize("host", ["192.168.1.20", "10.0.0.5", "fd00::2"])
def test_a_specific_address_advertises_exactly_that_address(host: str) -> None:
    assert not is_loopback_host(host)
    assert advertised_addresses(host, MACHINE) == [host]


def test_wildcards_advertise_every_non_loopback_address_of_their_family() -> None:
    assert advertised_addresses("0.0.0.0", MACHINE) == ["192.168.1.20", "10.0.0.5"]
    assert advertised_addresses("::", MACHINE) == ["fd00::2", "fe80::1"]
    assert advertised_addresses("0.0.0.0", ["10.0.0.5", "10.0.0.5"]) == ["10.0.0.5"]
    # A machine with nothing but loopback has no LAN to advertise on.
    assert advertised_addresses("0.0.0.0", ["127.0.0.1", "::1"]) == []


def test_host_names_must_be_resolved_first() -> None:
    with pytest.raises(ValueError):
        advertised_addresses("nas.example", MACHINE)
    assert advertise.listen_address("localhost") == "localhost"
    assert advertise.listen_address("10.0.0.5") == "10.0.0.5"


# --- the record -------------------------------------------------------------------------------

def test_the_record_carries_id_api_version_and_fingerprint() -> None:
    info = build_service_info(APPLIANCE_ID, PORT, FINGERPRINT, ["192.168.1.20"])
    assert info.type == SERVICE_TYPE == "_cairn._tcp.local."
    assert info.name == "Cairn appliance 3f5e0c1a._cairn._tcp.local."
    assert info.server == "cairn-3f5e0c1a.local."
    assert info.port == PORT
    assert info.parsed_addresses() == ["192.168.1.20"]
    assert info.decoded_properties == {"id": APPLIANCE_ID, "api": API_VERSION,
                                       "fp": FINGERPRINT}

    assert parse_service_info(info) == DiscoveredAppliance(
        appliance_id=APPLIANCE_ID, api_version=API_VERSION, fingerprint=FINGERPRINT,
        addresses=("192.168.1.20",), port=PORT, name=info.name)
    assert parse_service_info(info).urls == ["https://192.168.1.20:8443"]  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [
    {"appliance_id": ""}, {"port": 0}, {"port": 70000}, {"fingerprint": "ABCD" * 16},
    {"fingerprint": "00" * 20}, {"addresses": []}])
def test_unusable_records_are_refused(bad: dict[str, Any]) -> None:
    values: dict[str, Any] = {"appliance_id": APPLIANCE_ID, "port": PORT,
                              "fingerprint": FINGERPRINT, "addresses": ["10.0.0.5"], **bad}
    with pytest.raises(ValueError):
        build_service_info(**values)


@pytest.mark.parametrize("properties", [
    {"api": "1", "fp": FINGERPRINT}, {"id": APPLIANCE_ID, "fp": FINGERPRINT},
    {"id": APPLIANCE_ID, "api": "1"}, {"id": APPLIANCE_ID, "api": "1", "fp": "xyz"}])
def test_foreign_or_broken_records_are_ignored_when_browsing(properties: dict[str, str]) -> None:
    info = ServiceInfo(SERVICE_TYPE, f"Other.{SERVICE_TYPE}", port=PORT, properties=properties,
                       server="other.local.", parsed_addresses=["10.0.0.9"])
    assert parse_service_info(info) is None


# --- advertising, with zeroconf replaced (nothing opens a socket) -----------------------------

class FakeZeroconf:
    made: ClassVar[list[FakeZeroconf]] = []
    fail_with: ClassVar[BaseException | None] = None

    def __init__(self, *, interfaces: list[str], use_asyncio: bool) -> None:
        if FakeZeroconf.fail_with is not None:
            raise FakeZeroconf.fail_with
        self.interfaces, self.use_asyncio = interfaces, use_asyncio
        self.registered: list[ServiceInfo] = []
        self.closed = False
        FakeZeroconf.made.append(self)

    def register_service(self, info: ServiceInfo, allow_name_change: bool = False) -> None:
        self.registered.append(info)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_zeroconf(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeZeroconf]]:
    FakeZeroconf.made, FakeZeroconf.fail_with = [], None
    monkeypatch.setattr(advertise, "Zeroconf", FakeZeroconf)
    yield FakeZeroconf


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_loopback_makes_no_zeroconf_at_all(
        host: str, fake_zeroconf: type[FakeZeroconf], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.advertise")
    async with advertising(host, PORT, APPLIANCE_ID, FINGERPRINT) as advertised:
        assert advertised is False
    assert fake_zeroconf.made == []
    assert "not advertising on the LAN: listening on loopback only" in caplog.text


async def test_advertises_only_on_the_listening_address_and_stops_on_cancel(
        fake_zeroconf: type[FakeZeroconf], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.advertise")
    with trio.move_on_after(0.05):  # the server shutting down: cancelled inside the block
        async with advertising("192.0.2.77", PORT, APPLIANCE_ID, FINGERPRINT) as advertised:
            assert advertised is True
            await trio.sleep_forever()
    [instance] = fake_zeroconf.made
    assert instance.interfaces == ["192.0.2.77"]
    assert instance.use_asyncio is False  # its own thread and loop; trio is not asyncio
    [info] = instance.registered
    assert info.parsed_addresses() == ["192.0.2.77"]
    assert instance.closed
    assert "advertising _cairn._tcp on 192.0.2.77:8443" in caplog.text


async def test_a_zeroconf_failure_is_a_warning_not_a_crash(
        fake_zeroconf: type[FakeZeroconf], caplog: pytest.LogCaptureFixture) -> None:
    fake_zeroconf.fail_with = OSError(98, "Address already in use")
    async with advertising("192.0.2.77", PORT, APPLIANCE_ID, FINGERPRINT) as advertised:
        assert advertised is False
    [record] = [r for r in caplog.records if r.name == "appliance.advertise"]
    assert record.levelno == logging.WARNING
    assert "Address already in use" in record.getMessage()


# --- the real thing, between network namespaces -------------------------------------------------

@pytest.fixture
def net() -> Iterator[Lan]:
    """A fresh LAN for each test (about 0.2 s): the kernel retransmits IGMP reports for a
    second after a socket leaves a group, so a shared LAN would carry one test's packets
    into the next test's transmit counters."""
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with lan() as built:
        yield built


Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start netns_helpers as a script in a namespace; every process is stopped at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(netns: str, *args: str) -> subprocess.Popen[str]:
        process = spawn_in(netns, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            reap(process)


def start_advertiser(spawn: Spawn, net: Lan, listen_host: str) -> tuple[subprocess.Popen[str],
                                                                        bool]:
    process = spawn(net.hosts["a"].netns, "advertise", listen_host, str(PORT), APPLIANCE_ID,
                    FINGERPRINT)
    return process, read_json_line(process, timeout=10)["advertising"]


def browse_from(spawn: Spawn, net: Lan, host: str, seconds: float,
                limit: int | None) -> subprocess.Popen[str]:
    [address] = net.hosts[host].addresses.values()
    return spawn(net.hosts[host].netns, "browse", str(seconds),
                 "-" if limit is None else str(limit), address)


def found_by(process: subprocess.Popen[str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = read_json_line(process, timeout=15)["found"]
    return found


def expected(*addresses: str) -> dict[str, Any]:
    return {"appliance_id": APPLIANCE_ID, "api_version": API_VERSION,
            "fingerprint": FINGERPRINT, "addresses": sorted(addresses), "port": PORT,
            "name": "Cairn appliance 3f5e0c1a._cairn._tcp.local."}


def normalized(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**f, "addresses": sorted(f["addresses"])} for f in found]


@pytest.mark.root
def test_a_lan_address_is_advertised_on_that_lan_only(net: Lan, spawn: Spawn) -> None:
    # Another mDNS stack of the same machine (avahi-daemon on a NAS) listens on the other LAN:
    # Linux then hands that LAN's queries to zeroconf's wildcard socket too, unless pinned.
    other_stack = spawn(net.hosts["a"].netns, "join-group", "10.78.0.1")
    assert read_json_line(other_stack, timeout=10) == {"joined": True}
    advertiser, advertised = start_advertiser(spawn, net, "10.77.0.1")
    assert advertised is True
    same_lan = browse_from(spawn, net, "b", seconds=5, limit=1)
    other_lan = browse_from(spawn, net, "c", seconds=2, limit=None)

    assert normalized(found_by(same_lan)) == [expected("10.77.0.1")]
    assert found_by(other_lan) == []
    _, log = reap(advertiser)
    assert "advertising _cairn._tcp on 10.77.0.1:8443" in log
    assert "Traceback" not in log
    # Not one packet on the LAN the appliance does not listen on: no answer, no goodbye.
    assert net.tx_packets("a", "eth1") == 0


@pytest.mark.root
def test_the_wildcard_is_advertised_on_every_lan(net: Lan, spawn: Spawn) -> None:
    _, advertised = start_advertiser(spawn, net, "0.0.0.0")
    assert advertised is True
    lans = [browse_from(spawn, net, host, seconds=5, limit=1) for host in ("b", "c")]
    for browser in lans:
        assert normalized(found_by(browser)) == [expected("10.77.0.1", "10.78.0.1")]


@pytest.mark.root
def test_loopback_sends_nothing_to_any_network(net: Lan, spawn: Spawn) -> None:
    advertiser, advertised = start_advertiser(spawn, net, "127.0.0.1")
    assert advertised is False
    lans = [browse_from(spawn, net, host, seconds=2, limit=None) for host in ("b", "c")]
    for browser in lans:
        assert found_by(browser) == []
    _, log = reap(advertiser)
    assert "not advertising on the LAN: listening on loopback only" in log
    # Not one packet, not even an IGMP join for the mDNS group.
    assert {i: net.tx_packets("a", i) for i in ("eth0", "eth1")} == {"eth0": 0, "eth1": 0}
