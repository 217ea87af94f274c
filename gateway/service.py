"""The device gateway: devices over HTTP into the backend, as the bridges take them from MQTT.

Two ways in (`gateway.app`): the OwnTracks app's HTTP mode (`POST /v1/owntracks`, one JSON
object a request) and NDJSON streams (`POST /v1/positions`, one native position a line, held
open, acknowledged as the backend holds them: `gateway.stream`). Both feed one `Batcher`, as a
bridge's messages do: validation (`teamtrack.contract`, `teamtrack.ingress.owntracks`), the
per-device rate limit, batches, and an answer only once the backend holds an event.

Events carry the gateway's id as their origin (`g1`...): every broker's bridge mirrors them
into its broker (it mirrors every origin but its own), so MQTT managers and `mosquitto_sub`
see a position that arrived over HTTP like any other.

Logins are devices' own (`teamtrack.device_auth`): Basic auth checked against the brokers'
password file, reloaded within `password_poll_s` of `teamtrack provision rotate|revoke`; an
open stream whose login no longer holds is ended.

The HTTP server is uvicorn's httptools protocol with the core's connection guard
(`teamtrack.http_guard`: a connection cap in all and per address, a header deadline and size
bound), started inside this service's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.server import ServerState

from teamtrack.backends import Backend, Event
from teamtrack.contract import ContractError, require_slug
from teamtrack.device_auth import DeviceAccounts
from teamtrack.http_guard import guarded_http_protocol
from teamtrack.ingress.batcher import Batcher, BatchMetrics
from teamtrack.ingress.duty import DutyGate, RosterFile, follow_duty, refresh_roster
from teamtrack.ingress.owntracks import OnlineRefresh
from teamtrack.ingress.ratelimit import DeviceRateLimit
from teamtrack.logs import RateLimitedLog
from teamtrack.netlimits import LOOPBACK, RateLimiter

from .metrics import GatewayCollector, GatewayCounters

log = logging.getLogger(__name__)

# TLS 1.2 suites with forward secrecy only, as the dashboards (TLS 1.3 has nothing else).
TLS_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
# How long stopping waits for streams to write their last acknowledgement.
STOP_GRACE_S: Final = 5.0


@dataclass(frozen=True)
class GatewayConfig:
    password_file: Path
    gateway_id: str = "g1"
    host: str = LOOPBACK
    port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Plain HTTP on an address other than loopback (behind a proxy that terminates TLS).
    allow_plain_http: bool = False
    max_connections: int = 1000
    max_connections_per_address: int = 50
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    # An OwnTracks body must arrive within this; the backend must hold its events within
    # ack_timeout_s, or the answer is 503 (the app sends it again).
    body_timeout_s: float = 10.0
    ack_timeout_s: float = 10.0
    # NDJSON streams: silence allowed, lines read but not yet held, a client not reading.
    stream_idle_timeout_s: float = 60.0
    stream_max_unacked: int = 1000
    write_timeout_s: float = 30.0
    # Failed logins per address (IPv6: its /64) and minute, then 429.
    auth_failures_per_minute: int = 30
    password_poll_s: float = 1.0
    batch_max_events: int = 2000
    max_pending_events: int = 20000
    batch_interval_s: float = 0.002
    device_rate_per_s: float = 10.0
    device_burst: int = 100
    # The provisioned duty.json (None: always on duty), checked every `duty_check_s` (also
    # how late a shift's end turns an online worker off duty).
    duty_file: Path | None = None
    duty_check_s: float = 1.0

    def __post_init__(self) -> None:
        require_slug(self.gateway_id, "gateway id")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert is None and not self.allow_plain_http and not _is_loopback(self.host):
            raise ValueError(
                f"--host {self.host} without TLS would take devices' passwords in the clear: "
                "give --tls-cert and --tls-key, or --allow-plain-http behind a proxy that "
                "terminates TLS"
            )
        if self.max_connections < 1 or self.max_connections_per_address < 1:
            raise ValueError("connection limits must be at least 1")
        if self.stream_max_unacked < 1:
            raise ValueError("--stream-max-unacked must be at least 1")

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayService:
    """Owns the batcher, the device accounts and the HTTP server; `start()` binds."""

    def __init__(
        self, config: GatewayConfig, backend: Backend, registry: CollectorRegistry
    ) -> None:
        from .app import GatewayApp
        from .stream import DeviceStream

        self.config = config
        self.backend = backend
        self.counters = GatewayCounters()
        registry.register(GatewayCollector(self.counters, config.gateway_id))
        self._batch_metrics = BatchMetrics(
            registry, "teamtrack_gateway", "gateway", config.gateway_id
        )
        self.batcher = Batcher(
            self._publish,
            max_batch=config.batch_max_events,
            max_pending=config.max_pending_events,
            on_batch=self._batch_metrics.observe,
            on_backend_error=self._count_backend_error,
            min_interval=config.batch_interval_s,
        )
        self.accounts = DeviceAccounts(config.password_file)
        self.device_limit = (
            DeviceRateLimit(config.device_rate_per_s, config.device_burst)
            if config.device_rate_per_s > 0
            else None
        )
        self.auth_failures = RateLimiter(config.auth_failures_per_minute)
        self.online_refresh = OnlineRefresh()
        self._roster_file = RosterFile(config.duty_file) if config.duty_file else None
        self.duty = DutyGate(self._roster_file.roster if self._roster_file else None)
        self.counters.duty_dropped = self.duty.dropped
        # The open stream of each device account (a newer one replaces it).
        self.streams: dict[str, DeviceStream] = {}
        self.rejections_log = RateLimitedLog(log)
        self.app = GatewayApp(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        self._server_state = ServerState()
        self.stopping = False

    # Lifecycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.config.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        await self.backend.start()
        self._tasks.append(asyncio.create_task(self.batcher.run(), name="gateway-batcher"))
        self._tasks.append(asyncio.create_task(self._watch_passwords(), name="gateway-passwd"))
        self._tasks.append(asyncio.create_task(self._duty_watch(), name="gateway-duty"))
        config = self._uvicorn_config()
        loop = asyncio.get_running_loop()
        protocol_class = config.http_protocol_class

        def protocol() -> asyncio.Protocol:
            return protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self._server_state, app_state={}, _loop=loop
            )

        self._server = await loop.create_server(
            protocol, self.config.host, self.config.port, ssl=config.ssl, backlog=1024,
            ssl_handshake_timeout=self.config.header_timeout_s if config.ssl else None,
        )

    def _uvicorn_config(self) -> uvicorn.Config:
        settings = self.config
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.port,
            http=guarded_http_protocol(
                settings.header_timeout_s,
                max_connections_per_address=settings.max_connections_per_address,
                on_refused=self._count_refused,
            ),
            ws="none",
            lifespan="off",
            interface="asgi3",
            limit_concurrency=settings.max_connections,
            timeout_keep_alive=int(settings.keep_alive_timeout_s),
            proxy_headers=False,
            server_header=False,
            date_header=False,
            access_log=False,
            log_config=None,
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert is not None else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key is not None else None,
            ssl_ciphers=TLS_CIPHERS,
        )
        config.load()
        return config

    async def stop(self) -> None:
        """Stop taking connections, end the streams (each writes its last acknowledgement),
        flush what was accepted, close."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        streams = list(self.streams.values())
        for stream in streams:
            stream.end("shutdown")
        if streams:
            await asyncio.wait([asyncio.ensure_future(stream.finished.wait())
                                for stream in streams], timeout=STOP_GRACE_S)
        for connection in list(self._server_state.connections):
            connection.shutdown()
        requests = list(self._server_state.tasks)
        if requests:
            await asyncio.wait(requests, timeout=STOP_GRACE_S)
        for task in requests:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.batcher.wait_idle(), STOP_GRACE_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), STOP_GRACE_S)
        await self.backend.close()

    async def _watch_passwords(self) -> None:
        """Reload the password file when it changes; end the streams it no longer lets in."""
        while True:
            await asyncio.sleep(self.config.password_poll_s)
            try:
                if not await self.accounts.reload_if_changed():
                    continue
                for stream in list(self.streams.values()):
                    if not await self.accounts.still_valid(stream.login, stream.password):
                        stream.end("revoked")
            except Exception:  # the watch must outlive any one bad turn
                log.exception("checking the password file failed; trying again")

    async def _duty_watch(self) -> None:
        """Reload duty.json when it changed; turn workers whose shift ended off duty."""
        # Nobody waits for those statuses: the batcher's retries carry them to the backend.
        await follow_duty(self._roster_file, self.duty, self.config.duty_check_s,
                          self.batcher.submit_nowait)

    def reload_duty(self) -> None:
        """duty.json again if it changed (also on SIGHUP)."""
        refresh_roster(self._roster_file, self.duty)

    # The path into the backend ---------------------------------------------------------------
    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def reject(self, error: ContractError, via: str, who: str) -> None:
        self.counters.rejected[error.reason.value] += 1
        self.rejections_log.warning(
            error.reason.value, "rejected %s from %s: %s", via, who, error.detail
        )

    def submit(
        self, events: Sequence[Event], via: str, monitoring: int | None = None,
        *, online_resumes: bool = True,
    ) -> asyncio.Future[None]:
        """Queue events for the backend, less what the worker may not send off duty (dropped
        and counted); the future is done once the backend holds the last (batches keep their
        order, so then every one), at once when nothing was left to hold. `monitoring`: the
        OwnTracks mode the message stated."""
        for event in events:
            self.counters.received[(event.kind.value, via)] += 1
        done: asyncio.Future[None] | None = None
        for event in self.duty.admit(events, None, monitoring, online_resumes=online_resumes):
            done = self.batcher.submit_nowait(event)
        if done is None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
        return done

    def set_mode(self, team: str, worker: str, monitoring: int, now_ms: int) -> None:
        """An OwnTracks monitoring mode stated alone (a `status` object): the presence it
        changes goes to the backend as it is (`DutyGate.set_mode`), not through the gate
        again."""
        for event in self.duty.set_mode(team, worker, monitoring, self.config.gateway_id, 1,
                                        now_ms):
            self.counters.received[(event.kind.value, "owntracks")] += 1
            self.batcher.submit_nowait(event)

    @property
    def backend_lagging(self) -> bool:
        """More events wait for the backend than a batcher may hold: refuse or stop reading."""
        return self.batcher.pending >= self.config.max_pending_events

    async def _publish(self, events: Any) -> None:
        await self.backend.publish(events)
        self.counters.forwarded += len(events)

    def _count_backend_error(self) -> None:
        self.counters.backend_errors += 1

    def _count_refused(self, reason: str) -> None:
        self.counters.refused[reason] += 1

