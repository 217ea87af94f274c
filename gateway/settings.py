from __future__ import annotations

from pathlib import Path

from pydantic import Field

from teamtrack.settings import OptionalPath, ServiceSettings

from .service import GatewayConfig


class GatewaySettings(ServiceSettings):
    """Devices over HTTP (OwnTracks, NDJSON streams) into the backend."""

    password_file: Path = Field(
        Path("state/mosquitto.passwd"),
        description="the brokers' password file (mosquitto_passwd hashes): devices log in with "
        "their MQTT password; reloaded when it changes",
    )
    gateway_id: str = Field(
        "g1", description="short name of this gateway; marks events that came in through it"
    )
    host: str = Field(
        "127.0.0.1",
        description="address the HTTP port listens on; another than loopback needs --tls-cert "
        "(or --allow-plain-http behind a proxy that terminates TLS)",
    )
    port: int = Field(8080, ge=0, lt=65536, description="the HTTP port (0: any free port)")
    tls_cert: OptionalPath = Field(
        None, description="PEM certificate chain: serve https:// (with --tls-key)"
    )
    tls_key: OptionalPath = Field(None, description="PEM private key of --tls-cert")
    allow_plain_http: bool = Field(
        False,
        description="plain HTTP on an address other than loopback: only behind a proxy that "
        "terminates TLS (devices send their password with every request)",
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections; one beyond gets 503 and is closed at once"
    )
    max_connections_per_address: int = Field(
        50, ge=1, description="open connections from one address (IPv6: one /64)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="request line and headers must arrive within this (408)"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle keep-alive connection is closed after this"
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="an OwnTracks body must arrive within this (408)"
    )
    ack_timeout_s: float = Field(
        10.0, gt=0,
        description="an OwnTracks post waits this long for the backend to hold it (503 beyond: "
        "the app sends it again)",
    )
    stream_idle_timeout_s: float = Field(
        60.0, gt=0, description="an NDJSON stream silent this long is ended (send blank lines)"
    )
    stream_max_unacked: int = Field(
        1000, ge=1,
        description="lines of one stream read and not yet held by the backend; beyond, the "
        "stream is not read until it catches up",
    )
    write_timeout_s: float = Field(
        30.0, gt=0, description="a stream whose client takes no acknowledgement this long ends"
    )
    auth_failures_per_minute: int = Field(
        30, ge=0, description="failed logins per address and minute, then 429 (0: no limit)"
    )
    password_poll_s: float = Field(
        1.0, gt=0, description="how often the password file is checked for changes"
    )
    batch_max_events: int = Field(2000, ge=1, description="largest batch sent to the backend")
    batch_interval_ms: float = Field(
        2.0, ge=0, description="shortest time between the starts of two backend publishes"
    )
    max_pending_events: int = Field(
        20000, ge=1,
        description="events waiting for the backend at most; beyond, OwnTracks posts get 503 "
        "and streams are not read",
    )
    device_rate_per_s: float = Field(
        10.0, ge=0,
        description="messages a second each device may send (0: no limit): OwnTracks objects "
        "beyond are dropped and counted as rate_limited, stream lines wait",
    )
    device_burst: int = Field(100, ge=1, description="messages a device may send at once")
    duty_file: str = Field(
        "",
        description="the provisioned duty.json (shifts); positions of workers outside their "
        "shift are dropped; read again when it changes (empty: always on duty)",
    )
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics port")
    metrics_port: int = Field(9104, ge=0, description="port of /metrics (0: any free port)")

    def gateway_config(self) -> GatewayConfig:
        return GatewayConfig(
            password_file=self.password_file,
            gateway_id=self.gateway_id,
            host=self.host,
            port=self.port,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            allow_plain_http=self.allow_plain_http,
            max_connections=self.max_connections,
            max_connections_per_address=self.max_connections_per_address,
            header_timeout_s=self.header_timeout_s,
            keep_alive_timeout_s=self.keep_alive_timeout_s,
            body_timeout_s=self.body_timeout_s,
            ack_timeout_s=self.ack_timeout_s,
            stream_idle_timeout_s=self.stream_idle_timeout_s,
            stream_max_unacked=self.stream_max_unacked,
            write_timeout_s=self.write_timeout_s,
            auth_failures_per_minute=self.auth_failures_per_minute,
            password_poll_s=self.password_poll_s,
            batch_max_events=self.batch_max_events,
            batch_interval_s=self.batch_interval_ms / 1000,
            max_pending_events=self.max_pending_events,
            device_rate_per_s=self.device_rate_per_s,
            device_burst=self.device_burst,
            duty_file=Path(self.duty_file) if self.duty_file else None,
        )
