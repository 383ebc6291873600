"""`cairn join`: enroll this device with a one-time code, then obtain the user's keys.

1. Candidates: the `--url` given, else every appliance mDNS finds on the LAN, then an
   appliance on this very machine at its default address (`make run`'s listens on
   127.0.0.1 only and so advertises nothing). The proof below tells which one made the
   code; one of another major API version is skipped with the reason.
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
5. The device's own key pair and certificate for LAN peers (agent/peers/identity.py),
   with the device CA pinned; a failure there leaves the device joined, without peers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
from collections.abc import Callable
from typing import Any

import httpx
import trio
from pydantic import ValidationError

from agent.api import Api, body_of
from agent.client import Connection, pinned_ssl_context, presented_certificate, retry_after
from agent.crypto.keys import UserKeys, open_bundle, seal_bundle
from agent.crypto.nodes import NodeMeta, new_node_key
from agent.discovery import find_appliances
from agent.errors import (
    EnrollmentError,
    IntegrityError,
    RemoteConflictError,
    TransportError,
    UsageError,
)
from agent.home import AgentHome, DeviceRecord
from agent.peers.identity import try_ensure_identity
from agent.remote import node_create
from protocol import version
from protocol.enrollment import (
    NONCE_BYTES,
    EnrollmentCode,
    MalformedCodeError,
    enrollment_proof,
    enrollment_response,
)
from protocol.errors import ErrorBody
from protocol.ids import b64decode, new_node_id
from protocol.mdns import local_urls
from protocol.models import EnrollChallenge, EnrollProof, EnrollRedeem, EnrollResult

PassphraseSource = Callable[[bool], str]   # called with True for a new passphrase
MIN_PASSPHRASE_CHARS = 8
RATE_LIMIT_RETRIES = 8
MAX_RATE_LIMIT_WAIT_S = 5.0
ROOT_NAME = "root"


def _untrusted_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE   # trust comes from the code's proof, below
    return context


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST BODY; a refusal for going too fast (the appliance limits enrollment requests
    per address, and several devices may join at once) is repeated after the delay the
    appliance names, a few times."""
    for _ in range(RATE_LIMIT_RETRIES):
        response = await client.post(path, json=body)
        if response.status_code != 429:
            return response
        await trio.sleep(min(retry_after(response) or 1.0, MAX_RATE_LIMIT_WAIT_S))
    return response


class _Unreachable(str):
    """Why a candidate was not tried: nothing answered there."""


async def _challenge(url: str, code: EnrollmentCode, nonce: bytes
                     ) -> tuple[bytes, str] | str:
    """(certificate DER, appliance id) if the appliance at URL proves it made CODE on the
    connection we see; otherwise why not."""
    challenge = EnrollChallenge(code_id=code.code_id_text, nonce=nonce.hex())
    try:
        async with httpx.AsyncClient(base_url=url, verify=_untrusted_context(),
                                     timeout=15) as client:
            response = await _post(client, "/enroll/challenge", body_of(challenge))
            der = presented_certificate(response)
    except httpx.HTTPError as exc:
        return _Unreachable(f"{url}: cannot connect ({exc})")
    if der is None:
        raise EnrollmentError("the appliance presented no certificate")
    if response.status_code != 200:
        try:
            message = ErrorBody.model_validate_json(response.content).error.message
        except ValidationError:
            message = f"HTTP {response.status_code}"
        return f"{url}: {message}"
    try:
        answer = EnrollProof.model_validate_json(response.content)
        proof = bytes.fromhex(answer.proof)
        version.check_compatible(answer.api_version)
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, version.IncompatibleApiError):
            return f"{url}: {exc}"
        return f"{url}: not a Cairn appliance (malformed challenge answer)"
    fingerprint = hashlib.sha256(der).digest()
    if not hmac.compare_digest(proof, enrollment_proof(code.key(), nonce, fingerprint)):
        return (f"{url}: did not prove it made this code (another appliance, a typo in "
                "the code, or someone in the middle)")
    return der, answer.appliance_id


async def enroll(home: AgentHome, code_text: str, url: str | None, device_name: str
                 ) -> DeviceRecord:
    """Redeem CODE with the appliance that vouches for it; the device record (saved)."""
    try:
        code = EnrollmentCode.parse(code_text)
    except MalformedCodeError as exc:
        raise UsageError(f"that enrollment code is not valid: {exc}") from None
    if url is not None:
        candidates, searched = [url.rstrip("/")], ""
    else:
        candidates, searched = await _candidates()
    reasons = []
    for candidate in candidates:
        nonce = os.urandom(NONCE_BYTES)
        outcome = await _challenge(candidate, code, nonce)
        if isinstance(outcome, str):
            reasons.append(outcome)
            continue
        der, appliance_id = outcome
        return await _redeem(home, candidate, code, nonce, der, appliance_id, device_name)
    if url is None and all(isinstance(reason, _Unreachable) for reason in reasons):
        raise TransportError(f"no Cairn appliance answered {searched}; is it running and "
                             "on this network? Or give its address with --url")
    raise EnrollmentError("no appliance accepted this code: " + "; ".join(reasons))


async def _candidates() -> tuple[list[str], str]:
    """The URLs to try without --url, and where they were looked for (for the message):
    what mDNS finds on the LAN, then this machine's default address."""
    local = local_urls()
    try:
        found = [u for appliance in await find_appliances() for u in appliance.urls]
        searched = f"on the LAN (mDNS) or on this machine ({', '.join(local)})"
    except TransportError as exc:     # discovery off, or no LAN interface
        why = exc.message.split(";")[0]
        found, searched = [], f"on this machine ({', '.join(local)}; {why})"
    return found + [u for u in local if u not in found], searched


async def _redeem(home: AgentHome, url: str, code: EnrollmentCode, nonce: bytes,
                  der: bytes, appliance_id: str, device_name: str) -> DeviceRecord:
    pem = ssl.DER_cert_to_PEM_cert(der)
    fingerprint = hashlib.sha256(der).digest()
    redeem = EnrollRedeem(code_id=code.code_id_text, nonce=nonce.hex(),
                          device_name=device_name,
                          response=enrollment_response(code.key(), nonce, fingerprint).hex())
    try:
        # Only the certificate the proof was checked against is trusted from here on.
        async with httpx.AsyncClient(base_url=url, verify=pinned_ssl_context(pem),
                                     timeout=30) as client:
            response = await _post(client, "/enroll", body_of(redeem))
    except httpx.HTTPError as exc:
        raise TransportError(f"lost the appliance at {url} while joining: {exc}") from None
    if response.status_code != 201:
        raise EnrollmentError(f"the appliance refused the code: {response.text[:200]}")
    try:
        result = EnrollResult.model_validate_json(response.content)
    except ValidationError:
        raise EnrollmentError("the appliance's answer to the code is malformed") from None
    device = DeviceRecord(appliance_id=appliance_id, url=url, fingerprint=fingerprint.hex(),
                          certificate=pem, device_id=result.device_id,
                          device_name=device_name, user=result.user, token=result.token)
    home.save_device(device)
    return device


async def unlock_keys(connection: Connection, home: AgentHome,
                      passphrase: PassphraseSource) -> tuple[UserKeys, bool]:
    """The user's keys, made now (first device: returns True) or opened from the bundle;
    saved in HOME. Makes the user's root folder if there is none yet."""
    user = connection.device.user
    api = Api(connection)
    current = await api.key_bundle()
    created = False
    if current.bundle is None:
        secret = passphrase(True)
        if len(secret) < MIN_PASSPHRASE_CHARS:
            raise UsageError(f"choose a passphrase of at least {MIN_PASSPHRASE_CHARS} "
                             "characters: it protects your keys on the appliance")
        keys = UserKeys.generate()
        try:
            await api.put_key_bundle(keys.public_key, seal_bundle(keys, secret, user),
                                     current.version)
            created = True
        except RemoteConflictError:   # another first device won the race: use its keys
            current = await api.key_bundle()
    if not created:
        secret = passphrase(False)
        if current.bundle is None:
            raise IntegrityError("the appliance lost your key bundle after another device "
                                 "stored it")
        keys = open_bundle(b64decode(current.bundle), secret, user)
        if current.public_key and b64decode(current.public_key) != keys.public_key:
            raise IntegrityError("the public key the appliance holds for you does not match "
                                 "your key bundle")
    await ensure_root(api, keys)
    home.save_keys(keys)
    # The device's own key and certificate for LAN peers; never a reason to fail joining.
    await try_ensure_identity(api, home)
    return keys, created


async def ensure_root(api: Api, keys: UserKeys) -> str:
    """The user's root folder id, creating the folder if no device has yet."""
    me = await api.me()
    if me.root_id:
        return me.root_id
    node_id = new_node_id()
    try:
        await api.create(node_create(node_id, new_node_key(), NodeMeta(ROOT_NAME, "dir"),
                                     None, keys.root_key))
    except RemoteConflictError as exc:
        root_id = exc.details.get("root_id")
        if root_id:
            return str(root_id)
        raise
    return node_id
