"""Per-device rate limit: a token bucket per (team, worker), refilled at `rate` a second up to
`burst`.

A device over its rate has the excess dropped and counted (`rate_limited`); a QoS 1 message
dropped so is still acknowledged, so that the device does not send it again and again. The
bucket counts messages as they reach the bridge: a device that comes back with a backlog, or a
broker that hands over what it held for a stalled bridge, delivers in a burst, so `burst` must
cover the longest backlog a legitimate device may deliver at once (100 is 100 s of a 1 Hz
device).

Memory: a bucket exists only for a (team, worker) that published on its own topics, which the
broker's ACL grants to the registry's device accounts only, so there are at most as many
buckets as accounts that sent something; on top of that, buckets idle long enough to be full
again are forgotten (a full bucket is what a new one would be), at most once per `PRUNE_EVERY_S`,
so a bridge holds buckets of recently active devices only (two floats and a key: ~200 bytes).
"""

from __future__ import annotations

import time
from typing import Final

PRUNE_EVERY_S: Final = 60.0


class DeviceRateLimit:
    __slots__ = ("_buckets", "_burst", "_next_prune", "_rate")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a device rate limit needs rate > 0 and burst >= 1")
        self._rate = rate
        self._burst = float(burst)
        # (team, worker) -> [tokens, time of the last refill]
        self._buckets: dict[tuple[str, str], list[float]] = {}
        self._next_prune = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, team: str, worker: str, now: float | None = None) -> bool:
        """Whether one more message of this device fits; takes its token if so."""
        if now is None:
            now = time.monotonic()
        key = (team, worker)
        bucket = self._buckets.get(key)
        if bucket is None:
            if now >= self._next_prune:
                self._prune(now)
            self._buckets[key] = [self._burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def reserve(self, team: str, worker: str, now: float | None = None) -> float:
        """Takes a token now or from the future: 0.0 when one was there, else the seconds to
        wait before the message fits the rate (a stream holds its next line that long instead
        of dropping it). Tokens owed are at most `burst` beyond 0: a caller waits its turn."""
        if now is None:
            now = time.monotonic()
        key = (team, worker)
        bucket = self._buckets.get(key)
        if bucket is None:
            if now >= self._next_prune:
                self._prune(now)
            self._buckets[key] = [self._burst - 1.0, now]
            return 0.0
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate) - 1.0
        bucket[0], bucket[1] = max(tokens, -self._burst), now
        return 0.0 if tokens >= 0.0 else -tokens / self._rate

    def _prune(self, now: float) -> None:
        self._next_prune = now + PRUNE_EVERY_S
        full_after = self._burst / self._rate
        idle = [key for key, (_, last) in self._buckets.items() if now - last >= full_after]
        for key in idle:
            del self._buckets[key]
