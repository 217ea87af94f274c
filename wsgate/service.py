"""The gateway: WebSocket clients in, one plain MQTT connection to the broker per client out.

Every limit holds before anything is buffered beyond a small, fixed amount per connection:

* a connection beyond `max_connections`, or beyond `max_connections_per_address` from one
  address (IPv6: its /64), is answered `503` and closed as soon as it is accepted;
* the upgrade request must arrive within `open_timeout_s` of the connection and take at most
  `max_handshake_bytes`; the path must be `/mqtt` or `/`, the subprotocol `mqtt` (or MQTT
  3.1's `mqttv3.1`); no extensions (no compression);
* a WebSocket message or frame may carry at most `max_message_bytes` (websockets' `max_size`,
  checked on the frame header, before its payload is read);
* each MQTT packet's announced size (`wsgate.mqtt_guard`) may be at most `max_packet_bytes`:
  a larger announcement closes the connection at once (1009) and nothing of the packet
  reaches the broker; the first packet must be a CONNECT and be complete within
  `open_timeout_s` of the connection;
* afterwards the client must send something within 1.5 times its MQTT keep alive (as MQTT
  asks of servers; `max_keepalive_s` when it asked for none or more), or it is closed;
* both directions are pipes without queues: the gateway reads from one side only after the
  other side's socket took the previous chunk (`drain`, at most `buffer_bytes` waiting), so a
  client that does not read stalls its own broker connection (the broker then queues or drops
  for it, as it would for a slow TCP client), and one that does not read for
  `write_timeout_s` is closed.

Per connection that is at most about `2 * buffer_bytes` + `max_message_bytes` + two socket
reads of `buffer_bytes` (about 300 KiB with the defaults), whatever the client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import CLOSED, CLOSING, OPEN
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from teamtrack.mqtt import BrokerAddress
from teamtrack.netlimits import LOOPBACK, address_key, plain_http_response

from .mqtt_guard import PacketGuard, PacketRefused

log = logging.getLogger(__name__)

PATHS: Final = frozenset({"/mqtt", "/"})
# MQTT 3.1.1 and 5 clients (MQTT.js, paho) ask for `mqtt`; MQTT 3.1 ones for `mqttv3.1`.
SUBPROTOCOLS: Final = (Subprotocol("mqtt"), Subprotocol("mqttv3.1"))
# A packet of a 65,536-byte payload (the brokers' message_size_limit) with a topic and
# properties of up to 1 KiB besides; the brokers' max_packet_size is the same.
DEFAULT_MAX_PACKET_BYTES: Final = 65_536 + 1_024
DEFAULT_BUFFER_BYTES: Final = 64 * 1024
# How long closing may wait for a client to take the last bytes before it is cut off.
CLOSE_GRACE_S: Final = 1.0
# Keep-alive rule of MQTT (3.1.1 section 3.1.2.10, 5 section 3.1.2.10).
KEEPALIVE_FACTOR: Final = 1.5

REASONS: Final = (
    "connection_cap",  # beyond max_connections
    "address_limit",  # beyond max_connections_per_address
    "handshake_timeout",  # no complete upgrade request within open_timeout_s
    "handshake_too_large",  # an upgrade request over max_handshake_bytes
    "bad_handshake",  # not a valid WebSocket upgrade (or no mqtt subprotocol)
    "not_found",  # a path other than /mqtt and /
    "broker_unavailable",  # the broker's MQTT port did not accept a connection
    "connect_timeout",  # no complete CONNECT within open_timeout_s
    "not_connect",  # the first MQTT packet was not a CONNECT
    "message_too_big",  # a WebSocket frame or message over max_message_bytes
    "packet_too_large",  # an MQTT packet announced over max_packet_bytes
    "malformed_packet",  # a remaining length of more than 4 bytes
    "text_frame",  # MQTT over WebSockets is binary
    "websocket_error",  # any other WebSocket protocol error
    "idle_timeout",  # silent for 1.5 times the MQTT keep alive
    "slow_client",  # did not take what the broker sent for write_timeout_s
)


@dataclass(frozen=True)
class GatewayConfig:
    broker: BrokerAddress
    host: str = LOOPBACK
    port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_connections: int = 1000
    max_connections_per_address: int = 50
    max_message_bytes: int = DEFAULT_MAX_PACKET_BYTES
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES
    max_handshake_bytes: int = 16 * 1024
    open_timeout_s: float = 10.0
    max_keepalive_s: int = 300
    write_timeout_s: float = 30.0
    broker_connect_timeout_s: float = 5.0
    buffer_bytes: int = DEFAULT_BUFFER_BYTES

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.max_connections < 1 or self.max_connections_per_address < 1:
            raise ValueError("connection limits must be at least 1")
        if min(self.max_message_bytes, self.max_packet_bytes, self.buffer_bytes) < 1024:
            raise ValueError("size limits must be at least 1024 bytes")

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


@dataclass
class GatewayCounters:
    accepted: int = 0
    upgraded: int = 0
    open: int = 0
    bytes_to_broker: int = 0
    bytes_to_client: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class _Refused(Exception):
    def __init__(self, reason: str, close_code: int = CloseCode.POLICY_VIOLATION) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


_OVER_CAP: Final = plain_http_response(503, "Service Unavailable")
_HEADERS_TOO_LARGE: Final = plain_http_response(431, "Request Header Fields Too Large")


class _Connection:
    """One client: its WebSocket protocol state, its broker connection and its MQTT guard."""

    def __init__(
        self,
        gateway: GatewayService,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        config = gateway.config
        self.gateway = gateway
        self.config = config
        self.counters = gateway.counters
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.open_deadline = self.loop.time() + config.open_timeout_s
        self.protocol = ServerProtocol(
            subprotocols=list(SUBPROTOCOLS), max_size=config.max_message_bytes
        )
        self.guard = PacketGuard(config.max_packet_bytes)
        self.broker_reader: asyncio.StreamReader | None = None
        self.broker_writer: asyncio.StreamWriter | None = None

    # Writing to the client -------------------------------------------------------------
    def flush(self) -> None:
        """Hand what the protocol has to send (pongs, close frames, data) to the socket."""
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    self.writer.write_eof()

    async def drain_client(self) -> None:
        try:
            async with asyncio.timeout(self.config.write_timeout_s):
                await self.writer.drain()
        except TimeoutError:
            raise _Refused("slow_client", CloseCode.TRY_AGAIN_LATER) from None

    # The connection's life ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if not await self.handshake():
                return
            self.counters.upgraded += 1
            await self.pipe()
        except _Refused as refused:
            self.counters.refused[refused.reason] += 1
            log.debug("closed %s: %s", self.writer.get_extra_info("peername"), refused.reason)
            if self.protocol.state is OPEN:
                self.protocol.fail(refused.close_code, refused.reason)
                self.flush()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client or the broker went away
        finally:
            await self.close()

    async def close(self) -> None:
        for writer in (self.broker_writer, self.writer):
            if writer is None:
                continue
            writer.close()
            try:
                async with asyncio.timeout(CLOSE_GRACE_S):
                    await writer.wait_closed()
            except (TimeoutError, OSError):
                writer.transport.abort()

    async def handshake(self) -> bool:
        """The upgrade, within the open deadline; True once the client got its 101 and the
        broker connection is open."""
        received = 0
        request: Request | None = None
        try:
            async with asyncio.timeout_at(self.open_deadline):
                while request is None:
                    data = await self.reader.read(self.config.buffer_bytes)
                    if not data:
                        return False
                    received += len(data)
                    if received > self.config.max_handshake_bytes:
                        self.writer.write(_HEADERS_TOO_LARGE)
                        raise _Refused("handshake_too_large")
                    self.protocol.receive_data(data)
                    for event in self.protocol.events_received():
                        if isinstance(event, Request):
                            request = event
                    if request is None and self.protocol.handshake_exc is not None:
                        self.flush()
                        raise _Refused("bad_handshake")
        except TimeoutError:
            raise _Refused("handshake_timeout") from None
        if request.path.partition("?")[0] not in PATHS:
            self.protocol.send_response(self.protocol.reject(404, "Not Found\n"))
            self.flush()
            raise _Refused("not_found")
        response = self.protocol.accept(request)
        if response.status_code != 101:
            self.protocol.send_response(response)
            self.flush()
            raise _Refused("bad_handshake")
        broker = self.config.broker
        try:
            async with asyncio.timeout(self.config.broker_connect_timeout_s):
                self.broker_reader, self.broker_writer = await asyncio.open_connection(
                    broker.host, broker.port, limit=self.config.buffer_bytes
                )
        except (OSError, TimeoutError):
            self.protocol.send_response(self.protocol.reject(502, "Broker unavailable\n"))
            self.flush()
            # One line per 10 s at most (teamtrack.logs), however many clients retry.
            log.error("the broker at %s does not accept connections", self.config.broker)
            raise _Refused("broker_unavailable") from None
        self.broker_writer.transport.set_write_buffer_limits(high=self.config.buffer_bytes)
        self.protocol.send_response(response)
        self.flush()
        return True

    async def pipe(self) -> None:
        tasks = [
            asyncio.create_task(self.client_to_broker()),
            asyncio.create_task(self.broker_to_client()),
        ]
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error

    async def client_to_broker(self) -> None:
        assert self.broker_writer is not None
        broker = self.broker_writer
        protocol, guard = self.protocol, self.guard
        try:
            async with asyncio.timeout_at(self.open_deadline) as deadline:
                while True:
                    data = await self.reader.read(self.config.buffer_bytes)
                    if not data:
                        protocol.receive_eof()
                        return
                    protocol.receive_data(data)
                    forwarded = 0
                    for event in protocol.events_received():
                        assert isinstance(event, Frame)
                        if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                            guard.feed(event.data)
                            broker.write(event.data)
                            forwarded += len(event.data)
                        elif event.opcode is Opcode.TEXT:
                            raise _Refused("text_frame", CloseCode.UNSUPPORTED_DATA)
                    self.flush()
                    error = protocol.parser_exc
                    if error is not None:
                        reason = "message_too_big" if isinstance(error, PayloadTooBig) else (
                            "websocket_error"
                        )
                        raise _Refused(reason, CloseCode.MESSAGE_TOO_BIG)
                    if protocol.state is CLOSING or protocol.state is CLOSED:
                        return
                    if forwarded:
                        self.counters.bytes_to_broker += forwarded
                        if guard.connected:
                            deadline.reschedule(self.loop.time() + self.idle_timeout_s())
                        await broker.drain()
        except PacketRefused as refused:
            raise _Refused(refused.reason, CloseCode.MESSAGE_TOO_BIG) from None
        except TimeoutError:
            raise _Refused("idle_timeout" if guard.connected else "connect_timeout") from None

    def idle_timeout_s(self) -> float:
        keepalive = self.guard.keepalive_s or self.config.max_keepalive_s
        return KEEPALIVE_FACTOR * min(keepalive, self.config.max_keepalive_s)

    async def broker_to_client(self) -> None:
        assert self.broker_reader is not None
        while True:
            data = await self.broker_reader.read(self.config.buffer_bytes)
            if not data:
                # The broker closed (it refused the login, or the client's DISCONNECT).
                if self.protocol.state is OPEN:
                    self.protocol.send_close(CloseCode.NORMAL_CLOSURE)
                    self.flush()
                return
            if self.protocol.state is not OPEN:
                return
            self.protocol.send_binary(data)
            self.flush()
            self.counters.bytes_to_client += len(data)
            await self.drain_client()


class GatewayService:
    """The gateway's server; `start()` binds, `stop()` closes it and every connection."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.counters = GatewayCounters()
        self._per_address: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        if registry is not None:
            registry.register(_GatewayCollector(self.counters))

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept,
            self.config.host,
            self.config.port,
            limit=self.config.buffer_bytes,
            ssl=self.config.ssl_context(),
            ssl_handshake_timeout=self.config.open_timeout_s if self.config.tls_cert else None,
            backlog=1024,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        key = address_key(peer[0] if peer else None)
        self.counters.accepted += 1
        reason = None
        if self.counters.open >= self.config.max_connections:
            reason = "connection_cap"
        elif self._per_address[key] >= self.config.max_connections_per_address:
            reason = "address_limit"
        if reason is not None:
            self.counters.refused[reason] += 1
            writer.write(_OVER_CAP)
            writer.close()
            with contextlib.suppress(OSError):
                async with asyncio.timeout(CLOSE_GRACE_S):
                    await writer.wait_closed()
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counters.open += 1
        self._per_address[key] += 1
        try:
            await _Connection(self, reader, writer).run()
        finally:
            self.counters.open -= 1
            self._per_address[key] -= 1
            if not self._per_address[key]:
                del self._per_address[key]
            self._tasks.discard(task)


class _GatewayCollector(Collector):
    def __init__(self, counters: GatewayCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters
        yield GaugeMetricFamily(
            "teamtrack_wsgate_connections", "WebSocket connections open now",
            value=counters.open,
        )
        yield CounterMetricFamily(
            "teamtrack_wsgate_accepted", "TCP connections accepted (refused ones included)",
            value=counters.accepted,
        )
        yield CounterMetricFamily(
            "teamtrack_wsgate_upgraded", "connections upgraded and piped to the broker",
            value=counters.upgraded,
        )
        refused = CounterMetricFamily(
            "teamtrack_wsgate_refused", "connections refused or closed by the gateway, by reason",
            labels=["reason"],
        )
        for reason in REASONS:
            refused.add_metric([reason], counters.refused[reason])
        yield refused
        moved = CounterMetricFamily(
            "teamtrack_wsgate_bytes", "MQTT bytes piped, by direction", labels=["direction"]
        )
        moved.add_metric(["to_broker"], counters.bytes_to_broker)
        moved.add_metric(["to_client"], counters.bytes_to_client)
        yield moved
