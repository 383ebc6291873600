"""The user's keys sealed to a new device's X25519 wrap key (pure), format v1.

    0x01 ‖ ephemeral X25519 public key E (32) ‖ nonce (12) ‖ AES-256-GCM(K, keys) ‖ tag

    K  = HKDF-SHA256(X25519(e, W), salt = E ‖ W, info = "cairn-pair-keys-v1")
    ad = "cairn-pair-keys-v1" ‖ appliance id ‖ 0x00 ‖ user ‖ 0x00 ‖ device id

where W is the wrap key the new device put in its request (its private half never leaves
that device's memory) and `keys` are UserKeys.to_bytes(): the same root key, content secret
and X25519 private key the passphrase bundle carries. Only the holder of W's private key
opens it; binding the appliance, the user and the new device id means a sealed blob cannot
be handed to another device or passed off as another user's keys. Who sealed it is not
authenticated here: the new device takes it only from the approval that came over mutual
TLS with the hello's certificate, and checks the keys' public half against the appliance.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.crypto.aead import open_sealed, seal
from agent.crypto.keys import UserKeys
from agent.errors import IntegrityError

FORMAT_VERSION = 1
LABEL = b"cairn-pair-keys-v1"
PUBLIC_KEY_BYTES = 32


def _key(shared: bytes, ephemeral_public: bytes, wrap_public: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + wrap_public,
                info=LABEL).derive(shared)


def _ad(appliance_id: str, user: str, device_id: str) -> bytes:
    return LABEL + appliance_id.encode() + b"\0" + user.encode() + b"\0" + device_id.encode()


def seal_keys(keys: UserKeys, wrap_public: bytes, *, appliance_id: str, user: str,
              device_id: str) -> bytes:
    """KEYS sealed to WRAP_PUBLIC (raw X25519) for DEVICE_ID of USER on APPLIANCE_ID."""
    if len(wrap_public) != PUBLIC_KEY_BYTES:
        raise IntegrityError("the request's wrap key is not an X25519 key")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(wrap_public))
    except ValueError:   # a low-order point: an all-zero secret
        raise IntegrityError("the request's wrap key is not usable") from None
    return bytes([FORMAT_VERSION]) + ephemeral_public + seal(
        _key(shared, ephemeral_public, wrap_public), keys.to_bytes(),
        _ad(appliance_id, user, device_id))


def open_keys(wrap_private: X25519PrivateKey, sealed: bytes, *, appliance_id: str,
              user: str, device_id: str) -> UserKeys:
    """The keys in SEALED. Raises IntegrityError if they were not sealed to our wrap key
    for this device, user and appliance (or were altered)."""
    if len(sealed) < 1 + PUBLIC_KEY_BYTES or sealed[0] != FORMAT_VERSION:
        raise IntegrityError("the sealed keys have an unknown format")
    ephemeral_public = sealed[1:1 + PUBLIC_KEY_BYTES]
    try:
        shared = wrap_private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError:
        raise IntegrityError("the sealed keys are malformed") from None
    wrap_public = wrap_private.public_key().public_bytes_raw()
    plain = open_sealed(_key(shared, ephemeral_public, wrap_public),
                        sealed[1 + PUBLIC_KEY_BYTES:], _ad(appliance_id, user, device_id),
                        "the sealed keys")
    return UserKeys.from_bytes(plain)
