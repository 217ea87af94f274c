"""The bridge against real Mosquitto brokers and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from conftest import Cluster
from mqtt_tools import MosquittoSub, publish_lines
from prometheus_client import CollectorRegistry

from bridge.metrics import CountersCollector
from bridge.service import MIRROR_REPLAY_S, BridgeConfig, BridgeService
from teamtrack.alerts import Alert, alert_notice
from teamtrack.backends import Backend, Batch, Event, from_url
from teamtrack.contract import Kind, position_topic, status_topic
from teamtrack.local.servers import free_port, start_redis
from teamtrack.metrics import MetricsServer
from teamtrack.mqtt import BrokerAddress, bridge_username

StartBridge = Callable[..., Awaitable[BridgeService]]


def payload(seq: int, **overrides: object) -> bytes:
    body: dict[str, object] = {
        "lat": 52.52,
        "lon": 13.40,
        "ts": int(time.time() * 1000),
        "seq": seq,
    }
    body.update(overrides)
    return orjson.dumps(body)


@pytest.fixture
async def start_bridge(cluster: Cluster, redis_url: str) -> AsyncIterator[StartBridge]:
    started: list[BridgeService] = []

    async def start(broker_index: int, instance: int = 1, **options: object) -> BridgeService:
        broker = cluster.brokers[broker_index]
        # One account per bridge process: the broker takes it as the client id.
        credential = cluster.credentials.bridge(bridge_username(broker.name, instance))
        config = BridgeConfig(
            broker=BrokerAddress.parse(broker.url),
            broker_id=broker.name,
            client_id=credential.username,
            username=credential.username,
            password=credential.password,
            **options,  # type: ignore[arg-type]
        )
        service = BridgeService(config, from_url(redis_url), CollectorRegistry())
        await service.start()
        await asyncio.wait_for(service.wait_subscribed(), 5)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[Backend]:
    backend = from_url(redis_url)
    await backend.start()
    yield backend
    await backend.close()


async def collect_events(
    backend: Backend, team: str, count: int, timeout: float = 10.0
) -> list[dict[str, object]]:
    """Positions of `team` appended to the backend from now on, decoded."""
    subscription = backend.subscribe()
    await subscription.add(team, (await backend.snapshot(team)).cursor)
    received: list[dict[str, object]] = []

    async def read() -> None:
        async for item in subscription:
            assert isinstance(item, Batch)
            for event in item.events():
                received.append(
                    {
                        "worker": event.worker,
                        "origin": event.origin,
                        "kind": event.kind.value,
                        "body": event.body,
                    }
                )
            if len(received) >= count:
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), timeout)
    await subscription.close()
    return received


async def test_positions_reach_the_backend_and_every_broker_exactly_once(
    cluster: Cluster, start_bridge: StartBridge, backend: Backend
) -> None:
    await start_bridge(0)
    await start_bridge(1)
    observer = cluster.credentials.observer
    assert observer is not None
    watchers = [
        await MosquittoSub.start(
            broker.mqtt_port, observer.username, observer.password, "teams/alpha/#"
        )
        for broker in cluster.brokers
    ]
    device = cluster.device("alpha", "w001")
    collecting = asyncio.create_task(collect_events(backend, "alpha", 20))
    await asyncio.sleep(0.2)
    result = await publish_lines(
        cluster.brokers[0].mqtt_port,
        device.username,
        device.password,
        position_topic("alpha", "w001"),
        [payload(seq) for seq in range(20)],
    )
    assert result.returncode == 0, result.stderr
    events = await collecting
    assert [orjson.loads(e["body"])["seq"] for e in events] == list(range(20))  # type: ignore[arg-type]
    assert {e["origin"] for e in events} == {"b1"}
    for watcher in watchers:
        seen = await watcher.wait_for(20, timeout=5)
        await asyncio.sleep(0.3)  # anything extra (a loop, a duplicate) would arrive now
        seqs = [
            orjson.loads(body)["seq"]
            for topic, body in watcher.messages
            if topic == position_topic("alpha", "w001")
        ]
        watcher.stop()
        assert sorted(seqs) == list(range(20)), f"{len(seen)} seen"


async def test_status_is_mirrored_retained(cluster: Cluster, start_bridge: StartBridge) -> None:
    await start_bridge(0)
    await start_bridge(1)
    device = cluster.device("bravo", "w002")
    await publish_lines(
        cluster.brokers[1].mqtt_port,
        device.username,
        device.password,
        status_topic("bravo", "w002"),
        [b"online"],
    )
    await asyncio.sleep(0.5)
    observer = cluster.credentials.observer
    assert observer is not None
    # A subscriber arriving later on the other broker still sees the retained presence.
    late = await MosquittoSub.start(
        cluster.brokers[0].mqtt_port,
        observer.username,
        observer.password,
        "teams/bravo/workers/+/status",
    )
    messages = await late.wait_for(1, timeout=3)
    late.stop()
    assert messages == [(status_topic("bravo", "w002"), "online")]


@pytest.mark.parametrize(
    ("topic_worker", "body", "reason"),
    [
        ("w001", b"not json", "not_json"),
        ("w001", b"[1, 2]", "not_object"),
        ("w001", orjson.dumps({"lat": 1, "lon": 2, "ts": 1}), "missing_field"),
        ("w001", payload(0, extra=1), "unknown_field"),
        ("w001", payload(0, lat="52"), "bad_type"),
        ("w001", payload(0, lat=95.0), "out_of_range"),
        ("w001", payload(0, battery=101), "out_of_range"),
        ("w001", payload(0, ts=int(time.time() * 1000) + 24 * 3_600_000), "ts_in_future"),
        ("w001", payload(0, ts=int(time.time() * 1000) - 8 * 86_400_000), "ts_too_old"),
        ("w001", b'{"lat": 1, "lon": 2, "ts": 1, "seq": 0, "acc": NaN}', "not_json"),
        # JSON has no infinities: an overflowing literal is refused by the JSON parser itself.
        ("w001", b'{"lat":1e400,"lon":1,"ts":1,"seq":1}', "not_json"),
        ("w001", payload(0) + b" " * 1100, "too_large"),
    ],
)
async def test_invalid_payloads_are_counted_and_never_forwarded(
    cluster: Cluster,
    start_bridge: StartBridge,
    backend: Backend,
    topic_worker: str,
    body: bytes,
    reason: str,
) -> None:
    bridge = await start_bridge(0, mirror=False)
    device = cluster.device("alpha", topic_worker)
    collecting = asyncio.create_task(collect_events(backend, "alpha", 1, timeout=3))
    await asyncio.sleep(0.2)
    port = cluster.brokers[0].mqtt_port
    await publish_lines(
        port, device.username, device.password, position_topic("alpha", topic_worker), [body]
    )
    # The bridge survives and the next valid message goes through alone.
    await publish_lines(
        port, device.username, device.password, position_topic("alpha", topic_worker), [payload(42)]
    )
    events = await collecting
    assert [orjson.loads(e["body"])["seq"] for e in events] == [42]  # type: ignore[arg-type]
    assert bridge.counters.rejected == {reason: 1}
    assert bridge.counters.forwarded == 1


async def test_two_bridges_split_one_broker_without_duplicates(
    cluster: Cluster, start_bridge: StartBridge, backend: Backend
) -> None:
    first = await start_bridge(0, instance=1, mirror=False)
    second = await start_bridge(0, instance=2, mirror=False)
    collecting = asyncio.create_task(collect_events(backend, "alpha", 200))
    await asyncio.sleep(0.2)
    for worker in ("w001", "w002"):
        device = cluster.device("alpha", worker)
        await publish_lines(
            cluster.brokers[0].mqtt_port,
            device.username,
            device.password,
            position_topic("alpha", worker),
            [payload(seq) for seq in range(100)],
        )
    events = await collecting
    keys = sorted((e["worker"], orjson.loads(e["body"])["seq"]) for e in events)  # type: ignore[arg-type]
    assert keys == sorted((w, s) for w in ("w001", "w002") for s in range(100))
    assert first.counters.forwarded + second.counters.forwarded == 200
    assert first.counters.forwarded > 0 and second.counters.forwarded > 0


async def test_qos1_messages_wait_in_the_broker_while_the_bridge_restarts(
    cluster: Cluster, start_bridge: StartBridge, backend: Backend, redis_url: str
) -> None:
    bridge = await start_bridge(0, mirror=False)
    await bridge.stop()
    device = cluster.device("alpha", "w003")
    await publish_lines(
        cluster.brokers[0].mqtt_port,
        device.username,
        device.password,
        position_topic("alpha", "w003"),
        [payload(seq) for seq in range(10)],
    )
    collecting = asyncio.create_task(collect_events(backend, "alpha", 10))
    await asyncio.sleep(0.2)
    await start_bridge(0, mirror=False)  # same client id: takes its session back
    events = await collecting
    assert [orjson.loads(e["body"])["seq"] for e in events] == list(range(10))  # type: ignore[arg-type]


async def test_a_worker_cannot_publish_as_another(
    cluster: Cluster, start_bridge: StartBridge, backend: Backend
) -> None:
    await start_bridge(0, mirror=False)
    collecting = asyncio.create_task(collect_events(backend, "alpha", 1, timeout=3))
    await asyncio.sleep(0.2)
    intruder = cluster.device("alpha", "w001")
    port = cluster.brokers[0].mqtt_port
    await publish_lines(
        port, intruder.username, intruder.password, position_topic("alpha", "w002"), [payload(0)]
    )
    await publish_lines(
        port, intruder.username, intruder.password, position_topic("bravo", "w001"), [payload(0)]
    )
    await publish_lines(
        port, intruder.username, intruder.password, position_topic("alpha", "w001"), [payload(7)]
    )
    events = await collecting
    assert [(e["worker"], orjson.loads(e["body"])["seq"]) for e in events] == [("w001", 7)]  # type: ignore[arg-type]


async def test_mirroring_limited_to_chosen_teams(
    cluster: Cluster, start_bridge: StartBridge
) -> None:
    await start_bridge(0, mirror=False)
    await start_bridge(1, mirror_teams=frozenset({"bravo"}))
    observer = cluster.credentials.observer
    assert observer is not None
    watcher = await MosquittoSub.start(
        cluster.brokers[1].mqtt_port, observer.username, observer.password, "teams/#"
    )
    port = cluster.brokers[0].mqtt_port
    for team in ("alpha", "bravo"):
        device = cluster.device(team, "w001")
        await publish_lines(
            port, device.username, device.password, position_topic(team, "w001"), [payload(1)]
        )
    await watcher.wait_for(1, timeout=5)
    await asyncio.sleep(0.5)
    watcher.stop()
    assert [topic for topic, _ in watcher.messages] == [position_topic("bravo", "w001")]


async def test_the_rules_services_notices_are_not_mirrored_to_the_brokers(
    cluster: Cluster, start_bridge: StartBridge
) -> None:
    """Alert notices are for the dashboards: a manager's MQTT client sees no such event."""
    bridge = await start_bridge(1, mirror_teams=frozenset({"alpha"}))
    observer = cluster.credentials.observer
    assert observer is not None
    watcher = await MosquittoSub.start(
        cluster.brokers[1].mqtt_port, observer.username, observer.password, "teams/#"
    )
    now = int(time.time() * 1000)
    alert = Alert("a" * 32, "alpha", "w001", "zone_enter", "z1", "Depot", now, now, "entered")
    # The mirror starts once it sees the watcher (on demand): a notice and a position each
    # round until a position comes through, so every notice had its chance to be mirrored.
    deadline = time.monotonic() + 10
    seq = 0
    while not watcher.messages and time.monotonic() < deadline:
        seq += 1
        await bridge.backend.publish([alert_notice(alert, now)])
        await bridge.backend.publish([
            Event("alpha", "w002", Kind.POSITION, payload(seq), "b1", now, now, 0)
        ])
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.5)
    watcher.stop()
    assert watcher.messages, "the mirror carried no position at all"
    assert {topic for topic, _ in watcher.messages} == {position_topic("alpha", "w002")}


async def test_metrics_port_serves_counters(cluster: Cluster, start_bridge: StartBridge) -> None:
    registry = CollectorRegistry()
    bridge = await start_bridge(0, mirror=False)
    bridge_registry = CollectorRegistry()
    # Serve the running bridge's counters the way `python -m bridge` does.
    bridge_registry.register(CountersCollector(bridge.counters, "b1"))
    server = MetricsServer(bridge_registry, "127.0.0.1", 0)
    server.start()
    try:
        device = cluster.device("alpha", "w001")
        await publish_lines(
            cluster.brokers[0].mqtt_port,
            device.username,
            device.password,
            position_topic("alpha", "w001"),
            [payload(1), b"junk"],
        )
        await asyncio.sleep(0.5)
        text = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
    finally:
        server.stop()
    assert 'teamtrack_bridge_forwarded_total{broker="b1"} 1.0' in text
    assert 'teamtrack_bridge_rejected_total{broker="b1",reason="not_json"} 1.0' in text
    assert registry is not None


async def test_unacknowledged_messages_survive_a_backend_outage_and_a_bridge_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    """QoS 1 is acknowledged only once Redis holds it: what Redis never got comes back later."""
    port = free_port()
    redis = start_redis(port, tmp_path / "redis")
    url = f"redis://127.0.0.1:{port}/0"
    broker = cluster.brokers[0]
    credential = cluster.credentials.bridge()
    config = BridgeConfig(
        broker=BrokerAddress.parse(broker.url),
        broker_id=broker.name,
        client_id="teamtrack-bridge-outage-1",
        username=credential.username,
        password=credential.password,
        mirror=False,
    )
    first = BridgeService(config, from_url(url), CollectorRegistry())
    await first.start()
    await asyncio.wait_for(first.wait_subscribed(), 5)
    redis.stop()  # the backend goes away while devices keep publishing
    device = cluster.device("alpha", "w001")
    await publish_lines(
        broker.mqtt_port,
        device.username,
        device.password,
        position_topic("alpha", "w001"),
        [payload(seq) for seq in range(5)],
    )
    await asyncio.sleep(0.5)
    assert first.counters.forwarded == 0
    assert first.counters.backend_errors >= 1
    await first.stop(flush_timeout=0.1)  # gives up: nothing was acknowledged

    redis = start_redis(port, tmp_path / "redis")  # empty: the 5 messages never reached it
    try:
        backend = from_url(url)
        await backend.start()
        collecting = asyncio.create_task(collect_events(backend, "alpha", 5))
        await asyncio.sleep(0.2)
        second = BridgeService(config, from_url(url), CollectorRegistry())
        await second.start()  # same client id: the broker redelivers the unacknowledged ones
        events = await collecting
        await second.stop()
        await backend.close()
    finally:
        redis.stop()
    seqs = sorted(orjson.loads(e["body"])["seq"] for e in events)  # type: ignore[arg-type]
    assert seqs == list(range(5))


async def test_the_only_bridge_of_a_broker_gets_none_of_its_mirrored_messages_back(
    cluster: Cluster, start_bridge: StartBridge, backend: Backend
) -> None:
    """--no-shared-subscription: a plain subscription with No Local; switching either way
    keeps one subscription in the persistent session, so nothing arrives twice."""
    await start_bridge(0, mirror=False)
    only = await start_bridge(1, shared_subscription=False)
    observer = cluster.credentials.observer
    assert observer is not None
    watcher = await MosquittoSub.start(
        cluster.brokers[1].mqtt_port, observer.username, observer.password, "teams/alpha/#"
    )
    device = cluster.device("alpha", "w001")
    await publish_lines(
        cluster.brokers[0].mqtt_port, device.username, device.password,
        position_topic("alpha", "w001"), [payload(seq) for seq in range(20)],
    )
    await watcher.wait_for(20, timeout=5)
    await asyncio.sleep(0.3)
    watcher.stop()
    assert len(watcher.messages) == 20
    assert only.counters.mirrored == 20
    assert only.counters.mirror_echoes == 0  # never delivered back, so never even parsed

    # The same bridge again, now in the share group: its session's plain subscription goes.
    await only.stop()
    again = await start_bridge(1, mirror=False)
    collecting = asyncio.create_task(collect_events(backend, "alpha", 10))
    await asyncio.sleep(0.2)
    other = cluster.device("alpha", "w002")
    await publish_lines(
        cluster.brokers[1].mqtt_port, other.username, other.password,
        position_topic("alpha", "w002"), [payload(seq) for seq in range(10)],
    )
    events = await collecting
    await asyncio.sleep(0.3)
    assert [orjson.loads(e["body"])["seq"] for e in events] == list(range(10))  # type: ignore[arg-type]
    assert again.counters.forwarded == 10


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_on_demand_mirror_sends_positions_only_while_the_broker_has_a_reader(
    cluster: Cluster, start_bridge: StartBridge
) -> None:
    """Presence always; positions only while broker 1 has a subscriber besides its bridge
    (its `$SYS` subscription count); a reader counted a second late still gets every position
    sent after it subscribed, once, and none of those sent while nobody read."""
    await start_bridge(0, mirror=False)
    mirror = await start_bridge(1, mirror_on_demand=True)
    # its own $SYS and device status subscriptions (shared ones are not counted)
    assert mirror.own_subscriptions == 2
    await _until(lambda: mirror.counters.mirror_demand is False)
    device = cluster.device("alpha", "w001")
    port = cluster.brokers[0].mqtt_port
    await publish_lines(port, device.username, device.password,
                        status_topic("alpha", "w001"), [b"online"])
    await publish_lines(port, device.username, device.password,
                        position_topic("alpha", "w001"), [payload(seq) for seq in range(10)])
    await _until(lambda: mirror.counters.mirrored == 1)  # the presence
    await asyncio.sleep(MIRROR_REPLAY_S + 0.5)  # longer than positions are held for a reader
    assert mirror.counters.mirrored == 1

    observer = cluster.credentials.observer
    assert observer is not None
    watcher = await MosquittoSub.start(
        cluster.brokers[1].mqtt_port, observer.username, observer.password, "teams/alpha/#"
    )
    # Sent at once, before the broker counted the reader: held, then replayed.
    await publish_lines(port, device.username, device.password,
                        position_topic("alpha", "w001"),
                        [payload(seq) for seq in range(10, 20)])
    await watcher.wait_for(11, timeout=10)
    await _until(lambda: mirror.counters.mirror_demand is True)
    await publish_lines(port, device.username, device.password,
                        position_topic("alpha", "w001"),
                        [payload(seq) for seq in range(20, 25)])
    await watcher.wait_for(16, timeout=10)
    await asyncio.sleep(0.3)  # a duplicate would show up now
    watcher.stop()
    assert watcher.messages[0] == (status_topic("alpha", "w001"), "online")  # retained
    seqs = [orjson.loads(body)["seq"] for topic, body in watcher.messages[1:]]
    assert seqs == list(range(10, 25))
    await _until(lambda: mirror.counters.mirror_demand is False)  # the reader left


async def test_a_bridge_mirrors_everything_while_on_demand_is_off(
    cluster: Cluster, start_bridge: StartBridge
) -> None:
    """mirror_on_demand off (`--mirror all`): no `$SYS` subscription, every position mirrored
    whether anybody reads or not."""
    await start_bridge(0, mirror=False)
    mirror = await start_bridge(1)
    device = cluster.device("alpha", "w002")
    await publish_lines(cluster.brokers[0].mqtt_port, device.username, device.password,
                        position_topic("alpha", "w002"), [payload(seq) for seq in range(5)])
    await _until(lambda: mirror.counters.mirrored == 5)
    assert mirror.counters.mirror_demand is None
