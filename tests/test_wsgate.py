"""The WebSockets gateway in-process (`wsgate`): its MQTT header guard, its timeouts and its
bounded pipes, against a stand-in broker that records what reaches it. The attacks against a
real broker are in tests/security/test_ws_gateway.py."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import websockets
from prometheus_client import CollectorRegistry, generate_latest

from teamtrack.local.servers import LOOPBACK
from teamtrack.mqtt import BrokerAddress
from teamtrack.settings import load_settings
from wsgate.mqtt_guard import PacketGuard, PacketRefused
from wsgate.service import GatewayConfig, GatewayService
from wsgate.settings import GatewaySettings


def connect_packet(keepalive: int, level: int = 5, name: bytes = b"MQTT") -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes([level, 0x02]) + keepalive.to_bytes(2, "big")
    body += b"\0" if level == 5 else b""
    body += b"\0\0"  # empty client id
    return bytes([0x10, len(body)]) + body


# The guard ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_the_guard_reads_headers_across_any_chunking(chunk: int) -> None:
    stream = connect_packet(45) + bytes([0x30, 0x80, 0x01]) + b"x" * 128 + bytes([0xC0, 0])
    guard = PacketGuard(1024)
    for start in range(0, len(stream), chunk):
        guard.feed(stream[start : start + chunk])
    assert (guard.packets, guard.connected, guard.keepalive_s) == (3, True, 45)


@pytest.mark.parametrize(
    ("packet", "keepalive"),
    [(connect_packet(60, level=4), 60), (connect_packet(7, level=3, name=b"MQIsdp"), 7)],
)
def test_the_guard_reads_the_keepalive_of_mqtt_3(packet: bytes, keepalive: int) -> None:
    guard = PacketGuard(1024)
    guard.feed(packet)
    assert guard.keepalive_s == keepalive


def test_the_guard_refuses_an_announced_size_over_the_limit_at_its_header() -> None:
    guard = PacketGuard(66_560)
    guard.feed(connect_packet(30))
    with pytest.raises(PacketRefused) as refused:
        # 200,000,000 bytes announced (4 varint bytes), refused before any byte of the body.
        guard.feed(bytes([0x30, 0x80, 0x84, 0xAF, 0x5F]))
    assert refused.value.reason == "packet_too_large"
    exact = PacketGuard(66_560)
    exact.feed(connect_packet(30))
    # 1 type byte + 3 length bytes + 66,556 = 66,560: allowed.
    exact.feed(bytes([0x30, 0xFC, 0x87, 0x04]))
    with pytest.raises(PacketRefused):
        PacketGuard(66_560).feed(bytes([0x10, 0xFD, 0x87, 0x04]))  # one byte more


def test_the_guard_refuses_a_first_packet_other_than_connect_and_long_varints() -> None:
    with pytest.raises(PacketRefused) as refused:
        PacketGuard(1024).feed(bytes([0x30, 0]))
    assert refused.value.reason == "not_connect"
    guard = PacketGuard(1 << 30)
    with pytest.raises(PacketRefused) as refused:
        guard.feed(bytes([0x10, 0x80, 0x80, 0x80, 0x80, 0x01]))
    assert refused.value.reason == "malformed_packet"


# The service against a stand-in broker ------------------------------------------------------
@dataclass
class StandInBroker:
    """Accepts connections, records what it reads; `send` is written to each client, as much
    as it will take (counted in `written`); `reading` False stops reading."""

    reading: bool = True
    send: int = 0
    received: bytearray = field(default_factory=bytearray)
    written: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"\x30" * 65_536
        try:
            while self.written < self.send:
                writer.write(chunk)
                await writer.drain()
                self.written += len(chunk)
            while self.reading and (data := await reader.read(65_536)):
                self.received += data
            if not self.reading:
                await asyncio.sleep(3600)
        except OSError:
            pass
        finally:
            self.closed.set()
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def broker() -> AsyncIterator[StandInBroker]:
    stand_in = StandInBroker()
    stand_in.server = await asyncio.start_server(stand_in.handle, LOOPBACK, 0)
    yield stand_in
    stand_in.server.close()


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayService]]:
    started: list[GatewayService] = []
    yield started
    for service in started:
        await service.stop()


async def start(
    broker: StandInBroker, started: list[GatewayService], **options: object
) -> GatewayService:
    config = GatewayConfig(broker=BrokerAddress(LOOPBACK, broker.port), **options)  # type: ignore[arg-type]
    service = GatewayService(config, CollectorRegistry())
    await service.start()
    started.append(service)
    return service


async def connect(service: GatewayService) -> websockets.ClientConnection:
    return await websockets.connect(
        f"ws://{LOOPBACK}:{service.port}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")],
        open_timeout=5, close_timeout=1,
    )


async def test_bytes_pass_both_ways_and_are_counted(
    broker: StandInBroker, gateways: list[GatewayService]
) -> None:
    broker.send = 65_536
    service = await start(broker, gateways)
    client = await connect(service)
    packet = connect_packet(30)
    await client.send(packet[:5])
    await client.send(packet[5:] + bytes([0xC0, 0]))
    got = 0
    while got < 65_536:
        message = await asyncio.wait_for(client.recv(), 2)
        assert isinstance(message, bytes)
        got += len(message)
    while len(broker.received) < len(packet) + 2:
        await asyncio.sleep(0.01)
    assert bytes(broker.received) == packet + bytes([0xC0, 0])
    await client.close()
    assert service.counters.bytes_to_broker == len(packet) + 2
    assert service.counters.bytes_to_client == got == 65_536
    assert (service.counters.accepted, service.counters.upgraded) == (1, 1)


async def test_a_client_that_goes_silent_is_closed_at_one_and_a_half_keepalives(
    broker: StandInBroker, gateways: list[GatewayService]
) -> None:
    service = await start(broker, gateways)
    client = await connect(service)
    await client.send(connect_packet(1))
    started = time.monotonic()
    await asyncio.wait_for(client.wait_closed(), 5)
    assert 1.4 < time.monotonic() - started < 2.5
    assert service.counters.refused["idle_timeout"] == 1
    await asyncio.wait_for(broker.closed.wait(), 2)


async def test_a_client_that_does_not_read_stalls_the_broker_and_is_closed(
    broker: StandInBroker, gateways: list[GatewayService]
) -> None:
    """Nothing is queued for a client that does not read: the broker's writes stall once the
    socket buffers are full, and the client is closed after write_timeout_s."""
    broker.send = 200 * 1024 * 1024
    service = await start(broker, gateways, write_timeout_s=1.0)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((LOOPBACK, service.port))
    client.sendall(
        f"GET /mqtt HTTP/1.1\r\nHost: {LOOPBACK}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mqtt\r\n\r\n".encode()
    )
    await asyncio.sleep(0.5)
    stalled_at = broker.written
    await asyncio.sleep(0.3)
    assert broker.written == stalled_at, "the broker's writes did not stall"
    # Socket buffers on both legs (the kernel's, up to a few MB on loopback), not the gateway's.
    assert stalled_at < 16 * 1024 * 1024
    await asyncio.wait_for(broker.closed.wait(), 3)
    assert service.counters.refused["slow_client"] == 1
    client.close()


async def test_a_broker_that_does_not_read_stalls_the_client(
    broker: StandInBroker, gateways: list[GatewayService]
) -> None:
    broker.reading = False
    service = await start(broker, gateways)
    client = await connect(service)
    await client.send(connect_packet(300))
    sent = 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5):
            while True:
                await client.send(bytes([0x30, 0xFF, 0x7F]) + b"\0" * 16_383)
                sent += 16_386
    assert sent < 16 * 1024 * 1024, "the gateway kept reading from the client"
    client.transport.abort()


async def test_a_broker_that_is_down_is_answered_502(
    broker: StandInBroker, gateways: list[GatewayService]
) -> None:
    service = await start(broker, gateways)
    assert broker.server is not None
    broker.server.close()
    await broker.server.wait_closed()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(service)
    assert refused.value.response.status_code == 502
    assert service.counters.refused["broker_unavailable"] == 1


async def test_wrong_paths_subprotocols_and_text_frames_are_refused(
    broker: StandInBroker, gateways: list[GatewayService]
) -> None:
    service = await start(broker, gateways)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            f"ws://{LOOPBACK}:{service.port}/other", subprotocols=[websockets.Subprotocol("mqtt")]
        )
    assert refused.value.response.status_code == 404
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(f"ws://{LOOPBACK}:{service.port}/mqtt")
    root = await websockets.connect(
        f"ws://{LOOPBACK}:{service.port}/", subprotocols=[websockets.Subprotocol("mqtt")]
    )
    await root.send("text")
    await asyncio.wait_for(root.wait_closed(), 2)
    assert root.close_code == 1003
    assert dict(service.counters.refused) == {"not_found": 1, "bad_handshake": 1, "text_frame": 1}


def test_settings_and_metrics(broker: StandInBroker) -> None:
    settings = load_settings(
        GatewaySettings, "python -m wsgate",
        ["--broker-url", "mqtt://127.0.0.1:1884", "--port", "9002", "--max-connections", "10"],
    )
    config = settings.gateway_config()
    assert (config.broker.port, config.port, config.max_connections) == (1884, 9002, 10)
    assert config.host == "127.0.0.1"
    with pytest.raises(ValueError, match="plain mqtt"):
        load_settings(GatewaySettings, "wsgate", ["--broker-url", "ws://x:1"]).gateway_config()
    with pytest.raises(ValueError, match="go together"):
        load_settings(GatewaySettings, "wsgate", ["--tls-cert", "c.pem"]).gateway_config()
    registry = CollectorRegistry()
    service = GatewayService(config, registry)
    service.counters.refused["packet_too_large"] += 2
    page = generate_latest(registry).decode()
    assert 'teamtrack_wsgate_refused_total{reason="packet_too_large"} 2.0' in page
    assert 'teamtrack_wsgate_bytes_total{direction="to_broker"} 0.0' in page
    assert "teamtrack_wsgate_connections 0.0" in page
