"""Alerts and zones in the history database, and the notices that carry them to dashboards.

Tables (migration `0004_zones_alerts`): `zones` (a team's GeoJSON Features), `zone_versions`
(bumped with every zone change, so the rules service sees and announces it), `alerts`
(one row per alert, its id derived from what triggered it: a redelivered trigger is the same
row), `rule_state` and `rule_cursors` (what the rules service has applied; see `rules/`).

Writers: the dashboard writes zones and acknowledgements (managers only); the rules service
writes alerts and its state. Notices: the rules service publishes, into the team's live log,
a worker event (`Kind.EVENT`, origin `rules`) per new alert, acknowledgement and zone change
(`notice_event`); dashboards turn them into `alert`, `alert_ack` and `zones` frames.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from teamtrack.backends import Event
from teamtrack.contract import NOTICE_ORIGIN, Kind
from teamtrack.history import metadata
from teamtrack.zones import MAX_ZONES_PER_TEAM, Zone, ZoneError, parse_zone

ALERT_KINDS: Final = ("zone_enter", "zone_exit", "offline", "battery_low", "idle", "transition")
DEFAULT_ALERT_PAGE: Final = 200
MAX_ALERT_PAGE: Final = 1000

zones = sa.Table(
    "zones", metadata,
    sa.Column("team", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("feature", sa.Text, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_by", sa.String(64), nullable=False),
)
zone_versions = sa.Table(
    "zone_versions", metadata,
    sa.Column("team", sa.String(64), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("changed_ms", sa.BigInteger, nullable=False),
    sa.Column("changed_by", sa.String(64), nullable=False),
    sa.Column("published", sa.BigInteger, nullable=False),
)
alerts = sa.Table(
    "alerts", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("zone", sa.String(64)),
    sa.Column("zone_name", sa.String(200)),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("raised_ms", sa.BigInteger, nullable=False),
    sa.Column("detail", sa.String(300), nullable=False),
    sa.Column("acked_by", sa.String(64)),
    sa.Column("acked_ms", sa.BigInteger),
    sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("ack_published", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("hook_state", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Index("ix_alerts_team_raised", "team", "raised_ms"),
    sa.Index("ix_alerts_team_worker", "team", "worker"),
)
rule_state = sa.Table(
    "rule_state", metadata,
    sa.Column("team", sa.String(64), primary_key=True),
    sa.Column("worker", sa.String(64), primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
)
rule_cursors = sa.Table(
    "rule_cursors", metadata,
    sa.Column("team", sa.String(64), primary_key=True),
    sa.Column("cursor", sa.String(200), nullable=False),
)


def alert_id(*parts: object) -> str:
    """A deterministic id: the same trigger (team, worker, kind, fix or status) gives the same
    id on every delivery and in every process."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()
    return "a" + digest[:31]


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    team: str
    worker: str
    kind: str
    zone: str | None
    zone_name: str | None
    at: int
    raised_ms: int
    detail: str
    acked_by: str | None = None
    acked_ms: int | None = None

    def document(self) -> dict[str, Any]:
        """The `alert` object of frames and of `GET /api/teams/{team}/alerts`."""
        return {
            "id": self.id, "kind": self.kind, "worker": self.worker, "zone": self.zone,
            "zone_name": self.zone_name, "at": self.at, "raised_ms": self.raised_ms,
            "detail": self.detail, "acked_by": self.acked_by, "acked_ms": self.acked_ms,
        }

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id, "team": self.team, "worker": self.worker, "kind": self.kind,
            "zone": self.zone, "zone_name": self.zone_name, "at_ms": self.at,
            "raised_ms": self.raised_ms, "detail": self.detail[:300],
        }


def _alert(row: Any) -> Alert:
    return Alert(row.id, row.team, row.worker, row.kind, row.zone, row.zone_name, row.at_ms,
                 row.raised_ms, row.detail, row.acked_by, row.acked_ms)


def notice_event(team: str, worker: str, body: Mapping[str, Any], now_ms: int) -> Event:
    return Event(team, worker, Kind.EVENT, orjson.dumps(body), NOTICE_ORIGIN, now_ms,
                 int(body["ts"]), 1)


def alert_notice(alert: Alert, now_ms: int) -> Event:
    return notice_event(alert.team, alert.worker,
                        {"type": "alert", "ts": alert.at, "alert": alert.document()}, now_ms)


def ack_notice(alert: Alert, now_ms: int) -> Event:
    assert alert.acked_by is not None and alert.acked_ms is not None
    return notice_event(alert.team, alert.worker, {"type": "alert_ack", "ts": alert.acked_ms,
                                                   "id": alert.id, "by": alert.acked_by}, now_ms)


def zones_notice(team: str, changed_by: str, changed_ms: int, now_ms: int) -> Event:
    return notice_event(team, changed_by, {"type": "zones", "ts": changed_ms}, now_ms)


class NotFound(LookupError):
    pass


def _now_ms() -> int:
    return int(time.time() * 1000)


class AlertStore:
    """Zones, alerts and rule state over the history's engine (`HistoryStore.engine`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # The rules' per-commit upserts, built once (executed with many rows each).
        state = self._insert(rule_state)
        self._upsert_state = state.on_conflict_do_update(
            index_elements=["team", "worker"], set_={"state": state.excluded.state}
        )
        cursor = self._insert(rule_cursors)
        self._upsert_cursor = cursor.on_conflict_do_update(
            index_elements=["team"], set_={"cursor": cursor.excluded.cursor}
        )

    # Zones ---------------------------------------------------------------------------------
    async def zones(self, team: str) -> list[Zone]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(zones.c.id, zones.c.feature).where(zones.c.team == team)
                .order_by(zones.c.id)
            )
            return [parse_zone(orjson.loads(row.feature), row.id) for row in rows]

    async def zone_versions(self) -> dict[str, tuple[int, int, str, int]]:
        """team -> (version, changed_ms, changed_by, published version)."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(sa.select(zone_versions))
            return {row.team: (row.version, row.changed_ms, row.changed_by, row.published)
                    for row in rows}

    async def _bump(self, connection: AsyncConnection, team: str, by: str, now: int) -> None:
        insert = self._insert(zone_versions).values(
            team=team, version=1, changed_ms=now, changed_by=by, published=0
        )
        await connection.execute(insert.on_conflict_do_update(
            index_elements=["team"],
            set_={"version": zone_versions.c.version + 1, "changed_ms": now,
                  "changed_by": by},
        ))

    async def put_zone(self, team: str, zone: Zone, by: str, *, create: bool) -> Zone:
        """Create (`create`) or replace a zone; `NotFound` to replace one that is not there,
        `ZoneError` past `MAX_ZONES_PER_TEAM`."""
        now = _now_ms()
        feature = orjson.dumps(zone.feature()).decode()
        async with self.engine.begin() as connection:
            exists = await connection.scalar(
                sa.select(sa.func.count()).select_from(zones)
                .where(zones.c.team == team, zones.c.id == zone.id)
            )
            if create:
                count = await connection.scalar(
                    sa.select(sa.func.count()).select_from(zones).where(zones.c.team == team)
                )
                if (count or 0) >= MAX_ZONES_PER_TEAM:
                    raise ZoneError(f"a team has at most {MAX_ZONES_PER_TEAM} zones")
                if exists:
                    raise ZoneError("zone id already in use")
                await connection.execute(zones.insert().values(
                    team=team, id=zone.id, name=zone.name, feature=feature, updated_ms=now,
                    updated_by=by,
                ))
            else:
                if not exists:
                    raise NotFound(zone.id)
                await connection.execute(
                    zones.update().where(zones.c.team == team, zones.c.id == zone.id)
                    .values(name=zone.name, feature=feature, updated_ms=now, updated_by=by)
                )
            await self._bump(connection, team, by, now)
        return zone

    async def delete_zone(self, team: str, zone_id: str, by: str) -> None:
        async with self.engine.begin() as connection:
            result = await connection.execute(
                zones.delete().where(zones.c.team == team, zones.c.id == zone_id)
            )
            if not result.rowcount:
                raise NotFound(zone_id)
            await self._bump(connection, team, by, _now_ms())

    async def mark_zones_published(self, team: str, version: int) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                zone_versions.update().where(zone_versions.c.team == team)
                .values(published=version)
            )

    # Alerts --------------------------------------------------------------------------------
    async def alerts(
        self, team: str, since_ms: int = 0, limit: int = DEFAULT_ALERT_PAGE
    ) -> list[Alert]:
        """The team's alerts raised at or after `since_ms`, newest first."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(alerts).where(alerts.c.team == team, alerts.c.raised_ms >= since_ms)
                .order_by(alerts.c.raised_ms.desc(), alerts.c.at_ms.desc(), alerts.c.id)
                .limit(limit)
            )
            return [_alert(row) for row in rows]

    async def alert(self, team: str, alert_id_: str) -> Alert | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(
                sa.select(alerts).where(alerts.c.team == team, alerts.c.id == alert_id_)
            )).first()
        return _alert(row) if row is not None else None

    async def ack(self, team: str, alert_id_: str, by: str) -> Alert:
        """Acknowledge (the first acknowledgement stays); `NotFound` for an unknown alert."""
        async with self.engine.begin() as connection:
            await connection.execute(
                alerts.update()
                .where(alerts.c.team == team, alerts.c.id == alert_id_,
                       alerts.c.acked_by.is_(None))
                .values(acked_by=by, acked_ms=_now_ms(), ack_published=False)
            )
            row = (await connection.execute(
                sa.select(alerts).where(alerts.c.team == team, alerts.c.id == alert_id_)
            )).first()
        if row is None:
            raise NotFound(alert_id_)
        return _alert(row)

    async def unpublished(self, limit: int = 500) -> tuple[list[Alert], list[Alert]]:
        """Alerts not yet announced, and acknowledgements not yet announced (oldest first)."""
        async with self.engine.connect() as connection:
            new = await connection.execute(
                sa.select(alerts).where(alerts.c.published.is_(False))
                .order_by(alerts.c.raised_ms, alerts.c.at_ms, alerts.c.id).limit(limit)
            )
            acked = await connection.execute(
                sa.select(alerts).where(alerts.c.acked_by.is_not(None),
                                        alerts.c.ack_published.is_(False))
                .order_by(alerts.c.acked_ms, alerts.c.id).limit(limit)
            )
            return [_alert(row) for row in new], [_alert(row) for row in acked]

    async def mark_published(self, new: Sequence[str], acked: Sequence[str]) -> None:
        async with self.engine.begin() as connection:
            if new:
                await connection.execute(
                    alerts.update().where(alerts.c.id.in_(list(new))).values(published=True)
                )
            if acked:
                await connection.execute(
                    alerts.update().where(alerts.c.id.in_(list(acked)))
                    .values(ack_published=True)
                )

    # Webhooks -------------------------------------------------------------------------------
    async def webhook_pending(self, teams: Sequence[str], limit: int = 50) -> list[Alert]:
        """Announced alerts of `teams` not yet delivered to their webhook, oldest first."""
        if not teams:
            return []
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(alerts).where(alerts.c.team.in_(list(teams)),
                                        alerts.c.published.is_(True), alerts.c.hook_state == 0)
                .order_by(alerts.c.raised_ms, alerts.c.at_ms, alerts.c.id).limit(limit)
            )
            return [_alert(row) for row in rows]

    async def mark_hooked(self, alert_ids: Sequence[str], state: int) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                alerts.update().where(alerts.c.id.in_(list(alert_ids))).values(hook_state=state)
            )

    # Rule state ----------------------------------------------------------------------------
    async def load_state(self) -> tuple[dict[tuple[str, str], Any], dict[str, str]]:
        """Every (team, worker) state (decoded JSON) and each team's applied cursor."""
        async with self.engine.connect() as connection:
            states = {
                (row.team, row.worker): orjson.loads(row.state)
                for row in await connection.execute(sa.select(rule_state))
            }
            cursors = {row.team: row.cursor
                       for row in await connection.execute(sa.select(rule_cursors))}
        return states, cursors

    async def apply(
        self,
        new_alerts: Iterable[Alert],
        states: Mapping[tuple[str, str], Any],
        cursors: Mapping[str, str],
    ) -> int:
        """In one transaction: insert the alerts (a known id is ignored), save the changed
        workers' states and the teams' applied cursors. The number of alerts inserted."""
        rows = [alert.row() for alert in new_alerts]
        inserted = 0
        async with self.engine.begin() as connection:
            for row in rows:
                result = await connection.execute(
                    self._insert(alerts).values(**row).on_conflict_do_nothing()
                )
                inserted += max(result.rowcount, 0)
            if states:  # one statement for all of them (executemany)
                await connection.execute(self._upsert_state, [
                    {"team": team, "worker": worker, "state": orjson.dumps(state).decode()}
                    for (team, worker), state in states.items()
                ])
            if cursors:
                await connection.execute(self._upsert_cursor, [
                    {"team": team, "cursor": cursor} for team, cursor in cursors.items()
                ])
        return inserted


    # Privacy -------------------------------------------------------------------------------
    async def delete_older(self, team: str, before_ms: int) -> int:
        async with self.engine.begin() as connection:
            result = await connection.execute(
                alerts.delete().where(alerts.c.team == team, alerts.c.at_ms < before_ms)
            )
        return max(result.rowcount, 0)

    async def erase_worker(self, team: str, worker: str, before_ms: int | None = None) -> int:
        condition = sa.and_(alerts.c.team == team, alerts.c.worker == worker)
        if before_ms is not None:
            condition = sa.and_(condition, alerts.c.at_ms < before_ms)
        async with self.engine.begin() as connection:
            result = await connection.execute(alerts.delete().where(condition))
            if before_ms is None:
                await connection.execute(rule_state.delete().where(
                    rule_state.c.team == team, rule_state.c.worker == worker))
        return max(result.rowcount, 0)

    async def worker_alerts(self, team: str, worker: str) -> list[Alert]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(alerts).where(alerts.c.team == team, alerts.c.worker == worker)
                .order_by(alerts.c.at_ms, alerts.c.id)
            )
            return [_alert(row) for row in rows]
