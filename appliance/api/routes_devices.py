"""LAN peers (API 1.5): device certificates, the revocation list, and a new device admitted
by another device of the same user.

- POST /devices/me/certificate signs the calling device's Ed25519 key (appliance/device_ca.py)
  and records the key's hash: block grants (routes_files) are bound to it. Calling it again
  renews; a revoked device's token is dead, so it gets 401 like every route.
- GET /devices/revoked lists every revoked device; `/events` says `event: revoked` when the
  list grows (appliance/api/notify.py), and peers also re-read it every minute.
- POST /devices/admit makes a device for the caller's user (no enrollment code: the
  caller's user approved it on the LAN with a code both screens showed,
  protocol/pairing.py), unless `[enrollment] lan_admission = false`. Logged at INFO, with
  enrollments, and rate-limited like them.
"""

from __future__ import annotations

import logging
import time

import apsw
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter

from appliance.api.context import ApiContext, Caller, CallerDep, ContextDep
from appliance.device_ca import (
    DeviceCa,
    DeviceSubject,
    certificate_expiry,
    key_sha256,
    parse_device_key,
    sign_device_certificate,
    user_tag,
)
from appliance.errors import CairnApplianceError, LanAdmissionDisabledError
from appliance.meta import accounts
from appliance.meta.records import Device
from protocol.models import (
    AdmitRequest,
    AdmitResult,
    DeviceCertificate,
    DeviceCertificateRequest,
    RevocationList,
)

router = APIRouter(tags=["devices"])
log = logging.getLogger("cairnd.accounts")


def device_ca(context: ApiContext) -> DeviceCa:
    if context.device_ca is None:
        raise CairnApplianceError("this appliance has no device signing key")
    return context.device_ca


def _certificate(context: ApiContext, ca: DeviceCa, key: Ed25519PublicKey, device_id: str,
                 user_id: int) -> DeviceCertificate:
    tag = user_tag(ca, user_id)
    certificate = sign_device_certificate(
        ca, key, DeviceSubject(device_id, tag, context.appliance_id))
    context.counters.certificates_signed += 1
    return DeviceCertificate(certificate=certificate.public_bytes(Encoding.PEM).decode(),
                             ca_certificate=ca.certificate_pem,
                             expires_at=certificate_expiry(certificate), user_tag=tag)


@router.post("/devices/me/certificate", response_model=DeviceCertificate)
async def device_certificate(body: DeviceCertificateRequest, caller: CallerDep,
                             context: ContextDep) -> DeviceCertificate:
    """API 1.5: a certificate for this device's Ed25519 key, signed by the appliance's
    device CA (in the answer: pin it at join), valid 24 hours. Ask again to renew (once
    less than half its life is left), or after making a new key. Block grants are issued
    for the key of the newest certificate. Other key types are refused (400)."""
    ca = device_ca(context)
    key = parse_device_key(body.public_key)
    answer = _certificate(context, ca, key, caller.device.id, caller.user.id)
    await context.meta.write(lambda db: accounts.record_certificate_key(
        db, caller.device.id, key_sha256(key)))
    return answer


@router.get("/devices/revoked", response_model=RevocationList)
async def revoked_devices(caller: CallerDep, context: ContextDep) -> RevocationList:
    """API 1.5: every revoked device of this appliance (all users'), as of now. Peers
    refuse these devices' certificates whatever their expiry."""
    def read(db: apsw.Connection) -> RevocationList:
        return RevocationList(revoked=accounts.revoked_device_ids(db), as_of=time.time())
    return await context.meta.read(read)


def _admit(db: apsw.Connection, caller: Caller, name: str,
           key_hash: str) -> tuple[Device, str]:
    device, token = accounts.admit_device(db, caller.device, name)
    accounts.record_certificate_key(db, device.id, key_hash)
    return device, token


@router.post("/devices/admit", response_model=AdmitResult, status_code=201)
async def admit_device(body: AdmitRequest, caller: CallerDep,
                       context: ContextDep) -> AdmitResult:
    """API 1.5: enroll a new device of the caller's own user, approved on the LAN by the
    caller (`cairn approve`), with a token and a certificate for its Ed25519 key. Refused
    with `lan_admission_disabled` (403) when the appliance's config forbids it; limited
    like enrollments."""
    ca = device_ca(context)
    if not context.settings.lan_admission:
        log.info("refused a LAN admission of %r by device %s (%s) of %s: "
                 "[enrollment] lan_admission = false", body.device_name, caller.device.id,
                 caller.device.name, caller.user.name)
        raise LanAdmissionDisabledError(
            "this appliance does not admit devices from the LAN ([enrollment] "
            "lan_admission = false); ask its administrator for an enrollment code "
            "(`cairnd user code NAME`) and join with it")
    context.admission_limits.check(caller.device.id, time.monotonic())
    key = parse_device_key(body.public_key)
    device, token = await context.meta.write(
        lambda db: _admit(db, caller, body.device_name, key_sha256(key)))
    context.counters.devices_admitted += 1
    log.info("device %s (%s) of %s admitted new device %s (%r) from the LAN",
             caller.device.id, caller.device.name, caller.user.name, device.id, device.name)
    return AdmitResult(device_id=device.id, token=token, user=device.user_name,
                       appliance_id=context.appliance_id,
                       certificate=_certificate(context, ca, key, device.id, device.user_id))
