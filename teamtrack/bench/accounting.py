"""Joining what was sent with what was received: delivered, lost, duplicated, latency.

Only messages sent inside a step's measurement window count. A message received that was not
sent in the window (a warm-up message, a late one from an earlier step) is ignored, so it can
be neither delivered nor duplicated. A message sent in the window and not received by the end
of the step's drain is lost. A message received more than once counts once as delivered, and
each further copy as duplicated; its latency is that of the first copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

NS_PER_MS: Final = 1_000_000
PERCENTILES: Final = (50.0, 90.0, 99.0)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Receive time minus send time, in milliseconds."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, latencies_ns: Sequence[int]) -> LatencySummary | None:
        if not latencies_ns:
            return None
        ordered = sorted(latencies_ns)
        p50, p90, p99 = (percentile(ordered, rank) / NS_PER_MS for rank in PERCENTILES)
        return cls(
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            max_ms=ordered[-1] / NS_PER_MS,
            mean_ms=sum(ordered) / len(ordered) / NS_PER_MS,
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    sent: int
    delivered: int
    lost: int
    duplicated: int
    latency: LatencySummary | None


def percentile(ordered: Sequence[int], rank: float) -> int:
    """The nearest-rank percentile of sorted values: the smallest value that at least `rank`
    percent of the values do not exceed."""
    if not ordered:
        raise ValueError("no values")
    if not 0 < rank <= 100:
        raise ValueError("rank must be in (0, 100]")
    position = math.ceil(rank / 100 * len(ordered))
    return ordered[max(position, 1) - 1]


def account(sent: Iterable[tuple[int, int]], received: Iterable[tuple[int, int]]) -> Delivery:
    """Join (key, send time) records with (key, receive time) records of one step."""
    send_times: dict[int, int] = {}
    for key, time_ns in sent:
        send_times[key] = time_ns
    first_seen: set[int] = set()
    latencies: list[int] = []
    duplicated = 0
    for key, time_ns in received:
        send_time = send_times.get(key)
        if send_time is None:
            continue
        if key in first_seen:
            duplicated += 1
            continue
        first_seen.add(key)
        latencies.append(time_ns - send_time)
    delivered = len(first_seen)
    return Delivery(
        sent=len(send_times),
        delivered=delivered,
        lost=len(send_times) - delivered,
        duplicated=duplicated,
        latency=LatencySummary.of(latencies),
    )
