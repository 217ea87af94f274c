"""The dashboard's ASGI application: login, the page, the snapshot API and the live socket.

    GET  /login  POST /login  POST /logout       session cookie for browsers (logout revokes it
                                                 on every instance: dashboard/revocation.py)
    GET  /                                       the page (static/index.html)
    GET  /api/me                                 {"username", "team"}
    GET  /api/config                             what the map page needs (tiles, stale time)
    GET  /api/teams/{team}/positions             the team's snapshot
    GET  /api/teams/{team}/history, .../track... the SQL history (dashboard/history_api.py)
    WS   /ws/teams/{team}[?after=cursor]         snapshot or resume, then live (docs/protocol.md)
    GET  /sse/teams/{team}[?after=cursor]        the same frames as Server-Sent Events; resumes
                                                 from Last-Event-ID (dashboard/sse.py)
    GET  /healthz                                for operators and load balancers
    GET  /metrics                                loopback clients only, or a metrics token

Everything under /api, /ws and /sse takes `Authorization: Bearer <token>` or the session cookie.
Every request must name an allowed host; login and logout refuse other sites' forms, and
password checks are rate limited and bounded (dashboard/guard.py, dashboard/login_guard.py).
"""

from __future__ import annotations

import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Final

from fastapi import Depends, FastAPI, Form, Request, WebSocket, status
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import PlainTextResponse, Response
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from dashboard.alerts_api import alerts_router, unconfigured_alerts_router
from dashboard.auth import (
    SESSION_COOKIE,
    Authenticator,
    Manager,
    current_manager,
    form_post_is_own,
    require_team,
)
from dashboard.frames import snapshot_json
from dashboard.guard import SiteGuard, SiteSecurity, metrics_allowed
from dashboard.history_api import history_router, unconfigured_history_router
from dashboard.hub import TeamHub, ViewerLimits
from dashboard.live import serve_viewer
from dashboard.login_guard import LoginGuard, LoginLimits, LoginRefused
from dashboard.metrics import DashboardMetrics
from dashboard.page import PageConfig
from dashboard.revocation import DEFAULT_POLL_S, CredentialWatch, LiveSessions
from dashboard.sse import DEFAULT_HEARTBEAT_S, EventStreams
from dashboard.watchdog import DEFAULT_STUCK_AFTER_S
from teamtrack.backends import Backend
from teamtrack.history import HistoryStore
from teamtrack.metrics import CONTENT_TYPE_LATEST, CollectorRegistry, render

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(__file__).parent / "static"
LOGIN_ERROR_MARK: Final = "<!-- login-error -->"
# The fields of login.html, as written there: a failed login fills the username back in.
LOGIN_USERNAME_FIELD: Final = '<input name="username" autocomplete="username" required autofocus>'
LOGIN_PASSWORD_FIELD: Final = (
    '<input name="password" type="password" autocomplete="current-password" required>'  # noqa: S105
)


def create_app(
    backend: Backend,
    authenticator: Authenticator,
    *,
    instance_id: str,
    registry: CollectorRegistry,
    viewer_limits: ViewerLimits | None = None,
    stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
    page_config: PageConfig | None = None,
    history_store: HistoryStore | None = None,
    site: SiteSecurity | None = None,
    login_limits: LoginLimits | None = None,
    auth_file: Path | None = None,
    revocation_poll_s: float = DEFAULT_POLL_S,
    sse_heartbeat_s: float = DEFAULT_HEARTBEAT_S,
) -> FastAPI:
    """The app for one instance; its lifespan starts and stops the backend and the hub, and
    closes `history_store` (read only, never migrated here; None: no history configured).

    `site` None: any Host, no trusted proxy, `/metrics` for local clients (tests);
    `python -m dashboard` passes its settings. `auth_file`: re-read when it changes (every
    `revocation_poll_s`, like the other instances' logouts; dashboard/revocation.py).
    `sse_heartbeat_s`: how long an SSE stream may stay silent before it gets a comment line."""
    site = site if site is not None else SiteSecurity()
    login_guard = LoginGuard(authenticator.directory, login_limits)
    metrics = DashboardMetrics(registry)
    hub = TeamHub(backend, metrics, limits=viewer_limits)
    live_sessions = LiveSessions()
    watch = CredentialWatch(
        authenticator, backend, live_sessions, auth_file=auth_file, login_guard=login_guard,
        poll_s=revocation_poll_s,
    )
    event_streams = EventStreams(
        authenticator, hub, metrics, live_sessions, stuck_after_s=stuck_after_s,
        heartbeat_s=sse_heartbeat_s,
    )
    config = page_config if page_config is not None else PageConfig()
    # No inline script, no other origin but the tiles': an injected string can neither run
    # nor phone home.
    page_headers = config.security_headers()
    login_page = (STATIC_DIR / "login.html").read_text()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            await hub.start()
            try:
                await watch.start()
                try:
                    yield
                finally:
                    await watch.stop()
            finally:
                await hub.stop()
        finally:
            login_guard.close()
            try:
                await backend.close()
            finally:
                if history_store is not None:
                    await history_store.close()

    app = FastAPI(
        title="teamtrack dashboard",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.authenticator = authenticator
    app.state.hub = hub
    app.state.metrics = metrics
    app.state.login_guard = login_guard
    app.state.credential_watch = watch
    # The last one added runs first: the proxy's word on scheme and client, then the guard.
    app.add_middleware(
        SiteGuard, allowed_hosts=site.allowed_hosts, max_body_bytes=site.max_body_bytes
    )
    if site.trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(site.trusted_proxies))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if history_store is not None:
        app.include_router(history_router(history_store))
        app.include_router(alerts_router(history_store))
    else:
        app.include_router(unconfigured_history_router())
        app.include_router(unconfigured_alerts_router())

    def login_form(
        error: str | None = None, status_code: int = 200, username: str = ""
    ) -> HTMLResponse:
        notice = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        page = login_page.replace(LOGIN_ERROR_MARK, notice)
        if username:
            # The name typed stays (escaped); the focus goes to the password.
            page = page.replace(LOGIN_USERNAME_FIELD, LOGIN_USERNAME_FIELD.replace(
                ' autofocus', f' value="{html.escape(username, quote=True)}"'
            )).replace(LOGIN_PASSWORD_FIELD, LOGIN_PASSWORD_FIELD[:-1] + " autofocus>")
        return HTMLResponse(page, status_code=status_code, headers=page_headers)

    @app.get("/login", response_class=HTMLResponse)
    async def show_login() -> HTMLResponse:
        return login_form()

    @app.post("/login", response_model=None)
    async def log_in(
        request: Request,
        username: Annotated[str, Form(max_length=128)],
        password: Annotated[str, Form(max_length=1024)],
    ) -> Response:
        if not form_post_is_own(request.headers, request.url.scheme):
            metrics.logins.labels("cross_site").inc()
            return PlainTextResponse("cross-site form refused", status.HTTP_403_FORBIDDEN)
        client = request.client.host if request.client else None
        try:
            # scrypt, off the event loop on a few threads of its own, within the limits.
            manager = await login_guard.check(client, username, password)
        except LoginRefused as refused:
            metrics.logins.labels("limited" if refused.status == 429 else "busy").inc()
            refusal = login_form(refused.reason, refused.status, username)
            refusal.headers["Retry-After"] = str(refused.retry_after_s)
            return refusal
        if manager is None:
            metrics.logins.labels("failed").inc()
            return login_form(
                "Wrong username or password.", status.HTTP_401_UNAUTHORIZED, username
            )
        metrics.logins.labels("ok").inc()
        response = RedirectResponse("/", status.HTTP_303_SEE_OTHER)
        response.set_cookie(
            SESSION_COOKIE,
            authenticator.issue_session(manager),
            max_age=authenticator.session_max_age_s,
            path="/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/logout", response_model=None)
    async def log_out(request: Request) -> Response:
        if not form_post_is_own(request.headers, request.url.scheme):
            return PlainTextResponse("cross-site form refused", status.HTTP_403_FORBIDDEN)
        # The cookie is refused from now on, here and (through the backend) everywhere else,
        # and its live sockets are closed: clearing it in this browser alone would leave a
        # copied cookie valid until it expires.
        session = authenticator.session_of(request.cookies.get(SESSION_COOKIE, ""))
        if session is not None:
            await watch.logout(session)
        response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
        response.delete_cookie(
            SESSION_COOKIE,
            path="/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return response

    @app.get("/", response_model=None)
    async def page(request: Request) -> Response:
        if authenticator.identify(request.headers, request.cookies) is None:
            return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
        return FileResponse(STATIC_DIR / "index.html", headers=page_headers)

    @app.get("/api/me")
    async def me(manager: Annotated[Manager, Depends(current_manager)]) -> dict[str, str]:
        return {"username": manager.username, "team": manager.team}

    @app.get("/api/config")
    async def page_settings(
        _: Annotated[Manager, Depends(current_manager)],
    ) -> dict[str, object]:
        return {**config.document(), "history": history_store is not None}

    @app.get("/api/teams/{team}/positions")
    async def positions(
        team: str, manager: Annotated[Manager, Depends(current_manager)]
    ) -> Response:
        require_team(manager, team)
        try:
            snapshot = await hub.snapshot(team)
        except Exception as error:
            # Not only BackendError: a driver may raise its own errors (redis-py's, for one).
            log.warning("snapshot of team %s failed: %s: %s", team, type(error).__name__, error)
            return JSONResponse({"detail": "backend unavailable"}, status_code=503)
        return Response(
            snapshot_json(snapshot),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    @app.websocket("/ws/teams/{team}")
    async def live(websocket: WebSocket, team: str) -> None:
        await serve_viewer(
            websocket,
            team,
            authenticator=authenticator,
            hub=hub,
            metrics=metrics,
            stuck_after_s=stuck_after_s,
            live=live_sessions,
        )

    @app.get("/sse/teams/{team}", response_model=None)
    async def live_events(request: Request, team: str) -> Response:
        return event_streams.respond(request, team)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        reachable = await backend.ping()
        document = {
            "status": "ok" if reachable else "backend unreachable",
            "instance": instance_id,
            "backend": reachable,
        }
        return JSONResponse(document, status_code=200 if reachable else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not metrics_allowed(request, site.metrics_token):
            # As if there were none: nothing to learn for whoever may not read it.
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    return app
