"""A network backend for httpcore whose TLS reads return every record already received.

Why: Python's `SSLSocket.recv` returns at most one TLS record (16 KiB) per call, and httpcore
makes each call a trip through its read loop and h11 (a `Data` event, buffers, state
checks): receiving a 4 MiB block took 256 of them, ~2.5 CPU-s per GiB on the test machines
for a body that TLS decrypts in ~0.3 (measured against a bare TLS server; the appliance had
the same problem on its side: appliance/tls_stream.py). Here a read takes up to
TRANSPORT_RECEIVE bytes from the socket at once and decrypts every complete record in a
tight loop, and httpcore is asked for READ_SIZE bytes per read instead of its 64 KiB, so a
block arrives in 16 reads (1.2-1.3 CPU-s per GiB). 1 MiB reads cost about the same CPU
(1.22 against 1.30 in one run each) and `cairn get` held ~10 MiB more.

It is httpcore's own plain-socket backend (`SyncBackend`) with one change: `start_tls`
returns a `BulkTLSStream` (an `ssl.SSLObject` over two `MemoryBIO`s) instead of wrapping the
socket. Certificate checks are the context's, exactly as with `wrap_socket`. Used by the
agent's block transfers (client.py), which run in worker threads.

EOF: a peer that closes without close_notify reads as the end of the stream (b""), as with
trio's `https_compatible`: HTTP frames its own messages, and a truncated body is caught by
its Content-Length.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import httpcore
from httpcore._backends.sync import SyncBackend, SyncStream
from httpcore._sync import http11
from httpcore._utils import is_socket_readable

TRANSPORT_RECEIVE = 256 * 1024   # bytes asked of the socket per recv
SEND_SLICE = 256 * 1024          # plaintext encrypted and sent at a time
READ_SIZE = 256 * 1024          # bytes httpcore asks per read (its own: 64 KiB)

T = TypeVar("T")

_READ_ERRORS: dict[type[Exception], type[Exception]] = {
    socket.timeout: httpcore.ReadTimeout, OSError: httpcore.ReadError}
_WRITE_ERRORS: dict[type[Exception], type[Exception]] = {
    socket.timeout: httpcore.WriteTimeout, OSError: httpcore.WriteError}
_CONNECT_ERRORS: dict[type[Exception], type[Exception]] = {
    socket.timeout: httpcore.ConnectTimeout, OSError: httpcore.ConnectError}


def _mapped(errors: dict[type[Exception], type[Exception]], call: Callable[[], T]) -> T:
    """CALL() with socket and TLS errors raised as httpcore's (as its backends do)."""
    try:
        return call()
    except Exception as exc:
        for kind, mapped in errors.items():
            if isinstance(exc, kind):
                raise mapped(exc) from exc
        raise


class BulkTLSStream(httpcore.NetworkStream):
    """A client TLS connection over a blocking socket (see the module's docstring)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext,
                 server_hostname: str | None, timeout: float | None) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing,
                                     server_hostname=server_hostname)
        # Reused for every read: fresh 256 KiB objects per read left glibc's arenas of
        # six transfer threads holding ~40 MiB more than httpcore's own backend.
        self._received = bytearray(TRANSPORT_RECEIVE)
        self._plain = bytearray(READ_SIZE)
        self._sock.settimeout(timeout)
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._receive():
                    raise ssl.SSLEOFError("the appliance closed the connection during "
                                          "the TLS handshake") from None
        self._flush()

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._sock.sendall(pending)

    def _receive(self) -> bool:
        """Feed what the socket has (waiting for something); False at EOF."""
        count = self._sock.recv_into(self._received)
        if not count:
            self._incoming.write_eof()
            return False
        with memoryview(self._received) as received:
            self._incoming.write(received[:count])
        return True

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._sock.settimeout(timeout)
        return _mapped(_READ_ERRORS, lambda: self._read(max_bytes))

    def _read(self, max_bytes: int) -> bytes:
        if len(self._plain) < max_bytes:
            self._plain = bytearray(max_bytes)
        with memoryview(self._plain) as plain:
            size = 0
            while size < max_bytes:
                try:
                    count = cast(int, self._tls.read(max_bytes - size, plain[size:]))
                except ssl.SSLWantReadError:
                    if size:                    # what has arrived: don't wait for more
                        break
                    self._flush()               # a handshake message may be due first
                    if not self._receive() and not self._incoming.pending:
                        break
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):   # closed, with or
                    break                                           # without close_notify
                if not count:
                    break
                size += count
            self._flush()
            return bytes(plain[:size])

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._sock.settimeout(timeout)
        view = memoryview(buffer)

        def send() -> None:
            for start in range(0, len(view), SEND_SLICE):
                self._tls.write(view[start:start + SEND_SLICE])
                self._flush()

        _mapped(_WRITE_ERRORS, send)

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        raise NotImplementedError("TLS in TLS (a proxy) is not used by the agent")

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._tls
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":   # an idle connection the appliance closed
            return self._incoming.pending > 0 or is_socket_readable(self._sock)
        return None


class _PlainStream(SyncStream):
    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        sock: socket.socket = self.get_extra_info("socket")
        try:
            return _mapped(_CONNECT_ERRORS,
                           lambda: BulkTLSStream(sock, ssl_context, server_hostname, timeout))
        except BaseException:
            self.close()
            raise


class BulkTLSBackend(SyncBackend):
    """httpcore's sync backend, with `BulkTLSStream` for TLS. Creating one also raises
    httpcore's per-read size to READ_SIZE (a class constant of its HTTP/1.1 connection,
    shared by the process; larger reads only ever return what has arrived)."""

    def __init__(self) -> None:
        http11.HTTP11Connection.READ_NUM_BYTES = READ_SIZE

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _PlainStream(stream.get_extra_info("socket"))
