"""Attackers and victims for the security tests: real paho MQTT v5 clients, real brokers.

Every client records what happened to it (disconnects, acknowledgements, messages) so that a
test can assert both halves of a defence: the attack was refused, and nothing legitimate was
lost or disturbed by it.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final

import paho.mqtt.client as mqtt
import pytest
from conftest import Cluster, WsGateway, start_ws_gateway
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry

from bridge.service import BridgeConfig, BridgeService
from teamtrack.backends import from_url
from teamtrack.local.servers import LOOPBACK
from teamtrack.mqtt import BrokerAddress, bridge_username

WAIT_S: Final = 5.0
NOT_AUTHORIZED: Final = 0x87
PACKET_TOO_LARGE: Final = 0x95


class Client:
    """A paho MQTT v5 client driven synchronously from a test (its network loop is a thread)."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        *,
        client_id: str = "",
        transport: str = "tcp",
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
            transport="websockets" if transport == "websockets" else "tcp",
        )
        self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnects: list[int] = []
        self.connect_result: ReasonCode | None = None
        self._changed = threading.Condition()
        self._acks: dict[int, list[int]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        with self._changed:
            self.connect_result = reason
            self._changed.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        with self._changed:
            self.disconnects.append(reason.value)
            self._changed.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, bytes(message.payload)))

    def _record(self, mid: int, codes: list[int]) -> None:
        with self._changed:
            self._acks[mid] = codes
            self._changed.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._record(mid, [reason.value])

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Any) -> None:
        self._record(mid, [reason.value for reason in reasons])

    def connect(self) -> int:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        self.client.connect(LOOPBACK, self.port, keepalive=30, properties=properties)
        self.client.loop_start()
        with self._changed:
            assert self._changed.wait_for(lambda: self.connect_result is not None, WAIT_S)
        assert self.connect_result is not None
        return self.connect_result.value

    def _wait_ack(self, mid: int) -> list[int] | None:
        """The acknowledgement's reason codes, or None if the broker hung up instead."""
        disconnects = len(self.disconnects)
        with self._changed:
            self._changed.wait_for(
                lambda: mid in self._acks or len(self.disconnects) > disconnects, WAIT_S
            )
            if mid in self._acks:
                return self._acks.pop(mid)
        assert len(self.disconnects) > disconnects, f"no acknowledgement of {mid} in {WAIT_S} s"
        return None

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[int] | None:
        result, mid = self.client.subscribe(topic_filter, qos=qos)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        return self._wait_ack(mid)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> int | None:
        """The PUBACK reason code (QoS 1), or None if the broker disconnected instead."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        codes = self._wait_ack(info.mid)
        return None if codes is None else codes[0]

    def received(self, timeout: float) -> list[tuple[str, bytes]]:
        """Everything that arrives within `timeout` seconds."""
        got = []
        try:
            while True:
                got.append(self.messages.get(timeout=timeout))
        except queue.Empty:
            return got

    def messages_until(self, payload: bytes) -> list[tuple[str, bytes]]:
        got = []
        while True:
            try:
                topic, body = self.messages.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"{payload!r} not received; got {len(got)}") from None
            got.append((topic, body))
            if body == payload:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


ClientFactory = Callable[..., Client]
StartBridge = Callable[..., Awaitable[BridgeService]]
StartGateway = Callable[..., WsGateway]


@pytest.fixture
def start_gateway(cluster: Cluster) -> Iterator[StartGateway]:
    """start_gateway(*flags) -> a real `python -m wsgate` in front of broker 1; stopped after."""
    started: list[WsGateway] = []

    def start(*flags: str) -> WsGateway:
        gateway = start_ws_gateway(cluster.brokers[0].mqtt_port, cluster.state_dir, *flags)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.process.stop()


@pytest.fixture
def ws_gateway(start_gateway: StartGateway) -> WsGateway:
    """Broker 1's MQTT over WebSockets, with the gateway's defaults."""
    return start_gateway()


@pytest.fixture
def mqtt_client(cluster: Cluster) -> Iterator[ClientFactory]:
    """mqtt_client(username, port=..., **options) -> a Client, not yet connected; closed after."""
    passwords = {
        **{device.username: device.password for device in cluster.credentials.devices},
        **{manager.username: manager.mqtt_password for manager in cluster.credentials.managers},
        **{service.username: service.password for service in cluster.credentials.observers},
        **{service.username: service.password for service in cluster.credentials.bridges},
    }
    made: list[Client] = []

    def make(username: str, *, port: int | None = None, **options: Any) -> Client:
        client = Client(
            cluster.brokers[0].mqtt_port if port is None else port, username,
            passwords[username], **options,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
async def start_bridge(cluster: Cluster, redis_url: str) -> AsyncIterator[StartBridge]:
    """The bridge of broker 1, configured as `python -m bridge` configures it."""
    started: list[BridgeService] = []

    async def start(instance: int = 1, **options: Any) -> BridgeService:
        broker = cluster.brokers[0]
        credential = cluster.credentials.bridge(bridge_username(broker.name, instance))
        config = BridgeConfig(
            broker=BrokerAddress.parse(broker.url),
            broker_id=broker.name,
            client_id=credential.username,
            username=credential.username,
            password=credential.password,
            mirror=False,
            **options,
        )
        service = BridgeService(config, from_url(redis_url), CollectorRegistry())
        await service.start()
        await service.wait_subscribed()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()
