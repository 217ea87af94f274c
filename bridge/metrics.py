"""The bridge's counters, and their Prometheus families (`teamtrack_bridge_*`, labelled by
broker)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from teamtrack.ingress.duty import REASONS as DUTY_REASONS


@dataclass
class BridgeCounters:
    """Plain integers bumped per message (cheap); turned into Prometheus metrics on scrape."""

    received: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    # OwnTracks objects of a `_type` teamtrack does not use (cards, waypoints...), by type.
    owntracks_ignored: Counter[str] = field(default_factory=Counter)
    # Dropped off duty, by reason (the DutyGate's own counter).
    duty_dropped: Counter[str] = field(default_factory=Counter)
    forwarded: int = 0
    dropped_overflow: int = 0
    mirror_echoes: int = 0
    mirrored: int = 0
    mirror_skipped_offline: int = 0
    # On-demand mirroring: positions republished from those held when a reader turned up, and
    # whether the broker has a reader (None: not known, everything is mirrored).
    mirror_replayed: int = 0
    mirror_demand: bool | None = None
    backend_errors: int = 0
    reconnects: int = 0
    connected: bool = False
    # True once the broker granted this connection's subscription (SUBACK).
    subscribed: bool = False


class CountersCollector(Collector):
    """The bridge's counters as Prometheus families, labelled with its broker."""

    def __init__(self, counters: BridgeCounters, broker_id: str) -> None:
        self._counters = counters
        self._broker_id = broker_id

    def collect(self) -> Iterator[Any]:
        counters = self._counters
        broker = self._broker_id
        received = CounterMetricFamily(
            "teamtrack_bridge_received", "Messages received from the broker",
            labels=["broker", "kind"],
        )
        for kind, count in counters.received.items():
            received.add_metric([broker, kind], count)
        yield received
        rejected = CounterMetricFamily(
            "teamtrack_bridge_rejected", "Messages dropped for breaking the contract",
            labels=["broker", "reason"],
        )
        for reason, count in counters.rejected.items():
            rejected.add_metric([broker, reason], count)
        yield rejected
        ignored = CounterMetricFamily(
            "teamtrack_bridge_owntracks_ignored",
            "OwnTracks objects of a type teamtrack does not use", labels=["broker", "type"],
        )
        for kind, count in counters.owntracks_ignored.items():
            ignored.add_metric([broker, kind], count)
        yield ignored
        off_duty = CounterMetricFamily(
            "teamtrack_bridge_off_duty_dropped",
            "Positions and worker events dropped because the worker was off duty (outside its "
            "shift) or paused", labels=["broker", "reason"],
        )
        for reason in DUTY_REASONS:
            off_duty.add_metric([broker, reason], counters.duty_dropped[reason])
        yield off_duty
        for name, help_text, value in (
            ("forwarded", "Events handed to the backend", counters.forwarded),
            ("dropped_overflow", "QoS 0 messages dropped while the backend lagged",
             counters.dropped_overflow),
            ("mirror_echoes", "Mirrored messages seen again and skipped", counters.mirror_echoes),
            ("mirrored", "Messages from other brokers published into this one",
             counters.mirrored),
            ("mirror_skipped_offline", "Mirror messages skipped while the broker was away",
             counters.mirror_skipped_offline),
            ("mirror_replayed", "Positions held while the broker had no reader, mirrored when "
             "one subscribed", counters.mirror_replayed),
            ("backend_errors", "Failed backend publishes (retried)", counters.backend_errors),
            ("mqtt_reconnects", "Connections to the broker lost", counters.reconnects),
        ):
            family = CounterMetricFamily(f"teamtrack_bridge_{name}", help_text, labels=["broker"])
            family.add_metric([broker], value)
            yield family
        connected = GaugeMetricFamily(
            "teamtrack_bridge_mqtt_connected", "1 while connected to the broker", labels=["broker"]
        )
        connected.add_metric([broker], 1 if counters.connected else 0)
        yield connected
        subscribed = GaugeMetricFamily(
            "teamtrack_bridge_subscribed",
            "1 once the broker granted this connection's subscription", labels=["broker"],
        )
        subscribed.add_metric([broker], 1 if counters.subscribed else 0)
        yield subscribed
        demand = GaugeMetricFamily(
            "teamtrack_bridge_mirror_demand",
            "1 while positions are mirrored into the broker (always, or on demand: it has a "
            "subscriber besides its bridges), 0 while only presence is", labels=["broker"],
        )
        demand.add_metric([broker], 0 if counters.mirror_demand is False else 1)
        yield demand


__all__ = ["BridgeCounters", "CountersCollector"]
