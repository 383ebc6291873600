"""A node key wrapped for another user (a grant), format v1.

    0x01 ‖ ephemeral X25519 public key (32) ‖ nonce (12) ‖ AES-256-GCM(K, node key) ‖ tag

    K  = HKDF-SHA256(X25519(e, B) ‖ X25519(a, B), salt = E ‖ A ‖ B, info = "cairn-grant-v1")
    ad = "cairn-grant-v1" ‖ node id (16) ‖ owner name ‖ 0x00 ‖ recipient name

where a/A is the owner's (sharer's) key pair, b/B the recipient's, e/E a fresh ephemeral
pair. The recipient computes the same K from X25519(b, E) and X25519(b, A). The static-static
term authenticates the owner: the appliance, which knows every public key but no private
one, cannot make a grant that opens, so it cannot show a recipient a node it made up and
claim alice shared it. Binding node id and both names stops a grant being replayed for
another node or user. A (the owner's public key) comes from the recipient's pinned copy
(first use), never blindly from the appliance.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.crypto.aead import open_sealed, seal
from agent.crypto.keys import public_key_of
from agent.errors import IntegrityError

FORMAT_VERSION = 1
GRANT_FORMAT = b"cairn-grant-v1"
PUBLIC_KEY_BYTES = 32


def _grant_key(shared_ephemeral: bytes, shared_static: bytes, ephemeral_public: bytes,
               owner_public: bytes, recipient_public: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32,
                salt=ephemeral_public + owner_public + recipient_public,
                info=GRANT_FORMAT).derive(shared_ephemeral + shared_static)


def _ad(node_id: str, owner: str, recipient: str) -> bytes:
    return GRANT_FORMAT + bytes.fromhex(node_id) + owner.encode() + b"\0" + recipient.encode()


def _public(raw: bytes, whose: str) -> X25519PublicKey:
    if len(raw) != PUBLIC_KEY_BYTES:
        raise IntegrityError(f"{whose}'s public key is not an X25519 key")
    return X25519PublicKey.from_public_bytes(raw)


def wrap_for_user(owner_private: bytes, recipient_public: bytes, node_key: bytes, *,
                  node_id: str, owner: str, recipient: str) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    recipient_key = _public(recipient_public, recipient)
    shared_static = X25519PrivateKey.from_private_bytes(owner_private).exchange(recipient_key)
    key = _grant_key(ephemeral.exchange(recipient_key), shared_static, ephemeral_public,
                     public_key_of(owner_private), recipient_public)
    return bytes([FORMAT_VERSION]) + ephemeral_public + seal(
        key, node_key, _ad(node_id, owner, recipient))


def open_grant(recipient_private: bytes, owner_public: bytes, wrapped: bytes, *,
               node_id: str, owner: str, recipient: str) -> bytes:
    """The node key in a grant OWNER made for RECIPIENT (us). Raises IntegrityError if it
    was not made by the holder of OWNER_PUBLIC for this node and us."""
    if len(wrapped) < 1 + PUBLIC_KEY_BYTES or wrapped[0] != FORMAT_VERSION:
        raise IntegrityError(f"the grant for node {node_id} has an unknown format")
    ephemeral_public = wrapped[1:1 + PUBLIC_KEY_BYTES]
    me = X25519PrivateKey.from_private_bytes(recipient_private)
    try:
        shared_ephemeral = me.exchange(_public(ephemeral_public, "the grant's ephemeral"))
        shared_static = me.exchange(_public(owner_public, owner))
    except ValueError:  # an all-zero shared secret: a low-order point
        raise IntegrityError(f"the grant for node {node_id} is malformed") from None
    key = _grant_key(shared_ephemeral, shared_static, ephemeral_public, owner_public,
                     public_key_of(recipient_private))
    return open_sealed(key, wrapped[1 + PUBLIC_KEY_BYTES:], _ad(node_id, owner, recipient),
                       f"the grant for node {node_id} from {owner}")
