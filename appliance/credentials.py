"""Device tokens, as pure functions: made here, shown once to the device, stored hashed.

Device tokens are 32 random bytes (`cairn_dev_` + base64url). The appliance stores only
their SHA-256, so a copy of the database does not let anyone act as a device. Enrollment
codes and their proofs, which both sides compute, are in protocol/enrollment.py.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

TOKEN_PREFIX = "cairn_dev_"
TOKEN_BYTES = 32


def new_device_token() -> str:
    raw = secrets.token_bytes(TOKEN_BYTES)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def token_digest(token: str) -> bytes:
    """What the database keeps of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
