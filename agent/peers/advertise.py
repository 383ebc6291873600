"""Where the peer service listens and advertises, and the advertisement itself (mDNS,
`_cairn-peer._tcp.local.`).

Where (`choose_addresses`, pure): the IPv4 addresses of the interfaces the `[peers]` config
names (none named: every interface), of those that are up, never a loopback interface or
address unless `loopback` is on, and no LAN interface at all when LAN discovery is off
(CAIRN_DISCOVERY=off: machines and tests that must not send mDNS to a real network; then
only loopback, if asked for). An empty answer means: serve nothing, advertise nothing.
IPv4 only for now: an IPv6 link-local address needs a scope zeroconf cannot bind without
an interface name, and the LANs peers live on all have IPv4.

What (`peer_service_info`): the instance name is a random id made at every start
(protocol.peers.new_instance_id), the host name is derived from it, and the TXT record is
`peer_txt_record()` — the protocol version, nothing else. No user name, device name or id,
appliance id or account is in the record; whose device it is shows only after mutual TLS.

How: python-zeroconf's blocking `Zeroconf` (its own asyncio loop in a daemon thread), on
those addresses only, opened and closed by agent/mdns.py; its blocking calls
(`register` probes for about 1.5 s, `close` sends goodbyes) run in worker threads. On one
interface, its sockets are bound to that interface (SO_BINDTODEVICE), so that it neither
hears nor answers another network's queries (appliance/advertise.py explains why joining
the group on one interface is not enough on Linux). The same instance serves the browser
(agent/peers/browse.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zeroconf
from zeroconf import ServiceInfo, Zeroconf

from agent import mdns
from agent.peers.config import PeersConfig
from protocol.peers import (
    PEER_SERVICE_TYPE,
    peer_instance_name,
    peer_server_name,
    peer_txt_record,
)

IFF_UP = 0x1
RECORD_TTL_S = 120      # every record's TTL: a peer gone without a goodbye is dropped
                        # within two minutes (zeroconf re-announces at 80 % of it)
# Failures of zeroconf itself (sockets that cannot be bound, no interface, a name
# conflict, its loop blocked): peers go on without being found, nothing else stops.
ZEROCONF_FAILURES = (OSError, RuntimeError, zeroconf.Error)


@dataclass(frozen=True)
class PeerAddress:
    interface: str
    address: str


# --- where (pure) -----------------------------------------------------------------------

def choose_addresses(config: PeersConfig, adapters: Iterable[tuple[str, Sequence[str]]],
                     is_up: Callable[[str], bool], *, lan: bool = True) -> list[PeerAddress]:
    """The addresses to serve and advertise on, from ADAPTERS ((interface name, its
    addresses) each) — see the module."""
    chosen: list[PeerAddress] = []
    for name, addresses in adapters:
        if config.interfaces and name not in config.interfaces:
            continue
        if not is_up(name):
            continue
        for text in addresses:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                continue
            if address.version != 4 or address.is_multicast or address.is_unspecified:
                continue
            if address.is_loopback or name == "lo":
                if not config.loopback:
                    continue
            elif not lan or address.is_link_local:
                continue
            if all(c.address != str(address) for c in chosen):
                chosen.append(PeerAddress(name, str(address)))
    return chosen


# --- the machine (blocking) ---------------------------------------------------------------

def machine_adapters() -> list[tuple[str, list[str]]]:
    """(name, addresses) of every interface of this machine (network namespace)."""
    import ifaddr

    return [(adapter.name, [ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                            for ip in adapter.ips])
            for adapter in ifaddr.get_adapters()]


def interface_up(name: str) -> bool:
    """Whether interface NAME is up (IFF_UP in /sys/class/net/NAME/flags)."""
    try:
        return bool(int(Path(f"/sys/class/net/{name}/flags").read_text().strip(), 16)
                    & IFF_UP)
    except (OSError, ValueError):
        return False


# --- the record and zeroconf ------------------------------------------------------------

def peer_service_info(instance_id: str, port: int, addresses: Sequence[str]) -> ServiceInfo:
    """The DNS-SD record of this peer service (see the module: nothing that names
    anyone)."""
    return ServiceInfo(PEER_SERVICE_TYPE, peer_instance_name(instance_id), port=port,
                       properties=peer_txt_record(), server=peer_server_name(instance_id),
                       parsed_addresses=list(addresses), host_ttl=RECORD_TTL_S,
                       other_ttl=RECORD_TTL_S)


def open_zeroconf(addresses: Sequence[PeerAddress]) -> Zeroconf:
    """Zeroconf on ADDRESSES' interfaces only (one interface: bound to it)."""
    interfaces = {a.interface for a in addresses}
    return mdns.open_zeroconf([a.address for a in addresses],
                              interfaces.pop() if len(interfaces) == 1 else None)


def register(instance: Zeroconf, info: ServiceInfo) -> None:
    """Advertise INFO (blocking: the name is probed for about 1.5 s)."""
    instance.register_service(info, allow_name_change=False)


close = mdns.close   # unregister INFO (goodbye packets) and close; never raises
