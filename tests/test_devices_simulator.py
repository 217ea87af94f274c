"""The device simulator against real Mosquitto brokers with password authentication."""

from __future__ import annotations

import asyncio
import getpass
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from devices.identities import DeviceIdentity, load_device_identities, select_identities
from devices.movement import CENTRAL_BERLIN
from devices.simulator import (
    BrokerAddress,
    SimulationConfig,
    SimulationSummary,
    parse_schedule,
    run_simulation,
)
from teamtrack.contract import decode_position, parse_topic
from teamtrack.local.servers import LOOPBACK, ManagedProcess, free_port, start_mosquitto

TEAMS = ("alpha", "bravo")
WORKERS = ("w1", "w2", "w3")
WATCHER = ("watcher", "watcher-secret")
SUBACK_TIMEOUT_S = 5.0


@dataclass
class Broker:
    port: int
    config_path: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def restart(self) -> None:
        self.process = start_mosquitto(self.config_path, self.port)


@pytest.fixture
def credentials_path(tmp_path: Path) -> Path:
    devices = [
        {
            "team": team,
            "worker": worker,
            "username": f"{team}-{worker}",
            "password": f"pw-{team}-{worker}",
        }
        for team in TEAMS
        for worker in WORKERS
    ]
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"devices": devices, "managers": []}))
    return path


@pytest.fixture
def password_file(tmp_path: Path, credentials_path: Path) -> Path:
    path = tmp_path / "passwords"
    lines = [f"{d.username}:{d.password}" for d in load_device_identities(credentials_path)]
    path.write_text("\n".join([*lines, ":".join(WATCHER)]) + "\n")
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True)
    return path


@pytest.fixture
def brokers(tmp_path: Path, password_file: Path) -> Iterator[list[Broker]]:
    """Two fresh brokers, no anonymous access, no ACL (every user may read and write teams/#)."""
    started: list[Broker] = []
    try:
        for index in (1, 2):
            port = free_port()
            config_path = tmp_path / f"mosquitto-{index}.conf"
            config_path.write_text(
                f"listener {port} {LOOPBACK}\n"
                "allow_anonymous false\n"
                f"password_file {password_file}\n"
                "persistence false\n"
                # Started as root, Mosquitto would switch to a user that cannot read tmp_path.
                f"user {getpass.getuser()}\n"
            )
            started.append(Broker(port, config_path, start_mosquitto(config_path, port)))
        yield started
    finally:
        for broker in started:
            broker.process.stop()


@dataclass(frozen=True)
class Received:
    at: float
    topic: str
    payload: bytes
    retain: bool


class Watcher:
    """A paho MQTT 5 subscriber to `teams/#` on one broker, collecting in its network thread."""

    def __init__(self, port: int, topic_filter: str = "teams/#") -> None:
        self.messages: list[Received] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"watcher-{port}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self._client.username_pw_set(*WATCHER)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._topic_filter = topic_filter
        self._client.connect(LOOPBACK, port)
        self._client.loop_start()
        if not self._subscribed.wait(SUBACK_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"no SUBACK from the broker on port {port}")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        client.subscribe(self._topic_filter, qos=1)

    def _on_subscribe(self, client: mqtt.Client, *args: object) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.append(
            Received(time.monotonic(), message.topic, bytes(message.payload), bool(message.retain))
        )

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def read_retained_statuses(port: int) -> dict[tuple[str, str], str]:
    """The retained presence of every worker on one broker, as a fresh subscriber sees it."""
    watcher = Watcher(port, "teams/+/workers/+/status")
    time.sleep(0.3)  # retained messages follow the SUBACK immediately; this is plenty on loopback
    watcher.stop()
    statuses = {}
    for message in watcher.messages:
        if message.retain:
            address = parse_topic(message.topic)
            statuses[(address.team, address.worker)] = message.payload.decode()
    return statuses


async def read_retained_everywhere(brokers: list[Broker]) -> list[dict[tuple[str, str], str]]:
    return list(
        await asyncio.gather(
            *(asyncio.to_thread(read_retained_statuses, broker.port) for broker in brokers)
        )
    )


def positions_by_worker(watcher: Watcher) -> dict[tuple[str, str], list[bytes]]:
    positions: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for message in watcher.messages:
        if message.topic.endswith("/position"):
            address = parse_topic(message.topic)
            positions[(address.team, address.worker)].append(message.payload)
    return positions


def count_positions(watchers: list[Watcher]) -> int:
    return sum(
        len(payloads) for watcher in watchers for payloads in positions_by_worker(watcher).values()
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def config_for(brokers: list[Broker], **overrides: object) -> SimulationConfig:
    settings: dict[str, object] = {
        "broker_urls": tuple(broker.url for broker in brokers),
        "interval": 0.2,
        "seed": 42,
        "show_progress": False,
        "refresh_interval": 0.1,
        "reconnect_initial_delay": 0.2,
        "reconnect_max_delay": 0.5,
        **overrides,
    }
    return SimulationConfig(**settings)  # type: ignore[arg-type]


async def test_every_worker_reports_in_order_spread_over_both_brokers(
    brokers: list[Broker], credentials_path: Path
) -> None:
    watchers = [Watcher(broker.port) for broker in brokers]
    config = config_for(brokers, teams=2, workers_per_team=3, duration=3.0, qos=1)
    started_ms = time.time() * 1000
    run = asyncio.create_task(run_simulation(config, load_device_identities(credentials_path)))
    await asyncio.sleep(1.5)
    retained_while_running = await read_retained_everywhere(brokers)
    summary = await run
    ended_ms = time.time() * 1000
    # The last messages were acknowledged to the devices, maybe not yet delivered to us.
    await wait_until(lambda: count_positions(watchers) >= summary.messages_sent)
    retained_after = await read_retained_everywhere(brokers)
    for watcher in watchers:
        watcher.stop()

    assert summary.errors == {}
    assert summary.reconnects == 0
    assert summary.workers_peak == 6
    assert summary.workers_by_broker == {brokers[0].url: 3, brokers[1].url: 3}

    per_broker = [positions_by_worker(watcher) for watcher in watchers]
    all_workers = {(team, worker) for team in TEAMS for worker in WORKERS}
    assert set(per_broker[0]) | set(per_broker[1]) == all_workers
    assert not set(per_broker[0]) & set(per_broker[1])
    for workers in per_broker:
        assert len(workers) == 3
        # Each team is spread over both brokers: the case the bridges exist for.
        assert {team for team, _ in workers} == set(TEAMS)

    received = 0
    for workers in per_broker:
        for (team, worker), payloads in workers.items():
            positions = [decode_position(team, worker, payload) for payload in payloads]
            assert [position.seq for position in positions] == list(range(len(positions)))
            assert len(positions) >= 10  # ~15 fixes in 3 s at 0.2 s
            for position in positions:
                assert CENTRAL_BERLIN.contains(position.lat, position.lon)
                assert started_ms - 1 <= position.ts <= ended_ms + 1
                assert position.speed is not None and position.heading is not None
                assert position.acc is not None and 3 <= position.acc <= 15
                assert position.battery is not None and 0 <= position.battery <= 100
            received += len(positions)
    assert received == summary.messages_sent

    for index, workers in enumerate(per_broker):
        assert retained_while_running[index] == dict.fromkeys(workers, "online")
        assert retained_after[index] == dict.fromkeys(workers, "offline")


async def test_online_count_follows_the_schedule_up_and_down(
    brokers: list[Broker], credentials_path: Path
) -> None:
    schedule = parse_schedule("2@0,6@1.5,6@2,3@2.5")
    watchers = [Watcher(broker.port) for broker in brokers]
    config = config_for(brokers, schedule=schedule, duration=3.2)
    summary = await run_simulation(config, load_device_identities(credentials_path))
    ended = time.monotonic()
    for watcher in watchers:
        watcher.stop()

    assert summary.errors == {}
    assert summary.workers_peak == 6
    assert 3.1 <= summary.duration_s <= 3.5
    for sample in summary.timeline[3:]:
        # Connecting takes a control tick or two, so allow the target of up to 0.3 s earlier.
        lags = (0.0, 0.1, 0.2, 0.3)
        recent_targets = [schedule.target_at(sample.elapsed_s - lag) for lag in lags]
        assert min(recent_targets) <= sample.connected <= max(recent_targets), sample
    at_the_peak = [s.connected for s in summary.timeline if 1.8 <= s.elapsed_s <= 2.1]
    assert len(at_the_peak) >= 2 and set(at_the_peak) == {6}
    assert summary.timeline[-1].connected == 3

    # Taken offline by the schedule, well before the end of the run.
    offline_early = {
        message.topic
        for watcher in watchers
        for message in watcher.messages
        if message.topic.endswith("/status")
        and message.payload == b"offline"
        and message.at < ended - 0.5
    }
    assert len(offline_early) == 3


async def test_failed_devices_are_counted_and_move_to_a_broker_that_answers(
    brokers: list[Broker], credentials_path: Path, tmp_path: Path
) -> None:
    identities = load_device_identities(credentials_path)
    wrong_password = DeviceIdentity("alpha", "w1", "alpha-w1", "not-the-password")
    closed_port = free_port()
    config = config_for(
        [brokers[0]],
        broker_urls=(brokers[0].url, f"mqtt://{LOOPBACK}:{closed_port}"),
        duration=1.5,
    )
    watcher = Watcher(brokers[0].port)
    summary = await run_simulation(config, [wrong_password, *identities[1:]])
    watcher.stop()

    # alpha/w1 is refused everywhere; alpha/w2, bravo/w1 and bravo/w3, whose home broker does
    # not answer, fail over to the first broker, next in their lists.
    assert summary.errors["connect_refused"] >= 1
    assert summary.errors["connect_failed"] >= 3
    assert summary.workers_peak == 5
    assert set(positions_by_worker(watcher)) == {
        (team, worker) for team in TEAMS for worker in WORKERS
    } - {("alpha", "w1")}


async def test_workers_reconnect_after_a_broker_restart(
    brokers: list[Broker], credentials_path: Path
) -> None:
    config = config_for(brokers, duration=2.8)
    run = asyncio.create_task(run_simulation(config, load_device_identities(credentials_path)))
    await asyncio.sleep(0.8)
    await asyncio.to_thread(brokers[1].process.stop)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(brokers[1].restart)
    await asyncio.sleep(0.9)
    # Each worker of the restarted broker tried it once more, then moved on to the other one
    # if it was still down: wherever it is, it published `online` again (the restarted
    # broker lost its retained messages).
    first, second = await read_retained_everywhere(brokers)
    summary = await run

    moved = {("alpha", "w2"), ("bravo", "w1"), ("bravo", "w3")}
    assert summary.errors["connection_lost"] == 3
    assert set(summary.errors) <= {"connection_lost", "connect_failed"}
    assert summary.reconnects == 3
    assert {sample.worker for sample in summary.reconnect_log} == {
        f"{team}/{worker}" for team, worker in moved
    }
    assert {worker: second.get(worker, first.get(worker)) for worker in moved} == dict.fromkeys(
        moved, "online"
    )
    # Each was without a broker for a while (the fixes due meanwhile are skipped, as counted in
    # `fixes_skipped`: none when the failover is quicker than a worker's interval).
    assert all(sample.outage_s > 0 for sample in summary.reconnect_log)


@pytest.mark.parametrize("ending", ["stop event", "cancelled"])
async def test_an_endless_run_ends_with_every_worker_offline(
    brokers: list[Broker], credentials_path: Path, ending: str
) -> None:
    config = config_for(brokers, teams=1, workers_per_team=2)
    assert config.run_seconds == float("inf")
    stop = asyncio.Event()
    identities = load_device_identities(credentials_path)
    run = asyncio.create_task(run_simulation(config, identities, stop=stop))
    await asyncio.sleep(0.6)
    if ending == "stop event":
        stop.set()
        summary = await run
        assert summary.workers_peak == 2
        assert summary.messages_sent > 0
    else:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    first, second = await read_retained_everywhere(brokers)
    assert first | second == {("alpha", "w1"): "offline", ("alpha", "w2"): "offline"}


def test_schedule_interpolates_holds_and_steps() -> None:
    schedule = parse_schedule("100@0, 1000@60, 1000@120, 500@150")
    assert schedule.end_seconds == 150
    assert schedule.peak == 1000
    times = (-1, 0, 30, 60, 90, 135, 150, 1e9)
    expected = (100, 100, 550, 1000, 1000, 750, 500, 500)
    assert tuple(schedule.target_at(t) for t in times) == expected
    step = parse_schedule("10@5,50@5")
    assert [step.target_at(t) for t in (0, 4.9, 5, 6)] == [10, 10, 50, 50]
    assert str(parse_schedule("2@0,6@1.5")) == "2@0,6@1.5"


@pytest.mark.parametrize("text", ["", "10", "10@x", "x@1", "-1@0", "5@-1", "5@10,6@2", "5@inf"])
def test_bad_schedules_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_schedule(text)


def test_run_length_comes_from_duration_then_schedule() -> None:
    schedule = parse_schedule("1@0,4@20")
    assert SimulationConfig().run_seconds == float("inf")
    assert SimulationConfig(schedule=schedule).run_seconds == 20
    assert SimulationConfig(schedule=schedule, duration=5).run_seconds == 5
    with pytest.raises(ValueError, match="needs a duration"):
        SimulationConfig(schedule=parse_schedule("5@0"))
    for bad in ({"qos": 2}, {"interval": 0}, {"jitter": 1.0}, {"broker_urls": ("tcp://x:1",)}):
        with pytest.raises(ValueError):
            SimulationConfig(**bad)


def test_broker_urls() -> None:
    assert BrokerAddress.parse("mqtt://127.0.0.1:1884") == BrokerAddress("127.0.0.1", 1884)
    assert BrokerAddress.parse("mqtt://broker") == BrokerAddress("broker", 1883)
    assert str(BrokerAddress.parse("mqtt://[::1]:1883")) == "mqtt://[::1]:1883"
    for bad in ("http://x:1", "mqtt://x:99999", "mqtt://", "mqtt://x:1/path", "mqtt://u@x"):
        with pytest.raises(ValueError):
            BrokerAddress.parse(bad)
    # MQTT over TLS, for clients that verify the broker's certificate (the simulator).
    assert BrokerAddress.parse("mqtts://broker", allow_tls=True) == BrokerAddress(
        "broker", 8883, tls=True
    )
    assert str(BrokerAddress.parse("mqtts://[::1]:8884", allow_tls=True)) == "mqtts://[::1]:8884"
    with pytest.raises(ValueError, match="speaks no TLS"):
        BrokerAddress.parse("mqtts://broker")
    assert SimulationConfig(broker_urls=("mqtts://b:8883",), ca_file="ca.crt").ca_file == "ca.crt"
    with pytest.raises(ValueError, match="only used with mqtts"):
        SimulationConfig(broker_urls=("mqtt://b:1883",), ca_file="ca.crt")


def test_identities_are_selected_by_team_then_worker_in_file_order(tmp_path: Path) -> None:
    devices = [
        {"team": team, "worker": f"w{n}", "username": f"{team}{n}", "password": "p"}
        for team in ("t1", "t2", "t3")
        for n in range(4)
    ]
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"devices": devices, "services": {}}))
    identities = load_device_identities(path)
    chosen = select_identities(identities, teams=2, workers_per_team=2)
    assert [f"{i.team}/{i.worker}" for i in chosen] == ["t1/w0", "t1/w1", "t2/w0", "t2/w1"]
    assert select_identities(identities) == identities
    assert "password" not in repr(identities[0]) and "'p'" not in repr(identities[0])


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "[]",
        '{"managers": []}',
        '{"devices": [{"team": "Bad Team", "worker": "w", "username": "u", "password": "p"}]}',
        '{"devices": [{"team": "t", "worker": "w", "username": "u"}]}',
        '{"devices": [{"team": "t", "worker": "w", "username": "u", "password": "p"},'
        ' {"team": "t", "worker": "w", "username": "v", "password": "q"}]}',
    ],
)
def test_malformed_credentials_are_rejected(tmp_path: Path, document: str) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(document)
    with pytest.raises(ValueError):
        load_device_identities(path)


def _python_m_devices(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devices", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "arguments",
    [
        ("--credentials", "c.json", "--no-such-flag"),
        ("--credentials", "c.json", "--broker-url", "http://127.0.0.1:1883"),
        ("--credentials", "c.json", "--schedule", "10@x"),
        ("--credentials", "c.json", "--bbox", "1,2,3"),
        ("--broker-url", "mqtt://127.0.0.1:1883"),
    ],
)
def test_command_line_errors_take_one_line(arguments: tuple[str, ...]) -> None:
    result = _python_m_devices(*arguments)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("python -m devices: error:")


def test_command_line_run(brokers: list[Broker], credentials_path: Path) -> None:
    result = _python_m_devices(
        "--credentials",
        str(credentials_path),
        "--broker-url",
        brokers[0].url,
        "--broker-url",
        brokers[1].url,
        "--teams",
        "1",
        "--workers",
        "2",
        "--interval",
        "0.2",
        "--duration",
        "1",
        "--seed",
        "7",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "peak 2 workers, 0 errors, 0 reconnects" in result.stdout
    missing = _python_m_devices("--credentials", str(credentials_path.with_name("none.json")))
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1, missing.stderr


def test_summary_numbers_add_up() -> None:
    summary = SimulationSummary(
        duration_s=2.0,
        seed=1,
        workers_selected=2,
        workers_peak=2,
        messages_sent=10,
        mean_rate=5.0,
        errors={"connect_failed": 2, "publish": 1},
        reconnects=0,
        fixes_skipped=0,
        workers_by_broker={},
        timeline=(),
    )
    assert summary.error_count == 3
