"""Finding join requests on the LAN (`cairn devices pending`, and `cairn approve` before it
says hello), and the requests this device was told to ignore.

A request is read from its endpoint (`GET JOIN_REQUEST_PATH`) over TLS that trusts nothing
in advance: the endpoint's certificate is self-signed, so what makes a request consistent
is that the device key it names is the key of the certificate this very connection saw
(`found_request`). A request that is expired, malformed or inconsistent is dropped and
logged, never shown. The same request seen at several addresses is shown once.

    HOME/join-ignored.json   0600  [{"name": ..., "key_sha256": ..., "at": ...}, ...]

`cairn devices ignore NAME` adds the request's name *and device key*: a device that asks
again from the same home (same key) stays silenced; another device taking the same name
does not inherit the silence.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from agent.client import presented_certificate
from agent.discovery import discovery_enabled, lan_addresses, local_interface_addresses
from agent.errors import LocalFileError, TransportError
from agent.home import AgentHome, write_private
from agent.pairing.mdns import JoinEndpoint, browse
from agent.pairing.session import spki_der
from agent.peers.config import load_peers_config
from agent.peers.identity import PeerIdentity
from protocol.pairing import JOIN_REQUEST_PATH, JoinRequestInfo, expired
from protocol.peers import spki_sha256

log = logging.getLogger("cairn.pairing")

BROWSE_SECONDS = 3.0
READ_TIMEOUT_S = 5.0
IGNORED_FILE = "join-ignored.json"


@dataclass(frozen=True)
class FoundRequest:
    info: JoinRequestInfo
    url: str                  # where it was read
    certificate_der: bytes    # the endpoint's TLS certificate: pinned from here on
    device_key_der: bytes     # SPKI DER, the same key as the certificate's

    @property
    def key_sha256(self) -> str:
        return spki_sha256(self.device_key_der)


def untrusting_context(identity: PeerIdentity | None = None) -> ssl.SSLContext:
    """TLS 1.3 that checks nothing about the server (the caller compares the certificate
    it saw with the one it pinned); with IDENTITY, presents this device's certificate."""
    if identity is not None:
        context = identity.client_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_certificate(response: httpx.Response) -> bytes:
    """The certificate the request's endpoint presented (TransportError if none)."""
    if (der := presented_certificate(response)) is None:
        raise TransportError("the request's endpoint presented no certificate")
    return der


def found_request(answer: bytes, certificate_der: bytes, url: str, now: float
                  ) -> FoundRequest | str:
    """The request in ANSWER if it is consistent with the certificate its connection saw
    and still open; otherwise why not (pure)."""
    try:
        info = JoinRequestInfo.model_validate_json(answer)
        named = serialization.load_pem_public_key(info.device_key.encode())
        seen = x509.load_der_x509_certificate(certificate_der).public_key()
    except (ValidationError, ValueError) as exc:
        return f"malformed request ({exc.__class__.__name__})"
    if not isinstance(named, Ed25519PublicKey) or not isinstance(seen, Ed25519PublicKey):
        return "a request whose key is not Ed25519"
    if spki_der(named) != spki_der(seen):
        return "the request names another key than its endpoint's certificate"
    if expired(info, now):
        return "the request expired"
    return FoundRequest(info=info, url=url, certificate_der=certificate_der,
                        device_key_der=spki_der(named))


async def read_request(url: str) -> FoundRequest | str:
    try:
        async with httpx.AsyncClient(base_url=url, verify=untrusting_context(),
                                     timeout=READ_TIMEOUT_S) as client:
            response = await client.get(JOIN_REQUEST_PATH)
            certificate = peer_certificate(response)
    except (httpx.HTTPError, TransportError) as exc:
        return f"cannot read it: {exc}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    return found_request(response.content, certificate, url, time.time())


def browse_interfaces(home: AgentHome) -> list[str]:
    """Our addresses to look for requests on (and to serve one on): the LAN's, and
    loopback too when the peers config says so (tests; several agents on one machine)."""
    if not discovery_enabled():
        raise TransportError("mDNS discovery is off (CAIRN_DISCOVERY=off): devices on "
                             "the LAN cannot be asked or found")
    config = load_peers_config(home)
    everything = local_interface_addresses()
    addresses = [a for a in lan_addresses(everything) if ":" not in a]
    if config.interfaces:
        import ifaddr

        wanted = {ip.ip for adapter in ifaddr.get_adapters()
                  if adapter.name in config.interfaces for ip in adapter.ips
                  if isinstance(ip.ip, str)}
        addresses = [a for a in addresses if a in wanted]
    if config.loopback:
        addresses.append("127.0.0.1")
    if not addresses:
        raise TransportError("no network interface to reach your other devices on "
                             "(only loopback)")
    return addresses


async def find_requests(home: AgentHome, seconds: float = BROWSE_SECONDS,
                        *, include_ignored: bool = False) -> list[FoundRequest]:
    """The open join requests on the LAN, each once (ignored ones left out unless asked)."""
    try:
        endpoints = await browse(seconds, browse_interfaces(home))
    except (OSError, RuntimeError) as exc:
        raise TransportError(f"cannot search the LAN by mDNS: {exc}") from None
    found: dict[str, FoundRequest] = {}
    ignored = load_ignored(home)

    async def read(endpoint: JoinEndpoint) -> None:
        for url in endpoint.urls():
            outcome = await read_request(url)
            if isinstance(outcome, str):
                log.info("join request at %s left out: %s", url, outcome)
                continue
            if include_ignored or not is_ignored(ignored, outcome):
                found.setdefault(outcome.key_sha256, outcome)
            return

    async with trio.open_nursery() as nursery:
        for endpoint in endpoints:
            nursery.start_soon(read, endpoint)
    return sorted(found.values(), key=lambda r: (r.info.device_name, r.info.created_at))


# --- the ignore list --------------------------------------------------------------------


def load_ignored(home: AgentHome) -> list[dict[str, Any]]:
    path = home.path / IGNORED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except ValueError:
        raise LocalFileError(f"{path} is damaged; remove it to forget what was "
                             "ignored") from None
    return [entry for entry in data if isinstance(entry, dict)]


def is_ignored(ignored: list[dict[str, Any]], request: FoundRequest) -> bool:
    return any(entry.get("name") == request.info.device_name
               and entry.get("key_sha256") == request.key_sha256 for entry in ignored)


def ignore(home: AgentHome, request: FoundRequest) -> None:
    ignored = load_ignored(home)
    if is_ignored(ignored, request):
        return
    ignored.append({"name": request.info.device_name, "key_sha256": request.key_sha256,
                    "at": time.time()})
    home.ensure()
    write_private(home.path / IGNORED_FILE,
                  (json.dumps(ignored, indent=2) + "\n").encode())
