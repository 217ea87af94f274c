"""The history API, team-scoped like the rest of the dashboard: a router to include in the app.

    GET /api/teams/{team}/workers/{worker}/track?since=&until=&limit=&after=
        a worker's positions, oldest first, a page at a time (`next`: the cursor of the next
        page, null on the last one); `&format=geojson|csv|gpx`: the whole window as a file
    GET /api/teams/{team}/workers/{worker}/track/summary?since=&until=
        points, device runs, duration, distance, max speed of that window
    GET /api/teams/{team}/history?since=&until=&limit=&after=
        every worker of the team, by fix time, a page at a time
    GET /api/teams/{team}/presence?since=&until=&worker=&limit=&after=
        online/offline changes, oldest first
    GET /api/teams/{team}/events?since=&until=&worker=&limit=&after=
        worker events (a phone's region enter/leave), oldest first

`since` and `until` are ISO-8601 times (a time without zone is UTC) or epoch milliseconds; the
window is [since, until), by default the hour before now. A manager gets 403 for any team but
their own, exactly as on the snapshot API. `create_app` includes `history_router(store)` when
the dashboard has a database URL (and closes the store when the app stops), and
`unconfigured_history_router()` when it has none: the same paths, answering 503.
"""

# No `from __future__ import annotations`: the routes' parameter types are built inside
# `history_router` (they depend on its arguments), and FastAPI must see them evaluated.

import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from dashboard.auth import Manager, current_manager, require_team
from teamtrack.contract import is_slug
from teamtrack.history import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    BadCursor,
    HistoryStore,
    Page,
    PageCursor,
    PresenceChange,
    TooManyPoints,
)
from teamtrack.history_export import ExportFormat, export, summarize

log = logging.getLogger(__name__)

DEFAULT_WINDOW_MS: Final = 3_600_000
DEFAULT_MAX_EXPORT_POINTS: Final = 200_000
_EPOCH_MS: Final = re.compile(r"-?\d{1,16}")
NO_STORE: Final = {"Cache-Control": "no-store"}

TrackFormat = Literal["json", "geojson", "csv", "gpx"]


def parse_time(value: str, name: str) -> int:
    """ISO-8601 (zone-less means UTC) or epoch milliseconds -> epoch milliseconds; 400 else."""
    text = value.strip()
    if _EPOCH_MS.fullmatch(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"{name}: not an ISO-8601 time or epoch milliseconds",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def time_window(since: str | None, until: str | None) -> tuple[int, int]:
    until_ms = parse_time(until, "until") if until else int(time.time() * 1000)
    since_ms = parse_time(since, "since") if since else until_ms - DEFAULT_WINDOW_MS
    if since_ms >= until_ms:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "since must be before until")
    return since_ms, until_ms


def page_cursor(after: str | None, query: str) -> PageCursor | None:
    if after is None:
        return None
    try:
        return PageCursor.decode(after, query)
    except BadCursor as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"after: {error}") from None


def _json(document: dict[str, Any]) -> Response:
    return Response(orjson.dumps(document), media_type="application/json", headers=NO_STORE)


def _unavailable(what: str, error: Exception) -> JSONResponse:
    # Any error of the database or its driver (down, not migrated yet): 503, never a crash.
    log.warning("history %s failed: %s: %s", what, type(error).__name__, error)
    return JSONResponse({"detail": "history unavailable"}, status_code=503, headers=NO_STORE)


def _file_name(team: str, worker: str, since_ms: int, export_format: ExportFormat) -> str:
    moment = datetime.fromtimestamp(since_ms / 1000, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{team}-{worker}-{moment}.{export_format.extension}"


def history_router(
    store: HistoryStore,
    manager_dependency: Callable[..., Manager] = current_manager,
    *,
    max_export_points: int = DEFAULT_MAX_EXPORT_POINTS,
) -> APIRouter:
    """The history endpoints over `store`, for the managers `manager_dependency` returns."""
    router = APIRouter()
    CurrentManager = Annotated[Manager, Depends(manager_dependency)]
    Since = Annotated[str | None, Query(max_length=64)]
    Until = Annotated[str | None, Query(max_length=64)]
    Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
    After = Annotated[str | None, Query(max_length=200)]

    def check(manager: Manager, team: str, worker: str | None = None) -> None:
        require_team(manager, team)
        if worker is not None and not is_slug(worker):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "worker is not a valid id")

    @router.get("/api/teams/{team}/workers/{worker}/track", response_model=None)
    async def track(
        team: str,
        worker: str,
        manager: CurrentManager,
        since: Since = None,
        until: Until = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
        after: After = None,
        format: TrackFormat = "json",
    ) -> Response:
        check(manager, team, worker)
        since_ms, until_ms = time_window(since, until)
        if format != "json":
            return await track_file(team, worker, since_ms, until_ms, ExportFormat(format))
        cursor = page_cursor(after, "track")
        try:
            page = await store.track(team, worker, since_ms, until_ms, limit=limit, after=cursor)
        except (SQLAlchemyError, OSError) as error:
            return _unavailable("track", error)
        return _json({
            "team": team,
            "worker": worker,
            "since": since_ms,
            "until": until_ms,
            "points": [point.document() for point in page.items],
            "next": page.next.encode() if page.next else None,
        })

    async def track_file(
        team: str, worker: str, since_ms: int, until_ms: int, export_format: ExportFormat
    ) -> Response:
        try:
            points = await store.whole_track(team, worker, since_ms, until_ms, max_export_points)
        except TooManyPoints:
            raise HTTPException(
                422,
                f"more than {max_export_points} positions in this window; narrow since/until",
            ) from None
        except (SQLAlchemyError, OSError) as error:
            return _unavailable("export", error)
        name = _file_name(team, worker, since_ms, export_format)
        return Response(
            export(export_format, team, worker, points),
            media_type=export_format.media_type,
            headers={"Content-Disposition": f'attachment; filename="{name}"', **NO_STORE},
        )

    @router.get("/api/teams/{team}/workers/{worker}/track/summary", response_model=None)
    async def track_summary(
        team: str, worker: str, manager: CurrentManager, since: Since = None, until: Until = None
    ) -> Response:
        check(manager, team, worker)
        since_ms, until_ms = time_window(since, until)
        try:
            points = await store.whole_track(team, worker, since_ms, until_ms, max_export_points)
        except TooManyPoints:
            raise HTTPException(
                422,
                f"more than {max_export_points} positions in this window; narrow since/until",
            ) from None
        except (SQLAlchemyError, OSError) as error:
            return _unavailable("summary", error)
        return _json({
            "team": team, "worker": worker, "since": since_ms, "until": until_ms,
            **summarize(points).document(),
        })

    @router.get("/api/teams/{team}/history", response_model=None)
    async def team_history(
        team: str,
        manager: CurrentManager,
        since: Since = None,
        until: Until = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
        after: After = None,
    ) -> Response:
        check(manager, team)
        since_ms, until_ms = time_window(since, until)
        cursor = page_cursor(after, "team")
        try:
            page = await store.team_window(team, since_ms, until_ms, limit=limit, after=cursor)
        except (SQLAlchemyError, OSError) as error:
            return _unavailable("team window", error)
        return _json({
            "team": team,
            "since": since_ms,
            "until": until_ms,
            "positions": [point.document() for point in page.items],
            "next": page.next.encode() if page.next else None,
        })

    async def team_listing(
        name: str, key: str, fetch: Callable[..., Awaitable[Page[Any]]],
        document: Callable[[Any], Any], team: str, manager: Manager,
        window: tuple[str | None, str | None], worker: str | None, limit: int, after: str | None,
    ) -> Response:
        """A team's (or one worker's) `name` rows of a window, a page at a time, as `key`."""
        check(manager, team, worker)
        since_ms, until_ms = time_window(*window)
        cursor = page_cursor(after, name)
        try:
            page = await fetch(team, since_ms, until_ms, worker=worker, limit=limit, after=cursor)
        except (SQLAlchemyError, OSError) as error:
            return _unavailable(name, error)
        return _json({
            "team": team,
            "since": since_ms,
            "until": until_ms,
            key: [document(item) for item in page.items],
            "next": page.next.encode() if page.next else None,
        })

    @router.get("/api/teams/{team}/presence", response_model=None)
    async def presence(
        team: str,
        manager: CurrentManager,
        since: Since = None,
        until: Until = None,
        worker: Annotated[str | None, Query(max_length=64)] = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
        after: After = None,
    ) -> Response:
        return await team_listing(
            "presence", "changes", store.presence, PresenceChange.document, team, manager,
            (since, until), worker, limit, after,
        )

    @router.get("/api/teams/{team}/events", response_model=None)
    async def events(
        team: str,
        manager: CurrentManager,
        since: Since = None,
        until: Until = None,
        worker: Annotated[str | None, Query(max_length=64)] = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
        after: After = None,
    ) -> Response:
        return await team_listing(
            "events", "events", store.events, dict, team, manager, (since, until), worker,
            limit, after,
        )

    return router


HISTORY_PATHS: Final = (
    "/api/teams/{team}/workers/{worker}/track",
    "/api/teams/{team}/workers/{worker}/track/summary",
    "/api/teams/{team}/history",
    "/api/teams/{team}/presence",
    "/api/teams/{team}/events",
)


def unconfigured_history_router(
    manager_dependency: Callable[..., Manager] = current_manager,
) -> APIRouter:
    """The history paths of a dashboard without a history database: 503 "history not
    configured", after the same credential and team checks (401, 403) as everywhere else."""
    router = APIRouter()

    async def not_configured(
        team: str, manager: Annotated[Manager, Depends(manager_dependency)]
    ) -> JSONResponse:
        require_team(manager, team)
        return JSONResponse(
            {"detail": "history not configured"}, status_code=503, headers=NO_STORE
        )

    for path in HISTORY_PATHS:
        router.add_api_route(path, not_configured, methods=["GET"], response_model=None)
    return router


__all__ = [
    "DEFAULT_MAX_EXPORT_POINTS",
    "HISTORY_PATHS",
    "history_router",
    "parse_time",
    "time_window",
    "unconfigured_history_router",
]
