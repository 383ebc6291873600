"""Users, devices and one-time enrollment codes."""

from __future__ import annotations

import hmac
import re
import secrets
import time

import apsw

from appliance.credentials import new_device_token, token_digest
from appliance.errors import (
    BadRequestError,
    ConflictError,
    EnrollmentError,
    NotFoundError,
    UnauthorizedError,
)
from appliance.meta.records import Device, User
from protocol.enrollment import (
    EnrollmentCode,
    MalformedCodeError,
    enrollment_proof,
    enrollment_response,
    parse_code_id,
)

USER_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
DEVICE_NAME_MAX = 64
DEFAULT_CODE_LIFETIME_S = 24 * 3600.0
MAX_CODE_FAILURES = 5
_USER_COLUMNS = "id, name, public_key, key_bundle, bundle_version, created_at"
_DEVICE_COLUMNS = ("d.id, d.user_id, u.name, d.name, d.created_at, d.last_seen, "
                   "d.revoked_at, d.cert_key_sha256")


def check_user_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise BadRequestError(
            f"invalid user name {name!r}: use 1-32 lowercase letters, digits, '.', '_' or "
            "'-', starting with a letter")
    return name


def check_device_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned or len(cleaned) > DEVICE_NAME_MAX or any(ord(ch) < 32 for ch in cleaned):
        raise BadRequestError(f"a device name has 1-{DEVICE_NAME_MAX} printable characters")
    return cleaned


def _user(row: tuple[object, ...]) -> User:
    return User(*row)  # type: ignore[arg-type]


def add_user(db: apsw.Connection, name: str) -> User:
    check_user_name(name)
    if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
        raise ConflictError(f"user {name} already exists "
                            f"(add a device with `cairnd user code {name}`)")
    db.execute("INSERT INTO users(name, created_at) VALUES (?, ?)", (name, time.time()))
    return user_by_name(db, name)


def user_by_name(db: apsw.Connection, name: str) -> User:
    row = db.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"no user named {name!r}")
    return _user(row)


def user_by_id(db: apsw.Connection, user_id: int) -> User:
    row = db.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no user with id {user_id}")
    return _user(row)


def list_users(db: apsw.Connection) -> list[tuple[User, int]]:
    """Every user with the number of active devices."""
    rows = db.execute(
        f"SELECT {', '.join('u.' + c.strip() for c in _USER_COLUMNS.split(','))}, "
        "(SELECT count(*) FROM devices d WHERE d.user_id = u.id AND d.revoked_at IS NULL) "
        "FROM users u ORDER BY u.name").fetchall()
    return [(_user(row[:-1]), int(row[-1])) for row in rows]  # type: ignore[arg-type]


def set_key_bundle(db: apsw.Connection, user: User, public_key: bytes, bundle: bytes,
                   base_version: int) -> User:
    """Store the user's passphrase-encrypted key bundle. The public key is fixed by the
    first bundle: grants are wrapped for it, so a different one is refused."""
    current = user_by_id(db, user.id)
    if base_version != current.bundle_version:
        raise ConflictError(
            f"the key bundle changed meanwhile (version {current.bundle_version}, "
            f"you sent base_version {base_version})", current_version=current.bundle_version)
    if current.public_key is not None and current.public_key != public_key:
        raise ConflictError("the user's public key is already set and cannot change "
                            "(others have shared files with it)")
    db.execute("UPDATE users SET public_key = ?, key_bundle = ?, "
               "bundle_version = bundle_version + 1 WHERE id = ?",
               (public_key, bundle, user.id))
    return user_by_id(db, user.id)


# --- enrollment codes ----------------------------------------------------------------------

def issue_code(db: apsw.Connection, user: User,
               lifetime_s: float = DEFAULT_CODE_LIFETIME_S) -> tuple[EnrollmentCode, float]:
    """A fresh one-time code for one new device of `user`; returns it and its expiry."""
    code = EnrollmentCode.generate()
    now = time.time()
    db.execute("DELETE FROM enrollment_codes WHERE expires_at < ?", (now - 7 * 24 * 3600,))
    db.execute("INSERT INTO enrollment_codes(code_id, user_id, key, created_at, expires_at) "
               "VALUES (?, ?, ?, ?, ?)",
               (code.code_id_text, user.id, code.key(), now, now + lifetime_s))
    return code, now + lifetime_s


def _usable_code(db: apsw.Connection, code_id: str) -> tuple[int, bytes]:
    try:
        parse_code_id(code_id)
    except MalformedCodeError as exc:
        raise EnrollmentError(f"invalid code id: {exc}") from None
    row = db.execute("SELECT user_id, key, expires_at, used_at, failed_attempts "
                     "FROM enrollment_codes WHERE code_id = ?", (code_id.upper(),)).fetchone()
    refusal = "this enrollment code is unknown, used, expired or blocked; ask for a new one " \
              "(`cairnd user code NAME`)"
    if row is None:
        raise EnrollmentError(refusal)
    user_id, key, expires_at, used_at, failures = row
    if used_at is not None or time.time() > expires_at or failures >= MAX_CODE_FAILURES:
        raise EnrollmentError(refusal)
    return int(user_id), bytes(key)


def prove_code(db: apsw.Connection, code_id: str, nonce: bytes, fingerprint: bytes) -> bytes:
    """Step 1: show the device that this appliance knows the code and serves this cert."""
    _, key = _usable_code(db, code_id)
    return enrollment_proof(key, nonce, fingerprint)


def redeem_code(db: apsw.Connection, code_id: str, nonce: bytes, response: bytes,
                fingerprint: bytes, device_name: str) -> tuple[Device, str] | None:
    """Step 2: the device proved it holds the code; use the code up and make a device.
    Returns the device and its token (shown only this once), or None for a wrong response,
    which counts as a failed attempt (the caller commits that and refuses); after
    MAX_CODE_FAILURES the code is blocked."""
    name = check_device_name(device_name)
    user_id, key = _usable_code(db, code_id)
    expected = enrollment_response(key, nonce, fingerprint)
    if not hmac.compare_digest(expected, response):
        db.execute("UPDATE enrollment_codes SET failed_attempts = failed_attempts + 1 "
                   "WHERE code_id = ?", (code_id.upper(),))
        return None
    db.execute("UPDATE enrollment_codes SET used_at = ? WHERE code_id = ?",
               (time.time(), code_id.upper()))
    return _new_device(db, user_id, name)


def _new_device(db: apsw.Connection, user_id: int, name: str) -> tuple[Device, str]:
    token = new_device_token()
    device_id = "dev_" + secrets.token_hex(8)
    db.execute("INSERT INTO devices(id, user_id, name, token_hash, created_at) "
               "VALUES (?, ?, ?, ?, ?)",
               (device_id, user_id, name, token_digest(token), time.time()))
    return device_by_id(db, device_id), token


def admit_device(db: apsw.Connection, admitter: Device, device_name: str
                 ) -> tuple[Device, str]:
    """A new device of ADMITTER's user, admitted on the LAN by ADMITTER (API 1.5, POST
    /devices/admit); returns it and its token (shown only this once). The admitter must
    still be active: its own token was checked, but it may be revoked meanwhile."""
    if device_by_id(db, admitter.id).revoked_at is not None:
        raise UnauthorizedError("this device has been revoked; enroll it again")
    return _new_device(db, admitter.user_id, check_device_name(device_name))


# --- devices -------------------------------------------------------------------------------

def _device(row: tuple[object, ...]) -> Device:
    return Device(*row)  # type: ignore[arg-type]


def device_by_id(db: apsw.Connection, device_id: str) -> Device:
    row = db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices d JOIN users u "
                     "ON u.id = d.user_id WHERE d.id = ?", (device_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no device {device_id!r}")
    return _device(row)


def authenticate(db: apsw.Connection, token: str) -> Device:
    """The active device holding `token`. Raises UnauthorizedError otherwise."""
    row = db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices d JOIN users u "
                     "ON u.id = d.user_id WHERE d.token_hash = ?",
                     (token_digest(token),)).fetchone()
    if row is None:
        raise UnauthorizedError("unknown device token; enroll this device again")
    device = _device(row)
    if device.revoked_at is not None:
        raise UnauthorizedError("this device has been revoked; enroll it again")
    return device


def touch_device(db: apsw.Connection, device_id: str, when: float) -> None:
    db.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (when, device_id))


def list_devices(db: apsw.Connection, user_name: str | None = None) -> list[Device]:
    where, args = ("WHERE u.name = ?", (user_name,)) if user_name else ("", ())
    rows = db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices d JOIN users u "
                      f"ON u.id = d.user_id {where} ORDER BY u.name, d.created_at",
                      args).fetchall()
    return [_device(row) for row in rows]


def revoke_device(db: apsw.Connection, device_id: str) -> Device:
    device = device_by_id(db, device_id)
    if device.revoked_at is None:
        db.execute("UPDATE devices SET revoked_at = ? WHERE id = ?", (time.time(), device_id))
    return device_by_id(db, device_id)


def record_certificate_key(db: apsw.Connection, device_id: str, key_sha256: str) -> None:
    """Remember the key of DEVICE_ID's newest certificate: grants are issued for it."""
    db.execute("UPDATE devices SET cert_key_sha256 = ? WHERE id = ?", (key_sha256, device_id))


def revoked_device_ids(db: apsw.Connection) -> list[str]:
    """Every revoked device of this appliance, oldest revocation first."""
    return [str(row[0]) for row in db.execute(
        "SELECT id FROM devices WHERE revoked_at IS NOT NULL ORDER BY revoked_at, id")]


def revoked_count(db: apsw.Connection) -> int:
    """How many devices are revoked (by index: cheap enough to ask every second)."""
    row = db.execute("SELECT count(*) FROM devices WHERE revoked_at IS NOT NULL").fetchone()
    return int(row[0]) if row else 0
