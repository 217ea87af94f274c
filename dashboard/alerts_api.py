"""Zones and alerts API, team-scoped like the rest of the dashboard.

    GET    /api/teams/{team}/zones               {"type": "FeatureCollection", "features"}
    POST   /api/teams/{team}/zones               a GeoJSON Feature (teamtrack.zones) -> 201
    PUT    /api/teams/{team}/zones/{id}          replace it
    DELETE /api/teams/{team}/zones/{id}          -> 204
    GET    /api/teams/{team}/alerts?since=&limit= {"alerts": [...]}, newest first
    POST   /api/teams/{team}/alerts/{id}/ack     the alert, acknowledged (the first one stays)

Only the team's managers (403 for any other team). Writes authenticated by the session cookie
must come from the dashboard's own origin (the `Origin` check of login and logout: a page of
another site cannot make a manager's browser write); bearer tokens carry no ambient authority.
Bodies must be JSON, at most `MAX_ZONE_BYTES`; a zone that breaks a rule is a 400 naming it.
The rules service announces every change to every dashboard instance (`alert`, `alert_ack`,
`zones` frames), so these handlers only write the database.
"""

# No `from __future__ import annotations`: FastAPI must see the parameter types evaluated.

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, TypeVar

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from dashboard.auth import Manager, authenticator_of, form_post_is_own, require_team
from teamtrack.alerts import DEFAULT_ALERT_PAGE, MAX_ALERT_PAGE, AlertStore, NotFound
from teamtrack.contract import is_slug
from teamtrack.history import HistoryStore
from teamtrack.zones import MAX_ZONE_BYTES, ZoneError, new_zone_id, parse_zone

log = logging.getLogger(__name__)
NO_STORE: Final = {"Cache-Control": "no-store"}
T = TypeVar("T")


def writing_manager(request: Request) -> Manager:
    """FastAPI dependency of the writes: the manager, 401 without one, 403 for a cookie
    request from another origin (CSRF)."""
    identity = authenticator_of(request).identify(request.headers, request.cookies)
    if identity is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "not authenticated",
                            headers={"WWW-Authenticate": "Bearer"})
    if identity.by_cookie and not form_post_is_own(request.headers, request.url.scheme):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused")
    return identity.manager


def reading_manager(request: Request) -> Manager:
    identity = authenticator_of(request).identify(request.headers, request.cookies)
    if identity is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "not authenticated",
                            headers={"WWW-Authenticate": "Bearer"})
    return identity.manager


def _json(document: Any, code: int = 200) -> Response:
    return Response(orjson.dumps(document), status_code=code, media_type="application/json",
                    headers=NO_STORE)


async def _body(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip() not in (
        "application/json", "application/geo+json"
    ):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            "send the zone as application/json (a GeoJSON Feature)")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_ZONE_BYTES):
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                            f"a zone is at most {MAX_ZONE_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ZONE_BYTES:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                                f"a zone is at most {MAX_ZONE_BYTES} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not JSON") from None


def alerts_router(history: HistoryStore) -> APIRouter:
    store = AlertStore(history.engine)
    router = APIRouter()
    Reader = Annotated[Manager, Depends(reading_manager)]
    Writer = Annotated[Manager, Depends(writing_manager)]

    async def guarded(what: str, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except SQLAlchemyError as error:
            log.warning("%s failed: %s: %s", what, type(error).__name__, error)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                "alerts database unavailable") from None

    def check_id(value: str, what: str) -> None:
        if not is_slug(value):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such {what}")

    @router.get("/api/teams/{team}/zones", response_model=None)
    async def list_zones(team: str, manager: Reader) -> Response:
        require_team(manager, team)
        zones = await guarded("zones", lambda: store.zones(team))
        return _json({"type": "FeatureCollection",
                      "features": [zone.feature() for zone in zones]})

    @router.post("/api/teams/{team}/zones", response_model=None)
    async def create_zone(team: str, manager: Writer, request: Request) -> Response:
        require_team(manager, team)
        document = await _body(request)
        try:
            zone = parse_zone(document, new_zone_id())
            await guarded("zone create", lambda: store.put_zone(team, zone, manager.username,
                                                                create=True))
        except ZoneError as error:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
        return _json(zone.feature(), status.HTTP_201_CREATED)

    @router.put("/api/teams/{team}/zones/{zone_id}", response_model=None)
    async def replace_zone(team: str, zone_id: str, manager: Writer,
                           request: Request) -> Response:
        require_team(manager, team)
        check_id(zone_id, "zone")
        document = await _body(request)
        try:
            zone = parse_zone(document, zone_id)
            await guarded("zone replace", lambda: store.put_zone(team, zone, manager.username,
                                                                 create=False))
        except ZoneError as error:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
        except NotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such zone") from None
        return _json(zone.feature())

    @router.delete("/api/teams/{team}/zones/{zone_id}", response_model=None)
    async def delete_zone(team: str, zone_id: str, manager: Writer) -> Response:
        require_team(manager, team)
        check_id(zone_id, "zone")
        try:
            await guarded("zone delete", lambda: store.delete_zone(team, zone_id,
                                                                   manager.username))
        except NotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such zone") from None
        return Response(status_code=status.HTTP_204_NO_CONTENT, headers=NO_STORE)

    @router.get("/api/teams/{team}/alerts", response_model=None)
    async def list_alerts(
        team: str, manager: Reader,
        since: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_ALERT_PAGE)] = DEFAULT_ALERT_PAGE,
    ) -> Response:
        require_team(manager, team)
        found = await guarded("alerts", lambda: store.alerts(team, since, limit))
        return _json({"alerts": [alert.document() for alert in found]})

    @router.post("/api/teams/{team}/alerts/{alert_id}/ack", response_model=None)
    async def ack(team: str, alert_id: str, manager: Writer) -> Response:
        require_team(manager, team)
        if not (0 < len(alert_id) <= 64 and alert_id.isalnum()):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such alert")
        try:
            alert = await guarded("ack", lambda: store.ack(team, alert_id, manager.username))
        except NotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such alert") from None
        return _json(alert.document())

    return router


def unconfigured_alerts_router() -> APIRouter:
    """Without a history database: the same paths, 503 after the credential checks."""
    router = APIRouter()

    async def not_configured(team: str,
                             manager: Annotated[Manager, Depends(reading_manager)]) -> Response:
        require_team(manager, team)
        return JSONResponse({"detail": "alerts need the history database"}, status_code=503,
                            headers=NO_STORE)

    for path, methods in (("/api/teams/{team}/zones", ["GET", "POST"]),
                          ("/api/teams/{team}/alerts", ["GET"])):
        router.add_api_route(path, not_configured, methods=methods, response_model=None)
    return router


__all__ = ["alerts_router", "unconfigured_alerts_router"]
