"""Enrollment (no token yet), the caller's account and key bundle, others' public keys."""

from __future__ import annotations

import logging
import time

import apsw
from fastapi import APIRouter, Request

from appliance.api.context import CallerDep, ContextDep
from appliance.api.convert import decode_b64
from appliance.errors import EnrollmentError, NotFoundError
from appliance.meta import accounts, epoch, journal, tree
from appliance.meta.records import User
from protocol.ids import b64encode
from protocol.models import (
    EnrollChallenge,
    EnrollProof,
    EnrollRedeem,
    EnrollResult,
    KeyBundle,
    KeyBundleUpdate,
    Me,
    PublicKey,
)
from protocol.version import API_VERSION

router = APIRouter(tags=["accounts"])
# Who joined, and how: enrollments here, LAN admissions in routes_devices.
log = logging.getLogger("cairnd.accounts")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/enroll/challenge", response_model=EnrollProof)
async def enroll_challenge(body: EnrollChallenge, request: Request,
                           context: ContextDep) -> EnrollProof:
    """Step 1 of joining: the device sends its code's id and a nonce; the appliance proves
    it knows the code and binds the proof to its TLS certificate (docs/enrollment.md).
    Needs no token."""
    context.anonymous_limits.check(_client(request), time.monotonic())
    nonce = bytes.fromhex(body.nonce)
    proof = await context.meta.read(
        lambda db: accounts.prove_code(db, body.code_id, nonce, context.fingerprint))
    return EnrollProof(appliance_id=context.appliance_id, api_version=API_VERSION,
                       proof=proof.hex())


@router.post("/enroll", response_model=EnrollResult, status_code=201)
async def enroll(body: EnrollRedeem, request: Request, context: ContextDep) -> EnrollResult:
    """Step 2: redeem the code with the device's response; the code is used up and the
    device gets its token (shown only here)."""
    context.anonymous_limits.check(_client(request), time.monotonic())
    nonce, response = bytes.fromhex(body.nonce), bytes.fromhex(body.response)
    outcome = await context.meta.write(lambda db: accounts.redeem_code(
        db, body.code_id, nonce, response, context.fingerprint, body.device_name))
    if outcome is None:
        raise EnrollmentError("the enrollment response does not match this code and this "
                              "appliance's certificate")
    device, token = outcome
    log.info("device %s (%r) of %s enrolled with an enrollment code", device.id,
             device.name, device.user_name)
    return EnrollResult(device_id=device.id, token=token, user=device.user_name,
                        appliance_id=context.appliance_id)


@router.get("/me", response_model=Me)
async def me(caller: CallerDep, context: ContextDep) -> Me:
    """Who the token belongs to, the user's root folder, the newest change cursor, and
    the database's epoch (a new one after a recovery from an older copy: see
    appliance.meta.epoch)."""
    def read(db: apsw.Connection) -> Me:
        root = tree.root_node(db, caller.user.id)
        current = epoch.current(db)
        return Me(user=caller.user.name, device_id=caller.device.id,
                  device_name=caller.device.name, root_id=root.id if root else None,
                  has_key_bundle=caller.user.key_bundle is not None,
                  latest_cursor=journal.latest_cursor(db, caller.user.id),
                  epoch=current.id, epoch_started_at=current.started_at,
                  epoch_started_cursor=current.started_cursor)
    return await context.meta.read(read)


def _bundle(user: User) -> KeyBundle:
    return KeyBundle(
        public_key=None if user.public_key is None else b64encode(user.public_key),
        bundle=None if user.key_bundle is None else b64encode(user.key_bundle),
        version=user.bundle_version)


@router.get("/me/key-bundle", response_model=KeyBundle)
async def get_key_bundle(caller: CallerDep) -> KeyBundle:
    """The user's passphrase-encrypted key bundle (null until the first device sets it)."""
    return _bundle(caller.user)


@router.put("/me/key-bundle", response_model=KeyBundle)
async def put_key_bundle(body: KeyBundleUpdate, caller: CallerDep,
                         context: ContextDep) -> KeyBundle:
    """Store a new key bundle (say, after a passphrase change) with the version it
    replaces. The public key is fixed by the first bundle."""
    public_key = decode_b64(body.public_key, "public_key")
    bundle = decode_b64(body.bundle, "bundle")
    user = await context.meta.write(lambda db: accounts.set_key_bundle(
        db, caller.user, public_key, bundle, body.base_version))
    return _bundle(user)


@router.get("/users/{name}/public-key", response_model=PublicKey)
async def public_key(name: str, caller: CallerDep, context: ContextDep) -> PublicKey:
    """Another user's X25519 public key, to wrap a node key for them when sharing."""
    user = await context.meta.read(lambda db: accounts.user_by_name(db, name))
    if user.public_key is None:
        raise NotFoundError(f"user {name} has no public key yet (no device has joined)")
    return PublicKey(user=user.name, public_key=b64encode(user.public_key))
