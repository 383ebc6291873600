"""The join request's DNS-SD record (`_cairn-join._tcp.local.`): built and parsed (pure),
advertised and browsed (blocking zeroconf, run in worker threads).

    <16 hex digits>._cairn-join._tcp.local.   SRV  0 0 PORT cairn-join-<same>.local.
                                              TXT  v=1
    cairn-join-<same>.local.                  A    <the addresses the endpoint listens on>

The instance id is random for every request; the record says nothing else (no device or
user name: those are read over TLS from the endpoint, by whoever cares to ask). As for the
peer record, zeroconf is opened on the endpoint's own addresses only, never loopback unless
the config says so (agent/peers/config.py).
"""

from __future__ import annotations

import logging
import queue
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from protocol.pairing import JOIN_PROTOCOL, JOIN_SERVICE_TYPE, join_txt_record
from protocol.peers import new_instance_id

if TYPE_CHECKING:
    from zeroconf import Zeroconf

log = logging.getLogger("cairn.pairing")

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
    from zeroconf import ServiceInfo, Zeroconf

    instance_id = new_instance_id()
    info = ServiceInfo(JOIN_SERVICE_TYPE, instance_name(instance_id), port=port,
                       properties=join_txt_record(), server=server_name(instance_id),
                       parsed_addresses=list(addresses))
    # A list, not a tuple: zeroconf only treats a list as "these interfaces".
    instance = Zeroconf(interfaces=list(addresses), use_asyncio=False)
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
    def stop() -> None:
        try:
            instance.close()
        except Exception as exc:
            log.warning("stopping the join request's record failed: %s", exc)

    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(stop)


# --- browsing -------------------------------------------------------------------------


def _browse_blocking(seconds: float, interfaces: list[str]) -> list[JoinEndpoint]:
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    deadline = time.monotonic() + seconds
    names: queue.SimpleQueue[str] = queue.SimpleQueue()
    found: dict[str, JoinEndpoint] = {}

    def on_change(*, zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange, **_: Any) -> None:
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)
        else:
            names.put(name)

    instance = Zeroconf(interfaces=list(interfaces), use_asyncio=False)
    try:
        browser = ServiceBrowser(instance, JOIN_SERVICE_TYPE, handlers=[on_change])
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    name = names.get(timeout=remaining)
                except queue.Empty:
                    break
                remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
                info = instance.get_service_info(JOIN_SERVICE_TYPE, name,
                                                 timeout=remaining_ms)
                if info is None:
                    continue
                endpoint = parse_join_record(info.name, info.decoded_properties,
                                             info.parsed_scoped_addresses(), info.port)
                if endpoint is not None:
                    found[name] = endpoint
        finally:
            browser.cancel()
    finally:
        instance.close()
    return list(found.values())


async def browse(seconds: float, interfaces: Sequence[str]) -> list[JoinEndpoint]:
    """The join requests answering on INTERFACES (addresses of ours) within SECONDS.
    Raises OSError or RuntimeError if zeroconf cannot open its sockets."""
    return await trio.to_thread.run_sync(_browse_blocking, seconds, list(interfaces))
