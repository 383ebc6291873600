"""The agent's connection to its appliance: the JSON API and block transfers.

Two httpx clients share one pinned TLS context (the certificate recorded at join, nothing
else is trusted):

- `call` (httpx.AsyncClient under trio) for the JSON control plane;
- `put_block` / `get_block` (httpx.Client, blocking) for block bodies, run in worker threads
  by the transfer pipeline. The stdlib's blocking SSL sockets decrypt in C with the GIL
  released, several times faster per byte than an async TLS stream in Python, and the
  threads that hash and encrypt a block can send it without handing bytes back to the loop.

Failures are translated here, once: HTTP error bodies become ApiError subclasses, and
transient failures (connection refused or reset, timeouts, 429, 502-504) are retried with
exponential backoff and jitter. When the remembered address refuses connections, the agent
looks for its appliance (by appliance id) on the LAN with mDNS, checks the certificate there
is the pinned one, remembers the new address and carries on (`rediscover`).
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import trio

from agent.discovery import discovery_enabled, find_appliances
from agent.errors import (
    ApiError,
    ForbiddenError,
    NotEnrolledError,
    RemoteConflictError,
    RemoteNotFoundError,
    TransportError,
)
from agent.home import AgentHome, DeviceRecord

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
T = TypeVar("T")


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
    """The agent error for an HTTP error answer (body `{"error": {"code", "message"}}`)."""
    try:
        body = response.json().get("error", {})
        api_code, message = str(body.get("code", "")), str(body.get("message", ""))
        details = {k: v for k, v in body.items() if k not in ("code", "message")}
    except (ValueError, AttributeError):
        api_code, message, details = "", response.text[:200], {}
    status = response.status_code
    if status == 401:
        return NotEnrolledError("the appliance no longer accepts this device (revoked, or "
                                "joined elsewhere); run `cairn join` with a new code")
    kind: type[ApiError] = {404: RemoteNotFoundError, 403: ForbiddenError,
                            409: RemoteConflictError}.get(status, ApiError)
    if status == 507 or api_code == "insufficient_disks":
        message = f"the appliance cannot store data right now: {message}"
    return kind(message or f"HTTP {status}", status=status, api_code=api_code,
                details=details)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


class Connection:
    """One device's connection to its appliance. Use `async with`."""

    def __init__(self, home: AgentHome, device: DeviceRecord, *,
                 retry: RetryPolicy | None = None, block_connections: int = 8) -> None:
        self.home = home
        self.device = device
        self.retry = retry or RetryPolicy()
        self._context = pinned_ssl_context(device.certificate)
        headers = {"Authorization": f"Bearer {device.token}"}
        timeout = httpx.Timeout(60.0, connect=10.0)
        self._async = httpx.AsyncClient(base_url=device.url, verify=self._context,
                                        headers=headers, timeout=timeout)
        limits = httpx.Limits(max_connections=block_connections,
                              max_keepalive_connections=block_connections)
        self._blocks = httpx.Client(base_url=device.url, verify=self._context,
                                    timeout=timeout, limits=limits)
        self._rediscovery_lock = trio.Lock()
        self.blocks_sent = 0
        self.blocks_received = 0

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
        for attempt in range(self.retry.attempts):
            url_before = self.device.url
            try:
                response = await self._async.request(method, path, json=json, params=params)
            except httpx.TransportError as exc:
                await self._after_transport_error(exc, attempt, url_before)
                continue
            if response.status_code in RETRY_STATUSES and attempt + 1 < self.retry.attempts:
                await trio.sleep(self.retry.delay(attempt, _retry_after(response)))
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response.json() if response.content else None
        raise AssertionError("unreachable")  # the last attempt raises or returns

    async def _after_transport_error(self, exc: httpx.TransportError, attempt: int,
                                     url_before: str) -> None:
        if attempt + 1 >= self.retry.attempts:
            raise self._unreachable(exc) from None
        log.debug("request to %s failed (%s); retrying", url_before, exc)
        if isinstance(exc, httpx.ConnectError) and attempt >= 1:
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
        self._blocks.base_url = httpx.URL(url)
        self.home.save_device(self.device)

    # --- the data plane (blocking: call from worker threads) ------------------------

    def put_block(self, url: str, data: bytes) -> list[str]:
        """PUT a block to its pre-signed URL; the nodes it completed."""
        response = self._block_request("PUT", url, content=data)
        self.blocks_sent += 1
        return list(response.json().get("completed_nodes", []))

    def get_block(self, url: str) -> bytes:
        response = self._block_request("GET", url)
        self.blocks_received += 1
        return response.content

    def _block_request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retry.attempts):
            url_before = self.device.url
            try:
                response = self._blocks.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt + 1 >= self.retry.attempts:
                    raise self._unreachable(exc) from None
                if isinstance(exc, httpx.ConnectError) and attempt >= 1:
                    trio.from_thread.run(self.rediscover, url_before)
                if self.device.url == url_before:
                    time.sleep(self.retry.delay(attempt))
                continue
            if response.status_code in RETRY_STATUSES and attempt + 1 < self.retry.attempts:
                time.sleep(self.retry.delay(attempt, _retry_after(response)))
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response
        raise AssertionError("unreachable")


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def run_in_thread(function: Callable[..., T], *args: Any) -> T:
    """FUNCTION(*ARGS) in a worker thread; cancellable only between blocks."""
    return await trio.to_thread.run_sync(function, *args)
