"""Properties of the agent's end-to-end encryption (agent/crypto), pure functions on bytes:
round trips, convergence within one user only, and that any flipped byte, any other node,
parent, kind, owner or recipient, and any wrong passphrase is refused."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.crypto.blocks import (
    BLOCK_SIZE,
    TAG_BYTES,
    BlockRef,
    decrypt_block,
    decrypt_block_into,
    encrypt_again_into,
    encrypt_block,
    encrypt_block_into,
    pack_refs,
    unpack_refs,
)
from agent.crypto.grants import open_grant, wrap_for_user
from agent.crypto.keys import UserKeys, open_bundle, seal_bundle
from agent.crypto.nodes import (
    NodeMeta,
    check_name,
    folder_node_id,
    open_metadata,
    seal_metadata,
    unwrap_key,
    wrap_key,
)
from agent.errors import IntegrityError, UsageError, WrongPassphraseError
from protocol.ids import is_node_id

FAST_SCRYPT = 10          # 2**10: fast enough for unit tests; the real default is 2**17

secrets_ = st.binary(min_size=32, max_size=32)
node_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
plaintexts = st.binary(min_size=1, max_size=20_000)
names = st.text(st.characters(codec="utf-8", exclude_characters="/\0"),
                min_size=1, max_size=40).filter(lambda n: n not in (".", ".."))
users = st.sampled_from(["alice", "bob", "carol", "dave"])


def flip(data: bytes, index: int, mask: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]


masks = st.integers(1, 255)
indexes = st.integers(0, 10**6)


# --- blocks ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(secrets_, plaintexts)
def test_block_round_trip_and_convergence(secret: bytes, plaintext: bytes) -> None:
    ref, ciphertext = encrypt_block(secret, plaintext)
    assert decrypt_block(ref, ciphertext) == plaintext
    assert ref.plain_size == len(plaintext) and len(ciphertext) == ref.cipher_size
    assert plaintext not in ciphertext or len(plaintext) < 8
    again, same = encrypt_block(secret, plaintext)          # same user: same ciphertext
    assert (again, same) == (ref, ciphertext)
    other_ref, other = encrypt_block(os.urandom(32), plaintext)   # another user: not
    assert other != ciphertext and other_ref.block_id != ref.block_id


@settings(max_examples=60, deadline=None)
@given(secrets_, plaintexts, indexes, masks)
def test_a_flipped_block_byte_is_rejected(secret: bytes, plaintext: bytes, index: int,
                                          mask: int) -> None:
    ref, ciphertext = encrypt_block(secret, plaintext)
    with pytest.raises(IntegrityError):
        decrypt_block(ref, flip(ciphertext, index, mask))


@settings(max_examples=30, deadline=None)
@given(secrets_, plaintexts, plaintexts)
def test_another_block_under_a_ref_is_rejected(secret: bytes, first: bytes,
                                               second: bytes) -> None:
    ref, _ = encrypt_block(secret, first)
    other_ref, other = encrypt_block(secret, second)
    if other_ref.block_id != ref.block_id:
        with pytest.raises(IntegrityError):
            decrypt_block(ref, other)


@settings(max_examples=40, deadline=None)
@given(secrets_, plaintexts, plaintexts, indexes, masks)
def test_the_in_place_variants_are_the_same_crypto(secret: bytes, plaintext: bytes,
                                                   other: bytes, index: int, mask: int) -> None:
    """What uploads and downloads of big files use (into reused buffers): the same
    references and bytes as the plain functions, the same refusals."""
    ref, ciphertext = encrypt_block(secret, plaintext)
    out = memoryview(bytearray(len(plaintext) + TAG_BYTES + 7))   # buffers may be bigger
    assert encrypt_block_into(secret, plaintext, out) == (ref, ciphertext)
    again = encrypt_again_into(ref, plaintext, memoryview(bytearray(ref.cipher_size)))
    assert again is not None and bytes(again) == ciphertext
    if other != plaintext:   # a key is never used on other bytes
        assert encrypt_again_into(ref, other, memoryview(bytearray(BLOCK_SIZE))) is None
    plain_out = memoryview(bytearray(len(plaintext) + 3))
    assert bytes(decrypt_block_into(ref, ciphertext, plain_out)) == plaintext
    with pytest.raises(IntegrityError):
        decrypt_block_into(ref, flip(ciphertext, index, mask), plain_out)
    with pytest.raises(IntegrityError):
        decrypt_block_into(ref, ciphertext[:-1], plain_out)


def test_block_sizes_are_bounded() -> None:
    for size in (0, BLOCK_SIZE + 1):
        with pytest.raises(ValueError):
            encrypt_block(os.urandom(32), bytes(size))
    ref, ciphertext = encrypt_block(os.urandom(32), bytes(BLOCK_SIZE))
    assert decrypt_block(ref, ciphertext) == bytes(BLOCK_SIZE)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.builds(BlockRef, st.integers(1, BLOCK_SIZE), secrets_, secrets_,
                          secrets_), max_size=5))
def test_block_table_round_trip(refs: list[BlockRef]) -> None:
    packed = pack_refs(refs)
    assert unpack_refs(packed) == refs
    if packed:
        with pytest.raises(IntegrityError):
            unpack_refs(packed[:-1])


# --- node metadata and wrapped keys ------------------------------------------------------

def _meta(name: str, secret: bytes, blocks: list[bytes], mode: int, mtime_ns: int
          ) -> NodeMeta:
    refs = tuple(encrypt_block(secret, block)[0] for block in blocks)
    return NodeMeta(name=name, kind="file", size=sum(len(b) for b in blocks),
                    mtime_ns=mtime_ns, mode=mode, blocks=refs)


metas = st.builds(_meta, names, secrets_, st.lists(plaintexts, max_size=3),
                  st.integers(0, 0o7777), st.integers(0, 2**63 - 1))


@settings(max_examples=40, deadline=None)
@given(secrets_, node_ids, metas)
def test_metadata_round_trip(key: bytes, node_id: str, meta: NodeMeta) -> None:
    assert open_metadata(key, node_id, "file", seal_metadata(key, node_id, meta)) == meta
    folder = NodeMeta(name=meta.name, kind="dir")
    assert open_metadata(key, node_id, "dir", seal_metadata(key, node_id, folder)) == folder


@settings(max_examples=60, deadline=None)
@given(secrets_, node_ids, metas, indexes, masks)
def test_flipped_metadata_is_rejected(key: bytes, node_id: str, meta: NodeMeta, index: int,
                                      mask: int) -> None:
    sealed = seal_metadata(key, node_id, meta)
    with pytest.raises(IntegrityError):
        open_metadata(key, node_id, "file", flip(sealed, index, mask))


@settings(max_examples=40, deadline=None)
@given(secrets_, node_ids, node_ids, metas)
def test_metadata_under_another_node_or_kind_is_rejected(key: bytes, node_id: str,
                                                         other_id: str, meta: NodeMeta
                                                         ) -> None:
    sealed = seal_metadata(key, node_id, meta)
    if other_id != node_id:
        with pytest.raises(IntegrityError):
            open_metadata(key, other_id, "file", sealed)
    with pytest.raises(IntegrityError):
        open_metadata(key, node_id, "dir", sealed)
    with pytest.raises(IntegrityError):
        open_metadata(os.urandom(32), node_id, "file", sealed)


@settings(max_examples=60, deadline=None)
@given(secrets_, secrets_, node_ids, node_ids, node_ids, indexes, masks)
def test_wrapped_keys(parent_key: bytes, node_key: bytes, node_id: str, parent_id: str,
                      other_parent: str, index: int, mask: int) -> None:
    wrapped = wrap_key(parent_key, node_key, node_id, parent_id)
    assert unwrap_key(parent_key, wrapped, node_id, parent_id) == node_key
    with pytest.raises(IntegrityError):
        unwrap_key(parent_key, flip(wrapped, index, mask), node_id, parent_id)
    if other_parent != parent_id:
        with pytest.raises(IntegrityError):       # moved under another parent
            unwrap_key(parent_key, wrapped, node_id, other_parent)
    if other_parent != node_id:
        with pytest.raises(IntegrityError):       # shown as another node
            unwrap_key(parent_key, wrapped, other_parent, parent_id)
    if parent_id != "00" * 16:   # a root's "parent" in the associated data
        with pytest.raises(IntegrityError):       # a non-root key passed off as a root's
            unwrap_key(parent_key, wrapped, node_id, None)


@given(secrets_, secrets_, node_ids, node_ids, names, names, st.integers(0, 2**32 - 1))
def test_folder_ids_are_one_per_secret_parent_name_and_attempt(
        secret: bytes, other_secret: bytes, parent_id: str, other_parent: str, name: str,
        other_name: str, attempt: int) -> None:
    made = folder_node_id(secret, parent_id, name, attempt)
    assert made == folder_node_id(secret, parent_id, name, attempt)     # on every device
    assert is_node_id(made)
    assert folder_node_id(secret, parent_id, name, attempt ^ 1) != made
    if other_secret != secret:                  # another user's
        assert folder_node_id(other_secret, parent_id, name, attempt) != made
    if other_parent != parent_id:
        assert folder_node_id(secret, other_parent, name, attempt) != made
    if other_name != name:
        assert folder_node_id(secret, parent_id, other_name, attempt) != made


# --- grants ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(secrets_, node_ids, node_ids, users, users, indexes, masks)
def test_grants(node_key: bytes, node_id: str, other_node: str, owner: str, recipient: str,
                index: int, mask: int) -> None:
    alice, bob, mallory = UserKeys.generate(), UserKeys.generate(), UserKeys.generate()
    grant = wrap_for_user(alice.private_key, bob.public_key, node_key, node_id=node_id,
                          owner=owner, recipient=recipient)

    def opened(**changes: object) -> bytes:
        args: dict[str, object] = {"recipient_private": bob.private_key,
                                   "owner_public": alice.public_key, "wrapped": grant,
                                   "node_id": node_id, "owner": owner,
                                   "recipient": recipient}
        args.update(changes)
        return open_grant(**args)  # type: ignore[arg-type]

    assert opened() == node_key
    refusals: list[dict[str, object]] = [
        {"wrapped": flip(grant, index, mask)},
        {"owner_public": mallory.public_key},          # not made by the pinned owner
        {"recipient_private": mallory.private_key},    # not for this recipient's keys
        {"owner": owner + "x"}, {"recipient": recipient + "x"},
    ]
    if other_node != node_id:
        refusals.append({"node_id": other_node})       # replayed for another node
    for changes in refusals:
        with pytest.raises(IntegrityError):
            opened(**changes)


def test_a_grant_forged_without_the_owners_private_key_is_rejected() -> None:
    alice, bob, appliance = UserKeys.generate(), UserKeys.generate(), UserKeys.generate()
    node_id = os.urandom(16).hex()
    forged = wrap_for_user(appliance.private_key, bob.public_key, os.urandom(32),
                           node_id=node_id, owner="alice", recipient="bob")
    with pytest.raises(IntegrityError):
        open_grant(bob.private_key, alice.public_key, forged, node_id=node_id,
                   owner="alice", recipient="bob")


# --- the key bundle ----------------------------------------------------------------------

@settings(max_examples=8, deadline=None)
@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30), users,
       indexes, masks)
def test_key_bundle(passphrase: str, wrong: str, user: str, index: int, mask: int) -> None:
    keys = UserKeys.generate()
    bundle = seal_bundle(keys, passphrase, user, log2_n=FAST_SCRYPT)
    assert open_bundle(bundle, passphrase, user) == keys
    if wrong != passphrase:
        with pytest.raises(WrongPassphraseError):
            open_bundle(bundle, wrong, user)
    with pytest.raises(WrongPassphraseError):       # another user's bundle
        open_bundle(bundle, passphrase, user + "x")
    with pytest.raises((WrongPassphraseError, IntegrityError)):
        open_bundle(flip(bundle, index, mask), passphrase, user)


def test_key_bundle_refuses_costly_or_truncated_headers() -> None:
    bundle = bytearray(seal_bundle(UserKeys.generate(), "pass phrase", "alice",
                                   log2_n=FAST_SCRYPT))
    assert open_bundle(bytes(bundle), "pass phrase", "alice")
    bundle[8] = 40          # log2(N) = 40 would allocate terabytes
    with pytest.raises(IntegrityError, match="implausible"):
        open_bundle(bytes(bundle), "pass phrase", "alice")
    with pytest.raises(IntegrityError):
        open_bundle(bytes(bundle[:20]), "pass phrase", "alice")


# --- names -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "/", "../etc", "x\0y", "\0",
                                 "é" * 200])
def test_unusable_names_are_refused(bad: str) -> None:
    with pytest.raises(UsageError):
        check_name(bad)
    with pytest.raises(UsageError):
        seal_metadata(os.urandom(32), os.urandom(16).hex(), NodeMeta(name=bad, kind="dir"))


@settings(max_examples=40, deadline=None)
@given(names)
def test_ordinary_names_are_kept(name: str) -> None:
    if len(name.encode("utf-8")) <= 255:
        assert check_name(name) == name
