"""LAN advertisement of the appliance over mDNS / DNS-SD (`_cairn._tcp.local.`).

Theory of operation
-------------------
While `cairnd serve` runs, the appliance answers mDNS queries for the service type
`_cairn._tcp.local.` with one instance::

    Cairn appliance 3f5e0c1a._cairn._tcp.local.   SRV  0 0 PORT cairn-3f5e0c1a.local.
                                                  TXT  id=<appliance id> api=1 fp=<sha256 hex>
    cairn-3f5e0c1a.local.                         A / AAAA  <the addresses it listens on>

so an agent on the LAN finds the URL (`https://ADDRESS:PORT`) and, from `fp`, the certificate
fingerprint it should see there (an enrollment code carries the same fingerprint, so the agent
can tell *its* appliance from any other one on the LAN and pin the certificate).

Where it is sent is decided by the address the HTTP socket listens on, never by anything else
(`advertised_addresses`, a pure function):

- loopback (`127.0.0.0/8`, `::1`, `localhost`): nothing at all. No zeroconf instance is made,
  no socket is opened, not one packet leaves the machine. This is the README's embedded default.
- one specific address (`192.168.1.20`): that address only. Zeroconf joins the mDNS group and
  sends only on the interface that holds it, the A record names only it, and its sockets are
  bound to that interface (SO_BINDTODEVICE, see `_pin_to_interface`) so that it does not even
  hear, let alone answer, queries from the machine's other networks. A NAS with a LAN and a
  storage or WAN interface advertises on the LAN it listens on and nowhere else.
- the wildcard (`0.0.0.0`, or `::` for IPv6; serve binds `::` with IPV6_V6ONLY): every
  non-loopback address of that family on the machine, each on its own interface.
- any other host name is first resolved the way serve binds it (first `getaddrinfo` answer).

The appliance runs under trio, while python-zeroconf is built on asyncio. `AsyncZeroconf` would
need an asyncio loop in this thread, so we use the blocking `Zeroconf` class instead: it runs its
own asyncio loop in a daemon thread, and its blocking calls (`register_service`, which probes
the name for about 1.5 s, and `close`, which sends the goodbye packets) are made from a worker
thread via `trio.to_thread.run_sync`, so the trio loop is never blocked.

Advertising is a convenience, not a duty: if zeroconf cannot start (port 5353 refused, no
usable interface, a blocked event loop), `advertising` logs one warning and yields False; the
HTTP server keeps serving and agents can still join with `--url`.

`browse` is the other side, for tests and for the agent's `cairn join` without `--url`: it
listens for a bounded time on the interfaces it is given and returns what it resolved, each
record checked by `parse_service_info` (a malformed or foreign record is dropped, not raised).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import ifaddr
import trio
import zeroconf
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_cairn._tcp.local."
API_VERSION = "1"
"""The HTTP API version an agent can expect at the advertised URL (TXT key `api`)."""

_ID_PREFIX_LENGTH = 8
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

# Failures of zeroconf itself that must not take the server down: sockets that cannot be
# bound or joined (OSError), "no interfaces" (RuntimeError), and zeroconf.Error (name
# conflicts that could not be resolved, a blocked internal event loop).
_ZEROCONF_FAILURES = (OSError, RuntimeError, zeroconf.Error)


# --- deciding where to advertise (pure) -----------------------------------------------------

def is_loopback_host(host: str) -> bool:
    """Whether HOST (an IP literal or a name) can only be reached from this machine."""
    if host.strip().lower().rstrip(".") in _LOCALHOST_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 (Python 3.11 says no)
    return address.is_loopback


def advertised_addresses(listen_host: str, interface_addresses: Iterable[str]) -> list[str]:
    """The addresses to advertise (and the interfaces to advertise on) for an appliance that
    listens on LISTEN_HOST, given the machine's interface addresses. Empty means "do not
    advertise": loopback only, or a wildcard with no non-loopback address of its family.

    LISTEN_HOST must be an IP literal or a loopback name (`localhost`); resolve other names
    first (`listen_address` does it as serve does). Raises ValueError otherwise.
    """
    if is_loopback_host(listen_host):
        return []
    listen = ipaddress.ip_address(listen_host)
    if not listen.is_unspecified:
        return [str(listen)]
    chosen: list[str] = []
    for text in interface_addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if address.version == listen.version and not address.is_loopback \
                and str(address) not in chosen:
            chosen.append(str(address))
    return chosen


def format_endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# --- the record (pure) ----------------------------------------------------------------------

def instance_name(appliance_id: str) -> str:
    return f"Cairn appliance {appliance_id[:_ID_PREFIX_LENGTH]}.{SERVICE_TYPE}"


def server_name(appliance_id: str) -> str:
    return f"cairn-{appliance_id[:_ID_PREFIX_LENGTH]}.local."


def build_service_info(appliance_id: str, port: int, fingerprint: str,
                       addresses: Sequence[str], api_version: str = API_VERSION) -> ServiceInfo:
    """The DNS-SD record of one appliance. Raises ValueError for values an agent could not
    use (an empty id, a port out of range, a fingerprint that is not 64 lowercase hex digits,
    no address)."""
    if not appliance_id:
        raise ValueError("appliance id is empty")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError("fingerprint must be 64 lowercase hex digits (SHA-256)")
    if not addresses:
        raise ValueError("no address to advertise")
    return ServiceInfo(
        SERVICE_TYPE, instance_name(appliance_id), port=port,
        properties={"id": appliance_id, "api": api_version, "fp": fingerprint},
        server=server_name(appliance_id), parsed_addresses=list(addresses))


@dataclass(frozen=True)
class DiscoveredAppliance:
    """One appliance found on the LAN. `url` is only a hint: trust it once the certificate
    there has the SHA-256 `fingerprint` the enrollment code names."""

    appliance_id: str
    api_version: str
    fingerprint: str
    addresses: tuple[str, ...]
    port: int
    name: str

    @property
    def urls(self) -> list[str]:
        return [f"https://{format_endpoint(a, self.port)}" for a in self.addresses]


def parse_service_info(info: ServiceInfo) -> DiscoveredAppliance | None:
    """The appliance a resolved record describes, or None if the record is not a usable
    Cairn record (missing key, bad fingerprint, no port or address)."""
    properties = info.decoded_properties
    appliance_id, api_version = properties.get("id"), properties.get("api")
    fingerprint = properties.get("fp")
    addresses = tuple(info.parsed_scoped_addresses())
    if not appliance_id or not api_version or fingerprint is None \
            or not _FINGERPRINT.fullmatch(fingerprint) or not info.port or not addresses:
        return None
    return DiscoveredAppliance(appliance_id=appliance_id, api_version=api_version,
                               fingerprint=fingerprint, addresses=addresses, port=info.port,
                               name=info.name)


# --- the machine (blocking edges; call them in a worker thread) ------------------------------

def local_interface_addresses() -> list[str]:
    """Every address of every interface of this machine (network namespace), loopback too."""
    addresses: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addresses.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return addresses


def listen_address(listen_host: str) -> str:
    """LISTEN_HOST as an IP literal, resolved like `serve` binds it (first getaddrinfo
    answer). Loopback names stay as they are. Raises OSError if the name does not resolve."""
    if is_loopback_host(listen_host):
        return listen_host
    try:
        ipaddress.ip_address(listen_host)
    except ValueError:
        infos = socket.getaddrinfo(listen_host, None, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        return str(infos[0][4][0])
    return listen_host


def interface_of(address: str) -> str | None:
    """The name of the interface that holds ADDRESS, if any."""
    wanted = ipaddress.ip_address(address.split("%", 1)[0])
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            held = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if ipaddress.ip_address(held.split("%", 1)[0]) == wanted:
                return adapter.name
    return None


def _pin_to_interface(instance: Zeroconf, interface: str) -> None:
    """Make zeroconf's sockets hear and answer on INTERFACE only (Linux SO_BINDTODEVICE).

    Why: zeroconf binds its receiving socket to 0.0.0.0:5353, with SO_REUSEPORT, and joins
    224.0.0.251 only on the chosen interface. But Linux delivers multicast to a wildcard
    socket for every group that *any* socket on the machine joined, on any interface; so on a
    NAS whose avahi-daemon joined the mDNS group everywhere, zeroconf would hear queries from
    a network the appliance does not listen on and answer them (a unicast reply to the
    asker). IP_MULTICAST_ALL=0 does not help with SO_REUSEPORT set; binding to the device
    does. Before Linux 5.7 it needs CAP_NET_RAW: without it, we warn and carry on.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        for reader in instance.engine.readers:
            reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                   interface.encode())
    except OSError as exc:
        log.warning("cannot confine mDNS to %s (%s): queries reaching this machine on its "
                    "other interfaces may be answered too", interface, exc.strerror)


def _open_zeroconf(addresses: list[str]) -> Zeroconf:
    """Zeroconf on the interfaces holding ADDRESSES; with one address, on its interface only."""
    # A list, not a tuple: zeroconf only treats a list as "these interfaces".
    instance = Zeroconf(interfaces=list(addresses), use_asyncio=False)
    try:
        if len(addresses) == 1 and (interface := interface_of(addresses[0])) is not None:
            _pin_to_interface(instance, interface)
    except BaseException:
        instance.close()
        raise
    return instance


def _start_zeroconf(addresses: list[str], info: ServiceInfo) -> Zeroconf:
    instance = _open_zeroconf(addresses)
    try:
        instance.register_service(info, allow_name_change=True)
    except BaseException:
        instance.close()
        raise
    return instance


def _stop_zeroconf(instance: Zeroconf) -> None:
    """Send the goodbye packets and close the sockets; never raises."""
    try:
        instance.close()
    except _ZEROCONF_FAILURES as exc:
        log.warning("stopping the LAN advertisement failed: %s", exc)


async def _start_advertising(listen_host: str, port: int, appliance_id: str,
                             fingerprint: str) -> Zeroconf | None:
    if is_loopback_host(listen_host):
        log.info("not advertising on the LAN: listening on loopback only (%s)", listen_host)
        return None
    try:
        host = await trio.to_thread.run_sync(listen_address, listen_host)
        addresses = advertised_addresses(
            host, await trio.to_thread.run_sync(local_interface_addresses))
        if not addresses:
            log.info("not advertising on the LAN: listening on %s, which has no LAN address",
                     host)
            return None
        info = build_service_info(appliance_id, port, fingerprint, addresses)
        instance = await trio.to_thread.run_sync(_start_zeroconf, addresses, info)
    except (*_ZEROCONF_FAILURES, ValueError) as exc:
        log.warning("not advertising on the LAN: %s: %s", type(exc).__name__, exc)
        return None
    log.info("advertising _cairn._tcp on %s as %r",
             ", ".join(format_endpoint(a, port) for a in addresses), info.name)
    return instance


@asynccontextmanager
async def advertising(listen_host: str, port: int, appliance_id: str,
                      fingerprint: str) -> AsyncIterator[bool]:
    """Advertise the appliance on the LAN for the duration of the block, only where it
    listens (see the module docstring). Yields True if the record is being advertised, False
    if it is not (loopback, no LAN address, or zeroconf failed: logged, never raised).

    Registering probes the name for about 1.5 s before the block is entered, so run this in
    a task of its own rather than ahead of serving (see `run_advertiser`). On exit, even on
    cancellation, goodbye packets are sent and the sockets closed (shielded, well under 1 s).
    """
    instance = await _start_advertising(listen_host, port, appliance_id, fingerprint)
    try:
        yield instance is not None
    finally:
        if instance is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_stop_zeroconf, instance)
                log.info("stopped advertising on the LAN")


async def run_advertiser(listen_host: str, port: int, appliance_id: str,
                         fingerprint: str) -> None:
    """Advertise until cancelled: `nursery.start_soon(run_advertiser, host, port, id, fp)`
    once the HTTP socket listens."""
    async with advertising(listen_host, port, appliance_id, fingerprint):
        await trio.sleep_forever()


# --- browsing ---------------------------------------------------------------------------------

def _browse_blocking(seconds: float, interfaces: list[str],
                     limit: int | None) -> list[DiscoveredAppliance]:
    deadline = time.monotonic() + seconds
    names: queue.SimpleQueue[str] = queue.SimpleQueue()
    found: dict[str, DiscoveredAppliance] = {}

    def on_change(*, zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange, **_: Any) -> None:
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)  # a goodbye: it stopped serving meanwhile
        else:
            names.put(name)

    instance = _open_zeroconf(interfaces)
    try:
        browser = ServiceBrowser(instance, SERVICE_TYPE, handlers=[on_change])
        try:
            while limit is None or len(found) < limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    name = names.get(timeout=remaining)
                except queue.Empty:
                    break
                remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
                info = instance.get_service_info(SERVICE_TYPE, name, timeout=remaining_ms)
                appliance = parse_service_info(info) if info is not None else None
                if appliance is not None:
                    found[name] = appliance
        finally:
            browser.cancel()
    finally:
        instance.close()
    return list(found.values())


async def browse(seconds: float, interfaces: Sequence[str], *,
                 limit: int | None = None) -> list[DiscoveredAppliance]:
    """The appliances that answer on INTERFACES (addresses of this machine's interfaces)
    within SECONDS, or as soon as LIMIT of them are resolved. Sends mDNS queries there and
    nowhere else. Raises OSError (or RuntimeError) if zeroconf cannot open its sockets.

    Not cancellable midway: the worker thread returns within SECONDS (plus about 0.2 s to
    close)."""
    if not interfaces:
        raise ValueError("browse needs at least one interface address")
    return await trio.to_thread.run_sync(_browse_blocking, seconds, list(interfaces), limit)
