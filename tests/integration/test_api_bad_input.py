"""Hostile and broken input against a real `cairnd serve`: forged, expired and re-targeted
block URLs; blocks whose bytes are not their id; oversized and malformed bodies; unknown
and path-like ids; path-like names where the appliance stores opaque bytes; Range headers.
Every refusal is a 4xx with `{"error": {"code", "message"}}`, never a 5xx.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx
import pytest
from api_helpers import (
    Device,
    add_user,
    b64,
    block,
    create_file,
    download,
    enroll,
    make_root,
    new_code,
    pinned_context,
    upload,
)
from cairnd_helpers import run_cairnd_in_process, serving

from appliance.config import ApplianceConfig, write_config
from appliance.home import init_home
from appliance.presign import sign_block_url
from protocol.ids import NODE_ID_PATTERN
from protocol.limits import MAX_BLOCK_BYTES

MiB = 1024 * 1024


@dataclass
class App:
    config: ApplianceConfig
    url: str
    alice: Device
    bob: Device
    anonymous: httpx.Client       # pinned TLS, no token: block URLs need none
    root: str

    def url_key(self) -> bytes:
        return (self.config.home / "secrets" / "url.key").read_bytes()


@contextmanager
def running(base: Path, **settings: Any) -> Iterator[App]:
    """A fresh appliance (config.toml changed by `settings`) with users alice and bob."""
    config = init_home(base / "appliance", disks=4, data_shards=2, parity_shards=1,
                       reserve_free_bytes=0, listen="127.0.0.1:0")
    if settings:
        config = replace(config, **settings)
        write_config(config)
    with serving(config.home) as server:
        cert = config.tls_certificate
        alice = enroll(server.url, cert, add_user(config.home, "alice"))
        bob = enroll(server.url, cert, add_user(config.home, "bob"))
        anonymous = httpx.Client(base_url=server.url, verify=pinned_context(cert), timeout=60)
        try:
            yield App(config, server.url, alice, bob, anonymous, make_root(alice)["id"])
        finally:
            for client in (alice, bob, anonymous):
                client.close()
        assert "Traceback" not in server.stderr(), server.stderr()[-5000:]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    with running(tmp_path_factory.mktemp("bad-input")) as live:
        yield live


def error_of(response: httpx.Response, status: int, code: str | None = None
             ) -> dict[str, Any]:
    """Assert the status and the error body's shape; return the error."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str), body
    assert isinstance(body["error"]["message"], str), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


def uploading(app: App, data: bytes) -> tuple[str, str]:
    """A new file of alice waiting for one block: (node id, its upload URL)."""
    created = create_file(app.alice, app.root, [data])
    return created["node"]["id"], created["upload"][0]["url"]


def uploaded(app: App, data: bytes) -> tuple[str, str]:
    """A new file of alice with one stored block: (node id, its download URL)."""
    created = create_file(app.alice, app.root, [data])
    upload(app.alice, created["upload"], [data])
    node_id = created["node"]["id"]
    return node_id, app.alice.ok(app.alice.get(f"/files/{node_id}"))["blocks"][0]["url"]


def status_of(app: App, node_id: str) -> str:
    return str(app.alice.ok(app.alice.get(f"/files/{node_id}"))["node"]["status"])


def changed(url: str, path: str | None = None, **query: str | None) -> str:
    """`url` with its path and query parameters replaced (None drops one)."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    for name, value in query.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    return f"{path or parts.path}?{urlencode(params)}"


# --- pre-signed URLs -----------------------------------------------------------------------

def test_tampered_urls_are_refused(app: App) -> None:
    data = os.urandom(1500)
    _, get_url = uploaded(app, data)
    pending_id, put_url = uploading(app, os.urandom(1500))
    query = dict(parse_qsl(urlsplit(get_url).query))
    flipped = query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")
    tampered = {
        "signature altered": changed(get_url, sig=flipped),
        "expiry extended": changed(get_url, exp=str(int(query["exp"]) + 3600)),
        "expiry in the past": changed(get_url, exp=str(int(time.time()) - 60)),
        "expiry not a number": changed(get_url, exp="tomorrow"),
        "another device": changed(get_url, dev=app.bob.device_id),
        "signature not hex": changed(get_url, sig="é" * 64),
        "no signature": changed(get_url, sig=None),
        "no expiry": changed(get_url, exp=None),
        "no device": changed(get_url, dev=None),
        "nothing": urlsplit(get_url).path,
    }
    for what, url in tampered.items():
        refused = app.anonymous.get(url)
        assert refused.status_code == 403, (what, refused.text)
        error_of(refused, 403, "forbidden")
    assert app.anonymous.get(get_url).content == data  # the genuine URL still works

    put_query = dict(parse_qsl(urlsplit(put_url).query))
    for url in (changed(put_url, sig=put_query["sig"][::-1]),
                changed(put_url, exp=str(int(put_query["exp"]) + 1)),
                changed(put_url, dev=app.bob.device_id)):
        error_of(app.anonymous.put(url, content=b"x"), 403, "forbidden")
    assert status_of(app, pending_id) == "uploading"


def test_urls_are_bound_to_their_method_and_block(app: App) -> None:
    data_a, data_b = os.urandom(1200), os.urandom(1300)
    _, get_a = uploaded(app, data_a)
    _, get_b = uploaded(app, data_b)
    pending_id, put_c = uploading(app, data_c := os.urandom(1400))
    path_of = {url: urlsplit(url).path for url in (get_a, get_b, put_c)}

    error_of(app.anonymous.put(get_a, content=data_a), 403, "forbidden")  # GET URL, PUT
    error_of(app.anonymous.get(put_c), 403, "forbidden")                   # PUT URL, GET
    error_of(app.anonymous.get(changed(get_a, path=path_of[get_b])), 403, "forbidden")
    error_of(app.anonymous.put(changed(put_c, path=path_of[get_a]), content=data_a), 403)
    assert status_of(app, pending_id) == "uploading"
    assert app.anonymous.put(put_c, content=data_c).status_code == 200
    assert status_of(app, pending_id) == "uploaded"


def test_expired_urls_are_refused(app: App) -> None:
    """Signed with the appliance's own key, so only the expiry is wrong."""
    data = os.urandom(1000)
    block_id = block(data)["id"]
    uploaded(app, data)
    key, device = app.url_key(), app.alice.device_id
    expired = sign_block_url(key, "GET", block_id, device, int(time.time()) - 5).url
    assert "expired" in error_of(app.anonymous.get(expired), 403, "forbidden")["message"]
    valid = sign_block_url(key, "GET", block_id, device, int(time.time()) + 60).url
    assert app.anonymous.get(valid).content == data  # the same forgery, unexpired, works


def test_urls_expire_after_the_configured_lifetime(tmp_path: Path) -> None:
    with running(tmp_path, url_lifetime_s=1.0) as short:
        data, pending = os.urandom(1000), os.urandom(1000)
        done_id, get_url = uploaded(short, data)
        pending_id, put_url = uploading(short, pending)
        expiry = max(int(dict(parse_qsl(urlsplit(u).query))["exp"]) for u in (get_url, put_url))
        time.sleep(max(0.0, expiry + 1.1 - time.time()))

        for refused in (short.anonymous.get(get_url),
                        short.anonymous.put(put_url, content=pending)):
            assert "expired" in error_of(refused, 403, "forbidden")["message"]
        assert status_of(short, pending_id) == "uploading"
        # Fresh URLs from the node work again.
        assert download(short.alice, done_id) == data
        fresh = short.alice.ok(short.alice.get(f"/files/{pending_id}/presigned-url"))
        assert fresh["method"] == "PUT"
        assert short.anonymous.put(fresh["blocks"][0]["url"], content=pending).status_code \
            == 200
        assert status_of(short, pending_id) == "uploaded"


def test_signed_urls_for_path_like_block_ids_touch_no_file(app: App) -> None:
    """Even with a valid signature (made with the appliance's key), a block id that is not
    64 hex digits is refused before the block store sees it."""
    before = files_around(app.config.home)
    key, device, exp = app.url_key(), app.alice.device_id, int(time.time()) + 60
    for block_id in ("../../../escaped", "..", "0" * 63, "A" * 64, "0" * 64 + "/..", "%2e%2e"):
        for method in ("GET", "PUT"):
            url = sign_block_url(key, method, block_id, device, exp).url
            query = url.partition("?")[2]
            raw = "/blocks/" + quote(block_id, safe="") + "?" + query
            # A refusal may come before the body is read, and the server then closes the
            # connection: a fresh one per request, or the next one races that close.
            response = app.anonymous.request(method, raw, content=b"payload",
                                             headers={"Connection": "close"})
            assert 400 <= response.status_code < 500, (block_id, method, response.text)
            error_of(response, response.status_code)
    missing = sign_block_url(key, "GET", "0" * 64, device, exp).url  # well-formed, absent
    error_of(app.anonymous.get(missing), 404, "not_found")
    assert files_around(app.config.home) == before


# --- blocks --------------------------------------------------------------------------------

def test_a_block_whose_bytes_do_not_match_its_id_is_refused(app: App) -> None:
    data = os.urandom(5000)
    node_id, put_url = uploading(app, data)
    for wrong in (os.urandom(5000), data[:-1], data + b"\0"):
        error_of(app.anonymous.put(put_url, content=wrong), 400, "block_id_mismatch")
    error_of(app.anonymous.put(put_url, content=b""), 400, "bad_request")
    assert status_of(app, node_id) == "uploading"
    assert app.anonymous.put(put_url, content=data).status_code == 200
    assert status_of(app, node_id) == "uploaded"
    # Stored already: a wrong body is still refused, and the stored bytes are untouched.
    error_of(app.anonymous.put(put_url, content=os.urandom(5000)), 400, "block_id_mismatch")
    assert download(app.alice, node_id) == data

    small = os.urandom(300)
    batch_node, _ = uploading(app, small)
    result = app.alice.ok(app.alice.post("/blocks", json={"blocks": [
        {"id": block(small)["id"], "data": b64(os.urandom(300))}]}))["results"][0]
    assert not result["ok"] and result["error"]["code"] == "block_id_mismatch", result
    assert status_of(app, batch_node) == "uploading"


def _chunks(total: int, size: int = MiB) -> Iterator[bytes]:
    while total > 0:
        yield b"\0" * min(size, total)
        total -= size


def test_oversized_block_bodies_are_refused(app: App) -> None:
    node_id, put_url = uploading(app, os.urandom(1000))
    too_big = MAX_BLOCK_BYTES + 1
    error_of(app.anonymous.put(put_url, content=b"\0" * too_big), 413, "payload_too_large")
    streamed = app.anonymous.put(put_url, content=_chunks(too_big))  # no Content-Length
    assert "content-length" not in streamed.request.headers
    error_of(streamed, 413, "payload_too_large")
    assert status_of(app, node_id) == "uploading"

    largest = os.urandom(MAX_BLOCK_BYTES)  # exactly the limit is a valid block
    full_id, full_url = uploading(app, largest)
    assert app.anonymous.put(full_url, content=largest).status_code == 200
    assert status_of(app, full_id) == "uploaded"


# --- JSON bodies ---------------------------------------------------------------------------

def _create(app: App, **fields: Any) -> dict[str, Any]:
    body = {"parent": app.root, "kind": "file", "metadata": b64(b"m"),
            "wrapped_key": b64(b"k"), "size": 0}
    body.update(fields)
    return body


def test_oversized_json_is_refused(app: App) -> None:
    huge = b64(os.urandom(6 * MiB + 1000))  # over 8 MiB as base64
    error_of(app.alice.post("/files", json=_create(app, metadata=huge)), 413,
             "payload_too_large")
    encoded = httpx.Request("POST", "/", json=_create(app, metadata=huge)).content
    streamed = app.alice.post("/files", content=_chunks_of(encoded),
                              headers={"content-type": "application/json"})
    error_of(streamed, 413, "payload_too_large")
    # Under the body limit but over the field's: a validation error, not a 5xx.
    error_of(app.alice.post("/files", json=_create(app, metadata=b64(os.urandom(2_300_000)))),
             422, "invalid_request")
    error_of(app.alice.post("/files", json=_create(app, metadata=b64(os.urandom(2_200_000)))),
             400, "bad_request")  # decoded, over the 2 MiB metadata limit


def _chunks_of(data: bytes, size: int = MiB) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("body", [
    b"{not json", b"{", b'{"parent": ', b"\xff\xfe\xfd", b"[]", b"null", b"42", b'"text"',
    b"{}", b'{"parent": null}', b'{"parent": null, "kind": "dir", "metadata": 5, '
    b'"wrapped_key": "a2V5"}', b'{"parent": null, "kind": "symlink", "metadata": "", '
    b'"wrapped_key": "a2V5"}', b'{"parent": null, "kind": "dir", "metadata": "", '
    b'"wrapped_key": "a2V5", "surprise": 1}', b'{"parent": "../../etc", "kind": "dir", '
    b'"metadata": "", "wrapped_key": "a2V5"}',
], ids=lambda body: body[:24].decode("utf-8", "replace"))
def test_malformed_json_is_an_invalid_request(app: App, body: bytes) -> None:
    response = app.alice.post("/files", content=body,
                              headers={"content-type": "application/json"})
    error_of(response, 422, "invalid_request")


def test_other_bad_bodies_and_parameters_are_4xx(app: App) -> None:
    alice = app.alice
    nested = alice.post("/files", content=b"[" * 100_000,
                        headers={"content-type": "application/json"})
    error_of(nested, 422, "invalid_request")
    error_of(alice.post("/files", json=_create(app, metadata="not base64!")), 400)
    error_of(alice.post("/files", json=_create(app, wrapped_key="")), 400)
    error_of(alice.post("/files", json=_create(app, size=10**30)), 400)
    error_of(alice.post("/files", json=_create(app, blocks=[{"id": "0" * 64, "size": 0}])),
             422)
    node_id = create_file(alice, app.root, [])["node"]["id"]
    for path, params in (("/changes", {"cursor": "-1"}), ("/changes", {"cursor": "abc"}),
                         ("/changes", {"cursor": str(2**64)}),
                         ("/changes", {"limit": "0"}),
                         (f"/files/{node_id}/changes", {"since_version": str(2**63)}),
                         (f"/files/{node_id}/presigned-url", {"offset": str(10**20)}),
                         (f"/files/{node_id}/children", {"limit": "100000"}),
                         ("/events", {"heartbeat": "0"}), ("/events", {"cursor": str(2**70)})):
        error_of(alice.get(path, params=params), 422, "invalid_request")
    error_of(alice.delete(f"/files/{node_id}"), 422, "invalid_request")  # no base_version
    conflict = error_of(alice.delete(f"/files/{node_id}", params={"base_version": 10**30}),
                        409, "conflict")
    assert conflict["current_version"] == 1
    error_of(alice.client.request("PATCH", f"/files/{node_id}"), 405)
    error_of(alice.get("/no/such/route"), 404, "not_found")


# --- ids and names -------------------------------------------------------------------------

# The first is well-formed but names no node (fixed, so that every run and every parallel
# worker collects the same tests).
BAD_NODE_IDS = ["5eed" * 8, "../../etc", "..", ".", "0" * 31, "0" * 33, "A" * 32,
                "\0", "é" * 16, "x" * 5000, "..%2F..%2Fetc", " " + "0" * 31]


@pytest.mark.parametrize("node_id", BAD_NODE_IDS, ids=lambda node_id: repr(node_id[:20]))
def test_unknown_and_path_like_node_ids_are_404(app: App, node_id: str) -> None:
    quoted = quote(node_id, safe="").replace(".", "%2E")  # no dot segments for httpx to fold
    body = {"base_version": 1, "metadata": b64(b"m"), "wrapped_key": b64(b"k")}
    for response in (
            app.alice.get(f"/files/{quoted}"),
            app.alice.get(f"/files/{quoted}/children"),
            app.alice.get(f"/files/{quoted}/changes"),
            app.alice.get(f"/files/{quoted}/presigned-url"),
            app.alice.get(f"/files/{quoted}/shares"),
            app.alice.put(f"/files/{quoted}", json=body),
            app.alice.delete(f"/files/{quoted}", params={"base_version": 1}),
            app.alice.post(f"/files/{quoted}/restore", json={"base_version": 1}),
            app.alice.post(f"/files/{quoted}/share", json={
                "grants": [{"user": "bob", "wrapped_key": b64(b"k")}]}),
            app.alice.delete(f"/files/{quoted}/share/bob")):
        error_of(response, 404, "not_found")
    well_formed = re.fullmatch(NODE_ID_PATTERN, node_id) is not None
    error_of(app.alice.post("/files", json=_create(app, parent=node_id)),
             404 if well_formed else 422)  # 422: the body's parent fails the id pattern


def test_path_like_names_are_opaque_and_touch_no_file(app: App) -> None:
    """Names live encrypted in `metadata`; the appliance never makes a path of them (nor of
    device names, user names in grants, or anything else a client sends)."""
    before = files_around(app.config.home)
    passwd = Path("/etc/passwd").stat().st_mtime_ns if Path("/etc/passwd").exists() else None
    names = [b"../../etc/passwd", b"/etc/passwd", b"..\\..\\windows\\system32", b"\0/..",
             b"a/b/c", "../../☃".encode(), b".", b"..", b"~root/.ssh/authorized_keys"]
    for name in names:
        for kind in ("dir", "file"):
            created = app.alice.ok(app.alice.post("/files", json=_create(
                app, kind=kind, metadata=b64(name), wrapped_key=b64(name))), 201)["node"]
            stored = app.alice.ok(app.alice.get(f"/files/{created['id']}"))["node"]
            assert base64.b64decode(stored["metadata"]) == name
            assert base64.b64decode(stored["wrapped_key"]) == name
    data = os.urandom(800)
    created = create_file(app.alice, app.root, [data], metadata=b"../../../../tmp/x")
    upload(app.alice, created["upload"], [data])
    assert download(app.alice, created["node"]["id"]) == data

    phone = enroll(app.url, app.config.tls_certificate, new_code(app.config.home, "alice"),
                   "../../../etc/cron.d/evil")
    assert phone.ok(phone.get("/me"))["device_name"] == "../../../etc/cron.d/evil"
    phone.close()
    for user in ("../bob", "bob/..", "/etc/passwd"):
        error_of(app.alice.post(f"/files/{app.root}/share", json={
            "grants": [{"user": user, "wrapped_key": b64(b"k")}]}), 404, "not_found")
        error_of(app.alice.get(f"/users/{quote(user, safe='')}/public-key"), 404)

    assert files_around(app.config.home) == before
    if passwd is not None:
        assert Path("/etc/passwd").stat().st_mtime_ns == passwd


def files_around(home: Path) -> set[Path]:
    """Every path beside the appliance home (in the test's temporary folders), and every
    entry of the home's top level: what a path traversal would create."""
    base = home.parent.parent
    found = {path for path in base.rglob("*") if home not in path.parents and path != home}
    found.update(home.iterdir())
    found.update({Path("/tmp") / name for name in os.listdir("/tmp") if "escaped" in name
                  or name in ("x", "etc")})
    return found


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/etc/passwd", "Alice", "", "x" * 40,
                                  "a b", "a\nb", "bob;rm"])
def test_cairnd_refuses_path_like_user_names(app: App, name: str) -> None:
    result = run_cairnd_in_process("user", "add", name, "--home", app.config.home)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("cairnd: error: invalid user name")
    assert "Traceback" not in result.stderr


# --- Range ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranged(app: App) -> tuple[str, bytes]:
    data = os.urandom(1000)
    return uploaded(app, data)[1], data


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-9", 0, 10), ("bytes=990-", 990, 1000), ("bytes=-5", 995, 1000),
    ("bytes=995-5000", 995, 1000), ("bytes=0-0", 0, 1), ("bytes=0-999", 0, 1000),
    ("bytes=-5000", 0, 1000),
])
def test_a_valid_range_is_206_with_those_bytes(app: App, ranged: tuple[str, bytes],
                                               header: str, start: int, end: int) -> None:
    url, data = ranged
    response = app.anonymous.get(url, headers={"Range": header})
    assert response.status_code == 206, response.text
    assert response.content == data[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert response.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("header", [
    "bytes=abc", "bytes=5-2", "bytes=1000-", "bytes=1000-1005", "bytes=0-1,3-4", "items=0-5",
    "bytes=-0", "bytes=", "bytes=-", "bytes=99999999999999999999999-", "bytes=0x10-20",
])
def test_an_invalid_range_is_416(app: App, ranged: tuple[str, bytes], header: str) -> None:
    response = app.anonymous.get(ranged[0], headers={"Range": header})
    error_of(response, 416, "range_not_satisfiable")
