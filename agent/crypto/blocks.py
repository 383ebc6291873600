"""Convergent block encryption within one user, format v1.

For a plaintext block P (at most 4 MiB; files are cut into 4 MiB blocks, the last shorter):

    plain hash  H = BLAKE3(P)                                  (32 bytes)
    block key   K = HMAC-SHA256(content secret, "cairn-block-v1" ‖ H)
    ciphertext  C = AES-256-GCM(K, nonce = 12 zero bytes, P, ad = "cairn-block-v1")
    block id      = BLAKE3(C), hex                             (what the appliance sees)

The nonce can be fixed because each key encrypts exactly one plaintext (K is a function of
P): equal blocks of one user give equal ciphertext, which is what deduplication and resumed
uploads need. Without the content secret nobody can confirm a guess of P from C.

A block carries no node binding of its own — the same block may belong to many files. What
binds it is the node's sealed metadata (nodes.py), which lists for every block its id, key,
plain hash and size: a block swapped in from elsewhere has another id, and an id cannot be
swapped in the metadata without the node key. Decryption checks the id, then the AEAD tag,
then the plain hash.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import IntegrityError

BLOCK_SIZE = 4 * 1024 * 1024
BLOCK_FORMAT = b"cairn-block-v1"
ZERO_NONCE = bytes(12)
TAG_BYTES = 16
REF_FORMAT = struct.Struct(">I32s32s32s")     # plain size, block id, key, plain hash


@dataclass(frozen=True)
class BlockRef:
    """What a node's metadata records about one block (and what the appliance may not
    know except `block_id` and `cipher_size`)."""

    plain_size: int
    block_id: bytes          # BLAKE3 of the ciphertext
    key: bytes
    plain_hash: bytes

    @property
    def id_hex(self) -> str:
        return self.block_id.hex()

    @property
    def cipher_size(self) -> int:
        return self.plain_size + TAG_BYTES


def block_key(content_secret: bytes, plain_hash: bytes) -> bytes:
    return hmac.new(content_secret, BLOCK_FORMAT + plain_hash, hashlib.sha256).digest()


def plain_hash_of(plaintext: bytes | memoryview) -> bytes:
    return blake3.blake3(plaintext, max_threads=blake3.blake3.AUTO).digest() \
        if len(plaintext) >= 1 << 20 else blake3.blake3(plaintext).digest()


def encrypt_block(content_secret: bytes, plaintext: bytes) -> tuple[BlockRef, bytes]:
    """The block's reference and its ciphertext. Empty blocks do not exist (an empty file
    has no blocks)."""
    _check_size(plaintext)
    plain_hash = plain_hash_of(plaintext)
    key = block_key(content_secret, plain_hash)
    ciphertext = AESGCM(key).encrypt(ZERO_NONCE, plaintext, BLOCK_FORMAT)
    return BlockRef(len(plaintext), plain_hash_of(ciphertext), key, plain_hash), ciphertext


def encrypt_block_into(content_secret: bytes, plaintext: bytes | memoryview,
                       out: memoryview) -> tuple[BlockRef, memoryview]:
    """`encrypt_block` into OUT (at least `len(plaintext) + TAG_BYTES` bytes): the
    reference, and the part of OUT that holds the ciphertext."""
    _check_size(plaintext)
    plain_hash = plain_hash_of(plaintext)
    key = block_key(content_secret, plain_hash)
    ciphertext = out[:len(plaintext) + TAG_BYTES]
    AESGCM(key).encrypt_into(ZERO_NONCE, plaintext, BLOCK_FORMAT, ciphertext)
    return BlockRef(len(plaintext), plain_hash_of(ciphertext), key, plain_hash), ciphertext


def encrypt_again_into(ref: BlockRef, plaintext: bytes | memoryview,
                       out: memoryview) -> memoryview | None:
    """The ciphertext of REF's block, into OUT, if PLAINTEXT is still that block's (its
    plain hash checked: a key is never used on other bytes); None if it is not. The id is
    not hashed again: the same key and plaintext give the same ciphertext, and the
    appliance checks every block it stores against its id."""
    if len(plaintext) != ref.plain_size or not hmac.compare_digest(
            plain_hash_of(plaintext), ref.plain_hash):
        return None
    ciphertext = out[:ref.cipher_size]
    AESGCM(ref.key).encrypt_into(ZERO_NONCE, plaintext, BLOCK_FORMAT, ciphertext)
    return ciphertext


def _check_size(plaintext: bytes | memoryview) -> None:
    if not 0 < len(plaintext) <= BLOCK_SIZE:
        raise ValueError(f"a block has 1 to {BLOCK_SIZE} bytes, not {len(plaintext)}")


def decrypt_block(ref: BlockRef, ciphertext: bytes) -> bytes:
    """The plaintext of a downloaded block, after checking it is exactly the block REF
    names. Raises IntegrityError otherwise."""
    _check_ciphertext(ref, ciphertext)
    try:
        plaintext = AESGCM(ref.key).decrypt(ZERO_NONCE, ciphertext, BLOCK_FORMAT)
    except InvalidTag:
        raise IntegrityError(f"block {ref.id_hex[:16]} failed authentication") from None
    _check_plaintext(ref, plaintext)
    return plaintext


def decrypt_block_into(ref: BlockRef, ciphertext: bytes | memoryview,
                       out: memoryview) -> memoryview:
    """`decrypt_block` into OUT (at least `ref.plain_size` bytes): the part of OUT that
    holds the plaintext. Nothing in OUT may be used if this raises."""
    _check_ciphertext(ref, ciphertext)
    plaintext = out[:ref.plain_size]
    try:
        AESGCM(ref.key).decrypt_into(ZERO_NONCE, ciphertext, BLOCK_FORMAT, plaintext)
    except InvalidTag:
        raise IntegrityError(f"block {ref.id_hex[:16]} failed authentication") from None
    _check_plaintext(ref, plaintext)
    return plaintext


def _check_ciphertext(ref: BlockRef, ciphertext: bytes | memoryview) -> None:
    if len(ciphertext) != ref.cipher_size:
        raise IntegrityError(f"block {ref.id_hex[:16]} has {len(ciphertext)} bytes, "
                             f"expected {ref.cipher_size}")
    if not hmac.compare_digest(plain_hash_of(ciphertext), ref.block_id):
        raise IntegrityError(f"block {ref.id_hex[:16]} does not match its id: corrupted "
                             "or substituted on the appliance")


def _check_plaintext(ref: BlockRef, plaintext: bytes | memoryview) -> None:
    if not hmac.compare_digest(plain_hash_of(plaintext), ref.plain_hash):
        raise IntegrityError(f"block {ref.id_hex[:16]} decrypts to other content than "
                             "its metadata records")


def pack_refs(refs: list[BlockRef]) -> bytes:
    return b"".join(REF_FORMAT.pack(r.plain_size, r.block_id, r.key, r.plain_hash)
                    for r in refs)


def unpack_refs(data: bytes) -> list[BlockRef]:
    if len(data) % REF_FORMAT.size:
        raise IntegrityError("a block table has a partial entry")
    refs = []
    for plain_size, block_id, key, plain_hash in REF_FORMAT.iter_unpack(data):
        if not 0 < plain_size <= BLOCK_SIZE:
            raise IntegrityError("a block table entry has an impossible size")
        refs.append(BlockRef(plain_size, block_id, key, plain_hash))
    return refs
