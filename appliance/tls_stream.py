"""A server-side TLS stream for trio that decrypts everything already received per read.

Why not `trio.SSLStream`: OpenSSL's `SSL_read` returns at most one TLS record (16 KiB) per
call, and trio.SSLStream turns each call into one `receive_some` with a full trip through
its `_retry` loop (locks, a scheduler checkpoint), then through hypercorn's per-read
`fail_after`, h11 and an ASGI message. At ~150 µs of Python per 16 KiB that capped an upload
near 110-140 MB/s per process however little the app did (docs/benchmarks.md, "API").
trio.SSLStream cannot be subclassed (it is final at runtime), so this is a small stream of
our own on the same parts: an `ssl.SSLObject` over two `MemoryBIO`s and a trio transport.

`receive_some` reads up to TRANSPORT_RECEIVE bytes from the socket at a time and returns
every record it can decrypt from what has arrived (up to `max_bytes`), so a 4 MiB body
reaches h11 and the app in a few dozen large chunks. Decryption stays in C (one
`SSLObject.read` per record, which releases the GIL).

Theory of operation. One task may receive and one may send at a time (concurrent calls in
one direction raise BusyResourceError, as trio's streams do); hypercorn receives in one
task and sends in another. The SSLObject is only touched between awaits, so each
interaction with it is atomic. Bytes the SSLObject produces go to the outgoing BIO, and
only a holder of `_send_lock` moves them from the BIO to the socket, looping until the BIO
is empty: BIO order is wire order, whoever sends.

- send_all: encrypt the data into the BIO and flush it under the lock, SEND_SLICE bytes
  at a time (so a 4 MiB answer is never held twice more as ciphertext).
- receive_some: decrypt every complete record buffered (stopping at `max_bytes`); a read
  can also produce bytes to send — a TLS 1.3 KeyUpdate answer, an alert, a refusal to
  renegotiate — which are flushed when the lock is free. When it is not, its holder is
  sending and will find them in the BIO before it lets go, so the receiver never waits
  behind a sender (a peer that is itself blocked sending to us could otherwise deadlock
  both). With no complete record, read more from the socket and retry.
- Post-handshake messages without data (NewSessionTicket, KeyUpdate) decrypt to nothing
  and read as "want more"; an incomplete record likewise.
- Errors: an SSLError makes the stream broken (every later call: BrokenResourceError),
  except that records already decrypted in the same call are returned first — each was
  authenticated on its own — and the error is raised by the next call. As with trio's
  `https_compatible=True` (what hypercorn asks of trio), an EOF without close_notify reads
  as b"", and aclose closes the socket without sending close_notify: HTTP frames its own
  messages, and waiting for a peer to read a close_notify could hang.
- The handshake runs once, before anything else (hypercorn calls do_handshake first, under
  its own timeout). A TLS 1.3 server's session tickets, which OpenSSL emits at the end of
  the handshake, are held back until the first send, as trio does (trio issue #819).
- TLS 1.2 renegotiation is refused (`OP_NO_RENEGOTIATION` on the context, set by the
  listener); nothing here supports it.

- Closing (aclose, which trio's serve_listeners always ends a connection with) calls the
  `on_close` hook once: the listener counts open connections with it.

What it does not do: client mode, unwrap, close_notify, half-close (`send_eof`: hypercorn
treats its absence as "a TLS stream").
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import trio

TRANSPORT_RECEIVE = 256 * 1024   # bytes asked of the socket per read (trio's default: 64 KiB)
DEFAULT_RECEIVE = 256 * 1024     # plaintext bytes per receive_some when not told
SEND_SLICE = 256 * 1024          # plaintext encrypted and sent at a time by send_all


class TLSServerStream(trio.abc.Stream):
    """Server side of a TLS connection over `transport_stream` (see the module doc)."""

    def __init__(self, transport_stream: trio.abc.Stream, context: ssl.SSLContext, *,
                 on_close: Callable[[], None] | None = None) -> None:
        """`on_close` is called once, when the stream is closed (the listener's connection
        count: appliance/https.py)."""
        self.transport_stream = transport_stream
        self._on_close = on_close
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._send_lock = trio.Lock()          # held while moving BIO bytes to the socket
        self._handshake_lock = trio.Lock()
        self._handshake_done = False
        self._held_back = b""                   # TLS 1.3 session tickets, until first send
        self._receiving = False
        self._sending = False
        self._broken: BaseException | None = None
        self._closed = False
        self._deferred: ssl.SSLError | None = None  # met after decrypting some records

    # -- information hypercorn asks for ---------------------------------------------------

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._ssl.version()

    # -- handshake ------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the TLS handshake (once; later calls return at once)."""
        self._check_usable()
        async with self._handshake_lock:
            if self._handshake_done:
                return
            try:
                # A TLS client speaks first. Wait for its first bytes before OpenSSL starts:
                # its first do_handshake allocates ~32 KiB of record buffers, which a silent
                # connection (one of a thousand idle ones, say) need not hold.
                if not self._incoming.pending:
                    await self._fill()
                while True:
                    try:
                        self._ssl.do_handshake()
                    except ssl.SSLWantReadError:
                        await self._flush()
                        await self._fill()
                        continue
                    break
            except ssl.SSLError as exc:
                self._break(exc)
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            except BaseException as exc:
                self._break(exc)
                raise
            if self._ssl.version() == "TLSv1.3":
                self._held_back = self._outgoing.read()
            else:
                await self._flush()  # a TLS 1.2 server speaks last
            self._handshake_done = True

    # -- receiving ------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            return await self._receive(DEFAULT_RECEIVE if max_bytes is None
                                       else int(max_bytes))
        finally:
            self._receiving = False

    async def _receive(self, limit: int) -> bytes:
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            return await self._receive_failed(exc)
        self._check_usable()
        if not self._handshake_done:
            await self.do_handshake()
        while True:
            chunks, error, closed = self._decrypt(limit)
            if self._outgoing.pending and not self._send_lock.locked():
                await self._flush()
            if chunks:
                self._deferred = error
                await trio.lowlevel.checkpoint()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if error is not None:
                return await self._receive_failed(error)
            if closed:
                await trio.lowlevel.checkpoint()
                return b""
            await self._fill()

    def _decrypt(self, limit: int) -> tuple[list[bytes], ssl.SSLError | None, bool]:
        """Every record decryptable from what has arrived, up to `limit` bytes; then the
        error that stopped it, if any, and whether the peer closed (close_notify)."""
        chunks: list[bytes] = []
        total = 0
        while total < limit:
            try:
                data = self._ssl.read(limit - total)
            except ssl.SSLWantReadError:
                return chunks, None, False
            except ssl.SSLZeroReturnError:
                return chunks, None, True
            except ssl.SSLError as exc:
                return chunks, exc, False
            if not data:
                return chunks, None, True
            chunks.append(data)
            total += len(data)
        return chunks, None, False

    async def _receive_failed(self, exc: ssl.SSLError) -> bytes:
        self._break(exc)
        await trio.lowlevel.checkpoint()
        if _is_eof(exc):
            return b""
        raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def _fill(self) -> None:
        """Move the next bytes from the socket into the incoming BIO (EOF included)."""
        try:
            data = await self.transport_stream.receive_some(TRANSPORT_RECEIVE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._break(exc)
            raise
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    # -- sending --------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            self._check_usable()
            if not self._handshake_done:
                await self.do_handshake()
            view = memoryview(data)
            while view:
                # A slice at a time: the ciphertext of a whole 4 MiB block would sit in the
                # BIO and again in the bytes read out of it (memory per download in flight).
                piece, view = view[:SEND_SLICE], view[SEND_SLICE:]
                try:
                    while piece:  # a MemoryBIO never refuses a write: one call takes it all
                        piece = piece[self._ssl.write(piece):]
                except ssl.SSLError as exc:
                    self._break(exc)
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                await self._flush()
        finally:
            self._sending = False

    async def _flush(self) -> None:
        """Send everything in the outgoing BIO (and held-back tickets first), in order."""
        async with self._send_lock:
            while self._outgoing.pending or self._held_back:
                chunk, self._held_back = self._held_back + self._outgoing.read(), b""
                try:
                    await self.transport_stream.send_all(chunk)
                except BaseException as exc:
                    # Some unknown part went out: the stream cannot continue.
                    self._break(exc)
                    raise

    async def wait_send_all_might_not_block(self) -> None:
        async with self._send_lock:
            await self.transport_stream.wait_send_all_might_not_block()

    # -- closing --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the socket (no close_notify: see the module doc)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            await self.transport_stream.aclose()
        finally:
            if self._on_close is not None:
                self._on_close()

    # -- state ----------------------------------------------------------------------------

    def _break(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("this TLS stream is broken") from self._broken


def _is_eof(exc: ssl.SSLError) -> bool:
    """An EOF without close_notify (some arrive as plain SSLError; trio tests the same)."""
    return isinstance(exc, ssl.SSLEOFError) or \
        "UNEXPECTED_EOF_WHILE_READING" in str(getattr(exc, "strerror", "") or "")
