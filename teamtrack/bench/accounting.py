"""Joining what was sent with what was received: delivered, lost, duplicated, latency.

Only messages sent inside a step's measurement window count. A message received that was not
sent in the window (a warm-up message, a late one from an earlier step) is ignored, so it can
be neither delivered nor duplicated. A message sent in the window and not received by the end
of the step's drain is lost, unless a dashboard shed it by policy: a viewer that falls behind
is sent only the newest position of each worker (a `sync` frame), and the positions that one
replaced count as shed. A message received more than once counts once as delivered, and each
further copy as duplicated; its latency is that of the first copy.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from teamtrack.bench.records import split_key

NS_PER_MS: Final = 1_000_000
PERCENTILES: Final = (50.0, 90.0, 99.0)
TIMELINE_POINTS: Final = 60


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
class TimelinePoint:
    """The messages sent in [start_s, start_s + width) of a step, from its first send."""

    start_s: float
    delivered: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Delivery:
    sent: int
    delivered: int
    lost: int  # missing, with no conflation to explain it
    shed: int  # missing, replaced by a newer position in a dashboard's sync frame
    duplicated: int
    latency: LatencySummary | None
    # Latency over the step, in up to TIMELINE_POINTS slices by send time.
    timeline: tuple[TimelinePoint, ...] = ()


def percentile(ordered: Sequence[int], rank: float) -> int:
    """The nearest-rank percentile of sorted values: the smallest value that at least `rank`
    percent of the values do not exceed."""
    if not ordered:
        raise ValueError("no values")
    if not 0 < rank <= 100:
        raise ValueError("rank must be in (0, 100]")
    position = math.ceil(rank / 100 * len(ordered))
    return ordered[max(position, 1) - 1]


def account(
    sent: Iterable[tuple[int, int]],
    received: Iterable[tuple[int, int]],
    synced: Iterable[tuple[int, int]] = (),
) -> Delivery:
    """Join (key, send time) records with (key, receive time) records of one step.

    `synced` are the positions a dashboard sent in `sync` frames (viewer conflation): they are
    delivered like the others, and a message missing for a worker whose next delivered message
    came in a sync frame was replaced by it, so it counts as shed, not lost.
    """
    send_times: dict[int, int] = dict(sent)
    # key -> (receive time of its earliest copy, whether that copy came in a sync frame)
    arrivals: dict[int, tuple[int, bool]] = {}
    duplicated = 0
    for via_sync, records in ((False, received), (True, synced)):
        for key, time_ns in records:
            if key not in send_times:
                continue
            earlier = arrivals.get(key)
            if earlier is None:
                arrivals[key] = (time_ns, via_sync)
                continue
            duplicated += 1
            if time_ns < earlier[0]:
                arrivals[key] = (time_ns, via_sync)
    sends_and_latencies = [
        (send_times[key], time_ns - send_times[key]) for key, (time_ns, _) in arrivals.items()
    ]
    latencies = [latency for _, latency in sends_and_latencies]
    delivered = len(arrivals)
    shed = _count_shed(send_times.keys() - arrivals.keys(), arrivals)
    return Delivery(
        sent=len(send_times),
        delivered=delivered,
        lost=len(send_times) - delivered - shed,
        shed=shed,
        duplicated=duplicated,
        latency=LatencySummary.of(latencies),
        timeline=latency_timeline(sends_and_latencies),
    )


def latency_timeline(
    sends_and_latencies: Sequence[tuple[int, int]], points: int = TIMELINE_POINTS
) -> tuple[TimelinePoint, ...]:
    """p50 and p99 latency of the messages sent in each of `points` equal slices of the step
    (whether latency creeps up over a long run: a queue that only grows)."""
    if not sends_and_latencies:
        return ()
    first = min(send for send, _ in sends_and_latencies)
    last = max(send for send, _ in sends_and_latencies)
    width = max((last - first) / points, 1.0)
    slices: dict[int, list[int]] = defaultdict(list)
    for send, latency in sends_and_latencies:
        slices[min(int((send - first) / width), points - 1)].append(latency)
    timeline = []
    for index in sorted(slices):
        ordered = sorted(slices[index])
        timeline.append(TimelinePoint(
            start_s=index * width / 1e9,
            delivered=len(ordered),
            p50_ms=percentile(ordered, 50.0) / NS_PER_MS,
            p99_ms=percentile(ordered, 99.0) / NS_PER_MS,
        ))
    return tuple(timeline)


def _count_shed(missing: Iterable[int], arrivals: dict[int, tuple[int, bool]]) -> int:
    delivered_by_worker: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    for key, (_, via_sync) in arrivals.items():
        worker, seq = split_key(key)
        delivered_by_worker[worker].append((seq, via_sync))
    for seqs in delivered_by_worker.values():
        seqs.sort()
    shed = 0
    for key in missing:
        worker, seq = split_key(key)
        delivered = delivered_by_worker.get(worker, [])
        following = bisect_right(delivered, (seq, True))
        if following < len(delivered) and delivered[following][1]:
            shed += 1
    return shed
