"""An ASGI middleware that bounds request bodies per route, before anything buffers them:
a declared Content-Length over the limit is answered 413 at once, and a body that grows
past it while streaming raises PayloadTooLargeError (413) in whoever is reading it."""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.errors import PayloadTooLargeError
from protocol.errors import ErrorCode

MiB = 1024 * 1024
DEFAULT_LIMIT = 8 * MiB


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
        limit = self.limit_for(scope["method"], scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _refuse(send, limit)
                return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(f"request body over {limit} bytes")
            return message

        await self.app(scope, bounded_receive, send)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"error": {"code": ErrorCode.PAYLOAD_TOO_LARGE,
                                 "message": f"request body over {limit} bytes"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
