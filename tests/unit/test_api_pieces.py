"""Pure pieces of the API layer: rate limits, Range parsing, the change notifier."""

from __future__ import annotations

import pytest
import trio

from appliance.api.notify import ChangeNotifier
from appliance.api.ratelimit import RateLimiter
from appliance.api.routes_blocks import RangeNotSatisfiable, parse_range
from appliance.errors import RateLimitedError


def test_rate_limit_allows_a_burst_then_paces() -> None:
    limiter = RateLimiter(rate_per_s=10, burst=5)
    for _ in range(5):
        limiter.check("dev", now=0.0)
    with pytest.raises(RateLimitedError) as refused:
        limiter.check("dev", now=0.0)
    assert refused.value.retry_after_s == pytest.approx(0.1)
    limiter.check("other", now=0.0)  # buckets are per key
    limiter.check("dev", now=0.1)    # one token back after 1/rate s
    with pytest.raises(RateLimitedError):
        limiter.check("dev", now=0.1)


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-9", (0, 10)), ("bytes=10-", (10, 100)), ("bytes=-5", (95, 100)),
    ("bytes=90-1000", (90, 100)),
])
def test_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-4", "bytes=-", "items=0-1",
                                    "bytes=0-1,5-6", "bytes=abc"])
def test_bad_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


async def test_notifier_wakes_only_for_newer_cursors() -> None:
    notifier = ChangeNotifier()
    assert await notifier.wait_beyond(1, 0, timeout_s=0.05) is None
    async with trio.open_nursery() as nursery:
        got: list[int | None] = []

        async def wait() -> None:
            got.append(await notifier.wait_beyond(1, 0, timeout_s=5))

        nursery.start_soon(wait)
        await trio.sleep(0.01)
        notifier.publish({2: 7})  # someone else's change
        await trio.sleep(0.01)
        assert got == []
        notifier.publish({1: 8})
    assert got == [8]
    notifier.close()
    assert await notifier.wait_beyond(1, 8, timeout_s=5) is None
