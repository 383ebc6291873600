"""The appliance's DNS-SD record (`_cairn._tcp.local.`), built and parsed (pure).

    Cairn appliance 3f5e0c1a._cairn._tcp.local.   SRV  0 0 PORT cairn-3f5e0c1a.local.
                                                  TXT  id=<appliance id> api=<API version>
                                                       fp=<sha256 of its certificate, hex>
    cairn-3f5e0c1a.local.                         A / AAAA  <the addresses it listens on>

The appliance advertises it (appliance/advertise.py), the agent browses for it
(agent/discovery.py); both build or read it here. A record is only a hint: an agent trusts
the address once the certificate there has the fingerprint its enrollment code (or its pin)
names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protocol.version import API_VERSION

SERVICE_TYPE = "_cairn._tcp.local."
DEFAULT_PORT = 8443       # where an appliance listens unless its config says otherwise
ID_PREFIX_LENGTH = 8
FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def local_urls(port: int = DEFAULT_PORT) -> list[str]:
    """Where an appliance on this very machine answers by default (`make run`'s listens on
    127.0.0.1 and advertises nothing): worth trying when the LAN shows none."""
    return [f"https://{format_endpoint(address, port)}" for address in ("127.0.0.1", "::1")]


def instance_name(appliance_id: str) -> str:
    return f"Cairn appliance {appliance_id[:ID_PREFIX_LENGTH]}.{SERVICE_TYPE}"


def server_name(appliance_id: str) -> str:
    return f"cairn-{appliance_id[:ID_PREFIX_LENGTH]}.local."


def format_endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def txt_record(appliance_id: str, port: int, fingerprint: str, addresses: Sequence[str],
               api_version: str = API_VERSION) -> dict[str, str]:
    """The TXT properties of one appliance's record. Raises ValueError for values an agent
    could not use (an empty id, a port out of range, a fingerprint that is not 64 lowercase
    hex digits, no address)."""
    if not appliance_id:
        raise ValueError("appliance id is empty")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    if not FINGERPRINT.fullmatch(fingerprint):
        raise ValueError("fingerprint must be 64 lowercase hex digits (SHA-256)")
    if not addresses:
        raise ValueError("no address to advertise")
    return {"id": appliance_id, "api": api_version, "fp": fingerprint}


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


def parse_record(properties: Mapping[str, str | None], addresses: Sequence[str],
                 port: int | None, name: str) -> DiscoveredAppliance | None:
    """The appliance a resolved record describes, or None if it is not a usable Cairn
    record (a missing key, a bad fingerprint, no port or address)."""
    appliance_id, api_version = properties.get("id"), properties.get("api")
    fingerprint = properties.get("fp")
    if not appliance_id or not api_version or fingerprint is None \
            or not FINGERPRINT.fullmatch(fingerprint) or not port or not addresses:
        return None
    return DiscoveredAppliance(appliance_id=appliance_id, api_version=api_version,
                               fingerprint=fingerprint, addresses=tuple(addresses), port=port,
                               name=name)
