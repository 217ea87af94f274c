"""What the servers that face clients (dashboards, the WebSockets gateway, the device gateway)
share to bound them: the key a per-address limit counts by, token buckets by key for failed
logins, and the plain HTTP answer of a refused connection."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

DEFAULT_MAX_KEYS: Final = 10_000
# Where a server listens unless told otherwise: this machine only.
LOOPBACK: Final = "127.0.0.1"


def address_key(host: str | None) -> str:
    """The per-address key of a client: IPv4 as is, IPv6 by its /64 (one subscriber commonly
    holds a whole /64), an IPv4-mapped IPv6 address as its IPv4."""
    if not host:
        return "?"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def plain_http_response(status: int, reason: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection: for refusing a client before
    any framework has read its request (over a cap, too slow, headers too large)."""
    body = f"{status} {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class RateLimiter:
    """Token buckets by key: `per_minute` attempts at once, refilled at `per_minute` a minute.

    At most `max_keys` buckets are kept, least recently used dropped first (a dropped bucket
    was full again or its key has been quiet the longest). `per_minute` 0 turns it off.
    """

    def __init__(
        self,
        per_minute: int,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._clock = clock
        # key -> [tokens, when they were counted]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Takes one token: 0.0 when there was one, else the seconds until there will be."""
        if self.capacity <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [self.capacity, now]
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    def give_back(self, key: str) -> None:
        """Returns a token taken for an attempt that turned out not to count."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket[0] = min(self.capacity, bucket[0] + 1.0)
