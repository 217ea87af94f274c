"""The live socket on a real uvicorn server over Redis: a viewer that stops reading.

The server runs in the test's own event loop, so the test can look at what the hub holds for
each viewer while the kernel's and uvicorn's buffers fill up for real.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import uvicorn
import websockets
from backend_contract import position
from prometheus_client import CollectorRegistry
from test_dashboard_api import bearer, write_auth_file

from dashboard.app import create_app
from dashboard.auth import Authenticator, ManagerDirectory
from dashboard.hub import TeamHub, ViewerLimits
from dashboard.watchdog import Watchdog
from teamtrack.backends import Backend, from_url
from teamtrack.local.servers import LOOPBACK, free_port

WAIT = 10.0
STUCK_AFTER_S = 3.0
QUEUE_BYTES = 256 * 1024
WORKERS = [f"w{index:03d}" for index in range(200)]


@dataclass
class Server:
    port: int
    hub: TeamHub
    registry: CollectorRegistry

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0


@pytest.fixture
async def server(redis_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    authenticator = Authenticator(
        ManagerDirectory.load(write_auth_file(tmp_path / "auth.json")), "secret", 3600
    )
    registry = CollectorRegistry()
    app = create_app(
        from_url(redis_url),
        authenticator,
        instance_id="slow-test",
        registry=registry,
        viewer_limits=ViewerLimits(queue_batches=64, queue_bytes=QUEUE_BYTES),
        stuck_after_s=STUCK_AFTER_S,
    )
    port = free_port()
    config = uvicorn.Config(
        app, host=LOOPBACK, port=port, ws="websockets-sansio", log_level="warning"
    )
    uvicorn_server = uvicorn.Server(config)
    serving = asyncio.create_task(uvicorn_server.serve())
    while not uvicorn_server.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield Server(port, app.state.hub, registry)
    finally:
        uvicorn_server.should_exit = True
        await asyncio.wait_for(serving, WAIT)


async def open_stuck_socket(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again."""
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, so that the server's side fills up soon.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, (LOOPBACK, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws/teams/alpha HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: {bearer()['Authorization']}\r\n\r\n"
    )
    await loop.sock_sendall(client, request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += await loop.sock_recv(client, 1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return client


async def test_slow_reader_is_conflated_then_closed_while_others_keep_their_latency(
    server: Server, redis_url: str
) -> None:
    bridge: Backend = from_url(redis_url)
    await bridge.start()
    stuck = await open_stuck_socket(server.port)
    delays_ms: list[float] = []
    seqs: dict[str, list[int]] = {}
    rounds = 300
    try:
        async with websockets.connect(
            f"ws://{LOOPBACK}:{server.port}/ws/teams/alpha",
            additional_headers=bearer(),
            max_size=None,
        ) as normal:
            assert orjson.loads(await normal.recv())["type"] == "snapshot"

            async def read_normally() -> None:
                while any(len(seqs.get(w, [])) < rounds for w in WORKERS):
                    frame = orjson.loads(await asyncio.wait_for(normal.recv(), WAIT))
                    now = time.time() * 1000
                    for event in frame["events"]:
                        delays_ms.append(now - event["rx"])
                        seqs.setdefault(event["w"], []).append(event["p"]["seq"])

            reader = asyncio.create_task(read_normally())
            largest_held = 0
            stuck_viewer_synced = False
            for seq in range(rounds):
                # ~23 KB per batch, 100 batches a second: the stuck socket's buffers fill fast.
                await bridge.publish([position("alpha", w, seq) for w in WORKERS])
                for viewer in server.hub.viewers("alpha"):
                    largest_held = max(largest_held, viewer.held_bytes)
                    stuck_viewer_synced |= viewer.syncing
                await asyncio.sleep(0.01)
            await asyncio.wait_for(reader, WAIT)

            # Everything, in order, once, and soon, for the viewer that reads.
            assert seqs == {w: list(range(rounds)) for w in WORKERS}
            delays_ms.sort()
            p99 = delays_ms[int(len(delays_ms) * 0.99)]
            assert p99 < 500, f"p99 delay {p99:.0f} ms"

            # The stuck one held at most its queue, then the latest position per worker.
            assert stuck_viewer_synced
            assert largest_held <= QUEUE_BYTES + len(WORKERS) * 200 + 64 * 1024
            assert server.metric("teamtrack_dashboard_viewer_conflations_total") >= 1

            # And it is closed once its socket took nothing for STUCK_AFTER_S.
            deadline = time.monotonic() + STUCK_AFTER_S + WAIT
            while server.hub.viewer_count("alpha") > 1:
                assert time.monotonic() < deadline, "the stuck viewer was never closed"
                await asyncio.sleep(0.1)
            assert server.metric("teamtrack_dashboard_viewers_disconnected_slow_total") == 1
            # The viewer that reads was never touched.
            await bridge.publish([position("alpha", "w000", rounds)])
            frame = orjson.loads(await asyncio.wait_for(normal.recv(), WAIT))
            assert frame["events"][0]["p"]["seq"] == rounds
    finally:
        stuck.close()
        await bridge.close()


async def test_watchdog_times_each_send_not_the_connection() -> None:
    """Many quick sends never trip it; one send that waits `stuck_after_s` does."""
    watchdog = Watchdog(0.2)
    clock = watchdog.clock

    async def slow_but_moving() -> None:
        for _ in range(6):
            watchdog.sending_since = clock()
            await asyncio.sleep(0.1)
            watchdog.sending_since = None
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(slow_but_moving())
    watchdog.watch(sender)
    await asyncio.wait_for(sender, WAIT)
    watchdog.stop()
    assert not watchdog.fired

    watchdog = Watchdog(0.2)
    stuck = asyncio.get_running_loop().create_future()

    async def never_accepted() -> None:
        watchdog.sending_since = watchdog.clock()
        await stuck

    started = time.monotonic()
    sender = asyncio.create_task(never_accepted())
    watchdog.watch(sender)
    await asyncio.wait({sender}, timeout=WAIT)
    assert sender.cancelled() and watchdog.fired
    assert 0.2 <= time.monotonic() - started < 1.0
