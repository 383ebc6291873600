"""TLSServerStream (appliance/tls_stream.py) against trio's own SSLStream as the client,
over in-memory streams: data arrives intact in both directions with TLS 1.2 and 1.3,
in large chunks, and errors and EOFs surface the way trio's SSLStream surfaces them."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from appliance.tls_stream import TLSServerStream

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


def contexts(certificate: tuple[Path, Path],
             version: ssl.TLSVersion) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certificate
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    server.options |= ssl.OP_NO_RENEGOTIATION
    client = ssl.create_default_context(cafile=str(cert))
    client.check_hostname = False
    client.minimum_version = client.maximum_version = version
    return server, client


@asynccontextmanager
async def pair(certificate: tuple[Path, Path], version: ssl.TLSVersion,
               ) -> AsyncIterator[tuple[trio.SSLStream[trio.abc.Stream], TLSServerStream,
                                        trio.testing.MemorySendStream,
                                        trio.testing.MemoryReceiveStream]]:
    """A handshaken (client, server) pair, plus the server transport's two ends (the
    client's raw path to the server, to inject bytes)."""
    server_ctx, client_ctx = contexts(certificate, version)
    client_end, server_end = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_end, client_ctx, server_hostname="localhost")
    server = TLSServerStream(server_end, server_ctx)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    assert server.version() == client.version()
    yield client, server, client_end.send_stream, server_end.receive_stream


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int,
                          sizes: list[int] | None = None) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = await stream.receive_some(1 << 20)
        assert chunk, f"EOF after {got} of {size} bytes"
        chunks.append(bytes(chunk))
        got += len(chunk)
        if sizes is not None:
            sizes.append(len(chunk))
    return b"".join(chunks)


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_large_transfers_both_ways_arrive_intact(certificate: tuple[Path, Path],
                                                       version: ssl.TLSVersion) -> None:
    up, down = os.urandom(9 * 1024 * 1024 + 123), os.urandom(5 * 1024 * 1024 + 7)
    async with pair(certificate, version) as (client, server, _, _):
        sizes: list[int] = []
        received: dict[str, bytes] = {}

        async def server_side() -> None:
            received["up"] = await receive_exactly(server, len(up), sizes)
            await server.send_all(down)

        async def client_side() -> None:
            await client.send_all(up)
            received["down"] = await receive_exactly(client, len(down))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_side)
                nursery.start_soon(client_side)
    assert hashlib.sha256(received["up"]).digest() == hashlib.sha256(up).digest()
    assert received["down"] == down
    # The point of the stream: far fewer, larger reads than one per 16 KiB record.
    assert len(sizes) < len(up) // (16 * 1024) // 4
    assert max(sizes) > 64 * 1024


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_concurrent_send_and_receive(certificate: tuple[Path, Path],
                                           version: ssl.TLSVersion) -> None:
    """Both sides send 3 MiB while receiving; nothing deadlocks or interleaves wrongly."""
    a, b = os.urandom(3 << 20), os.urandom(3 << 20)
    async with pair(certificate, version) as (client, server, _, _):
        got: dict[str, bytes] = {}

        async def take(name: str, stream: trio.abc.ReceiveStream, size: int) -> None:
            got[name] = await receive_exactly(stream, size)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, a)
                nursery.start_soon(server.send_all, b)
                nursery.start_soon(take, "server", server, len(a))
                nursery.start_soon(take, "client", client, len(b))
    assert got == {"server": a, "client": b}


async def test_receive_respects_max_bytes(certificate: tuple[Path, Path]) -> None:
    async with pair(certificate, ssl.TLSVersion.TLSv1_3) as (client, server, _, _):
        await client.send_all(b"x" * 100_000)
        first = await server.receive_some(1000)
        assert len(first) == 1000
        rest = await receive_exactly(server, 99_000)
        assert first + rest == b"x" * 100_000


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_peer_close_reads_as_eof(certificate: tuple[Path, Path],
                                       version: ssl.TLSVersion) -> None:
    """close_notify, and a bare EOF (https_compatible, as hypercorn asks of trio), both read
    as b"" after the data before them."""
    async with pair(certificate, version) as (client, server, _, _):
        await client.send_all(b"last words")
        await client.aclose()  # trio sends close_notify, then closes
        assert await receive_exactly(server, 10) == b"last words"
        assert await server.receive_some() == b""
    async with pair(certificate, version) as (client, server, raw, _):
        await client.send_all(b"abrupt")
        await raw.aclose()  # the transport ends without close_notify
        assert await receive_exactly(server, 6) == b"abrupt"
        assert await server.receive_some() == b""


async def test_corrupt_record_breaks_the_stream_after_the_good_ones(
        certificate: tuple[Path, Path]) -> None:
    """Records before a corrupt one are delivered; then BrokenResourceError, for good."""
    async with pair(certificate, ssl.TLSVersion.TLSv1_3) as (client, server, raw, _):
        await client.send_all(b"good")
        # One more record, encrypted by the client but tampered with on the way.
        client_end = client.transport_stream
        assert isinstance(client_end, trio.StapledStream)
        tap_send, tap_receive = trio.testing.memory_stream_one_way_pair()
        client.transport_stream = trio.StapledStream(tap_send, client_end.receive_stream)
        await client.send_all(b"bad record")
        record = bytearray(await tap_receive.receive_some())
        record[-1] ^= 0x01
        await raw.send_all(bytes(record))
        assert await server.receive_some() == b"good"
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"no")


async def test_garbage_instead_of_a_handshake(certificate: tuple[Path, Path]) -> None:
    server_ctx, _ = contexts(certificate, ssl.TLSVersion.TLSv1_3)
    client_end, server_end = trio.testing.memory_stream_pair()
    server = TLSServerStream(server_end, server_ctx)
    await client_end.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


async def test_one_receiver_and_one_sender_at_a_time(certificate: tuple[Path, Path]) -> None:
    async with pair(certificate, ssl.TLSVersion.TLSv1_3) as (_, server, _, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            nursery.cancel_scope.cancel()
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")
        await server.aclose()  # twice is fine
