"""Admitting a new device from an existing one on the LAN (`cairn join --lan`) (pure).

The new device N has no code and no pin. It makes an Ed25519 device key and an X25519 wrap
key, serves a small HTTPS endpoint with a self-signed certificate of its device key, and
advertises `_cairn-join._tcp.local.` with a random instance id and nothing else. An
existing device E of the user (`cairn devices pending`, `cairn approve NAME`):

1. reads N's request (`GET JOIN_REQUEST_PATH`: name, keys, expiry), checking that the
   device key in it is the one N's TLS certificate has;
2. says hello (`POST JOIN_HELLO_PATH`) with the appliance's device CA and E's device
   certificate, which N checks against that CA (N cannot ask for a TLS client certificate
   here: it trusts no CA yet, and a TLS server cannot take a certificate it cannot verify).
   N takes the **first** hello only and shows the pairing code; from then on it asks every
   connection for a client certificate signed by that CA;
3. the user types on E the code N shows. E computes it from what *it* saw; a rogue device
   in between (answering N first, or standing in for N towards E) sees other keys, so the
   codes differ and E refuses;
4. on a match E asks the appliance to admit N (`POST /devices/admit`), seals the user's keys
   to N's wrap key and hands N everything it needs (`POST JOIN_APPROVE_PATH`, over mutual
   TLS with the key of the certificate that said hello: only that device can approve). N
   checks the appliance's certificate and its own new device certificate against the CA
   from the hello, and is enrolled without typing a passphrase or a code.

What the code does not stop: a rogue that says hello *first* and approves at once, with
an appliance of its own, gets N joined to that appliance (the code is computed from public
keys, and nothing is typed on N). E then refuses ("another device already answered"), and
N prints the user and appliance it joined; docs/architecture.md's attack model says what
that costs and how to notice.

    code = SHA-256("cairn-pair-v1" | N device key | N wrap key | E device key | CA key)
           as a number mod 10**6, six digits

(each key length-prefixed, public keys as DER SubjectPublicKeyInfo, the wrap key raw).
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, Field

from protocol.limits import MAX_DEVICE_NAME

JOIN_SERVICE_TYPE = "_cairn-join._tcp.local."
JOIN_PROTOCOL = "1"
JOIN_REQUEST_PATH = "/join/v1/request"
JOIN_HELLO_PATH = "/join/v1/hello"
JOIN_APPROVE_PATH = "/join/v1/approve"
JOIN_ABORT_PATH = "/join/v1/abort"
REQUEST_LIFETIME_S = 10 * 60
CODE_DIGITS = 6
_CODE_LABEL = b"cairn-pair-v1"
_CODE = re.compile(r"\d{6}")


def pairing_code(new_device_key: bytes, new_wrap_key: bytes, approver_key: bytes,
                 ca_key: bytes) -> str:
    """The six digits both screens show (see the module)."""
    digest = hashlib.sha256(_CODE_LABEL)
    for part in (new_device_key, new_wrap_key, approver_key, ca_key):
        digest.update(len(part).to_bytes(4, "big") + part)
    return f"{int.from_bytes(digest.digest(), 'big') % 10 ** CODE_DIGITS:06d}"


def format_code(code: str) -> str:
    return f"{code[:3]} {code[3:]}"


def parse_typed_code(text: str) -> str | None:
    """Six digits from what a user typed ("123 456", "123-456", "123456"), or None."""
    digits = "".join(ch for ch in text if ch not in " -\t")
    return digits if _CODE.fullmatch(digits) else None


def join_txt_record() -> dict[str, str]:
    return {"v": JOIN_PROTOCOL}


class JoinRequestInfo(BaseModel):
    device_name: str = Field(min_length=1, max_length=MAX_DEVICE_NAME)
    device_key: str = Field(max_length=4096, description="Ed25519 public key, PEM; the "
                            "key of the endpoint's TLS certificate")
    wrap_key: str = Field(min_length=43, max_length=44, description="X25519 public key, "
                          "base64, raw 32 bytes: the user's keys are sealed to it")
    created_at: float
    expires_at: float


class JoinHello(BaseModel):
    appliance_id: str = Field(max_length=200)
    ca_certificate: str = Field(max_length=8192, description="The appliance's device CA, "
                                "PEM; the approver's TLS client certificate is signed by it")
    device_certificate: str = Field(max_length=8192, description="The approver's device "
                                    "certificate, PEM, signed by ca_certificate: its key "
                                    "enters the code, and only that key may approve")


class JoinApproval(BaseModel):
    appliance_id: str = Field(max_length=200)
    urls: list[str] = Field(min_length=1, max_length=16)
    appliance_certificate: str = Field(max_length=16384, description="The appliance's TLS "
                                       "certificate, PEM (pinned by the new device)")
    device_id: str = Field(max_length=200)
    device_name: str = Field(max_length=MAX_DEVICE_NAME)
    token: str = Field(max_length=400)
    user: str = Field(max_length=200)
    device_certificate: str = Field(max_length=8192)
    sealed_keys: str = Field(max_length=8192, description="The user's keys sealed to the "
                             "request's wrap key, base64")


class JoinAbort(BaseModel):
    reason: str = Field(max_length=400)


def expired(info: JoinRequestInfo, now: float) -> bool:
    return now >= info.expires_at or info.expires_at - info.created_at > REQUEST_LIFETIME_S
