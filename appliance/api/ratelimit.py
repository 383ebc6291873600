"""Per-key token buckets (a key is a device id, or a client address before enrollment).

Pure logic with an injected clock: `check(key, now)` spends one token or raises
RateLimitedError saying how long to wait. Idle buckets refill to full and are dropped when
the table grows, so memory stays bounded however many keys come and go.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import RateLimitedError

MAX_TRACKED_KEYS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate_per_s
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)

    def check(self, key: str, now: float, cost: float = 1.0) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_KEYS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        tokens = self._refilled(bucket, now)
        bucket.updated = now
        if tokens >= cost:
            bucket.tokens = tokens - cost
            return
        bucket.tokens = tokens
        wait = (cost - tokens) / self.rate
        raise RateLimitedError(f"too many requests; retry in {wait:.2f} s", wait)

    def _prune(self, now: float) -> None:
        full = [key for key, bucket in self._buckets.items()
                if self._refilled(bucket, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= MAX_TRACKED_KEYS:  # all busy: forget the oldest half
            for key, _ in sorted(self._buckets.items(),
                                 key=lambda item: item[1].updated)[: MAX_TRACKED_KEYS // 2]:
                del self._buckets[key]
