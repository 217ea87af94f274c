"""The bridge: one broker's device traffic into the backend, and other brokers' traffic back out.

Inbound: a shared subscription on `teams/+/workers/+/+` (several bridges of one broker split
its load), validation, batches into the backend. A QoS 1 message is acknowledged to the broker
only once the backend holds it; the MQTT session is persistent, so the broker keeps QoS 1
messages while the bridge restarts.

Outbound (mirroring): a consumer group per broker on the backend's all-teams feed, so each
message from another broker is republished into this broker exactly once, however many bridges
serve it. Mirrored messages carry the `teamtrack-origin` user property; inbound messages with it
are dropped before decoding, which is what keeps mirroring free of loops and duplicates.

On demand (`mirror_on_demand`, what `python -m bridge` and `teamtrack up` run): presence and
worker events are always mirrored (retained presence is what a later subscriber sees first),
positions only while the broker holds a subscription other than its bridges' own. The broker
says so itself: `$SYS/broker/subscriptions/count` (plain subscriptions only; shared ones are not
counted), which it publishes retained every `sys_interval` (1 s) when it changed: a reader is
known at most a second after it subscribed. Positions read while nobody subscribed are held for
`MIRROR_REPLAY_S` (that second, the idle read pace and room for a busy machine) and those read
since the last count that found no reader are republished, first, when a reader appears: a new
subscriber misses nothing sent after it subscribed, and may get some of what was sent before
(at most that long before). Without a reader the mirror reads
the backend every `MIRROR_IDLE_PACE_S` instead of once per publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from gmqtt import Client as MQTTClient
from gmqtt import Subscription
from gmqtt.mqtt.constants import MQTTv50
from prometheus_client import CollectorRegistry

from teamtrack.backends import Backend, Batch, Event, GroupConsumer
from teamtrack.contract import (
    NOTICE_ORIGIN,
    WORKER_TOPIC_FILTER,
    ContractError,
    Kind,
    Reason,
    decode_status,
    event_topic,
    parse_topic,
    position_topic,
    status_topic,
    validate_position,
)
from teamtrack.ingress.batcher import Batcher, BatchMetrics
from teamtrack.ingress.duty import DutyGate, RosterFile, follow_duty, refresh_roster
from teamtrack.ingress.owntracks import (
    OWNTRACKS_FILTERS,
    OWNTRACKS_ROOT,
    OnlineRefresh,
    decode_owntracks,
    owntracks_events,
    parse_owntracks_topic,
)
from teamtrack.ingress.ratelimit import DeviceRateLimit
from teamtrack.logs import RateLimitedLog
from teamtrack.mqtt import (
    BRIDGE_SHARE_GROUP,
    ORIGIN_PROPERTY,
    SUBSCRIPTION_COUNT_TOPIC,
    BrokerAddress,
)
from teamtrack.retry import Backoff

from .metrics import BridgeCounters, CountersCollector
from .mqtt_fast import PublishWriter, install_inbound

log = logging.getLogger(__name__)

SUCCESS = 0
# SUBACK reason codes from 0x80 up refuse the subscription (0x87: not authorized).
SUBACK_FAILURE = 0x80
# What a bridge holds unacknowledged at most (the broker's `max_inflight_messages` matches it):
# about 8 MB of events, 2 s of 10,000 positions a second on one broker.
RECEIVE_MAXIMUM = 20_000
# Mirrored QoS 0 messages are written at the latest once this many are gathered.
MIRROR_FLUSH_PACKETS = 1000
# What the bridge subscribes to: the contract's topics and the OwnTracks app's.
SUBSCRIBED_FILTERS = (WORKER_TOPIC_FILTER, *OWNTRACKS_FILTERS)
# In a share group each bridge also takes every device status of its broker, marked by this
# subscription identifier, only to learn pauses (docs/privacy.md): the broker hands each
# message of the shared subscription to one bridge, and the positions after a `paused` would
# otherwise pass the bridges that did not get it. Retained, it also reaches a bridge that
# (re)starts after the pause. A marked copy is never forwarded: the shared one is.
STATUS_FILTER = status_topic("+", "+")
DUTY_SUBSCRIPTION_ID = 1
_OWNTRACKS_PREFIX = OWNTRACKS_ROOT + "/"
_TOPIC_OF_KIND = {Kind.POSITION: position_topic, Kind.STATUS: status_topic,
                  Kind.EVENT: event_topic}
# On-demand mirroring: the pace of the mirror's reads while nobody subscribed (presence then
# reaches the broker up to this late); how long positions read meanwhile are held, to be
# republished when a reader turns up: the brokers' `sys_interval` (1 s; a reader is counted at
# the next tick after it subscribed), that pace, and room for a busy machine delaying the
# count's way to the bridge; how much earlier than the last count that found no reader they are
# still republished; and how many batches are held at most.
MIRROR_IDLE_PACE_S = 0.25
MIRROR_REPLAY_S = 4.0
MIRROR_REPLAY_MARGIN_S = 0.5
MIRROR_HELD_BATCHES = 20_000
# What marks a batch's positions and its other events in its raw JSON (`encode_events`: ids
# are slugs, device payloads numbers, the strings of worker events JSON-escaped).
_POSITION_MARK = b'"k":"p"'
_OTHER_MARKS = (b'"k":"s"', b'"k":"e"')


@dataclass(frozen=True)
class BridgeConfig:
    broker: BrokerAddress
    broker_id: str
    client_id: str
    username: str
    password: str
    share_group: str = BRIDGE_SHARE_GROUP
    # False for the only bridge of its broker: a plain subscription with No Local (MQTT 5), so
    # the messages it mirrors into its broker never come back to it.
    shared_subscription: bool = True
    session_expiry_s: int = 3600
    mirror: bool = True
    # Positions mirrored only while the broker has a subscriber besides its bridges (module
    # docstring); presence and worker events always.
    mirror_on_demand: bool = False
    # Bridges subscribed to the broker, this one included: their own subscriptions (each its
    # `$SYS` count; the plain one of a broker's only bridge) are not readers.
    broker_bridges: int = 1
    mirror_teams: frozenset[str] | None = None
    batch_max_events: int = 2000
    max_pending_events: int = 20000
    batch_interval_s: float = 0.0
    # Messages a second one device (team, worker) may send, and how many at once (0: no limit).
    device_rate_per_s: float = 0.0
    device_burst: int = 100
    # The provisioned duty.json (shifts; None: always on duty), checked for changes every
    # `duty_check_s`, which is also how late a shift's end turns an online worker off duty.
    duty_file: str | None = None
    duty_check_s: float = 1.0


class BridgeService:
    def __init__(
        self, config: BridgeConfig, backend: Backend, registry: CollectorRegistry
    ) -> None:
        self.config = config
        self.backend = backend
        self.counters = BridgeCounters()
        registry.register(CountersCollector(self.counters, config.broker_id))
        self._batch_metrics = BatchMetrics(registry, "teamtrack_bridge", "broker", config.broker_id)
        self.batcher = Batcher(
            self._publish,
            max_batch=config.batch_max_events,
            max_pending=config.max_pending_events,
            on_batch=self._batch_metrics.observe,
            on_backend_error=self._count_backend_error,
            min_interval=config.batch_interval_s,
        )
        self._client = MQTTClient(
            config.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=config.session_expiry_s,
            # QoS 1 positions the broker may hand over before this bridge acknowledges them:
            # while the backend is away they wait here, not only in the broker's memory, and
            # survive the broker's crash (RECEIVE_MAXIMUM).
            receive_maximum=RECEIVE_MAXIMUM,
        )
        self._client.set_auth_credentials(config.username, config.password)
        self.fast_inbound = install_inbound(self._client, self._accept)
        if not self.fast_inbound:
            self._client.on_message = self._on_message
        self._mirror_writer: PublishWriter | None = (
            PublishWriter(self._client) if PublishWriter.supported(self._client) else None
        )
        self._flush_scheduled = False
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._reconnect_backoff = Backoff(initial=0.5, maximum=15.0)
        self._rejections_log = RateLimitedLog(log)
        self._device_limit = (
            DeviceRateLimit(config.device_rate_per_s, config.device_burst)
            if config.device_rate_per_s > 0
            else None
        )
        self._online_refresh = OnlineRefresh()
        self._roster_file = RosterFile(config.duty_file) if config.duty_file else None
        self.duty = DutyGate(self._roster_file.roster if self._roster_file else None)
        self.counters.duty_dropped = self.duty.dropped
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._stopping = False
        # Set by `leave`: no subscription is made again on a reconnect.
        self._leaving = False
        # On-demand mirroring: positions are mirrored until the broker's count says otherwise.
        self._demand = True
        self._demand_mid: int | None = None
        self._no_reader_counted_at = 0.0
        self._mirror_consumer: GroupConsumer | None = None
        self._held: deque[tuple[float, Batch]] = deque(maxlen=MIRROR_HELD_BATCHES)

    # Lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        self._tasks.append(asyncio.create_task(self.batcher.run(), name="bridge-batcher"))
        await self._connect_with_backoff()
        self._tasks.append(asyncio.create_task(self._duty_watch(), name="bridge-duty"))
        if self.config.mirror:
            self._tasks.append(asyncio.create_task(self._mirror(), name="bridge-mirror"))

    async def wait_subscribed(self) -> None:
        await self._subscribed.wait()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop taking messages, flush what was accepted, then disconnect and close.

        QoS 1 messages still unflushed after `flush_timeout` were never acknowledged: the broker
        keeps them in this bridge's session and delivers them again when it comes back.
        """
        self._stopping = True
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.batcher.wait_idle(), flush_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.backend.close()

    async def leave(self, quiet_s: float = 0.5, limit_s: float = 30.0) -> None:
        """Leave the broker for good (`teamtrack scale` took this bridge away): nothing that
        the broker handed over or still queues for this bridge may be lost, since no process
        will come back for its session.

        The bridge unsubscribes, so that the broker sends the share group's next messages to
        the other bridges; takes in what the broker still had queued for it until nothing
        arrived for `quiet_s`; flushes all of it into the backend and acknowledges it; then
        disconnects with a session expiry of 0, so the broker forgets the session at once
        instead of queueing for it (a shared subscription's member that is merely away would
        still get its share). Past `limit_s` it stops as `stop` does and keeps its session.
        """
        self._leaving = True
        deadline = time.monotonic() + limit_s
        if self.counters.connected:
            self._client.unsubscribe([*self._shared_filters(), *SUBSCRIBED_FILTERS])
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_seen = self._inbound_total()
            if now_seen != seen:
                seen, quiet_since = now_seen, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
            await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.batcher.wait_idle(), max(deadline - time.monotonic(), 0.1))
        await asyncio.sleep(0.05)  # the acknowledgements of the last batch go out
        expired = time.monotonic() < deadline and self.batcher.idle
        self._stopping = True
        with contextlib.suppress(Exception):
            if expired:
                await self._client.disconnect(session_expiry_interval=0)
            else:
                log.warning("could not drain within %.0fs; the session is kept", limit_s)
        log.info("left %s (%d messages taken in)", self.config.broker, seen)
        await self.stop()

    def _inbound_total(self) -> int:
        counters = self.counters
        return (sum(counters.received.values()) + sum(counters.rejected.values())
                + sum(counters.owntracks_ignored.values()) + counters.mirror_echoes)

    async def _connect_with_backoff(self) -> None:
        broker = self.config.broker
        backoff = Backoff(initial=0.2, maximum=10.0)
        while True:
            try:
                await self._client.connect(broker.host, broker.port, version=MQTTv50, keepalive=30)
                return
            except (OSError, ConnectionError, Exception) as error:  # gmqtt raises plain Exception
                delay = backoff.next_delay()
                log.warning("cannot connect to %s (%s); retrying in %.1fs", broker, error, delay)
                await asyncio.sleep(delay)

    def _on_connect(self, client: MQTTClient, flags: int, rc: int, properties: Any) -> None:
        self.counters.connected = True
        self._reconnect_backoff.reset()
        log.info("connected to %s as %s (session present: %s)",
                 self.config.broker, self.config.client_id, bool(flags))
        # Subscribe on every connect: harmless when the session kept the subscription, needed
        # when it expired while the bridge was away. The persistent session may still hold the
        # other kind of subscription (the bridge ran with the other setting): it would deliver
        # every message twice, so it goes.
        # The new subscription goes first: between an UNSUBSCRIBE and the SUBSCRIBE after it the
        # broker would answer devices "no matching subscribers" and drop their positions; the
        # other way round, a message sent meanwhile arrives twice, and repeats are dropped
        # downstream (history key, dashboards' seq window).
        if self._leaving:
            return
        shared = self._shared_filters()
        if self.config.shared_subscription:
            client.subscribe([Subscription(topic_filter, qos=1) for topic_filter in shared])
            client.unsubscribe(list(SUBSCRIBED_FILTERS))
            client.subscribe(Subscription(STATUS_FILTER, qos=1, no_local=True,
                                          subscription_identifier=DUTY_SUBSCRIPTION_ID))
        else:
            client.subscribe([
                Subscription(topic_filter, qos=1, no_local=True)
                for topic_filter in SUBSCRIBED_FILTERS
            ])
            # The only bridge of its broker gets every status already.
            client.unsubscribe([*shared, STATUS_FILTER])
        if self.config.mirror and self.config.mirror_on_demand:
            # Its own SUBSCRIBE, so that a refusal (an ACL provisioned before on-demand
            # mirroring) is told apart; the count arrives retained at once.
            self._demand_mid = client.subscribe(Subscription(SUBSCRIPTION_COUNT_TOPIC, qos=0))

    def _shared_filters(self) -> list[str]:
        group = self.config.share_group
        return [f"$share/{group}/{topic_filter}" for topic_filter in SUBSCRIBED_FILTERS]

    def _on_subscribe(self, client: MQTTClient, mid: int, qos: Any, properties: Any) -> None:
        codes = [int(code) for code in (qos if isinstance(qos, list | tuple) else [qos])]
        if mid == self._demand_mid:
            if any(code >= SUBACK_FAILURE for code in codes):
                log.warning(
                    "the broker refused %s %s (%s): mirroring every position; provision again "
                    "for on-demand mirroring", self.config.client_id, SUBSCRIPTION_COUNT_TOPIC,
                    ", ".join(f"0x{code:02x}" for code in codes),
                )
                self._set_demand(True)
            return
        if any(code >= SUBACK_FAILURE for code in codes[:1]):
            # Only accounts the ACL lets read `$share/<group>/teams/#` may join the group.
            log.error(
                "the broker refused the subscription of %s (reason %s): is %s a bridge account "
                "of the registry, and %r the bridges' share group?",
                self.config.client_id, ", ".join(f"0x{code:02x}" for code in codes),
                self.config.username, self.config.share_group,
            )
            return
        if any(code >= SUBACK_FAILURE for code in codes[1:]):
            # An ACL provisioned before OwnTracks was taken in: the contract's topics work.
            log.error(
                "the broker refused %s the OwnTracks topics (%s): provision again to let phones "
                "running OwnTracks in", self.config.client_id,
                ", ".join(f"0x{code:02x}" for code in codes),
            )
        self.counters.subscribed = True
        self._subscribed.set()

    def _on_disconnect(self, client: MQTTClient, packet: Any, exc: Any = None) -> None:
        self.counters.subscribed = False
        if self._stopping:
            self.counters.connected = False
            return
        if self.counters.connected:
            self.counters.reconnects += 1
        self.counters.connected = False
        self._subscribed.clear()
        delay = self._reconnect_backoff.next_delay()
        client.reconnect_delay = delay
        log.warning("disconnected from %s; reconnecting in %.1fs", self.config.broker, delay)

    # Inbound -------------------------------------------------------------------------------
    def _accept(
        self, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> asyncio.Future[None] | None:
        """Take one inbound message: None when done with it, or a future resolved once the
        backend holds it (QoS 1: its PUBACK waits for that)."""
        user_properties = properties.get("user_property")
        if user_properties:
            for name, _origin in user_properties:
                if name == ORIGIN_PROPERTY:
                    self.counters.mirror_echoes += 1
                    return None
        if topic[:1] == "$":
            if topic == SUBSCRIPTION_COUNT_TOPIC:
                self._on_subscription_count(payload)
            return None
        marks = properties.get("subscription_identifier")
        if marks and DUTY_SUBSCRIPTION_ID in marks:
            self._note_status(topic, payload)
            return None
        now = int(time.time() * 1000)
        if topic.startswith(_OWNTRACKS_PREFIX):
            return self._accept_owntracks(topic, payload, qos, now)
        try:
            address = parse_topic(topic)
            limit = self._device_limit
            if limit is not None and not limit.allow(address.team, address.worker):
                raise ContractError(
                    Reason.RATE_LIMITED,
                    f"{address.team}/{address.worker} over {self.config.device_rate_per_s:g}/s",
                )
            if address.kind is Kind.POSITION:
                kind, body, ts = Kind.POSITION, payload, validate_position(payload, now)
            elif address.kind is Kind.EVENT:
                # Worker events come from the platform (OwnTracks transitions), never a device
                # topic: the ACL grants no device this topic; a mirror of one was dropped above.
                raise ContractError(Reason.BAD_TOPIC, f"devices do not publish {topic[:200]!r}")
            else:
                status = decode_status(address.team, address.worker, payload)
                kind, body, ts = Kind.STATUS, status.presence.value.encode(), now
        except ContractError as error:
            self.counters.rejected[error.reason.value] += 1
            self._rejections_log.warning(
                error.reason.value, "rejected message on %s: %s", topic[:200], error.detail
            )
            return None
        self.counters.received[kind.value] += 1
        event = Event(address.team, address.worker, kind, body, self.config.broker_id, now, ts, qos)
        duty = self.duty
        if not duty.idle or kind is Kind.STATUS:  # a status may pause the worker
            return self._forward(duty.admit((event,), now), qos)
        if qos == 0:
            if not self.batcher.offer(event):
                self.counters.dropped_overflow += 1
                self._rejections_log.warning(
                    "overflow", "backend lagging: dropped a QoS 0 message on %s", topic
                )
            return None
        return self.batcher.submit_nowait(event)

    def _note_status(self, topic: str, payload: bytes) -> None:
        """A device status of the broker's other bridges' share (`STATUS_FILTER`): its pause
        is remembered here too; what is malformed is the forwarding bridge's to count."""
        try:
            address = parse_topic(topic)
            status = decode_status(address.team, address.worker, payload)
        except ContractError:
            return
        self.duty.note_status(address.team, address.worker, status.presence.value.encode())

    def _forward(self, events: list[Event], qos: int) -> asyncio.Future[None] | None:
        """Into the batcher, in order; for QoS 1 the future of the last one (batches keep
        their order: it done means every one is)."""
        done: asyncio.Future[None] | None = None
        for event in events:
            if qos == 0:
                if not self.batcher.offer(event):
                    self.counters.dropped_overflow += 1
            else:
                done = self.batcher.submit_nowait(event)
        return done

    def _accept_owntracks(
        self, topic: str, payload: bytes, qos: int, now: int
    ) -> asyncio.Future[None] | None:
        """An OwnTracks app's message (`owntracks_events`): its account's position or presence;
        the types teamtrack does not use are counted and dropped."""
        try:
            address = parse_owntracks_topic(topic)
            limit = self._device_limit
            if limit is not None and not limit.allow(address.team, address.worker):
                raise ContractError(
                    Reason.RATE_LIMITED,
                    f"{address.team}/{address.worker} over {self.config.device_rate_per_s:g}/s",
                )
            message = decode_owntracks(payload, now)
        except ContractError as error:
            self.counters.rejected[error.reason.value] += 1
            self._rejections_log.warning(
                error.reason.value, "rejected message on %s: %s", topic[:200], error.detail
            )
            return None
        events = owntracks_events(
            message, (address.team, address.worker), self.config.broker_id, now, qos,
            self._online_refresh,
        )
        if not events:
            self.counters.owntracks_ignored[message.type_name] += 1
            if message.monitoring is None:
                return None
            # A status object stating the app's monitoring mode: quiet/manual pause.
            return self._forward(self.duty.set_mode(
                address.team, address.worker, message.monitoring, self.config.broker_id, qos,
                now), qos)
        for event in events:
            self.counters.received[event.kind.value] += 1
        return self._forward(
            self.duty.admit(events, now, message.monitoring, online_resumes=False), qos)

    async def _duty_watch(self) -> None:
        """Reload duty.json when it changed; turn workers whose shift ended off duty."""
        # Nobody waits for those statuses: the batcher's retries carry them to the backend.
        await follow_duty(self._roster_file, self.duty, self.config.duty_check_s,
                          self.batcher.submit_nowait)

    def reload_duty(self) -> None:
        """duty.json again if it changed (also on SIGHUP)."""
        refresh_roster(self._roster_file, self.duty)

    async def _on_message(
        self, client: MQTTClient, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        """The public-API path (a task per message), for a gmqtt without `install_inbound`'s
        hooks. Returns the PUBACK reason code; gmqtt sends the PUBACK only once this returns."""
        held = self._accept(topic, payload, qos, properties)
        if held is not None:
            await held
        return SUCCESS

    async def _publish(self, events: Any) -> None:
        await self.backend.publish(events)
        self.counters.forwarded += len(events)

    def _count_backend_error(self) -> None:
        self.counters.backend_errors += 1

    # Outbound ------------------------------------------------------------------------------
    @property
    def own_subscriptions(self) -> int:
        """What the broker counts of its bridges: each one's `$SYS` subscription, and its
        plain ones: those of a broker's only bridge, or the status one of a bridge in a share
        group (shared subscriptions are not counted)."""
        own = 1 if self.config.shared_subscription else len(SUBSCRIBED_FILTERS)
        return self.config.broker_bridges * (1 + own)

    def _on_subscription_count(self, payload: bytes) -> None:
        try:
            count = int(payload)
        except ValueError:
            return
        self._set_demand(count > self.own_subscriptions)

    def _set_demand(self, demand: bool) -> None:
        was = self.counters.mirror_demand
        self.counters.mirror_demand = demand
        if not demand:
            self._no_reader_counted_at = time.monotonic()
        if demand == was:
            return
        log.info("%s: %s", self.config.broker,
                 "a reader subscribed: mirroring positions" if demand
                 else "no reader besides the bridges: mirroring presence only")
        self._demand = demand
        if self._mirror_consumer is not None:
            self._mirror_consumer.set_pace(0.0 if demand else MIRROR_IDLE_PACE_S)
        if demand:
            self._replay_held()

    def _replay_held(self) -> None:
        """The positions read since the last count that found no reader (it subscribed after
        that count), at most `MIRROR_REPLAY_S` old: a reader counted at the tick after it
        subscribed gets what was sent since it subscribed."""
        since = max(self._no_reader_counted_at - MIRROR_REPLAY_MARGIN_S,
                    time.monotonic() - MIRROR_REPLAY_S)
        own = self.config.broker_id
        for read_at, batch in self._held:
            if read_at < since:
                continue
            for event in batch.events():
                if event.kind is Kind.POSITION and event.origin != own:
                    self._republish(event)
                    self.counters.mirror_replayed += 1
        self._held.clear()

    def _hold(self, batch: Batch) -> None:
        """No reader: presence and worker events mirrored, positions held a while."""
        raw = batch.raw
        now = time.monotonic()
        held = self._held
        while held and held[0][0] < now - MIRROR_REPLAY_S:
            held.popleft()
        if _POSITION_MARK in raw:
            held.append((now, batch))
        if any(mark in raw for mark in _OTHER_MARKS):
            own = self.config.broker_id
            for event in batch.events():
                if event.kind is not Kind.POSITION and event.origin != own:
                    self._republish(event)

    async def _mirror(self) -> None:
        """Republish other brokers' messages into this broker, once per broker."""
        consumer = self.backend.consume(
            f"mirror-{self.config.broker_id}",
            self.config.client_id,
            start="latest",
            # A mirror is a live view: after a crash, resending old positions helps nobody.
            acknowledge=False,
        )
        wanted = self.config.mirror_teams
        self._mirror_consumer = consumer
        if not self._demand:
            consumer.set_pace(MIRROR_IDLE_PACE_S)
        async with consumer:
            async for item in consumer:
                batch = item.batch
                if wanted is not None and batch.team not in wanted:
                    continue
                if batch.all_from(self.config.broker_id):
                    continue  # this broker's own traffic (most of what it reads): not decoded
                if batch.all_from(NOTICE_ORIGIN):
                    continue  # the rules service's alert notices: for dashboards, not MQTT
                if not self._demand:
                    self._hold(batch)
                    continue
                for event in batch.events():
                    if event.origin != self.config.broker_id:
                        self._republish(event)

    def _republish(self, event: Event) -> None:
        if not self.counters.connected:
            self.counters.mirror_skipped_offline += 1
            return
        is_status = event.kind is Kind.STATUS
        topic = _TOPIC_OF_KIND[event.kind](event.team, event.worker)
        origin = (ORIGIN_PROPERTY, event.origin)
        writer = self._mirror_writer
        if event.qos == 0 and writer is not None:
            # Gathered, and written in one go once the batches at hand are done.
            writer.add(topic, event.body, retain=is_status, user_property=origin)
            if writer.pending >= MIRROR_FLUSH_PACKETS:
                self._flush_mirrored()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_mirrored)
            return
        self._flush_mirrored()  # what was gathered goes first: the broker keeps the order
        self._client.publish(
            topic, event.body, qos=event.qos, retain=is_status, user_property=origin
        )
        self.counters.mirrored += 1

    def _flush_mirrored(self) -> None:
        self._flush_scheduled = False
        writer = self._mirror_writer
        if writer is None or not writer.pending:
            return
        count = writer.pending
        if writer.flush():
            self.counters.mirrored += count
        else:
            self.counters.mirror_skipped_offline += count
