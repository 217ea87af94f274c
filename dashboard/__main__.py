"""`python -m dashboard`: one dashboard instance; run several behind the same backend.

    TEAMTRACK_BACKEND_URL=redis://127.0.0.1:6379/0 \
    TEAMTRACK_AUTH_FILE=run/dashboard-auth.json \
    TEAMTRACK_SESSION_SECRET=... \
    TEAMTRACK_DATABASE_URL=sqlite+aiosqlite:///state/history.sqlite3 \
    python -m dashboard --port 8001

Without TEAMTRACK_DATABASE_URL (the ingest's database) the history API answers 503 "history
not configured" and the map offers no replay.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from dashboard.app import create_app
from dashboard.auth import Authenticator, AuthFileError, ManagerDirectory
from dashboard.guard import SiteSecurity, split_list
from dashboard.hub import ViewerLimits
from dashboard.login_guard import LoginLimits, release_large_buffers
from dashboard.page import PageConfig
from dashboard.settings import DashboardSettings
from teamtrack.backends import BackendError, from_url
from teamtrack.history import HistoryStore
from teamtrack.http_guard import guarded_http_protocol, redact_uvicorn_logs
from teamtrack.logs import configure_logging
from teamtrack.metrics import service_registry
from teamtrack.passwords import generate_secret
from teamtrack.runtime import settle_heap
from teamtrack.settings import load_settings

PROGRAM = "python -m dashboard"
# With --tls-cert: TLS 1.2 suites with forward secrecy only (uvicorn's default, "TLSv1", lets
# CBC suites without it through); TLS 1.3 has nothing else. TLS 1.0 and 1.1 are refused (the
# minimum of Python's server contexts).
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# Clients only ever send small control messages (pings).
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024

log = logging.getLogger("dashboard")


class _SpuriousHandshakeError(logging.Filter):
    """Drops the error uvicorn's websockets-sansio logs after every refused handshake.

    It forgets to mark a handshake answered by a denial response as complete (uvicorn PR 3138),
    so each 401/403 would log "returned without completing handshake" at ERROR. Every path of
    our socket handler either accepts or sends a denial, so the message is never a real fault.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


async def _check_backend(url: str) -> None:
    """Fail before serving anything when the backend cannot be reached."""
    probe = from_url(url)
    try:
        await probe.start()
    finally:
        await probe.close()


def _history_store(database_url: str) -> HistoryStore | None:
    """The read-only history, or None without a URL. No I/O: a database that is down or not
    migrated yet makes the history API answer 503 until it is there, while live works."""
    if not database_url:
        return None
    try:
        return HistoryStore.from_url(database_url)
    except (SQLAlchemyError, ImportError) as error:
        # An unparsable URL, a driver that is not async or not installed.
        raise ValueError(f"--database-url: {error}") from None
    except ValueError as error:
        raise ValueError(f"--database-url: {error}") from None


def _session_secret(settings: DashboardSettings) -> str:
    secret = settings.session_secret.get_secret_value()
    if secret:
        return secret
    log.warning(
        "TEAMTRACK_SESSION_SECRET is not set: using a random session secret, so logins made "
        "on this instance will not be accepted by other instances or after a restart"
    )
    return generate_secret(32)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(DashboardSettings, PROGRAM, argv)
    configure_logging(settings.log_level)
    try:
        directory = ManagerDirectory.load(settings.auth_file)
        backend = from_url(settings.backend_url)
        asyncio.run(_check_backend(settings.backend_url))
        history_store = _history_store(settings.database_url)
    except (AuthFileError, BackendError, ValueError) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 1
    app = create_app(
        backend,
        Authenticator(directory, _session_secret(settings), settings.session_max_age_s),
        instance_id=settings.instance_id,
        registry=service_registry(),
        viewer_limits=ViewerLimits(
            queue_batches=settings.viewer_queue_batches,
            queue_bytes=settings.viewer_queue_bytes,
            max_lag_s=settings.viewer_max_lag_s,
        ),
        stuck_after_s=settings.viewer_stuck_after_s,
        page_config=PageConfig(
            stale_after_s=settings.stale_after_s,
            trail_points=settings.trail_points,
            tile_url=settings.tile_url,
            tile_attribution=settings.tile_attribution,
        ),
        history_store=history_store,
        site=SiteSecurity(
            allowed_hosts=split_list(settings.allowed_hosts),
            trusted_proxies=split_list(settings.trusted_proxies),
            metrics_token=settings.metrics_token.get_secret_value(),
        ),
        login_limits=LoginLimits(
            concurrency=settings.login_concurrency,
            queue=settings.login_queue,
            per_address_per_minute=settings.login_per_address_per_minute,
            per_account_per_minute=settings.login_per_account_per_minute,
        ),
        auth_file=settings.auth_file,
        revocation_poll_s=settings.revocation_poll_s,
        sse_heartbeat_s=settings.sse_heartbeat_s,
    )
    log.info(
        "instance %s: %d manager(s), backend %s://, history %s",
        settings.instance_id, len(directory), settings.backend_url.partition("://")[0],
        history_store.dialect if history_store is not None else "not configured",
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # X-Forwarded-* are read by the app, from --trusted-proxies only (dashboard/app.py).
        proxy_headers=False,
        server_header=False,
        # The open internet: idle, slowloris and surplus connections are closed
        # (teamtrack/http_guard.py, docs/security.md); SSE streams hear of a shutdown.
        http=guarded_http_protocol(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        # Chosen explicitly: it implements the WebSocket denial-response extension that the
        # 401/403 handshake refusals rely on (the legacy "websockets" one is deprecated).
        ws="websockets-sansio",
        ws_max_size=MAX_CLIENT_MESSAGE_BYTES,
        ws_per_message_deflate=settings.ws_compression,
        # HTTPS with --tls-cert/--tls-key; plain HTTP without.
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert is not None else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key is not None else None,
        ssl_ciphers=TLS_CIPHERS,
    )
    server = uvicorn.Server(config)
    # After Server(): the config has installed uvicorn's own logging set-up by now.
    logging.getLogger("uvicorn.error").addFilter(_SpuriousHandshakeError())
    redact_uvicorn_logs()
    release_large_buffers()
    try:
        config.load()  # the protocol modules are imported now, so that they are settled too
    except OSError as error:  # ssl.SSLError included: a certificate or key that does not load
        print(f"{PROGRAM}: --tls-cert/--tls-key: {error}", file=sys.stderr)
        return 1
    settle_heap()
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
