"""The peer server: blocks served to the user's other devices, over mutual TLS.

Theory of operation
-------------------
HTTP/1.1 over TLS 1.3 (`PeerIdentity.server_context`: the client must present a
certificate the pinned device CA signed, or the handshake fails), two routes of
protocol/peers.py:

    POST PEER_HAVE_PATH   PeerHaveRequest  -> 200 PeerHaveResult
    POST PEER_BLOCK_PATH  PeerBlockRequest -> 200 the ciphertext (octet-stream, exact
                                              Content-Length), 404 {reason: "not_held"}

Every request is authorized on its own (`authorize`, pure), in this order, and a refusal
is a 403 PeerRefusal{reason, message}, one INFO line (never a block's content) and a count
by reason:

1. the certificate presented on this connection: readable (`certified_device`), of our
   appliance, of OUR user (a device of another user: "other_user"), not revoked (the list
   is read again at each request: a revocation that arrives while a connection is open
   applies to its next request);
2. the grants: each signed by the pinned device signing key, unexpired, bound to this
   certificate's device id, key and user, and together covering every id asked for.

Why threads and blocking sockets: the stdlib's ssl encrypts and decrypts in C with the GIL
released (agent/client.py says the same for downloads), and reading a file, re-encrypting
and hashing a block are blocking work anyway. One accept thread waits on every listening
socket (one per LAN address: the server never binds the wildcard), each connection gets a
thread of its own up to MAX_CONNECTIONS (past that a connection is closed at once), a
handshake must finish within HANDSHAKE_TIMEOUT_S and a connection idle for IDLE_TIMEOUT_S
is closed. Bodies are at most PEER_MAX_BODY.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from agent.errors import PeerError
from agent.peers.identity import CertifiedDevice, certified_device
from agent.peers.sources import BlockSource
from protocol.peers import (
    PEER_BLOCK_PATH,
    PEER_HAVE_PATH,
    PEER_MAX_BODY,
    GrantError,
    PeerBlockRequest,
    PeerHaveRequest,
    PeerHaveResult,
    PeerRefusal,
    check_grant,
    verify_grant,
)

log = logging.getLogger("cairn.peers")
M = TypeVar("M", bound=BaseModel)

MAX_CONNECTIONS = 32
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 30.0


# --- authorization (pure) -------------------------------------------------------------

class Refused(Exception):
    """A request that must not be served: STATUS, a stable REASON, a MESSAGE."""

    def __init__(self, reason: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Us:
    """Whose blocks this server serves: our appliance and our user (from our own
    certificate), and the key that signs grants (the pinned device CA's)."""

    appliance_id: str
    user_tag: str
    signing_key: Ed25519PublicKey


def check_device(device: CertifiedDevice | None, us: Us,
                 revoked: Callable[[str], bool]) -> CertifiedDevice:
    """The requesting DEVICE if it may be served at all (step 1 of the module)."""
    if device is None:
        raise Refused("bad_certificate", "no readable device certificate")
    if device.appliance_id != us.appliance_id:
        raise Refused("other_appliance", "a device of another appliance")
    if device.user_tag != us.user_tag:
        raise Refused("other_user", "a device of another user")
    if revoked(device.device_id):
        raise Refused("revoked", "this device was revoked")
    return device


def check_grants(device: CertifiedDevice, us: Us, grants: Sequence[str],
                 block_ids: Sequence[str], now: float) -> None:
    """Step 2 of the module: GRANTS, all valid and bound to DEVICE, cover BLOCK_IDS."""
    covered: set[str] = set()
    try:
        for token in grants:
            grant = verify_grant(token, us.signing_key, now)
            check_grant(grant, appliance_id=us.appliance_id, device_id=device.device_id,
                        key_sha256=device.key_sha256, user_tag=us.user_tag, block_ids=())
            covered |= grant.blocks
    except GrantError as exc:
        raise Refused(exc.reason, str(exc)) from None
    missing = [b for b in block_ids if b not in covered]
    if missing:
        raise Refused("other_blocks", f"no grant covers block {missing[0][:12]}")


def authorize(device: CertifiedDevice | None, us: Us, revoked: Callable[[str], bool],
              grants: Sequence[str], block_ids: Sequence[str], now: float
              ) -> CertifiedDevice:
    """The device, if it may read BLOCK_IDS with GRANTS; raises Refused otherwise."""
    checked = check_device(device, us, revoked)
    if not grants:
        raise Refused("no_grant", "a request without a grant")
    check_grants(checked, us, grants, block_ids, now)
    return checked


# --- counters -------------------------------------------------------------------------

class PeerCounters:
    """What the server did, for tests and `cairn status` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.served_blocks = 0
        self.served_bytes = 0
        self.have_requests = 0
        self.not_held = 0
        self.connections = 0
        self.refusals: Counter[str] = Counter()

    def served(self, size: int) -> None:
        with self._lock:
            self.served_blocks += 1
            self.served_bytes += size

    def count(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)

    def refused(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"served_blocks": self.served_blocks, "served_bytes": self.served_bytes,
                    "have_requests": self.have_requests, "not_held": self.not_held,
                    "connections": self.connections, "refusals": dict(self.refusals)}


# --- the server -----------------------------------------------------------------------

class PeerServer:
    """Serves SOURCE's blocks to the devices `authorize` lets in (see the module).

    `listen(addresses, port)` binds, `start()` runs the accept thread, `stop()` closes
    everything and waits (bounded) for the connection threads. `context` and `us` may be
    replaced while it runs (a renewed certificate): new connections use the new ones."""

    def __init__(self, context: ssl.SSLContext, us: Us, source: BlockSource,
                 revoked: Callable[[str], bool], *, counters: PeerCounters | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.context = context
        self.us = us
        self.source = source
        self.revoked = revoked
        self.counters = counters or PeerCounters()
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listeners: list[socket.socket] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._accepter: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self.port = 0

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

    def listen(self, addresses: Iterable[str], port: int) -> int:
        """Bind every one of ADDRESSES on PORT (0: a free port, the same for all when it
        can be; else each its own). The port of the first; raises OSError if none binds."""
        errors: list[str] = []
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listener.bind((address, port or self.port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or not (port or self.port):
                        raise
                    listener.bind((address, 0))   # taken (another agent of this home)
                listener.listen(64)
                listener.setblocking(False)
            except OSError as exc:
                listener.close()
                errors.append(f"{address}: {exc.strerror or exc}")
                continue
            self._listeners.append(listener)
            if not self.port:
                self.port = listener.getsockname()[1]
        if not self._listeners:
            raise OSError(f"cannot listen for peers ({'; '.join(errors) or 'no address'})")
        for error in errors:
            log.info("not serving peers on %s", error)
        return self.port

    def start(self) -> None:
        self._accepter = threading.Thread(target=self._accept_loop, name="peer-accept",
                                          daemon=True)
        self._accepter.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._accepter is not None:
            self._accepter.join(timeout)
        with self._open_lock:
            for connection in list(self._open):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for listener in self._listeners:
            listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- accepting ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            for listener in self._listeners:
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r or self._stopping.is_set():
                        return
                    ready = key.fileobj
                    if not isinstance(ready, socket.socket):
                        continue
                    try:
                        connection, address = ready.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.warning("peer server: accept failed: %s", exc)
                        time.sleep(0.1)    # e.g. EMFILE: do not spin
                        continue
                    self._admit(connection, address)

    def _admit(self, connection: socket.socket, address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.info("peer server busy: closing a connection from %s", address[0])
            self.counters.refused("busy")
            connection.close()
            return
        thread = threading.Thread(target=self._serve_connection, args=(connection, address),
                                  name="peer-conn", daemon=True)
        with self._open_lock:
            self._open.add(connection)
            self._threads.add(thread)
        thread.start()

    def _serve_connection(self, connection: socket.socket, address: Any) -> None:
        try:
            self.counters.count("connections")
            connection.setblocking(True)
            connection.settimeout(self.handshake_timeout_s)
            try:
                tls = self.context.wrap_socket(connection, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.counters.refused("handshake")
                log.info("peer refused at the TLS handshake from %s: %s", address[0],
                         getattr(exc, "reason", None) or exc)
                return
            with self._open_lock:
                self._open.add(tls)
            try:
                device = self._device_of(tls)
                tls.settimeout(self.idle_timeout_s)
                _Handler(tls, address, self, device)
            except (OSError, ssl.SSLError) as exc:
                log.debug("peer connection from %s ended: %s", address[0], exc)
            finally:
                with self._open_lock:
                    self._open.discard(tls)
                with contextlib.suppress(OSError):
                    tls.close()
        finally:
            with self._open_lock:
                self._open.discard(connection)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                connection.close()
            self._slots.release()

    @staticmethod
    def _device_of(tls: ssl.SSLSocket) -> CertifiedDevice | None:
        der = tls.getpeercert(binary_form=True)
        if not der:
            return None
        try:
            return certified_device(der)
        except PeerError:
            return None

    # -- requests (called from the handler) --------------------------------------------

    def device_allowed(self, device: CertifiedDevice | None) -> CertifiedDevice:
        return check_device(device, self.us, self.revoked)

    def authorized(self, device: CertifiedDevice | None, grants: Sequence[str],
                   block_ids: Sequence[str]) -> CertifiedDevice:
        return authorize(device, self.us, self.revoked, grants, block_ids, self.clock())


def _who(device: CertifiedDevice | None, address: Any) -> str:
    if device is None:
        return f"{address[0]}"
    return f"{address[0]} (device {device.device_id[:8]}…)"


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection's requests (keep-alive), on a socket already past the handshake."""

    protocol_version = "HTTP/1.1"
    server_version = "cairn-peer"
    sys_version = ""
    server: PeerServer  # type: ignore[assignment]

    def __init__(self, request: ssl.SSLSocket, address: Any, server: PeerServer,
                 device: CertifiedDevice | None) -> None:
        self.device = device
        super().__init__(request, address, server)  # type: ignore[arg-type]

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("peer %s: " + format, self.client_address[0], *args)

    # -- the routes --------------------------------------------------------------------

    def do_POST(self) -> None:
        try:
            if self.path in (PEER_HAVE_PATH, PEER_BLOCK_PATH):
                # Who asks, before anything they sent is read (a device refused here is
                # not served again on this connection: it is closed after the answer).
                try:
                    self.server.device_allowed(self.device)
                except Refused:
                    self._discard_body()       # so that the answer reaches the client
                    self.close_connection = True
                    raise
            if self.path == PEER_HAVE_PATH:
                self._have(self._body(PeerHaveRequest))
            elif self.path == PEER_BLOCK_PATH:
                self._block(self._body(PeerBlockRequest))
            else:
                self._refuse(Refused("no_route", f"no such path {self.path[:80]!r}", 404),
                             count=False)
        except Refused as refusal:
            self._refuse(refusal, count=refusal.status == 403)

    def do_GET(self) -> None:
        self._refuse(Refused("no_route", "the peer API takes POST only", 405), count=False)

    def _discard_body(self) -> None:
        """Read and drop the body (if it is within the limit): unread, it would make the
        kernel reset the connection when we close it, and the answer would be lost."""
        with contextlib.suppress(ValueError, OSError):
            length = int(self.headers.get("Content-Length", "0"))
            if 0 < length <= PEER_MAX_BODY:
                self.rfile.read(length)

    def _body(self, model: type[M]) -> M:
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise Refused("bad_request", "a request needs a Content-Length", 411)
        if length > PEER_MAX_BODY:
            self.close_connection = True
            raise Refused("too_large", f"a request body is at most {PEER_MAX_BODY} bytes", 413)
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise Refused("bad_request", "the body ended early", 400)
        try:
            data = json.loads(body)
        except ValueError:
            raise Refused("bad_request", "a body that is not JSON", 400) from None
        if isinstance(data, dict) and not (data.get("grant") or data.get("grants")):
            raise Refused("no_grant", "a request without a grant")
        try:
            return model.model_validate(data)
        except ValidationError:
            raise Refused("bad_request", "a body that is not a valid request", 400) from None

    def _have(self, request: PeerHaveRequest) -> None:
        ids = list(dict.fromkeys(request.ids))
        self.server.authorized(self.device, request.grants, ids)
        self.server.counters.count("have_requests")
        held = self.server.source.holds(ids)
        self._json(200, PeerHaveResult(have=held))

    def _block(self, request: PeerBlockRequest) -> None:
        self.server.authorized(self.device, [request.grant], [request.id])
        data = self.server.source.read(request.id)
        if data is None:
            self.server.counters.count("not_held")
            self._json(404, PeerRefusal(reason="not_held", message="this peer does not "
                                                                   "hold that block"))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.counters.served(len(data))

    # -- answers -----------------------------------------------------------------------

    def _refuse(self, refusal: Refused, *, count: bool) -> None:
        if count:
            self.server.counters.refused(refusal.reason)
            log.info("peer request refused (%s) from %s: %s", refusal.reason,
                     _who(self.device, self.client_address), refusal.message)
        self._json(refusal.status, PeerRefusal(reason=refusal.reason,
                                               message=refusal.message))

    def _json(self, status: int, body: BaseModel) -> None:
        data = body.model_dump_json().encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
