"""A small test client for the appliance API: enroll a device from `cairnd user add`'s
code exactly as an agent would (verifying the certificate through the code), then make
authenticated requests with httpx over TLS pinned to the appliance's certificate.

Only loopback: every appliance here listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import httpx
from cairnd_helpers import run_cairnd_in_process

from protocol.enrollment import EnrollmentCode, enrollment_proof, enrollment_response


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pinned_context(certificate: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificate))
    context.check_hostname = False  # pinned to this exact certificate instead
    return context


def served_fingerprint(url: str) -> bytes:
    """SHA-256 of the DER certificate the server at `url` presents (no verification)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    der = ssl.get_server_certificate((host, int(port)))
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(der)).digest()


def add_user(home: Path, name: str) -> str:
    """`cairnd user add NAME` (in-process); returns the code (the last line of stdout)."""
    result = run_cairnd_in_process("user", "add", name, "--home", home)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def new_code(home: Path, name: str) -> str:
    """`cairnd user code NAME` (in-process): a fresh code for another device of NAME."""
    result = run_cairnd_in_process("user", "code", name, "--home", home)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@dataclass
class Device:
    client: httpx.Client
    device_id: str
    user: str
    token: str

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.put(path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.delete(path, **kwargs)

    def ok(self, response: httpx.Response, status: int = 200) -> Any:
        assert response.status_code == status, (response.status_code, response.text)
        return response.json() if response.content else None

    def close(self) -> None:
        self.client.close()


def anonymous_post(client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST an enrollment request; one refused by the appliance's per-address rate limit
    (every test client is 127.0.0.1, and the session's appliance serves many tests) is
    sent again after the delay it names."""
    for _ in range(20):
        response = client.post(path, json=body)
        if response.status_code != 429:
            return response
        time.sleep(float(response.json()["error"]["retry_after_s"]) + 0.1)
    return response


def enroll(url: str, certificate: Path, code_text: str, device_name: str = "laptop"
           ) -> Device:
    """Redeem a code as the agent does: challenge, check the proof against the certificate
    the connection actually presents, then redeem."""
    code = EnrollmentCode.parse(code_text)
    fingerprint = served_fingerprint(url)
    nonce = os.urandom(32)
    with httpx.Client(base_url=url, verify=pinned_context(certificate), timeout=30) as client:
        challenge = anonymous_post(client, "/enroll/challenge", {
            "code_id": code.code_id_text, "nonce": nonce.hex()})
        assert challenge.status_code == 200, challenge.text
        proof = bytes.fromhex(challenge.json()["proof"])
        assert proof == enrollment_proof(code.key(), nonce, fingerprint), "impostor"
        redeemed = anonymous_post(client, "/enroll", {
            "code_id": code.code_id_text, "nonce": nonce.hex(), "device_name": device_name,
            "response": enrollment_response(code.key(), nonce, fingerprint).hex()})
        assert redeemed.status_code == 201, redeemed.text
        body = redeemed.json()
    client = httpx.Client(base_url=url, verify=pinned_context(certificate), timeout=60,
                          headers={"Authorization": f"Bearer {body['token']}"})
    return Device(client, body["device_id"], body["user"], body["token"])


def block(data: bytes) -> dict[str, Any]:
    return {"id": blake3.blake3(data).hexdigest(), "size": len(data)}


def new_node_id() -> str:
    return os.urandom(16).hex()


def make_root(device: Device) -> dict[str, Any]:
    body = device.ok(device.post("/files", json={
        "parent": None, "kind": "dir", "metadata": b64(b"root-meta"),
        "wrapped_key": b64(b"root-key")}), 201)
    return dict(body["node"])


def create_file(device: Device, parent: str, blocks: list[bytes], *,
                node_id: str | None = None, metadata: bytes = b"meta") -> dict[str, Any]:
    payload: dict[str, Any] = {
        "parent": parent, "kind": "file", "metadata": b64(metadata),
        "wrapped_key": b64(b"wrapped"), "size": sum(len(b) for b in blocks),
        "blocks": [block(b) for b in blocks]}
    if node_id is not None:
        payload["id"] = node_id
    return dict(device.ok(device.post("/files", json=payload), 201))


def upload(device: Device, urls: list[dict[str, Any]], blocks: list[bytes]) -> None:
    by_id = {blake3.blake3(b).hexdigest(): b for b in blocks}
    for entry in urls:
        response = device.client.put(entry["url"], content=by_id[entry["block_id"]])
        assert response.status_code == 200, response.text


def download(device: Device, node_id: str) -> bytes:
    detail = device.ok(device.get(f"/files/{node_id}"))
    assert detail["method"] == "GET", detail
    parts = []
    for entry in detail["blocks"]:
        response = device.client.get(entry["url"])
        assert response.status_code == 200, response.text
        parts.append(response.content)
    return b"".join(parts)
