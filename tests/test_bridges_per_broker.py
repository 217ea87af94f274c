"""`teamtrack up --bridges-per-broker 2`: two bridge processes per broker in one shared
subscription, each with its own MQTT account, client id and /metrics port.

Real servers (`teamtrack up --no-simulate`): devices of team alpha publish QoS 1 positions on
broker 1; the manager's WebSocket (on the other dashboard) and the SQL history see each once,
both bridges of broker 1 forwarded some of them, and a bridge killed under load loses nothing
that a device had acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
import websockets
from mqtt_tools import publish_lines
from paho.mqtt.enums import CallbackAPIVersion
from test_end_to_end import RunningCluster, cluster_running

from teamtrack.contract import position_topic, status_topic
from teamtrack.local.cluster import ClusterError, ClusterOptions, LocalCluster
from teamtrack.local.ports import MAX_BRIDGES_PER_BROKER, PortPlan
from teamtrack.metrics import scrape_totals

WAIT = 15.0
WORKERS = 20


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    state_dir = tmp_path_factory.mktemp("bridges-per-broker")
    with cluster_running(
        state_dir, "--bridges-per-broker", "2", "--workers", str(WORKERS), "--no-tls"
    ) as cluster:
        yield cluster


def workers() -> list[str]:
    return [f"w{number:03d}" for number in range(1, WORKERS + 1)]


def broker_1_bridges(running: RunningCluster) -> list[str]:
    """The /metrics pages of bridges b1-1 and b1-2 (endpoints list broker 1's bridges first)."""
    return list(running.endpoints["bridge_metrics"][:2])


def forwarded(url: str) -> float:
    return scrape_totals(url).get("teamtrack_bridge_forwarded_total", 0.0)


def position(ts: int, seq: int) -> bytes:
    return orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": ts, "seq": seq})


async def live_positions(
    running: RunningCluster, expected: int, ready: asyncio.Event, seconds: float
) -> Counter[tuple[str, int]]:
    """(worker, ts) of every alpha position on dashboard 2's WebSocket, until `expected` were
    seen and a quiet second passed, or `seconds` passed."""
    url = running.dashboard_ws(1, "alpha")
    headers = {"Authorization": f"Bearer {running.token_of('alpha')}"}
    seen: Counter[tuple[str, int]] = Counter()
    async with websockets.connect(url, additional_headers=headers, open_timeout=WAIT) as socket:
        snapshot = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
        assert snapshot["type"] == "snapshot"
        ready.set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            quiet = 1.0 if seen.total() >= expected else deadline - time.monotonic()
            try:
                frame = json.loads(await asyncio.wait_for(socket.recv(), max(quiet, 0.01)))
            except TimeoutError:
                if seen.total() >= expected:
                    break
                continue
            if frame["type"] == "events":
                seen.update((e["w"], e["p"]["ts"]) for e in frame["events"] if e["k"] == "p")
    return seen


def stored_positions(running: RunningCluster, since_ms: int) -> Counter[tuple[str, int]]:
    stored: Counter[tuple[str, int]] = Counter()
    headers = {"Authorization": f"Bearer {running.token_of('alpha')}"}
    for worker in workers():
        url = running.endpoints["dashboards"][0] + f"/api/teams/alpha/workers/{worker}/track"
        response = httpx.get(url, params={"since": since_ms, "limit": 1000}, headers=headers,
                             timeout=WAIT)
        response.raise_for_status()
        stored.update((worker, point["ts"]) for point in response.json()["points"])
    return stored


def wait_stored(
    running: RunningCluster, since_ms: int, expected: set[tuple[str, int]]
) -> Counter[tuple[str, int]]:
    deadline = time.monotonic() + WAIT
    while True:
        stored = stored_positions(running, since_ms)
        if expected <= set(stored) or time.monotonic() > deadline:
            return stored
        time.sleep(0.3)


def test_every_bridge_of_a_broker_has_its_own_account_port_and_subscription(
    running: RunningCluster,
) -> None:
    pages = running.endpoints["bridge_metrics"]
    assert len(pages) == 4 and len(set(pages)) == 4
    for url in pages:
        totals = scrape_totals(url)
        assert totals.get("teamtrack_bridge_mqtt_connected") == 1
        assert totals.get("teamtrack_bridge_subscribed") == 1
    processes = json.loads((running.state_dir / "processes.json").read_text())
    assert {"bridge-1", "bridge-1-2", "bridge-2", "bridge-2-2"} <= set(processes)
    usernames = {bridge.username for bridge in running.credentials.bridges}
    assert usernames == {"bridge-b1-1", "bridge-b1-2", "bridge-b2-1", "bridge-b2-2"}


async def test_qos1_positions_are_split_over_both_bridges_and_delivered_once(
    running: RunningCluster,
) -> None:
    start_ms = int(time.time() * 1000)
    before = [forwarded(url) for url in broker_1_bridges(running)]
    sent: set[tuple[str, int]] = set()
    ready = asyncio.Event()
    per_worker = 10  # 200 positions
    watcher = asyncio.create_task(live_positions(running, WORKERS * per_worker, ready, WAIT))
    await asyncio.wait_for(ready.wait(), WAIT)
    publishes = []
    for number, worker in enumerate(workers()):
        device = running.credentials.device("alpha", worker)
        stamps = [start_ms + number * 100 + seq for seq in range(per_worker)]
        sent.update((worker, ts) for ts in stamps)
        publishes.append(publish_lines(
            running.broker_port(0), device.username, device.password,
            position_topic("alpha", worker),
            [position(ts, seq) for seq, ts in enumerate(stamps)],
        ))
    results = await asyncio.gather(*publishes)
    assert all(result.returncode == 0 for result in results), results
    live = await watcher
    assert set(live) == sent and max(live.values()) == 1
    stored = await asyncio.to_thread(wait_stored, running, start_ms, sent)
    assert set(stored) == sent and max(stored.values()) == 1
    after = [forwarded(url) for url in broker_1_bridges(running)]
    gains = [later - earlier for earlier, later in zip(before, after, strict=True)]
    assert all(gain > 0 for gain in gains), gains
    assert sum(gains) >= len(sent)


class PacedDevice:
    """A device publishing QoS 1 positions at a steady pace; `acked` holds what the broker
    acknowledged (PUBACK)."""

    def __init__(self, port: int, username: str, password: str, topic: str) -> None:
        self.topic = topic
        self.acked: list[int] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(username, password)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def run(self, stamps: list[int], interval: float) -> None:
        pending = []
        for seq, ts in enumerate(stamps):
            pending.append((ts, self.client.publish(self.topic, position(ts, seq), qos=1)))
            time.sleep(interval)
        for ts, info in pending:
            info.wait_for_publish(WAIT)
            if info.is_published():
                self.acked.append(ts)
        self.client.disconnect()
        self.client.loop_stop()


def test_a_bridge_killed_under_load_loses_nothing_acknowledged(
    running: RunningCluster,
) -> None:
    since_ms = int(time.time() * 1000)
    # Later than any position of the test before: what is stored from here on is this test's.
    start_ms = since_ms + 10_000
    processes = json.loads((running.state_dir / "processes.json").read_text())
    victim = int(processes["bridge-1-2"])
    devices = []
    threads = []
    per_worker, interval = 15, 0.2  # 300 positions over 3 s, 100 a second
    for number, worker in enumerate(workers()):
        credential = running.credentials.device("alpha", worker)
        device = PacedDevice(running.broker_port(0), credential.username, credential.password,
                             position_topic("alpha", worker))
        stamps = [start_ms + number * 100 + seq for seq in range(per_worker)]
        devices.append(device)
        threads.append(threading.Thread(target=device.run, args=(stamps, interval)))
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(WAIT + per_worker * interval)
    acked = {
        (worker, ts) for worker, device in zip(workers(), devices, strict=True)
        for ts in device.acked
    }
    assert len(acked) == WORKERS * per_worker
    stored = Counter({
        key: count for key, count in wait_stored(running, since_ms, acked).items()
        if key[1] >= start_ms
    })
    assert set(stored) == acked and max(stored.values()) == 1
    restarted = json.loads((running.state_dir / "processes.json").read_text())
    assert int(restarted["bridge-1-2"]) != victim


def subscribed_again(running: RunningCluster, role: str, old_pid: int) -> None:
    """Wait until the supervisor restarted `role` and the new process subscribed."""
    deadline = time.monotonic() + WAIT
    index = 1 if role == "bridge-1-2" else 0
    while time.monotonic() < deadline:
        pids = json.loads((running.state_dir / "processes.json").read_text())
        if int(pids[role]) != old_pid:
            try:
                totals = scrape_totals(broker_1_bridges(running)[index])
            except httpx.HTTPError:
                totals = {}
            if totals.get("teamtrack_bridge_subscribed") == 1:
                return
        time.sleep(0.2)
    raise AssertionError(f"{role} was not back and subscribed within {WAIT} s")


def test_a_paused_device_is_dropped_by_every_bridge_of_its_broker_also_after_a_restart(
    running: RunningCluster,
) -> None:
    """A device states `paused` (retained), then sends positions on the same connection. The
    broker hands each message to one of its two bridges: the one that did not get the pause
    must drop the positions too, and so must a bridge started after the pause."""
    worker = "w020"
    credential = running.credentials.device("alpha", worker)
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=credential.username,
                         protocol=mqtt.MQTTv5)
    device.username_pw_set(credential.username, credential.password)
    device.connect("127.0.0.1", running.broker_port(0), keepalive=30)
    device.loop_start()
    since_ms = int(time.time() * 1000)
    start_ms = since_ms + 12_000  # after every position of the tests before

    def send(stamps: list[int]) -> None:
        sent = [device.publish(position_topic("alpha", worker), position(ts, ts - start_ms),
                               qos=1) for ts in stamps]
        for info in sent:
            info.wait_for_publish(WAIT)
            assert info.is_published()

    status = status_topic("alpha", worker)
    try:
        device.publish(status, b"paused", qos=1, retain=True).wait_for_publish(WAIT)
        send([start_ms + seq for seq in range(40)])  # each to one of the two bridges
        # The manager sees the worker off duty (the pause itself was forwarded, once).
        snapshot = httpx.get(running.endpoints["dashboards"][0] + "/api/teams/alpha/positions",
                             headers={"Authorization": f"Bearer {running.token_of('alpha')}"},
                             timeout=WAIT).json()
        assert {w["worker"]: w["status"] for w in snapshot["workers"]}[worker] == "off_duty"
        processes = json.loads((running.state_dir / "processes.json").read_text())
        victim = int(processes["bridge-1-2"])
        os.kill(victim, signal.SIGKILL)
        subscribed_again(running, "bridge-1-2", victim)
        send([start_ms + seq for seq in range(40, 60)])  # and to the bridge started since
        device.publish(status, b"online", qos=1, retain=True).wait_for_publish(WAIT)
        send([start_ms + 60])  # resumed: this one is stored
    finally:
        device.disconnect()
        device.loop_stop()
    last = {(worker, start_ms + 60)}
    stored = Counter({key: count for key, count in wait_stored(running, since_ms, last).items()
                      if key[0] == worker and key[1] >= start_ms})
    assert set(stored) == last, sorted(stored)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_up_refuses_fewer_than_one_bridge_per_broker(value: str, tmp_path: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teamtrack.cli", "up", "--base-port", "0", "--no-simulate",
         "--state-dir", str(tmp_path), "--bridges-per-broker", value],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "--bridges-per-broker must be at least 1" in result.stderr


def test_the_port_plan_gives_every_bridge_a_port_of_its_own() -> None:
    plan = PortPlan.build(18830, brokers=2, dashboards=2, bridges_per_broker=3)
    assert plan.bridges() == [
        (0, 1, 19030), (0, 2, 19530), (0, 3, 19531), (1, 1, 19031), (1, 2, 19540), (1, 3, 19541),
    ]
    widest = PortPlan.build(18830, 10, 100, kafka_nodes=3,
                            bridges_per_broker=MAX_BRIDGES_PER_BROKER)
    ports = list(widest.all_ports())
    assert len(ports) == len(set(ports))
    assert len(widest.bridges()) == 10 * MAX_BRIDGES_PER_BROKER
    free = PortPlan.build(0, brokers=2, dashboards=1, bridges_per_broker=2)
    assert [(index, instance) for index, instance, _ in free.bridges()] == [
        (0, 1), (0, 2), (1, 1), (1, 2),
    ]


def test_a_fixed_base_port_caps_the_bridges_per_broker(tmp_path: Any) -> None:
    options = ClusterOptions(tmp_path, base_port=18830,
                             bridges_per_broker=MAX_BRIDGES_PER_BROKER + 1)
    with pytest.raises(ClusterError, match="at most 11 with a fixed --base-port"):
        LocalCluster(options).check_options()
