"""Finding the appliance on the LAN by mDNS (`_cairn._tcp.local.`).

Used by `cairn join` without `--url` (try every appliance found; the enrollment code says
which one is ours) and whenever the remembered address stops answering (find the appliance
with our appliance id again: a NAS whose DHCP lease changed keeps working). A record found
this way is only a hint: trust comes from the pinned certificate, checked on connect.

Queries go to every non-loopback interface of this machine (or network namespace).
`CAIRN_DISCOVERY=off` turns discovery off, for machines where the appliance is reached
through a fixed address (and for tests on loopback, which must not send mDNS to a real LAN).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import TYPE_CHECKING

from agent.errors import TransportError

if TYPE_CHECKING:
    from appliance.advertise import DiscoveredAppliance

log = logging.getLogger(__name__)

DISCOVERY_ENV = "CAIRN_DISCOVERY"
BROWSE_SECONDS = 3.0


async def browse(seconds: float, interfaces: list[str], *,
                 limit: int | None = None) -> list[DiscoveredAppliance]:
    # zeroconf costs ~0.1 s to import: only commands that search the LAN pay for it.
    from appliance import advertise

    return await advertise.browse(seconds, interfaces, limit=limit)


def local_interface_addresses() -> list[str]:
    from appliance import advertise

    return advertise.local_interface_addresses()


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
