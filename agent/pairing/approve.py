"""`cairn approve NAME`: admit a new device of this user that asked on the LAN.

1. Find NAME's request (pending.py). Two open requests by that name are refused: one of
   them stands in for the other, and the user cannot tell which.
2. Say hello with this device's certificate and the device CA (a connection presenting no
   client certificate: the endpoint may already trust another CA, see session.py). The
   endpoint's certificate must be the one the request was read with, on every connection.
   A 409 means another device answered first: whoever it was, the code NAME shows is not
   ours, so nothing is admitted and the request is ended.
3. The user types the code NAME shows; we compute ours from what *we* saw (NAME's device
   and wrap keys, our device key, the CA's key). A mismatch means someone stood in between:
   the request is ended (JOIN_ABORT_PATH) and nothing is admitted.
4. The appliance admits the device (`POST /devices/admit`: its token and certificate); we
   seal the user's keys to NAME's wrap key and post the approval over mutual TLS with our
   device certificate — the one that said hello, which only we hold the key of.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel

from agent.api import Api, body_of
from agent.client import Connection
from agent.errors import ApiError, EnrollmentError, TransportError, UsageError
from agent.home import AgentHome
from agent.pairing.pending import (
    FoundRequest,
    find_requests,
    peer_certificate,
    untrusting_context,
)
from agent.pairing.sealing import seal_keys
from agent.pairing.session import spki_der
from agent.peers.identity import PeerIdentity, ensure_identity
from protocol.models import AdmitRequest
from protocol.pairing import (
    JOIN_ABORT_PATH,
    JOIN_APPROVE_PATH,
    JOIN_HELLO_PATH,
    JoinAbort,
    JoinApproval,
    JoinHello,
    expired,
    pairing_code,
    parse_typed_code,
)

log = logging.getLogger("cairn.pairing")

CodeSource = Callable[[str], str]      # called with the request's name; returns the text
MAX_CODE_TRIES = 3
DIFFER = "another device may have answered this request; nothing was admitted"
TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Admitted:
    device_name: str
    device_id: str
    user: str


async def _post(request: FoundRequest, path: str, body: BaseModel,
                identity: PeerIdentity | None = None) -> httpx.Response:
    """BODY to the request's endpoint, which must show the certificate it was read with."""
    async with httpx.AsyncClient(base_url=request.url, verify=untrusting_context(identity),
                                 timeout=TIMEOUT_S) as client:
        response = await client.post(path, json=body_of(body))
        if peer_certificate(response) != request.certificate_der:
            raise EnrollmentError(f"the endpoint of {request.info.device_name}'s request "
                                  "changed its certificate: nothing was admitted")
    return response


async def abort(request: FoundRequest, reason: str) -> None:
    """End the request with REASON (shown on the new device); a failure is only logged."""
    try:
        await _post(request, JOIN_ABORT_PATH, JoinAbort(reason=reason[:400]))
    except (httpx.HTTPError, EnrollmentError, TransportError) as exc:
        log.info("could not end the request of %s: %s", request.info.device_name, exc)


def _said(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))[:300]
    except ValueError:
        return response.text[:300]


def _choose(found: list[FoundRequest], name: str) -> FoundRequest:
    named = [r for r in found if r.info.device_name == name]
    if not named:
        others = ", ".join(sorted({r.info.device_name for r in found})) or "none"
        raise UsageError(f"no device named {name!r} is asking to join on this network "
                         f"(pending: {others}); is `cairn join --lan` running on it?")
    if len(named) > 1:
        raise EnrollmentError(f"{len(named)} devices ask to join as {name!r}: one of them "
                              "may be standing in for the other; nothing was admitted. "
                              f"Stop `cairn join --lan` on {name} and start it again")
    return named[0]


def _typed_code(code_source: CodeSource, name: str) -> str:
    for _ in range(MAX_CODE_TRIES):
        code = parse_typed_code(code_source(name).strip())
        if code is not None:
            return code
    raise UsageError("that is not a 6-digit code")


async def approve(home: AgentHome, name: str, code_source: CodeSource) -> Admitted:
    """Admit the device asking to join as NAME (see the module). CODE_SOURCE gives what
    the user typed."""
    device = home.load_device()
    keys = home.load_keys()
    async with Connection(home, device) as connection:
        api = Api(connection)
        identity = await ensure_identity(api, home)
        if identity is None:
            raise EnrollmentError("the appliance is older than API 1.5: it cannot admit "
                                  "devices from the LAN; join NAME with a code instead")
        request = _choose(await find_requests(home), name)
        hello = JoinHello(appliance_id=device.appliance_id,
                          ca_certificate=identity.ca_certificate_pem.decode(),
                          device_certificate=identity.certificate_pem.decode())
        answer = await _post(request, JOIN_HELLO_PATH, hello)
        if answer.status_code == 409:
            await abort(request, "two devices answered this request: start again")
            raise EnrollmentError(f"another device already answered {name}'s request, so "
                                  f"the code {name} shows is not ours: {DIFFER}")
        if answer.status_code != 200:
            raise EnrollmentError(f"{name} refused our hello: {_said(answer)}")

        typed = _typed_code(code_source, name)
        ours = pairing_code(request.device_key_der, _wrap_key(request),
                            spki_der(_public(identity)), spki_der(identity.ca_public_key()))
        if typed != ours:
            await abort(request, "the codes differ: " + DIFFER)
            raise EnrollmentError(f"the codes differ: {DIFFER}")
        if expired(request.info, time.time()):
            raise EnrollmentError(f"{name}'s request expired; run `cairn join --lan` on it "
                                  "again")

        try:
            admitted = await api.admit(AdmitRequest(device_name=request.info.device_name,
                                                    public_key=request.info.device_key))
        except ApiError as exc:
            await abort(request, f"the appliance refused: {exc.message}")
            raise
        sealed = seal_keys(keys, _wrap_key(request), appliance_id=admitted.appliance_id,
                           user=admitted.user, device_id=admitted.device_id)
        approval = JoinApproval(
            appliance_id=admitted.appliance_id, urls=[device.url],
            appliance_certificate=device.certificate, device_id=admitted.device_id,
            device_name=request.info.device_name, token=admitted.token, user=admitted.user,
            device_certificate=admitted.certificate.certificate,
            sealed_keys=base64.b64encode(sealed).decode())
        answer = await _post(request, JOIN_APPROVE_PATH, approval, identity)
        if answer.status_code != 200:
            raise EnrollmentError(
                f"the appliance admitted {name} (device {admitted.device_id}) but {name} "
                f"did not take the approval: {_said(answer)}; revoke that device with "
                "`cairnd device revoke` and try again")
        return Admitted(request.info.device_name, admitted.device_id, admitted.user)


def _wrap_key(request: FoundRequest) -> bytes:
    try:
        return base64.b64decode(request.info.wrap_key, validate=True)
    except (binascii.Error, ValueError):
        raise EnrollmentError("the request's wrap key is not base64") from None


def _public(identity: PeerIdentity) -> Ed25519PublicKey:
    key = x509.load_pem_x509_certificate(identity.certificate_pem).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise EnrollmentError("this device's certificate is not for an Ed25519 key")
    return key
