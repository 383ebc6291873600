"""One-time enrollment codes and the proofs exchanged while redeeming one (pure).

An enrollment code is 15 bytes written as 24 Crockford base32 characters in groups of four
(`7KQ2-…`): a 5-byte code id, a 9-byte secret, and a check byte that catches typing mistakes
before any network traffic. The secret never crosses the network. Instead, both sides derive
`key = HMAC-SHA256(secret, "cairn-enroll-v1" | code_id)` and the appliance proves, with a
device-chosen nonce, that it knows the key *and* which TLS certificate it serves:

    proof    = HMAC(key, "proof"  | nonce | sha256(appliance certificate, DER))
    response = HMAC(key, "redeem" | nonce | sha256(appliance certificate, DER))

The device computes the proof over the certificate it actually sees on its TLS connection.
An impostor on the LAN serves a different certificate and cannot make a matching proof
without the secret, so the device refuses it before revealing anything that could be used
to redeem the code. The full protocol is in docs/enrollment.md. (Device tokens, which only
the appliance makes and hashes, live in appliance/credentials.py.)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

CODE_ID_BYTES = 5
CODE_SECRET_BYTES = 9
NONCE_BYTES = 32
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_ALIASES = {"O": "0", "I": "1", "L": "1"}
_KEY_LABEL = b"cairn-enroll-v1"


class MalformedCodeError(ValueError):
    """Text that is not an enrollment code (wrong length, characters, or check byte)."""


@dataclass(frozen=True)
class EnrollmentCode:
    code_id: bytes
    secret: bytes

    @staticmethod
    def generate() -> EnrollmentCode:
        return EnrollmentCode(secrets.token_bytes(CODE_ID_BYTES),
                              secrets.token_bytes(CODE_SECRET_BYTES))

    @property
    def code_id_text(self) -> str:
        return _b32encode(self.code_id)

    def format(self) -> str:
        raw = self.code_id + self.secret
        text = _b32encode(raw + _check_byte(raw))
        return "-".join(text[i:i + 4] for i in range(0, len(text), 4))

    def key(self) -> bytes:
        return derive_code_key(self.secret, self.code_id)

    @staticmethod
    def parse(text: str) -> EnrollmentCode:
        cleaned = "".join(ch for ch in text.upper() if ch not in "- \t")
        cleaned = "".join(_CROCKFORD_ALIASES.get(ch, ch) for ch in cleaned)
        total = CODE_ID_BYTES + CODE_SECRET_BYTES + 1
        if len(cleaned) != (total * 8 + 4) // 5:
            raise MalformedCodeError("an enrollment code has 24 characters "
                                     "(six groups of four)")
        if any(ch not in _CROCKFORD for ch in cleaned):
            raise MalformedCodeError("an enrollment code holds only digits and letters")
        raw = _b32decode(cleaned, total)
        if not hmac.compare_digest(raw[-1:], _check_byte(raw[:-1])):
            raise MalformedCodeError("the enrollment code has a typing mistake "
                                     "(its check character does not match)")
        return EnrollmentCode(raw[:CODE_ID_BYTES], raw[CODE_ID_BYTES:-1])


def parse_code_id(text: str) -> bytes:
    """A code id as sent on the wire (8 base32 characters)."""
    cleaned = "".join(_CROCKFORD_ALIASES.get(ch, ch) for ch in text.upper())
    if len(cleaned) != 8 or any(ch not in _CROCKFORD for ch in cleaned):
        raise MalformedCodeError("a code id has 8 base32 characters")
    return _b32decode(cleaned, CODE_ID_BYTES)


def derive_code_key(secret: bytes, code_id: bytes) -> bytes:
    return hmac.new(secret, _KEY_LABEL + code_id, hashlib.sha256).digest()


def enrollment_proof(key: bytes, nonce: bytes, certificate_fingerprint: bytes) -> bytes:
    """The appliance's answer to a challenge: knows the code and serves this certificate."""
    return hmac.new(key, b"proof" + nonce + certificate_fingerprint, hashlib.sha256).digest()


def enrollment_response(key: bytes, nonce: bytes, certificate_fingerprint: bytes) -> bytes:
    """The device's redemption: knows the code and saw this certificate."""
    return hmac.new(key, b"redeem" + nonce + certificate_fingerprint, hashlib.sha256).digest()


def _check_byte(raw: bytes) -> bytes:
    return hashlib.sha256(b"cairn-code-check" + raw).digest()[:1]


def _b32encode(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    length = (len(raw) * 8 + 4) // 5
    number <<= length * 5 - len(raw) * 8
    return "".join(_CROCKFORD[(number >> (5 * i)) & 31] for i in reversed(range(length)))


def _b32decode(text: str, size: int) -> bytes:
    number = 0
    for ch in text:
        number = number * 32 + _CROCKFORD.index(ch)
    number >>= len(text) * 5 - size * 8
    return number.to_bytes(size, "big")
