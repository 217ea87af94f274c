"""`GET /sse/teams/{team}`: the live view as Server-Sent Events, on real uvicorn servers over Redis.

The servers run in the test's own event loop with the HTTP protocol `python -m dashboard` uses
(teamtrack/http_guard.py), as in test_dashboard_live.py, so that a test can look at what the
hub holds while a client reads slowly, and at how a stream ends. Three clients read the streams:
a line parser as a curl user writes one, httpx-sse, and curl itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import websockets
from backend_contract import position, status
from fastapi import FastAPI
from httpx_sse import ServerSentEvent, aconnect_sse
from prometheus_client import CollectorRegistry
from test_dashboard_api import TOKEN, bearer, write_auth_file

from dashboard.app import create_app
from dashboard.auth import SESSION_COOKIE, Authenticator, Manager, ManagerDirectory
from dashboard.frames import (
    events_frame,
    frame_head,
    gap_frame,
    resume_frame,
    snapshot_frame,
    sync_frame,
)
from dashboard.hub import ViewerLimits
from dashboard.sse import RETRY_MS, encode_event
from teamtrack.backends import Backend, Batch, Snapshot, from_url
from teamtrack.http_guard import guarded_http_protocol
from teamtrack.local.servers import LOOPBACK, free_port
from teamtrack.passwords import hash_password, token_digest

WAIT = 10.0
HEARTBEAT_S = 0.3
STUCK_AFTER_S = 3.0
REVOCATION_POLL_S = 0.2
QUEUE_BYTES = 256 * 1024
WORKERS = [f"w{index:03d}" for index in range(200)]
SECRET = "shared-session-secret"


# Servers -----------------------------------------------------------------------------------------
@dataclass
class Instance:
    """One dashboard on a real uvicorn server in this loop."""

    port: int
    app: FastAPI
    registry: CollectorRegistry
    server: uvicorn.Server
    serving: asyncio.Task[None]

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(asyncio.shield(self.serving), WAIT)


StartDashboard = Callable[..., Awaitable[Instance]]


@dataclass
class Deployment:
    """Dashboards that share one Redis backend, one auth file and one session secret."""

    redis_url: str
    auth_file: Path
    start: StartDashboard
    instances: list[Instance] = field(default_factory=list)

    def cookie(self) -> dict[str, str]:
        """A session cookie of alice's, as `POST /login` would have set it (no scrypt here)."""
        authenticator = Authenticator(ManagerDirectory.load(self.auth_file), SECRET, 3600)
        session = authenticator.issue_session(Manager("alice", "alpha"))
        return {"Cookie": f"{SESSION_COOKIE}={session}"}


@pytest.fixture
async def deployment(redis_url: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    auth_file = write_auth_file(tmp_path / "dashboard-auth.json")
    started: list[Instance] = []

    async def start(
        *, viewer_limits: ViewerLimits | None = None, max_connections: int | None = None
    ) -> Instance:
        registry = CollectorRegistry()
        app = create_app(
            from_url(redis_url),
            Authenticator(ManagerDirectory.load(auth_file), SECRET, 3600),
            instance_id=f"sse-{len(started)}",
            registry=registry,
            viewer_limits=viewer_limits,
            stuck_after_s=STUCK_AFTER_S,
            auth_file=auth_file,
            revocation_poll_s=REVOCATION_POLL_S,
            sse_heartbeat_s=HEARTBEAT_S,
        )
        port = free_port()
        config = uvicorn.Config(
            app, host=LOOPBACK, port=port, ws="websockets-sansio", log_level="warning",
            http=guarded_http_protocol(), limit_concurrency=max_connections,
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.02)
        instance = Instance(port, app, registry, server, serving)
        started.append(instance)
        return instance

    running = Deployment(redis_url, auth_file, start, started)
    try:
        yield running
    finally:
        for instance in started:
            if not instance.serving.done():
                await instance.stop()


@pytest.fixture
async def bridge(redis_url: str) -> AsyncIterator[Backend]:
    """Writes into the backend as a bridge would."""
    backend = from_url(redis_url)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


# Clients -----------------------------------------------------------------------------------------
@dataclass
class Event:
    data: str
    # This event's own `id` field (None: it had none, and the last one stays in force).
    id: str | None

    @property
    def frame(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.data)
        return parsed


class LineReader:
    """The SSE wire format read line by line, as a curl user's script reads it: `field: value`
    lines, `:` comments, a blank line ends an event. Reads in a task of its own, so that a test
    can wait for an event with a timeout without breaking the line iterator."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self.comments: list[str] = []
        self.retry: int | None = None
        self.last_event_id: str | None = None
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._read(lines))

    async def _read(self, lines: AsyncIterator[str]) -> None:
        data: list[str] = []
        event_id: str | None = None
        try:
            async for line in lines:
                if not line:
                    if data:
                        self._events.put_nowait(Event("\n".join(data), event_id))
                    data, event_id = [], None
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = self.last_event_id = value
                elif name == "retry":
                    self.retry = int(value)
        finally:
            self._events.put_nowait(None)

    async def next(self, timeout: float = WAIT) -> Event:
        event = await asyncio.wait_for(self._events.get(), timeout)
        assert event is not None, "the stream ended"
        return event

    async def until_end(self, timeout: float = WAIT) -> list[Event]:
        """The events left until the server ends the stream."""
        events = []
        while (event := await asyncio.wait_for(self._events.get(), timeout)) is not None:
            events.append(event)
        return events

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


@contextlib.asynccontextmanager
async def open_stream(
    url: str, headers: dict[str, str], *, expect: int = 200
) -> AsyncIterator[tuple[httpx.Response, LineReader]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as client, client.stream(
        "GET", url, headers=headers
    ) as response:
        assert response.status_code == expect, response.status_code
        reader = LineReader(response.aiter_lines())
        try:
            yield response, reader
        finally:
            await reader.close()


async def positions(reader: LineReader, count: int) -> list[tuple[Event, dict[str, Any]]]:
    """Events frames until they held `count` positions: each with its frame."""
    got: list[tuple[Event, dict[str, Any]]] = []
    seen = 0
    while seen < count:
        event = await reader.next()
        frame = event.frame
        assert frame["type"] == "events", frame
        got.append((event, frame))
        seen += sum(1 for item in frame["events"] if item["k"] == "p")
    return got


def seqs_of(frames: list[tuple[Event, dict[str, Any]]], worker: str = "w1") -> list[int]:
    return [
        item["p"]["seq"]
        for _, frame in frames
        for item in frame["events"]
        if item["k"] == "p" and item["w"] == worker
    ]


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


# The wire format ---------------------------------------------------------------------------------
def test_frame_head_reads_type_and_cursor_of_every_frame() -> None:
    snapshot = Snapshot("alpha", "17-0", {}, {})
    batch = Batch("alpha", "18-0", b'[{"w":"w1","k":"s","o":"b1","rx":1,"q":1,"p":"online"}]')
    assert frame_head(snapshot_frame(snapshot, 5)) == ("snapshot", "17-0")
    assert frame_head(resume_frame("alpha", "3:41", 5)) == ("resume", "3:41")
    assert frame_head(events_frame("alpha", [batch])) == ("events", "18-0")
    assert frame_head(sync_frame("alpha", "19-0", [], 5)) == ("sync", "19-0")
    assert frame_head(gap_frame("alpha", 'odd "cursor"\n')) == ("gap", 'odd "cursor"\n')
    assert frame_head('{"type":"pong"}') == ("pong", None)


def test_each_frame_is_one_event_with_the_cursor_to_resume_from() -> None:
    batch = Batch("alpha", "18-0", b'[{"w":"w1","k":"s","o":"b1","rx":1,"q":1,"p":"online"}]')
    frame = events_frame("alpha", [batch])
    assert encode_event(frame) == f"id: 18-0\ndata: {frame}\n\n".encode()
    # A gap's cursor is the one that could not be honoured: never one to resume from.
    gap = gap_frame("alpha", "5-0")
    assert encode_event(gap) == f"data: {gap}\n\n".encode()
    # Device payloads are embedded as sent: JSON whitespace may hold line breaks, which the
    # format would take for the end of the data. Each line gets its own `data:` field, and a
    # client joins them with "\n": the same JSON.
    multiline = (
        '{"type":"sync","team":"alpha","cursor":"9-0","now":1,"events":[{"p":{\r\n"a":1,\r"b":2}}]}'
    )
    encoded = encode_event(multiline).decode()
    assert encoded.startswith("id: 9-0\ndata: ")
    assert "\r" not in encoded and encoded.endswith("\n\n")
    data = "\n".join(
        line.removeprefix("data: ") for line in encoded.split("\n") if line.startswith("data: ")
    )
    assert orjson.loads(data) == orjson.loads(multiline)


# Streams -----------------------------------------------------------------------------------------
async def test_sse_sends_the_websocket_frames_as_events_with_resume_ids(
    deployment: Deployment, bridge: Backend
) -> None:
    one = await deployment.start()
    await bridge.publish([position("alpha", "w1", 0)])
    async with open_stream(one.url("/sse/teams/alpha"), bearer()) as (response, reader):
        headers = response.headers
        assert headers["content-type"].split(";")[0] == "text/event-stream"
        assert headers["cache-control"] == "no-store"
        assert headers["x-accel-buffering"] == "no"
        assert headers["x-content-type-options"] == "nosniff"
        assert "default-src 'none'" in headers["content-security-policy"]
        snapshot = await reader.next()
        # The reconnection delay comes before the first event.
        assert reader.retry == RETRY_MS
        frame = snapshot.frame
        assert frame["type"] == "snapshot" and frame["team"] == "alpha"
        assert snapshot.id == frame["cursor"]
        assert [worker["position"]["seq"] for worker in frame["workers"]] == [0]
        assert one.metric("teamtrack_dashboard_live_connections", {"transport": "sse"}) == 1

        async with websockets.connect(
            one.url("/ws/teams/alpha").replace("http://", "ws://"), additional_headers=bearer()
        ) as socket:
            assert orjson.loads(await socket.recv())["type"] == "snapshot"
            assert one.metric("teamtrack_dashboard_live_connections", {"transport": "ws"}) == 1
            for seq in range(1, 6):
                # Another team's events in between: never on alpha's stream.
                await bridge.publish([position("bravo", "w1", seq)])
                await bridge.publish(
                    [position("alpha", "w1", seq), status("alpha", "w2", "online")]
                )
            frames = await positions(reader, 5)
            ws_events: list[Any] = []
            while len(ws_events) < 10:
                ws_events += orjson.loads(await asyncio.wait_for(socket.recv(), WAIT))["events"]
        assert seqs_of(frames) == [1, 2, 3, 4, 5]
        for event, frame in frames:
            assert frame["team"] == "alpha" and event.id == frame["cursor"]
        # The same events, byte for byte, as the WebSocket's.
        assert [item for _, frame in frames for item in frame["events"]] == ws_events
        assert one.metric("teamtrack_dashboard_frames_sent_total") >= len(frames) + 1

        # An idle stream carries comments, so that proxies keep it open and a dead client is
        # found out by the writes.
        comments = len(reader.comments)
        await asyncio.sleep(HEARTBEAT_S * 4)
        assert len(reader.comments) - comments >= 2 and set(reader.comments) == {"ping"}
    await until(
        lambda: one.metric("teamtrack_dashboard_live_connections", {"transport": "sse"}) == 0,
        "the closed stream is no longer counted",
    )
    await until(lambda: one.app.state.hub.viewer_count("alpha") == 0, "the viewer has left")


async def test_python_sse_client_reads_the_stream(deployment: Deployment, bridge: Backend) -> None:
    """httpx-sse, a parser of someone else's: every event is a frame, none is empty."""
    one = await deployment.start()
    received: list[ServerSentEvent] = []

    async def read(count: int) -> None:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(WAIT, read=None)
        ) as client, aconnect_sse(
            client, "GET", one.url("/sse/teams/alpha"), headers=bearer()
        ) as source:
            async for event in source.aiter_sse():
                received.append(event)
                if event.data and orjson.loads(event.data)["type"] == "snapshot":
                    for seq in range(3):
                        await bridge.publish([position("alpha", "w1", seq)])
                if sum(1 for e in received if '"k":"p"' in e.data) >= count:
                    return

    await asyncio.wait_for(read(3), WAIT)
    assert all(event.data for event in received), "an empty event (a heartbeat taken for one?)"
    assert received[0].retry == RETRY_MS
    frames = [orjson.loads(event.data) for event in received]
    assert frames[0]["type"] == "snapshot"
    assert all(frame["type"] == "events" for frame in frames[1:])
    assert [event.id for event in received] == [frame["cursor"] for frame in frames]
    assert [e["p"]["seq"] for frame in frames[1:] for e in frame["events"]] == [0, 1, 2]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_reads_the_stream(
    deployment: Deployment, bridge: Backend, tmp_path: Path
) -> None:
    """`curl -N -H @file`: the token is read from a file, never put on a command line."""
    one = await deployment.start()
    header_file = tmp_path / "headers"
    header_file.touch(mode=0o600)
    header_file.write_text(f"Authorization: Bearer {TOKEN}\n")
    argv = [
        "curl", "-N", "-sS", "--max-time", str(int(WAIT)), "-H", f"@{header_file}",
        one.url("/sse/teams/alpha"),
    ]
    assert TOKEN not in " ".join(argv)
    curl = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )

    async def lines() -> AsyncIterator[str]:
        assert curl.stdout is not None
        while line := await curl.stdout.readline():
            yield line.decode().rstrip("\n")

    reader = LineReader(lines())
    try:
        snapshot = await reader.next()
        assert snapshot.frame["type"] == "snapshot" and snapshot.id == snapshot.frame["cursor"]
        for seq in range(3):
            await bridge.publish([position("alpha", "w1", seq)])
        frames = await positions(reader, 3)
        assert seqs_of(frames) == [0, 1, 2]
        assert frames[-1][0].id == frames[-1][1]["cursor"]
    finally:
        await reader.close()
        with contextlib.suppress(ProcessLookupError):
            curl.terminate()
        await curl.wait()


# Resuming ----------------------------------------------------------------------------------------
async def test_last_event_id_resumes_on_the_other_instance_without_gap_or_duplicate(
    deployment: Deployment, bridge: Backend
) -> None:
    first, second = await deployment.start(), await deployment.start()
    url = "/sse/teams/alpha"
    async with open_stream(first.url(url), bearer()) as (_, reader):
        assert (await reader.next()).frame["type"] == "snapshot"

        async def publish(seqs: range) -> None:
            for seq in seqs:
                await bridge.publish([position("alpha", "w1", seq)])
                await asyncio.sleep(0.005)

        publishing = asyncio.create_task(publish(range(40)))
        # Part of them, then the connection drops (whatever was in flight is lost with it).
        on_first = await positions(reader, 10)
        last_id = reader.last_event_id
        assert last_id == on_first[-1][1]["cursor"]
    await publishing
    await publish(range(40, 60))  # while disconnected

    headers = {**bearer(), "Last-Event-ID": str(last_id)}
    async with open_stream(second.url(url), headers) as (_, reader):
        resumed = await reader.next()
        assert resumed.frame["type"] == "resume" and resumed.frame["cursor"] == last_id
        assert resumed.id == last_id
        publishing = asyncio.create_task(publish(range(60, 70)))  # and live again
        seen = seqs_of(on_first)
        on_second = await positions(reader, 70 - seen[-1] - 1)
        await publishing
    assert seen + seqs_of(on_second) == list(range(70)), "a position missing or repeated"
    assert second.metric("teamtrack_dashboard_resumes_total", {"outcome": "replayed"}) == 1

    # `?after=` for clients that cannot set headers; a reconnecting EventSource keeps its URL,
    # so the header, which it updates, wins over a stale `?after=`.
    newest = on_second[-1][1]["cursor"]
    await publish(range(70, 72))
    stale = f"{url}?after={on_first[0][1]['cursor']}"
    for path, headers in (
        (f"{url}?after={newest}", bearer()),
        (stale, {**bearer(), "Last-Event-ID": newest}),
    ):
        async with open_stream(first.url(path), headers) as (_, reader):
            assert (await reader.next()).frame == {
                "type": "resume", "team": "alpha", "cursor": newest, "now": pytest.approx(
                    time.time() * 1000, abs=60_000
                ),
            }
            assert seqs_of(await positions(reader, 2)) == [70, 71]


async def test_an_unusable_last_event_id_gets_gap_then_snapshot(
    deployment: Deployment, bridge: Backend
) -> None:
    one = await deployment.start()
    await bridge.publish([position("alpha", "w1", 7)])
    headers = {**bearer(), "Last-Event-ID": "not-a-cursor"}
    async with open_stream(one.url("/sse/teams/alpha"), headers) as (_, reader):
        gap = await reader.next()
        assert gap.frame == {"type": "gap", "team": "alpha", "cursor": "not-a-cursor"}
        assert gap.id is None  # never a cursor to come back with
        snapshot = await reader.next()
        assert snapshot.frame["type"] == "snapshot"
        assert snapshot.id == snapshot.frame["cursor"] == reader.last_event_id
    assert one.metric("teamtrack_dashboard_resumes_total", {"outcome": "unusable"}) == 1


# Who may read ------------------------------------------------------------------------------------
async def test_streams_are_refused_as_plain_http_to_other_teams_and_sites(
    deployment: Deployment,
) -> None:
    one = await deployment.start()
    cookie = deployment.cookie()
    site = f"http://{LOOPBACK}:{one.port}"
    cases: list[tuple[str, dict[str, str], int]] = [
        ("alpha", {}, 401),
        ("alpha", {"Authorization": "Bearer wrong-token"}, 401),
        # A bad token is refused even with a valid cookie: the header alone decides.
        ("alpha", {"Authorization": "Bearer wrong-token", **cookie}, 401),
        ("bravo", bearer(), 403),
        ("bravo", cookie, 403),
        ("no.such-team!", bearer(), 403),
        # Another site's page holding the manager's cookie (cross-site request).
        ("alpha", {**cookie, "Origin": "https://evil.example"}, 403),
        ("alpha", {**cookie, "Origin": "null"}, 403),
        # A bearer client is no browser: its Origin does not matter.
        ("alpha", {**bearer(), "Origin": "https://evil.example"}, 200),
        ("alpha", {**cookie, "Origin": site}, 200),
        ("alpha", cookie, 200),
    ]
    async with httpx.AsyncClient(timeout=WAIT) as client:
        for team, headers, expected in cases:
            async with client.stream(
                "GET", one.url(f"/sse/teams/{team}"), headers=headers
            ) as response:
                assert response.status_code == expected, (team, headers, response.status_code)
                if expected == 200:
                    assert response.headers["content-type"].startswith("text/event-stream")
                    continue
                body = await response.aread()
                assert body == str(expected).encode()
                assert not response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["x-content-type-options"] == "nosniff"
    assert one.metric("teamtrack_dashboard_sse_denied_total", {"status": "401"}) == 3
    assert one.metric("teamtrack_dashboard_sse_denied_total", {"status": "403"}) == 5
    await until(lambda: one.app.state.hub.viewer_count("bravo") == 0, "no bravo viewer")


# Ends --------------------------------------------------------------------------------------------
def closing(event: Event) -> dict[str, Any]:
    frame = event.frame
    assert frame["type"] == "close", frame
    assert event.id is None
    return frame


async def test_a_logout_ends_the_sessions_streams_on_every_instance(
    deployment: Deployment,
) -> None:
    first, second = await deployment.start(), await deployment.start()
    cookie = deployment.cookie()
    async with open_stream(first.url("/sse/teams/alpha"), cookie) as (_, here), open_stream(
        second.url("/sse/teams/alpha"), cookie
    ) as (_, there):
        assert (await here.next()).frame["type"] == "snapshot"
        assert (await there.next()).frame["type"] == "snapshot"
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=WAIT) as client:
            response = await client.post(first.url("/logout"), headers=cookie)
        assert response.status_code == 303
        for reader in (here, there):
            notice = closing((await reader.until_end(timeout=5.0))[-1])
            assert notice["code"] == 4401 and "log in again" in notice["reason"]
        print(f"\nlogout -> its stream on the other instance ended: "
              f"{time.monotonic() - started:.2f} s")
    async with open_stream(second.url("/sse/teams/alpha"), cookie, expect=401):
        pass


async def test_a_rotated_token_ends_its_stream(deployment: Deployment) -> None:
    one = await deployment.start()
    async with open_stream(one.url("/sse/teams/alpha"), bearer()) as (_, reader):
        assert (await reader.next()).frame["type"] == "snapshot"
        rotated = {
            "username": "alice", "team": "alpha", "password_hash": hash_password("new-password"),
            "token_sha256": token_digest("a-new-token-0123456789"),
        }
        deployment.auth_file.write_bytes(orjson.dumps({"managers": [rotated]}))
        notice = closing((await reader.until_end(timeout=5.0))[-1])
        assert notice["code"] == 4401
    async with open_stream(one.url("/sse/teams/alpha"), bearer(), expect=401):
        pass


async def test_a_shutdown_ends_the_streams_instead_of_waiting_for_them(
    deployment: Deployment,
) -> None:
    one = await deployment.start()
    async with open_stream(one.url("/sse/teams/alpha"), bearer()) as (_, reader):
        assert (await reader.next()).frame["type"] == "snapshot"
        one.server.should_exit = True
        notice = closing((await reader.until_end())[-1])
        assert notice["code"] == 1012
        await asyncio.wait_for(one.serving, WAIT)


async def test_streams_count_against_the_connection_cap(deployment: Deployment) -> None:
    # uvicorn's cap counts the connection asking too: 3 lets two streams in, not a third.
    one = await deployment.start(max_connections=3)
    async with open_stream(one.url("/sse/teams/alpha"), bearer()) as (_, first):
        assert (await first.next()).frame["type"] == "snapshot"
        async with open_stream(one.url("/sse/teams/alpha"), bearer()) as (_, second):
            assert (await second.next()).frame["type"] == "snapshot"
            async with httpx.AsyncClient(timeout=WAIT) as client:
                assert (await client.get(one.url("/healthz"))).status_code == 503
        await until(lambda: one.app.state.hub.viewer_count("alpha") == 1, "one stream left")
        async with httpx.AsyncClient(timeout=WAIT) as client:
            assert (await client.get(one.url("/healthz"))).status_code == 200


# Slow readers ------------------------------------------------------------------------------------
async def open_stuck_stream(port: int) -> socket.socket:
    """An SSE client that reads the response's headers and then nothing at all."""
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, so that the server's side fills up soon.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, (LOOPBACK, port))
    request = (
        f"GET /sse/teams/alpha HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
        f"Accept: text/event-stream\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    await loop.sock_sendall(client, request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += await loop.sock_recv(client, 1)
    assert response.startswith(b"HTTP/1.1 200"), response
    return client


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_stream_that_is_not_read_is_bounded_then_ended(
    deployment: Deployment, bridge: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dashboard.sse")
    # uvicorn's own log does not reach caplog (it does not propagate).
    server_errors = Collect()
    logging.getLogger("uvicorn.error").addHandler(server_errors)
    one = await deployment.start(
        viewer_limits=ViewerLimits(queue_batches=64, queue_bytes=QUEUE_BYTES)
    )
    hub = one.app.state.hub
    stuck = await open_stuck_stream(one.port)
    rounds = 300
    seqs: dict[str, list[int]] = {}
    delays_ms: list[float] = []
    try:
        async with open_stream(one.url("/sse/teams/alpha"), bearer()) as (_, reader):
            assert (await reader.next()).frame["type"] == "snapshot"
            await until(lambda: hub.viewer_count("alpha") == 2, "both streams joined")

            async def read_normally() -> None:
                while any(len(seqs.get(w, [])) < rounds for w in WORKERS):
                    frame = (await reader.next()).frame
                    now = time.time() * 1000
                    for event in frame["events"]:
                        delays_ms.append(now - event["rx"])
                        seqs.setdefault(event["w"], []).append(event["p"]["seq"])

            reading = asyncio.create_task(read_normally())
            largest_held = 0
            synced = False
            for seq in range(rounds):
                # ~23 KB per batch, 100 batches a second: the stuck socket's buffers fill fast.
                await bridge.publish([position("alpha", w, seq) for w in WORKERS])
                for viewer in hub.viewers("alpha"):
                    largest_held = max(largest_held, viewer.held_bytes)
                    synced |= viewer.syncing
                await asyncio.sleep(0.01)
            await asyncio.wait_for(reading, WAIT)

            # Everything, in order, once, and soon, for the stream that is read.
            assert seqs == {w: list(range(rounds)) for w in WORKERS}
            delays_ms.sort()
            p99 = delays_ms[int(len(delays_ms) * 0.99)]
            assert p99 < 1000, f"p99 delay {p99:.0f} ms"

            # The stuck one held at most its queue, then the latest position per worker.
            assert synced
            assert largest_held <= QUEUE_BYTES + len(WORKERS) * 200 + 64 * 1024
            assert one.metric("teamtrack_dashboard_viewer_conflations_total") >= 1

            # And it is ended once its socket took nothing for STUCK_AFTER_S.
            await until(
                lambda: hub.viewer_count("alpha") == 1, "the stuck stream was never ended",
                timeout=STUCK_AFTER_S + WAIT,
            )
            assert one.metric("teamtrack_dashboard_viewers_disconnected_slow_total") == 1
            await bridge.publish([position("alpha", "w000", rounds)])
            frame = (await reader.next()).frame
            assert frame["events"][0]["p"]["seq"] == rounds
            # Its connection was dropped, not left to uvicorn (which would call the unfinished
            # response an application error and keep the socket until its bytes are read).
            await until(
                lambda: "dropping an SSE stream's connection" in caplog.text,
                "the stuck connection dropped",
            )
            await until(
                lambda: len(one.server.server_state.connections) == 1,
                "the stuck connection is still open on the server",
            )
            assert not [r for r in server_errors.records if r.levelno >= logging.ERROR]
    finally:
        logging.getLogger("uvicorn.error").removeHandler(server_errors)
        stuck.close()
    await until(
        lambda: one.metric("teamtrack_dashboard_live_connections", {"transport": "sse"}) == 0,
        "both streams are gone",
    )

