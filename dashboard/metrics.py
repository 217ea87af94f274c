"""The dashboard's Prometheus counters, registered on the service's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

PREFIX = "teamtrack_dashboard"


class DashboardMetrics:
    """Labels are team slugs and status codes only: nothing secret, nothing personal."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.viewers = Gauge(
            f"{PREFIX}_viewers", "Viewers connected to this instance", ["team"], registry=registry
        )
        self.backend_batches = Counter(
            f"{PREFIX}_backend_batches",
            "Batches read from the backend for teams with viewers here",
            ["team"],
            registry=registry,
        )
        self.backend_events = Counter(
            f"{PREFIX}_backend_events",
            "Events inside those batches",
            ["team"],
            registry=registry,
        )
        self.backend_gaps = Counter(
            f"{PREFIX}_backend_gaps",
            "Times the backend's history no longer held what a team's reader needed",
            ["team"],
            registry=registry,
        )
        self.frames_sent = Counter(
            f"{PREFIX}_frames_sent", "WebSocket frames sent to viewers", registry=registry
        )
        self.viewers_disconnected_slow = Counter(
            f"{PREFIX}_viewers_disconnected_slow",
            "Viewers closed with 4008 because their socket accepted nothing for too long",
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
        self.dispatch_failures = Counter(
            f"{PREFIX}_dispatch_failures",
            "Times the backend reader failed and every team was resubscribed",
            registry=registry,
        )
        self.logins = Counter(
            f"{PREFIX}_logins",
            "Login form submissions, by outcome",
            ["outcome"],
            registry=registry,
        )
