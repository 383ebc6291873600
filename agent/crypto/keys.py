"""A user's keys and the key bundle that carries them between the user's devices.

Keys (all 32 random bytes, made by the user's first device):
- root key: wraps the node key of the user's root folder (and so, transitively, every key);
- content secret: derives convergent block keys (blocks.py), so equal plaintext blocks of one
  user encrypt to equal ciphertext while other users and the appliance learn nothing;
- X25519 private key: opens grants other users made for us and authenticates ours.

Key bundle, format v1 (stored on the appliance, which cannot open it):

    magic "CAIRNKB" ‖ version 0x01 ‖ log2(N) ‖ r ‖ p ‖ salt (16)  = header (28 bytes)
    ‖ nonce (12) ‖ AES-256-GCM(key, root key ‖ content secret ‖ private key) ‖ tag (16)

key = scrypt(passphrase UTF-8, salt, N, r, p, 32 bytes); the associated data is the header
followed by the user's name, so a bundle cannot be passed off as another user's and its KDF
parameters cannot be weakened unnoticed. A wrong passphrase fails authentication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.crypto.aead import KEY_BYTES, open_sealed, random_key, seal
from agent.errors import IntegrityError, WrongPassphraseError

BUNDLE_MAGIC = b"CAIRNKB"
BUNDLE_VERSION = 1
SCRYPT_LOG2_N = 17          # 128 MiB and ~0.5 s here: costly to guess, fine once per join
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HEADER_BYTES = len(BUNDLE_MAGIC) + 1 + 3 + SALT_BYTES
MAX_SCRYPT_LOG2_N = 22      # refuse bundles that would make us allocate gigabytes


@dataclass(frozen=True)
class UserKeys:
    root_key: bytes
    content_secret: bytes
    private_key: bytes

    @staticmethod
    def generate() -> UserKeys:
        private = X25519PrivateKey.generate().private_bytes_raw()
        return UserKeys(random_key(), random_key(), private)

    @property
    def public_key(self) -> bytes:
        return public_key_of(self.private_key)

    def to_bytes(self) -> bytes:
        return self.root_key + self.content_secret + self.private_key

    @staticmethod
    def from_bytes(data: bytes) -> UserKeys:
        if len(data) != 3 * KEY_BYTES:
            raise IntegrityError("user keys have the wrong length")
        return UserKeys(data[:32], data[32:64], data[64:96])


def public_key_of(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def _derive(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=KEY_BYTES, n=2**log2_n, r=r, p=p).derive(
        passphrase.encode("utf-8"))


def seal_bundle(keys: UserKeys, passphrase: str, user: str, *,
                log2_n: int = SCRYPT_LOG2_N) -> bytes:
    salt = os.urandom(SALT_BYTES)
    header = BUNDLE_MAGIC + bytes([BUNDLE_VERSION, log2_n, SCRYPT_R, SCRYPT_P]) + salt
    key = _derive(passphrase, salt, log2_n, SCRYPT_R, SCRYPT_P)
    return header + seal(key, keys.to_bytes(), header + user.encode("utf-8"))


def open_bundle(bundle: bytes, passphrase: str, user: str) -> UserKeys:
    """The keys in BUNDLE. Raises WrongPassphraseError if the passphrase does not open it
    (or the bundle was altered), IntegrityError if it is not a bundle we can read."""
    header = bundle[:HEADER_BYTES]
    if len(bundle) < HEADER_BYTES or not header.startswith(BUNDLE_MAGIC):
        raise IntegrityError("the key bundle on the appliance is not a Cairn key bundle")
    version, log2_n, r, p = header[len(BUNDLE_MAGIC):len(BUNDLE_MAGIC) + 4]
    if version != BUNDLE_VERSION:
        raise IntegrityError(f"key bundle format v{version} is not supported by this "
                             "agent; upgrade it")
    if not (10 <= log2_n <= MAX_SCRYPT_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise IntegrityError("the key bundle has implausible scrypt parameters")
    key = _derive(passphrase, header[-SALT_BYTES:], log2_n, r, p)
    try:
        plain = open_sealed(key, bundle[HEADER_BYTES:], header + user.encode("utf-8"),
                            "the key bundle")
    except IntegrityError:
        raise WrongPassphraseError("wrong passphrase: the key bundle does not open with it "
                                   f"(it is the passphrase {user}'s first device chose)"
                                   ) from None
    return UserKeys.from_bytes(plain)
