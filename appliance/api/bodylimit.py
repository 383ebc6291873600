"""An ASGI middleware that bounds what one request can make the appliance hold, and for how
long, before anything buffers it. The README's "Limits" lists the numbers.

- The head: at most MAX_HEADERS headers and MAX_HEAD_BYTES of request target and headers,
  else 431. h11 already refuses a head that grows past MAX_HEAD_BYTES as it arrives
  (serve.hypercorn_config), but it parses one that arrives whole in a single read, and
  hypercorn reads up to 1 MiB at a time (appliance/https.py); this makes the limit exact.
- The body's size, per route: a declared Content-Length over the limit is answered 413 at
  once, and a body that grows past it while streaming raises PayloadTooLargeError (413) in
  whoever reads it.
- Who may send a large body: past PREAUTH_BODY_BYTES a body is read on only for a request
  whose bearer token is an active device's (PUT /blocks/… excepted: its route checks the
  URL's signature before it reads), else the reader gets UnauthorizedError (401). Why:
  FastAPI reads and parses a JSON body before a route's dependencies authenticate the
  caller, so anyone could make the appliance parse 32 MiB of JSON per request (eight at
  once took its RSS from 74 to 633 MiB).
- The body's pace (`body_deadline`): each piece must come within BODY_IDLE_TIMEOUT_S, and
  after BODY_GRACE_S the body must have averaged MIN_BODY_RATE, else the reader gets
  RequestTimeoutError (408) and the connection is closed. A client dribbling a byte at a
  time holds its connection for about BODY_GRACE_S, not forever. The head's own pace is
  hypercorn's keep-alive timeout, which runs until a request's head is complete.

Once the body is complete, `receive` is passed through untimed: a streaming response
(the event stream) waits on it for the client's disconnect for as long as it runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.context import ApiContext, device_of_token, token_of_header
from appliance.errors import PayloadTooLargeError, RequestTimeoutError
from protocol.errors import ErrorCode

KiB = 1024
MiB = 1024 * KiB
DEFAULT_LIMIT = 8 * MiB
MAX_HEAD_BYTES = 16 * KiB          # request target + header names and values
MAX_HEADERS = 100
PREAUTH_BODY_BYTES = 64 * KiB      # body bytes read before the caller must be a device
PREAUTH_EXEMPT = (("PUT", "/blocks/"),)   # signed URLs, checked by the route first
BODY_IDLE_TIMEOUT_S = 30.0         # longest wait for the next piece of a body
BODY_GRACE_S = 30.0                # a body may be slower than MIN_BODY_RATE this long
MIN_BODY_RATE = 16 * KiB           # bytes per second a body averages after the grace


def body_deadline(started: float, received: int, now: float) -> float:
    """When the next piece of a body must have arrived, for a body whose first piece was
    asked for at `started` and of which `received` bytes have come by `now`."""
    return min(now + BODY_IDLE_TIMEOUT_S, started + BODY_GRACE_S + received / MIN_BODY_RATE)


def head_problem(scope: Scope) -> str | None:
    """Why the request's head is too large, or None."""
    headers = scope.get("headers", ())
    if len(headers) > MAX_HEADERS:
        return f"more than {MAX_HEADERS} headers"
    size = len(scope.get("raw_path") or scope["path"].encode()) + len(scope["query_string"])
    size += sum(len(name) + len(value) for name, value in headers)
    if size > MAX_HEAD_BYTES:
        return f"request target and headers over {MAX_HEAD_BYTES} bytes"
    return None


class BodyLimit:
    def __init__(self, app: ASGIApp, rules: Sequence[tuple[str, str, int]],
                 default: int = DEFAULT_LIMIT) -> None:
        """`rules`: (method, path prefix, limit in bytes), first match wins."""
        self.app = app
        self.rules = rules
        self.default = default

    def limit_for(self, method: str, path: str) -> int:
        for rule_method, prefix, limit in self.rules:
            if method == rule_method and path.startswith(prefix):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = head_problem(scope)
        if problem is not None:
            await _refuse(send, 431, ErrorCode.HTTP_ERROR, f"request head too large: {problem}")
            return
        limit = self.limit_for(scope["method"], scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _refuse(send, 413, ErrorCode.PAYLOAD_TOO_LARGE,
                              f"request body over {limit} bytes")
                return
        await self.app(scope, _BoundedBody(scope, receive, limit).receive, send)


class _BoundedBody:
    """One request's `receive`, bounded in size, pace and who may send much (module doc)."""

    def __init__(self, scope: Scope, receive: Receive, limit: int) -> None:
        self.scope = scope
        self.inner = receive
        self.limit = limit
        self.received = 0
        self.started: float | None = None
        self.complete = False
        self.vouched = any(scope["method"] == method and scope["path"].startswith(prefix)
                           for method, prefix in PREAUTH_EXEMPT)

    async def receive(self) -> Message:
        if self.complete:
            return await self.inner()
        now = trio.current_time()
        if self.started is None:
            self.started = now
        try:
            with trio.fail_at(body_deadline(self.started, self.received, now)):
                message = await self.inner()
        except trio.TooSlowError:
            raise RequestTimeoutError(
                f"the request body came too slowly ({self.received} bytes in "
                f"{now - self.started:.0f} s)") from None
        if message["type"] != "http.request":
            self.complete = True
            return message
        self.received += len(message.get("body", b""))
        self.complete = not message.get("more_body", False)
        if self.received > self.limit:
            raise PayloadTooLargeError(f"request body over {self.limit} bytes")
        if self.received > PREAUTH_BODY_BYTES and not self.vouched:
            await self._vouch()
        return message

    async def _vouch(self) -> None:
        """Raise UnauthorizedError unless the request's bearer token is an active device's."""
        context: ApiContext = self.scope["app"].state.context
        header = _header(self.scope, b"authorization")
        await device_of_token(context, token_of_header(header))
        self.vouched = True


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


async def _refuse(send: Send, status: int, code: ErrorCode, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    start: dict[str, Any] = {"type": "http.response.start", "status": status,
                             "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode()),
                                         (b"connection", b"close")]}
    await send(start)
    await send({"type": "http.response.body", "body": body})
