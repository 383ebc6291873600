"""The join request's DNS-SD record (`_cairn-join._tcp.local.`): built and parsed (pure),
advertised and browsed (blocking zeroconf, agent/mdns.py, run in worker threads).

    <16 hex digits>._cairn-join._tcp.local.   SRV  0 0 PORT cairn-join-<same>.local.
                                              TXT  v=1
    cairn-join-<same>.local.                  A    <the addresses the endpoint listens on>

The instance id is random for every request; the record says nothing else (no device or
user name: those are read over TLS from the endpoint, by whoever cares to ask). As for the
peer record, zeroconf is opened on the endpoint's own addresses only, never loopback unless
the config says so (agent/peers/config.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from agent import mdns
from protocol.pairing import JOIN_PROTOCOL, JOIN_SERVICE_TYPE, join_txt_record
from protocol.peers import new_instance_id

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, Zeroconf

_INSTANCE = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class JoinEndpoint:
    """Where a request is served (from its record: a hint, trusted for nothing)."""

    instance_id: str
    addresses: tuple[str, ...]
    port: int

    def urls(self) -> list[str]:
        return [f"https://[{a}]:{self.port}" if ":" in a else f"https://{a}:{self.port}"
                for a in self.addresses]


def instance_name(instance_id: str) -> str:
    return f"{instance_id}.{JOIN_SERVICE_TYPE}"


def server_name(instance_id: str) -> str:
    return f"cairn-join-{instance_id}.local."


def parse_join_record(name: str, properties: Mapping[str, str | None],
                      addresses: Sequence[str], port: int | None) -> JoinEndpoint | None:
    suffix = "." + JOIN_SERVICE_TYPE
    if not name.endswith(suffix) or properties.get("v") != JOIN_PROTOCOL:
        return None
    instance = name[:-len(suffix)]
    if not _INSTANCE.fullmatch(instance) or not port or not addresses:
        return None
    return JoinEndpoint(instance, tuple(addresses), port)


# --- advertising ----------------------------------------------------------------------


def _start(addresses: list[str], port: int) -> Zeroconf:
    from zeroconf import ServiceInfo

    instance_id = new_instance_id()
    info = ServiceInfo(JOIN_SERVICE_TYPE, instance_name(instance_id), port=port,
                       properties=join_txt_record(), server=server_name(instance_id),
                       parsed_addresses=list(addresses))
    instance = mdns.open_zeroconf(addresses)
    try:
        instance.register_service(info, allow_name_change=True)
    except BaseException:
        instance.close()
        raise
    return instance


async def start_advertising(addresses: list[str], port: int) -> Zeroconf:
    """Advertise a request served at PORT on ADDRESSES (about 1.5 s: zeroconf probes the
    name first). Raises OSError, RuntimeError or zeroconf.Error if it cannot."""
    return await trio.to_thread.run_sync(_start, addresses, port)


async def stop_advertising(instance: Zeroconf) -> None:
    """Goodbye packets, sockets closed; never raises (shielded: runs on the way out)."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(mdns.close, instance)


# --- browsing -------------------------------------------------------------------------


def parse_service_info(info: ServiceInfo) -> JoinEndpoint | None:
    """The endpoint a resolved zeroconf record describes, or None if it is not usable."""
    return parse_join_record(info.name, info.decoded_properties,
                             info.parsed_scoped_addresses(), info.port)


async def browse(seconds: float, interfaces: Sequence[str]) -> list[JoinEndpoint]:
    """The join requests answering on INTERFACES (addresses of ours) within SECONDS.
    Raises OSError or RuntimeError if zeroconf cannot open its sockets."""
    return await mdns.browse(JOIN_SERVICE_TYPE, parse_service_info, seconds, interfaces)
