"""The new device's small HTTPS endpoint (blocking, in threads).

A request is a handful of small JSON bodies, so this is the stdlib: a TCP server per
listening address, a thread per connection (at most MAX_CONNECTIONS at once, the rest
closed at once), one request per connection (HTTP/1.0), bodies of at most MAX_BODY bytes,
every socket operation bounded by IO_TIMEOUT_S.

The TLS context is chosen per connection, when it is accepted (`context_for`): before the
hello none asks for a client certificate (the endpoint trusts no CA yet); from the hello on,
every connection is asked for one signed by the hello's CA, and one signed by another CA
fails the handshake. The certificate a connection presented (DER, or None) is handed to the
application with the request, which decides.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger("cairn.pairing")

MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 16
IO_TIMEOUT_S = 15.0
DRAIN_S = 5.0

# (method, path, body, client certificate DER or None) -> (status, JSON body)
Application = Callable[[str, str, bytes, bytes | None], tuple[int, bytes]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = "cairn-join"
    sys_version = ""

    def _answer(self) -> None:
        length_text = self.headers.get("Content-Length", "0")
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._send(413, b'{"error": "body too large"}')
            return
        body = self.rfile.read(length) if length else b""
        certificate = self.connection.getpeercert(binary_form=True)
        try:
            status, answer = self.server.application(self.command, self.path, body,
                                                     certificate)
        except Exception:
            log.exception("the join endpoint failed on %s %s", self.command, self.path)
            status, answer = 500, b'{"error": "internal error"}'
        self._send(status, answer)

    do_GET = do_POST = _answer

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("join endpoint %s: " + format, self.client_address[0], *args)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], application: Application,
                 context_for: Callable[[], ssl.SSLContext],
                 slots: threading.BoundedSemaphore) -> None:
        self.application = application
        self.context_for = context_for
        self.slots = slots
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(IO_TIMEOUT_S)
            tls = self.context_for().wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("join endpoint: handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            _Handler(tls, client_address, self)
        except (OSError, ssl.SSLError) as exc:
            log.debug("join endpoint: %s: %s", client_address[0], exc)
        finally:
            tls.close()

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Endpoint:
    """Servers on ADDRESSES (one port for all: the first free one, then the same), started
    in daemon threads; `close()` stops them."""

    def __init__(self, addresses: list[str], application: Application,
                 context_for: Callable[[], ssl.SSLContext]) -> None:
        slots = self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.servers: list[_Server] = []
        self._started = False
        self.port = 0
        try:
            for address in addresses:
                self.servers.append(_Server((address, self.port), application, context_for,
                                            slots))
                self.port = self.servers[0].server_address[1]
        except BaseException:
            self.close()
            raise
        self.addresses = list(addresses)
        for server in self.servers:
            threading.Thread(target=server.serve_forever, args=(0.2,),
                             name="cairn-join-endpoint", daemon=True).start()
        self._started = True

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Stop accepting, close the listening sockets, and give the connections in
        progress up to DRAIN_S to finish (an approval's answer is written after the
        command learnt it joined: it must still reach the approver)."""
        for server in self.servers:
            if self._started:
                server.shutdown()
            server.server_close()
        self.servers = []
        deadline = time.monotonic() + drain_s
        taken = 0
        while taken < MAX_CONNECTIONS and \
                self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            taken += 1
        for _ in range(taken):
            self._slots.release()
