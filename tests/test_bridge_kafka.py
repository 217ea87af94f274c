"""The bridge on Kafka: what it acknowledged survives the Kafka broker stopping mid-run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
from conftest import Cluster
from mqtt_tools import publish_lines
from prometheus_client import CollectorRegistry

from bridge.service import BridgeConfig, BridgeService
from teamtrack.backends import START_OF_LOG, Backend, Batch, from_url
from teamtrack.contract import position_topic
from teamtrack.local.kafka_server import start_kafka
from teamtrack.local.servers import free_port
from teamtrack.mqtt import BrokerAddress


def payload(seq: int) -> bytes:
    return orjson.dumps({"lat": 52.52, "lon": 13.40, "ts": int(time.time() * 1000), "seq": seq})


async def wait_until(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        await asyncio.sleep(0.05)
    return False


async def read_log(backend: Backend, team: str, count: int) -> list[tuple[str, int]]:
    """(worker, seq) of the team's whole retained log, until `count` events or 10 s."""
    subscription = backend.subscribe()
    await subscription.add(team, START_OF_LOG)
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 10
    while len(seen) < count and time.monotonic() < deadline:
        try:
            item = await asyncio.wait_for(anext(subscription), deadline - time.monotonic())
        except TimeoutError:
            break
        assert isinstance(item, Batch)
        seen += [(event.worker, orjson.loads(event.body)["seq"]) for event in item.events()]
    await subscription.close()
    return seen


async def test_acknowledged_messages_survive_a_kafka_restart_mid_run(
    cluster: Cluster, tmp_path: Path
) -> None:
    """QoS 1 is acknowledged once Kafka confirmed it (acks=all); while Kafka is down the bridge
    holds what arrives and delivers it when Kafka is back: nothing lost, nothing twice."""
    port, controller_port = free_port(), free_port()
    kafka = start_kafka(port, controller_port, tmp_path / "kafka")
    url = f"kafka://127.0.0.1:{port}?topic_prefix=restart"
    broker = cluster.brokers[0]
    credential = cluster.credentials.bridge()
    config = BridgeConfig(
        broker=BrokerAddress.parse(broker.url),
        broker_id=broker.name,
        client_id="teamtrack-bridge-kafka-restart-1",
        username=credential.username,
        password=credential.password,
        mirror=False,
    )
    bridge = BridgeService(config, from_url(url), CollectorRegistry())
    device = cluster.device("alpha", "w001")

    async def publish(seqs: range) -> None:
        result = await publish_lines(
            broker.mqtt_port, device.username, device.password,
            position_topic("alpha", "w001"), [payload(seq) for seq in seqs],
        )
        assert result.returncode == 0, result.stderr

    try:
        await bridge.start()
        await asyncio.wait_for(bridge.wait_subscribed(), 5)
        await publish(range(0, 10))
        assert await wait_until(lambda: bridge.counters.forwarded == 10, 10)

        await asyncio.to_thread(kafka.stop)
        await publish(range(10, 20))  # Mosquitto has them; the bridge cannot hand them on
        await asyncio.sleep(1.0)
        assert bridge.counters.forwarded == 10

        kafka = await asyncio.to_thread(start_kafka, port, controller_port, tmp_path / "kafka")
        await publish(range(20, 30))
        assert await wait_until(lambda: bridge.counters.forwarded == 30, 30), (
            bridge.counters.forwarded
        )

        reader = from_url(url)
        await reader.start()
        try:
            seen = await read_log(reader, "alpha", 30)
        finally:
            await reader.close()
        assert seen == [("w001", seq) for seq in range(30)]
    finally:
        await bridge.stop()
        kafka.stop()
