"""Node and block ids, and the base64 that binary fields travel in.

A node id is 16 random bytes as 32 lowercase hex digits, chosen by the appliance or (for
safe retries) by the client. A block id is the BLAKE3 hash of the block's ciphertext as 64
lowercase hex digits. Binary values in JSON bodies (ciphertext, wrapped keys, bundles) are
standard base64 with padding.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

NODE_ID_PATTERN = r"^[0-9a-f]{32}$"
BLOCK_ID_PATTERN = r"^[0-9a-f]{64}$"
NODE_ID = re.compile(NODE_ID_PATTERN)
BLOCK_ID = re.compile(BLOCK_ID_PATTERN)
NODE_ID_BYTES = 16


def is_node_id(text: str) -> bool:
    return NODE_ID.fullmatch(text) is not None


def is_block_id(text: str) -> bool:
    return BLOCK_ID.fullmatch(text) is not None


def new_node_id() -> str:
    """A fresh client-chosen node id (a retried create with it is answered idempotently)."""
    return secrets.token_hex(NODE_ID_BYTES)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """The bytes of a base64 field. Raises ValueError for anything but strict base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64: {exc}") from None
