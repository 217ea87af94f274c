"""Item 10: a legitimate device abuses its account (a flood, duplicate keys, a seq the history
refuses), against a real Mosquitto, a real bridge and a real Redis. The flood is cut to the
device's rate and counted, its QoS 1 messages still acknowledged; the device next to it loses
nothing; what the history would refuse never reaches the backend."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from conftest import Cluster
from mqtt_tools import publish_lines
from test_bridge import StartBridge, backend, payload, start_bridge

from teamtrack.backends import START_OF_LOG, Backend, Batch
from teamtrack.contract import position_topic

pytestmark = pytest.mark.security
__all__ = ["backend", "start_bridge"]  # fixtures, used by name

RATE, BURST = 10.0, 20
FLOOD = 3000  # what the abusive device offers: 500 msg/s for 6 s


async def stored_positions(backend: Backend, team: str) -> dict[str, list[dict[str, object]]]:
    """Every position of `team` in the backend's log, by worker."""
    subscription = backend.subscribe()
    await subscription.add(team, START_OF_LOG)
    found: dict[str, list[dict[str, object]]] = {}
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(subscription), 1.5)
            except TimeoutError:
                return found
            assert isinstance(item, Batch)
            for event in item.events():
                found.setdefault(event.worker, []).append(orjson.loads(event.body))
    finally:
        await subscription.close()


async def test_a_flooding_device_is_cut_to_its_rate_and_its_neighbour_keeps_everything(
    cluster: Cluster, start_bridge: StartBridge, backend: Backend
) -> None:
    bridge = await start_bridge(0, device_rate_per_s=RATE, device_burst=BURST)
    port = cluster.brokers[0].mqtt_port
    abuser, neighbour = cluster.device("alpha", "w001"), cluster.device("alpha", "w002")

    async def well_behaved() -> int:
        sent = 0
        for seq in range(30):  # 5 Hz for 6 s, one connection per message like a flaky phone
            result = await publish_lines(
                port, neighbour.username, neighbour.password,
                position_topic("alpha", "w002"), [payload(seq)],
            )
            assert result.returncode == 0, result.stderr
            sent += 1
            await asyncio.sleep(0.2)
        return sent

    neighbour_task = asyncio.create_task(well_behaved())
    # One connection, 50 messages every 0.1 s: 500 msg/s.
    flooder = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5",
        "-u", abuser.username, "-P", abuser.password,
        "-t", position_topic("alpha", "w001"), "-q", "1", "-l",
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert flooder.stdin is not None
    started = time.monotonic()
    for step in range(FLOOD // 50):
        flooder.stdin.write(b"".join(payload(step * 50 + n) + b"\n" for n in range(50)))
        await flooder.stdin.drain()
        await asyncio.sleep(max(0.0, started + (step + 1) * 0.1 - time.monotonic()))
    flooder.stdin.close()
    _, errors = await flooder.communicate()
    flood_s = time.monotonic() - started
    # Every QoS 1 message was acknowledged (mosquitto_pub exits 0 once all are), dropped or not.
    assert flooder.returncode == 0, errors
    assert await neighbour_task == 30
    await bridge.batcher.wait_idle()
    stored = await stored_positions(backend, "alpha")

    accepted = len(stored.get("w001", []))
    allowed = BURST + RATE * flood_s + 2
    print(f"abusive device: offered {FLOOD} in {flood_s:.2f} s ({FLOOD / flood_s:.0f}/s), "
          f"accepted {accepted} ({accepted / flood_s:.1f}/s)")
    assert BURST <= accepted <= allowed
    assert bridge.counters.rejected["rate_limited"] == FLOOD - accepted
    # The neighbour, sending at 5 Hz under the limit, kept every position, once, in order.
    assert [position["seq"] for position in stored["w002"]] == list(range(30))


async def test_duplicate_keys_and_a_seq_the_history_refuses_never_reach_the_backend(
    cluster: Cluster, start_bridge: StartBridge, backend: Backend
) -> None:
    bridge = await start_bridge(0)
    device = cluster.device("alpha", "w003")
    now = int(time.time() * 1000)
    hostile = [
        # orjson keeps the last lat (45.5, valid); a reader of the raw payload may take 91.
        b'{"lat":91,"lat":45.5,"lon":13.4,"ts":%d,"seq":1}' % now,
        b'{"lat":45.5,"lon":13.4,"ts":%d,"seq":2,"seq":3}' % now,
        # A seq the history's BIGINT cannot hold: stored nowhere, so shown nowhere either.
        b'{"lat":45.5,"lon":13.4,"ts":%d,"seq":%d}' % (now, 2**63),
    ]
    result = await publish_lines(
        cluster.brokers[0].mqtt_port, device.username, device.password,
        position_topic("alpha", "w003"), [*hostile, payload(4)],
    )
    assert result.returncode == 0, result.stderr
    await bridge.batcher.wait_idle()
    stored = await stored_positions(backend, "alpha")
    assert [position["seq"] for position in stored["w003"]] == [4]
    assert bridge.counters.rejected["duplicate_key"] == 2
    assert bridge.counters.rejected["out_of_range"] == 1
