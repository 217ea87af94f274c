"""`/ws/teams/{team}[?after=cursor]`: one manager's live view of one team (docs/protocol.md).

Credentials and the team are checked before the handshake is accepted, so a refused client gets
a plain HTTP 401 or 403 and never a WebSocket. This needs the ASGI "websocket.http.response"
extension, which uvicorn's websockets-sansio implementation and Starlette's TestClient provide.

Sending waits while the connection's write buffer is full (uvicorn's flow control), so a viewer
that reads slowly makes its own queue fill up, and the hub switches it to state-sync. A viewer
whose socket takes nothing at all for `stuck_after_s` is closed with 4008, and one whose
credentials were revoked meanwhile (a logout, `teamtrack provision revoke|rotate`) with 4401.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import orjson
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from dashboard.auth import Authenticator, live_refusal
from dashboard.frames import PONG_FRAME
from dashboard.hub import TeamHub, Viewer
from dashboard.metrics import DashboardMetrics
from dashboard.revocation import LiveSessions
from dashboard.watchdog import DEFAULT_STUCK_AFTER_S, Watchdog
from teamtrack.backends import BackendError

log = logging.getLogger(__name__)

CLOSE_BACKEND_FAILED: Final = 1011
CLOSE_TOO_SLOW: Final = 4008
CLOSE_TOO_SLOW_REASON: Final = "too slow; resync"
# The token or session the socket was opened with is no longer valid: log in again.
CLOSE_REVOKED: Final = 4401
CLOSE_REVOKED_REASON: Final = "credentials revoked; log in again"
CLOSE_BACKEND_FAILED_REASON: Final = "backend unavailable; reconnect"
# A viewer dropped for being slow is usually not reading at all, so its close frame may never
# leave the send buffer; it gets this long before the connection is abandoned.
CLOSE_TIMEOUT_S: Final = 2.0


async def serve_viewer(
    websocket: WebSocket,
    team: str,
    *,
    authenticator: Authenticator,
    hub: TeamHub,
    metrics: DashboardMetrics,
    stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
    live: LiveSessions | None = None,
) -> None:
    refusal = live_refusal(websocket, team, authenticator)
    if refusal is not None:
        await _refuse(websocket, refusal, metrics)
        return
    # A cursor is a position in a log, not a secret: a URL may carry it.
    after = websocket.query_params.get("after") or None
    try:
        viewer = await hub.join(team, after)
    except Exception as error:
        # Not only BackendError: a driver may raise its own errors (redis-py's, for one).
        log.warning("cannot serve a viewer of team %s: %s: %s", team, type(error).__name__, error)
        await _refuse(websocket, 503, metrics)
        return
    live = live if live is not None else LiveSessions()
    ended = live.add(websocket, team)
    connections = metrics.live_connections.labels("ws")
    connections.inc()
    try:
        await websocket.accept()
        await _converse(websocket, viewer, metrics, stuck_after_s, ended)
    finally:
        connections.dec()
        live.discard(websocket)
        await hub.leave(viewer)


async def _refuse(websocket: WebSocket, status: int, metrics: DashboardMetrics) -> None:
    metrics.ws_denied.labels(str(status)).inc()
    await websocket.send_denial_response(PlainTextResponse(str(status), status_code=status))


async def _converse(
    websocket: WebSocket,
    viewer: Viewer,
    metrics: DashboardMetrics,
    stuck_after_s: float,
    ended: asyncio.Event,
) -> None:
    watchdog = Watchdog(stuck_after_s)
    sender = asyncio.create_task(_send_frames(websocket, viewer, metrics, watchdog))
    watchdog.watch(sender)
    receiver = asyncio.create_task(_answer_client(websocket))
    revoked = asyncio.create_task(ended.wait())
    tasks = {sender, receiver, revoked}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watchdog.stop()
        for task in tasks:
            task.cancel()
        # `wait`, not `gather`: if this handler is itself cancelled meanwhile, its own
        # CancelledError must surface, not one re-raised from a child (anyio's cancel scopes,
        # as in Starlette's TestClient, only swallow their own).
        await asyncio.wait(tasks)
    failures = {task: task.exception() for task in done if not task.cancelled()}
    if receiver in done:
        return  # the client went away (or vanished mid-pong): nothing left to tell it
    if revoked in done:
        log.info("closing a viewer of team %s: its credentials were revoked", viewer.team)
        await _close(websocket, CLOSE_REVOKED, CLOSE_REVOKED_REASON)
        return
    if watchdog.fired:
        metrics.viewers_disconnected_slow.inc()
        log.info("closing a viewer of team %s: its socket took nothing for %ss",
                 viewer.team, stuck_after_s)
        await _close(websocket, CLOSE_TOO_SLOW, CLOSE_TOO_SLOW_REASON)
        return
    error = failures.get(sender)
    if error is None or isinstance(error, WebSocketDisconnect):
        return
    # The only backend call after the handshake is the fresh snapshot after a gap.
    log.warning(
        "viewer of team %s failed: %s: %s", viewer.team, type(error).__name__, error,
        exc_info=not isinstance(error, BackendError),
    )
    await _close(websocket, CLOSE_BACKEND_FAILED, CLOSE_BACKEND_FAILED_REASON)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, TimeoutError):
        await asyncio.wait_for(websocket.close(code, reason), CLOSE_TIMEOUT_S)


async def _send_frames(
    websocket: WebSocket, viewer: Viewer, metrics: DashboardMetrics, watchdog: Watchdog
) -> None:
    clock = watchdog.clock
    while True:
        frame = await viewer.next_frame()
        watchdog.sending_since = clock()
        await websocket.send_text(frame)
        watchdog.sending_since = None
        metrics.frames_sent += 1
        if viewer.device_ts is not None:
            metrics.observe_latency(viewer.team, viewer.device_ts)


async def _answer_client(websocket: WebSocket) -> None:
    """Returns when the client disconnects; answers `{"type":"ping"}`, ignores anything else."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None and _is_ping(text):
            await websocket.send_text(PONG_FRAME)


def _is_ping(text: str) -> bool:
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("type") == "ping"
