"""serve_https (appliance/https.py): hypercorn on TLSServerStream, over real sockets on
127.0.0.1. Large uploads and downloads arrive intact with TLS 1.2 and 1.3 on keep-alive
connections, the body reaches the app in large chunks, and a TLS 1.3 KeyUpdate from the
client (openssl s_client) mid-request is honoured."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config as HypercornConfig

from appliance.https import serve_https
from appliance.serve import bind_listening_socket
from appliance.tls import write_self_signed_certificate

MIB = 1024 * 1024


class DigestApp:
    """PUT: answers `sha256-hex messages` of the body (messages: ASGI body messages it
    came in). GET /bytes/N: answers N bytes of a fixed pattern."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        digest, messages = hashlib.sha256(), 0
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            messages += 1
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":
            body = pattern(int(scope["path"].rsplit("/", 1)[1]))
        else:
            body = f"{digest.hexdigest()} {messages}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def pattern(size: int) -> bytes:
    block = hashlib.sha256(b"cairn").digest() * 128  # 4 KiB
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    write_self_signed_certificate(cert, key, "127.0.0.1")
    return cert, key


@asynccontextmanager
async def serving(certificate: tuple[Path, Path]) -> AsyncIterator[int]:
    config = HypercornConfig()
    config.certfile, config.keyfile = map(str, certificate)
    config.accesslog = None
    sock = bind_listening_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_https(
            DigestApp(), config, sock, shutdown_trigger=stop.wait, task_status=task_status))
        try:
            yield port
        finally:
            stop.set()


def client_context(cert: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    context.minimum_version = context.maximum_version = version
    return context


def exchange(port: int, context: ssl.SSLContext, bodies: list[bytes],
             download: int) -> tuple[list[str], bytes, str]:
    """PUT each body on one keep-alive connection, then GET `download` bytes; returns the
    PUT answers, the GET body and the TLS version."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        answers = []
        for body in bodies:
            connection.request("PUT", "/blocks/x", body=body,
                               headers={"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            assert response.status == 200
            answers.append(response.read().decode())
        connection.request("GET", f"/bytes/{download}")
        response = connection.getresponse()
        assert response.status == 200
        got = response.read()
        assert connection.sock is not None
        version = connection.sock.version()  # type: ignore[attr-defined]
        return answers, got, str(version)
    finally:
        connection.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
async def test_large_bodies_arrive_intact_in_large_chunks(
        certificate: tuple[Path, Path], version: ssl.TLSVersion) -> None:
    bodies = [os.urandom(4 * MIB), os.urandom(9 * MIB + 5), os.urandom(1), os.urandom(70_000)]
    async with serving(certificate) as port:
        context = client_context(certificate[0], version)
        with trio.fail_after(60):
            answers, got, used = await trio.to_thread.run_sync(
                exchange, port, context, bodies, 6 * MIB + 3)
    assert used == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    for body, answer in zip(bodies, answers, strict=True):
        digest, messages = answer.split()
        assert digest == hashlib.sha256(body).hexdigest()
        # trio.SSLStream gave one message per 16 KiB record (~257 for 4 MiB); here at most
        # one per 64 KiB, plus the partial reads at either end and the closing message.
        assert int(messages) <= 3 + len(body) // (64 * 1024)
    assert got == pattern(6 * MIB + 3)


async def test_several_connections_at_once(certificate: tuple[Path, Path]) -> None:
    bodies = [os.urandom(4 * MIB) for _ in range(3)]
    results: list[list[str]] = []
    async with serving(certificate) as port:
        context = client_context(certificate[0], ssl.TLSVersion.TLSv1_3)

        async def one() -> None:
            answers, _, _ = await trio.to_thread.run_sync(exchange, port, context, bodies, 10)
            results.append(answers)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(one)
    expected = [hashlib.sha256(body).hexdigest() for body in bodies]
    assert [[a.split()[0] for a in answers] for answers in results] == [expected] * 6


def key_update_exchange(port: int, cert: Path, body: bytes) -> str:
    """One PUT through `openssl s_client`, which sends a KeyUpdate (update requested: the
    server must answer with its own) between the headers and the body."""
    process = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-CAfile",
         str(cert), "-servername", "localhost"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    try:
        def write(data: bytes) -> None:
            assert process.stdin is not None
            process.stdin.write(data)
            process.stdin.flush()
            time.sleep(0.5)  # s_client reads its commands one stdin read at a time

        time.sleep(1)
        write(f"PUT /blocks/x HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
              .encode())
        write(b"K\n")  # s_client's command: KeyUpdate, requesting the peer's
        write(body)
        time.sleep(1)  # the answer arrives; s_client closes when its stdin ends
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert b"KEYUPDATE" in out + err, (out + err)[-2000:]
    return out.decode(errors="replace")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_key_update_mid_request(certificate: tuple[Path, Path]) -> None:
    body = os.urandom(48 * 1024).hex().encode()  # text: s_client reads its stdin as lines
    async with serving(certificate) as port:
        with trio.fail_after(60):
            output = await trio.to_thread.run_sync(key_update_exchange, port,
                                                   certificate[0], body)
    assert "HTTP/1.1 200" in output
    assert hashlib.sha256(body).hexdigest() in output
