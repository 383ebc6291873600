"""HTTPS serving: hypercorn's trio worker on a listener of our own, whose connections are
`TLSServerStream`s (appliance/tls_stream.py) instead of trio.SSLStreams.

Why: with trio.SSLStream a request body reaches h11 and the app one 16 KiB TLS record per
read, at ~150 µs of Python each, which capped uploads near 110-140 MB/s per process
(docs/benchmarks.md, "API"). TLSServerStream hands over everything decryptable per read, and
hypercorn is asked for up to MAX_RECEIVE bytes per read instead of its 64 KiB (a module
constant of hypercorn.trio.tcp_server, set here), so a 4 MiB body arrives in a few dozen
chunks.

Everything else — the handshake and its timeout, HTTP/1.1, lifespan, keep-alive,
graceful shutdown — is hypercorn's own code: `serve_https` is hypercorn's `worker_serve`
(hypercorn/trio/run.py, 0.18) with the listener built here, for one bound TLS socket (the
appliance has no plain-HTTP or QUIC binds). Keep the two in step when hypercorn changes.

Open connections are capped (`connection_cap`): every connection holds a file descriptor
and ~50 KiB of buffers and tasks, and when descriptors run out it is not only `accept`
that fails but the store's shard files and the database too. At the cap the listener
stops accepting (the kernel queues up to the backlog, then clients retry their SYN) until
a connection closes; hypercorn's timeouts (serve.hypercorn_config) and the body timeouts
(appliance/api/bodylimit.py) bound how long an idle, stalled or dribbling client holds
one. Services often start with a soft open-file limit of 1024, so `serve_https` first
raises it (`raise_open_file_limit`) as far as the hard limit allows.
"""

from __future__ import annotations

import logging
import math
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import tcp_server
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from appliance.tls_stream import TLSServerStream

log = logging.getLogger("cairnd")

MAX_RECEIVE = 1024 * 1024        # bytes hypercorn asks per read of a connection (its own: 64 KiB)
MAX_CONNECTIONS = 2048           # open connections at most (fewer if the open-file limit is low)
FD_RESERVE = 256                 # descriptors kept for the store, the database, threads, mDNS
FULL_WARNING_EVERY_S = 60.0      # at most one "connection limit reached" line per minute


def connection_cap(open_file_limit: int) -> int:
    """How many connections to accept at once under a soft open-file limit: MAX_CONNECTIONS,
    less if the limit would not leave FD_RESERVE descriptors (or half of them) free."""
    return max(1, min(MAX_CONNECTIONS, max(open_file_limit - FD_RESERVE,
                                           open_file_limit // 2)))


def open_file_target(soft: int, hard: int) -> int:
    """The soft open-file limit to ask for: enough for MAX_CONNECTIONS and FD_RESERVE, as
    far as the hard limit allows, and never lower than it is."""
    needed = MAX_CONNECTIONS + FD_RESERVE
    ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    return max(soft, ceiling)


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE towards what MAX_CONNECTIONS needs (up to the
    hard limit); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = open_file_target(soft, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target,
                        exc)
            return soft
        log.info("raised the open-file limit from %d to %d", soft, target)
    return target


class TLSListener(trio.abc.Listener[TLSServerStream]):
    """Accepts TCP connections on a bound socket and wraps each in a TLSServerStream, with
    at most `max_connections` open at once (see the module doc)."""

    def __init__(self, sock: socket.socket, ssl_context: ssl.SSLContext,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.transport_listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self._slots = trio.Semaphore(max_connections)
        self._warned_at = -math.inf

    @property
    def open_connections(self) -> int:
        return self.max_connections - self._slots.value

    async def accept(self) -> TLSServerStream:
        if self._slots.value == 0:
            self._warn_full()
        await self._slots.acquire()
        try:
            transport = await self.transport_listener.accept()
            return TLSServerStream(transport, self.ssl_context, on_close=self._slots.release)
        except BaseException:
            self._slots.release()
            raise

    def _warn_full(self) -> None:
        now = trio.current_time()
        if now - self._warned_at >= FULL_WARNING_EVERY_S:
            self._warned_at = now
            log.warning("%d connections open, the most this appliance accepts at once: new "
                        "ones wait until one closes", self.max_connections)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()


def server_ssl_context(config: HypercornConfig) -> ssl.SSLContext:
    """hypercorn's context (TLS >= 1.2, its ciphers, ALPN, the certificate), with TLS 1.2
    renegotiation refused: TLSServerStream does not support it."""
    context = config.create_ssl_context()
    if context is None:
        raise ValueError("serve_https needs a certificate and a key")
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


async def serve_https(app: ASGIFramework, config: HypercornConfig, sock: socket.socket, *,
                      shutdown_trigger: Callable[[], Awaitable[None]],
                      task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                      max_connections: int | None = None) -> None:
    """Serve `app` with TLS on the bound socket `sock` (listened on here) until
    `shutdown_trigger` returns; in-flight requests then get config.graceful_timeout.
    hypercorn's worker_serve, with our TLSListener. `max_connections`: by default
    `connection_cap` of the open-file limit, raised first (raise_open_file_limit)."""
    if max_connections is None:
        max_connections = connection_cap(raise_open_file_limit())
    config.set_statsd_logger_class(StatsdLogger)
    tcp_server.MAX_RECV = MAX_RECEIVE  # hypercorn's per-read size (module constant)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    ssl_context = server_ssl_context(config)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sock.listen(config.backlog)
            listener = TLSListener(sock, ssl_context, max_connections)
            bind = f"https://{repr_socket_addr(sock.family, sock.getsockname())}"
            await config.log.info(f"Running on {bind} (CTRL + C to quit)")
            log.info("accepting up to %d connections at once", max_connections)
            task_status.started([bind])
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(partial(
                        trio.serve_listeners,
                        partial(TCPServer, wrapped, config, context,
                                ConnectionState(lifespan_state.copy())),
                        [listener], handler_nursery=server_nursery))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = (trio.current_time()
                                                        + config.graceful_timeout)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
