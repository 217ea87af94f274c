from __future__ import annotations

from pydantic import Field

from teamtrack.settings import OptionalPath, ServiceSettings

from .service import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_PACKET_BYTES, GatewayConfig


class GatewaySettings(ServiceSettings):
    """MQTT over WebSockets for managers, in front of one broker's plain MQTT listener."""

    broker_url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="the broker's plain MQTT listener that every client is piped to",
    )
    host: str = Field(
        "127.0.0.1",
        description="address the WebSocket port listens on (loopback by default; 0.0.0.0 or :: "
        "for every interface)",
    )
    port: int = Field(9001, ge=0, lt=65536, description="the WebSocket port (0: any free port)")
    tls_cert: OptionalPath = Field(
        None, description="PEM certificate chain: serve wss:// (with --tls-key)"
    )
    tls_key: OptionalPath = Field(None, description="PEM private key of --tls-cert")
    max_connections: int = Field(
        1000, ge=1, description="open connections; one beyond gets 503 and is closed at once"
    )
    max_connections_per_address: int = Field(
        50, ge=1, description="open connections from one address (IPv6: one /64)"
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_PACKET_BYTES, ge=1024,
        description="largest WebSocket message or frame; a larger one closes the connection (1009)",
    )
    max_packet_bytes: int = Field(
        DEFAULT_MAX_PACKET_BYTES, ge=1024,
        description="largest MQTT packet (fixed header included), checked on the size a packet "
        "announces: a larger one closes the connection at once (1009); keep it at the brokers' "
        "max_packet_size",
    )
    open_timeout_s: float = Field(
        10.0, gt=0,
        description="from the connection (TLS included): the upgrade and the whole MQTT CONNECT "
        "within this, or closed",
    )
    max_keepalive_s: int = Field(
        300, ge=1,
        description="a client silent for 1.5 times its MQTT keep alive is closed; this caps the "
        "keep alive (the brokers' max_keepalive)",
    )
    write_timeout_s: float = Field(
        30.0, gt=0,
        description="a client that takes nothing the broker sends for this long is closed",
    )
    buffer_bytes: int = Field(
        DEFAULT_BUFFER_BYTES, ge=1024,
        description="bytes read at once and held unsent at most, each way, per connection",
    )
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics port")
    metrics_port: int = Field(9103, ge=0, description="port of /metrics (0: any free port)")

    def gateway_config(self) -> GatewayConfig:
        from teamtrack.mqtt import BrokerAddress

        broker = BrokerAddress.parse(self.broker_url)
        if broker.websockets:
            raise ValueError("--broker-url must be the broker's plain mqtt:// listener")
        return GatewayConfig(
            broker=broker,
            host=self.host,
            port=self.port,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            max_connections=self.max_connections,
            max_connections_per_address=self.max_connections_per_address,
            max_message_bytes=self.max_message_bytes,
            max_packet_bytes=self.max_packet_bytes,
            open_timeout_s=self.open_timeout_s,
            max_keepalive_s=self.max_keepalive_s,
            write_timeout_s=self.write_timeout_s,
            buffer_bytes=self.buffer_bytes,
        )
