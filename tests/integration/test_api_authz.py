"""The authorization matrix of the appliance API, against a real `cairnd serve`.

Three users and a revoked device: alice shares a folder with bob; carol has nothing shared
with her; one of alice's devices is revoked. Every route of the app must have a case in
ROUTES (a new route without one fails `test_every_route_has_a_case`), and each case checks
what its access class demands:

    public       answers without a token
    enroll       needs no token, refuses bad codes with 403 enrollment_refused
    signed GET / signed PUT
                 a block URL: refused (403) unsigned or from a revoked device
    account      401 without a token, with an unknown one and for a revoked device; 2xx
                 for each user, about that user only
    node read    as account, and: carol on alice's nodes gets exactly what a nonexistent
                 node gets (404); bob reads alice's shared subtree but not her other nodes
    node owner   as node read, but bob's writes in the shared subtree are 403
    batch        as node owner, per operation inside a 200

Each route case gets fresh nodes from alice (`fresh_targets`), so the owner's successful
write at the end of a case cannot disturb another case.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

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
    new_node_id,
    pinned_context,
    upload,
)
from cairnd_helpers import run_cairnd_in_process, serving
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.config import ApplianceConfig, write_config
from appliance.home import init_home
from appliance.server import create_app
from protocol.enrollment import EnrollmentCode

Place = Literal["shared", "private", "missing"]
Access = Literal["public", "enroll", "signed GET", "signed PUT", "block read", "account",
                 "node read", "node owner", "batch", "block batch"]
USERS = ("alice", "bob", "carol")


# --- the world -----------------------------------------------------------------------------

@dataclass
class World:
    config: ApplianceConfig
    url: str
    anonymous: httpx.Client       # pinned TLS, no token
    alice: Device
    bob: Device
    carol: Device
    revoked: Device               # alice's, revoked after it fetched the URLs below
    revoked_get_url: str          # a download URL the revoked device got while active
    revoked_put_url: str          # an upload URL for revoked_pending_node's block
    revoked_pending_node: str
    roots: dict[str, str] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)  # alice's nodes never shared

    def device(self, user: str) -> Device:
        return cast(Device, getattr(self, user))


def _make_home(base: Path) -> ApplianceConfig:
    return init_home(base / "appliance", disks=4, data_shards=2, parity_shards=1,
                     reserve_free_bytes=0, listen="127.0.0.1:0")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    config = _make_home(tmp_path_factory.mktemp("authz"))
    with serving(config.home) as server:
        cert = config.tls_certificate
        devices = {user: enroll(server.url, cert, add_user(config.home, user), f"{user}-pc")
                   for user in USERS}
        old = enroll(server.url, cert, new_code(config.home, "alice"), "alice-old-phone")
        for user, device in devices.items():  # public keys, so others can share with them
            device.ok(device.put("/me/key-bundle", json={
                "public_key": b64(user.encode().ljust(32, b"k")), "bundle": b64(b"bundle"),
                "base_version": 0}))
        roots = {user: make_root(device)["id"] for user, device in devices.items()}

        data, pending = os.urandom(3000), os.urandom(3000)
        done = create_file(old, roots["alice"], [data])
        upload(old, done["upload"], [data])
        get_url = old.ok(old.get(f"/files/{done['node']['id']}"))["blocks"][0]["url"]
        waiting = create_file(old, roots["alice"], [pending])
        put_url = waiting["upload"][0]["url"]
        revoked = run_cairnd_in_process("device", "revoke", old.device_id, "--home",
                                        config.home)
        assert revoked.returncode == 0, revoked.stderr

        anonymous = httpx.Client(base_url=server.url, verify=pinned_context(cert), timeout=60)
        yield World(config, server.url, anonymous, devices["alice"], devices["bob"],
                    devices["carol"], old, get_url, put_url, waiting["node"]["id"], roots,
                    {roots["alice"], done["node"]["id"], waiting["node"]["id"]})
        anonymous.close()
        for device in (*devices.values(), old):
            device.close()
        assert "Traceback" not in server.stderr(), server.stderr()


@dataclass
class Targets:
    """Fresh nodes of alice: in `shared` (a folder shared with bob, with a file in it) and
    in `private` (her root and a file in it); `missing` ids name no node at all."""

    folder: dict[Place, str]
    file: dict[Place, str]
    file_data: bytes
    pending_block: tuple[str, bytes]    # a block alice's uploading file in `shared` awaits


def fresh_targets(world: World) -> Targets:
    alice = world.alice
    shared = alice.ok(alice.post("/files", json={
        "parent": world.roots["alice"], "kind": "dir", "metadata": b64(b"shared-meta"),
        "wrapped_key": b64(b"shared-key")}), 201)["node"]["id"]
    data, pending, private = os.urandom(5000), os.urandom(2000), os.urandom(4000)
    shared_file = create_file(alice, shared, [data])
    upload(alice, shared_file["upload"], [data])
    create_file(alice, shared, [pending])
    private_file = create_file(alice, world.roots["alice"], [private])
    upload(alice, private_file["upload"], [private])
    alice.ok(alice.post(f"/files/{shared}/share", json={
        "grants": [{"user": "bob", "wrapped_key": b64(b"for-bob")}]}))
    world.private.add(private_file["node"]["id"])
    return Targets(
        folder={"shared": shared, "private": world.roots["alice"], "missing": new_node_id()},
        file={"shared": shared_file["node"]["id"], "private": private_file["node"]["id"],
              "missing": new_node_id()},
        file_data=data, pending_block=(block(pending)["id"], pending))


# --- requests ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Req:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None


def send(client: httpx.Client, req: Req, headers: dict[str, str] | None = None
         ) -> httpx.Response:
    if req.path == "/events":  # a stream that never ends: take the head and hang up
        with client.stream(req.method, req.path, params=req.params, headers=headers) as r:
            if r.status_code != 200:
                r.read()
            return r
    return client.request(req.method, req.path, params=req.params, json=req.json,
                          content=req.content, headers=headers)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert the status and the error body's shape; return the error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str), body
    assert isinstance(body["error"]["message"], str), body
    return dict(body["error"])


def version_of(world: World, node_id: str) -> int:
    response = world.alice.get(f"/files/{node_id}")
    return int(response.json()["node"]["version"]) if response.status_code == 200 else 1


@dataclass(frozen=True)
class Ask:
    """What a request is built from: who sends it, and about which place's nodes."""

    world: World
    targets: Targets
    who: Device
    place: Place

    @property
    def folder(self) -> str:
        return self.targets.folder[self.place]

    @property
    def file(self) -> str:
        return self.targets.file[self.place]


Build = Callable[[Ask], Req]


def fixed(method: str, path: str, **kwargs: Any) -> Build:
    return lambda ask: Req(method, path, **kwargs)


def _new_child(ask: Ask) -> dict[str, Any]:
    return {"parent": ask.folder, "kind": "file", "metadata": b64(b"new-meta"),
            "wrapped_key": b64(b"new-key"), "size": 0}


def _new_version(ask: Ask) -> dict[str, Any]:
    return {"base_version": version_of(ask.world, ask.file), "metadata": b64(b"v2-meta"),
            "wrapped_key": b64(b"v2-key")}


def _key_bundle(ask: Ask) -> Req:
    current = ask.who.ok(ask.who.get("/me/key-bundle"))
    return Req("PUT", "/me/key-bundle", json={
        "public_key": current["public_key"], "bundle": b64(b"bundle-again"),
        "base_version": current["version"]})


def _wrong_response(ask: Ask) -> Req:
    code = EnrollmentCode.parse(new_code(ask.world.config.home, "carol"))
    return Req("POST", "/enroll", json={
        "code_id": code.code_id_text, "nonce": "00" * 32, "response": "11" * 32,
        "device_name": "intruder"})


def private_block(ask: Ask) -> str:
    detail = ask.world.alice.ok(ask.world.alice.get(f"/files/{ask.targets.file['private']}"))
    return str(detail["blocks"][0]["block_id"])


def _batch(ask: Ask) -> Req:
    return Req("POST", "/batch/files", json={"operations": [
        {"op": "create", **_new_child(ask)},
        {"op": "update", "node_id": ask.file, **_new_version(ask)}]})


DEVICE_KEY = Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class Route:
    access: Access
    build: Build


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/health"): Route("public", fixed("GET", "/health")),
    ("GET", "/openapi.json"): Route("public", fixed("GET", "/openapi.json")),
    ("GET", "/docs"): Route("public", fixed("GET", "/docs")),
    ("GET", "/docs/oauth2-redirect"): Route("public", fixed("GET", "/docs/oauth2-redirect")),
    ("GET", "/redoc"): Route("public", fixed("GET", "/redoc")),
    ("POST", "/enroll/challenge"): Route("enroll", fixed(
        "POST", "/enroll/challenge", json={"code_id": "ZZZZZZZZ", "nonce": "00" * 32})),
    ("POST", "/enroll"): Route("enroll", _wrong_response),
    ("GET", "/me"): Route("account", fixed("GET", "/me")),
    ("GET", "/me/key-bundle"): Route("account", fixed("GET", "/me/key-bundle")),
    ("PUT", "/me/key-bundle"): Route("account", _key_bundle),
    ("GET", "/users/{name}/public-key"): Route("account", fixed(
        "GET", "/users/alice/public-key")),
    ("GET", "/root"): Route("account", fixed("GET", "/root")),
    ("GET", "/trash"): Route("account", fixed("GET", "/trash")),
    ("GET", "/shared-with-me"): Route("account", fixed("GET", "/shared-with-me")),
    ("GET", "/changes"): Route("account", fixed("GET", "/changes")),
    ("GET", "/events"): Route("account", fixed("GET", "/events", params={"heartbeat": 1})),
    ("GET", "/disks"): Route("account", fixed("GET", "/disks")),
    ("POST", "/devices/me/certificate"): Route("account", fixed(
        "POST", "/devices/me/certificate", json={"public_key": DEVICE_KEY})),
    ("GET", "/devices/revoked"): Route("account", fixed("GET", "/devices/revoked")),
    ("POST", "/devices/admit"): Route("account", fixed(
        "POST", "/devices/admit", json={"device_name": "admitted", "public_key": DEVICE_KEY})),
    ("GET", "/files/{node_id}"): Route("node read", lambda a: Req("GET", f"/files/{a.file}")),
    ("GET", "/files/{node_id}/presigned-url"): Route(
        "node read", lambda a: Req("GET", f"/files/{a.file}/presigned-url")),
    ("GET", "/files/{node_id}/children"): Route(
        "node read", lambda a: Req("GET", f"/files/{a.folder}/children")),
    ("GET", "/files/{node_id}/changes"): Route(
        "node read", lambda a: Req("GET", f"/files/{a.file}/changes")),
    ("POST", "/files"): Route("node owner", lambda a: Req("POST", "/files",
                                                          json=_new_child(a))),
    ("PUT", "/files/{node_id}"): Route(
        "node owner", lambda a: Req("PUT", f"/files/{a.file}", json=_new_version(a))),
    ("DELETE", "/files/{node_id}"): Route("node owner", lambda a: Req(
        "DELETE", f"/files/{a.file}", params={"base_version": version_of(a.world, a.file)})),
    ("POST", "/files/{node_id}/restore"): Route("node owner", lambda a: Req(
        "POST", f"/files/{a.file}/restore",
        json={"base_version": version_of(a.world, a.file)})),
    ("POST", "/files/{node_id}/share"): Route("node owner", lambda a: Req(
        "POST", f"/files/{a.folder}/share",
        json={"grants": [{"user": "bob", "wrapped_key": b64(b"again")}]})),
    ("GET", "/files/{node_id}/shares"): Route(
        "node owner", lambda a: Req("GET", f"/files/{a.folder}/shares")),
    ("DELETE", "/files/{node_id}/share/{user}"): Route(
        "node owner", lambda a: Req("DELETE", f"/files/{a.folder}/share/bob")),
    ("POST", "/batch/files"): Route("batch", _batch),
    ("POST", "/blocks"): Route("block batch", lambda a: Req("POST", "/blocks", json={
        "blocks": [{"id": a.targets.pending_block[0],
                    "data": b64(a.targets.pending_block[1])}]})),
    ("POST", "/blocks/read"): Route("block read", lambda a: Req("POST", "/blocks/read", json={
        "ids": [block(a.targets.file_data)["id"], private_block(a)]})),
    # The signed-URL checks make their own requests (check_signed_get, check_signed_put).
    ("GET", "/blocks/{block_id}"): Route("signed GET", fixed("GET", "/blocks/")),
    ("PUT", "/blocks/{block_id}"): Route("signed PUT", fixed("PUT", "/blocks/")),
}


def app_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves: what /openapi.json documents plus the routes
    left out of it (the docs pages), HEAD aside."""
    app = create_app(cast(Any, None), cast(Any, None))  # only to list the routes
    found = {(method.upper(), path) for path, operations in app.openapi()["paths"].items()
             for method in operations}

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:
                context = getattr(route, "include_context", None)
                walk(list(inner.routes), prefix + getattr(context, "prefix", ""))
            elif hasattr(route, "path") and getattr(route, "methods", None):
                found.update((m, prefix + route.path) for m in route.methods if m != "HEAD")

    walk(list(app.routes), "")
    return sorted(found, key=lambda key: (key[1], key[0]))


APP_ROUTES = app_routes()


def test_every_route_has_a_case() -> None:
    assert set(APP_ROUTES) - set(ROUTES) == set(), "routes without an authorization case"
    assert set(ROUTES) - set(APP_ROUTES) == set(), "cases for routes that do not exist"


# --- the checks for each access class ------------------------------------------------------

def check_tokens(world: World, req: Req) -> None:
    """No token, an unknown one, a malformed header, a revoked device: all 401."""
    for headers in ({}, {"Authorization": "Bearer cairn_unknown-token"},
                    {"Authorization": "Basic YWxpY2U6cHc="},
                    {"Authorization": f"Bearer {world.revoked.token}"}):
        response = send(world.anonymous, req, headers)
        assert error_of(response, 401)["code"] == "unauthorized", headers
        assert response.headers["www-authenticate"].startswith("Bearer")


def _blank_ids(message: str) -> str:
    return re.sub(r"[0-9a-f]{32}", "ID", message)


def expected(access: Access, who: str, place: Place) -> int | None:
    """The error status a node route answers, or None for success."""
    if place == "missing" or who == "carol" or (who == "bob" and place == "private"):
        return 404
    if who == "bob" and access != "node read":
        return 403
    return None


def check_node_route(world: World, route: Route) -> None:
    targets = fresh_targets(world)
    check_tokens(world, route.build(Ask(world, targets, world.alice, "shared")))
    absent: dict[str, dict[str, Any]] = {}
    for who in ("carol", "bob", "alice"):  # the owner last: her write may change things
        for place in cast(tuple[Place, ...], ("missing", "private", "shared")):
            if who == "alice" and place == "private" and route.access != "node read":
                continue  # not sharing or deleting her root: the other cases share it
            device = world.device(who)
            response = send(device.client, route.build(Ask(world, targets, device, place)))
            status = expected(route.access, who, place)
            if status is None:
                assert response.status_code in (200, 201, 204), (who, place, response.text)
                continue
            error = error_of(response, status)
            assert error["code"] == {403: "forbidden", 404: "not_found"}[status]
            if place == "missing":
                absent[who] = error
            elif status == 404:  # exactly like a node that does not exist
                assert _blank_ids(error["message"]) == _blank_ids(absent[who]["message"])


def check_batch_route(world: World, route: Route) -> None:
    targets = fresh_targets(world)
    check_tokens(world, route.build(Ask(world, targets, world.alice, "shared")))
    for who in ("carol", "bob", "alice"):
        for place in cast(tuple[Place, ...], ("missing", "private", "shared")):
            if who == "alice" and place == "private":
                continue
            device = world.device(who)
            response = send(device.client, route.build(Ask(world, targets, device, place)))
            results = device.ok(response)["results"]
            status = expected("batch", who, place)
            if status is None:
                assert all(r["ok"] for r in results), results
            else:
                code = {403: "forbidden", 404: "not_found"}[status]
                assert [r["error"]["code"] for r in results] == [code] * len(results), \
                    (who, place, results)


def check_block_batch(world: World, route: Route) -> None:
    """Only a user with a node awaiting a block may send it: bob and carol alike are told
    no node of theirs waits for it, as for a block nobody awaits."""
    targets = fresh_targets(world)
    req = route.build(Ask(world, targets, world.alice, "shared"))
    check_tokens(world, req)
    for who in ("bob", "carol"):
        result = world.device(who).ok(send(world.device(who).client, req))["results"][0]
        assert not result["ok"] and result["error"]["code"] == "forbidden", result
    pending = world.alice.get(f"/files/{targets.folder['shared']}/children").json()["nodes"]
    assert "uploading" in {node["status"] for node in pending}
    result = world.alice.ok(send(world.alice.client, req))["results"][0]
    assert result["ok"] and len(result["completed_nodes"]) == 1, result


def check_block_read(world: World, route: Route) -> None:
    """A block comes back only to a user who can read a node holding it: alice gets both,
    bob the one in the folder shared with him, carol neither — each refused on its own."""
    targets = fresh_targets(world)
    req = route.build(Ask(world, targets, world.alice, "shared"))
    check_tokens(world, req)
    for who, readable in (("alice", [True, True]), ("bob", [True, False]),
                          ("carol", [False, False])):
        blocks = world.device(who).ok(send(world.device(who).client, req))["blocks"]
        assert [b["data"] is not None for b in blocks] == readable, (who, blocks)
        assert all(b["error"]["code"] == "not_found" for b in blocks if b["data"] is None)
    assert base64.b64decode(world.alice.ok(send(world.alice.client, req))["blocks"][0][
        "data"]) == targets.file_data


def check_account_route(world: World, route: Route) -> None:
    targets = fresh_targets(world)
    check_tokens(world, route.build(Ask(world, targets, world.alice, "shared")))
    for who in USERS:
        device = world.device(who)
        req = route.build(Ask(world, targets, device, "shared"))
        response = send(device.client, req)
        assert response.status_code == (201 if req.path == "/devices/admit" else 200), \
            (who, response.text)
        if response.headers["content-type"].startswith("application/json"):
            check_only_own(world, who, req.path, response.json())


def check_only_own(world: World, who: str, path: str, body: Any) -> None:
    """What an account route tells a user is about that user (and what bob was shared)."""
    if path == "/me":
        assert (body["user"], body["root_id"]) == (who, world.roots[who])
    elif path == "/root":
        assert (body["owner"], body["id"]) == (who, world.roots[who])
    elif path == "/trash":
        assert {node["owner"] for node in body["nodes"]} <= {who}
    elif path == "/shared-with-me":
        assert {item["owner"] for item in body["items"]} <= ({"alice"} if who == "bob"
                                                             else set())
    elif path == "/changes":
        owners = {change["node"]["owner"] for change in body["changes"] if change["node"]}
        assert owners <= ({"alice", "bob"} if who == "bob" else {who})
    elif path == "/devices/me/certificate":   # for the caller's own device
        certificate = x509.load_pem_x509_certificate(body["certificate"].encode())
        assert certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[
            0].value == world.device(who).device_id
    elif path == "/devices/admit":            # a device of the caller's own user
        assert body["user"] == who
    elif path == "/devices/revoked":          # the appliance's list, the same for all
        assert world.revoked.device_id in body["revoked"]


@pytest.mark.parametrize("key", APP_ROUTES, ids=[f"{m} {p}" for m, p in APP_ROUTES])
def test_route_refuses_what_it_must(world: World, key: tuple[str, str]) -> None:
    route = ROUTES.get(key)
    assert route is not None, f"{key} has no authorization case in ROUTES: add one"
    if route.access == "public":
        response = send(world.anonymous, route.build(cast(Ask, None)))
        assert response.status_code == 200, response.text
    elif route.access == "enroll":
        req = route.build(Ask(world, cast(Targets, None), world.alice, "missing"))
        assert error_of(send(world.anonymous, req), 403)["code"] == "enrollment_refused"
    elif route.access == "signed GET":
        check_signed_get(world)
    elif route.access == "signed PUT":
        check_signed_put(world)
    elif route.access == "account":
        check_account_route(world, route)
    elif route.access in ("node read", "node owner"):
        check_node_route(world, route)
    elif route.access == "batch":
        check_batch_route(world, route)
    elif route.access == "block read":
        check_block_read(world, route)
    else:
        check_block_batch(world, route)


def check_signed_get(world: World) -> None:
    targets = fresh_targets(world)
    file_id = targets.file["shared"]
    url = world.alice.ok(world.alice.get(f"/files/{file_id}"))["blocks"][0]["url"]
    block_path = url.split("?")[0]
    # A URL needs no token, and a token is no substitute for the URL's signature.
    assert error_of(world.alice.get(block_path), 403)["code"] == "forbidden"
    assert error_of(world.anonymous.get(world.revoked_get_url), 403)["code"] == "forbidden"
    assert world.anonymous.get(url).content == targets.file_data
    assert download(world.bob, file_id) == targets.file_data  # shared: bob may read it
    assert world.carol.get(f"/files/{file_id}").status_code == 404  # carol gets no URL


def check_signed_put(world: World) -> None:
    targets = fresh_targets(world)
    block_id, data = targets.pending_block
    assert error_of(world.alice.put(f"/blocks/{block_id}", content=data), 403)
    refused = world.anonymous.put(world.revoked_put_url, content=data)
    assert "revoked" in error_of(refused, 403)["message"]
    pending = world.alice.ok(world.alice.get(f"/files/{world.revoked_pending_node}"))
    assert pending["node"]["status"] == "uploading"
    # Bob may read the shared folder, not upload into it: no PUT URLs for him.
    children = world.bob.ok(world.bob.get(f"/files/{targets.folder['shared']}/children"))
    uploading = [n["id"] for n in children["nodes"] if n["status"] == "uploading"]
    assert len(uploading) == 1
    detail = world.bob.ok(world.bob.get(f"/files/{uploading[0]}"))
    assert (detail["method"], detail["blocks"]) == (None, [])
    put_url = world.alice.ok(world.alice.get(f"/files/{uploading[0]}"))["blocks"][0]["url"]
    stored = world.anonymous.put(put_url, content=data)
    assert stored.status_code == 200, stored.text
    assert stored.json()["completed_nodes"] == uploading


# --- whole-world properties ----------------------------------------------------------------

def test_bob_reads_the_shared_subtree(world: World) -> None:
    alice, bob, carol = world.alice, world.bob, world.carol
    targets = fresh_targets(world)
    shared = targets.folder["shared"]
    inner = alice.ok(alice.post("/files", json={
        "parent": shared, "kind": "dir", "metadata": b64(b"inner"),
        "wrapped_key": b64(b"inner-key")}), 201)["node"]["id"]
    data = [os.urandom(3000), os.urandom(70_000)]
    deep = create_file(alice, inner, data)
    upload(alice, deep["upload"], data)
    deep_id = deep["node"]["id"]

    listed = bob.ok(bob.get(f"/files/{shared}/children"))
    assert inner in {node["id"] for node in listed["nodes"]}
    assert [n["id"] for n in bob.ok(bob.get(f"/files/{inner}/children"))["nodes"]] \
        == [deep_id]
    assert download(bob, deep_id) == b"".join(data)
    window = bob.ok(bob.get(f"/files/{deep_id}/presigned-url",
                            params={"offset": 1, "limit": 1}))
    assert [entry["block_id"] for entry in window["blocks"]] == [block(data[1])["id"]]
    assert bob.ok(bob.get(f"/files/{deep_id}/changes"))["changes"][0]["kind"] == "created"
    for node_id in (inner, deep_id):
        for attempt in (carol.get(f"/files/{node_id}"),
                        carol.get(f"/files/{node_id}/changes")):
            error_of(attempt, 404)
        error_of(bob.put(f"/files/{node_id}", json={
            "base_version": 1, "metadata": b64(b"x"), "wrapped_key": b64(b"y")}), 403)
        error_of(bob.delete(f"/files/{node_id}", params={"base_version": 1}), 403)
    error_of(bob.post("/files", json={"parent": inner, "kind": "dir",
                                      "metadata": b64(b"x"), "wrapped_key": b64(b"y")}), 403)
    # A move out of alice's tree into bob's own is a write too.
    error_of(bob.put(f"/files/{deep_id}", json={
        "base_version": 1, "parent": world.roots["bob"], "metadata": b64(b"x"),
        "wrapped_key": b64(b"y")}), 403)
    # And bob cannot move his own node into alice's shared folder.
    mine = create_file(bob, world.roots["bob"], [])["node"]
    error_of(bob.put(f"/files/{mine['id']}", json={
        "base_version": 1, "parent": inner, "metadata": b64(b"x"),
        "wrapped_key": b64(b"y")}), 403)
    # The unshared rest of alice's tree stays invisible to bob.
    for path in (f"/files/{world.roots['alice']}", f"/files/{targets.file['private']}",
                 f"/files/{world.roots['alice']}/children"):
        error_of(bob.get(path), 404)


def test_changes_feeds_show_only_what_each_user_may_see(world: World) -> None:
    fresh_targets(world)
    everything = {"limit": 5000}
    alice_feed = world.alice.ok(world.alice.get("/changes", params=everything))["changes"]
    alice_nodes = {change["node_id"] for change in alice_feed}
    assert world.private <= alice_nodes

    carol_feed = world.carol.ok(world.carol.get("/changes", params=everything))["changes"]
    assert carol_feed, "carol's own changes are there"
    assert {c["node_id"] for c in carol_feed}.isdisjoint(alice_nodes)
    assert {c["node"]["owner"] for c in carol_feed if c["node"]} == {"carol"}

    bob_feed = world.bob.ok(world.bob.get("/changes", params=everything))["changes"]
    seen = {c["node_id"] for c in bob_feed}
    assert seen & alice_nodes, "bob sees the changes in what alice shared"
    assert seen.isdisjoint(world.private), "but nothing of alice's that was not shared"
    for change in bob_feed:
        if change["node"] is not None:
            assert world.bob.get(f"/files/{change['node_id']}").status_code == 200


def test_shared_with_me_lists_only_what_was_shared(world: World) -> None:
    alice, bob, carol = world.alice, world.bob, world.carol
    assert carol.ok(carol.get("/shared-with-me"))["items"] == []
    targets = fresh_targets(world)
    shared = targets.folder["shared"]
    items = bob.ok(bob.get("/shared-with-me"))["items"]
    assert shared in {item["node"]["id"] for item in items}
    assert targets.file["shared"] not in {item["node"]["id"] for item in items}
    for item in items:
        assert item["owner"] == "alice"
        grants = alice.ok(alice.get(f"/files/{item['node']['id']}/shares"))["grants"]
        assert "bob" in {grant["user"] for grant in grants}
    assert alice.ok(alice.get("/shared-with-me"))["items"] == []

    bobs_url = bob.ok(bob.get(f"/files/{targets.file['shared']}"))["blocks"][0]["url"]
    assert world.anonymous.get(bobs_url).content == targets.file_data
    assert alice.delete(f"/files/{shared}/share/bob").status_code == 204
    error_of(world.anonymous.get(bobs_url), 404)  # an unshare takes effect at once
    assert shared not in {i["node"]["id"] for i in bob.ok(bob.get("/shared-with-me"))["items"]}
    error_of(bob.get(f"/files/{targets.file['shared']}"), 404)  # unshared: gone for bob
    unshared = bob.ok(bob.get("/changes", params={"limit": 5000}))["changes"]
    assert [c for c in unshared if c["node_id"] == shared][-1]["kind"] == "unshared"
    assert carol.ok(carol.get("/shared-with-me"))["items"] == []


def test_sharing_needs_a_real_user_and_not_oneself(world: World) -> None:
    alice = world.alice
    shared = fresh_targets(world).folder["shared"]
    for user, status in (("nobody", 404), ("../../etc", 404), ("alice", 400)):
        error_of(alice.post(f"/files/{shared}/share", json={
            "grants": [{"user": user, "wrapped_key": b64(b"k")}]}), status)
    error_of(alice.get("/users/nobody/public-key"), 404)


def test_enrollment_refuses_bad_codes(world: World) -> None:
    anonymous = world.anonymous
    for code_id in ("ZZZZZZZZ", "!!!!!!!!", "zzzzzzzz"):
        refused = anonymous.post("/enroll/challenge", json={"code_id": code_id,
                                                            "nonce": "ab" * 32})
        assert error_of(refused, 403)["code"] == "enrollment_refused"
    # A real code works once; used, it is refused like an unknown one.
    code = new_code(world.config.home, "carol")
    device = enroll(world.url, world.config.tls_certificate, code, "carol-tablet")
    assert device.ok(device.get("/me"))["user"] == "carol"
    device.close()
    parsed = EnrollmentCode.parse(code)
    again = anonymous.post("/enroll/challenge", json={"code_id": parsed.code_id_text,
                                                      "nonce": "ab" * 32})
    assert error_of(again, 403)["code"] == "enrollment_refused"


# --- rate limits (an appliance of their own) -----------------------------------------------

def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    config = _make_home(tmp_path)
    write_config(replace(config, rate_limit_per_s=5.0, rate_limit_burst=5))
    with serving(config.home) as server:
        device = enroll(server.url, config.tls_certificate, add_user(config.home, "alice"))
        statuses = [device.get("/me") for _ in range(12)]
        limited = [r for r in statuses if r.status_code == 429]
        assert 200 in {r.status_code for r in statuses} and limited, \
            [r.status_code for r in statuses]
        error = error_of(limited[0], 429)
        assert error["code"] == "rate_limited"
        retry_after = int(limited[0].headers["retry-after"])
        assert 1 <= retry_after <= 2
        device.close()

        # Enrollment is limited per client address before any token exists.
        with httpx.Client(base_url=server.url, verify=pinned_context(config.tls_certificate),
                          timeout=30) as anonymous:
            answers = [anonymous.post("/enroll/challenge", json={
                "code_id": "ZZZZZZZZ", "nonce": "00" * 32}).status_code for _ in range(40)]
        assert answers[0] == 403 and 429 in answers, answers
