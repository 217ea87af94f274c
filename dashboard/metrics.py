"""The dashboard's Prometheus counters, registered on the service's own registry."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dashboard.latency import LatencyTally

PREFIX = "teamtrack_dashboard"


@dataclass(slots=True)
class TeamCounts:
    """What was read from the backend for one team, counted on the per-batch path."""

    batches: int = 0
    events: int = 0
    # Positions delivered again (at-least-once) and not shown again.
    repeats: int = 0
    # Events (and snapshot entries) read from the backend that no bridge could have written,
    # by reason (dashboard.checks): dropped before any viewer.
    rejected: Tally[str] = field(default_factory=Tally)
    # Device fix time to the frame leaving this instance, one sample per live frame
    # (dashboard.latency).
    latency: LatencyTally = field(default_factory=LatencyTally)


class DashboardMetrics:
    """Labels are team slugs and status codes only: nothing secret, nothing personal.

    The counters of the per-batch and per-frame paths (`frames_sent`, `team_counts`) are plain
    ints, exported when scraped: a prometheus_client `labels()` and `inc()` take a lock and a
    few microseconds each, thousands of times a second. Everything runs on the event loop, so
    the ints need no lock.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.frames_sent = 0
        self._teams: dict[str, TeamCounts] = {}
        registry.register(_PlainCounters(self))
        self.viewers = Gauge(
            f"{PREFIX}_viewers", "Viewers connected to this instance", ["team"], registry=registry
        )
        self.backend_gaps = Counter(
            f"{PREFIX}_backend_gaps",
            "Times the backend's history no longer held what a team's reader needed",
            ["team"],
            registry=registry,
        )
        self.live_connections = Gauge(
            f"{PREFIX}_live_connections",
            "Open live connections, by transport: ws (WebSocket) or sse (Server-Sent Events)",
            ["transport"],
            registry=registry,
        )
        for transport in ("ws", "sse"):
            self.live_connections.labels(transport)  # exported as 0 before the first one
        self.viewers_disconnected_slow = Counter(
            f"{PREFIX}_viewers_disconnected_slow",
            "Viewers ended as too slow (4008) because their socket accepted nothing for too long",
            registry=registry,
        )
        self.viewer_conflations = Counter(
            f"{PREFIX}_viewer_conflations",
            "Times a viewer's queue overflowed and it was switched to state-sync",
            registry=registry,
        )
        self.events_conflated = Counter(
            f"{PREFIX}_events_conflated",
            "Events a slow viewer never got because a newer one of the same worker replaced them",
            registry=registry,
        )
        self.sync_frames = Counter(
            f"{PREFIX}_sync_frames",
            "State-sync frames sent to viewers that had fallen behind",
            registry=registry,
        )
        self.resumes = Counter(
            f"{PREFIX}_resumes",
            "Reconnections that asked to resume after a cursor, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.replayed_batches = Counter(
            f"{PREFIX}_replayed_batches",
            "Batches read again from the backend's history for resuming viewers",
            registry=registry,
        )
        self.ws_denied = Counter(
            f"{PREFIX}_ws_denied",
            "WebSocket handshakes refused, by HTTP status",
            ["status"],
            registry=registry,
        )
        self.sse_denied = Counter(
            f"{PREFIX}_sse_denied",
            "SSE requests refused before streaming, by HTTP status",
            ["status"],
            registry=registry,
        )
        self.dispatch_failures = Counter(
            f"{PREFIX}_dispatch_failures",
            "Times the backend reader failed and every team was resubscribed",
            registry=registry,
        )
        self.logins = Counter(
            f"{PREFIX}_logins",
            "Login form submissions, by outcome: ok, failed, limited (429), busy (503),"
            " cross_site (403)",
            ["outcome"],
            registry=registry,
        )

    def observe_latency(self, team: str, device_ts: int) -> None:
        """A live frame of `team` left, its oldest event fixed at `device_ts` (epoch ms)."""
        self.team_counts(team).latency.observe_ms(time.time() * 1000 - device_ts)

    def team_counts(self, team: str) -> TeamCounts:
        """The counts of `team`, to keep and add to (exported from the first call on)."""
        counts = self._teams.get(team)
        if counts is None:
            counts = self._teams[team] = TeamCounts()
        return counts


class _PlainCounters(Collector):
    def __init__(self, metrics: DashboardMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        batches = CounterMetricFamily(
            f"{PREFIX}_backend_batches",
            "Batches read from the backend for teams with viewers here",
            labels=["team"],
        )
        events = CounterMetricFamily(
            f"{PREFIX}_backend_events", "Events inside those batches", labels=["team"]
        )
        repeats = CounterMetricFamily(
            f"{PREFIX}_repeated_positions",
            "Positions delivered again by the backend (at-least-once) and not shown again",
            labels=["team"],
        )
        rejected = CounterMetricFamily(
            f"{PREFIX}_backend_rejected",
            "Events read from the backend that break the contract (written around the bridges),"
            " dropped before any viewer, by reason",
            labels=["team", "reason"],
        )
        latency = HistogramMetricFamily(
            f"{PREFIX}_latency_seconds",
            "Device fix time (ts) to the live frame leaving this instance, one sample per frame"
            " (its oldest event)",
            labels=["team"],
        )
        unmeasured = CounterMetricFamily(
            f"{PREFIX}_latency_unmeasured",
            "Frames whose sample was left out of the latency histogram, by reason: clock_ahead"
            " (the device's clock ahead of this host's), too_old (older than 10 minutes)",
            labels=["team", "reason"],
        )
        for team, counts in sorted(self._metrics._teams.items()):
            tally = counts.latency
            latency.add_metric([team], tally.cumulative(), tally.sum)
            unmeasured.add_metric([team, "clock_ahead"], tally.clock_ahead)
            unmeasured.add_metric([team, "too_old"], tally.too_old)
            batches.add_metric([team], counts.batches)
            events.add_metric([team], counts.events)
            repeats.add_metric([team], counts.repeats)
            for reason, count in sorted(counts.rejected.items()):
                rejected.add_metric([team, reason], count)
        yield batches
        yield events
        yield repeats
        yield rejected
        yield latency
        yield unmeasured
        frames = CounterMetricFamily(
            f"{PREFIX}_frames_sent", "Frames sent to viewers (WebSocket messages and SSE events)"
        )
        frames.add_metric([], self._metrics.frames_sent)
        yield frames
