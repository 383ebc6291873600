"""An ASGI middleware that names the API version (protocol.version) in every answer's
`Cairn-Api-Version` header, errors and streams included, so a client learns on its first
answer whether it speaks this appliance's API."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.version import API_VERSION, HEADER

_HEADER = (HEADER.lower().encode("ascii"), API_VERSION.encode("ascii"))


class ApiVersionHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), _HEADER]}
            await send(message)

        await self.app(scope, receive, send_with_version)
