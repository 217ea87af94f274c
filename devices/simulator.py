"""The device simulator: many workers, each a real MQTT 5 client, reporting positions.

All clients share one asyncio event loop and one scheduler loop: a heap of (next fix due, worker)
is drained every few milliseconds, so a thousand workers cost a thousand heap operations a
second instead of a thousand sleeping tasks. Connects and clean disconnects are short-lived
tasks, bounded in number, and so are reconnects: a worker whose connection ends gets a task
that waits a jittered delay and connects again, on the broker its failover rules pick
(`devices.failover`), with a fresh gmqtt client each time. QoS 1 positions stay in the worker's
outbox until their PUBACK and are sent again, in order, on the next connection.

A run is: build the workers (profile, start point, broker) from the seed; every control tick
compare the online count with the schedule's target and bring workers online or offline;
publish each online worker's fixes when due; at the end take every worker offline cleanly
(a retained `offline` status, then DISCONNECT) and return a `SimulationSummary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import random
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Final

from gmqtt import Message
from gmqtt.mqtt.handler import MQTTConnectError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from devices.connection import AckedStorage, DeviceClient, Phase, RateMeter, Worker
from devices.failover import BrokerFailover, broker_order, parse_disconnect
from devices.identities import DeviceIdentity, load_device_identities, select_identities
from devices.movement import (
    CENTRAL_BERLIN,
    BoundingBox,
    Mover,
    ProfileMix,
    start_near,
    team_base,
)
from devices.report import (
    ReconnectSample,
    SimulationSummary,
    TimelineSample,
    clock,
    summary_table,
)
from devices.schedule import LoadSchedule, SchedulePoint, parse_schedule
from teamtrack.contract import Position, Presence, encode_position
from teamtrack.logs import RateLimitedLog, RateLimitFilter
from teamtrack.mqtt import BrokerAddress
from teamtrack.tls import client_ssl_context

__all__ = [
    "BoundingBox",
    "BrokerAddress",
    "DeviceIdentity",
    "LoadSchedule",
    "ProfileMix",
    "ReconnectSample",
    "SchedulePoint",
    "SimulationConfig",
    "SimulationSummary",
    "TimelineSample",
    "load_device_identities",
    "parse_schedule",
    "run_simulation",
    "select_identities",
    "summary_table",
]

log = logging.getLogger(__name__)
# gmqtt logs every failed reconnect of every client; this logger is handed to our clients so
# that those lines are rate-limited without touching the application's logging setup.
_gmqtt_log = logging.getLogger("devices.gmqtt")
_gmqtt_log.addFilter(RateLimitFilter(period=5.0))

DEFAULT_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
# How often the online count is compared with the schedule.
CONTROL_INTERVAL_S: Final = 0.1
# The scheduler never sleeps less than this, so fixes due within it are published in one batch.
MIN_SLEEP_S: Final = 0.005
DISCONNECT_TIMEOUT_S: Final = 5.0
# Enough for one hour of progress refreshes at 0.5 s.
TIMELINE_SAMPLES: Final = 7200
# The reconnects the summary lists (the most recent), for connect rates and failover times.
RECONNECT_SAMPLES: Final = 100_000
# At shutdown, how long a worker waits for the PUBACKs of what it sent before it disconnects.
DRAIN_TIMEOUT_S: Final = 5.0
_ONLINE: Final = Presence.ONLINE.value.encode()
_OFFLINE: Final = Presence.OFFLINE.value.encode()


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """What to simulate. Plain values, so the CLI, `python -m devices` and tests build it alike.

    `teams` and `workers_per_team` select from the identities (None = all). Without a schedule
    every selected worker is online for `duration` seconds (0 = until `stop` is set). With a
    schedule the run lasts `duration` seconds if given, else until the schedule's last point.
    """

    broker_urls: tuple[str, ...] = (DEFAULT_BROKER_URL,)
    teams: int | None = None
    workers_per_team: int | None = None
    interval: float = 1.0
    jitter: float = 0.1
    qos: int = 0
    duration: float = 0.0
    schedule: LoadSchedule | None = None
    bbox: BoundingBox = CENTRAL_BERLIN
    profile_mix: ProfileMix = field(default_factory=ProfileMix)
    seed: int | None = None
    show_progress: bool = True
    refresh_interval: float = 0.5
    keepalive: int = 60
    connect_timeout: float = 10.0
    max_concurrent_connects: int = 100
    # Full jitter: attempt k after a loss waits uniform(0, min(max, initial * 2^k)) seconds.
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    # QoS 1 positions a worker keeps until the broker acknowledges them (sent again on the next
    # connection, wherever it is); beyond this the oldest is dropped and counted.
    max_unacknowledged: int = 1000
    # The certificate authority mqtts:// brokers must prove themselves with (the cluster's
    # state/tls/ca.crt); None: the system's trusted authorities. The host name is checked too.
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if not self.broker_urls:
            raise ValueError("at least one broker URL is needed")
        for url in self.broker_urls:
            if BrokerAddress.parse(url, allow_tls=True).websockets:
                raise ValueError(f"devices connect over mqtt:// or mqtts:// only, not {url!r}")
        if self.ca_file is not None and not any(
            BrokerAddress.parse(url, allow_tls=True).tls for url in self.broker_urls
        ):
            raise ValueError("a CA file is only used with mqtts:// broker URLs")
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError("interval must be a positive number of seconds")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be a fraction in [0, 1)")
        if self.qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if not (math.isfinite(self.duration) and self.duration >= 0):
            raise ValueError("duration must be a number of seconds >= 0")
        if self.duration == 0 and self.schedule is not None and self.schedule.end_seconds == 0:
            raise ValueError("a schedule that ends at 0 s needs a duration")
        if self.refresh_interval <= 0 or self.connect_timeout <= 0 or self.keepalive <= 0:
            raise ValueError("refresh interval, connect timeout and keepalive must be positive")
        if self.max_concurrent_connects < 1:
            raise ValueError("max concurrent connects must be at least 1")
        if not 0 < self.reconnect_initial_delay <= self.reconnect_max_delay:
            raise ValueError("reconnect delays need 0 < initial <= max")
        if self.max_unacknowledged < 1:
            raise ValueError("max unacknowledged must be at least 1")

    @property
    def run_seconds(self) -> float:
        """How long the run lasts; infinity means until `stop` is set."""
        if self.duration > 0:
            return self.duration
        if self.schedule is not None:
            return self.schedule.end_seconds
        return math.inf


def _bring_up_order(identities: list[DeviceIdentity]) -> list[int]:
    """Indices interleaved across teams (t1w1, t2w1, t1w2, ...), so a growing schedule grows
    every team, not the first team first."""
    by_team: dict[str, list[int]] = {}
    for index, identity in enumerate(identities):
        by_team.setdefault(identity.team, []).append(index)
    columns = list(by_team.values())
    depth = max((len(column) for column in columns), default=0)
    return [column[row] for row in range(depth) for column in columns if row < len(column)]


class _Simulation:
    def __init__(
        self, config: SimulationConfig, identities: list[DeviceIdentity], stop: asyncio.Event
    ) -> None:
        self.config = config
        self.stop = stop
        self.seed = (
            config.seed if config.seed is not None else random.SystemRandom().getrandbits(32)
        )
        self.brokers = [BrokerAddress.parse(url, allow_tls=True) for url in config.broker_urls]
        # One context for every client; it verifies the broker's certificate and host name.
        self.ssl_context: ssl.SSLContext | None = None
        if any(broker.tls for broker in self.brokers):
            self.ssl_context = (
                client_ssl_context(config.ca_file)
                if config.ca_file is not None
                else ssl.create_default_context()
            )
        self.errors: Counter[str] = Counter()
        self.error_log = RateLimitedLog(log, interval=5.0)
        self.messages_sent = 0
        self.fixes_skipped = 0
        self.reconnects = 0
        self.failovers = 0
        self.resent = 0
        self.outbox_dropped = 0
        self.reconnect_log: deque[ReconnectSample] = deque(maxlen=RECONNECT_SAMPLES)
        self.started = 0.0
        self.connected_count = 0
        self.peak = 0
        self.active_count = 0  # workers CONNECTING or ONLINE
        self.connects_in_flight = 0
        self.target = 0
        self.broker_workers: dict[BrokerAddress, set[int]] = {b: set() for b in self.brokers}
        self.timeline: deque[TimelineSample] = deque(maxlen=TIMELINE_SAMPLES)
        self.rate_meter = RateMeter()
        self.rate = 0.0
        self.due: list[tuple[float, int, int]] = []
        self.connect_tasks: set[asyncio.Task[None]] = set()
        self.reconnect_tasks: set[asyncio.Task[None]] = set()
        self.disconnect_tasks: set[asyncio.Task[None]] = set()
        self.timing_rng = random.Random(f"{self.seed}/timing")
        self.workers = self._build_workers(
            select_identities(identities, config.teams, config.workers_per_team)
        )

    def _build_workers(self, selected: list[DeviceIdentity]) -> list[Worker]:
        config = self.config
        profiles = config.profile_mix.assign(len(selected), random.Random(f"{self.seed}/profiles"))
        bases = {
            identity.team: team_base(
                config.bbox, random.Random(f"{self.seed}/team/{identity.team}")
            )
            for identity in selected
        }
        movers = []
        for identity, profile in zip(selected, profiles, strict=True):
            rng = random.Random(f"{self.seed}/worker/{identity.team}/{identity.worker}")
            start = start_near(bases[identity.team], config.bbox, rng)
            movers.append(Mover(profile, config.bbox, rng, start))
        # Home brokers go round-robin in file order, so each team is spread over all brokers;
        # the bring-up order interleaves teams.
        return [
            Worker(
                position,
                selected[index],
                BrokerFailover(
                    tuple(self.brokers[b] for b in broker_order(index, len(self.brokers))),
                    initial=config.reconnect_initial_delay,
                    maximum=config.reconnect_max_delay,
                    uniform=self.timing_rng.uniform,
                ),
                movers[index],
            )
            for position, index in enumerate(_bring_up_order(selected))
        ]

    # --- errors -------------------------------------------------------------------------

    def _fail(self, kind: str, worker: Worker, detail: object) -> None:
        self.errors[kind] += 1
        self.error_log.warning(
            kind,
            "%s: %s/%s on %s: %s",
            kind,
            worker.identity.team,
            worker.identity.worker,
            worker.broker,
            detail,
        )

    # --- the run ------------------------------------------------------------------------

    def target_at(self, elapsed: float) -> int:
        schedule = self.config.schedule
        wanted = schedule.target_at(elapsed) if schedule is not None else len(self.workers)
        return min(wanted, len(self.workers))

    async def run(self) -> SimulationSummary:
        config = self.config
        schedule = config.schedule
        if schedule is not None and schedule.peak > len(self.workers):
            log.warning(
                "the schedule wants up to %d workers, only %d are selected",
                schedule.peak,
                len(self.workers),
            )
        loop = asyncio.get_running_loop()
        started = self.started = loop.time()
        console = Console()
        live = (
            Live(console=console, auto_refresh=False, transient=False)
            if config.show_progress
            else None
        )
        with live if live is not None else contextlib.nullcontext():
            try:
                await self._schedule_loop(loop, started, live)
            finally:
                ended = loop.time()
                self.target = 0
                if live is not None:
                    view = self._progress_view(ended - started, "taking workers offline")
                    live.update(view, refresh=True)
                await self._shutdown()
                if live is not None:
                    live.update(self._progress_view(ended - started, "ended"), refresh=True)
        summary = self._summary(ended - started)
        if config.show_progress:
            console.print(summary_table(summary))
        return summary

    async def _schedule_loop(
        self, loop: asyncio.AbstractEventLoop, started: float, live: Live | None
    ) -> None:
        end = started + self.config.run_seconds
        refresh_interval = self.config.refresh_interval
        next_control = next_refresh = started
        while not self.stop.is_set():
            now = loop.time()
            if now >= end:
                break
            if now >= next_control:
                self.target = self.target_at(now - started)
                self._reconcile(now)
                next_control = now + CONTROL_INTERVAL_S
            if now >= next_refresh:
                self._record(now, now - started)
                if live is not None:
                    live.update(self._progress_view(now - started), refresh=True)
                next_refresh = now + refresh_interval
            self._publish_due(now)
            wake = min(self.due[0][0] if self.due else math.inf, next_control, next_refresh, end)
            await asyncio.sleep(max(MIN_SLEEP_S, wake - loop.time()))
        self._record(loop.time(), loop.time() - started)

    def _record(self, now: float, elapsed: float) -> None:
        self.rate = self.rate_meter.add(now, self.messages_sent)
        self.timeline.append(
            TimelineSample(round(elapsed, 3), self.target, self.connected_count, self.messages_sent)
        )

    def _reconcile(self, now: float) -> None:
        target = self.target
        if self.active_count < target:
            for worker in self.workers:
                if self.active_count >= target:
                    break
                if self.connects_in_flight >= self.config.max_concurrent_connects:
                    break
                if worker.phase is Phase.IDLE and worker.retry_at <= now:
                    self._start(self.connect_tasks, self._connect(worker))
                    worker.phase = Phase.CONNECTING
                    self.active_count += 1
                    self.connects_in_flight += 1
        elif self.active_count > target:
            for worker in reversed(self.workers):
                if self.active_count <= target:
                    break
                if worker.phase is Phase.ONLINE:
                    self._take_offline(worker)

    def _start(self, tasks: set[asyncio.Task[None]], coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def _publish_due(self, now: float) -> None:
        due = self.due
        workers = self.workers
        interval = self.config.interval
        jitter = self.config.jitter
        uniform = self.timing_rng.uniform
        while due and due[0][0] <= now:
            due_at, generation, index = heapq.heappop(due)
            worker = workers[index]
            if generation != worker.generation:
                continue
            self._publish_fix(worker, now)
            next_due = due_at + interval * (1.0 + uniform(-jitter, jitter))
            if next_due <= now:
                # Fell a whole interval behind (an overloaded loop): skip, don't burst.
                next_due = now + interval
            heapq.heappush(due, (next_due, generation, index))

    def _publish_fix(self, worker: Worker, now: float) -> None:
        fix = worker.mover.step(now - worker.last_fix_at)
        worker.last_fix_at = now
        client = worker.client
        if not worker.connected or client is None:
            # The worker keeps moving while its phone has no connection.
            self.fixes_skipped += 1
            return
        identity = worker.identity
        position = Position(
            identity.team,
            identity.worker,
            fix.lat,
            fix.lon,
            time.time_ns() // 1_000_000,
            worker.seq,
            fix.acc,
            fix.speed,
            fix.heading,
            fix.battery,
        )
        payload = encode_position(position)
        if self.config.qos == 1:
            # Into the outbox, behind anything still waiting there: sent now if the broker's
            # receive maximum allows, kept until its PUBACK either way.
            self._keep(worker, worker.seq, payload)
            self._send_pending(worker)
        else:
            try:
                client.publish(worker.position_topic, payload, qos=0)
            except Exception as exc:
                self._fail("publish", worker, exc)
                return
        worker.seq += 1
        self.messages_sent += 1

    # --- the QoS 1 outbox ---------------------------------------------------------------

    def _keep(self, worker: Worker, seq: int, payload: bytes) -> None:
        unacked = worker.unacked
        if len(unacked) >= self.config.max_unacknowledged:
            # Full: the oldest goes (a live map wants the newest), counted as lost.
            oldest = next(iter(unacked))
            del unacked[oldest]
            if worker.pending and worker.pending[0] == oldest:
                worker.pending.popleft()
            self.outbox_dropped += 1
            self._fail("outbox_full", worker, f"seq {oldest} dropped unacknowledged")
        unacked[seq] = payload
        worker.pending.append(seq)

    def _send_pending(self, worker: Worker) -> None:
        """Sends the outbox's unsent positions, oldest first, while the connection is up and
        the broker's receive maximum allows; the rest follow as PUBACKs come in."""
        client, storage = worker.client, worker.storage
        if client is None or storage is None or not worker.connected:
            return
        pending, unacked = worker.pending, worker.unacked
        while pending:
            seq = pending[0]
            payload = unacked.get(seq)
            if payload is None:  # dropped from a full outbox meanwhile
                pending.popleft()
                continue
            try:
                client.publish(worker.position_topic, payload, qos=1)
            except OverflowError:
                return  # every packet id of the receive maximum is in flight
            except Exception as exc:
                self._fail("publish", worker, exc)
                return
            worker.inflight[storage.last_mid] = seq
            pending.popleft()

    def _on_ack(self, worker: Worker, client: DeviceClient, mid: int) -> None:
        if worker.client is not client:
            return  # a late PUBACK of a connection left behind: that position is sent again
        seq = worker.inflight.pop(mid, None)
        if seq is None:
            return  # a status message
        worker.unacked.pop(seq, None)
        if worker.pending:
            self._send_pending(worker)

    def _resend_outbox(self, worker: Worker) -> None:
        """On a new connection: everything unacknowledged goes again, in seq order, before any
        new fix (those are appended behind it)."""
        worker.inflight.clear()
        worker.pending = deque(worker.unacked)
        self.resent += len(worker.pending)
        self._send_pending(worker)

    # --- connections --------------------------------------------------------------------

    def _new_client(self, worker: Worker) -> DeviceClient:
        identity = worker.identity
        client: DeviceClient
        storage = AckedStorage(lambda mid: self._on_ack(worker, client, mid))
        client = DeviceClient(
            identity.client_id,
            will_message=Message(worker.status_topic, _OFFLINE, qos=1, retain=True),
            persistent_storage=storage,
            logger=_gmqtt_log,
        )
        client.set_auth_credentials(identity.username, identity.password)
        client.on_connect = functools.partial(self._on_connect, worker)
        client.on_disconnect = functools.partial(self._on_disconnect, worker)
        worker.storage = storage
        return client

    async def _attempt(self, worker: Worker) -> bool:
        """One connection attempt to the worker's current broker, with a fresh client. A
        failure is counted, the client closed and the failover told; True on a CONNACK."""
        config = self.config
        broker = worker.broker
        client = self._new_client(worker)
        worker.client = client
        failure: tuple[str, object] | None = None
        try:
            await asyncio.wait_for(
                client.connect(
                    broker.host,
                    broker.port,
                    ssl=self.ssl_context if broker.tls else False,
                    keepalive=config.keepalive,
                ),
                config.connect_timeout,
            )
        except asyncio.CancelledError:
            self._abandon(worker, client)
            raise
        except MQTTConnectError as exc:
            failure = ("connect_refused", exc)
        except ssl.SSLError as exc:
            # A certificate that no trusted authority signed, or for another host name.
            failure = ("tls_failed", exc)
        except TimeoutError:
            failure = ("connect_timeout", f"no CONNACK within {config.connect_timeout} s")
        except OSError as exc:
            failure = ("connect_failed", exc)
        except Exception as exc:
            failure = ("connect_error", repr(exc))
        if failure is None:
            return True
        self._fail(failure[0], worker, failure[1])
        self._abandon(worker, client)
        return False

    def _abandon(self, worker: Worker, client: DeviceClient) -> None:
        """Leaves a client behind: closed in the background, its callbacks ignored."""
        if worker.client is client:
            self._mark_disconnected(worker)
            worker.client = None
            worker.storage = None
        self._start(self.disconnect_tasks, self._close_quietly(client))

    async def _connect(self, worker: Worker) -> None:
        """Brings a worker online (the schedule asked for it): one attempt; after a failure the
        worker waits its backoff on the next broker of its list until the schedule retries."""
        worker.lost_at = None
        try:
            connected = await self._attempt(worker)
        finally:
            self.connects_in_flight -= 1
        loop = asyncio.get_running_loop()
        if not connected:
            worker.phase = Phase.IDLE
            self.active_count -= 1
            worker.retry_at = loop.time() + worker.failover.after_failure()
            return
        worker.phase = Phase.ONLINE
        now = loop.time()
        worker.last_fix_at = now
        # Spread the first fixes of workers that connect together over one interval.
        first_due = now + self.timing_rng.uniform(0.0, self.config.interval)
        heapq.heappush(self.due, (first_due, worker.generation, worker.index))
        if not worker.connected:
            self._start_reconnect(worker)  # lost between its CONNACK and now

    def _start_reconnect(self, worker: Worker) -> None:
        now = asyncio.get_running_loop().time()
        delay = worker.failover.after_loss(worker.loss, now)
        worker.reconnect_task = self._start(self.reconnect_tasks, self._reconnect(worker, delay))

    async def _reconnect(self, worker: Worker, delay: float) -> None:
        """Connects a worker that lost its connection again, wherever its failover rules say,
        until it is connected or no longer wanted online."""
        try:
            while worker.phase is Phase.ONLINE:
                await asyncio.sleep(delay)
                if worker.phase is not Phase.ONLINE:
                    return
                if not await self._attempt(worker):
                    delay = worker.failover.after_failure()
                    continue
                if worker.connected:
                    return
                # Lost again right after its CONNACK.
                delay = worker.failover.after_loss(worker.loss, asyncio.get_running_loop().time())
        finally:
            if worker.reconnect_task is asyncio.current_task():
                worker.reconnect_task = None

    def _mark_disconnected(self, worker: Worker) -> None:
        if worker.connected:
            worker.connected = False
            self.connected_count -= 1

    def _on_connect(
        self, worker: Worker, client: DeviceClient, flags: Any, rc: Any, properties: Any
    ) -> None:
        if worker.client is not client or worker.phase not in (Phase.CONNECTING, Phase.ONLINE):
            return
        now = asyncio.get_running_loop().time()
        broker = worker.broker
        worker.failover.connected(now)
        try:
            # Re-sent on every reconnect: the broker may have published the Will meanwhile.
            client.publish(worker.status_topic, _ONLINE, qos=1, retain=True)
        except Exception as exc:
            self._fail("publish_status", worker, exc)
        if worker.lost_at is not None:
            self._record_reconnect(worker, broker, now)
        worker.last_broker = broker
        if not worker.connected:
            worker.connected = True
            self.connected_count += 1
            self.peak = max(self.peak, self.connected_count)
        self.broker_workers[broker].add(worker.index)
        if worker.unacked:
            self._resend_outbox(worker)

    def _record_reconnect(self, worker: Worker, broker: BrokerAddress, now: float) -> None:
        assert worker.lost_at is not None
        failover = broker != worker.last_broker
        self.reconnects += 1
        self.failovers += failover
        self.reconnect_log.append(
            ReconnectSample(
                round(now - self.started, 4),
                worker.name,
                str(broker),
                round(now - worker.lost_at, 4),
                failover,
            )
        )
        log.info("%s reconnected to %s", worker.identity.client_id, broker)
        worker.lost_at = None

    def _on_disconnect(
        self, worker: Worker, client: DeviceClient, packet: Any, exc: Any = None
    ) -> None:
        """The connection ended. gmqtt calls this with the body of the broker's DISCONNECT, and
        (again) with an empty one when the socket closes: the first call counts."""
        if worker.client is not client or not worker.connected:
            return  # an attempt that failed (counted there), or a client left behind
        loss = parse_disconnect(bytes(packet)) if isinstance(packet, bytes | bytearray) else None
        self._abandon(worker, client)
        worker.loss = loss
        if worker.lost_at is None:
            worker.lost_at = asyncio.get_running_loop().time()
        if worker.phase is not Phase.ONLINE:
            return  # stopping, or still in _connect, which reconnects it
        if loss is not None and loss.moves:
            self._fail("told_to_move", worker, f"DISCONNECT {loss.reason:#04x}")
        elif loss is not None:
            self._fail("disconnected", worker, f"DISCONNECT {loss.reason:#04x}")
        else:
            self._fail("connection_lost", worker, exc or "broker closed the connection")
        if worker.reconnect_task is None:
            self._start_reconnect(worker)

    def _take_offline(self, worker: Worker) -> None:
        worker.phase = Phase.STOPPING
        worker.generation += 1
        self.active_count -= 1
        self._start(self.disconnect_tasks, self._disconnect(worker))

    async def _disconnect(self, worker: Worker) -> None:
        reconnecting = worker.reconnect_task
        if reconnecting is not None:
            reconnecting.cancel()
            await asyncio.wait({reconnecting})
        client = worker.client
        if client is not None:
            if worker.connected:
                await self._drain(worker)
            if worker.connected:
                try:
                    # Sent before DISCONNECT on the same connection, so the broker stores it
                    # first; a clean DISCONNECT suppresses the Will, so this is what managers see.
                    client.publish(worker.status_topic, _OFFLINE, qos=1, retain=True)
                except Exception as exc:
                    self._fail("publish_status", worker, exc)
            self._mark_disconnected(worker)
            try:
                await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
            except ssl.SSLError as exc:
                # Over TLS the broker's PUBACK of that status may arrive after our close_notify:
                # DISCONNECT had gone out, so the connection ended cleanly all the same.
                if exc.reason != "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
                    self._fail("disconnect", worker, repr(exc))
            except Exception as exc:
                self._fail("disconnect", worker, repr(exc))
        worker.client = None
        worker.storage = None
        worker.lost_at = None
        worker.phase = Phase.IDLE

    async def _drain(self, worker: Worker) -> None:
        """Waits (a bounded while) for the PUBACKs of the outbox before a clean disconnect: a
        worker that leaves does not leave what it sent unconfirmed."""
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
        while worker.unacked and worker.connected:
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.02)

    async def _close_quietly(self, client: DeviceClient) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)

    async def _shutdown(self) -> None:
        for task in self.connect_tasks:
            task.cancel()
        await asyncio.gather(*self.connect_tasks, return_exceptions=True)
        for worker in self.workers:
            if worker.phase in (Phase.CONNECTING, Phase.ONLINE):
                self._take_offline(worker)
        await asyncio.gather(*self.disconnect_tasks, return_exceptions=True)
        for task in self.reconnect_tasks:
            task.cancel()
        await asyncio.gather(*self.reconnect_tasks, return_exceptions=True)

    # --- reporting ----------------------------------------------------------------------

    def _summary(self, duration: float) -> SimulationSummary:
        return SimulationSummary(
            duration_s=round(duration, 3),
            seed=self.seed,
            workers_selected=len(self.workers),
            workers_peak=self.peak,
            messages_sent=self.messages_sent,
            mean_rate=self.messages_sent / duration if duration > 0 else 0.0,
            errors=dict(sorted(self.errors.items())),
            reconnects=self.reconnects,
            fixes_skipped=self.fixes_skipped,
            workers_by_broker={str(b): len(ws) for b, ws in self.broker_workers.items()},
            timeline=tuple(self.timeline),
            failovers=self.failovers,
            resent=self.resent,
            unacknowledged=sum(len(worker.unacked) for worker in self.workers),
            outbox_dropped=self.outbox_dropped,
            reconnect_log=tuple(self.reconnect_log),
        )

    def _progress_view(self, elapsed: float, state: str = "running") -> Group:
        run_seconds = self.config.run_seconds
        length = "until stopped" if math.isinf(run_seconds) else clock(run_seconds)
        errors = sum(self.errors.values())
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.errors.items()))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("time", f"{clock(elapsed)} / {length}  ({state}, seed {self.seed})")
        grid.add_row(
            "workers",
            f"{self.connected_count:,} connected / {self.target:,} target"
            f"  ({len(self.workers):,} selected, peak {self.peak:,})",
        )
        grid.add_row(
            "messages",
            f"{self.rate:,.0f}/s  total {self.messages_sent:,}  skipped {self.fixes_skipped:,}",
        )
        grid.add_row(
            "errors",
            Text(f"{errors:,}" + (f" ({kinds})" if kinds else ""), style="red" if errors else ""),
        )
        grid.add_row(
            "reconnects",
            f"{self.reconnects:,}  failovers {self.failovers:,}  resent {self.resent:,}",
        )
        return Group(Text("teamtrack device simulator", style="bold cyan"), grid)


async def run_simulation(
    config: SimulationConfig,
    identities: list[DeviceIdentity],
    *,
    stop: asyncio.Event | None = None,
) -> SimulationSummary:
    """Run the simulation until its duration or schedule ends, or until `stop` is set.

    One failing device never ends the run: connect failures, refusals, lost connections and
    publish errors are counted by kind in the summary and logged at most every few seconds.
    Every worker is taken offline cleanly before this returns, also when the task is cancelled.
    """
    simulation = _Simulation(config, identities, stop if stop is not None else asyncio.Event())
    return await simulation.run()
