"""Devices that fail over: the simulator's workers move to another broker when theirs goes away,
keep what was not acknowledged and send it again there, and reach the survivors spread out.

Real Mosquitto brokers on loopback, killed with SIGKILL for good; a small MQTT 5 server of the
test's own plays a broker that is being removed (it tells its devices to go elsewhere, which
Mosquitto 2.0 cannot do); and a whole cluster (bridges, Redis, the SQL history) for the promise
that matters: every position a device had acknowledged ends up stored.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import signal
import sqlite3
import struct
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.failover import (
    SERVER_SHUTTING_DOWN,
    USE_ANOTHER_SERVER,
    BrokerFailover,
    Disconnect,
    broker_order,
    parse_disconnect,
)
from devices.identities import load_device_identities
from devices.simulator import SimulationConfig, SimulationSummary, run_simulation
from teamtrack.contract import decode_position, parse_topic
from teamtrack.history import HISTORY_FILE_NAME
from teamtrack.local.cluster import ClusterOptions, LocalCluster
from teamtrack.local.servers import LOOPBACK, ManagedProcess, free_port, start_mosquitto
from teamtrack.mqtt import BrokerAddress

WATCHER = ("watcher", "watcher-secret")
SUBACK_TIMEOUT_S = 5.0
# How long the devices of a dead broker may take to be connected to another one. They take
# about a second (two jittered waits of at most 0.2 and 0.4 s here, plus the attempts); the
# rest is room for a loaded machine.
FAILOVER_BOUND_S = 10.0


# --- the rules, without a network -------------------------------------------------------------


def test_devices_of_one_broker_spread_over_the_others() -> None:
    orders = [broker_order(device, 3) for device in range(300)]
    assert orders[:4] == [(0, 1, 2), (1, 0, 2), (2, 0, 1), (0, 2, 1)]
    for dead in range(3):
        # Where the devices of the dead broker go first: half to each survivor.
        seconds = Counter(order[1] for order in orders if order[0] == dead)
        assert sorted(seconds.values()) == [50, 50]
    assert broker_order(5, 1) == (0,)


def _failover(*ports: int, seed: float = 1.0) -> BrokerFailover:
    brokers = tuple(BrokerAddress(LOOPBACK, port) for port in ports)
    return BrokerFailover(brokers, initial=0.5, maximum=30.0, uniform=lambda a, b: b * seed)


def test_a_dropped_connection_tries_home_once_then_moves_on_with_backoff() -> None:
    failover = _failover(1, 2, 3)
    failover.connected(100.0)
    # The upper bounds of the jitter (the test's uniform returns them).
    assert failover.after_loss(None, 200.0) == 0.5
    assert failover.broker.port == 1
    assert failover.after_failure() == 1.0
    assert failover.broker.port == 2
    delays = [failover.after_failure() for _ in range(8)]
    assert [b.port for b in (failover.broker,)] == [1]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    # A connection that held starts the backoff again; one dropped at once does not.
    failover.connected(300.0)
    assert failover.after_loss(None, 300.5) == 30.0
    failover.connected(400.0)
    assert failover.after_loss(None, 400.0 + 60) == 0.5


def test_told_to_move_the_device_goes_where_it_is_sent_or_to_the_next() -> None:
    failover = _failover(1, 2, 3)
    failover.connected(0.0)
    failover.after_loss(Disconnect(USE_ANOTHER_SERVER, f"{LOOPBACK}:3"), 1.0)
    assert failover.broker.port == 3
    failover.connected(2.0)
    # Not one of its brokers: the next of its list.
    failover.after_loss(Disconnect(USE_ANOTHER_SERVER, "elsewhere.example:1883"), 3.0)
    assert failover.broker.port == 1
    failover.connected(4.0)
    failover.after_loss(Disconnect(SERVER_SHUTTING_DOWN), 5.0)
    assert failover.broker.port == 2
    # Any other reason code: a dropped connection (home once more).
    failover.connected(6.0)
    failover.after_loss(Disconnect(0x8E), 7.0)
    assert failover.broker.port == 2


def test_disconnect_packets_are_read() -> None:
    reference = f"mqtt://{LOOPBACK}:1884".encode()
    reason_string = b"maintenance"
    properties = (
        b"\x1f" + struct.pack("!H", len(reason_string)) + reason_string
        + b"\x1c" + struct.pack("!H", len(reference)) + reference
    )
    body = bytes([USE_ANOTHER_SERVER, len(properties)]) + properties
    assert parse_disconnect(body) == Disconnect(USE_ANOTHER_SERVER, reference.decode())
    assert parse_disconnect(bytes([SERVER_SHUTTING_DOWN])) == Disconnect(SERVER_SHUTTING_DOWN)
    assert parse_disconnect(b"") is None
    assert parse_disconnect(bytes([0x9D, 5, 0x1C, 0, 9])) == Disconnect(0x9D, "")


# --- real brokers --------------------------------------------------------------------------


@dataclass
class Broker:
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def kill(self) -> None:
        """SIGKILL, for good: nothing restarts it."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.process.wait(5)


def _write_credentials(path: Path, teams: int, workers: int) -> None:
    devices = [
        {"team": f"t{team}", "worker": f"w{worker:03d}", "username": f"t{team}-w{worker:03d}",
         "password": f"pw-{team}-{worker}"}
        for team in range(teams)
        for worker in range(workers)
    ]
    path.write_text(json.dumps({"devices": devices, "managers": []}))


def _start_brokers(tmp_path: Path, credentials: Path, count: int) -> list[Broker]:
    passwords = tmp_path / "passwords"
    lines = [f"{d.username}:{d.password}" for d in load_device_identities(credentials)]
    passwords.write_text("\n".join([*lines, ":".join(WATCHER)]) + "\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
    brokers = []
    for index in range(count):
        port = free_port()
        config = tmp_path / f"mosquitto-{index}.conf"
        config.write_text(
            f"listener {port} {LOOPBACK}\nallow_anonymous false\npassword_file {passwords}\n"
            f"persistence false\nuser {getpass.getuser()}\n"
        )
        brokers.append(Broker(port, start_mosquitto(config, port)))
    return brokers


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, list[Broker]]]:
    """credentials.json for `teams` x `workers` devices and `brokers` Mosquitto brokers."""
    teams, workers, count = getattr(request, "param", (3, 4, 2))
    credentials = tmp_path / "credentials.json"
    _write_credentials(credentials, teams, workers)
    brokers = _start_brokers(tmp_path, credentials, count)
    try:
        yield credentials, brokers
    finally:
        for broker in brokers:
            broker.process.stop()


@dataclass
class Watcher:
    """A paho subscriber on one broker: (arrival time, topic, payload) of what it receives."""

    port: int
    topic_filter: str = "teams/#"
    messages: list[tuple[float, str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watcher-{self.port}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self._client.username_pw_set(*WATCHER)
        self._client.on_connect = lambda client, *_: client.subscribe(self.topic_filter, qos=1)
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = lambda _client, _data, message: self.messages.append(
            (time.monotonic(), message.topic, bytes(message.payload))
        )
        self._client.connect(LOOPBACK, self.port)
        self._client.loop_start()
        if not subscribed.wait(SUBACK_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"no SUBACK from the broker on port {self.port}")

    def online(self) -> set[str]:
        """Workers (`team/worker`) that said `online` here."""
        return {
            f"{address.team}/{address.worker}"
            for _, topic, payload in list(self.messages)
            if topic.endswith("/status") and payload == b"online"
            for address in (parse_topic(topic),)
        }

    def seqs(self) -> dict[str, list[int]]:
        """Position seqs per worker, in arrival order."""
        seqs: dict[str, list[int]] = defaultdict(list)
        for _, topic, payload in list(self.messages):
            if topic.endswith("/position"):
                address = parse_topic(topic)
                seqs[f"{address.team}/{address.worker}"].append(
                    decode_position(address.team, address.worker, payload).seq
                )
        return seqs

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _config(brokers: list[str], **overrides: object) -> SimulationConfig:
    settings: dict[str, object] = {
        "broker_urls": tuple(brokers), "interval": 0.1, "qos": 1, "seed": 7,
        "show_progress": False, "refresh_interval": 0.1,
        "reconnect_initial_delay": 0.2, "reconnect_max_delay": 2.0, **overrides,
    }
    return SimulationConfig(**settings)  # type: ignore[arg-type]


def _homed_on(credentials: Path, index: int, brokers: int) -> set[str]:
    """The workers whose home is broker `index`: round-robin in the file's order."""
    identities = load_device_identities(credentials)
    return {
        f"{identity.team}/{identity.worker}"
        for position, identity in enumerate(identities)
        if position % brokers == index
    }


def assert_contiguous_after(seqs: list[int], start: int) -> None:
    """From its first message on, a stream that resends goes on in order: each seq is at most
    one above the highest before it (a resend repeats, nothing is skipped)."""
    highest = start - 1
    for seq in seqs:
        assert seq <= highest + 1, (seqs, start)
        highest = max(highest, seq)


async def test_devices_of_a_killed_broker_move_to_the_other_and_resend_in_order(
    fleet: tuple[Path, list[Broker]],
) -> None:
    credentials, brokers = fleet
    survivor, victim = brokers
    moved = _homed_on(credentials, 1, 2)
    watchers = [Watcher(survivor.port), Watcher(victim.port)]
    stop = asyncio.Event()
    run = asyncio.create_task(run_simulation(
        _config([b.url for b in brokers]), load_device_identities(credentials), stop=stop
    ))
    try:
        assert await wait_until(lambda: len(watchers[1].online()) == len(moved), 10.0)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(victim.kill)
        killed_at = time.monotonic()
        arrived = await wait_until(lambda: watchers[0].online() >= moved, FAILOVER_BOUND_S)
        await asyncio.sleep(1.0)  # positions on the new broker
    finally:
        stop.set()
        summary = await run
        for watcher in watchers:
            watcher.stop()

    assert arrived, f"not moved within {FAILOVER_BOUND_S} s: {moved - watchers[0].online()}"
    before, after = watchers[1].seqs(), watchers[0].seqs()
    for worker in moved:
        # What the dead broker had not acknowledged is sent again on the survivor, in order:
        # nothing between what reached the first broker and what reaches the second is lost.
        delivered_before = max(before.get(worker, [-1]))
        assert after[worker], worker
        assert after[worker][0] <= delivered_before + 1, (worker, before[worker], after[worker])
        assert_contiguous_after(after[worker], after[worker][0])
    assert summary.failovers == len(moved)
    assert summary.unacknowledged == 0 and summary.outbox_dropped == 0
    assert {sample.worker for sample in summary.reconnect_log if sample.failover} == moved
    assert all(
        sample.broker == survivor.url and sample.outage_s < FAILOVER_BOUND_S
        for sample in summary.reconnect_log
    ), summary.reconnect_log
    assert time.monotonic() - killed_at < FAILOVER_BOUND_S + 5


# --- a broker that tells its devices to move -----------------------------------------------------


class RemovedBroker:
    """A minimal MQTT 5 server playing a broker being removed from the cluster: it accepts
    every CONNECT, acknowledges statuses but no position, and after `hold_s` sends each client
    DISCONNECT 0x9C (Use another server) with a Server Reference, then closes the connection."""

    def __init__(self, reference: str, hold_s: float) -> None:
        self.reference = reference
        self.hold_s = hold_s
        self.connects = 0
        self.published: dict[str, list[int]] = defaultdict(list)
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _packet(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        header = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return header, await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header, _ = await self._packet(reader)
            assert header >> 4 == 1  # CONNECT
            self.connects += 1
            writer.write(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: no session, success, no props
            deadline = asyncio.get_running_loop().time() + self.hold_s
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    header, body = await asyncio.wait_for(self._packet(reader), left)
                except TimeoutError:
                    break
                if header >> 4 == 3:  # PUBLISH: statuses acknowledged, positions not
                    (topic_length,) = struct.unpack_from("!H", body)
                    topic = body[2 : 2 + topic_length].decode()
                    packet_id = body[2 + topic_length : 4 + topic_length]
                    if topic.endswith("/status"):
                        writer.write(b"\x40\x02" + packet_id)
                    else:
                        address = parse_topic(topic)
                        # packet id, then properties (length 0 from gmqtt), then the payload
                        payload = body[2 + topic_length + 2 + 1 :]
                        seq = decode_position(address.team, address.worker, payload).seq
                        self.published[f"{address.team}/{address.worker}"].append(seq)
            reference = self.reference.encode()
            properties = b"\x1c" + struct.pack("!H", len(reference)) + reference
            writer.write(bytes([0xE0, 2 + len(properties), USE_ANOTHER_SERVER, len(properties)])
                         + properties)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("fleet", [(2, 3, 2)], indirect=True)
async def test_a_device_told_to_use_another_server_goes_there_with_what_was_not_acknowledged(
    fleet: tuple[Path, list[Broker]],
) -> None:
    credentials, brokers = fleet
    removed = RemovedBroker(reference=f"{LOOPBACK}:{brokers[1].port}", hold_s=1.0)
    await removed.start()
    watchers = [Watcher(broker.port) for broker in brokers]
    # The removed broker first: the devices homed there list brokers[0] or brokers[1] next
    # (rotated); its Server Reference sends all of them to brokers[1].
    config = _config([f"mqtt://{LOOPBACK}:{removed.port}", *(b.url for b in brokers)])
    stop = asyncio.Event()
    run = asyncio.create_task(run_simulation(config, load_device_identities(credentials),
                                             stop=stop))
    moved = _homed_on(credentials, 0, 3)
    try:
        arrived = await wait_until(lambda: watchers[1].online() >= moved, FAILOVER_BOUND_S)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        summary = await run
        for watcher in watchers:
            watcher.stop()
        await removed.stop()

    assert arrived, moved - watchers[1].online()
    assert removed.connects == len(moved)  # none came back
    assert set(removed.published) == moved
    assert not moved & watchers[0].online()
    received = watchers[1].seqs()
    for worker in moved:
        # Nothing was acknowledged by the removed broker: all of it, from seq 0, in order.
        assert received[worker][: len(removed.published[worker])] == removed.published[worker]
        assert_contiguous_after(received[worker], 0)
    assert summary.errors.get("told_to_move") == len(moved)
    assert summary.resent >= sum(len(seqs) for seqs in removed.published.values())
    assert summary.unacknowledged == 0


# --- the connect rate the survivor sees --------------------------------------------------------


def peak_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    peak, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        peak = max(peak, last - first + 1)
    return peak


@pytest.mark.parametrize("fleet", [(4, 100, 2)], indirect=True)
async def test_the_devices_of_a_dead_broker_reach_the_survivor_spread_out(
    fleet: tuple[Path, list[Broker]],
) -> None:
    """200 devices lose their broker at once. Without jitter they reached the survivor in one
    burst (docs/devices.md has the figures); here they must arrive spread out: never more than
    half of them within 100 ms (a bound with room for a loaded machine, not a benchmark)."""
    credentials, brokers = fleet
    survivor, victim = brokers
    moved = _homed_on(credentials, 1, 2)
    assert len(moved) == 200
    watcher = Watcher(survivor.port, "teams/+/workers/+/status")
    # The defaults of the simulator's backoff (0.5 s initial), QoS 0, a fix every 2 s.
    config = _config([b.url for b in brokers], qos=0, interval=2.0,
                     reconnect_initial_delay=0.5, reconnect_max_delay=30.0)
    stop = asyncio.Event()
    run = asyncio.create_task(run_simulation(config, load_device_identities(credentials),
                                             stop=stop))
    try:
        await asyncio.sleep(3.0)
        await asyncio.to_thread(victim.kill)
        arrived = await wait_until(lambda: watcher.online() >= moved, 20.0)
    finally:
        stop.set()
        summary = await run
        watcher.stop()

    assert arrived, len(moved - watcher.online())
    connects = [s.elapsed_s for s in summary.reconnect_log if s.broker == survivor.url]
    assert len(connects) == len(moved)
    peak = peak_in_window(connects, 0.1)
    print(f"reconnects on the survivor: {len(connects)} over "
          f"{max(connects) - min(connects):.2f} s, peak {peak} in 100 ms, "
          f"{peak_in_window(connects, 1.0)} in 1 s")
    assert peak <= len(moved) // 2


# --- the whole path: nothing acknowledged is lost -----------------------------------------


def _stored(database: Path) -> Counter[tuple[str, str, int]]:
    if not database.exists():
        return Counter()
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    try:
        rows = connection.execute("SELECT team, worker, seq FROM positions").fetchall()
    except sqlite3.OperationalError:
        return Counter()  # not migrated yet
    finally:
        connection.close()
    return Counter((team, worker, seq) for team, worker, seq in rows)


@pytest.mark.faults
async def test_a_broker_killed_for_good_loses_no_acknowledged_position(tmp_path: Path) -> None:
    """Two brokers with their bridges, Redis and the ingest (no supervisor runs: a killed
    broker stays dead). QoS 1 devices; broker-1 is SIGKILLed under load. Its devices move to
    broker-2 within the bound, and every position the simulator sent is stored: the ones
    broker-1 had acknowledged went through its bridge, the others were sent again."""
    cluster = LocalCluster(ClusterOptions(
        state_dir=tmp_path, brokers=2, dashboards=1, teams=2, workers=10, base_port=0,
        simulate=False, device_rate_per_s=0.0, tls=False,
    ))
    try:
        cluster.start()
        assert cluster.provisioned is not None
        urls = [f"mqtt://{LOOPBACK}:{port}" for port in cluster.ports.broker_mqtt]
        credentials = cluster.provisioned.credentials_path
        moved = _homed_on(credentials, 0, 2)
        config = _config(urls, duration=9.0)
        run = asyncio.create_task(run_simulation(config, load_device_identities(credentials)))
        await asyncio.sleep(3.0)
        broker = next(child for child in cluster.children if child.role == "broker-1")
        os.kill(broker.process.pid, signal.SIGKILL)
        summary: SimulationSummary = await run
        assert not broker.process.running()

        failed_over = {s.worker: s for s in summary.reconnect_log if s.failover}
        assert set(failed_over) == moved
        assert all(s.outage_s < FAILOVER_BOUND_S for s in failed_over.values()), failed_over
        assert summary.unacknowledged == 0 and summary.outbox_dropped == 0
        database = tmp_path / HISTORY_FILE_NAME
        stored = _stored(database)
        deadline = time.monotonic() + 30
        while len(stored) < summary.messages_sent and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            stored = _stored(database)
    finally:
        cluster.stop()

    print(f"sent {summary.messages_sent}, resent {summary.resent}, stored {len(stored)}, "
          f"failovers {summary.failovers}, longest outage "
          f"{max(s.outage_s for s in summary.reconnect_log):.2f} s")
    by_worker: dict[str, set[int]] = defaultdict(set)
    for team, worker, seq in stored:
        by_worker[f"{team}/{worker}"].add(seq)
    # Every seq of every worker, from 0 to its last, once: nothing acknowledged is missing.
    assert len(stored) == summary.messages_sent
    assert all(seqs == set(range(len(seqs))) for seqs in by_worker.values()), by_worker
    assert max(stored.values()) == 1
