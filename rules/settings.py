from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from teamtrack.history import default_database_url
from teamtrack.settings import ServiceSettings


class RulesSettings(ServiceSettings):
    """Zones and alerts: positions into zone, offline, battery and idle alerts, each stored once."""

    database_url: str = Field(
        "", description="history database (zones, alerts, the rules' state): "
        "sqlite+aiosqlite:///path or postgresql+asyncpg://... (default: history.sqlite3 in "
        "--state-dir)",
    )
    state_dir: Path = Field(Path("state"), description="folder of the default SQLite file")
    group: str = Field("rules", description="consumer group on the backend")
    consumer: str = Field(
        "rules-1", description="this process's name in the group; keep it across restarts"
    )
    start: str = Field(
        "latest", pattern="^(latest|earliest)$",
        description="where a new group starts: latest (no alerts for what came before) or "
        "earliest (the whole retained log)",
    )
    registry: Path | None = Field(
        None, description="registry.yaml whose teams' offline_alert_s, battery_alert_below "
        "and idle_alert_s override the defaults; read again every 30 s"
    )
    offline_alert_s: float = Field(300.0, ge=0, description="offline this long: an alert")
    battery_alert_below: float = Field(15.0, ge=0, le=100, description="battery % threshold")
    idle_alert_s: float = Field(900.0, ge=0, description="no movement this long: an alert")
    idle_radius_m: float = Field(30.0, gt=0, description="moves within this are no movement")
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="secret the teams' webhook signing keys derive from (set it in "
        "TEAMTRACK_WEBHOOK_SECRET, not on the command line); empty: no webhook is called"
    )
    tick_ms: float = Field(500.0, gt=0, description="how often the timer rules run")
    commit_interval_ms: float = Field(
        1000.0, gt=0, description="batches that raise no alert are committed and acknowledged "
        "together this often (an alert is committed at once); a crash runs them again"
    )
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics port")
    metrics_port: int = Field(9106, ge=0, description="port of /metrics (0: any free port)")

    def history_url(self) -> str:
        return self.database_url or default_database_url(self.state_dir)
