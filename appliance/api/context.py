"""What every route needs: the metadata database, the block store, the URL key, the
device CA (LAN peers), the notifier, the counters and the rate limits; plus the `Caller`
dependency that authenticates a device."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

import apsw
import trio
from fastapi import Depends, Request

from appliance.api.notify import ChangeNotifier
from appliance.api.ratelimit import RateLimiter
from appliance.device_ca import DeviceCa
from appliance.errors import UnauthorizedError
from appliance.locks import KeyedLocks
from appliance.meta import accounts
from appliance.meta.database import Metadata
from appliance.meta.journal import Journal
from appliance.meta.records import BlockRef, Device, User
from appliance.presign import Method, sign_block_url
from appliance.stats import ServedCounters
from appliance.storage.async_store import AsyncBlockStore
from protocol.models import BlockUrl

T = TypeVar("T")
LAST_SEEN_EVERY_S = 60.0
BLOCK_TRANSFERS = 4


@dataclass
class ApiSettings:
    url_lifetime_s: float = 3600.0
    rate_limit_per_s: float = 500.0
    rate_limit_burst: float = 5000.0
    anonymous_rate_per_s: float = 2.0      # enrollment, per client address
    anonymous_burst: float = 20.0
    heartbeat_s: float = 15.0
    lan_admission: bool = True             # [enrollment] lan_admission


@dataclass
class ApiContext:
    meta: Metadata
    store: AsyncBlockStore
    url_key: bytes
    fingerprint: bytes          # SHA-256 of the appliance's certificate (DER)
    appliance_id: str
    settings: ApiSettings
    # Signs device certificates and block grants (API 1.5); None only for an app made
    # without one (the OpenAPI schema's): the peer routes then answer 503.
    device_ca: DeviceCa | None = None
    counters: ServedCounters = field(default_factory=ServedCounters)
    notifier: ChangeNotifier = field(default_factory=ChangeNotifier)
    block_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # Block-sized store work (the put or get of one block on its URL) at once: each holds
    # ~10-20 MiB of buffers (block, shards, pyeclib's copies) while it runs; beyond a few
    # the two cores gain nothing, and the appliance's peak RSS grew with the clients'
    # concurrency. Bodies and answers still stream outside it, so a slow client never
    # holds a slot.
    block_transfers: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(BLOCK_TRANSFERS))
    _last_seen: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device_limits = RateLimiter(self.settings.rate_limit_per_s,
                                         self.settings.rate_limit_burst)
        self.anonymous_limits = RateLimiter(self.settings.anonymous_rate_per_s,
                                            self.settings.anonymous_burst)
        # LAN admissions are enrollments: the same rate, per admitting device.
        self.admission_limits = RateLimiter(self.settings.anonymous_rate_per_s,
                                            self.settings.anonymous_burst)

    def sign(self, method: Method, block: BlockRef, device_id: str) -> BlockUrl:
        expires = int(time.time() + self.settings.url_lifetime_s)
        signed = sign_block_url(self.url_key, method, block.block_id, device_id, expires)
        return BlockUrl(block_id=block.block_id, size=block.size, url=signed.url)

    def urls_expire_at(self) -> int:
        return int(time.time() + self.settings.url_lifetime_s)

    async def change(self, device_id: str | None,
                     fn: Callable[[apsw.Connection, Journal], T]) -> T:
        """Run a write transaction with a journal; after it commits, wake the streams of
        everyone it concerns."""
        holder: list[Journal] = []

        def run(db: apsw.Connection) -> T:
            journal = Journal(db, device_id)
            holder.append(journal)
            return fn(db, journal)

        result = await self.meta.write(run)
        self.notifier.publish(holder[0].published)
        return result

    def should_touch(self, device_id: str, now: float) -> bool:
        if now - self._last_seen.get(device_id, 0.0) < LAST_SEEN_EVERY_S:
            return False
        self._last_seen[device_id] = now
        return True


def context_of(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


@dataclass(frozen=True)
class Caller:
    device: Device
    user: User


def token_of_header(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header's value. Raises
    UnauthorizedError for anything else."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("this route needs a device token: "
                                "Authorization: Bearer <token>")
    return token.strip()


def bearer_token(request: Request) -> str:
    return token_of_header(request.headers.get("authorization", ""))


async def device_of_token(context: ApiContext, token: str) -> tuple[Device, User]:
    """The active device holding `token`, and its user. Raises UnauthorizedError."""
    return await context.meta.read(lambda db: _device_and_user(db, token))


async def authenticated(request: Request) -> Caller:
    context = context_of(request)
    device, user = await device_of_token(context, bearer_token(request))
    now = time.time()
    context.device_limits.check(device.id, time.monotonic())
    if context.should_touch(device.id, now):
        await context.meta.write(lambda db: accounts.touch_device(db, device.id, now))
    return Caller(device, user)


def _device_and_user(db: apsw.Connection, token: str) -> tuple[Device, User]:
    device = accounts.authenticate(db, token)
    return device, accounts.user_by_id(db, device.user_id)


CallerDep = Annotated[Caller, Depends(authenticated)]
ContextDep = Annotated[ApiContext, Depends(context_of)]
