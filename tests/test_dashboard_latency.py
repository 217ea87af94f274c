"""The device-to-viewer latency sample (dashboard.latency): one per frame, clocks kept apart."""

from __future__ import annotations

import asyncio
import time

import orjson
from backend_contract import position, status
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dashboard.hub import TeamHub
from dashboard.latency import MAX_AGE_MS, LatencyTally, first_device_ts
from dashboard.metrics import DashboardMetrics
from teamtrack.backends import Event
from teamtrack.backends.base import encode_events
from teamtrack.backends.memory import MemoryBackend
from teamtrack.contract import Kind
from teamtrack.metrics import render


def _event(kind: Kind, body: bytes) -> Event:
    return Event("alpha", "w001", kind, body, "b1", 1_700_000_000_500, 1_700_000_000_000)


def test_the_sample_is_the_first_event_that_has_a_device_time() -> None:
    online = _event(Kind.STATUS, b"online")
    first = _event(Kind.POSITION, b'{"lat":1.0,"lon":2.0,"ts":1700000000000,"seq":1}')
    second = _event(Kind.POSITION, b'{"lat":1.0,"lon":2.0,"ts":1700000009999,"seq":2}')
    assert first_device_ts(encode_events([first, second])) == 1_700_000_000_000
    assert first_device_ts(encode_events([online, online, second])) == 1_700_000_009_999
    assert first_device_ts(encode_events([online])) is None
    assert first_device_ts(b"[]") is None
    assert first_device_ts(b'[{"w":"x",') is None  # not the bridges' encoding: no sample


def test_clocks_ahead_and_old_fixes_are_counted_apart() -> None:
    tally = LatencyTally()
    tally.observe_ms(20)  # 0.02 s
    tally.observe_ms(-300)  # a little ahead: taken as 0
    tally.observe_ms(-5_000)  # far ahead
    tally.observe_ms(MAX_AGE_MS + 1)  # sent from a device's buffer
    tally.observe_ms(70_000)  # above every bucket
    assert (tally.count, tally.clock_ahead, tally.too_old) == (3, 1, 1)
    buckets = dict(tally.cumulative())
    assert buckets["0.001"] == 1  # the clamped one
    assert buckets["0.025"] == 2
    assert buckets["60.0"] == 2 and buckets["+Inf"] == 3
    assert abs(tally.sum - 70.02) < 1e-9


def test_the_dashboard_exports_a_histogram_per_team() -> None:
    registry = CollectorRegistry()
    metrics = DashboardMetrics(registry)
    now_ms = int(time.time() * 1000)
    metrics.observe_latency("alpha", now_ms - 40)
    metrics.observe_latency("bravo", now_ms + 60_000)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(render(registry).decode())
        for sample in family.samples
    }
    name = "teamtrack_dashboard_latency_seconds"
    assert samples[(f"{name}_count", (("team", "alpha"),))] == 1
    assert samples[(f"{name}_bucket", (("le", "0.05"), ("team", "alpha")))] == 1
    assert samples[(f"{name}_bucket", (("le", "0.025"), ("team", "alpha")))] == 0
    assert samples[(f"{name}_count", (("team", "bravo"),))] == 0
    unmeasured = "teamtrack_dashboard_latency_unmeasured_total"
    assert samples[(unmeasured, (("reason", "clock_ahead"), ("team", "bravo")))] == 1


async def test_a_live_frame_carries_its_oldest_positions_fix_time_and_a_snapshot_none() -> None:
    backend = MemoryBackend()
    await backend.start()
    hub = TeamHub(backend, DashboardMetrics(CollectorRegistry()))
    await hub.start()
    try:
        await backend.publish([position("alpha", "w1", 0)])
        viewer = await hub.join("alpha")
        assert orjson.loads(await viewer.next_frame())["type"] == "snapshot"
        assert viewer.device_ts is None
        await backend.publish([status("alpha", "w2", "online"), position("alpha", "w2", 1, ts=7),
                               position("alpha", "w1", 1, ts=5)])
        frame = orjson.loads(await asyncio.wait_for(viewer.next_frame(), 5))
        assert frame["type"] == "events" and len(frame["events"]) == 3
        assert viewer.device_ts == 7
        await hub.leave(viewer)
    finally:
        await hub.stop()
        await backend.close()
