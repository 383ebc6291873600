"""Pre-signed block URLs, as pure functions.

A URL grants one device one method on one block until an expiry:

    /blocks/{block_id}?exp=UNIX_SECONDS&dev=DEVICE_ID&sig=HEX

where `sig = HMAC-SHA256(url_key, "METHOD\\n/blocks/ID\\nEXP\\nDEVICE_ID")`. Changing the
method, the block, the expiry or the device breaks the signature; the check uses
`hmac.compare_digest`. The appliance additionally refuses URLs of revoked devices. The key
is 32 random bytes kept in HOME/secrets/url.key (made at first start).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

Method = Literal["GET", "PUT"]
BLOCK_PATH_PREFIX = "/blocks/"


class UrlRefused(Exception):
    """The URL is expired, forged or used for something it was not signed for."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignedBlockUrl:
    url: str
    expires: int


def _signature(key: bytes, method: str, path: str, expires: int, device_id: str) -> str:
    message = f"{method}\n{path}\n{expires}\n{device_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_block_url(key: bytes, method: Method, block_id: str, device_id: str,
                   expires: int) -> SignedBlockUrl:
    path = BLOCK_PATH_PREFIX + block_id
    sig = _signature(key, method, path, expires, device_id)
    query = urlencode({"exp": expires, "dev": device_id, "sig": sig})
    return SignedBlockUrl(f"{path}?{query}", expires)


def verify_block_url(key: bytes, method: str, path: str, expires: str | None,
                     device_id: str | None, signature: str | None, now: float) -> int:
    """Check a request against its URL's signature; returns the expiry. Raises UrlRefused."""
    if expires is None or device_id is None or signature is None:
        raise UrlRefused("the URL is not signed (exp, dev and sig are required)")
    try:
        expiry = int(expires)
    except ValueError:
        raise UrlRefused("the URL's expiry is not a number") from None
    expected = _signature(key, method, path, expiry, device_id)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise UrlRefused("the URL's signature does not match this request")
    if now > expiry:
        raise UrlRefused("the URL has expired; ask for a fresh one")
    return expiry
