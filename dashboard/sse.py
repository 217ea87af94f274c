"""`GET /sse/teams/{team}[?after=cursor]`: one manager's live view as Server-Sent Events.

For clients that cannot or would rather not open a WebSocket: curl, scripts, EventSource,
proxies that drop `Upgrade`. Each frame the WebSocket would send (docs/protocol.md) is one
event: its `data` is the same JSON, its `id` the cursor a WebSocket client would resume from
with `?after=`, so the `Last-Event-ID` of a reconnect resumes on any instance, with no gap and
no duplicate.

The rest is the WebSocket's: credentials and team are checked before anything is streamed
(plain 401/403), the viewer is the hub's, with its bounded queue and state-sync, the watchdog
ends a stream whose socket takes nothing for `stuck_after_s`, and `LiveSessions` ends one whose
token or session was revoked. A stream the server ends gets a last `close` event carrying the
WebSocket's close code. Comment lines every `heartbeat_s` keep proxies from closing an idle
stream, and are the writes through which a client that vanished without a word is found out.

Shutdowns and stuck clients need the HTTP protocol of teamtrack/http_guard.py (what
`python -m dashboard` runs): under another server a stream hears of no graceful shutdown (give
that server a shutdown timeout), and a stuck client's connection is closed, not dropped.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from dashboard.auth import Authenticator, live_refusal
from dashboard.frames import close_frame, frame_head
from dashboard.hub import TeamHub, Viewer
from dashboard.live import (
    CLOSE_BACKEND_FAILED,
    CLOSE_BACKEND_FAILED_REASON,
    CLOSE_REVOKED,
    CLOSE_REVOKED_REASON,
    CLOSE_TIMEOUT_S,
    CLOSE_TOO_SLOW,
    CLOSE_TOO_SLOW_REASON,
)
from dashboard.metrics import DashboardMetrics
from dashboard.revocation import LiveSessions
from dashboard.watchdog import DEFAULT_STUCK_AFTER_S, Watchdog
from teamtrack.backends import BackendError
from teamtrack.http_guard import CONNECTION_EXTENSION

log = logging.getLogger(__name__)

# How long an EventSource waits before it reconnects, sent before the first event.
RETRY_MS: Final = 2000
# Proxies commonly close a response idle for 30-60 s.
DEFAULT_HEARTBEAT_S: Final = 15.0
# A comment line alone, without the blank line that would end an (empty) event: some parsers
# (httpx-sse) hand out such an empty event, browsers do not.
HEARTBEAT: Final = b": ping\n"
CLOSE_SHUTTING_DOWN: Final = 1012
CLOSE_SHUTTING_DOWN_REASON: Final = "server shutting down; reconnect"
# Frames after which the client is up to date with their cursor. A gap names the cursor that
# could not be honoured; the snapshot that follows it carries the one to keep.
_RESUMABLE: Final = frozenset({"snapshot", "resume", "events", "sync"})
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_HEADERS: Final = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-store"),
    # nginx buffers responses unless told not to.
    (b"x-accel-buffering", b"no"),
)


def encode_event(frame: str, retry_ms: int | None = None) -> bytes:
    """One frame as one event: `id` when the frame leaves the client at a cursor it may resume
    from, then the JSON as `data`, a field per line (device payloads are embedded as sent, and
    JSON whitespace may hold line breaks; a client joins the lines with "\\n", the same JSON)."""
    kind, cursor = frame_head(frame)
    head = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    if cursor is not None and kind in _RESUMABLE and _fits_id(cursor):
        head += f"id: {cursor}\n"
    if "\n" in frame or "\r" in frame:
        data = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(frame))
        return f"{head}{data}\n".encode()
    return b"".join((head.encode(), b"data: ", frame.encode(), b"\n\n"))


def _fits_id(cursor: str) -> bool:
    # A line break would end the field; clients ignore an id holding NUL.
    return "\n" not in cursor and "\r" not in cursor and "\0" not in cursor


@dataclass(frozen=True, slots=True)
class EventStreams:
    """What the SSE streams of one instance share with its WebSockets."""

    authenticator: Authenticator
    hub: TeamHub
    metrics: DashboardMetrics
    live: LiveSessions
    stuck_after_s: float = DEFAULT_STUCK_AFTER_S
    heartbeat_s: float = DEFAULT_HEARTBEAT_S

    def respond(self, request: Request, team: str) -> Response:
        """A plain refusal, or the stream, which joins the hub once the server runs it."""
        refusal = live_refusal(request, team, self.authenticator)
        if refusal is not None:
            self.metrics.sse_denied.labels(str(refusal)).inc()
            headers = {"WWW-Authenticate": "Bearer"} if refusal == 401 else None
            return PlainTextResponse(str(refusal), refusal, headers=headers)
        # The header first: a reconnecting EventSource sends it and keeps its first URL, whose
        # `?after=` is stale by then. A cursor is a position in a log, not a secret.
        after = request.headers.get("last-event-id") or request.query_params.get("after")
        return _EventStream(self, request, team, after or None)


class _EventStream(Response):
    """One viewer's stream, as the ASGI response FastAPI runs."""

    def __init__(
        self, streams: EventStreams, request: Request, team: str, after: str | None
    ) -> None:
        super().__init__()
        self._streams = streams
        self._request = request
        self._team = team
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streams = self._streams
        try:
            viewer = await streams.hub.join(self._team, self._after)
        except Exception as error:
            # Not only BackendError: a driver may raise its own errors (redis-py's, for one).
            log.warning("cannot serve a viewer of team %s: %s: %s",
                        self._team, type(error).__name__, error)
            streams.metrics.sse_denied.labels("503").inc()
            await PlainTextResponse("503", 503)(scope, receive, send)
            return
        extensions = scope.get("extensions") or {}
        connection: dict[str, Any] = extensions.get(CONNECTION_EXTENSION) or {}
        ended = streams.live.add(self._request, self._team)
        gauge = streams.metrics.live_connections.labels("sse")
        gauge.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            notice = await self._converse(viewer, receive, send, ended, connection.get("shutdown"))
        finally:
            gauge.dec()
            streams.live.discard(self._request)
            await streams.hub.leave(viewer)
        await _finish(send, notice, connection.get("abort"))

    async def _converse(
        self,
        viewer: Viewer,
        receive: Receive,
        send: Send,
        revoked: asyncio.Event,
        shutting_down: asyncio.Event | None,
    ) -> str | None:
        """Streams until the client leaves (None) or the server ends it (the `close` frame)."""
        streams = self._streams
        watchdog = Watchdog(streams.stuck_after_s)
        writer = _Writer(send, watchdog)
        sender = asyncio.create_task(writer.send_frames(viewer, streams.metrics))
        watchdog.watch(sender)
        heartbeat = asyncio.create_task(writer.keep_alive(streams.heartbeat_s))
        receiver = asyncio.create_task(_until_disconnected(receive))
        ending = asyncio.create_task(revoked.wait())
        tasks = {sender, heartbeat, receiver, ending}
        stopping = None
        if shutting_down is not None:
            stopping = asyncio.create_task(shutting_down.wait())
            tasks.add(stopping)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.stop()
            for task in tasks:
                task.cancel()
            # `wait`, not `gather`: this handler's own cancellation must surface (live.py).
            await asyncio.wait(tasks)
        if receiver in done:
            return None
        team = viewer.team
        if ending in done:
            log.info("ending an SSE stream of team %s: its credentials were revoked", team)
            return close_frame(CLOSE_REVOKED, CLOSE_REVOKED_REASON)
        if stopping is not None and stopping in done:
            return close_frame(CLOSE_SHUTTING_DOWN, CLOSE_SHUTTING_DOWN_REASON)
        if watchdog.fired:
            streams.metrics.viewers_disconnected_slow.inc()
            log.info("ending an SSE stream of team %s: its socket took nothing for %ss",
                     team, streams.stuck_after_s)
            return close_frame(CLOSE_TOO_SLOW, CLOSE_TOO_SLOW_REASON)
        error = next(
            (task.exception() for task in (sender, heartbeat)
             if task in done and not task.cancelled()),
            None,
        )
        if isinstance(error, OSError):
            return None  # the client went away (a server of ASGI spec 2.4 says so this way)
        # The only backend call after joining is the fresh snapshot after a gap.
        log.warning(
            "SSE viewer of team %s failed: %s: %s", team, type(error).__name__, error,
            exc_info=error is not None and not isinstance(error, BackendError),
        )
        return close_frame(CLOSE_BACKEND_FAILED, CLOSE_BACKEND_FAILED_REASON)


class _Writer:
    """Writes a stream's events and heartbeats one at a time, each timed by the watchdog."""

    def __init__(self, send: Send, watchdog: Watchdog) -> None:
        self._send = send
        self._watchdog = watchdog
        self._lock = asyncio.Lock()
        self.last_write = watchdog.clock()

    async def write(self, chunk: bytes) -> None:
        watchdog = self._watchdog
        async with self._lock:
            watchdog.sending_since = watchdog.clock()
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
            watchdog.sending_since = None
            self.last_write = watchdog.clock()

    async def send_frames(self, viewer: Viewer, metrics: DashboardMetrics) -> None:
        # The reconnection delay goes with the first event: alone, it would make an empty
        # event for some parsers.
        retry_ms: int | None = RETRY_MS
        while True:
            frame = await viewer.next_frame()
            await self.write(encode_event(frame, retry_ms))
            retry_ms = None
            metrics.frames_sent += 1
            if viewer.device_ts is not None:
                metrics.observe_latency(viewer.team, viewer.device_ts)

    async def keep_alive(self, interval_s: float) -> None:
        clock = self._watchdog.clock
        while True:
            idle = clock() - self.last_write
            if idle < interval_s:
                await asyncio.sleep(interval_s - idle)
            elif self._lock.locked():
                await asyncio.sleep(interval_s)  # a write under way (a stuck one: the watchdog's)
            else:
                await self.write(HEARTBEAT)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _finish(send: Send, notice: str | None, abort: Callable[[], None] | None) -> None:
    """End the response, with `notice` as its last event; a client that takes nothing within
    CLOSE_TIMEOUT_S has its connection dropped, if the server lets us."""
    body = encode_event(notice) if notice is not None else b""
    try:
        await asyncio.wait_for(
            send({"type": "http.response.body", "body": body, "more_body": False}),
            CLOSE_TIMEOUT_S,
        )
    except TimeoutError:
        log.info("dropping an SSE stream's connection: it took not even its last event in %ss",
                 CLOSE_TIMEOUT_S)
        if abort is not None:
            abort()
            # The server hears of the lost connection before this request's task returns, so
            # it does not take the unfinished response for a fault of the application.
            await asyncio.sleep(0)
    except OSError:
        pass  # gone already
