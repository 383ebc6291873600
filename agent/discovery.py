"""Finding the appliance on the LAN by mDNS (`_cairn._tcp.local.`).

Used by `cairn join` without `--url` (try every appliance found; the enrollment code says
which one is ours) and whenever the remembered address stops answering (find the appliance
with our appliance id again: a NAS whose DHCP lease changed keeps working). A record found
this way is only a hint: trust comes from the pinned certificate, checked on connect.

Queries go to every non-loopback interface of this machine (or network namespace), for a
bounded time; each answer is checked by protocol.mdns.parse_record (a malformed or foreign
record is dropped, not raised).
`CAIRN_DISCOVERY=off` turns discovery off, for machines where the appliance is reached
through a fixed address (and for tests on loopback, which must not send mDNS to a real LAN).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from agent.errors import TransportError
from protocol.mdns import SERVICE_TYPE, DiscoveredAppliance, parse_record

if TYPE_CHECKING:
    from zeroconf import ServiceInfo

log = logging.getLogger(__name__)

DISCOVERY_ENV = "CAIRN_DISCOVERY"
BROWSE_SECONDS = 3.0


def parse_service_info(info: ServiceInfo) -> DiscoveredAppliance | None:
    """The appliance a resolved zeroconf record describes, or None if it is not usable."""
    return parse_record(info.decoded_properties, info.parsed_scoped_addresses(), info.port,
                        info.name)


def _browse_blocking(seconds: float, interfaces: list[str],
                     limit: int | None) -> list[DiscoveredAppliance]:
    # zeroconf costs ~0.1 s to import: only commands that search the LAN pay for it.
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    deadline = time.monotonic() + seconds
    names: queue.SimpleQueue[str] = queue.SimpleQueue()
    found: dict[str, DiscoveredAppliance] = {}

    def on_change(*, zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange, **_: Any) -> None:
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)  # a goodbye: it stopped serving meanwhile
        else:
            names.put(name)

    # A list, not a tuple: zeroconf only treats a list as "these interfaces".
    instance = Zeroconf(interfaces=list(interfaces), use_asyncio=False)
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


def local_interface_addresses() -> list[str]:
    """Every address of every interface of this machine (network namespace), loopback too."""
    import ifaddr

    addresses: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addresses.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return addresses


def discovery_enabled() -> bool:
    return os.environ.get(DISCOVERY_ENV, "on").strip().lower() not in ("off", "0", "no",
                                                                       "false")


def lan_addresses(addresses: list[str]) -> list[str]:
    """The addresses to browse from: all but loopback and IPv6 link-local (which needs a
    scope zeroconf cannot bind without an interface name)."""
    lan = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if not (address.is_loopback or address.is_link_local or address.is_multicast):
            lan.append(text)
    return lan


async def find_appliances(seconds: float = BROWSE_SECONDS, *,
                          appliance_id: str | None = None) -> list[DiscoveredAppliance]:
    """Appliances answering on this machine's LAN interfaces within SECONDS (only the one
    with APPLIANCE_ID, if given; then we stop at the first answer)."""
    if not discovery_enabled():
        raise TransportError(f"mDNS discovery is off ({DISCOVERY_ENV}=off); "
                             "give the appliance's address with --url")
    interfaces = lan_addresses(local_interface_addresses())
    if not interfaces:
        raise TransportError("no network interface to look for the appliance on "
                             "(only loopback); give its address with --url")

    def wanted(found: list[DiscoveredAppliance]) -> list[DiscoveredAppliance]:
        return [a for a in found if appliance_id in (None, a.appliance_id)]

    try:
        found = wanted(await browse(seconds, interfaces, limit=1 if appliance_id else None))
        if appliance_id is not None and not found:
            # limit=1 stops at the first appliance to answer, which may be another one.
            found = wanted(await browse(seconds, interfaces))
    except (OSError, RuntimeError) as exc:
        raise TransportError(f"cannot search the LAN by mDNS: {exc}") from None
    log.debug("mDNS found %s", [a.urls for a in found])
    return found
