"""The agent's connection to its appliance: the JSON API and block transfers.

Two httpx clients share one pinned TLS context (the certificate recorded at join, nothing
else is trusted):

- `call` (httpx.AsyncClient under trio) for the JSON control plane;
- `put_block` / `get_block` (httpcore's blocking connection pool) for block bodies, run in
  worker threads by the transfer pipeline. The stdlib's blocking SSL sockets decrypt in C
  with the GIL released, several times faster per byte than an async TLS stream in Python,
  and the threads that hash and encrypt a block can send it without handing bytes back to
  the loop. httpcore rather than httpx.Client here: an httpx Response and its stream refer to
  each other, so every 4 MiB body lived until the cyclic garbage collector ran — hundreds of
  MiB of RSS on a long transfer. httpcore's responses are freed when dropped.

Failures are translated here, once: HTTP error bodies become agent errors chosen by their
wire `code` (protocol.errors), never by HTTP status, and transient failures (connection
refused or reset, timeouts, a rate limit, a store that is busy, a proxy's 502-504) are retried
with exponential backoff and jitter; a block the appliance calls unrecoverable is asked for
once more, a second later (`retry_wait`). The first answer's `Cairn-Api-Version` header is checked:
an appliance of another major API version stops the agent with one clear line.

When the remembered address refuses or ignores connections twice, the agent looks for its
appliance (by appliance id) on the LAN with mDNS, checks the certificate there is the pinned
one, remembers the new address and carries on (`rediscover`).
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import httpcore
import httpx
import trio

from agent.bulk_tls import BulkTLSBackend
from agent.discovery import discovery_enabled, find_appliances
from agent.errors import (
    ApiError,
    ForbiddenError,
    IncompatibleApplianceError,
    IntegrityError,
    NotEnrolledError,
    RemoteConflictError,
    RemoteNotFoundError,
    TransportError,
)
from agent.home import AgentHome, DeviceRecord
from protocol import version
from protocol.errors import ErrorCode
from protocol.limits import MAX_BLOCK_BYTES

log = logging.getLogger(__name__)

# Errors that may go away if we wait: a rate limit, a store that is busy or lost a disk a
# moment ago. Not block_not_found: the block is gone, and retrying only delays the error
# the user needs.
TRANSIENT_CODES = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.STORAGE, ErrorCode.DISK})
# block_unrecoverable (too few healthy shards) is asked once more, after
# UNRECOVERABLE_RETRY_S, and only once: the appliance may have just rebuilt a disk whose
# shards its read had not seen yet (issue 14), and a second "unrecoverable" is believed.
RETRY_ONCE_CODES = frozenset({ErrorCode.BLOCK_UNRECOVERABLE})
UNRECOVERABLE_RETRY_S = 1.0
# An answer without a Cairn error body with one of these statuses comes from something in
# between (a proxy) or a server still starting: worth a retry too.
TRANSIENT_STATUSES = frozenset({502, 503, 504})
_JSON_HEADERS = {"Content-Type": "application/json"}
_dumps, _loads = json.dumps, json.loads   # `call` has a parameter named json
ERROR_CLASSES: dict[ErrorCode, type[ApiError]] = {
    ErrorCode.NOT_FOUND: RemoteNotFoundError,
    ErrorCode.BLOCK_NOT_FOUND: RemoteNotFoundError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.ENROLLMENT_REFUSED: ForbiddenError,
    ErrorCode.CONFLICT: RemoteConflictError,
}
BLOCK_TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.TimeoutException,
                          httpcore.RemoteProtocolError)
CONNECT_TIMEOUT_S = 5.0   # a LAN connects in milliseconds; a moved appliance must not stall
BLOCK_TIMEOUTS = {"connect": CONNECT_TIMEOUT_S, "read": 60.0, "write": 60.0, "pool": 300.0}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay_s: float = 0.25
    max_delay_s: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt number ATTEMPT + 1 (full jitter)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        ceiling = min(self.max_delay_s, self.first_delay_s * 2 ** attempt)
        return random.uniform(ceiling / 2, ceiling)


def pinned_ssl_context(certificate_pem: str) -> ssl.SSLContext:
    """Trust exactly the appliance's self-signed certificate. Host names are not checked:
    the appliance is reached by whatever address it has today, and the pin is stronger."""
    context = ssl.create_default_context(cadata=certificate_pem)
    context.check_hostname = False
    return context


def error_from_response(response: httpx.Response) -> ApiError | NotEnrolledError:
    return error_from_status(response.status_code, response.content)


def _error_body(content: bytes) -> tuple[ErrorCode | None, str, dict[str, object]]:
    """(code, message, details) of an error answer; code None if it is not a Cairn error
    body (something in between answered) or names a code this agent does not know."""
    try:
        body = json.loads(content)["error"]
        code, message = str(body["code"]), str(body.get("message", ""))
        details = {k: v for k, v in body.items() if k not in ("code", "message")}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, content[:200].decode("utf-8", "replace"), {}
    return ErrorCode.of(code), message, details


def error_from_status(status: int, content: bytes) -> ApiError | NotEnrolledError:
    """The agent error for an HTTP error answer (body `{"error": {"code", "message"}}`),
    chosen by its code."""
    code, message, details = _error_body(content)
    if code is ErrorCode.UNAUTHORIZED:
        return NotEnrolledError("the appliance no longer accepts this device (revoked, or "
                                "joined elsewhere); run `cairn join` with a new code")
    if code is ErrorCode.INSUFFICIENT_DISKS:
        message = f"the appliance cannot store data right now: {message}"
    kind = ERROR_CLASSES.get(code, ApiError) if code is not None else ApiError
    return kind(message or f"HTTP {status}", status=status, api_code=code or "",
                details=details)


def retry_wait(policy: RetryPolicy, status: int, content: bytes, attempt: int,
               retry_after_s: float | None, retried_once: bool) -> float | None:
    """Seconds to wait before asking again after an answer (STATUS, CONTENT) to attempt
    number ATTEMPT (from 0), or None: the answer stands. RETRIED_ONCE: a code of
    RETRY_ONCE_CODES was already asked again in this request."""
    if status < 400 or attempt + 1 >= policy.attempts:
        return None
    code = _error_body(content)[0] if content else None
    if code in RETRY_ONCE_CODES:
        return None if retried_once else UNRECOVERABLE_RETRY_S
    if _transient(status, content):
        return policy.delay(attempt, retry_after_s)
    return None


def _retried_once(status: int, content: bytes) -> bool:
    """Whether an answer that was asked again used up the one retry of its code."""
    return status >= 400 and bool(content) and _error_body(content)[0] in RETRY_ONCE_CODES


def _transient(status: int, content: bytes) -> bool:
    """Whether an answer is an error that may go away if we wait and retry. (A success
    is not: its body, megabytes of blocks say, is never parsed here.)"""
    if status < 400:
        return False
    code = _error_body(content)[0] if content else None
    if code is not None:
        return code in TRANSIENT_CODES
    return status in TRANSIENT_STATUSES


def retry_after(response: httpx.Response | httpcore.Response) -> float | None:
    if isinstance(response, httpx.Response):
        value = response.headers.get("retry-after", "")
    else:
        value = next((v.decode() for k, v in response.headers
                      if k.lower() == b"retry-after"), "")
    try:
        return float(value)
    except ValueError:
        return None


def presented_certificate(response: httpx.Response) -> bytes | None:
    """The certificate (DER) the server presented on RESPONSE's TLS connection, if any:
    for the connections that trust nothing in advance and check it themselves (enrollment,
    LAN pairing). Read it before the client is closed."""
    stream = response.extensions["network_stream"]
    der: bytes | None = stream.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return der or None


def _read_into(response: httpcore.Response, buffer_for: Callable[[int], memoryview]
               ) -> bytes | memoryview:
    """A successful answer's body, streamed into BUFFER_FOR(its Content-Length); as bytes
    when it has no length. h11 holds the body to its Content-Length (more or fewer bytes
    raise RemoteProtocolError)."""
    declared = next((value for name, value in response.headers
                     if name.lower() == b"content-length"), None)
    if declared is None or not declared.isdigit():
        return response.read()
    if int(declared) > MAX_BLOCK_BYTES:
        raise IntegrityError(f"the appliance answered a block of {int(declared)} bytes; "
                             f"a block has at most {MAX_BLOCK_BYTES}")
    buffer = buffer_for(int(declared))
    position = 0
    for chunk in response.iter_stream():
        buffer[position:position + len(chunk)] = chunk
        position += len(chunk)
    return buffer[:position]


class Connection:
    """One device's connection to its appliance. Use `async with`."""

    def __init__(self, home: AgentHome, device: DeviceRecord, *,
                 retry: RetryPolicy | None = None, block_connections: int = 8) -> None:
        self.home = home
        self.device = device
        self.retry = retry or RetryPolicy()
        self._context = pinned_ssl_context(device.certificate)
        headers = {"Authorization": f"Bearer {device.token}"}
        timeout = httpx.Timeout(60.0, connect=CONNECT_TIMEOUT_S)
        self._async = httpx.AsyncClient(base_url=device.url, verify=self._context,
                                        headers=headers, timeout=timeout)
        self._blocks = httpcore.ConnectionPool(ssl_context=self._context,
                                               max_connections=block_connections,
                                               keepalive_expiry=30.0,
                                               network_backend=BulkTLSBackend())
        self._rediscovery_lock = trio.Lock()
        self._version_checked = False
        self.api_version: str | None = None     # the appliance's, from its first answer

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._async.aclose()
        self._blocks.close()

    @property
    def url(self) -> str:
        return self.device.url

    # --- the control plane ---------------------------------------------------------

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: dict[str, Any] | None = None) -> Any:
        """One JSON request, retried when transient; its decoded answer (None if empty)."""
        content = None if json is None else _dumps(json).encode()
        answer = await self.exchange(method, path, content=content, params=params)
        return _loads(answer) if answer else None

    async def exchange(self, method: str, path: str, *, content: bytes | None = None,
                       params: dict[str, Any] | None = None) -> bytes:
        """One request with a JSON body already encoded (CONTENT), retried when transient;
        the answer's body as it came (the caller parses it straight into its model)."""
        headers = None if content is None else _JSON_HEADERS
        retried_once = False
        for attempt in range(self.retry.attempts):
            url_before = self.device.url
            try:
                response = await self._async.request(method, path, content=content,
                                                     headers=headers, params=params)
            except httpx.TransportError as exc:
                await self._after_transport_error(exc, attempt, url_before)
                continue
            self._check_version(response)
            wait = retry_wait(self.retry, response.status_code, response.content, attempt,
                              retry_after(response), retried_once)
            if wait is not None:
                retried_once = retried_once or _retried_once(response.status_code,
                                                             response.content)
                await trio.sleep(wait)
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response.content
        raise AssertionError("unreachable")  # the last attempt raises or returns

    def _check_version(self, response: httpx.Response) -> None:
        """Stop at the first answer from an appliance of another major API version. An
        answer without the header comes from an appliance older than the header (API 1)."""
        if self._version_checked:
            return
        self.api_version = response.headers.get(version.HEADER, "1")
        try:
            version.check_compatible(self.api_version)
        except version.IncompatibleApiError as exc:
            raise IncompatibleApplianceError(str(exc)) from None
        self._version_checked = True

    async def follow_events(self, cursor: int, heartbeat_s: float,
                            on_cursor: Callable[[int], None],
                            on_event: Callable[[str, Any], None] | None = None) -> None:
        """Hold GET /events open and call ON_CURSOR with each new cursor the appliance
        announces, until the stream ends. Raises TransportError when it breaks or goes
        silent for three heartbeats (the caller falls back to polling). ON_EVENT, if
        given, gets every other event: its name and its data, decoded (API 1.5: `revoked`
        for the peers' revocation list; heartbeats too)."""
        timeout = httpx.Timeout(heartbeat_s * 3, connect=CONNECT_TIMEOUT_S)
        params = {"cursor": cursor, "heartbeat": heartbeat_s}
        try:
            async with self._async.stream("GET", "/events", params=params,
                                          timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response)
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "cursor":
                        on_cursor(int(json.loads(line[5:])["cursor"]))
                    elif line.startswith("data:") and event and on_event is not None:
                        on_event(event, _event_data(line[5:]))
                    elif not line:
                        event = ""
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    async def _after_transport_error(self, exc: httpx.TransportError, attempt: int,
                                     url_before: str) -> None:
        if attempt + 1 >= self.retry.attempts:
            raise self._unreachable(exc) from None
        log.debug("request to %s failed (%s); retrying", url_before, exc)
        # A moved appliance's old address refuses (ConnectError) or, while the LAN still
        # maps it to the old machine, silently drops connections (ConnectTimeout).
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) and attempt >= 1:
            await self.rediscover(url_before)
        if self.device.url == url_before:
            await trio.sleep(self.retry.delay(attempt))

    def _unreachable(self, exc: Exception) -> TransportError:
        hint = "" if discovery_enabled() else " (mDNS discovery is off)"
        return TransportError(f"cannot reach the appliance at {self.device.url}: "
                              f"{_describe(exc)}{hint}; is it running and on this network?")

    async def rediscover(self, failed_url: str) -> bool:
        """Look for our appliance on the LAN after FAILED_URL stopped answering; True if it
        was found at a new address (now remembered)."""
        if not discovery_enabled():
            return False
        async with self._rediscovery_lock:
            if self.device.url != failed_url:
                return True  # another task found it meanwhile
            try:
                found = await find_appliances(appliance_id=self.device.appliance_id)
            except TransportError as exc:
                log.info("cannot look for the appliance: %s", exc.message)
                return False
            for appliance in found:
                for url in appliance.urls:
                    if url != failed_url and await self._answers_as_ours(url):
                        self._move_to(url)
                        return True
            return False

    async def _answers_as_ours(self, url: str) -> bool:
        """Whether URL serves the pinned certificate (TLS checks it) and our appliance id."""
        try:
            async with httpx.AsyncClient(verify=self._context, timeout=5) as probe:
                response = await probe.get(f"{url}/health")
            return bool(response.status_code == 200
                        and response.json().get("appliance_id") == self.device.appliance_id)
        except (httpx.HTTPError, ValueError):
            return False

    def _move_to(self, url: str) -> None:
        log.warning("the appliance moved from %s to %s", self.device.url, url)
        self.device = self.device.with_url(url)
        self._async.base_url = httpx.URL(url)
        self.home.save_device(self.device)

    # --- the data plane (blocking: call from worker threads) ------------------------

    def put_block(self, url: str, data: bytes | memoryview) -> list[str]:
        """PUT a block to its pre-signed URL; the nodes it completed."""
        answer = self._block_request("PUT", url, data)
        return list(json.loads(bytes(answer)).get("completed_nodes", []))

    def get_block(self, url: str) -> bytes:
        return bytes(self._block_request("GET", url, None))

    def get_block_into(self, url: str, buffer_for: Callable[[int], memoryview]) -> memoryview:
        """GET a block into BUFFER_FOR(its length): the part of that buffer holding it. A
        big block then takes no fresh memory and no joining of its pieces."""
        return memoryview(self._block_request("GET", url, None, buffer_for))

    def _block_request(self, method: str, url: str, content: bytes | memoryview | None,
                       buffer_for: Callable[[int], memoryview] | None = None
                       ) -> bytes | memoryview:
        """The body of a successful answer to METHOD on a pre-signed URL (relative to the
        appliance's current address); in BUFFER_FOR(length) if given."""
        headers = [(b"Content-Length", str(len(content or b"")).encode())] \
            if method == "PUT" else []
        retried_once = False
        for attempt in range(self.retry.attempts):
            url_before = self.device.url
            body = cast(Iterator[bytes], iter([content])) \
                if isinstance(content, memoryview) else content   # a view: one chunk
            try:
                with self._blocks.stream(method, url_before + url, headers=headers,
                                         content=body,
                                         extensions={"timeout": BLOCK_TIMEOUTS}) as response:
                    answer: bytes | memoryview = response.read() \
                        if response.status >= 400 or buffer_for is None \
                        else _read_into(response, buffer_for)
            except BLOCK_TRANSPORT_ERRORS as exc:
                if attempt + 1 >= self.retry.attempts:
                    raise self._unreachable(exc) from None
                if isinstance(exc, httpcore.ConnectError | httpcore.ConnectTimeout) \
                        and attempt >= 1:
                    trio.from_thread.run(self.rediscover, url_before)
                if self.device.url == url_before:
                    time.sleep(self.retry.delay(attempt))
                continue
            if response.status < 400:
                return answer
            wait = retry_wait(self.retry, response.status, response.content, attempt,
                              retry_after(response), retried_once)
            if wait is not None:
                retried_once = retried_once or _retried_once(response.status,
                                                             response.content)
                time.sleep(wait)
                continue
            raise error_from_status(response.status, response.content)
        raise AssertionError("unreachable")


def _event_data(text: str) -> Any:
    """An event's data line, decoded if it is JSON (as every Cairn event's is), else as
    it came: an event this agent does not know must not break the stream."""
    try:
        return _loads(text)
    except ValueError:
        return text.strip()


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
