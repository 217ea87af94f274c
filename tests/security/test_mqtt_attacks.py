"""Attacks on the MQTT layer by authenticated accounts, against real brokers, shown refused.

Each test plays the attacker with real clients and then checks that the legitimate traffic
around it was not disturbed: the victim device stays connected, every one of its positions
reaches the bridge, managers see only what they should. The paho clients block, so they run in
threads (`asyncio.to_thread`) while the bridge runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from conftest import Cluster, WsGateway

from bridge.service import BridgeService
from devices.identities import DeviceIdentity
from teamtrack.contract import WORKER_TOPIC_FILTER, position_topic, status_topic

from .conftest import NOT_AUTHORIZED, ClientFactory, StartBridge

pytestmark = pytest.mark.security

POSITIONS = 20
# Any PUBACK reason code from 0x80 up is a refusal (the broker answers 0x95, packet too large).
PACKET_TOO_LARGE_OR_WORSE = 0x80


def position(seq: int, **extra: object) -> bytes:
    return orjson.dumps(
        {"lat": 52.52, "lon": 13.40, "ts": int(time.time() * 1000), "seq": seq, **extra}
    )


async def received_positions(bridge: BridgeService, count: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while bridge.counters.received["position"] < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    # A little longer, so that more than expected would show too.
    await asyncio.sleep(0.2)
    return bridge.counters.received["position"]


async def test_no_account_can_take_over_another_clients_session(
    cluster: Cluster, mqtt_client: ClientFactory, start_bridge: StartBridge
) -> None:
    """Client ids are predictable; connecting with someone else's must not disconnect them."""
    bridge = await start_bridge()
    login = cluster.device("alpha", "w001")
    victim_identity = DeviceIdentity("alpha", "w001", login.username, login.password)
    status = status_topic("alpha", "w001")
    observer = mqtt_client("observer")
    assert await asyncio.to_thread(observer.connect) == 0
    assert await asyncio.to_thread(observer.subscribe, status) == [1]
    victim = mqtt_client(
        login.username, client_id=victim_identity.client_id, will=(status, b"offline")
    )
    assert await asyncio.to_thread(victim.connect) == 0
    assert await asyncio.to_thread(victim.publish, status, b"online", retain=True) == 0
    assert await asyncio.to_thread(observer.messages_until, b"online")

    # Two devices of team bravo connect with the victim's client id and with the bridge's.
    attackers = [
        mqtt_client("bravo.w001", client_id=victim_identity.client_id),
        mqtt_client("bravo.w002", client_id=bridge.config.client_id),
        mqtt_client("bravo.w003", client_id="dev-alpha-w001"),
    ]
    for attacker in attackers:
        await asyncio.to_thread(attacker.connect)
    await asyncio.sleep(0.5)

    topic = position_topic("alpha", "w001")
    acks = [
        await asyncio.to_thread(victim.publish, topic, position(seq)) for seq in range(POSITIONS)
    ]
    got = await received_positions(bridge, POSITIONS)
    sentinel = b"online"
    assert await asyncio.to_thread(victim.publish, status, sentinel, retain=True) == 0
    seen = await asyncio.to_thread(observer.messages_until, sentinel)

    assert victim.disconnects == [], "the victim device was disconnected"
    assert (status, b"offline") not in seen, "the victim's Will fired: shown offline"
    assert bridge.counters.reconnects == 0, "the bridge was disconnected"
    assert acks == [0] * POSITIONS
    assert got == POSITIONS, f"the bridge received {got} of {POSITIONS} positions"


async def test_only_bridges_can_join_the_bridges_share_group(
    cluster: Cluster, mqtt_client: ClientFactory, start_bridge: StartBridge
) -> None:
    """Joining `$share/<bridges' group>/...` would take a share of every broker's positions."""
    bridge = await start_bridge()
    hijack = f"$share/{bridge.config.share_group}/{WORKER_TOPIC_FILTER}"
    device = mqtt_client("bravo.w002")
    manager = mqtt_client("alpha-lead")
    observer = mqtt_client("observer")
    for client in (device, manager, observer):
        assert await asyncio.to_thread(client.connect) == 0
    refused = {
        "device joins the share group": await asyncio.to_thread(device.subscribe, hijack),
        "manager joins the share group": await asyncio.to_thread(manager.subscribe, hijack),
        "observer joins the share group": await asyncio.to_thread(observer.subscribe, hijack),
        "device reads a team": await asyncio.to_thread(device.subscribe, "teams/bravo/#"),
        "device reads itself": await asyncio.to_thread(
            device.subscribe, position_topic("bravo", "w002")
        ),
        "manager reads every team": await asyncio.to_thread(manager.subscribe, "teams/#"),
        "manager reads another team": await asyncio.to_thread(manager.subscribe, "teams/bravo/#"),
        "observer reads $SYS": await asyncio.to_thread(observer.subscribe, "$SYS/#"),
    }
    # What they may read, they may still subscribe to.
    assert await asyncio.to_thread(manager.subscribe, "teams/alpha/#") == [1]
    assert await asyncio.to_thread(observer.subscribe, "teams/+/workers/+/position") == [1]

    victim = mqtt_client("alpha.w001")
    assert await asyncio.to_thread(victim.connect) == 0
    topic = position_topic("alpha", "w001")
    acks = [
        await asyncio.to_thread(victim.publish, topic, position(seq)) for seq in range(POSITIONS)
    ]
    got = await received_positions(bridge, POSITIONS)
    seen_by_manager = await asyncio.to_thread(manager.received, 0.3)

    assert acks == [0] * POSITIONS
    assert got == POSITIONS, f"the bridge received {got} of {POSITIONS} positions"
    assert len([m for m in seen_by_manager if m[0] == topic]) == POSITIONS
    assert refused == {what: [NOT_AUTHORIZED] for what in refused}, refused
    assert device.received(0.1) == []


@pytest.mark.parametrize("transport", ["websockets", "tcp"])
async def test_oversized_publishes_are_refused_on_every_listener(
    cluster: Cluster, mqtt_client: ClientFactory, start_bridge: StartBridge, transport: str,
    ws_gateway: WsGateway,
) -> None:
    """A 1 MB position and a retained 2 MB status reach nobody, over plain MQTT or over
    WebSockets (the gateway, `python -m wsgate`, in front of the broker)."""
    bridge = await start_bridge()
    broker = cluster.brokers[0]
    port = ws_gateway.port if transport == "websockets" else broker.mqtt_port
    manager = mqtt_client("bravo-lead", port=ws_gateway.port, transport="websockets")
    assert await asyncio.to_thread(manager.connect) == 0
    assert await asyncio.to_thread(manager.subscribe, "teams/bravo/#") == [1]

    outcomes = []
    for topic, size, retain in (
        (position_topic("bravo", "w001"), 1 << 20, False),
        (status_topic("bravo", "w001"), 2 << 20, True),
    ):
        attacker = mqtt_client("bravo.w001", port=port, transport=transport)
        assert await asyncio.to_thread(attacker.connect) == 0
        body = position(1, pad="x" * size) if not retain else b"o" * size
        outcomes.append(await asyncio.to_thread(attacker.publish, topic, body, retain=retain))
        await asyncio.to_thread(attacker.close)

    # The legitimate worker next to it keeps publishing.
    legit = mqtt_client("bravo.w002")
    assert await asyncio.to_thread(legit.connect) == 0
    sentinel = position(7)
    assert await asyncio.to_thread(legit.publish, position_topic("bravo", "w002"), sentinel) == 0
    seen = await asyncio.to_thread(manager.messages_until, sentinel)
    # A manager who opens the map afterwards gets no retained 2 MB status either.
    late = mqtt_client("bravo-lead", port=ws_gateway.port, transport="websockets")
    await asyncio.to_thread(manager.close)
    assert await asyncio.to_thread(late.connect) == 0
    assert await asyncio.to_thread(late.subscribe, status_topic("bravo", "w001")) == [1]
    retained = await asyncio.to_thread(late.received, 0.5)

    refused = [outcome is None or outcome >= PACKET_TOO_LARGE_OR_WORSE for outcome in outcomes]
    assert refused == [True, True], outcomes
    assert [len(body) for _topic, body in seen] == [len(sentinel)]
    assert retained == []
    assert await received_positions(bridge, 1) == 1
    assert not bridge.counters.rejected, bridge.counters.rejected
