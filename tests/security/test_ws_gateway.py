"""Attacks on MQTT over WebSockets: a real broker behind a real gateway (`python -m wsgate`).

Each attack was first played against the brokers' former WebSockets listener (Debian's Mosquitto
2.0.11, libwebsockets) with these same helpers; what it did there is in each test's docstring
("Before") and in docs/security.md. `-s` prints the figures measured now.

RSS is read from /proc (VmRSS now, VmHWM the peak since the process started).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
import pytest
import websockets
from conftest import Cluster, WsGateway
from websockets.asyncio.client import ClientConnection

from teamtrack.contract import position_topic
from teamtrack.local.servers import LOOPBACK

from .conftest import NOT_AUTHORIZED, ClientFactory, StartGateway

pytestmark = pytest.mark.security

MB: Final = 1_000_000
CONNECT_TYPE: Final = 0x10


def varint(value: int) -> bytes:
    """An MQTT remaining length."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def open_ws(port: int, host: str = LOOPBACK) -> ClientConnection:
    return await websockets.connect(
        f"ws://{host}:{port}/mqtt", subprotocols=[websockets.Subprotocol("mqtt")],
        compression=None, open_timeout=5, close_timeout=1, max_size=None,
    )


@dataclass
class Flood:
    sent: int
    seconds: float
    close_code: int | None


async def announce_huge_connect(
    port: int, announced: int = 200 * MB, total: int = 100 * MB, chunk: int = 16 * 1024
) -> Flood:
    """No login: a CONNECT whose header announces `announced` bytes, then `total` bytes of it
    in WebSocket messages of `chunk` bytes (each one under any message size limit)."""
    filler = b"\0" * chunk
    first = bytes([CONNECT_TYPE]) + varint(announced)
    socket_ = await open_ws(port)
    started = time.monotonic()
    sent = 0
    try:
        await socket_.send(first + filler[len(first):])
        sent += chunk
        while sent < total:
            await socket_.send(filler)
            sent += chunk
    except websockets.ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd is not None else None
        return Flood(sent, time.monotonic() - started, code)
    except OSError:
        return Flood(sent, time.monotonic() - started, None)
    finally:
        await socket_.close()
    return Flood(sent, time.monotonic() - started, None)


UPGRADE: Final = (
    "GET /mqtt HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: mqtt\r\n\r\n"
)


async def slowloris(
    port: int, connections: int, byte_every_s: float, limit_s: float
) -> list[float]:
    """`connections` upgrade requests, each sent one byte every `byte_every_s`; how long after
    its start the server closed each (`limit_s` for those still open then)."""
    request = UPGRADE.format(host=LOOPBACK, port=port).encode()

    async def one() -> float:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        started = time.monotonic()
        try:
            for index in range(len(request)):
                if time.monotonic() - started > limit_s:
                    return limit_s
                writer.write(request[index : index + 1])
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1024), byte_every_s) == b"":
                        return time.monotonic() - started
                except TimeoutError:
                    continue
            return limit_s
        except OSError:
            return time.monotonic() - started
        finally:
            writer.transport.abort()

    return list(await asyncio.gather(*(one() for _ in range(connections))))


async def idle_connections(
    port: int, count: int, host: str = LOOPBACK, source: str = LOOPBACK
) -> list[socket.socket]:
    """`count` TCP connections from `source` that send nothing."""
    opened = []
    for _ in range(count):
        connection = socket.socket()
        connection.bind((source, 0))
        connection.setblocking(False)
        await asyncio.get_running_loop().sock_connect(connection, (host, port))
        opened.append(connection)
    return opened


def still_open(connections: list[socket.socket]) -> tuple[int, list[bytes]]:
    """How many of `connections` the server has not closed, and what the closed ones got."""
    open_count, answers = 0, []
    for connection in connections:
        try:
            data = connection.recv(4096)
        except BlockingIOError:
            open_count += 1
            continue
        except OSError:
            answers.append(b"")
            continue
        answers.append(data)
    return open_count, answers


def position(seq: int, **extra: object) -> bytes:
    return orjson.dumps(
        {"lat": 52.52, "lon": 13.40, "ts": int(time.time() * 1000), "seq": seq, **extra}
    )


# The attacks ---------------------------------------------------------------------------------
async def test_a_connect_announcing_200_mb_is_cut_off_at_its_header(
    cluster: Cluster, ws_gateway: WsGateway
) -> None:
    """Before (the broker's WebSockets listener): all 100 MB were taken in 0.44 s, with no login,
    and the broker's peak RSS went from 11.0 to 108.6 MB. Now: closed at the header (the
    client got 0.3-1.5 MB into socket buffers before the close), nothing reaches the broker,
    neither process grows."""
    broker_pid, gateway_pid = cluster.brokers[0].process.pid, ws_gateway.process.pid
    broker_before, gateway_before = rss_kb(broker_pid), rss_kb(gateway_pid)

    floods = [await announce_huge_connect(ws_gateway.port) for _ in range(3)]
    await asyncio.sleep(0.3)
    broker_after, gateway_after = rss_kb(broker_pid), rss_kb(gateway_pid)

    print(f"\nfloods (sent bytes, s, close code): {floods}")
    print(f"broker RSS kB before {broker_before[0]} after {broker_after[0]} "
          f"peak {broker_after[1]}; gateway RSS kB before {gateway_before[0]} "
          f"after {gateway_after[0]} peak {gateway_after[1]}")
    for flood in floods:
        # What the loopback socket buffers took before the close arrived: never the 100 MB.
        assert flood.sent < 16 * MB, flood
        assert flood.seconds < 2.0, flood
        assert flood.close_code in (1009, None), flood
    assert ws_gateway.refused("packet_too_large") == 3
    assert broker_after[1] - broker_before[1] < 2_000, "the broker's peak RSS grew"
    assert gateway_after[1] - gateway_before[1] < 5_000, "the gateway's peak RSS grew"


async def test_a_1_mb_publish_over_websockets_is_refused_and_delivered_to_nobody(
    mqtt_client: ClientFactory, ws_gateway: WsGateway
) -> None:
    """Before: the broker read the whole 1 MB, then refused it (message_size_limit) and closed
    the connection. Now: the gateway closes the connection at the frame's header, before its
    payload is read; the manager next to it gets the next legitimate position and nothing
    else."""
    port = ws_gateway.port
    manager = mqtt_client("bravo-lead", port=port, transport="websockets")
    assert await asyncio.to_thread(manager.connect) == 0
    assert await asyncio.to_thread(manager.subscribe, "teams/bravo/#") == [1]
    attacker = mqtt_client("bravo.w001", port=port, transport="websockets")
    assert await asyncio.to_thread(attacker.connect) == 0
    topic = position_topic("bravo", "w001")
    outcome = await asyncio.to_thread(attacker.publish, topic, position(1, pad="x" * MB))

    legit = mqtt_client("bravo.w002", port=port, transport="websockets")
    assert await asyncio.to_thread(legit.connect) == 0
    sentinel = position(2)
    assert await asyncio.to_thread(legit.publish, position_topic("bravo", "w002"), sentinel) == 0
    seen = await asyncio.to_thread(manager.messages_until, sentinel)

    assert outcome is None, f"PUBACK {outcome}: not cut off"
    assert [len(body) for _topic, body in seen] == [len(sentinel)]
    assert ws_gateway.refused("message_too_big") == 1
    assert manager.disconnects == []


async def test_a_65536_byte_payload_still_goes_through_both_ways(
    mqtt_client: ClientFactory, ws_gateway: WsGateway
) -> None:
    """The brokers' message_size_limit is 65,536 bytes of payload: a publish of exactly that,
    over WebSockets, is accepted and delivered to a manager over WebSockets (before, the same)."""
    port = ws_gateway.port
    manager = mqtt_client("bravo-lead", port=port, transport="websockets")
    assert await asyncio.to_thread(manager.connect) == 0
    assert await asyncio.to_thread(manager.subscribe, "teams/bravo/#") == [1]
    device = mqtt_client("bravo.w001", port=port, transport="websockets")
    assert await asyncio.to_thread(device.connect) == 0
    payload = b"p" * 65_536
    assert await asyncio.to_thread(device.publish, position_topic("bravo", "w001"), payload) == 0
    seen = await asyncio.to_thread(manager.messages_until, payload)
    assert [len(body) for _topic, body in seen] == [65_536]
    # Over plain MQTT too (max_packet_size 66560: before, 65536 refused this packet).
    over_tcp = mqtt_client("bravo.w002")
    assert await asyncio.to_thread(over_tcp.connect) == 0
    other = b"q" * 65_536
    assert await asyncio.to_thread(over_tcp.publish, position_topic("bravo", "w002"), other) == 0
    seen = await asyncio.to_thread(manager.messages_until, other)
    assert [len(body) for _topic, body in seen] == [65_536]


async def test_a_manager_over_websockets_reads_their_team_and_not_another(
    mqtt_client: ClientFactory, ws_gateway: WsGateway
) -> None:
    """Authentication and the ACL stay the broker's: through the gateway, a manager reads
    their own team, is refused another team's (SUBACK 0x87), and an anonymous client and a
    wrong password are refused (as before, on the broker's own listener)."""
    port = ws_gateway.port
    manager = mqtt_client("bravo-lead", port=port, transport="websockets")
    assert await asyncio.to_thread(manager.connect) == 0
    assert await asyncio.to_thread(manager.subscribe, "teams/bravo/#") == [1]
    assert await asyncio.to_thread(manager.subscribe, "teams/alpha/#") == [NOT_AUTHORIZED]
    other = mqtt_client("alpha.w001")
    own = mqtt_client("bravo.w003")
    for client in (other, own):
        assert await asyncio.to_thread(client.connect) == 0
    secret = position(1)
    # 0x10: no matching subscribers (the manager of bravo could not subscribe to alpha).
    assert await asyncio.to_thread(other.publish, position_topic("alpha", "w001"), secret) == 0x10
    sentinel = position(2)
    assert await asyncio.to_thread(own.publish, position_topic("bravo", "w003"), sentinel) == 0
    seen = await asyncio.to_thread(manager.messages_until, sentinel)
    assert [topic for topic, _body in seen] == [position_topic("bravo", "w003")]

    anonymous = mqtt_client("bravo-lead", port=port, transport="websockets")
    anonymous.client.username_pw_set(None, None)
    wrong = mqtt_client("bravo-lead", port=port, transport="websockets")
    wrong.client.username_pw_set("bravo-lead", "not-the-password")
    assert await asyncio.to_thread(anonymous.connect) == NOT_AUTHORIZED
    assert await asyncio.to_thread(wrong.connect) in (NOT_AUTHORIZED, 0x86)


async def test_slowloris_upgrades_and_connects_are_closed_within_the_open_timeout(
    start_gateway: StartGateway, mqtt_client: ClientFactory
) -> None:
    """Before: 50 upgrade requests sent a byte every 0.25 s were closed after 9.9-10.1 s
    (libwebsockets' own timeout, which mosquitto.conf cannot set), but 10 connections that
    upgraded and sent 7 bytes of a 102-byte CONNECT were all still open after 20 s. Now: both
    are closed at the open timeout (2 s here, 10 s by default); a manager connects
    meanwhile."""
    gateway = start_gateway("--open-timeout-s", "2", "--max-connections-per-address", "100")
    attack = asyncio.create_task(slowloris(gateway.port, 50, 0.25, limit_s=8.0))
    await asyncio.sleep(0.5)
    manager = mqtt_client("bravo-lead", port=gateway.port, transport="websockets")
    assert await asyncio.to_thread(manager.connect) == 0
    closed_after = await attack
    print(f"\nslowloris closed after {min(closed_after):.2f}-{max(closed_after):.2f} s")
    assert max(closed_after) < 3.0, closed_after
    assert min(closed_after) > 1.5, closed_after
    assert gateway.refused("handshake_timeout") == 50

    # Upgraded, then a CONNECT that never completes (its header announces 100 bytes).
    sockets = [await open_ws(gateway.port) for _ in range(10)]
    started = time.monotonic()
    for socket_ in sockets:
        await socket_.send(bytes([CONNECT_TYPE]) + varint(100) + b"\0\4MQTT")
    await asyncio.gather(*(socket_.wait_closed() for socket_ in sockets))
    waited = time.monotonic() - started
    print(f"partial CONNECTs closed after {waited:.2f} s")
    assert waited < 2.5
    assert gateway.refused("connect_timeout") == 10
    assert manager.disconnects == []


async def test_connections_beyond_the_cap_are_refused_at_once(
    start_gateway: StartGateway, mqtt_client: ClientFactory
) -> None:
    """Before: no cap; 150 connections that sent nothing were all accepted and held (3.5 s later
    all 150 open; libwebsockets closed them after about 10 s). Now: beyond
    --max-connections (100 here, 1,000 by default) each gets 503 and is closed at once; beyond
    --max-connections-per-address (5 here, 50 by default) likewise, while other addresses are
    served; once the idle ones time out, managers are served again."""
    gateway = start_gateway(
        "--max-connections", "100", "--max-connections-per-address", "200",
        "--open-timeout-s", "3",
    )
    idle = await idle_connections(gateway.port, 150)
    await asyncio.sleep(0.5)
    open_count, answers = still_open(idle)
    print(f"\n150 idle connections: {open_count} held, {len(answers)} refused")
    assert open_count == 100
    assert all(answer.startswith(b"HTTP/1.1 503") for answer in answers), answers[:3]
    with pytest.raises(websockets.InvalidStatus) as refused:
        await open_ws(gateway.port)
    assert refused.value.response.status_code == 503
    assert gateway.refused("connection_cap") == 51
    await asyncio.sleep(3.0)  # the open timeout closes the idle ones
    assert still_open(idle)[0] == 0
    manager = mqtt_client("bravo-lead", port=gateway.port, transport="websockets")
    assert await asyncio.to_thread(manager.connect) == 0
    for connection in idle:
        connection.close()

    limited = start_gateway("--max-connections-per-address", "5")
    from_one = await idle_connections(limited.port, 6, source="127.0.0.2")
    await asyncio.sleep(0.3)
    open_count, answers = still_open(from_one)
    assert open_count == 5 and answers[0].startswith(b"HTTP/1.1 503"), answers
    other = await open_ws(limited.port, host=LOOPBACK)  # from 127.0.0.1: served
    await other.close()
    assert limited.refused("address_limit") == 1
    for connection in from_one:
        connection.close()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", f"subjectAltName=IP:{LOOPBACK},DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_wss_with_a_certificate_given_by_path(
    cluster: Cluster, start_gateway: StartGateway, mqtt_client: ClientFactory
) -> None:
    """--tls-cert/--tls-key serve wss://: a manager verifying the certificate reads their team;
    a plain ws:// client gets nothing."""
    cert, key = self_signed_certificate(cluster.state_dir)
    gateway = start_gateway("--tls-cert", str(cert), "--tls-key", str(key))
    manager = mqtt_client("bravo-lead", port=gateway.port, transport="websockets")
    manager.client.tls_set(ca_certs=str(cert))
    assert await asyncio.to_thread(manager.connect) == 0
    assert await asyncio.to_thread(manager.subscribe, "teams/bravo/#") == [1]
    device = mqtt_client("bravo.w001")
    assert await asyncio.to_thread(device.connect) == 0
    sentinel = position(1)
    assert await asyncio.to_thread(device.publish, position_topic("bravo", "w001"), sentinel) == 0
    assert await asyncio.to_thread(manager.messages_until, sentinel)
    with pytest.raises((websockets.InvalidMessage, OSError, TimeoutError)):
        await open_ws(gateway.port)
