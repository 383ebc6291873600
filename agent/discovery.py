"""Finding the appliance on the LAN by mDNS (`_cairn._tcp.local.`).

Used by `cairn join` without `--url` (try every appliance found; the enrollment code says
which one is ours) and whenever the remembered address stops answering (find the appliance
with our appliance id again: a NAS whose DHCP lease changed keeps working). A record found
this way is only a hint: trust comes from the pinned certificate, checked on connect.

Queries go to every non-loopback interface of this machine (or network namespace), for a
bounded time (agent/mdns.py runs the browse); each answer is checked by
protocol.mdns.parse_record (a malformed or foreign record is dropped, not raised).
`CAIRN_DISCOVERY=off` turns discovery off, for machines where the appliance is reached
through a fixed address (and for tests on loopback, which must not send mDNS to a real LAN).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent import mdns
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


async def browse(seconds: float, interfaces: Sequence[str], *,
                 limit: int | None = None) -> list[DiscoveredAppliance]:
    """The appliances that answer on INTERFACES (addresses of this machine's interfaces)
    within SECONDS, or as soon as LIMIT of them are resolved. Sends mDNS queries there and
    nowhere else. Raises OSError (or RuntimeError) if zeroconf cannot open its sockets.

    Not cancellable midway: the worker thread returns within SECONDS (plus about 0.2 s to
    close)."""
    return await mdns.browse(SERVICE_TYPE, parse_service_info, seconds, interfaces,
                             limit=limit)


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
