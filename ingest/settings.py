from __future__ import annotations

from pathlib import Path

from pydantic import Field

from teamtrack.history import default_database_url
from teamtrack.history_privacy import DEFAULT_RETENTION_DAYS
from teamtrack.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    """Positions and presence changes from the backend into the SQL history."""

    database_url: str = Field(
        "",
        description="history database: sqlite+aiosqlite:///path or "
        "postgresql+asyncpg://user:password@host:port/db (default: history.sqlite3 in "
        "--state-dir)",
    )
    state_dir: Path = Field(Path("state"), description="folder of the default SQLite file")
    group: str = Field("ingest", description="consumer group on the backend; one per database")
    consumer: str = Field(
        "ingest-1",
        description="this process's name in the group; keep it across restarts (a restart "
        "re-reads what it left unacknowledged) and give each parallel ingest its own",
    )
    max_batch_positions: int = Field(
        5000, ge=1, description="most rows written in one database transaction"
    )
    max_pending_batches: int = Field(
        1000, ge=1, description="backend batches read ahead while the database writes"
    )
    write_interval_ms: float = Field(
        50.0, ge=0, description="how long rows gather before a transaction, unless the "
        "ingest is behind (then it writes at once)"
    )
    quiet_write_interval_ms: float = Field(
        250.0, ge=0, description="the same while positions arrive slower than "
        "--quiet-rows-per-s: fewer transactions at low rates (0: always --write-interval-ms)"
    )
    quiet_rows_per_s: float = Field(
        400.0, ge=0, description="below this many positions a second, rows gather for "
        "--quiet-write-interval-ms"
    )
    retention_days: float = Field(
        DEFAULT_RETENTION_DAYS, ge=0, description="days of history kept (positions, presence, "
        "events) for teams whose registry entry sets no retention_days (0: keep all)"
    )
    registry: Path | None = Field(
        None, description="registry.yaml whose teams' retention_days override "
        "--retention-days; read again before each retention pass"
    )
    retention_interval_s: float = Field(
        600.0, gt=0, description="seconds between retention passes"
    )
    retention_batch: int = Field(
        2000, ge=1, description="most rows one retention statement deletes"
    )
    retention_pause_ms: float = Field(
        20.0, ge=0, description="pause between two retention statements"
    )
    recover_interval_s: float = Field(
        5.0, ge=0, description="how often to check whether the backend lost its last-known "
        "positions, and give them back from the history (0: never)"
    )
    backlog_interval_s: float = Field(
        2.0, ge=0, description="how often the consumer group's lag in entries is asked of the "
        "backend (teamtrack_ingest_backlog_entries; 0: never)"
    )
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics port")
    metrics_port: int = Field(9102, ge=0, description="port of /metrics (0: any free port)")

    def history_url(self) -> str:
        return self.database_url or default_database_url(self.state_dir)
