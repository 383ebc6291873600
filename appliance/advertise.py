"""LAN advertisement of the appliance over mDNS / DNS-SD (`_cairn._tcp.local.`).

Theory of operation
-------------------
While `cairnd serve` runs, the appliance answers mDNS queries for the service type
`_cairn._tcp.local.` with one instance (the record is drawn in protocol/mdns.py), so an agent
on the LAN finds the URL (`https://ADDRESS:PORT`) and, from `fp`, the certificate fingerprint
it should see there (an enrollment code carries the same fingerprint, so the agent can tell
*its* appliance from any other one on the LAN and pin the certificate).

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

The record itself (service type, names, TXT) is built by protocol/mdns.py, which the agent
uses to parse what it finds when it browses (agent/discovery.py).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager

import ifaddr
import trio
import zeroconf
from zeroconf import ServiceInfo, Zeroconf

from protocol.mdns import (
    SERVICE_TYPE,
    format_endpoint,
    instance_name,
    server_name,
    txt_record,
)
from protocol.version import API_VERSION

log = logging.getLogger(__name__)

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


# --- the record -------------------------------------------------------------------------------

def build_service_info(appliance_id: str, port: int, fingerprint: str,
                       addresses: Sequence[str], api_version: str = API_VERSION) -> ServiceInfo:
    """The DNS-SD record of one appliance (protocol/mdns.py). Raises ValueError for values
    an agent could not use."""
    properties = txt_record(appliance_id, port, fingerprint, addresses, api_version)
    return ServiceInfo(
        SERVICE_TYPE, instance_name(appliance_id), port=port, properties=properties,
        server=server_name(appliance_id), parsed_addresses=list(addresses))


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
