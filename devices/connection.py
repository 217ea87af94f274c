"""One simulated device's connection to the brokers: its state, gmqtt's client and store of
QoS 1 packets in flight as the simulator uses them, and a rate meter for the progress view."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable

from gmqtt import Client
from gmqtt.storage import PersistentStorage

from devices.failover import BrokerFailover, Disconnect
from devices.identities import DeviceIdentity
from devices.movement import Mover
from teamtrack.contract import position_topic, status_topic
from teamtrack.mqtt import BrokerAddress


class Phase(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    # Wanted online; the connection may be down for a while, gmqtt is then reconnecting.
    ONLINE = "online"
    STOPPING = "stopping"


class AckedStorage(PersistentStorage):  # type: ignore[misc]  # gmqtt ships no type information
    """gmqtt's store of the QoS 1 packets a client has in flight, telling the simulator of each
    PUBACK and of the packet id of the last publish (gmqtt's `publish` returns neither)."""

    def __init__(self, on_ack: Callable[[int], None]) -> None:
        super().__init__()
        self.on_ack = on_ack
        self.last_mid = 0

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self.on_ack(mid)

    async def wait_empty(self) -> None:
        """gmqtt's `connect()` waits here for what it replays to be acknowledged; the worker's
        outbox follows the acknowledgements instead, so a connection is up at its CONNACK
        (and a slow PUBACK of the `online` status is no connect timeout)."""
        return


class DeviceClient(Client):  # type: ignore[misc]  # gmqtt ships no type information
    """A gmqtt client for one connection: it never reconnects on its own.

    The simulator decides where and when a worker connects again (its failover rules) and uses
    a fresh client for it. gmqtt would reconnect to the same broker only, and a client that
    reconnects without a session present drops its unacknowledged QoS 1 packets and leaks
    their packet ids; the worker's own outbox keeps the positions instead.
    """

    async def reconnect(self, delay: bool = False) -> None:
        return


class Worker:
    __slots__ = (
        "client",
        "connected",
        "failover",
        "generation",
        "identity",
        "index",
        "inflight",
        "last_broker",
        "last_fix_at",
        "loss",
        "lost_at",
        "mover",
        "name",
        "pending",
        "phase",
        "position_topic",
        "reconnect_task",
        "retry_at",
        "seq",
        "status_topic",
        "storage",
        "unacked",
    )

    def __init__(
        self, index: int, identity: DeviceIdentity, failover: BrokerFailover, mover: Mover
    ) -> None:
        self.index = index
        self.identity = identity
        self.name = f"{identity.team}/{identity.worker}"
        self.failover = failover
        self.mover = mover
        self.position_topic = position_topic(identity.team, identity.worker)
        self.status_topic = status_topic(identity.team, identity.worker)
        self.client: DeviceClient | None = None
        self.storage: AckedStorage | None = None
        self.phase = Phase.IDLE
        # Whether the current client's connection is up (between CONNACK and its loss).
        self.connected = False
        # The broker of the last connection that got a CONNACK (None: never connected).
        self.last_broker: BrokerAddress | None = None
        # When the connection was lost and what the broker said (None: no DISCONNECT); a
        # CONNACK while lost_at is set is a reconnect.
        self.lost_at: float | None = None
        self.loss: Disconnect | None = None
        self.reconnect_task: asyncio.Task[None] | None = None
        # Bumped whenever the worker goes offline, so its stale heap entries are skipped.
        self.generation = 0
        self.seq = 0
        self.last_fix_at = 0.0
        self.retry_at = 0.0
        # QoS 1 outbox: seq -> payload until its PUBACK, in seq order; the seqs not yet sent on
        # the current connection (the broker's receive maximum holds them back, or they were
        # in flight on a connection that ended); packet id -> seq of what is in flight.
        self.unacked: dict[int, bytes] = {}
        self.pending: deque[int] = deque()
        self.inflight: dict[int, int] = {}

    @property
    def broker(self) -> BrokerAddress:
        return self.failover.broker


class RateMeter:
    """Messages per second over the last `window` seconds."""

    def __init__(self, window: float = 1.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> float:
        samples = self._samples
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= self._window:
            samples.popleft()
        first_time, first_total = samples[0]
        return (total - first_total) / (now - first_time) if now > first_time else 0.0
