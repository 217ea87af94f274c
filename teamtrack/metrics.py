"""Prometheus counters: each service owns a registry, so services in one test process stay apart."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from urllib.request import urlopen
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE_LATEST",
    "LAG_BUCKETS",
    "CollectorRegistry",
    "MetricsServer",
    "render",
    "scrape_totals",
    "service_registry",
]

# The buckets (seconds) of every lag and latency histogram, from a millisecond to a minute:
# the same everywhere, so that one dashboard panel can compare the stages.
LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class _FrozenObjects(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "python_gc_frozen_objects",
            "Objects kept out of the cyclic collector's sight since start-up "
            "(teamtrack.runtime.settle_heap)",
            value=gc.get_freeze_count(),
        )


def service_registry() -> CollectorRegistry:
    """The registry of a service process: its own counters go on it, next to the process's CPU
    and memory (`process_*`) and the cyclic collector's work (`python_gc_*`), whose
    collections by generation show whether full collections keep coming back."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(_FrozenObjects())
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class MetricsServer:
    """`/metrics` on a small HTTP port of its own (the bridge has no other HTTP server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._requested_port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_port)

    def start(self) -> None:
        self._server, self._thread = start_http_server(
            self._requested_port, addr=self._host, registry=self._registry
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def scrape_totals(url: str, timeout: float = 0.5) -> dict[str, float]:
    """Each metric of a `/metrics` page summed over its labels; empty when it cannot be read."""
    totals: dict[str, float] = {}
    try:
        with urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own loopback pages
            text = response.read().decode()
    except OSError:
        return totals
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals
