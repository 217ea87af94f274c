"""The whole product as a user starts it: `teamtrack up`, then devices, managers and observers.

One `teamtrack up --no-simulate` per module (real brokers, Redis, bridges and dashboards as child
processes); the test plays the devices, a manager on the *other* dashboard instance and
`mosquitto_sub` on the *other* broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from mqtt_tools import MosquittoSub, publish_lines

from teamtrack.contract import position_topic
from teamtrack.metrics import scrape_totals
from teamtrack.provision import Credentials, load_credentials

START_TIMEOUT = 60.0
WAIT = 10.0


@dataclass
class RunningCluster:
    process: subprocess.Popen[bytes]
    state_dir: Path
    endpoints: dict[str, Any]
    credentials: Credentials

    def broker_port(self, index: int) -> int:
        return int(self.endpoints["brokers"][index]["mqtt"].rsplit(":", 1)[1])

    def dashboard_ws(self, index: int, team: str) -> str:
        return self.endpoints["dashboards"][index].replace("http://", "ws://") + f"/ws/teams/{team}"

    def token_of(self, team: str) -> str:
        return self.credentials.managers_of(team)[0].token


def start_cluster(state_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teamtrack.cli",
            "up",
            "--base-port",
            "0",
            "--teams",
            "2",
            "--workers",
            "3",
            "--state-dir",
            str(state_dir),
            "--no-status",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )


def wait_until_up(process: subprocess.Popen[bytes], state_dir: Path) -> dict[str, Any]:
    endpoints_file = state_dir / "endpoints.json"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"teamtrack up exited with {process.returncode}:\n{output}")
        if endpoints_file.exists():
            return dict(json.loads(endpoints_file.read_text()))
        time.sleep(0.1)
    raise AssertionError("teamtrack up did not write endpoints.json in time")


def stop_cluster(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return process.returncode, output.decode()


@contextlib.contextmanager
def cluster_running(state_dir: Path, *extra: str) -> Iterator[RunningCluster]:
    """`teamtrack up --no-simulate` (and `extra`) in `state_dir`, until the block ends."""
    process = start_cluster(state_dir, "--no-simulate", *extra)
    try:
        endpoints = wait_until_up(process, state_dir)
        yield RunningCluster(
            process, state_dir, endpoints, load_credentials(state_dir / "credentials.json")
        )
    finally:
        if process.poll() is None:
            stop_cluster(process)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    with cluster_running(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def payload(seq: int) -> bytes:
    return orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": int(time.time() * 1000), "seq": seq})


async def read_positions(
    socket: websockets.ClientConnection, worker: str, count: int
) -> tuple[dict[str, Any], list[int]]:
    """The snapshot frame, then seqs of `worker`'s positions until `count` or a quiet second."""
    snapshot = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
    assert snapshot["type"] == "snapshot"
    seqs: list[int] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        quiet = 1.0 if len(seqs) >= count else deadline - time.monotonic()
        try:
            frame = json.loads(await asyncio.wait_for(socket.recv(), quiet))
        except TimeoutError:
            break
        if frame["type"] == "events":
            seqs += [e["p"]["seq"] for e in frame["events"] if e["w"] == worker and e["k"] == "p"]
    return snapshot, seqs


async def assert_delivered_across_instances_once_in_order(
    running: RunningCluster, count: int
) -> None:
    """A worker publishes on broker 1; the manager on dashboard 2 and an observer on broker 2
    each get every position once, in order."""
    observer = running.credentials.observer
    assert observer is not None
    watcher = await MosquittoSub.start(
        running.broker_port(1), observer.username, observer.password, "teams/alpha/#"
    )
    headers = {"Authorization": f"Bearer {running.token_of('alpha')}"}
    async with websockets.connect(
        running.dashboard_ws(1, "alpha"), additional_headers=headers, open_timeout=WAIT
    ) as socket:
        reading = asyncio.create_task(read_positions(socket, "w001", count))
        await asyncio.sleep(0.3)
        device = running.credentials.device("alpha", "w001")
        result = await publish_lines(
            running.broker_port(0),
            device.username,
            device.password,
            position_topic("alpha", "w001"),
            [payload(seq) for seq in range(count)],
        )
        assert result.returncode == 0, result.stderr
        _, seqs = await reading
    await watcher.wait_for(count)
    await asyncio.sleep(0.5)  # a duplicate or a mirror loop would show up now
    watcher.stop()
    assert seqs == list(range(count))  # on dashboard 2, in order, exactly once
    observed = [
        orjson.loads(body)["seq"]
        for topic, body in watcher.messages
        if topic == position_topic("alpha", "w001")
    ]
    assert observed == list(range(count))  # mirrored into broker 2, exactly once


async def test_worker_on_one_broker_reaches_manager_and_observer_on_the_others(
    running: RunningCluster,
) -> None:
    await assert_delivered_across_instances_once_in_order(running, 20)


async def test_managers_see_only_their_own_team(running: RunningCluster) -> None:
    bravo_headers = {"Authorization": f"Bearer {running.token_of('bravo')}"}
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(
            running.dashboard_ws(0, "alpha"),
            additional_headers=bravo_headers,
            open_timeout=WAIT,
        ):
            pass
    assert refused.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus) as anonymous:
        async with websockets.connect(running.dashboard_ws(0, "alpha"), open_timeout=WAIT):
            pass
    assert anonymous.value.response.status_code == 401

    async with websockets.connect(
        running.dashboard_ws(0, "bravo"), additional_headers=bravo_headers, open_timeout=WAIT
    ) as bravo_socket:
        reading = asyncio.create_task(read_positions(bravo_socket, "w002", 1))
        await asyncio.sleep(0.3)
        alpha = running.credentials.device("alpha", "w002")
        await publish_lines(
            running.broker_port(0),
            alpha.username,
            alpha.password,
            position_topic("alpha", "w002"),
            [payload(0)],
        )
        bravo = running.credentials.device("bravo", "w002")
        await publish_lines(
            running.broker_port(1),
            bravo.username,
            bravo.password,
            position_topic("bravo", "w002"),
            [payload(5)],
        )
        snapshot, seqs = await reading
    assert seqs == [5]  # bravo's own worker, and nothing of alpha's
    assert all(worker["worker"] != "alpha" for worker in snapshot["workers"])


def test_a_manager_over_mqtt_websockets_reads_their_team_on_another_broker(
    running: RunningCluster,
) -> None:
    """`brokers[i].ws` of endpoints.json is a gateway (`python -m wsgate`) in front of broker
    i: a manager there gets a position a worker sent to the other broker, and is refused
    another team's topics by the broker's ACL."""
    import queue

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    url = running.endpoints["brokers"][1]["ws"]
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    manager_login = running.credentials.managers_of("alpha")[0]
    manager = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5,
                          transport="websockets")
    manager.username_pw_set(manager_login.username, manager_login.mqtt_password)
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    granted: queue.Queue[list[int]] = queue.Queue()
    manager.on_message = lambda _c, _u, message: received.put((message.topic, message.payload))
    manager.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.put([c.value for c in codes])
    manager.connect(host, int(port), keepalive=30)
    manager.loop_start()
    try:
        manager.subscribe([("teams/alpha/#", 1), ("teams/bravo/#", 1)])
        assert granted.get(timeout=WAIT) == [1, 0x87]
        device = running.credentials.device("alpha", "w003")
        body = payload(7)
        result = asyncio.run(publish_lines(
            running.broker_port(0), device.username, device.password,
            position_topic("alpha", "w003"), [body],
        ))
        assert result.returncode == 0, result.stderr
        # A reader that turns up is first sent the positions of the last seconds the on-demand
        # mirror held (bridge/service.py: "may get some of what was sent before" it subscribed):
        # an earlier test's may come first.
        wanted = (position_topic("alpha", "w003"), body)
        deadline = time.monotonic() + WAIT
        seen = []
        while wanted not in seen and time.monotonic() < deadline:
            try:
                seen.append(received.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                break
        assert wanted in seen, seen
        assert all(topic.startswith("teams/alpha/") for topic, _ in seen), seen
    finally:
        manager.disconnect()
        manager.loop_stop()


def test_every_service_settles_its_heap_after_start_up(running: RunningCluster) -> None:
    """What a service holds after start-up is frozen out of the cyclic collector's full
    collections (teamtrack.runtime.settle_heap), and `/metrics` shows it with the process's
    own figures."""
    pages = [*running.endpoints["bridge_metrics"], *running.endpoints["wsgate_metrics"],
             *running.endpoints["gateway_metrics"],
             *(f"{url}/metrics" for url in running.endpoints["dashboards"])]
    for page in pages:
        totals = scrape_totals(page, timeout=WAIT)
        assert totals.get("python_gc_frozen_objects", 0) > 10_000, page
        assert totals.get("process_resident_memory_bytes", 0) > 0, page
        assert "python_gc_collections_total" in totals, page


def test_up_starts_simulated_teams_and_stops_without_orphans(tmp_path: Path) -> None:
    tiles = "http://127.0.0.1:9/tiles/{z}/{x}/{y}.png"  # a self-hosted tile server's template
    process = start_cluster(tmp_path, "--interval", "0.2", "--dashboards", "1",
                            "--tile-url", tiles, "--tile-attribution", "Tiles of the LAN")
    try:
        endpoints = wait_until_up(process, tmp_path)
        credentials = load_credentials(tmp_path / "credentials.json")
        token = credentials.managers_of("alpha")[0].token
        # --tile-url reaches the dashboards: the page's settings and its image policy.
        config = httpx.get(endpoints["dashboards"][0] + "/api/config", timeout=WAIT,
                           headers={"Authorization": f"Bearer {token}"}).json()
        assert (config["tile_url"], config["tile_attribution"]) == (tiles, "Tiles of the LAN")
        policy = httpx.get(endpoints["dashboards"][0] + "/login", timeout=WAIT).headers[
            "content-security-policy"]
        assert "img-src 'self' data: http://127.0.0.1:9;" in policy, policy
        url = endpoints["dashboards"][0] + "/api/teams/alpha/positions"
        workers: list[Any] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and len(workers) < 3:
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                import urllib.request

                request = urllib.request.Request(  # noqa: S310 (loopback URL)
                    url, headers={"Authorization": f"Bearer {token}"}
                )
                with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                    workers = json.loads(response.read())["workers"]
        assert {worker["worker"] for worker in workers} == {"w001", "w002", "w003"}
        # The dashboards read the history the cluster's ingest writes.
        history: list[Any] = []
        while time.monotonic() < deadline + WAIT and not history:
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                request = urllib.request.Request(  # noqa: S310 (loopback URL)
                    endpoints["dashboards"][0] + "/api/teams/alpha/history",
                    headers={"Authorization": f"Bearer {token}"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                    history = json.loads(response.read())["positions"]
        assert {position["worker"] for position in history} <= {"w001", "w002", "w003"}
        assert history, "no position of alpha in the history API of the cluster's dashboard"
        pids = json.loads((tmp_path / "processes.json").read_text())
        assert set(pids) >= {
            "broker-1",
            "broker-2",
            "bridge-1",
            "bridge-2",
            "wsgate-1",
            "wsgate-2",
            "dashboard-1",
            "simulator",
            "redis",
        }
    finally:
        code, output = stop_cluster(process)
    assert code == 0, output
    assert "all cleanly" in output, output
    for role, pid in pids.items():
        assert not _alive(pid), f"{role} (pid {pid}) survived teamtrack up"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; only its parent's wait() is missing.
    with contextlib.suppress(FileNotFoundError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    return False
