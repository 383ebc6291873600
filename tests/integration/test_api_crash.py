"""Crash safety of the upload path: kill -9 the appliance in the middle of a batch of
uploads, start it again, and check that no node is `uploaded` with a block missing, that
every block acknowledged before the crash is still there, and that the uploads resume
with only what is missing."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import blake3
import httpx
import pytest
from api_helpers import (
    Device,
    add_user,
    b64,
    block,
    download,
    enroll,
    make_root,
    new_node_id,
    pinned_context,
)
from cairnd_helpers import MakeHome, serving

FILES = 24
BLOCKS_PER_FILE = 3
BLOCK_BYTES = 300_000


def reconnect(device: Device, url: str, certificate: Any) -> Device:
    client = httpx.Client(base_url=url, verify=pinned_context(certificate), timeout=60,
                          headers={"Authorization": f"Bearer {device.token}"})
    return Device(client, device.device_id, device.user, device.token)


@pytest.mark.slow
def test_kill_9_mid_upload_then_resume(appliance_home: MakeHome) -> None:
    config = appliance_home(disks=4, data_shards=2, parity_shards=1)
    contents = {new_node_id(): [os.urandom(BLOCK_BYTES) for _ in range(BLOCKS_PER_FILE)]
                for _ in range(FILES)}
    by_block = {blake3.blake3(b).hexdigest(): b for blocks in contents.values()
                for b in blocks}

    def operations(parent: str) -> list[dict[str, Any]]:
        return [{"op": "create", "id": node_id, "parent": parent, "kind": "file",
                 "metadata": b64(b"m"), "wrapped_key": b64(b"k"),
                 "size": sum(map(len, blocks)), "blocks": [block(b) for b in blocks]}
                for node_id, blocks in contents.items()]

    acknowledged: set[str] = set()
    with serving(config.home) as server:
        device = enroll(server.url, config.tls_certificate, add_user(config.home, "alice"))
        root = make_root(device)["id"]
        results = device.ok(device.post("/batch/files", json={
            "operations": operations(root)}))["results"]
        urls = [u for r in results for u in r["result"]["upload"]]
        assert len(urls) == FILES * BLOCKS_PER_FILE
        lock, enough = threading.Lock(), threading.Event()

        def send(entry: dict[str, Any]) -> None:
            if enough.is_set():
                return
            try:
                response = device.client.put(entry["url"], content=by_block[entry["block_id"]])
            except httpx.HTTPError:
                return  # the server died under this request
            if response.status_code == 200:
                with lock:
                    acknowledged.add(entry["block_id"])
                    if len(acknowledged) >= len(urls) // 3:
                        enough.set()

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, entry) for entry in urls]
            assert enough.wait(timeout=60)
            server.process.send_signal(signal.SIGKILL)  # in the middle of the batch
            for future in futures:
                future.result(timeout=60)
        assert server.process.wait(timeout=10) == -signal.SIGKILL
        device.close()

    assert 0 < len(acknowledged) < len(urls)
    with serving(config.home) as server:
        device = reconnect(device, server.url, config.tls_certificate)
        # No node is uploaded with a block missing: every uploaded one downloads intact.
        uploaded = 0
        for node_id, blocks in contents.items():
            detail = device.ok(device.get(f"/files/{node_id}"))
            if detail["node"]["status"] == "uploaded":
                uploaded += 1
                assert download(device, node_id) == b"".join(blocks)

        # Resume: the same creates again answer only the blocks still missing, and never
        # one that was acknowledged before the crash.
        results = device.ok(device.post("/batch/files", json={
            "operations": operations(make_root_id(device))}))["results"]
        assert all(r["ok"] for r in results), results
        missing = [u for r in results for u in r["result"]["upload"]]
        assert not {u["block_id"] for u in missing} & acknowledged
        assert len(missing) <= len(urls) - len(acknowledged)
        for entry in missing:
            device.ok(device.client.put(entry["url"], content=by_block[entry["block_id"]]))
        for node_id, blocks in contents.items():
            assert download(device, node_id) == b"".join(blocks)
        device.close()
        assert uploaded < FILES
        assert server.stop() == 0


def make_root_id(device: Device) -> str:
    return str(device.ok(device.get("/root"))["id"])
