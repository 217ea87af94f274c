from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from teamtrack.contract import require_slug
from teamtrack.mqtt import BRIDGE_SHARE_GROUP, MirrorMode, bridge_username
from teamtrack.settings import ServiceSettings


class BridgeSettings(ServiceSettings):
    """One broker's devices into the backend, other brokers' traffic back out."""

    broker_url: str = Field("mqtt://127.0.0.1:1883", description="the broker this bridge serves")
    broker_id: str = Field(
        "b1", description="short name of that broker; marks where a message came in"
    )
    instance: int = Field(1, ge=1, description="number of this bridge among those of its broker")
    mqtt_username: str = Field(
        "",
        description="MQTT user of the bridge, also its client id (empty: "
        "bridge-{broker_id}-{instance}); one account per bridge process",
    )
    mqtt_password: SecretStr = Field(
        SecretStr(""), description="MQTT password (prefer TEAMTRACK_MQTT_PASSWORD)"
    )
    share_group: str = Field(
        BRIDGE_SHARE_GROUP,
        description="shared-subscription group that splits a broker among bridges (the ACL "
        "lets bridge accounts join this one only)",
    )
    shared_subscription: bool = Field(
        True,
        description="subscribe in the share group (off: this is its broker's only bridge; a "
        "plain subscription with No Local keeps its mirrored messages from coming back to it)",
    )
    session_expiry_s: int = Field(
        3600, ge=0, description="how long the broker keeps QoS 1 messages for a stopped bridge"
    )
    mirror: MirrorMode = Field(
        MirrorMode.ON_DEMAND,
        description="other brokers' traffic into this broker: all, off, or on-demand "
        "(presence always; positions while the broker has a subscriber besides its bridges, "
        "read from its $SYS subscription count)",
    )
    broker_bridges: int = Field(
        1,
        ge=1,
        description="bridge processes subscribed to this broker, this one included (on-demand "
        "mirroring does not count their own subscriptions as readers)",
    )
    mirror_teams: str = Field("", description="comma-separated teams to mirror (empty: all)")
    batch_max_events: int = Field(2000, ge=1, description="largest batch sent to the backend")
    batch_interval_ms: float = Field(
        2.0,
        ge=0,
        description="shortest time between the starts of two backend publishes; what arrives "
        "meanwhile joins the next batch (0: publish as soon as the previous one returned)",
    )
    max_pending_events: int = Field(
        20000, ge=1, description="events held while the backend is slow (QoS 0 beyond is dropped)"
    )
    device_rate_per_s: float = Field(
        10.0,
        ge=0,
        description="messages a second each device (team, worker) may send; the excess is "
        "dropped and counted as rate_limited, QoS 1 still acknowledged (0: no limit)",
    )
    device_burst: int = Field(
        100,
        ge=1,
        description="messages a device may send at once above its rate (a backlog after a "
        "reconnect or a stalled bridge arrives at once: cover the longest one)",
    )
    duty_file: Path | None = Field(
        None,
        description="the provisioned duty.json (shifts); positions of workers outside their "
        "shift are dropped; read again when it changes (none: always on duty)",
    )
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics port")
    metrics_port: int = Field(9101, ge=0, description="port of /metrics (0: any free port)")

    @field_validator("broker_id")
    @classmethod
    def _broker_id_is_slug(cls, value: str) -> str:
        return require_slug(value, "broker id")

    def username(self) -> str:
        """The MQTT account, which the broker also takes as the client id."""
        return self.mqtt_username or bridge_username(self.broker_id, self.instance)

    def mirrored_teams(self) -> frozenset[str] | None:
        """None means every team."""
        teams = frozenset(team.strip() for team in self.mirror_teams.split(",") if team.strip())
        for team in teams:
            require_slug(team, "team")
        return teams or None
