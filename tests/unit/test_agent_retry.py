"""The agent asks once more, a second later, for a block the appliance calls unrecoverable
(it may have just rebuilt a disk its read had not seen yet, issue 14) — and only once: a
second "unrecoverable" is the answer. Against a tiny HTTPS server on 127.0.0.1 that plays
the appliance's answers in order (the fault itself — a read that comes up short while a
disk is rebuilt — is what a real appliance cannot be made to produce on cue)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from agent.api import Api
from agent.client import (
    UNRECOVERABLE_RETRY_S,
    Connection,
    RetryPolicy,
    retry_wait,
)
from agent.errors import ApiError, RemoteNotFoundError
from agent.home import AgentHome, DeviceRecord
from protocol.errors import ErrorCode

BLOCK = "ab" * 32
UNRECOVERABLE = (503, {"error": {"code": "block_unrecoverable",
                                 "message": "block ab…: 3 healthy shards, 4 needed"}})
STORAGE = (503, {"error": {"code": "storage", "message": "busy"}})
NOT_FOUND = (404, {"error": {"code": "block_not_found", "message": "no such block"}})


@dataclass
class Script:
    """The answers to play, per path, in order; and when each request came."""

    answers: dict[str, list[tuple[int, object]]]
    seen: list[tuple[str, float]] = field(default_factory=list)

    def next(self, path: str) -> tuple[int, object]:
        self.seen.append((path, time.monotonic()))
        queue = self.answers[path]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def times(self, path: str) -> list[float]:
        return [at for p, at in self.seen if p == path]


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            status, body = script.next(self.path.split("?")[0])
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream"
                             if isinstance(body, bytes) else "application/json")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server(certificate: tuple[Path, Path]) -> Iterator[tuple[ThreadingHTTPServer, Script]]:
    script = Script({})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd, script
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _connection(tmp_path: Path, httpd: ThreadingHTTPServer, certificate: Path
                ) -> Connection:
    port = httpd.server_address[1]
    device = DeviceRecord(appliance_id="app", url=f"https://127.0.0.1:{port}",
                          fingerprint="0" * 64, certificate=certificate.read_text(),
                          device_id="dev", device_name="laptop", user="ann", token="t")
    return Connection(AgentHome(tmp_path), device,
                      retry=RetryPolicy(attempts=5, first_delay_s=0.01, max_delay_s=0.02))


def _get_block(tmp_path: Path, httpd: ThreadingHTTPServer, certificate: Path) -> bytes:
    async def main() -> bytes:
        async with _connection(tmp_path, httpd, certificate) as connection:
            return await trio.to_thread.run_sync(connection.get_block, f"/blocks/{BLOCK}")
    return trio.run(main)


def test_a_first_unrecoverable_block_is_asked_for_again_a_second_later(
        tmp_path: Path, server: tuple[ThreadingHTTPServer, Script],
        certificate: tuple[Path, Path]) -> None:
    httpd, script = server
    script.answers[f"/blocks/{BLOCK}"] = [UNRECOVERABLE, (200, b"ciphertext")]
    assert _get_block(tmp_path, httpd, certificate[0]) == b"ciphertext"
    first, second = script.times(f"/blocks/{BLOCK}")
    assert second - first >= UNRECOVERABLE_RETRY_S * 0.9


def test_a_second_unrecoverable_is_the_answer(
        tmp_path: Path, server: tuple[ThreadingHTTPServer, Script],
        certificate: tuple[Path, Path]) -> None:
    httpd, script = server
    script.answers[f"/blocks/{BLOCK}"] = [UNRECOVERABLE, UNRECOVERABLE, (200, b"late")]
    with pytest.raises(ApiError) as raised:
        _get_block(tmp_path, httpd, certificate[0])
    assert raised.value.api_code == ErrorCode.BLOCK_UNRECOVERABLE
    assert len(script.times(f"/blocks/{BLOCK}")) == 2        # only one retry


def test_the_one_retry_is_not_spent_by_transient_errors_before_it(
        tmp_path: Path, server: tuple[ThreadingHTTPServer, Script],
        certificate: tuple[Path, Path]) -> None:
    httpd, script = server
    script.answers[f"/blocks/{BLOCK}"] = [STORAGE, UNRECOVERABLE, STORAGE, (200, b"ok")]
    assert _get_block(tmp_path, httpd, certificate[0]) == b"ok"
    assert len(script.times(f"/blocks/{BLOCK}")) == 4


def test_a_missing_block_is_not_asked_for_again(
        tmp_path: Path, server: tuple[ThreadingHTTPServer, Script],
        certificate: tuple[Path, Path]) -> None:
    httpd, script = server
    script.answers[f"/blocks/{BLOCK}"] = [NOT_FOUND, (200, b"never")]
    with pytest.raises(RemoteNotFoundError):
        _get_block(tmp_path, httpd, certificate[0])
    assert len(script.times(f"/blocks/{BLOCK}")) == 1


def test_json_requests_and_batch_reads_get_the_same_one_retry(
        tmp_path: Path, server: tuple[ThreadingHTTPServer, Script],
        certificate: tuple[Path, Path]) -> None:
    httpd, script = server
    script.answers["/health"] = [UNRECOVERABLE, UNRECOVERABLE, (200, {})]
    other = "cd" * 32
    script.answers["/blocks/read"] = [
        (200, {"blocks": [{"id": BLOCK, "data": "AAEC"},
                          {"id": other, "error": UNRECOVERABLE[1]["error"]}]}),
        (200, {"blocks": [{"id": other, "data": "AwQF"}]})]

    async def main() -> list[tuple[str, str | None]]:
        async with _connection(tmp_path, httpd, certificate[0]) as connection:
            with pytest.raises(ApiError):
                await connection.call("GET", "/health")
            blocks = await Api(connection).read_blocks([BLOCK, other])
            return [(b.id, b.data) for b in blocks]

    assert trio.run(main) == [(BLOCK, "AAEC"), ("cd" * 32, "AwQF")]
    assert len(script.times("/health")) == 2
    reads = script.times("/blocks/read")
    assert len(reads) == 2 and reads[1] - reads[0] >= UNRECOVERABLE_RETRY_S * 0.9


def test_retry_wait_decides_by_code_and_attempt() -> None:
    policy = RetryPolicy(attempts=3, first_delay_s=0.25, max_delay_s=8.0)
    body = json.dumps(UNRECOVERABLE[1]).encode()
    assert retry_wait(policy, 503, body, 0, None, retried_once=False) == UNRECOVERABLE_RETRY_S
    assert retry_wait(policy, 503, body, 0, None, retried_once=True) is None
    assert retry_wait(policy, 503, body, 2, None, retried_once=False) is None   # last one
    storage = json.dumps(STORAGE[1]).encode()
    assert 0 < (retry_wait(policy, 503, storage, 0, None, retried_once=True) or 0) <= 0.25
    assert retry_wait(policy, 503, storage, 0, 3.0, retried_once=False) == 3.0
    assert retry_wait(policy, 404, json.dumps(NOT_FOUND[1]).encode(), 0, None, False) is None
    assert retry_wait(policy, 200, b"", 0, None, False) is None
    assert retry_wait(policy, 502, b"<html>proxy</html>", 0, None, False) is not None
