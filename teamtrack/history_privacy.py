"""Retention and the tracked person's rights over the SQL history (docs/privacy.md).

* `sweep`: each team's rows older than its retention go, from every history table
  (positions, presence changes, worker events), a few thousand rows per transaction with a
  pause between, so that the ingest's inserts never wait long for the database.
* `erase_worker`: one worker's rows (all, or those before a time) go the same way; the
  erasure itself is recorded in `erasures` (who, when, which worker, how many rows: never a
  position).
* `person_positions` / `person_presence` / `person_events`: everything stored about one
  worker, a page at a time, for `teamtrack history export-person`.

Deletes go by the indexes the tables already have: (team, ts, id) for retention, the
exactly-once keys (team, worker, ts, ...) for a worker. PostgreSQL: plain batched deletes,
no time partitions (a partition can only be dropped whole, while teams keep their history
for different times; docs/privacy.md has the reasons).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa

from teamtrack.alerts import AlertStore, alerts
from teamtrack.history import (
    HistoryStore,
    PresenceChange,
    StoredPosition,
    _distinct,
    metadata,
    positions,
    presence_changes,
    worker_events,
)

DAY_MS: Final = 86_400_000
DEFAULT_RETENTION_DAYS: Final = 90.0
DEFAULT_CHUNK: Final = 2000
DEFAULT_PAUSE_S: Final = 0.02
HISTORY_TABLES: Final = (positions, presence_changes, worker_events)
# The widest window the history's queries take: every row.
ALL_TIME: Final = (-(2**62), 2**62)

erasures = sa.Table(
    "erasures",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("operator", sa.String(200), nullable=False),
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Column("before_ms", sa.BigInteger),
    sa.Column("positions", sa.BigInteger, nullable=False),
    sa.Column("presence", sa.BigInteger, nullable=False),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("last_known", sa.BigInteger),
)


@dataclass
class Deleted:
    """Rows deleted per table, and what it took."""

    positions: int = 0
    presence: int = 0
    events: int = 0
    alerts: int = 0
    statements: int = 0
    seconds: float = 0.0
    by_team: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.positions + self.presence + self.events + self.alerts

    def add(self, table: sa.Table, count: int) -> None:
        if table is positions:
            self.positions += count
        elif table is presence_changes:
            self.presence += count
        else:
            self.events += count


async def _delete_in_batches(
    store: HistoryStore, table: sa.Table, where: list[sa.ColumnElement[bool]], chunk: int,
    pause_s: float, deleted: Deleted,
) -> int:
    """Delete the rows of `table` matching `where`, `chunk` per transaction, oldest first."""
    total = 0
    while True:
        batch = (
            sa.select(table.c.id).where(*where).order_by(table.c.ts).limit(chunk)
            .scalar_subquery()
        )
        async with store.engine.begin() as connection:
            result = await connection.execute(sa.delete(table).where(table.c.id.in_(batch)))
        count = max(result.rowcount, 0)
        deleted.statements += 1
        deleted.add(table, count)
        total += count
        if count < chunk:
            return total
        if pause_s > 0:
            await asyncio.sleep(pause_s)


async def history_teams(store: HistoryStore) -> list[str]:
    """Teams with rows in any history table (an index seek per team, not a scan)."""
    found: set[str] = set()
    async with store.engine.connect() as connection:
        for table in HISTORY_TABLES:
            found.update(await _distinct(connection, table.c.team))
        found.update(await _distinct(connection, alerts.c.team))
    return sorted(found)


def cutoffs(
    teams: list[str], retention_days: Mapping[str, float], default_days: float, now_ms: int
) -> dict[str, int]:
    """Each team's cutoff (rows before it go); teams kept forever (0 days) are left out."""
    found = {}
    for team in teams:
        days = retention_days.get(team, default_days)
        if days > 0:
            found[team] = now_ms - int(days * DAY_MS)
    return found


async def sweep(
    store: HistoryStore,
    retention_days: Mapping[str, float],
    default_days: float = DEFAULT_RETENTION_DAYS,
    *,
    chunk: int = DEFAULT_CHUNK,
    pause_s: float = DEFAULT_PAUSE_S,
    now_ms: int | None = None,
) -> Deleted:
    """One retention pass: for every team in the history, the rows older than its retention
    (`retention_days[team]`, else `default_days`; 0 keeps all) go from every table."""
    started = time.perf_counter()
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    deleted = Deleted()
    teams = await history_teams(store)
    for team, cutoff in cutoffs(teams, retention_days, default_days, now_ms).items():
        for table in HISTORY_TABLES:
            count = await _delete_in_batches(
                store, table, [table.c.team == team, table.c.ts < cutoff], chunk, pause_s,
                deleted,
            )
            if count:
                deleted.by_team[team] = deleted.by_team.get(team, 0) + count
        # The team's alerts age out with its history (by the time of their trigger).
        count = await AlertStore(store.engine).delete_older(team, cutoff)
        deleted.alerts += count
        deleted.statements += 1
        if count:
            deleted.by_team[team] = deleted.by_team.get(team, 0) + count
    deleted.seconds = time.perf_counter() - started
    return deleted


async def erase_worker(
    store: HistoryStore, team: str, worker: str, *, before_ms: int | None = None,
    chunk: int = DEFAULT_CHUNK, pause_s: float = DEFAULT_PAUSE_S,
) -> Deleted:
    """Delete a worker's rows from every history table (only those before `before_ms`)."""
    started = time.perf_counter()
    deleted = Deleted()
    for table in HISTORY_TABLES:
        where = [table.c.team == team, table.c.worker == worker]
        if before_ms is not None:
            where.append(table.c.ts < before_ms)
        await _delete_in_batches(store, table, where, chunk, pause_s, deleted)
    # The worker's alerts too (and, for a whole erase, what the rules service keeps of them).
    deleted.alerts += await AlertStore(store.engine).erase_worker(team, worker, before_ms)
    deleted.statements += 1
    deleted.seconds = time.perf_counter() - started
    return deleted


async def record_erasure(
    store: HistoryStore, *, operator: str, team: str, worker: str, before_ms: int | None,
    deleted: Deleted, last_known: int | None, erasure_id: int | None = None,
) -> int:
    """The erasure in the `erasures` table: who, when, what, how many; no position. Its id;
    with `erasure_id`, that row is updated instead (the totals once the erase is over).

    A running rules service reads new rows (`erasures_after`) and drops what it holds of a
    worker erased whole: `teamtrack history erase` records the erasure after its first pass,
    so that the rules service has dropped it before the second."""
    values = {
        "at_ms": int(time.time() * 1000), "operator": operator[:200], "team": team,
        "worker": worker, "before_ms": before_ms, "positions": deleted.positions,
        "presence": deleted.presence, "events": deleted.events, "last_known": last_known,
    }
    async with store.engine.begin() as connection:
        if erasure_id is not None:
            del values["at_ms"]  # when it began
            await connection.execute(
                erasures.update().where(erasures.c.id == erasure_id).values(**values)
            )
            return erasure_id
        return int(await connection.scalar(
            erasures.insert().values(**values).returning(erasures.c.id)
        ))


@dataclass(frozen=True)
class Erasure:
    id: int
    team: str
    worker: str
    before_ms: int | None


async def erasures_after(store: HistoryStore, after_id: int) -> list[Erasure]:
    """Erasures recorded after the one with `after_id` (`last_erasure_id`), oldest first."""
    query = (sa.select(erasures.c.id, erasures.c.team, erasures.c.worker, erasures.c.before_ms)
             .where(erasures.c.id > after_id).order_by(erasures.c.id))
    async with store.engine.connect() as connection:
        rows = await connection.execute(query)
        return [Erasure(row.id, row.team, row.worker, row.before_ms) for row in rows]


async def last_erasure_id(store: HistoryStore) -> int:
    """The newest erasure's id (0: none yet)."""
    async with store.engine.connect() as connection:
        return int(await connection.scalar(sa.select(sa.func.max(erasures.c.id))) or 0)


async def erasure_log(store: HistoryStore, team: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(erasures).order_by(erasures.c.id)
    if team is not None:
        query = query.where(erasures.c.team == team)
    async with store.engine.connect() as connection:
        rows = (await connection.execute(query)).mappings().all()
    return [dict(row) for row in rows]


async def person_positions(
    store: HistoryStore, team: str, worker: str, page_size: int = 5000
) -> AsyncIterator[list[StoredPosition]]:
    """Every stored position of the worker, by fix time, a page at a time."""
    cursor = None
    while True:
        page = await store.track(team, worker, *ALL_TIME, limit=page_size, after=cursor)
        if page.items:
            yield page.items
        if page.next is None:
            return
        cursor = page.next


async def person_presence(
    store: HistoryStore, team: str, worker: str, page_size: int = 5000
) -> AsyncIterator[list[PresenceChange]]:
    cursor = None
    while True:
        page = await store.presence(team, *ALL_TIME, worker=worker, limit=page_size,
                                    after=cursor)
        if page.items:
            yield page.items
        if page.next is None:
            return
        cursor = page.next


async def person_events(
    store: HistoryStore, team: str, worker: str, page_size: int = 5000
) -> AsyncIterator[list[dict[str, Any]]]:
    cursor = None
    while True:
        page = await store.events(team, *ALL_TIME, worker=worker, limit=page_size,
                                  after=cursor)
        if page.items:
            yield page.items
        if page.next is None:
            return
        cursor = page.next


async def person_counts(store: HistoryStore, team: str, worker: str) -> dict[str, int]:
    """Rows stored about the worker, per table."""
    counts = {}
    async with store.engine.connect() as connection:
        for name, table in zip(("positions", "presence", "events"), HISTORY_TABLES, strict=True):
            query = sa.select(sa.func.count()).select_from(table).where(
                table.c.team == team, table.c.worker == worker
            )
            counts[name] = int(await connection.scalar(query) or 0)
    return counts


__all__ = [
    "DAY_MS",
    "DEFAULT_RETENTION_DAYS",
    "Deleted",
    "Erasure",
    "erase_worker",
    "erasure_log",
    "erasures",
    "erasures_after",
    "history_teams",
    "last_erasure_id",
    "person_counts",
    "person_events",
    "person_positions",
    "person_presence",
    "record_erasure",
    "sweep",
]
