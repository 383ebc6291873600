"""The appliance API end to end: the session's real `cairnd serve` on 127.0.0.1 (users of
this module's own, named by role plus a number: `users["names"]`) and real httpx clients
enrolled with one-time codes, as agents will use it."""

from __future__ import annotations

import base64
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from agent_helpers import make_user
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
    upload,
)
from cairnd_helpers import MakeHome, Served, serving

from protocol.version import INLINE_BATCH_BLOCKS, supports


@pytest.fixture(scope="module")
def users(appliance: Served) -> Iterator[dict[str, Any]]:
    """Devices of two users without keys or roots yet (the API tests make them)."""
    made = {role: make_user(appliance, role, keys=False) for role in ("alice", "bob")}
    cert = appliance.config.tls_certificate
    devices: dict[str, Any] = {role: enroll(appliance.url, cert, user.code())
                               for role, user in made.items()}
    devices["alice2"] = enroll(appliance.url, cert, made["alice"].code(), "phone")
    devices["roots"] = {role: make_root(devices[role])["id"] for role in ("alice", "bob")}
    devices["names"] = {role: user.name for role, user in made.items()}
    yield devices
    for name in ("alice", "bob", "alice2"):
        devices[name].close()


def root_of(users: dict[str, Any], name: str) -> str:
    return str(users["roots"][name])


def mkdir(device: Device, parent: str) -> dict[str, Any]:
    return dict(device.ok(device.post("/files", json={
        "parent": parent, "kind": "dir", "metadata": b64(b"dir"),
        "wrapped_key": b64(b"k")}), 201)["node"])


def test_second_device_of_a_user_sees_the_same_tree(users: dict[str, Any]) -> None:
    alice, phone = users["alice"], users["alice2"]
    me, me2 = alice.ok(alice.get("/me")), phone.ok(phone.get("/me"))
    assert me["user"] == me2["user"] == users["names"]["alice"]
    assert me["device_id"] != me2["device_id"]
    assert me2["root_id"] == root_of(users, "alice")
    again = alice.post("/files", json={"parent": None, "kind": "dir",
                                       "metadata": b64(b"x"), "wrapped_key": b64(b"k")})
    assert again.status_code == 409
    assert again.json()["error"]["root_id"] == root_of(users, "alice")


def test_create_resumable_upload_download_and_dedup(users: dict[str, Any]) -> None:
    alice = users["alice"]
    blocks = [os.urandom(4 * 1024 * 1024), os.urandom(70_000), os.urandom(10)]
    node_id = new_node_id()
    created = create_file(alice, root_of(users, "alice"), blocks, node_id=node_id)
    assert created["node"]["status"] == "uploading"
    assert created["node"]["block_count"] == 3
    assert {u["block_id"] for u in created["upload"]} == {block(b)["id"] for b in blocks}

    upload(alice, created["upload"][:1], blocks)  # then the "agent" is interrupted
    resumed = create_file(alice, root_of(users, "alice"), blocks, node_id=node_id)
    assert resumed["node"]["version"] == 1
    assert len(resumed["upload"]) == 2  # only what is still missing
    detail = alice.ok(alice.get(f"/files/{node_id}"))
    assert detail["method"] == "PUT" and len(detail["blocks"]) == 2

    upload(alice, resumed["upload"], blocks)
    assert alice.ok(alice.get(f"/files/{node_id}"))["node"]["status"] == "uploaded"
    assert download(alice, node_id) == b"".join(blocks)

    # The same content again is deduplicated: nothing to upload, uploaded at once.
    copy = create_file(alice, root_of(users, "alice"), blocks)
    assert copy["upload"] == [] and copy["node"]["status"] == "uploaded"

    # Range on a block.
    first = alice.ok(alice.get(f"/files/{node_id}"))["blocks"][0]
    part = alice.client.get(first["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == blocks[0][100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(blocks[0])}"

    # A repeated PUT of a stored block is fine (idempotent).
    again = alice.client.put(created["upload"][0]["url"], content=next(
        b for b in blocks if block(b)["id"] == created["upload"][0]["block_id"]))
    assert again.status_code == 200


def test_a_file_still_uploading_can_be_fetched_block_by_block_as_blocks_arrive(
        users: dict[str, Any]) -> None:
    """API 1.2, stored_only: another device of the owner gets download URLs for the blocks
    stored so far (each once, in order of first use), and those URLs work at once."""
    alice, phone = users["alice"], users["alice2"]
    first, second = os.urandom(70_000), os.urandom(80_000)
    blocks = [first, second, first]
    created = create_file(alice, root_of(users, "alice"), blocks)
    node_id = created["node"]["id"]
    path = f"/files/{node_id}/presigned-url"

    def stored_urls() -> dict[str, Any]:
        return dict(phone.ok(phone.get(path, params={"stored_only": "true"})))

    nothing = stored_urls()
    assert nothing["method"] == "GET" and nothing["blocks"] == []
    assert nothing["node"]["status"] == "uploading"
    assert phone.ok(phone.get(path))["method"] == "PUT"     # without it: as before
    upload(alice, [u for u in created["upload"] if u["block_id"] == block(second)["id"]],
           blocks)
    some = stored_urls()
    assert [u["block_id"] for u in some["blocks"]] == [block(second)["id"]]
    fetched = phone.client.get(some["blocks"][0]["url"])
    assert fetched.status_code == 200 and fetched.content == second
    upload(alice, created["upload"], blocks)
    done = stored_urls()                     # uploaded now: every position, in order
    assert done["node"]["status"] == "uploaded"
    assert [u["block_id"] for u in done["blocks"]] == [block(b)["id"] for b in blocks]
    # Someone who cannot read the node gets nothing of it, stored_only or not.
    other = users["bob"].get(path, params={"stored_only": "true"})
    assert other.status_code == 404


def test_empty_file_is_uploaded_at_once(users: dict[str, Any]) -> None:
    alice = users["alice"]
    created = create_file(alice, root_of(users, "alice"), [])
    assert created["node"]["status"] == "uploaded" and created["upload"] == []
    assert download(alice, created["node"]["id"]) == b""


def test_new_versions_conflicts_and_history(users: dict[str, Any]) -> None:
    alice, phone = users["alice"], users["alice2"]
    node = create_file(alice, root_of(users, "alice"), [b"version one"])
    upload(alice, node["upload"], [b"version one"])
    node_id = node["node"]["id"]

    two = b"version two"
    update = {"base_version": 1, "metadata": b64(b"meta2"), "wrapped_key": b64(b"wrapped"),
              "size": len(two), "blocks": [block(two)]}
    updated = alice.ok(alice.put(f"/files/{node_id}", json=update))
    assert updated["node"]["version"] == 2 and updated["node"]["status"] == "uploading"
    # The same device retrying the same update (its answer was lost) gets the same node.
    retried = alice.ok(alice.put(f"/files/{node_id}", json=update))
    assert retried["node"]["version"] == 2 and len(retried["upload"]) == 1
    upload(alice, updated["upload"], [two])

    # The phone edited version 1 meanwhile: refused, nothing overwritten.
    stale = phone.put(f"/files/{node_id}", json={**update, "metadata": b64(b"phone")})
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "conflict"
    assert stale.json()["error"]["current_version"] == 2
    assert download(alice, node_id) == two

    # A metadata-only change (a rename) keeps the blocks.
    renamed = phone.ok(phone.put(f"/files/{node_id}", json={
        "base_version": 2, "metadata": b64(b"renamed"), "wrapped_key": b64(b"wrapped")}))
    assert renamed["node"]["version"] == 3 and renamed["node"]["status"] == "uploaded"
    assert download(phone, node_id) == two

    history = alice.ok(alice.get(f"/files/{node_id}/changes"))["changes"]
    assert [(c["version"], c["kind"]) for c in history] == [
        (1, "created"), (1, "uploaded"), (2, "updated"), (2, "uploaded"), (3, "updated")]
    assert history[-1]["device_id"] == phone.device_id
    since = alice.ok(alice.get(f"/files/{node_id}/changes", params={"since_version": 2}))
    assert [c["version"] for c in since["changes"]] == [3]


def test_move_and_its_limits(users: dict[str, Any]) -> None:
    alice = users["alice"]
    a, b = mkdir(alice, root_of(users, "alice")), mkdir(alice, root_of(users, "alice"))
    inner = mkdir(alice, a["id"])
    file = create_file(alice, a["id"], [b"moving"])["node"]
    moved = alice.ok(alice.put(f"/files/{file['id']}", json={
        "base_version": 1, "parent": b["id"], "metadata": b64(b"m"),
        "wrapped_key": b64(b"rewrapped for b")}))
    assert moved["node"]["parent"] == b["id"] and moved["node"]["version"] == 2
    in_b = alice.ok(alice.get(f"/files/{b['id']}/children"))["nodes"]
    assert [n["id"] for n in in_b] == [file["id"]]
    in_a = alice.ok(alice.get(f"/files/{a['id']}/children"))["nodes"]
    assert [n["id"] for n in in_a] == [inner["id"]]

    into_itself = alice.put(f"/files/{a['id']}", json={
        "base_version": 1, "parent": inner["id"], "metadata": b64(b"m"),
        "wrapped_key": b64(b"k")})
    assert into_itself.status_code == 400
    root_move = alice.put(f"/files/{root_of(users, 'alice')}", json={
        "base_version": 1, "parent": a["id"], "metadata": b64(b"m"), "wrapped_key": b64(b"k")})
    assert root_move.status_code == 400
    under_file = alice.put(f"/files/{inner['id']}", json={
        "base_version": 1, "parent": file["id"], "metadata": b64(b"m"),
        "wrapped_key": b64(b"k")})
    assert under_file.status_code == 400


def test_delete_and_restore_a_folder(users: dict[str, Any]) -> None:
    alice = users["alice"]
    folder = mkdir(alice, root_of(users, "alice"))
    data = os.urandom(100_000)
    file = create_file(alice, folder["id"], [data])
    upload(alice, file["upload"], [data])
    file_id = file["node"]["id"]

    stale = alice.delete(f"/files/{folder['id']}", params={"base_version": 7})
    assert stale.status_code == 409
    deleted = alice.ok(alice.delete(f"/files/{folder['id']}", params={"base_version": 1}))
    assert deleted["deleted"] and deleted["version"] == 2
    assert alice.ok(alice.get(f"/files/{file_id}"))["node"]["deleted"]
    listing = alice.ok(alice.get(f"/files/{root_of(users, 'alice')}/children"))["nodes"]
    assert folder["id"] not in {n["id"] for n in listing}
    trash = alice.ok(alice.get("/trash"))["nodes"]
    assert [n["id"] for n in trash][:1] == [folder["id"]]  # the file went along with it
    assert file_id not in {n["id"] for n in trash}
    # Deleted nodes cannot be changed, and nothing can be created inside them.
    assert alice.put(f"/files/{file_id}", json={
        "base_version": 2, "metadata": b64(b"x"), "wrapped_key": b64(b"k")}).status_code == 409
    assert alice.post("/files", json={
        "parent": folder["id"], "kind": "dir", "metadata": b64(b"x"),
        "wrapped_key": b64(b"k")}).status_code == 409

    restored = alice.ok(alice.post(f"/files/{folder['id']}/restore",
                                   json={"base_version": 2}))
    assert not restored["deleted"] and restored["version"] == 3
    assert download(alice, file_id) == data
    kinds = [c["kind"] for c in alice.ok(alice.get(f"/files/{file_id}/changes"))["changes"]]
    assert kinds[-2:] == ["deleted", "restored"]


def test_a_folder_delete_decided_before_a_change_under_it_is_refused(
        users: dict[str, Any]) -> None:
    """API 1.1: `unchanged_since` names the feed cursor a folder delete was decided at;
    anything live under the folder changed after it (an edit, a file moved in) refuses
    the delete atomically, so an edit on another device beats a delete (seed 638 lost a
    file that was moved into a folder between another device's check and its delete)."""
    alice = users["alice"]
    root = root_of(users, "alice")
    folder = mkdir(alice, root)
    inner = mkdir(alice, folder["id"])
    seen = alice.ok(alice.get("/me"))["latest_cursor"]
    # another device: a new version of something deep inside
    renamed = alice.ok(alice.put(f"/files/{inner['id']}", json={
        "base_version": 1, "metadata": b64(b"renamed"), "wrapped_key": b64(b"k")}))
    refused = alice.delete(f"/files/{folder['id']}",
                           params={"base_version": 1, "unchanged_since": seen})
    assert refused.status_code == 409, refused.text
    assert inner["id"] in refused.json()["error"]["message"]
    assert not alice.ok(alice.get(f"/files/{inner['id']}"))["node"]["deleted"]
    # a file moved in from elsewhere after the cursor counts too
    outside = mkdir(alice, root)
    seen = alice.ok(alice.get("/me"))["latest_cursor"]
    alice.ok(alice.put(f"/files/{outside['id']}", json={
        "base_version": 1, "parent": folder["id"], "metadata": b64(b"m"),
        "wrapped_key": b64(b"k")}))
    assert alice.delete(f"/files/{folder['id']}", params={
        "base_version": 1, "unchanged_since": seen}).status_code == 409
    # decided on what is there now: it goes, with everything in it
    seen = alice.ok(alice.get("/me"))["latest_cursor"]
    deleted = alice.ok(alice.delete(f"/files/{folder['id']}", params={
        "base_version": 1, "unchanged_since": seen}))
    assert deleted["deleted"]
    assert alice.ok(alice.get(f"/files/{inner['id']}"))["node"]["deleted"]
    assert renamed["node"]["version"] == 2


def test_sharing_a_folder_covers_its_subtree_until_revoked(users: dict[str, Any]) -> None:
    alice, bob = users["alice"], users["bob"]
    shared = mkdir(alice, root_of(users, "alice"))
    sub = mkdir(alice, shared["id"])
    data = b"for bob's eyes"
    file = create_file(alice, sub["id"], [data])
    upload(alice, file["upload"], [data])
    private = create_file(alice, root_of(users, "alice"), [b"private"])["node"]
    file_id = file["node"]["id"]
    bob_cursor = bob.ok(bob.get("/me"))["latest_cursor"]

    assert bob.get(f"/files/{file_id}").status_code == 404
    grants = alice.ok(alice.post(f"/files/{shared['id']}/share", json={
        "grants": [{"user": users["names"]["bob"], "wrapped_key": b64(b"key for bob")}]}
    ))["grants"]
    assert [g["user"] for g in grants] == [users["names"]["bob"]]

    items = bob.ok(bob.get("/shared-with-me"))["items"]
    assert [(i["node"]["id"], i["owner"], i["wrapped_key"]) for i in items] == [
        (shared["id"], users["names"]["alice"], b64(b"key for bob"))]
    assert download(bob, file_id) == data  # two levels down
    assert [n["id"] for n in bob.ok(bob.get(f"/files/{shared['id']}/children"))["nodes"]] \
        == [sub["id"]]
    assert bob.get(f"/files/{private['id']}").status_code == 404
    # Read-only: bob cannot change what alice shared.
    refused = bob.put(f"/files/{file_id}", json={
        "base_version": 2, "metadata": b64(b"bob"), "wrapped_key": b64(b"k")})
    assert refused.status_code == 403
    feed = bob.ok(bob.get("/changes", params={"cursor": bob_cursor}))
    assert [(c["node_id"], c["kind"]) for c in feed["changes"]] == [(shared["id"], "shared")]

    # A change inside the shared folder reaches bob's feed too.
    alice.ok(alice.put(f"/files/{file_id}", json={
        "base_version": 1, "metadata": b64(b"renamed"), "wrapped_key": b64(b"wrapped")}))
    feed = bob.ok(bob.get("/changes", params={"cursor": feed["cursor"]}))
    assert [(c["node_id"], c["kind"]) for c in feed["changes"]] == [(file_id, "updated")]

    urls = bob.ok(bob.get(f"/files/{file_id}"))["blocks"]
    alice.client.delete(f"/files/{shared['id']}/share/{users['names']['bob']}").raise_for_status()
    assert bob.get(f"/files/{file_id}").status_code == 404
    assert bob.ok(bob.get("/shared-with-me"))["items"] == []
    feed = bob.ok(bob.get("/changes", params={"cursor": feed["cursor"]}))
    assert [(c["node_id"], c["kind"], c["node"]) for c in feed["changes"]] == [
        (shared["id"], "unshared", None)]
    # Unsharing twice, or with someone it was never shared with: 404.
    assert alice.delete(f"/files/{shared['id']}/share/{users['names']['bob']}").status_code == 404
    # URLs issued before the revocation stop working at once too.
    assert bob.client.get(urls[0]["url"]).status_code == 404


def test_changes_feed_pages_in_order(users: dict[str, Any]) -> None:
    alice, phone = users["alice"], users["alice2"]
    start = phone.ok(phone.get("/me"))["latest_cursor"]
    folder = mkdir(alice, root_of(users, "alice"))
    ids = [create_file(alice, folder["id"], [])["node"]["id"] for _ in range(5)]
    first = phone.ok(phone.get("/changes", params={"cursor": start, "limit": 4}))
    assert first["has_more"] and len(first["changes"]) == 4
    rest = phone.ok(phone.get("/changes", params={"cursor": first["cursor"], "limit": 100}))
    assert not rest["has_more"]
    seen = [c["node_id"] for c in first["changes"] + rest["changes"]]
    assert seen == [folder["id"], *ids]
    cursors = [c["cursor"] for c in first["changes"] + rest["changes"]]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    empty = phone.ok(phone.get("/changes", params={"cursor": rest["cursor"]}))
    me = phone.ok(phone.get("/me"))
    epoch = me["epoch"]                             # the database's history (API 1.3)
    assert re.fullmatch("[0-9a-f]{32}", epoch)
    assert me["epoch_started_cursor"] is None       # no recovery began it (API 1.4)
    assert empty == {"changes": [], "cursor": rest["cursor"], "has_more": False,
                     "epoch": epoch}


def _read_events(device: Device, params: dict[str, Any], out: queue.Queue[tuple[str, str]],
                 stop: threading.Event) -> None:
    with device.client.stream("GET", "/events", params=params,
                              timeout=httpx.Timeout(30, read=10)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in response.iter_lines():
            if stop.is_set():
                return
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                out.put((event, line.removeprefix("data: ")))


def test_event_stream_pushes_cursors_and_heartbeats(users: dict[str, Any]) -> None:
    alice, phone = users["alice"], users["alice2"]
    start = phone.ok(phone.get("/me"))["latest_cursor"]
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    stop = threading.Event()
    reader = threading.Thread(target=_read_events, daemon=True, args=(
        phone, {"cursor": start, "heartbeat": 0.5}, events, stop))
    reader.start()
    try:
        assert events.get(timeout=5) == ("heartbeat", "{}")  # nothing new yet
        began = time.monotonic()
        created = create_file(alice, root_of(users, "alice"), [])
        while True:
            kind, data = events.get(timeout=5)
            if kind == "cursor":
                break
        latency = time.monotonic() - began
        cursor = int(data.split(":")[1].strip(" }"))
        feed = phone.ok(phone.get("/changes", params={"cursor": start}))
        assert feed["cursor"] == cursor
        assert feed["changes"][-1]["node_id"] == created["node"]["id"]
        assert latency < 2.0
    finally:
        stop.set()
        create_file(alice, root_of(users, "alice"), [])  # wake the reader so it ends
        reader.join(timeout=15)


def test_batches_of_nodes_and_small_blocks(users: dict[str, Any]) -> None:
    alice = users["alice"]
    folder = mkdir(alice, root_of(users, "alice"))
    contents = [f"small file {i}".encode() for i in range(20)]
    operations: list[dict[str, Any]] = [
        {"op": "create", "parent": folder["id"], "kind": "file", "metadata": b64(b"m"),
         "wrapped_key": b64(b"k"), "size": len(c), "blocks": [block(c)]} for c in contents]
    operations.append({"op": "create", "parent": new_node_id(), "kind": "file",
                       "metadata": b64(b"m"), "wrapped_key": b64(b"k")})
    operations.append({"op": "delete", "node_id": folder["id"], "base_version": 99})
    results = alice.ok(alice.post("/batch/files", json={"operations": operations}))["results"]
    assert [r["ok"] for r in results] == [True] * 20 + [False, False]
    assert results[20]["error"]["code"] == "not_found"
    assert results[21]["error"]["code"] == "conflict"
    assert all(len(r["result"]["upload"]) == 1 for r in results[:20])

    sent = alice.ok(alice.post("/blocks", json={"blocks": [
        {"id": block(c)["id"], "data": b64(c)} for c in contents]}))["results"]
    assert all(r["ok"] and len(r["completed_nodes"]) == 1 for r in sent)
    node_ids = [r["result"]["node"]["id"] for r in results[:20]]
    assert [download(alice, n) for n in node_ids] == contents

    # Blocks no node of the caller is waiting for are refused, one by one.
    stray = alice.ok(alice.post("/blocks", json={"blocks": [
        {"id": block(b"stray")["id"], "data": b64(b"stray")}]}))["results"]
    assert stray[0]["ok"] is False and stray[0]["error"]["code"] == "forbidden"

    # ... and read back in one request: alice can, bob cannot (not shared with him).
    ids = [block(c)["id"] for c in contents]
    read = alice.ok(alice.post("/blocks/read", json={"ids": [*ids, "0" * 64, "bad"]}))
    assert [base64.b64decode(b["data"]) for b in read["blocks"][:20]] == contents
    assert [b["error"]["code"] for b in read["blocks"][20:]] == ["not_found", "not_found"]
    bob = users["bob"]
    refused = bob.ok(bob.post("/blocks/read", json={"ids": ids[:3]}))["blocks"]
    assert [b["data"] for b in refused] == [None] * 3
    assert bob.post("/blocks/read", json={"ids": []}).status_code == 422


def test_a_batch_with_its_blocks_inline_uploads_files_at_once(
        users: dict[str, Any]) -> None:
    """API 1.1: blocks inline in POST /batch/files are stored first; each file is
    `uploaded` in the same request, with one change in the feed instead of two."""
    alice, phone = users["alice"], users["alice2"]
    folder = mkdir(alice, root_of(users, "alice"))
    start = alice.ok(alice.get("/me"))["latest_cursor"]
    contents = [f"inline file {i}".encode() for i in range(5)]
    operations = [{"op": "create", "parent": folder["id"], "kind": "file",
                   "metadata": b64(b"m"), "wrapped_key": b64(b"k"), "size": len(c),
                   "blocks": [block(c)]} for c in contents]
    answer = alice.post("/batch/files", json={"operations": operations, "blocks": [
        {"id": block(c)["id"], "data": b64(c)} for c in contents]})
    assert supports(answer.headers["Cairn-Api-Version"], INLINE_BATCH_BLOCKS)
    results = alice.ok(answer)["results"]
    assert [r["result"]["node"]["status"] for r in results] == ["uploaded"] * 5
    assert [r["result"]["upload"] for r in results] == [[]] * 5
    node_ids = [r["result"]["node"]["id"] for r in results]
    assert [download(phone, n) for n in node_ids] == contents
    feed = phone.ok(phone.get("/changes", params={"cursor": start}))["changes"]
    assert sorted(c["node_id"] for c in feed) == sorted(node_ids)     # one change each
    # ... and where the caller's feed stood around the batch's one transaction
    latest = alice.ok(alice.get("/me"))["latest_cursor"]
    assert answer.json()["feed"] == {"before": start, "after": latest, "added": 5}

    # Refused as a whole (nothing created, nothing stored): a block no operation lists,
    # one whose size differs from the listed one, bytes that are not the block's.
    def create(content: bytes) -> dict[str, Any]:
        return {"op": "create", "parent": folder["id"], "kind": "file",
                "metadata": b64(b"m"), "wrapped_key": b64(b"k"), "size": len(content),
                "blocks": [block(content)]}

    before = len(alice.ok(alice.get(f"/files/{folder['id']}/children"))["nodes"])
    unlisted = {"id": block(b"not listed")["id"], "data": b64(b"not listed")}
    resized = {"id": block(b"resized")["id"], "data": b64(b"resized!")}
    forged = {"id": block(b"forged")["id"], "data": b64(b"FORGED")}
    for operation, inline in ((create(b"x"), unlisted), (create(b"resized"), resized),
                              (create(b"forged"), forged)):
        refused = alice.post("/batch/files", json={"operations": [operation],
                                                   "blocks": [inline]})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] in ("bad_request", "block_id_mismatch")
    assert len(alice.ok(alice.get(f"/files/{folder['id']}/children"))["nodes"]) == before
    read = alice.ok(alice.post("/blocks/read", json={"ids": [block(b"forged")["id"]]}))
    assert read["blocks"][0]["data"] is None


def test_key_bundle_and_public_keys(users: dict[str, Any]) -> None:
    alice, phone, bob = users["alice"], users["alice2"], users["bob"]
    assert alice.ok(alice.get("/me/key-bundle")) == {"public_key": None, "bundle": None,
                                                    "version": 0}
    alice_key = f"/users/{users['names']['alice']}/public-key"
    assert bob.get(alice_key).status_code == 404
    alice.ok(alice.put("/me/key-bundle", json={
        "public_key": b64(b"P" * 32), "bundle": b64(b"sealed"), "base_version": 0}))
    assert phone.ok(phone.get("/me/key-bundle"))["bundle"] == b64(b"sealed")
    assert bob.ok(bob.get(alice_key))["public_key"] == b64(b"P" * 32)
    stale = phone.put("/me/key-bundle", json={
        "public_key": b64(b"P" * 32), "bundle": b64(b"other"), "base_version": 0})
    assert stale.status_code == 409
    changed_key = phone.put("/me/key-bundle", json={
        "public_key": b64(b"Q" * 32), "bundle": b64(b"other"), "base_version": 1})
    assert changed_key.status_code == 409
    rewrapped = phone.ok(phone.put("/me/key-bundle", json={
        "public_key": b64(b"P" * 32), "bundle": b64(b"new passphrase"), "base_version": 1}))
    assert rewrapped["version"] == 2


def test_enrollment_codes_work_once(appliance: Served, users: dict[str, Any]) -> None:
    config, server = appliance
    code = new_code(config.home, users["names"]["bob"])
    device = enroll(server.url, config.tls_certificate, code, "tablet")
    device.close()
    with pytest.raises(AssertionError, match="enrollment_refused"):
        enroll(server.url, config.tls_certificate, code, "again")


def test_garbage_collection_after_the_grace_period(appliance_home: MakeHome) -> None:
    config = appliance_home(disks=4, data_shards=2, parity_shards=1)
    text = config.config_path.read_text()
    text = text.replace("grace_days = 7.0", "grace_days = 0.00002")  # ~1.7 s
    text = text.replace("interval_hours = 1.0", "interval_hours = 0.0001")  # 0.36 s
    config.config_path.write_text(text)
    with serving(config.home) as server:
        alice = enroll(server.url, config.tls_certificate, add_user(config.home, "alice"))
        root = make_root(alice)["id"]
        doomed, shared = os.urandom(100_000), os.urandom(100_000)
        kept = create_file(alice, root, [shared])
        upload(alice, kept["upload"], [shared])
        gone = create_file(alice, root, [doomed, shared])
        upload(alice, gone["upload"], [doomed, shared])
        gone_id = gone["node"]["id"]
        urls = alice.ok(alice.get(f"/files/{gone_id}"))["blocks"]
        alice.ok(alice.delete(f"/files/{gone_id}", params={"base_version": 1}))

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if alice.client.get(urls[0]["url"]).status_code == 404:
                break
            time.sleep(0.2)
        assert alice.client.get(urls[0]["url"]).status_code == 404  # reclaimed
        restore = alice.post(f"/files/{gone_id}/restore", json={"base_version": 2})
        assert restore.status_code in (404, 410)  # purged entirely, or blocks gone
        # The block the kept file shares is still there.
        assert download(alice, kept["node"]["id"]) == shared
        assert "garbage collection" in server.stderr()
        alice.close()
        assert server.stop() == 0
