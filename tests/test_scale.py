"""`teamtrack scale` on a running `teamtrack up`, under a steady QoS 1 load.

Bridges 1 -> 3 -> 1 per broker, dashboards 2 -> 3 -> 2, brokers 2 -> 3 -> 2, each by the real
command while devices publish QoS 1 positions on every broker: every position a broker
acknowledged is stored once and seen once by a manager's viewer, including the positions the
removed broker had acknowledged; a viewer on the removed dashboard follows its close to another
instance and resumes there without a gap; `endpoints.json` and the process table are right after
each step, and nothing is left running after the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
import websockets
from paho.mqtt.enums import CallbackAPIVersion
from test_end_to_end import RunningCluster, cluster_running, stop_cluster

from teamtrack.contract import position_topic
from teamtrack.files import write_json_atomically

pytestmark = pytest.mark.faults

WAIT = 20.0
WORKERS = 16
INTERVAL_S = 0.15
STEP_LIMIT_S = 180
# The longest the simulated phones of team bravo report (they are stopped once checked).
SIMULATED_S = 120


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningCluster]:
    with cluster_running(tmp_path / "state", "--workers", str(WORKERS), "--no-tls") as cluster:
        yield cluster


def scale(running: RunningCluster, *args: str) -> dict[str, Any]:
    """`teamtrack scale` as an operator runs it; the endpoints it leaves."""
    completed = subprocess.run(
        [sys.executable, "-m", "teamtrack.cli", "scale", "--state-dir", str(running.state_dir),
         *args],
        capture_output=True, timeout=STEP_LIMIT_S, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    output = (completed.stdout + completed.stderr).decode()
    assert completed.returncode == 0, output
    assert "scaled:" in output, output
    endpoints: dict[str, Any] = json.loads((running.state_dir / "endpoints.json").read_text())
    # Prometheus' target file follows: every process with a /metrics, and the supervisor.
    targets = json.loads((running.state_dir / "prometheus" / "targets.json").read_text())
    assert {group["labels"]["role"] for group in targets} == {"supervisor"} | {
        role for role in endpoints["processes"] if not role.startswith(("broker-", "redis"))
    }
    return endpoints


def expected_roles(brokers: int, bridges: int, dashboards: int) -> set[str]:
    roles = {"redis", "ingest", "rules"}
    for index in range(1, brokers + 1):
        roles |= {f"broker-{index}", f"wsgate-{index}", f"bridge-{index}"}
        roles |= {f"bridge-{index}-{instance}" for instance in range(2, bridges + 1)}
    for index in range(1, dashboards + 1):
        roles |= {f"dashboard-{index}", f"gateway-{index}"}
    return roles


def check_listing(endpoints: dict[str, Any], brokers: int, bridges: int, dashboards: int) -> None:
    assert endpoints["scale"] == {
        "brokers": brokers, "bridges_per_broker": bridges, "dashboards": dashboards,
    }
    assert len(endpoints["brokers"]) == brokers
    assert len(endpoints["dashboards"]) == dashboards
    assert len(endpoints["bridge_metrics"]) == brokers * bridges
    processes = endpoints["processes"]
    assert set(processes) == expected_roles(brokers, bridges, dashboards)
    assert all(_alive(pid) for pid in processes.values()), processes
    for url in endpoints["dashboards"]:
        assert httpx.get(f"{url}/healthz", timeout=WAIT).status_code == 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Device:
    """A device publishing QoS 1 positions until stopped; `acked` holds the (worker, ts) the
    broker acknowledged (PUBACK), with the time each was sent."""

    def __init__(self, running: RunningCluster, worker: str, port: int) -> None:
        account = running.credentials.device("alpha", worker)
        self.worker = worker
        self.topic = position_topic("alpha", worker)
        self.sent: dict[int, tuple[int, float]] = {}  # mid -> (ts, sent at)
        self.acked: dict[int, float] = {}  # ts -> sent at
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=account.username, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(account.username, account.password)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self._lock = threading.Lock()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            ts, sent_at = self.sent.pop(mid, (None, 0.0))
            if ts is not None and not reason.is_failure:
                self.acked[ts] = sent_at

    def run(self, stop: threading.Event) -> None:
        ts = seq = 0
        while not stop.is_set():
            ts = max(ts + 1, int(time.time() * 1000))
            body = orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": ts, "seq": seq})
            with self._lock:
                info = self.client.publish(self.topic, body, qos=1)
                self.sent[info.mid] = (ts, time.time())
            seq += 1
            stop.wait(INTERVAL_S)
        deadline = time.monotonic() + 5
        while self.sent and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client.disconnect()
        self.client.loop_stop()


class Viewer:
    """A manager's WebSocket that, when its dashboard closes it, resumes on another listed
    dashboard with the cursor of the last frame it applied (what the page does)."""

    def __init__(self, running: RunningCluster, url: str) -> None:
        self.running = running
        self.url = url
        self.seen: Counter[tuple[str, int]] = Counter()
        self.frames: Counter[str] = Counter()
        self.closes: list[int | None] = []
        self.ready_at = 0.0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.running.token_of('alpha')}"}
        cursor: str | None = None
        while True:
            url = self.url.replace("http://", "ws://") + "/ws/teams/alpha"
            if cursor is not None:
                url += f"?after={cursor}"
            try:
                async with websockets.connect(
                    url, additional_headers=headers, open_timeout=WAIT
                ) as socket:
                    async for raw in socket:
                        frame = json.loads(raw)
                        self.frames[frame["type"]] += 1
                        cursor = frame.get("cursor", cursor)
                        if frame["type"] == "events":
                            self.seen.update(
                                (event["w"], event["p"]["ts"])
                                for event in frame["events"] if event["k"] == "p"
                            )
                        if not self.ready.is_set():
                            self.ready_at = time.time()
                            self.ready.set()
                self.closes.append(socket.close_code)
            except websockets.ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd is not None else None)
            except (OSError, websockets.WebSocketException):
                self.closes.append(None)
            self.url = self._another_dashboard()
            await asyncio.sleep(0.2)

    def _another_dashboard(self) -> str:
        listed = json.loads((self.running.state_dir / "endpoints.json").read_text())
        others = [url for url in listed["dashboards"] if url != self.url]
        return str(others[0] if others else self.url)


def wait_for_request(running: RunningCluster) -> None:
    """Until `teamtrack scale` has handed its request over."""
    deadline = time.monotonic() + WAIT
    while not (running.state_dir / "scale-request.json").exists():
        assert time.monotonic() < deadline, "teamtrack scale made no request"
        time.sleep(0.01)


def start_simulator(running: RunningCluster, brokers: list[str]) -> subprocess.Popen[bytes]:
    """`python -m devices` for team bravo's workers (their logins alone in a 0600 file), QoS 1,
    every broker given: each device's home is one of them, the others its failover."""
    credentials = running.credentials
    bravo = credentials.model_copy(update={
        "devices": tuple(d for d in credentials.devices if d.team == "bravo"),
    })
    path = running.state_dir / "bravo-devices.json"
    write_json_atomically(path, bravo.document())
    urls = [argument for url in brokers for argument in ("--broker-url", url)]
    return subprocess.Popen(
        [sys.executable, "-m", "devices", "--credentials", str(path), *urls,
         "--interval", "0.5", "--qos", "1", "--duration", str(SIMULATED_S), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def stored(
    running: RunningCluster, workers: list[str], team: str = "alpha", since_ms: int = 0
) -> Counter[tuple[str, int]]:
    headers = {"Authorization": f"Bearer {running.token_of(team)}"}
    found: Counter[tuple[str, int]] = Counter()
    for worker in workers:
        url = running.endpoints["dashboards"][0] + f"/api/teams/{team}/workers/{worker}/track"
        after = since_ms
        while True:
            response = httpx.get(url, params={"since": after, "limit": 1000}, headers=headers,
                                 timeout=WAIT)
            response.raise_for_status()
            points = response.json()["points"]
            found.update((worker, point["ts"]) for point in points)
            if len(points) < 1000:
                break
            after = points[-1]["ts"] + 1
    return found


async def test_scale_out_and_in_under_qos1_load_loses_and_repeats_nothing(
    running: RunningCluster,
) -> None:
    check_listing(running.endpoints, 2, 1, 2)
    workers = [f"w{number:03d}" for number in range(1, WORKERS + 1)]
    stop = threading.Event()
    devices: list[Device] = []
    threads: list[threading.Thread] = []

    def start_devices(names: list[str], port: int) -> list[Device]:
        started = [Device(running, name, port) for name in names]
        for device in started:
            thread = threading.Thread(target=device.run, args=(stop,), daemon=True)
            thread.start()
            threads.append(thread)
        devices.extend(started)
        return started

    steady = Viewer(running, running.endpoints["dashboards"][0])
    steady_task = asyncio.create_task(steady.run())
    await asyncio.wait_for(steady.ready.wait(), WAIT)
    start_devices(workers[:8], running.broker_port(0))
    start_devices(workers[8:12], running.broker_port(1))
    await asyncio.sleep(2)
    pids_seen: set[int] = set()
    try:
        endpoints = await asyncio.to_thread(scale, running, "--bridges-per-broker", "3")
        check_listing(endpoints, 2, 3, 2)
        pids_seen |= set(endpoints["processes"].values())
        endpoints = await asyncio.to_thread(scale, running, "--dashboards", "3")
        check_listing(endpoints, 2, 3, 3)
        moving = Viewer(running, endpoints["dashboards"][2])
        moving_task = asyncio.create_task(moving.run())
        await asyncio.wait_for(moving.ready.wait(), WAIT)
        endpoints = await asyncio.to_thread(scale, running, "--brokers", "3")
        check_listing(endpoints, 3, 3, 3)
        pids_seen |= set(endpoints["processes"].values())
        broker_3 = int(endpoints["brokers"][2]["mqtt"].rsplit(":", 1)[1])
        on_broker_3 = start_devices(workers[12:], broker_3)
        # Team bravo's phones, simulated, know every broker; a third of them live on broker 3.
        simulator = start_simulator(running, [b["mqtt"] for b in endpoints["brokers"]])
        await asyncio.sleep(3)
        # Broker 3's bridges stall for a second, then crash as it is taken away: the positions
        # it acknowledged to devices meanwhile wait in their sessions, and no bridge comes back
        # to that broker for them.
        crashing = [pid for role, pid in endpoints["processes"].items()
                    if role.startswith("bridge-3")]
        for pid in crashing:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(1)
        scaling_in = asyncio.create_task(asyncio.to_thread(scale, running, "--brokers", "2"))
        await asyncio.to_thread(wait_for_request, running)
        for pid in crashing:
            os.kill(pid, signal.SIGKILL)
        endpoints = await scaling_in
        removed_at_ms = int(time.time() * 1000)
        check_listing(endpoints, 2, 3, 3)
        assert all(device.acked for device in on_broker_3)
        endpoints = await asyncio.to_thread(scale, running, "--dashboards", "2")
        check_listing(endpoints, 2, 3, 2)
        endpoints = await asyncio.to_thread(scale, running, "--bridges-per-broker", "1")
        check_listing(endpoints, 2, 1, 2)
        pids_seen |= set(endpoints["processes"].values())
        await asyncio.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 10)
    # Every phone of broker 3 moved to a broker that stayed, and each phone kept reporting.
    reporting: set[str] = set()
    deadline = time.monotonic() + WAIT
    while reporting != set(workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        after = await asyncio.to_thread(stored, running, workers, "bravo", removed_at_ms + 1000)
        reporting = {worker for worker, _ in after}
    simulator.send_signal(signal.SIGTERM)
    output, _ = await asyncio.to_thread(simulator.communicate, timeout=30)
    summary = output.decode()
    assert reporting == set(workers), summary
    failovers = re.search(r"\((\d+) failovers\)", summary)
    assert simulator.returncode == 0 and failovers and int(failovers.group(1)) >= 1, summary
    acked = {(device.worker, ts): sent_at for device in devices
             for ts, sent_at in device.acked.items()}
    assert len(acked) > 1000

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not set(acked) <= set(steady.seen):
        await asyncio.sleep(0.3)
    for task in (steady_task, moving_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    history = await asyncio.to_thread(stored, running, workers)
    assert set(acked) - set(history) == set()
    assert set(acked) - set(steady.seen) == set()
    assert max(steady.seen.values()) == 1
    assert steady.frames["gap"] == 0 and steady.closes == []
    # The viewer of dashboard-3 was closed with 1012 (service restart), resumed elsewhere and
    # saw every position sent from its first frame on.
    assert moving.closes[:1] == [1012], moving.closes
    assert moving.frames["resume"] >= 1 and moving.frames["gap"] == 0, moving.frames
    after_ready = {key for key, sent_at in acked.items() if sent_at > moving.ready_at + 0.5}
    assert after_ready and after_ready - set(moving.seen) == set()

    code, output = stop_cluster(running.process)
    assert code == 0, output
    pids_seen |= set(json.loads((running.state_dir / "processes.json").read_text()).values())
    assert not [pid for pid in pids_seen if _alive(pid)]
