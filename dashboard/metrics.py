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
            "Viewers disconnected because their queue was full",
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
