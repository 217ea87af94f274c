"""The gateway's counters: plain integers bumped per request and line, turned into Prometheus
metrics on scrape (as the bridge's are)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class GatewayCounters:
    # Events accepted, by kind (p, s, e) and way in (owntracks, ndjson).
    received: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Payloads and lines that broke the contract, by reason (the contract's reasons).
    rejected: Counter[str] = field(default_factory=Counter)
    owntracks_ignored: Counter[str] = field(default_factory=Counter)
    # Positions and worker events dropped off duty, by reason (off_duty, paused).
    duty_dropped: Counter[str] = field(default_factory=Counter)
    # Requests answered, by endpoint and status code.
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    # Logins refused, by reason: bad_credentials, not_device, user_mismatch, rate_limited.
    auth_failures: Counter[str] = field(default_factory=Counter)
    # Connections refused before any request: connection_cap, address_limit,
    # header_timeout, headers_too_large.
    refused: Counter[str] = field(default_factory=Counter)
    # Streams ended, by why: complete, disconnected, idle_timeout, revoked, replaced,
    # shutdown, slow_client.
    streams_ended: Counter[str] = field(default_factory=Counter)
    streams_open: int = 0
    forwarded: int = 0
    backend_errors: int = 0
    ack_timeouts: int = 0
    throttled_seconds: float = 0.0


class GatewayCollector(Collector):
    def __init__(self, counters: GatewayCounters, gateway_id: str) -> None:
        self._counters = counters
        self._id = gateway_id

    def collect(self) -> Iterator[Metric]:
        counters, gateway = self._counters, self._id
        received = CounterMetricFamily(
            "teamtrack_gateway_received", "Events accepted from devices",
            labels=["gateway", "kind", "via"],
        )
        for (kind, via), count in counters.received.items():
            received.add_metric([gateway, kind, via], count)
        yield received
        for name, help_text, label, values in (
            ("rejected", "Payloads and lines dropped for breaking the contract", "reason",
             counters.rejected),
            ("owntracks_ignored", "OwnTracks objects of a type teamtrack does not use", "type",
             counters.owntracks_ignored),
            ("off_duty_dropped", "Positions and worker events dropped because the worker was "
             "off duty (outside its shift) or paused", "reason", counters.duty_dropped),
            ("auth_failures", "Logins refused", "reason", counters.auth_failures),
            ("refused", "Connections refused before a request was read", "reason",
             counters.refused),
            ("streams_ended", "NDJSON streams ended", "reason", counters.streams_ended),
        ):
            family = CounterMetricFamily(
                f"teamtrack_gateway_{name}", help_text, labels=["gateway", label]
            )
            for value, count in values.items():
                family.add_metric([gateway, value], count)
            yield family
        requests = CounterMetricFamily(
            "teamtrack_gateway_requests", "Requests answered",
            labels=["gateway", "endpoint", "code"],
        )
        for (endpoint, code), count in counters.requests.items():
            requests.add_metric([gateway, endpoint, str(code)], count)
        yield requests
        for name, help_text, total in (
            ("forwarded", "Events handed to the backend", counters.forwarded),
            ("backend_errors", "Failed backend publishes (retried)", counters.backend_errors),
            ("ack_timeouts", "OwnTracks posts answered 503: the backend did not hold them in "
             "time", counters.ack_timeouts),
            ("throttled_seconds", "Seconds streams waited for their device's rate limit",
             counters.throttled_seconds),
        ):
            family = CounterMetricFamily(f"teamtrack_gateway_{name}", help_text,
                                         labels=["gateway"])
            family.add_metric([gateway], total)
            yield family
        streams = GaugeMetricFamily(
            "teamtrack_gateway_streams", "NDJSON streams open now", labels=["gateway"]
        )
        streams.add_metric([gateway], counters.streams_open)
        yield streams
