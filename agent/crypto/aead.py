"""AES-256-GCM with the failure translated once: every open that fails (wrong key, flipped
bit, other associated data) is an IntegrityError naming what was being opened."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import IntegrityError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def random_key() -> bytes:
    return os.urandom(KEY_BYTES)


def seal(key: bytes, plaintext: bytes, associated: bytes, nonce: bytes | None = None
         ) -> bytes:
    """nonce ‖ ciphertext ‖ tag, with a random nonce unless one is given."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes, what: str) -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise IntegrityError(f"{what} is truncated")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise IntegrityError(f"{what} failed authentication: tampered with, corrupted, "
                             "or not where it belongs") from None
