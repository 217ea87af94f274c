"""`python -m teamtrack.bench.receiver`: the far side of a scenario, in a process of its own.

Two kinds, both recording (worker, seq) and the receive time of every position they get:

* `mqtt`: one gmqtt subscriber (the observer login) on a broker, `teams/+/workers/+/position`,
  the way `mosquitto_sub` watches a team;
* `websocket`: one WebSocket per team to a dashboard instance with the team manager's bearer
  token, reading `events` frames as a manager's browser does. Positions in `sync` frames (the
  newest of each worker, sent to a viewer that fell behind) are recorded apart, so that the
  positions they replaced count as shed by policy, not lost. A viewer the dashboard drops
  (close code 4008) or that loses its connection reconnects at once and starts over with a
  snapshot; what it missed meanwhile is lost, and the disconnect is counted.

Driven over stdin/stdout (see `teamtrack.bench.control`):

    config   {"kind": "mqtt", "broker_url", "username", "password", "qos", "workers"}
             {"kind": "websocket", "viewers": [[team, url, token], ...], "workers"}
             where "workers" is [[team, worker], ...] in worker-index order
    (ready is sent once subscribed, or once every viewer has its snapshot)
    collect  {"records", "synced"} -> collected {"recorded", "synced", "received", "disconnects",
                                                "gaps", "sync_frames", "unknown"}
    stop     -> stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Final

import orjson
import websockets
from gmqtt import Client, Subscription

from teamtrack.bench.control import emit, stdin_lines
from teamtrack.bench.records import RecordLog, message_key
from teamtrack.bench.system import raise_open_file_limit
from teamtrack.contract import position_topic
from teamtrack.mqtt import BrokerAddress
from teamtrack.runtime import run

log = logging.getLogger("teamtrack.bench.receiver")

POSITIONS_FILTER: Final = "teams/+/workers/+/position"
PROGRESS_INTERVAL_S: Final = 0.2
READY_TIMEOUT_S: Final = 60.0
RECONNECT_DELAY_S: Final = 0.2
# A frame holds up to 64 log entries and may pass 512 KiB (docs/protocol.md).
MAX_FRAME_BYTES: Final = 32 * 1024 * 1024


class Receiver(ABC):
    """What both kinds share: the records, the counters, and the collect/progress plumbing."""

    def __init__(self, workers: list[list[str]]) -> None:
        self.index_of: dict[tuple[str, str], int] = {
            (team, worker): index for index, (team, worker) in enumerate(workers)
        }
        self.records = RecordLog()
        self.synced = RecordLog()  # positions that came in sync frames
        self.received = 0  # since start, for the harness's drain check
        self.disconnects = 0
        self.gaps = 0
        self.sync_frames = 0
        self.unknown = 0

    @abstractmethod
    async def start(self) -> None:
        """Connect, and return once messages are being received."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect."""

    def collect(self, records: Path, synced: Path) -> dict[str, Any]:
        return {
            "recorded": self.records.write(records),
            "synced": self.synced.write(synced),
            "received": self.received,
            "disconnects": self.disconnects,
            "gaps": self.gaps,
            "sync_frames": self.sync_frames,
            "unknown": self.unknown,
        }

    async def report_progress(self) -> None:
        while True:
            emit("progress", received=self.received, disconnects=self.disconnects)
            await asyncio.sleep(PROGRESS_INTERVAL_S)


class MqttReceiver(Receiver):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config["workers"])
        self.broker = BrokerAddress.parse(config["broker_url"])
        self.qos = int(config.get("qos", 0))
        self.topic_index = {
            position_topic(team, worker): index for (team, worker), index in self.index_of.items()
        }
        self._subscribed = asyncio.Event()
        self._connected_once = False
        self._client = Client(f"bench-receiver-{time.time_ns()}", clean_session=True)
        self._client.set_auth_credentials(config["username"], config["password"])
        self._client.set_config({"reconnect_delay": 1})
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = lambda *_args: self._subscribed.set()

    async def start(self) -> None:
        await self._client.connect(self.broker.host, self.broker.port, keepalive=60)
        await asyncio.wait_for(self._subscribed.wait(), READY_TIMEOUT_S)

    def _on_connect(self, client: Client, *_args: Any) -> None:
        # On every connect: a reconnect starts a fresh session without the subscription.
        client.subscribe(Subscription(POSITIONS_FILTER, qos=self.qos))

    def _on_disconnect(self, *_args: Any) -> None:
        self.disconnects += 1

    def _on_message(
        self, client: Client, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        received_ns = time.monotonic_ns()
        self.received += 1
        index = self.topic_index.get(topic)
        if index is None:
            self.unknown += 1
            return 0
        self.records.add(message_key(index, orjson.loads(payload)["seq"]), received_ns)
        return 0

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 10)


class WebSocketReceiver(Receiver):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config["workers"])
        self.viewers: list[tuple[str, str, str]] = [
            (team, url, token) for team, url, token in config["viewers"]
        ]
        self._snapshots_pending = {team for team, _, _ in self.viewers}
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self) -> None:
        if not self.viewers:
            self._ready.set()
        for team, url, token in self.viewers:
            self._tasks.append(asyncio.create_task(self._watch(team, url, token)))
        await asyncio.wait_for(self._ready.wait(), READY_TIMEOUT_S)

    async def _watch(self, team: str, url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        while not self._closing:
            try:
                async with websockets.connect(
                    url, additional_headers=headers, max_size=MAX_FRAME_BYTES, open_timeout=30
                ) as socket:
                    async for frame in socket:
                        received_ns = time.monotonic_ns()
                        message = orjson.loads(frame)
                        kind = message.get("type")
                        if kind == "events":
                            self._record(team, message["events"], self.records, received_ns)
                        elif kind == "sync":
                            self.sync_frames += 1
                            self._record(team, message["events"], self.synced, received_ns)
                        elif kind == "snapshot":
                            self._snapshot_arrived(team)
                        elif kind == "gap":
                            self.gaps += 1
            except (OSError, websockets.WebSocketException) as error:
                if self._closing:
                    return
                log.warning("viewer of %s: %s: %s", team, type(error).__name__, error)
            if not self._closing:
                self.disconnects += 1
                await asyncio.sleep(RECONNECT_DELAY_S)

    def _record(
        self, team: str, events: list[dict[str, Any]], records: RecordLog, received_ns: int
    ) -> None:
        index_of = self.index_of
        for event in events:
            if event["k"] != "p":
                continue
            self.received += 1
            index = index_of.get((team, event["w"]))
            if index is None:
                self.unknown += 1
                continue
            records.add(message_key(index, event["p"]["seq"]), received_ns)

    def _snapshot_arrived(self, team: str) -> None:
        self._snapshots_pending.discard(team)
        if not self._snapshots_pending:
            self._ready.set()

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def build_receiver(config: dict[str, Any]) -> Receiver:
    kind = config.get("kind")
    if kind == "mqtt":
        return MqttReceiver(config)
    if kind == "websocket":
        return WebSocketReceiver(config)
    raise ValueError(f"unknown receiver kind {kind!r}")


async def serve() -> None:
    commands = stdin_lines()
    config = await anext(commands)
    receiver = build_receiver(config)
    progress: asyncio.Task[None] | None = None
    try:
        await receiver.start()
        progress = asyncio.create_task(receiver.report_progress())
        emit("ready")
        async for command in commands:
            match command["cmd"]:
                case "collect":
                    emit(
                        "collected",
                        **receiver.collect(Path(command["records"]), Path(command["synced"])),
                    )
                case "stop":
                    break
                case other:
                    emit("error", message=f"unknown command {other!r}")
    except Exception as error:
        emit("error", message=f"{type(error).__name__}: {error}")
        raise
    finally:
        if progress is not None:
            progress.cancel()
        await receiver.close()
    emit("stopped")


def main() -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    raise_open_file_limit()
    run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
