"""Pre-signed block URLs (appliance.presign)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from appliance.presign import UrlRefused, sign_block_url, verify_block_url

KEY = b"k" * 32
BLOCK = "ab" * 32
OTHER = "cd" * 32


def parts(url: str) -> tuple[str, str, str, str]:
    split = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(split.query).items()}
    return split.path, query["exp"], query["dev"], query["sig"]


def test_a_signed_url_verifies_until_it_expires() -> None:
    path, exp, dev, sig = parts(sign_block_url(KEY, "PUT", BLOCK, "dev_1", 1000).url)
    assert verify_block_url(KEY, "PUT", path, exp, dev, sig, now=999.0) == 1000
    with pytest.raises(UrlRefused, match="expired"):
        verify_block_url(KEY, "PUT", path, exp, dev, sig, now=1000.5)


@pytest.mark.parametrize("change", ["method", "block", "expiry", "device", "signature",
                                    "key", "missing"])
def test_any_change_is_refused(change: str) -> None:
    path, exp, dev, sig = parts(sign_block_url(KEY, "GET", BLOCK, "dev_1", 1000).url)
    method, key = "GET", KEY
    if change == "method":
        method = "PUT"
    elif change == "block":
        path = "/blocks/" + OTHER
    elif change == "expiry":
        exp = "99999"
    elif change == "device":
        dev = "dev_2"
    elif change == "signature":
        sig = ("0" if sig[0] != "0" else "1") + sig[1:]
    elif change == "key":
        key = b"x" * 32
    else:
        sig = None  # type: ignore[assignment]
    with pytest.raises(UrlRefused):
        verify_block_url(key, method, path, exp, dev, sig, now=0.0)
