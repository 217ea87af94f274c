"""The bridge's fast paths through gmqtt (bridge/mqtt_fast.py) and its batch pacing.

The fast paths use gmqtt's private parts; the first tests fail when a gmqtt upgrade takes them
away (the bridge then still works, through the public API, only slower: the fallback test).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import SimpleNamespace

import orjson
import pytest
from conftest import Cluster
from gmqtt import Client
from gmqtt.client import Message
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.handler import MqttPackageHandler
from gmqtt.mqtt.package import PublishPacket
from mqtt_tools import MosquittoSub, publish_lines
from prometheus_client import CollectorRegistry

import bridge.service
from bridge.mqtt_fast import PublishWriter, install_inbound, publish_packet
from bridge.service import BridgeConfig, BridgeService
from teamtrack.backends import Batch, Event, from_url
from teamtrack.contract import Kind, position_topic, status_topic
from teamtrack.ingress.batcher import Batcher
from teamtrack.mqtt import BrokerAddress


def test_the_pinned_gmqtt_takes_the_fast_paths() -> None:
    """If this fails after a gmqtt upgrade, bridge/mqtt_fast.py needs new hooks (the bridge
    still works through the public API, only slower)."""
    client = Client("fast-paths", optimistic_acknowledgement=False)
    assert install_inbound(client, lambda *_: None)
    assert PublishWriter.supported(client)


def test_without_the_hooks_nothing_is_changed() -> None:
    bare = SimpleNamespace(on_message=None)
    assert not install_inbound(bare, lambda *_: None)
    assert bare.on_message is None
    assert not PublishWriter.supported(bare)


@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("payload", [b"", b"online", b"x" * 300])
def test_publish_packets_are_what_gmqtt_would_build(retain: bool, payload: bytes) -> None:
    topic = position_topic("alpha", "w001")
    origin = ("teamtrack-origin", "b1")
    message = Message(topic, payload, qos=0, retain=retain, user_property=origin)
    protocol = SimpleNamespace(proto_ver=MQTTv50, id_generator=None)
    _mid, expected = PublishPacket.build_package(message, protocol)
    assert publish_packet(topic, payload, retain, origin) == bytes(expected)


def event(seq: int, qos: int = 0) -> Event:
    now = int(time.time() * 1000)
    body = orjson.dumps({"lat": 1.0, "lon": 2.0, "ts": now, "seq": seq})
    return Event("alpha", "w001", Kind.POSITION, body, "b1", now, now, qos)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_batches_are_paced_after_a_burst_of_two_and_a_full_one_goes_at_once() -> None:
    published: list[list[int]] = []

    async def publish(events: Sequence[Event]) -> None:
        published.append([orjson.loads(e.body)["seq"] for e in events])

    # An interval no test would wait for: anything published within it did not wait.
    batcher = Batcher(publish, max_batch=4, max_pending=100, min_interval=3600.0)
    running = asyncio.create_task(batcher.run())
    try:
        batcher.offer(event(0))
        await settle()
        assert published == [[0]]  # the first event after a quiet spell goes at once
        batcher.offer(event(1))
        await settle()
        assert published == [[0], [1]]  # ... and a second right behind it (BURST)
        for seq in (2, 3, 4):
            batcher.offer(event(seq))
        await settle()
        assert published == [[0], [1]]  # gathered: the interval is not over
        batcher.offer(event(5))  # a full batch does not wait
        await settle()
        assert published == [[0], [1], [2, 3, 4, 5]]
        held = batcher.submit_nowait(event(6, qos=1))
        await settle()
        assert not held.done()  # waiting, in the next batch
    finally:
        running.cancel()


async def test_without_an_interval_each_batch_goes_when_the_previous_returned() -> None:
    published: list[int] = []
    gate = asyncio.Event()

    async def publish(events: Sequence[Event]) -> None:
        published.append(len(events))
        await gate.wait()

    batcher = Batcher(publish, max_batch=100, max_pending=100)
    running = asyncio.create_task(batcher.run())
    try:
        batcher.offer(event(0))
        await settle()
        for seq in (1, 2):
            batcher.offer(event(seq))
        await settle()
        assert published == [1]  # one publish in flight; the others gather
        gate.set()
        await batcher.wait_idle()
        assert published == [1, 2]
    finally:
        running.cancel()


async def test_the_public_api_path_still_forwards_and_acknowledges(
    cluster: Cluster, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gmqtt without the hooks: a coroutine on_message (a task per message), QoS 0 and 1."""
    monkeypatch.setattr(bridge.service, "install_inbound", lambda client, accept: False)
    broker = cluster.brokers[0]
    credential = cluster.credentials.bridge()
    config = BridgeConfig(
        broker=BrokerAddress.parse(broker.url),
        broker_id=broker.name,
        client_id="teamtrack-bridge-fallback-1",
        username=credential.username,
        password=credential.password,
        mirror=False,
    )
    service = BridgeService(config, from_url(redis_url), CollectorRegistry())
    await service.start()
    reader = from_url(redis_url)
    await reader.start()
    try:
        assert not service.fast_inbound
        await asyncio.wait_for(service.wait_subscribed(), 5)
        subscription = reader.subscribe()
        await subscription.add("alpha", (await reader.snapshot("alpha")).cursor)
        device = cluster.device("alpha", "w001")
        now = int(time.time() * 1000)
        for qos, seq in ((0, 1), (1, 2)):
            body = orjson.dumps({"lat": 1.0, "lon": 2.0, "ts": now, "seq": seq})
            result = await publish_lines(
                broker.mqtt_port, device.username, device.password,
                position_topic("alpha", "w001"), [body], qos=qos,
            )
            assert result.returncode == 0, result.stderr  # QoS 1: mosquitto_pub got its PUBACK
        seqs: list[int] = []
        while len(seqs) < 2:
            item = await asyncio.wait_for(anext(subscription), 5)
            assert isinstance(item, Batch)
            seqs += [orjson.loads(e.body)["seq"] for e in item.events()]
        assert seqs == [1, 2]
        await subscription.close()
    finally:
        await service.stop()
        await reader.close()


async def test_mirrored_positions_are_written_in_batches_and_arrive_once_in_order(
    cluster: Cluster, redis_url: str
) -> None:
    """Bridge b2 mirrors b1's traffic with gathered writes; statuses (QoS 1) go through gmqtt
    between them without overtaking anything."""
    services = []
    for index in (0, 1):
        broker = cluster.brokers[index]
        credential = cluster.credentials.bridge()
        config = BridgeConfig(
            broker=BrokerAddress.parse(broker.url),
            broker_id=broker.name,
            client_id=f"teamtrack-bridge-{broker.name}-writes",
            username=credential.username,
            password=credential.password,
            mirror=index == 1,
        )
        service = BridgeService(config, from_url(redis_url), CollectorRegistry())
        await service.start()
        await asyncio.wait_for(service.wait_subscribed(), 5)
        services.append(service)
    observer = cluster.credentials.observer
    assert observer is not None
    watcher = await MosquittoSub.start(
        cluster.brokers[1].mqtt_port, observer.username, observer.password, "teams/alpha/#"
    )
    try:
        await asyncio.sleep(0.5)  # the mirror's group exists before anything is published
        device = cluster.device("alpha", "w002")
        port = cluster.brokers[0].mqtt_port
        now = int(time.time() * 1000)
        bodies = [orjson.dumps({"lat": 1.0, "lon": 2.0, "ts": now, "seq": s}) for s in range(200)]
        await publish_lines(
            port, device.username, device.password, position_topic("alpha", "w002"), bodies,
            qos=0,
        )
        await publish_lines(
            port, device.username, device.password, status_topic("alpha", "w002"), [b"offline"],
            qos=1,
        )
        messages = await watcher.wait_for(201, timeout=10)
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would arrive now
        positions = [orjson.loads(body)["seq"] for topic, body in watcher.messages
                     if topic == position_topic("alpha", "w002")]
        assert positions == list(range(200))
        assert messages[-1] == (status_topic("alpha", "w002"), "offline")
        assert services[1].counters.mirrored == 201
        writer = services[1]._mirror_writer
        assert writer is not None and writer.written == 200  # the positions; the status: gmqtt
    finally:
        watcher.stop()
        for service in services:
            await service.stop()


def _inbound(message: Message) -> tuple[int, bytes]:
    """(first header byte, the rest after the remaining-length) of the PUBLISH gmqtt builds."""
    protocol = SimpleNamespace(proto_ver=MQTTv50, id_generator=SimpleNamespace(next_id=lambda: 7))
    _mid, packet = PublishPacket.build_package(message, protocol)
    packet = bytes(packet)
    at = 1
    while packet[at] & 0x80:
        at += 1
    return packet[0], packet[at + 1:]


@pytest.mark.parametrize(
    ("message", "expected", "by_gmqtt"),
    [
        (Message("teams/a/workers/w1/position", b'{"x":1}', qos=0),
         ("teams/a/workers/w1/position", b'{"x":1}', 0, 0, None), 0),
        (Message("teams/a/workers/w1/status", b"online", qos=0, retain=True),
         ("teams/a/workers/w1/status", b"online", 0, 1, None), 0),
        (Message("teams/a/workers/w1/position", b"", qos=0),
         ("teams/a/workers/w1/position", b"", 0, 0, None), 0),
        # Properties, QoS 1: through gmqtt's own step, same result.
        (Message("teams/a/workers/w1/position", b"p", qos=0, user_property=("k", "v")),
         ("teams/a/workers/w1/position", b"p", 0, 0, [("k", "v")]), 1),
        (Message("teams/a/workers/w1/position", b"q", qos=1),
         ("teams/a/workers/w1/position", b"q", 1, 0, None), 1),
    ],
)
def test_inbound_publishes_reach_accept_as_gmqtt_parses_them(
    message: Message, expected: tuple[str, bytes, int, int, object], by_gmqtt: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gmqtt_steps: list[int] = []
    gmqtt_step = MqttPackageHandler._handle_publish_packet

    def counted(self: MqttPackageHandler, cmd: int, raw_packet: bytes) -> None:
        gmqtt_steps.append(cmd)
        gmqtt_step(self, cmd, raw_packet)

    monkeypatch.setattr(MqttPackageHandler, "_handle_publish_packet", counted)
    client = Client("fast-inbound", optimistic_acknowledgement=False)
    seen: list[tuple[str, bytes, int, int, object]] = []

    def accept(topic: str, payload: bytes, qos: int, properties: dict[str, object]) -> None:
        seen.append((topic, payload, qos, properties["retain"],
                     properties.get("user_property")))

    assert install_inbound(client, accept)
    handler = client._package_handler
    handler._connection_state.protocol_version = MQTTv50
    pubacks: list[object] = []
    # The QoS 1 message is acknowledged at once (accept returned None): no socket here.
    client._connection = SimpleNamespace(
        send_command_with_mid=lambda *args, **kw: pubacks.append(args)
    )
    cmd, raw = _inbound(message)
    handler._handle_packet(cmd, raw)
    assert seen == [expected]
    assert len(gmqtt_steps) == by_gmqtt
