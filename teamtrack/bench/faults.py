"""One process of a running cluster killed (or stalled) under load, and the count of what it cost.

The load is what a field team produces: QoS 1 workers, each a real MQTT 5 client (paho-mqtt,
independent of the services' gmqtt) with a persistent session, spread over the brokers. A
manager's viewer watches the team over WebSocket and, when its connection drops, resumes on
another dashboard instance with the cursor of its last frame. At `Fault.at_s` one child of the
cluster is sent SIGKILL (the cluster's supervisor, run here, restarts it) or SIGSTOP for
`Fault.stall_s` seconds. Afterwards every position a device was told was delivered (a PUBACK
with a success code) is looked up in the history database and in what the viewer was shown:

    missing       acknowledged, never stored
    stored_twice  stored more than once
    not_shown     acknowledged, never shown to the viewer (announced: a gap or sync frame came)
    shown_twice   shown more than once (in `events` or `sync` frames)

Used by `tests/faults/` (each scenario asserts zero of all four) and by `teamtrack bench
--scenarios faults`, which reports the same counts and the recovery time of each fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import paho.mqtt.client as mqtt
import websockets
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from teamtrack.contract import position_topic
from teamtrack.history import HISTORY_FILE_NAME
from teamtrack.local.cluster import Child, LocalCluster
from teamtrack.local.servers import LOOPBACK, port_is_open

# PUBACK reason code "No matching subscribers": a success code, yet nobody got the message.
NO_MATCHING_SUBSCRIBERS = 0x10
# A position that reaches the viewer later than this after it was published counts as delayed
# by the fault (recovery time).
DELAYED_S = 1.0
QUIET_S = 2.0
DEVICE_SESSION_EXPIRY_S = 600
SUPERVISE_EVERY_S = 0.1

Key = tuple[str, int, int]
"""A position's identity: (worker, ts, seq)."""


class FaultError(RuntimeError):
    """The run could not be made (a role the cluster does not have, a cluster that is down)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """What happens to which child of the cluster, when."""

    role: str
    # kill: SIGKILL (restarted by the supervisor); down: SIGKILL and restarted only after
    # `stall_s`; stall: SIGSTOP, then SIGCONT after `stall_s`; none: the control run.
    action: str = "kill"
    at_s: float = 5.0
    stall_s: float = 10.0

    def __post_init__(self) -> None:
        if self.action not in ("kill", "stall", "down", "none"):
            raise ValueError("a fault's action is kill, stall, down or none")

    @property
    def name(self) -> str:
        if self.action == "none":
            return "no fault"
        if self.action in ("stall", "down"):
            return f"{self.action} {self.role} {self.stall_s:g}s"
        return f"kill {self.role}"


@dataclass(frozen=True, slots=True)
class FaultLoad:
    team: str = "alpha"
    workers: int = 10
    rate: float = 200.0
    duration_s: float = 15.0
    # The dashboard (index) the viewer starts on; it moves to the next one when dropped.
    viewer_dashboard: int = 1
    # After the load: how long to wait at most for acknowledgements, the history, the viewer.
    settle_s: float = 30.0


@dataclass
class FaultOutcome:
    fault: str
    published: int = 0
    acknowledged: int = 0
    unrouted: int = 0
    unacknowledged: int = 0
    stored: int = 0
    missing: int = 0
    stored_twice: int = 0
    shown: int = 0
    shown_twice: int = 0
    not_shown: int = 0
    gaps: int = 0
    syncs: int = 0
    viewer_reconnects: int = 0
    recovery_s: float | None = None
    max_latency_s: float = 0.0
    examples: dict[str, list[Key]] = field(default_factory=dict)

    @property
    def announced(self) -> bool:
        """Whether the viewer was told it missed something (a gap or a sync frame)."""
        return self.gaps + self.syncs > 0

    @property
    def clean(self) -> bool:
        """Nothing acknowledged lost or doubled anywhere, and nothing missed unannounced."""
        return (
            self.missing == 0 and self.stored_twice == 0 and self.shown_twice == 0
            and (self.not_shown == 0 or self.announced)
        )

    def summary(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return (
            f"{self.fault}: published {self.published}, acknowledged {self.acknowledged} "
            f"(0x10: {self.unrouted}), stored {self.stored}, missing {self.missing}, "
            f"stored twice {self.stored_twice}, shown {self.shown}, not shown {self.not_shown}, "
            f"shown twice {self.shown_twice}, gaps {self.gaps}, syncs {self.syncs}, "
            f"viewer reconnects {self.viewer_reconnects}, recovery {recovery}, "
            f"max latency {self.max_latency_s:.2f}s"
        )


class _Devices:
    """The team's workers: paho clients with persistent sessions, one network thread each."""

    def __init__(self, cluster: LocalCluster, load: FaultLoad) -> None:
        assert cluster.provisioned is not None
        credentials = cluster.provisioned.credentials
        team_devices = [device for device in credentials.devices if device.team == load.team]
        devices = team_devices[: load.workers]
        if len(devices) < load.workers:
            raise FaultError(f"team {load.team!r} has {len(team_devices)} workers, not "
                             f"{load.workers}")
        self.team = load.team
        self._lock = threading.Lock()
        # Per client: mid -> key (set after publish returns) and mid -> reason code (PUBACK).
        self.sent: dict[str, dict[int, Key]] = {}
        self.acks: dict[str, dict[int, int]] = {}
        self.sent_at: dict[Key, float] = {}
        self.clients: list[tuple[str, mqtt.Client]] = []
        ports = cluster.ports.broker_mqtt
        for index, device in enumerate(devices):
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"dev-{device.team}-{device.worker}",
                protocol=mqtt.MQTTv5,
            )
            client.username_pw_set(device.username, device.password)
            client.max_inflight_messages_set(100)
            client.max_queued_messages_set(0)
            client.reconnect_delay_set(1, 2)
            client.on_publish = self._on_publish
            client.user_data_set(device.worker)
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = DEVICE_SESSION_EXPIRY_S
            client.connect_async(
                LOOPBACK, ports[index % len(ports)], clean_start=False, properties=properties
            )
            client.loop_start()
            self.sent[device.worker] = {}
            self.acks[device.worker] = {}
            self.clients.append((device.worker, client))

    def _on_publish(
        self, client: mqtt.Client, worker: str, mid: int, reason: Any, properties: Any
    ) -> None:
        value = int(getattr(reason, "value", reason))
        with self._lock:
            self.acks[worker][mid] = value

    def wait_connected(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(client.is_connected() for _, client in self.clients):
            if time.monotonic() > deadline:
                raise FaultError("the workers did not all connect")
            time.sleep(0.05)

    def publish_for(self, duration_s: float, rate: float, stop: threading.Event) -> None:
        """Every worker in turn, `rate` positions a second in all, for `duration_s`."""
        self.publish_shaped(duration_s, lambda _elapsed: rate, stop)

    def publish_shaped(
        self, duration_s: float, rate_at: Callable[[float], float], stop: threading.Event
    ) -> None:
        """Every worker in turn, `rate_at(seconds since the start)` positions a second in all
        (at least one a second), for `duration_s`."""
        seqs = dict.fromkeys(self.sent, 0)
        started = time.monotonic()
        due = started
        count = 0
        while not stop.is_set():
            now = time.monotonic()
            if now - started >= duration_s:
                return
            if due > now:
                time.sleep(due - now)
            due += 1.0 / max(rate_at(due - started), 1.0)
            worker, client = self.clients[count % len(self.clients)]
            seq = seqs[worker]
            seqs[worker] = seq + 1
            ts = int(time.time() * 1000)
            key = (worker, ts, seq)
            payload = b'{"lat":52.52,"lon":13.405,"ts":%d,"seq":%d}' % (ts, seq)
            info = client.publish(position_topic(self.team, worker), payload, qos=1)
            with self._lock:
                if info.mid in self.sent[worker]:
                    raise FaultError("more publishes than MQTT packet ids in one run")
                self.sent[worker][info.mid] = key
                self.sent_at[key] = time.time()
            count += 1

    def outcome(self) -> tuple[set[Key], set[Key], set[Key]]:
        """(acknowledged, acknowledged with 0x10, never acknowledged)."""
        acknowledged: set[Key] = set()
        unrouted: set[Key] = set()
        pending: set[Key] = set()
        with self._lock:
            for worker, sent in self.sent.items():
                acks = self.acks[worker]
                for mid, key in sent.items():
                    code = acks.get(mid)
                    if code is None or code >= 0x80:
                        pending.add(key)
                    else:
                        acknowledged.add(key)
                        if code == NO_MATCHING_SUBSCRIBERS:
                            unrouted.add(key)
        return acknowledged, unrouted, pending

    def all_answered(self) -> bool:
        with self._lock:
            return all(
                mid in self.acks[worker] for worker, sent in self.sent.items() for mid in sent
            )

    def close(self) -> None:
        for _, client in self.clients:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()


class _Viewer:
    """A manager's WebSocket that resumes on the next dashboard whenever it is dropped."""

    def __init__(self, dashboards: list[str], team: str, token: str, start: int) -> None:
        self._urls = [url.replace("http://", "ws://", 1) for url in dashboards]
        self._team = team
        self._token = token
        self._index = start % len(self._urls)
        self.cursor: str | None = None
        self.shown: Counter[Key] = Counter()
        self.first_shown_at: dict[Key, float] = {}
        self.snapshot_keys: set[Key] = set()
        self.gaps = 0
        self.syncs = 0
        self.reconnects = 0
        self.connected = asyncio.Event()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            url = f"{self._urls[self._index]}/ws/teams/{self._team}"
            if self.cursor is not None:
                url += f"?after={quote(self.cursor)}"
            try:
                async with websockets.connect(
                    url, additional_headers={"Authorization": f"Bearer {self._token}"},
                    max_size=None, open_timeout=5,
                ) as socket:
                    self.connected.set()
                    reading = asyncio.ensure_future(self._read(socket))
                    stopping = asyncio.ensure_future(self._stop.wait())
                    await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    stopping.cancel()
                    if not reading.done():
                        reading.cancel()
                        return
            except (OSError, websockets.WebSocketException, TimeoutError):
                pass
            if self._stop.is_set():
                return
            self.reconnects += 1
            self._index = (self._index + 1) % len(self._urls)
            await asyncio.sleep(0.2)

    async def _read(self, socket: Any) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in socket:
                self._apply(orjson.loads(message))

    def _apply(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "gap":
            self.gaps += 1
        elif kind == "snapshot":
            for worker in frame["workers"]:
                position = worker.get("position")
                if position:
                    self.snapshot_keys.add((worker["worker"], position["ts"], position["seq"]))
        elif kind in ("events", "sync"):
            if kind == "sync":
                self.syncs += 1
            now = time.time()
            for event in frame["events"]:
                if event["k"] == "p":
                    key = (event["w"], event["p"]["ts"], event["p"]["seq"])
                    self.shown[key] += 1
                    self.first_shown_at.setdefault(key, now)
        if "cursor" in frame:
            self.cursor = frame["cursor"]

    def stop(self) -> None:
        self._stop.set()


def _child(cluster: LocalCluster, role: str) -> Child:
    for child in cluster.children:
        if child.role == role:
            return child
    roles = ", ".join(child.role for child in cluster.children)
    raise FaultError(f"the cluster has no process {role!r} (it has: {roles})")


def _stored(database: Path, team: str, since_ms: int) -> Counter[Key]:
    """Rows per (worker, ts, seq) of the team's history since `since_ms`."""
    if not database.exists():
        return Counter()
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    try:
        rows = connection.execute(
            "SELECT worker, ts, seq, COUNT(*) FROM positions WHERE team = ? AND ts >= ? "
            "GROUP BY worker, ts, seq",
            (team, since_ms),
        ).fetchall()
    except sqlite3.OperationalError:
        return Counter()  # not migrated yet
    finally:
        connection.close()
    return Counter({(worker, ts, seq): count for worker, ts, seq, count in rows})


async def _supervise(cluster: LocalCluster) -> None:
    """The cluster's supervisor, as `teamtrack up` runs it, for as long as the run lasts.

    In the event loop's thread, which lives as long as the run: a child's parent-death signal
    (`teamtrack.local.servers`) follows the thread that started it, so a restart made from a
    short-lived worker thread would be stopped again when that thread ends.
    """
    while True:
        cluster.supervise_once()
        await asyncio.sleep(SUPERVISE_EVERY_S)


async def wait_recovered(cluster: LocalCluster, limit_s: float = 60.0) -> None:
    """Every child running again and listening where it should."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        cluster.supervise_once()
        if all(
            child.process.running()
            and (child.ready_port is None or port_is_open(LOOPBACK, child.ready_port))
            for child in cluster.children
            if child.role != "simulator"
        ):
            return
        await asyncio.sleep(0.1)
    raise FaultError("the cluster did not recover")


async def _inject(cluster: LocalCluster, fault: Fault) -> None:
    if fault.action == "none":
        return
    child = _child(cluster, fault.role)
    process = child.process
    if fault.action in ("kill", "down"):
        os.kill(process.pid, signal.SIGKILL)
        if fault.action == "down":
            # Killed, and kept down for `stall_s` before the supervisor may restart it.
            child.next_restart_at = time.monotonic() + fault.stall_s
        return
    os.kill(process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(fault.stall_s)
    finally:
        os.kill(process.pid, signal.SIGCONT)


async def _until(condition: Callable[[], bool], limit_s: float) -> None:
    """Poll `condition` (state of other threads and of the database: nothing to await) until it
    holds or `limit_s` has passed."""
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def _inject_all(cluster: LocalCluster, faults: Sequence[Fault], started: float) -> None:
    """Each fault at its time from `started` (loop time); stalls overlap what follows them."""
    loop = asyncio.get_running_loop()
    injecting = []
    for fault in sorted(faults, key=lambda fault: fault.at_s):
        await asyncio.sleep(max(0.0, started + fault.at_s - loop.time()))
        injecting.append(asyncio.create_task(_inject(cluster, fault)))
    await asyncio.gather(*injecting)


async def run_fault(
    cluster: LocalCluster,
    fault: Fault | Sequence[Fault],
    load: FaultLoad | None = None,
    *,
    on_progress: Callable[[str], None] | None = None,
) -> FaultOutcome:
    """Drive `load` against the running `cluster`, inject `fault` (or several, each at its
    time: a double fault), and count (see the module)."""
    load = load or FaultLoad()
    progress = on_progress or (lambda _text: None)
    assert cluster.provisioned is not None
    faults = [fault] if isinstance(fault, Fault) else list(fault)
    if not faults:
        raise FaultError("no fault to inject (Fault(role, 'none') is the control run)")
    for each in faults:
        if each.action != "none":
            _child(cluster, each.role)
    name = " + ".join(each.name for each in faults)
    await wait_recovered(cluster)
    token = cluster.provisioned.credentials.managers_of(load.team)[0].token
    dashboards = [f"http://{LOOPBACK}:{port}" for port in cluster.ports.dashboards]
    database = Path(urlsplit(cluster.database_url).path.lstrip("/"))
    if not database.is_absolute() or database.name != HISTORY_FILE_NAME:
        database = cluster.state_dir / HISTORY_FILE_NAME
    since_ms = int(time.time() * 1000)
    viewer = _Viewer(dashboards, load.team, token, load.viewer_dashboard)
    viewing = asyncio.create_task(viewer.run())
    devices = await asyncio.to_thread(_Devices, cluster, load)
    outcome = FaultOutcome(name)
    stop = threading.Event()
    fault_at = 0.0
    supervising: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(viewer.connected.wait(), 15)
        await asyncio.to_thread(devices.wait_connected)
        supervising = asyncio.create_task(_supervise(cluster))
        progress(f"{name}: {load.rate:g} positions/s for {load.duration_s:g}s")
        publishing = asyncio.create_task(
            asyncio.to_thread(devices.publish_for, load.duration_s, load.rate, stop)
        )
        started = asyncio.get_running_loop().time()
        fault_at = time.time() + min(each.at_s for each in faults)
        await _inject_all(cluster, faults, started)
        await publishing
        progress(f"{name}: settling")
        await _until(devices.all_answered, load.settle_s)
        await wait_recovered(cluster)
        acknowledged, _, _ = devices.outcome()
        await _until(
            lambda: acknowledged <= set(_stored(database, load.team, since_ms)), load.settle_s
        )
        await _until(
            lambda: acknowledged <= set(viewer.shown) | viewer.snapshot_keys
            or viewer.gaps + viewer.syncs > 0,
            load.settle_s,
        )
        await asyncio.sleep(QUIET_S)  # anything doubled late still arrives
    finally:
        stop.set()
        if supervising is not None:
            supervising.cancel()
        viewer.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(viewing, 10)
        await asyncio.to_thread(devices.close)
    return _account(outcome, devices, viewer, _stored(database, load.team, since_ms), fault_at)


def _account(
    outcome: FaultOutcome,
    devices: _Devices,
    viewer: _Viewer,
    stored: Counter[Key],
    fault_at: float,
) -> FaultOutcome:
    acknowledged, unrouted, pending = devices.outcome()
    published = acknowledged | pending
    outcome.published = len(published)
    outcome.acknowledged = len(acknowledged)
    outcome.unrouted = len(unrouted)
    outcome.unacknowledged = len(pending)
    ours = {key: count for key, count in stored.items() if key in published}
    outcome.stored = len(ours)
    missing = sorted(acknowledged - set(ours))
    outcome.missing = len(missing)
    outcome.stored_twice = sum(1 for count in ours.values() if count > 1)
    shown = {key: count for key, count in viewer.shown.items() if key in published}
    outcome.shown = len(shown)
    doubled = sorted(key for key, count in shown.items() if count > 1)
    outcome.shown_twice = len(doubled)
    not_shown = sorted(acknowledged - set(shown) - viewer.snapshot_keys)
    outcome.not_shown = len(not_shown)
    outcome.gaps, outcome.syncs = viewer.gaps, viewer.syncs
    outcome.viewer_reconnects = viewer.reconnects
    outcome.examples = {
        "missing": missing[:5], "shown_twice": doubled[:5], "not_shown": not_shown[:5]
    }
    latencies = [
        (viewer.first_shown_at[key] - devices.sent_at[key], key)
        for key in shown
        if key in devices.sent_at
    ]
    outcome.max_latency_s = max((latency for latency, _ in latencies), default=0.0)
    if not not_shown:
        delayed = [viewer.first_shown_at[key] for latency, key in latencies if latency > DELAYED_S]
        outcome.recovery_s = max(0.0, max(delayed) - fault_at) if delayed and fault_at else 0.0
    return outcome
