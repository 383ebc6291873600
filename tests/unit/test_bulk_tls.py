"""BulkTLSBackend (agent/bulk_tls.py) under httpcore, against the standard library's own
TLS server on 127.0.0.1: bodies arrive intact both ways with TLS 1.2 and 1.3, connections
are reused, in large reads; a truncated answer, a silent server and a certificate the
client does not trust fail the way httpcore's own backend fails."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpcore
import pytest

from agent import bulk_tls
from agent.bulk_tls import BulkTLSBackend
from agent.client import _read_into
from agent.errors import IntegrityError
from appliance.tls import write_self_signed_certificate
from protocol.limits import MAX_BLOCK_BYTES

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
BODY = bytes(range(256)) * (4 * 4096 + 3)   # a 4 MiB block and then some


def _read_request(stream: ssl.SSLSocket) -> tuple[bytes, bytes] | None:
    """(request line, body) of one HTTP/1.1 request; None at EOF."""
    reader = stream.makefile("rb")
    line = reader.readline()
    if not line:
        return None
    length = 0
    while (header := reader.readline()) not in (b"\r\n", b""):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return line, reader.read(length)


def answer_body(stream: ssl.SSLSocket) -> None:
    """Keep-alive: GET answers BODY, PUT answers the SHA-256 of what it received."""
    while (request := _read_request(stream)) is not None:
        line, body = request
        reply = BODY if line.startswith(b"GET") else hashlib.sha256(body).hexdigest().encode()
        stream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply) + reply)


def answer_half_then_close(stream: ssl.SSLSocket) -> None:
    """Promises BODY, sends half of it, and closes without close_notify."""
    if _read_request(stream) is not None:
        stream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)
                       + BODY[:len(BODY) // 2])


def never_answer(stream: ssl.SSLSocket) -> None:
    _read_request(stream)
    threading.Event().wait(1)


@contextmanager
def tls_server(certificate: tuple[Path, Path], version: ssl.TLSVersion,
               handle: Callable[[ssl.SSLSocket], None]) -> Iterator[tuple[str, list[int]]]:
    """A threaded TLS server on 127.0.0.1: its URL, and the number of connections it took."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    context.minimum_version = context.maximum_version = version
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    accepted: list[int] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            raw.settimeout(10)
            with raw, suppress(OSError), context.wrap_socket(raw, server_side=True) as stream:
                handle(stream)   # an SSLError (a refused handshake) is an OSError

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(timeout=20)
        listener.close()


def client_pool(certificate: tuple[Path, Path]) -> httpcore.ConnectionPool:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.check_hostname = False
    return httpcore.ConnectionPool(ssl_context=context, network_backend=BulkTLSBackend())


@pytest.mark.parametrize("version", VERSIONS, ids=["TLS1.2", "TLS1.3"])
def test_bodies_arrive_intact_both_ways_on_one_connection(
        certificate: tuple[Path, Path], version: ssl.TLSVersion,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real_read = bulk_tls.BulkTLSStream._read

    def counted(self: bulk_tls.BulkTLSStream, max_bytes: int) -> bytes:
        data = real_read(self, max_bytes)
        reads.append(len(data))
        return data

    monkeypatch.setattr(bulk_tls.BulkTLSStream, "_read", counted)
    with tls_server(certificate, version, answer_body) as (url, accepted), \
            client_pool(certificate) as pool:
        for _ in range(3):
            assert pool.request("GET", f"{url}/block").content == BODY
        sent = memoryview(BODY)[1:]
        answer = pool.request("PUT", f"{url}/block", content=iter([sent]),
                              headers=[(b"Content-Length", str(len(sent)).encode())])
        assert answer.content.decode() == hashlib.sha256(sent).hexdigest()
        assert accepted == [1]   # one connection, kept alive
    assert max(reads) > 16 * 1024   # many TLS records per read, not one


def test_a_body_cut_short_is_an_error_not_a_short_block(certificate: tuple[Path, Path]
                                                       ) -> None:
    with tls_server(certificate, ssl.TLSVersion.TLSv1_3, answer_half_then_close) as (url, _), \
            client_pool(certificate) as pool, pytest.raises(httpcore.RemoteProtocolError):
        pool.request("GET", f"{url}/block")


def test_a_silent_server_times_out(certificate: tuple[Path, Path]) -> None:
    with tls_server(certificate, ssl.TLSVersion.TLSv1_3, never_answer) as (url, _), \
            client_pool(certificate) as pool, pytest.raises(httpcore.ReadTimeout):
        pool.request("GET", f"{url}/block", extensions={"timeout": {"read": 0.3}})


def test_a_certificate_not_pinned_is_refused(certificate: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    write_self_signed_certificate(other_cert, other_key)
    with tls_server((other_cert, other_key), ssl.TLSVersion.TLSv1_3, answer_body) as (url, _), \
            client_pool(certificate) as pool, pytest.raises(httpcore.ConnectError,
                                                            match="CERTIFICATE_VERIFY_FAILED"):
        pool.request("GET", f"{url}/block")


def test_a_block_answer_is_streamed_into_its_buffer_and_bounded() -> None:
    """`_read_into` (client.py): the body lands in the buffer asked for by its length; a
    length no block can have is refused before any buffer is asked for."""
    asked: list[int] = []

    def buffer_for(size: int) -> memoryview:
        asked.append(size)
        return memoryview(bytearray(size + 100))

    body = bytes(range(256)) * 40
    answer = httpcore.Response(200, headers=[(b"Content-Length", str(len(body)).encode())],
                               content=[body[:1000], body[1000:]])
    assert bytes(_read_into(answer, buffer_for)) == body and asked == [len(body)]
    huge = httpcore.Response(200, headers=[(b"Content-Length", b"%d" % (MAX_BLOCK_BYTES + 1))],
                             content=[b"x"])
    with pytest.raises(IntegrityError, match="a block has at most"):
        _read_into(huge, buffer_for)
    assert asked == [len(body)]
