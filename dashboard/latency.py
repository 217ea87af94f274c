"""Device-to-viewer latency: from a position's device fix time (`ts`) to its frame leaving here.

Measured once per live events frame, not per position: the sample is the frame's oldest event
(the first position or worker event of its first batch), so a frame of 2,000 positions costs one
small decode and one bucket lookup. Snapshot, sync and replay frames carry no sample: they hold
positions that are old by design.

The device's clock is not ours. A fix stamped ahead of this host's clock by up to
`CLOCK_TOLERANCE_MS` is taken as 0 (clocks a little apart); further ahead, or older than
`MAX_AGE_MS` (a device that sends what it buffered while offline, or a clock far behind), it is
not observed but counted by reason (`clock_ahead`, `too_old`), so that the histogram shows the
platform's latency and the counters show the clocks.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Final

import orjson

from teamtrack.metrics import LAG_BUCKETS

CLOCK_TOLERANCE_MS: Final = 1_000
MAX_AGE_MS: Final = 600_000
# Events of a batch looked at for a timestamp (presence changes carry none) before giving up.
MAX_SCANNED_EVENTS: Final = 8
_EVENT_START: Final = b',{"w":"'


class LatencyTally:
    """Plain bucket counts (exported as a Prometheus histogram when scraped): no lock, no
    label lookup on the per-frame path; everything runs on the event loop."""

    __slots__ = ("bounds", "clock_ahead", "count", "counts", "sum", "too_old")

    def __init__(self, bounds: Sequence[float] = LAG_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        # counts[i]: samples in (bounds[i-1], bounds[i]]; the last one: above every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0
        self.clock_ahead = 0
        self.too_old = 0

    def observe_ms(self, latency_ms: float) -> None:
        """One sample (now minus the device's fix time, in milliseconds), checked and clamped."""
        if latency_ms < 0:
            if latency_ms < -CLOCK_TOLERANCE_MS:
                self.clock_ahead += 1
                return
            latency_ms = 0.0
        elif latency_ms > MAX_AGE_MS:
            self.too_old += 1
            return
        seconds = latency_ms / 1000
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, samples at or below it) for each bound and +Inf, as Prometheus exports them."""
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append((_le(bound), total))
        buckets.append(("+Inf", self.count))
        return buckets


def _le(bound: float) -> str:
    return repr(float(bound))


def first_device_ts(raw: bytes) -> int | None:
    """The device fix time of the first position or worker event of an encoded batch
    (`encode_events`), decoding only the events before it; None when there is none."""
    start = 1
    for _ in range(MAX_SCANNED_EVENTS):
        end = raw.find(_EVENT_START, start)
        try:
            event = orjson.loads(raw[start:end] if end != -1 else raw[start:-1])
        except orjson.JSONDecodeError:
            return None  # not the bridges' encoding: no sample rather than a wrong one
        payload = event.get("p") if type(event) is dict else None
        ts = payload.get("ts") if type(payload) is dict else None
        if type(ts) is int:
            return ts
        if end == -1:
            return None
        start = end + 1
    return None
