"""LAN peers: device certificates, block grants, the peer record and the peer API (pure).

Every device has its own Ed25519 key pair. The appliance keeps one more Ed25519 key, the
**device signing key**, for one purpose: it signs

- **device certificates**: X.509, Ed25519, valid DEVICE_CERT_LIFETIME_S, naming the device
  (`CN` = device id), its user (`O` = the user's opaque id, never the user's name) and the
  appliance (`OU` = appliance id). Agents pin the signing key's certificate (the *device CA*)
  when they join, and renew their own certificate once less than half of its life is left.
  Peers talk mutual TLS with these certificates and trust nothing else.
- **block grants**: a short-lived capability "device D (whose certificate has public key K)
  may read these blocks", issued with the download URLs after the appliance's own read check.
  A peer serves a block only against a grant signed by the pinned key, unexpired, naming the
  block, and bound to the certificate the requesting device presented on this very TLS
  connection. Knowing a block id is not enough (Dropbox's "Dropship").

A grant on the wire: `cg1.<payload>.<signature>`, both unpadded base64url. The payload is
compact JSON::

    {"v": 1, "app": APPLIANCE_ID, "dev": DEVICE_ID, "key": SHA256(SPKI DER) hex,
     "user": USER_TAG, "exp": UNIX_SECONDS, "blocks": base64(id1 | id2 | ...)}

signed as Ed25519 over `GRANT_CONTEXT | payload`. One grant covers at most GRANT_MAX_BLOCKS
blocks, so a grant stays small enough to send with every block request (~4 KB: the ids
are base64 inside base64url; a 1 GiB file needs 4).

The peer record (`_cairn-peer._tcp.local.`) carries a random instance id made at every start
and the protocol version, nothing that names a user, a device or an account. Whose device
it is shows only after mutual TLS, to a device holding a certificate the same appliance
signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, Field

PEER_SERVICE_TYPE = "_cairn-peer._tcp.local."
PEER_PROTOCOL = "1"
INSTANCE_ID_BYTES = 8           # 16 hex digits, random per start

DEVICE_CERT_LIFETIME_S = 24 * 3600
GRANT_LIFETIME_S = 15 * 60      # a download longer than this asks for fresh grants
GRANT_MAX_BLOCKS = 64
REVOCATION_REFRESH_S = 60       # peers re-read the revocation list at least this often
                                # (the target: a revocation reaches every peer in 5 min)
GRANT_PREFIX = "cg1"
GRANT_CONTEXT = b"cairn-peer-grant-v1\x00"
BLOCK_ID = re.compile(r"[0-9a-f]{64}")
HEX64 = re.compile(r"[0-9a-f]{64}")

# The peer API (HTTP/1.1 over mutual TLS), paths and limits.
PEER_HAVE_PATH = "/peer/v1/have"        # POST PeerHaveRequest -> PeerHaveResult
PEER_BLOCK_PATH = "/peer/v1/block"      # POST PeerBlockRequest -> the ciphertext, raw
PEER_MAX_BODY = 256 * 1024              # a request body (grants + ids), never more
PEER_HAVE_MAX_IDS = 1024                # 16 grants' worth


class GrantError(ValueError):
    """A grant that must be refused; `reason` is a stable word for logs and counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- names ----------------------------------------------------------------------------


def new_instance_id() -> str:
    return secrets.token_hex(INSTANCE_ID_BYTES)


def peer_instance_name(instance_id: str) -> str:
    return f"{instance_id}.{PEER_SERVICE_TYPE}"


def peer_server_name(instance_id: str) -> str:
    return f"cairn-peer-{instance_id}.local."


def peer_txt_record() -> dict[str, str]:
    """All a peer record says: which protocol it speaks."""
    return {"v": PEER_PROTOCOL}


@dataclass(frozen=True)
class DiscoveredPeer:
    instance_id: str
    addresses: tuple[str, ...]
    port: int


def parse_peer_record(name: str, properties: Mapping[str, str | None],
                      addresses: Sequence[str], port: int | None) -> DiscoveredPeer | None:
    """The peer a resolved record describes, or None if it is not a usable one."""
    suffix = "." + PEER_SERVICE_TYPE
    if not name.endswith(suffix) or properties.get("v") != PEER_PROTOCOL:
        return None
    instance = name[:-len(suffix)]
    if not re.fullmatch(r"[0-9a-f]{16}", instance) or not port or not addresses:
        return None
    return DiscoveredPeer(instance, tuple(addresses), port)


# --- keys -----------------------------------------------------------------------------


def spki_sha256(public_key_der: bytes) -> str:
    """The hex SHA-256 of a public key's SubjectPublicKeyInfo (DER): what a grant binds."""
    return hashlib.sha256(public_key_der).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- grants ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    appliance_id: str
    device_id: str
    key_sha256: str          # of the device certificate's public key (SPKI DER)
    user_tag: str
    expires_at: int
    blocks: frozenset[str]

    def payload(self, block_order: Sequence[str] | None = None) -> bytes:
        ids = list(block_order) if block_order is not None else sorted(self.blocks)
        body = {"v": 1, "app": self.appliance_id, "dev": self.device_id,
                "key": self.key_sha256, "user": self.user_tag, "exp": self.expires_at,
                "blocks": base64.b64encode(b"".join(bytes.fromhex(i) for i in ids)).decode()}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def chunk_blocks(block_ids: Iterable[str], size: int = GRANT_MAX_BLOCKS) -> list[list[str]]:
    """BLOCK_IDS (distinct, in first-seen order) cut into lists one grant each may cover."""
    distinct = list(dict.fromkeys(block_ids))
    return [distinct[i:i + size] for i in range(0, len(distinct), size)]


def sign_grant(key: Ed25519PrivateKey, grant: Grant) -> str:
    if not grant.blocks or len(grant.blocks) > GRANT_MAX_BLOCKS:
        raise ValueError(f"a grant covers 1 to {GRANT_MAX_BLOCKS} blocks")
    payload = grant.payload()
    signature = key.sign(GRANT_CONTEXT + payload)
    return f"{GRANT_PREFIX}.{_b64(payload)}.{_b64(signature)}"


def verify_grant(token: str, signing_key: Ed25519PublicKey, now: float) -> Grant:
    """The grant TOKEN carries, if the pinned SIGNING_KEY signed it and it has not expired.
    Raises GrantError otherwise. Binding to the requester is checked by `check_grant`."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != GRANT_PREFIX or len(token) > PEER_MAX_BODY:
        raise GrantError("malformed", "not a Cairn block grant")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise GrantError("malformed", "a grant's parts are not base64url") from None
    try:
        signing_key.verify(signature, GRANT_CONTEXT + payload)
    except InvalidSignature:
        raise GrantError("forged", "the grant is not signed by this appliance") from None
    try:
        body = json.loads(payload)
        raw = base64.b64decode(body["blocks"], validate=True)
        if body["v"] != 1 or len(raw) % 32 or not raw:
            raise ValueError("version or block list")
        grant = Grant(appliance_id=str(body["app"]), device_id=str(body["dev"]),
                      key_sha256=str(body["key"]), user_tag=str(body["user"]),
                      expires_at=int(body["exp"]),
                      blocks=frozenset(raw[i:i + 32].hex() for i in range(0, len(raw), 32)))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise GrantError("malformed", "a signed grant that cannot be read") from None
    if grant.expires_at <= now:
        raise GrantError("expired", "the grant has expired")
    return grant


def check_grant(grant: Grant, *, appliance_id: str, device_id: str, key_sha256: str,
                user_tag: str, block_ids: Iterable[str]) -> None:
    """Raises GrantError unless GRANT lets the device with this certificate (DEVICE_ID,
    KEY_SHA256, USER_TAG, of APPLIANCE_ID) read every one of BLOCK_IDS."""
    if not hmac.compare_digest(grant.appliance_id, appliance_id):
        raise GrantError("other_appliance", "the grant is another appliance's")
    if grant.device_id != device_id or not hmac.compare_digest(grant.key_sha256,
                                                                 key_sha256):
        raise GrantError("other_device", "the grant was issued to another device")
    if grant.user_tag != user_tag:
        raise GrantError("other_user", "the grant is for another user's device")
    missing = [b for b in block_ids if b not in grant.blocks]
    if missing:
        raise GrantError("other_blocks", f"the grant does not cover block {missing[0][:12]}")


# --- the peer API's bodies ------------------------------------------------------------


class PeerHaveRequest(BaseModel):
    """Which of IDS do you hold? Each id must be covered by one of GRANTS."""

    grants: list[str] = Field(min_length=1, max_length=16)
    ids: list[str] = Field(min_length=1, max_length=PEER_HAVE_MAX_IDS)


class PeerHaveResult(BaseModel):
    have: list[str]


class PeerBlockRequest(BaseModel):
    grant: str = Field(max_length=8192)
    id: str = Field(pattern=r"^[0-9a-f]{64}$")


class PeerRefusal(BaseModel):
    """The body of a refused peer request (403; 404 for a block not held)."""

    reason: str
    message: str
