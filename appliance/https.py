"""HTTPS serving: hypercorn's trio worker on a listener of our own, whose connections are
`TLSServerStream`s (appliance/tls_stream.py) instead of trio.SSLStreams.

Why: with trio.SSLStream a request body reaches h11 and the app one 16 KiB TLS record per
read, at ~150 µs of Python each, which capped uploads near 110-140 MB/s per process
(docs/benchmarks.md, "API"). TLSServerStream hands over everything decryptable per read, and
hypercorn is asked for up to MAX_RECEIVE bytes per read instead of its 64 KiB (a module
constant of hypercorn.trio.tcp_server, set here), so a 4 MiB body arrives in a few dozen
chunks.

Everything else — the handshake and its timeout, HTTP/1.1 and h2, lifespan, keep-alive,
graceful shutdown — is hypercorn's own code: `serve_https` is hypercorn's `worker_serve`
(hypercorn/trio/run.py, 0.18) with the listener built here, for one bound TLS socket (the
appliance has no plain-HTTP or QUIC binds). Keep the two in step when hypercorn changes.
"""

from __future__ import annotations

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

MAX_RECEIVE = 1024 * 1024        # bytes hypercorn asks per read of a connection (its own: 64 KiB)


class TLSListener(trio.abc.Listener[TLSServerStream]):
    """Accepts TCP connections on a bound socket and wraps each in a TLSServerStream."""

    def __init__(self, sock: socket.socket, ssl_context: ssl.SSLContext) -> None:
        self.transport_listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self.ssl_context = ssl_context

    async def accept(self) -> TLSServerStream:
        return TLSServerStream(await self.transport_listener.accept(), self.ssl_context)

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
                      ) -> None:
    """Serve `app` with TLS on the bound socket `sock` (listened on here) until
    `shutdown_trigger` returns; in-flight requests then get config.graceful_timeout.
    hypercorn's worker_serve, with the DrainingSSLListener."""
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
            listener = TLSListener(sock, ssl_context)
            bind = f"https://{repr_socket_addr(sock.family, sock.getsockname())}"
            await config.log.info(f"Running on {bind} (CTRL + C to quit)")
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
