"""Settings of `python -m dashboard`: flags first, then `TEAMTRACK_*` environment variables."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from dashboard.page import DEFAULT_TILE_ATTRIBUTION, DEFAULT_TILE_URL, tile_origin
from teamtrack.settings import OptionalPath, ServiceSettings


class DashboardSettings(ServiceSettings):
    """One dashboard instance: managers' login, snapshot API, live WebSocket and SSE, map."""

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    auth_file: Path = Field(
        description="dashboard-auth.json written by provisioning (manager hashes, no plaintext)"
    )
    session_secret: SecretStr = Field(
        SecretStr(""),
        description=(
            "key that signs session cookies; give every instance the same one, through "
            "TEAMTRACK_SESSION_SECRET rather than a flag (command lines are visible to all "
            "users); empty: a random one, so sessions work on this instance only"
        ),
    )
    session_max_age_s: int = Field(43_200, gt=0, description="how long a login lasts")
    revocation_poll_s: float = Field(
        1.0, gt=0, le=60,
        description="how often the auth file is checked for changes and other instances' "
        "logouts are read from the backend: the longest a revoked credential still works here",
    )
    viewer_queue_batches: int = Field(
        16384, ge=1, description="batches queued per viewer before it is switched to state-sync"
    )
    viewer_queue_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="bytes of batches queued per viewer before it is switched to state-sync",
    )
    viewer_max_lag_s: float = Field(
        2.0,
        gt=0,
        description="seconds the oldest batch queued for a viewer may wait before the viewer is"
        " switched to state-sync",
    )
    viewer_stuck_after_s: float = Field(
        20.0,
        gt=0,
        description="a viewer whose socket accepts nothing for this long is closed (4008), "
        "WebSocket or SSE stream",
    )
    sse_heartbeat_s: float = Field(
        15.0,
        gt=0,
        le=300,
        description="an SSE stream silent for this long gets a comment line, so that proxies "
        "keep it open and a client that vanished is found out",
    )
    ws_compression: bool = Field(
        True,
        description=(
            "offer permessage-deflate to clients that ask for it (browsers do): about 5x less "
            "bandwidth per viewer for a few microseconds of CPU per frame"
        ),
    )
    stale_after_s: float = Field(
        30.0, gt=0, description="the page shows a worker as stale after this long without a fix"
    )
    trail_points: int = Field(20, ge=0, le=500, description="positions in each worker's trail")
    tile_url: str = Field(
        DEFAULT_TILE_URL,
        description="map tile URL template with {z}, {x}, {y} (and optionally {s}); '' for none",
    )
    tile_attribution: str = Field(
        DEFAULT_TILE_ATTRIBUTION, max_length=300, description="credit shown under the tiles"
    )
    instance_id: str = Field("", description="name in /healthz and logs; empty: host:port")
    database_url: str = Field(
        "",
        description=(
            "the history database the ingest writes (sqlite+aiosqlite:///path or "
            "postgresql+asyncpg://...), read only; empty: no history, its API answers 503 "
            "and the map offers no replay"
        ),
    )

    allowed_hosts: str = Field(
        "localhost,127.0.0.1,::1",
        description=(
            "comma-separated names the Host header may carry (the site's public name; "
            "'*.example.org' for its subdomains; '*' for any); other hosts get 400, "
            "/healthz and /metrics included"
        ),
    )
    trusted_proxies: str = Field(
        "",
        description=(
            "comma-separated addresses or networks of the TLS proxies in front: their "
            "X-Forwarded-Proto (https: Secure cookies, wss origins) and X-Forwarded-For (the "
            "client address the login limits count) are believed; nobody else's are"
        ),
    )
    metrics_token: SecretStr = Field(
        SecretStr(""),
        description=(
            "bearer token /metrics asks for (give it as TEAMTRACK_METRICS_TOKEN); empty: "
            "/metrics answers loopback clients that came through no proxy, 404 to anyone else"
        ),
    )
    login_concurrency: int = Field(
        2, ge=1, le=64,
        description="password checks (scrypt, ~16 MB each) run at once, on threads of their own",
    )
    login_queue: int = Field(
        32, ge=0, description="password checks waiting beyond those; more get 503 + Retry-After"
    )
    login_per_address_per_minute: int = Field(
        10, ge=0,
        description="failed logins a client address (IPv6: a /64) may make per minute, in a "
        "burst or spread; then 429 + Retry-After (0: no limit)",
    )
    login_per_account_per_minute: int = Field(
        5, ge=0,
        description="failed logins per username per minute from all addresses together; then "
        "429 + Retry-After (0: no limit)",
    )
    max_connections: int = Field(
        1000, ge=1,
        description="open connections (live WebSockets and SSE streams included); a connection"
        " beyond gets 503 and is closed",
    )
    header_timeout_s: float = Field(
        10.0, gt=0,
        description="a request's headers must arrive within this long (idle and slowloris "
        "connections are closed with 408)",
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="an idle keep-alive connection is closed after this long"
    )
    tls_cert: OptionalPath = Field(
        None,
        description="serve HTTPS (and wss://) with this certificate (PEM, the chain after it; "
        "`teamtrack provision` writes state/tls/server.crt); with --tls-key",
    )
    tls_key: OptionalPath = Field(
        None, description="the certificate's private key (PEM, unencrypted; state/tls/server.key)"
    )

    @field_validator("tile_url")
    @classmethod
    def _check_tile_url(cls, value: str) -> str:
        tile_origin(value)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _tls_needs_both(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        return self

    @model_validator(mode="after")
    def _name_the_instance(self) -> Self:
        if not self.instance_id:
            self.instance_id = f"{socket.gethostname()}:{self.port}"
        return self
