"""appliance.meta.accounts on an in-memory database with the migrations applied: users,
key bundles, one-time enrollment codes (challenge, redeem, failures, expiry) and devices."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import apsw
import pytest
from meta_helpers import memory_db, new_user

from appliance.errors import (
    BadRequestError,
    ConflictError,
    EnrollmentError,
    NotFoundError,
    UnauthorizedError,
)
from appliance.meta import accounts
from appliance.meta.records import Device
from protocol.enrollment import EnrollmentCode, enrollment_proof, enrollment_response

FINGERPRINT = bytes(range(32))


@pytest.fixture
def db() -> Iterator[apsw.Connection]:
    connection = memory_db()
    yield connection
    connection.close()


def redeem(db: apsw.Connection, code: EnrollmentCode, name: str = "laptop"
           ) -> tuple[Device, str]:
    """Both steps as a device that holds CODE and saw FINGERPRINT."""
    nonce = os.urandom(32)
    assert accounts.prove_code(db, code.code_id_text, nonce, FINGERPRINT) == \
        enrollment_proof(code.key(), nonce, FINGERPRINT)
    redeemed = accounts.redeem_code(db, code.code_id_text, nonce,
                                     enrollment_response(code.key(), nonce, FINGERPRINT),
                                     FINGERPRINT, name)
    assert redeemed is not None
    return redeemed


# --- users -----------------------------------------------------------------------------------

def test_a_user_is_added_once_with_a_valid_name(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    assert (alice.name, alice.public_key, alice.key_bundle, alice.bundle_version) == \
        ("alice", None, None, 0)
    assert accounts.user_by_name(db, "alice") == alice == accounts.user_by_id(db, alice.id)
    with pytest.raises(ConflictError, match="already exists"):
        new_user(db, "alice")
    for bad in ("", "Alice", "1st", "a" * 33, "al ice", "al/ice"):
        with pytest.raises(BadRequestError, match="invalid user name"):
            new_user(db, bad)
    with pytest.raises(NotFoundError):
        accounts.user_by_name(db, "nobody")
    with pytest.raises(NotFoundError):
        accounts.user_by_id(db, alice.id + 100)


def test_list_users_counts_active_devices_only(db: apsw.Connection) -> None:
    alice, bob = new_user(db, "alice"), new_user(db, "bob")
    laptop, _ = redeem(db, accounts.issue_code(db, alice)[0])
    redeem(db, accounts.issue_code(db, alice)[0], "phone")
    accounts.revoke_device(db, laptop.id)
    assert [(user.name, count) for user, count in accounts.list_users(db)] == \
        [("alice", 1), ("bob", 0)]
    assert bob.id != alice.id


def test_the_key_bundle_is_versioned_and_the_public_key_fixed(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    first = accounts.set_key_bundle(db, alice, b"P" * 32, b"bundle-1", base_version=0)
    assert (first.public_key, first.key_bundle, first.bundle_version) == \
        (b"P" * 32, b"bundle-1", 1)
    with pytest.raises(ConflictError, match="changed meanwhile") as stale:
        accounts.set_key_bundle(db, alice, b"P" * 32, b"bundle-x", base_version=0)
    assert stale.value.details == {"current_version": 1}
    with pytest.raises(ConflictError, match="cannot change"):
        accounts.set_key_bundle(db, alice, b"Q" * 32, b"bundle-2", base_version=1)
    second = accounts.set_key_bundle(db, alice, b"P" * 32, b"bundle-2", base_version=1)
    assert (second.key_bundle, second.bundle_version) == (b"bundle-2", 2)


# --- enrollment codes --------------------------------------------------------------------------

def test_a_code_makes_one_device_and_is_spent(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    code, expires = accounts.issue_code(db, alice, lifetime_s=60)
    assert time.time() < expires <= time.time() + 60
    device, token = redeem(db, code, "  laptop  ")
    assert (device.user_id, device.user_name, device.name, device.revoked_at) == \
        (alice.id, "alice", "laptop", None)
    assert device.id.startswith("dev_") and token.startswith("cairn_dev_")
    # the database keeps only a digest of the token
    assert not db.execute("SELECT 1 FROM devices WHERE token_hash = ?",
                          (token.encode(),)).fetchall()
    assert accounts.authenticate(db, token) == device
    with pytest.raises(EnrollmentError, match="unknown, used, expired"):
        redeem(db, code)


def test_a_wrong_response_counts_and_blocks_the_code(db: apsw.Connection) -> None:
    code, _ = accounts.issue_code(db, new_user(db, "alice"))
    nonce = os.urandom(32)
    wrong = enrollment_response(code.key(), nonce, b"\0" * 32)   # another certificate
    for _ in range(accounts.MAX_CODE_FAILURES):
        assert accounts.redeem_code(db, code.code_id_text, nonce, wrong, FINGERPRINT,
                                    "laptop") is None
    with pytest.raises(EnrollmentError):
        redeem(db, code)                         # blocked, even with the right response
    assert accounts.list_devices(db) == []


def test_expired_unknown_and_malformed_codes_are_refused(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    expired, _ = accounts.issue_code(db, alice, lifetime_s=-1)
    with pytest.raises(EnrollmentError, match="expired"):
        accounts.prove_code(db, expired.code_id_text, os.urandom(32), FINGERPRINT)
    with pytest.raises(EnrollmentError, match="unknown"):
        accounts.prove_code(db, EnrollmentCode.generate().code_id_text, os.urandom(32),
                            FINGERPRINT)
    with pytest.raises(EnrollmentError, match="invalid code id"):
        accounts.prove_code(db, "not-an-id", os.urandom(32), FINGERPRINT)


def test_codes_long_expired_are_swept_when_a_new_one_is_issued(db: apsw.Connection) -> None:
    alice = new_user(db, "alice")
    accounts.issue_code(db, alice, lifetime_s=-8 * 24 * 3600)    # expired 8 days ago
    recent, _ = accounts.issue_code(db, alice, lifetime_s=-3600)   # expired an hour ago
    accounts.issue_code(db, alice)
    ids = {row[0] for row in db.execute("SELECT code_id FROM enrollment_codes")}
    assert len(ids) == 2 and recent.code_id_text in ids


def test_device_names_are_checked(db: apsw.Connection) -> None:
    code, _ = accounts.issue_code(db, new_user(db, "alice"))
    for bad in ("", "   ", "x" * (accounts.DEVICE_NAME_MAX + 1), "tab\tname"):
        with pytest.raises(BadRequestError, match="device name"):
            redeem(db, code, bad)
    assert redeem(db, code, "x" * accounts.DEVICE_NAME_MAX)[0].name == \
        "x" * accounts.DEVICE_NAME_MAX


# --- devices ---------------------------------------------------------------------------------

def test_a_revoked_device_no_longer_authenticates(db: apsw.Connection) -> None:
    alice, bob = new_user(db, "alice"), new_user(db, "bob")
    laptop, token = redeem(db, accounts.issue_code(db, alice)[0], "laptop")
    redeem(db, accounts.issue_code(db, bob)[0], "bob-pc")
    with pytest.raises(UnauthorizedError, match="unknown device token"):
        accounts.authenticate(db, token + "x")
    accounts.touch_device(db, laptop.id, 1234.5)
    assert accounts.device_by_id(db, laptop.id).last_seen == 1234.5

    revoked = accounts.revoke_device(db, laptop.id)
    assert revoked.revoked_at is not None
    assert accounts.revoke_device(db, laptop.id).revoked_at == revoked.revoked_at  # once
    with pytest.raises(UnauthorizedError, match="revoked"):
        accounts.authenticate(db, token)
    assert [d.name for d in accounts.list_devices(db)] == ["laptop", "bob-pc"]
    assert [d.name for d in accounts.list_devices(db, "bob")] == ["bob-pc"]
    with pytest.raises(NotFoundError):
        accounts.revoke_device(db, "dev_nope")
