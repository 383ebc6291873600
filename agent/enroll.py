"""`cairn join`: enroll this device with a one-time code, then obtain the user's keys.

1. Candidates: the `--url` given, else every appliance mDNS finds on the LAN.
2. For each candidate, over a TLS connection that trusts nothing yet, send the code id and a
   fresh nonce (POST /enroll/challenge). The answer's proof must equal
   HMAC(code key, "proof" ‖ nonce ‖ SHA-256 of the certificate *this connection* saw)
   (docs/enrollment.md). Otherwise this is not the appliance that made the code — or an
   impostor in the middle — and we try the next one, having revealed only the code id.
3. Pin that certificate and redeem the code over a connection that trusts only it
   (POST /enroll). The device token and the pinned certificate go to HOME/device.json.
4. Keys (`unlock_keys`): the first device of a user makes the user's keys, seals them in a
   passphrase bundle (scrypt) stored on the appliance, and creates the user's root folder;
   later devices fetch the bundle and open it with the passphrase. A wrong passphrase
   leaves the device joined without keys: `cairn unlock` tries again (the code is spent).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import ssl
from collections.abc import Callable
from typing import Any

import httpx

from agent.client import Connection, pinned_ssl_context
from agent.crypto.keys import UserKeys, open_bundle, seal_bundle
from agent.crypto.nodes import NodeMeta, new_node_key, seal_metadata, wrap_key
from agent.discovery import find_appliances
from agent.errors import (
    EnrollmentError,
    IntegrityError,
    RemoteConflictError,
    TransportError,
    UsageError,
)
from agent.home import AgentHome, DeviceRecord
from protocol.enrollment import (
    EnrollmentCode,
    MalformedCodeError,
    enrollment_proof,
    enrollment_response,
)

PassphraseSource = Callable[[bool], str]   # called with True for a new passphrase
MIN_PASSPHRASE_CHARS = 8
ROOT_NAME = "root"


def _untrusted_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE   # trust comes from the code's proof, below
    return context


def _peer_certificate(response: httpx.Response) -> bytes:
    stream = response.extensions["network_stream"]
    der: bytes | None = stream.get_extra_info("ssl_object").getpeercert(binary_form=True)
    if not der:
        raise EnrollmentError("the appliance presented no certificate")
    return der


async def _challenge(url: str, code: EnrollmentCode, nonce: bytes
                     ) -> tuple[bytes, str] | str:
    """(certificate DER, appliance id) if the appliance at URL proves it made CODE on the
    connection we see; otherwise why not."""
    try:
        async with httpx.AsyncClient(base_url=url, verify=_untrusted_context(),
                                     timeout=15) as client:
            response = await client.post("/enroll/challenge", json={
                "code_id": code.code_id_text, "nonce": nonce.hex()})
            der = _peer_certificate(response)
    except httpx.HTTPError as exc:
        return f"{url}: cannot connect ({exc})"
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        return f"{url}: {message}"
    try:
        body = response.json()
        proof = bytes.fromhex(body["proof"])
        appliance_id = str(body["appliance_id"])
    except (ValueError, KeyError, TypeError):
        return f"{url}: not a Cairn appliance (malformed challenge answer)"
    fingerprint = hashlib.sha256(der).digest()
    if not hmac.compare_digest(proof, enrollment_proof(code.key(), nonce, fingerprint)):
        return (f"{url}: did not prove it made this code (another appliance, a typo in "
                "the code, or someone in the middle)")
    return der, appliance_id


async def enroll(home: AgentHome, code_text: str, url: str | None, device_name: str
                 ) -> DeviceRecord:
    """Redeem CODE with the appliance that vouches for it; the device record (saved)."""
    try:
        code = EnrollmentCode.parse(code_text)
    except MalformedCodeError as exc:
        raise UsageError(f"that enrollment code is not valid: {exc}") from None
    if url is not None:
        candidates = [url.rstrip("/")]
    else:
        found = await find_appliances()
        candidates = [u for appliance in found for u in appliance.urls]
        if not candidates:
            raise TransportError("no Cairn appliance answered on the LAN (mDNS); is it "
                                 "running and on this network? Or give --url")
    reasons = []
    for candidate in candidates:
        nonce = os.urandom(32)
        outcome = await _challenge(candidate, code, nonce)
        if isinstance(outcome, str):
            reasons.append(outcome)
            continue
        der, appliance_id = outcome
        return await _redeem(home, candidate, code, nonce, der, appliance_id, device_name)
    raise EnrollmentError("no appliance accepted this code: " + "; ".join(reasons))


async def _redeem(home: AgentHome, url: str, code: EnrollmentCode, nonce: bytes,
                  der: bytes, appliance_id: str, device_name: str) -> DeviceRecord:
    pem = ssl.DER_cert_to_PEM_cert(der)
    fingerprint = hashlib.sha256(der).digest()
    try:
        # Only the certificate the proof was checked against is trusted from here on.
        async with httpx.AsyncClient(base_url=url, verify=pinned_ssl_context(pem),
                                     timeout=30) as client:
            response = await client.post("/enroll", json={
                "code_id": code.code_id_text, "nonce": nonce.hex(),
                "device_name": device_name,
                "response": enrollment_response(code.key(), nonce, fingerprint).hex()})
    except httpx.HTTPError as exc:
        raise TransportError(f"lost the appliance at {url} while joining: {exc}") from None
    if response.status_code != 201:
        raise EnrollmentError(f"the appliance refused the code: {response.text[:200]}")
    body = response.json()
    device = DeviceRecord(appliance_id=appliance_id, url=url, fingerprint=fingerprint.hex(),
                          certificate=pem, device_id=body["device_id"],
                          device_name=device_name, user=body["user"], token=body["token"])
    home.save_device(device)
    return device


async def unlock_keys(connection: Connection, home: AgentHome,
                      passphrase: PassphraseSource) -> tuple[UserKeys, bool]:
    """The user's keys, made now (first device: returns True) or opened from the bundle;
    saved in HOME. Makes the user's root folder if there is none yet."""
    user = connection.device.user
    current = await connection.call("GET", "/me/key-bundle")
    created = False
    if current["bundle"] is None:
        secret = passphrase(True)
        if len(secret) < MIN_PASSPHRASE_CHARS:
            raise UsageError(f"choose a passphrase of at least {MIN_PASSPHRASE_CHARS} "
                             "characters: it protects your keys on the appliance")
        keys = UserKeys.generate()
        try:
            await connection.call("PUT", "/me/key-bundle", json={
                "public_key": _b64(keys.public_key), "base_version": current["version"],
                "bundle": _b64(seal_bundle(keys, secret, user))})
            created = True
        except RemoteConflictError:   # another first device won the race: use its keys
            current = await connection.call("GET", "/me/key-bundle")
    if not created:
        secret = passphrase(False)
        keys = open_bundle(base64.b64decode(current["bundle"]), secret, user)
        if current["public_key"] and base64.b64decode(current["public_key"]) \
                != keys.public_key:
            raise IntegrityError("the public key the appliance holds for you does not match "
                                 "your key bundle")
    await ensure_root(connection, keys)
    home.save_keys(keys)
    return keys, created


async def ensure_root(connection: Connection, keys: UserKeys) -> str:
    """The user's root folder id, creating the folder if no device has yet."""
    me: dict[str, Any] = await connection.call("GET", "/me")
    if me["root_id"]:
        return str(me["root_id"])
    node_id = os.urandom(16).hex()
    node_key = new_node_key()
    try:
        await connection.call("POST", "/files", json={
            "id": node_id, "parent": None, "kind": "dir",
            "metadata": _b64(seal_metadata(node_key, node_id, NodeMeta(ROOT_NAME, "dir"))),
            "wrapped_key": _b64(wrap_key(keys.root_key, node_key, node_id, None))})
    except RemoteConflictError as exc:
        root_id = exc.details.get("root_id")
        if root_id:
            return str(root_id)
        raise
    return node_id


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
