"""The position history in SQL: tables and the store (writes and queries); a backend batch
becomes rows in `teamtrack.history_decode`.

Both the ingest (writes) and the dashboard (reads) use it; exports and summaries are in
`teamtrack.history_export`. SQLite (`sqlite+aiosqlite:///path`) by default, PostgreSQL
(`postgresql+asyncpg://...`) at scale; the schema is created and migrated by Alembic
(`teamtrack/migrations`, `HistoryStore.migrate`).

Exactly once. A position is stored once per (team, worker, device run, seq). The contract has
no run id: `seq` restarts at 0 when a device restarts. Within one run a seq is used once, so two
deliveries of one message carry the same (seq, ts); two runs of one device that reuse a seq do
so at different fix times, because a later run's fixes are taken later. The fix time therefore
stands for the run in the key, which is `UNIQUE (team, worker, ts, seq)`: a redelivered message
is ignored (`INSERT ... ON CONFLICT DO NOTHING`), a restarted device's seq 0 is kept. The key
depends on nothing but the message, so it is the same whatever order, process or retry brings
the message in. (Only a device that restarts *and* reports, under the same seq, a fix with the
very same millisecond as before would be taken for a repeat: that is the same point anyway.)
Runs are recovered when reading: ordered by fix time, a run starts where seq does not increase.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
# The PostgreSQL advisory lock every migrating process takes (any constant; this is "ttmigr").
MIGRATION_LOCK_KEY: Final = 0x74746D69677200
HISTORY_FILE_NAME: Final = "history.sqlite3"
DEFAULT_PAGE_SIZE: Final = 1000
MAX_PAGE_SIZE: Final = 10_000

metadata = sa.MetaData()

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

positions = sa.Table(
    "positions",
    metadata,
    # INTEGER PRIMARY KEY on SQLite (the rowid itself), BIGINT identity on PostgreSQL.
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False, comment="device fix time, epoch ms"),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("lat", sa.Double, nullable=False),
    sa.Column("lon", sa.Double, nullable=False),
    sa.Column("acc", sa.Double),
    sa.Column("speed", sa.Double),
    sa.Column("heading", sa.Double),
    sa.Column("battery", sa.Double),
    sa.Column("origin", sa.String(64), nullable=False, comment="broker the device used"),
    sa.Column("received_ms", sa.BigInteger, nullable=False, comment="bridge receive time"),
    # One row per message, and "a worker between two times" (ordered by ts, seq).
    sa.UniqueConstraint("team", "worker", "ts", "seq", name="uq_positions_worker_fix"),
    # "A team between two times" (ordered by ts, id); also what retention deletes by.
    sa.Index("ix_positions_team_time", "team", "ts", "id"),
)

presence_changes = sa.Table(
    "presence_changes",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False, comment="bridge receive time, epoch ms"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("origin", sa.String(64), nullable=False),
    sa.UniqueConstraint("team", "worker", "ts", "status", name="uq_presence_worker_change"),
    sa.Index("ix_presence_team_time", "team", "ts", "id"),
)


worker_events = sa.Table(
    "worker_events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False, comment="when it happened, epoch ms"),
    sa.Column("type", sa.String(16), nullable=False, comment="transition"),
    sa.Column("event", sa.String(16), nullable=False, comment="enter / leave"),
    sa.Column("region", sa.String(200), nullable=False, comment="region id, else its name"),
    sa.Column("body", sa.Text, nullable=False, comment="the event as the contract's JSON"),
    sa.Column("origin", sa.String(64), nullable=False),
    sa.Column("received_ms", sa.BigInteger, nullable=False),
    # A resend (same time, same region, same event) is the same row.
    sa.UniqueConstraint("team", "worker", "ts", "type", "event", "region",
                        name="uq_worker_events_event"),
    sa.Index("ix_worker_events_team_time", "team", "ts", "id"),
)


def default_database_url(state_dir: Path | str) -> str:
    """The SQLite file of a state folder, as the ingest and the dashboard both default to."""
    return f"sqlite+aiosqlite:///{Path(state_dir) / HISTORY_FILE_NAME}"


# Reading -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredPosition:
    team: str
    worker: str
    ts: int
    seq: int
    lat: float
    lon: float
    acc: float | None
    speed: float | None
    heading: float | None
    battery: float | None

    def document(self) -> dict[str, Any]:
        """The JSON form of the API: the device's fields, plus the worker."""
        return {
            "worker": self.worker, "ts": self.ts, "seq": self.seq, "lat": self.lat,
            "lon": self.lon, "acc": self.acc, "speed": self.speed, "heading": self.heading,
            "battery": self.battery,
        }


@dataclass(frozen=True, slots=True)
class PresenceChange:
    team: str
    worker: str
    ts: int
    status: str

    def document(self) -> dict[str, Any]:
        return {"worker": self.worker, "ts": self.ts, "status": self.status}


class BadCursor(ValueError):
    """A page cursor that this query did not hand out."""


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where the next page starts: after (ts, tiebreak) in the query's order. Opaque outside."""

    query: str
    ts: int
    tiebreak: int

    def encode(self) -> str:
        raw = f"{self.query}:{self.ts}:{self.tiebreak}".encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str, query: str) -> PageCursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
            name, ts, tiebreak = raw.split(":")
            cursor = cls(name, int(ts), int(tiebreak))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadCursor("malformed cursor") from None
        if cursor.query != query:
            raise BadCursor("cursor of another query")
        return cursor


ItemT = TypeVar("ItemT")


@dataclass(frozen=True, slots=True)
class Page(Generic[ItemT]):
    items: list[ItemT]
    next: PageCursor | None


class TooManyPoints(ValueError):
    """A whole-track read over its limit: the caller should ask for a shorter window."""


_POSITION_FIELDS: Final = (
    positions.c.team, positions.c.worker, positions.c.ts, positions.c.seq, positions.c.lat,
    positions.c.lon, positions.c.acc, positions.c.speed, positions.c.heading,
    positions.c.battery,
)


def _stored(row: Any) -> StoredPosition:
    return StoredPosition(
        row.team, row.worker, row.ts, row.seq, row.lat, row.lon, row.acc, row.speed,
        row.heading, row.battery,
    )


async def _distinct(
    connection: AsyncConnection, column: sa.Column[str], *where: sa.ColumnElement[bool]
) -> list[str]:
    """The distinct values of an indexed column (under `where`), one index seek each: a loose
    index scan, where `SELECT DISTINCT` would read every row."""
    found = []
    smallest = sa.select(sa.func.min(column))
    value = await connection.scalar(smallest.where(*where))
    while value is not None:
        found.append(value)
        value = await connection.scalar(smallest.where(*where, column > value))
    return found


def _after(ts: sa.ColumnElement[int], tiebreak: sa.ColumnElement[int], cursor: PageCursor
           ) -> sa.ColumnElement[bool]:
    """(ts, tiebreak) > cursor, spelled so that both SQLite and PostgreSQL use the index."""
    return sa.and_(
        ts >= cursor.ts,
        sa.or_(ts > cursor.ts, tiebreak > cursor.tiebreak),
    )


# Writing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteResult:
    positions_stored: int
    positions_duplicate: int
    presence_stored: int
    presence_duplicate: int
    events_stored: int = 0
    events_duplicate: int = 0


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers (dashboards) never block the writer (ingest) and the other way round.
    # synchronous=NORMAL: in WAL mode a power cut may lose the last commits, never corrupts;
    # the backend redelivers what was not acknowledged, so nothing is lost for good.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An async engine for a history URL; SQLite files get their folder and WAL mode."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    raise ValueError(
        f"unsupported history database {parsed.get_backend_name()!r}; use "
        "sqlite+aiosqlite:///path or postgresql+asyncpg://user@host:port/database"
    )


def _lock_file(path: Path) -> int:
    """Open `path` (0600) and wait for an exclusive lock on it; returns the descriptor."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _postgresql_type(column_type: sa.types.TypeEngine[Any]) -> str:
    if isinstance(column_type, sa.String):
        return "text"
    if isinstance(column_type, sa.Double):
        return "float8"
    if isinstance(column_type, sa.Integer):
        return "bigint"
    raise TypeError(f"no array type for {column_type!r}")


def _insert_or_ignore(dialect: str, table: sa.Table) -> sa.Executable | str:
    """The statement `HistoryStore.write` runs with a batch of rows of `table`.

    SQLite: `INSERT ... ON CONFLICT DO NOTHING` as the driver's own SQL, run with tuples for
    many rows (executemany) in one transaction: SQLAlchemy's compiled statements build each
    row's parameters in Python, which cost more than SQLite's insert itself. PostgreSQL: one
    statement for the whole batch, its columns sent as arrays (`INSERT ... SELECT * FROM
    unnest(...) ON CONFLICT DO NOTHING`): one round trip, and a row count of what was really
    inserted, which asyncpg's executemany does not report.
    """
    columns = _inserted_columns(table)
    names = ", ".join(column.name for column in columns)
    if dialect == "postgresql":
        arrays = ", ".join(
            f"CAST(:{column.name} AS {_postgresql_type(column.type)}[])" for column in columns
        )
        return sa.text(
            f"INSERT INTO {table.name} ({names}) SELECT * FROM unnest({arrays}) "  # noqa: S608
            "ON CONFLICT DO NOTHING"
        )
    marks = ", ".join("?" for _ in columns)
    return (
        f"INSERT INTO {table.name} ({names}) VALUES ({marks}) "  # noqa: S608
        "ON CONFLICT DO NOTHING"
    )


def _inserted_columns(table: sa.Table) -> list[sa.Column[Any]]:
    return [column for column in table.columns if column.name != "id"]


class HistoryStore:
    """Writes and queries over one database. Times are epoch milliseconds; windows are
    [since, until). Errors of the database or its driver surface as `SQLAlchemyError`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._insert_positions = _insert_or_ignore(engine.dialect.name, positions)
        self._insert_presence = _insert_or_ignore(engine.dialect.name, presence_changes)
        self._insert_events = _insert_or_ignore(engine.dialect.name, worker_events)

    @classmethod
    def from_url(cls, url: str) -> HistoryStore:
        """No I/O: the first query connects. Call `migrate` before writing."""
        return cls(create_engine(url))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest Alembic revision.

        Safe for processes that migrate one database at the same moment (the ingest and the
        rules service at `teamtrack up`): one migrates, the others wait for it and then find
        the schema at the newest revision. PostgreSQL: a transaction-scoped advisory lock.
        SQLite (whose driver commits each DDL statement on its own): an exclusive lock on a
        file beside the database, held while migrating."""
        database = make_url(str(self.engine.url)).database
        if self.dialect == "sqlite" and database and database != ":memory:":
            lock_path = Path(f"{database}.migrate-lock")
            descriptor = await asyncio.to_thread(_lock_file, lock_path)
            try:
                await self._upgrade()
            finally:
                os.close(descriptor)  # closing releases the lock
            return
        await self._upgrade()

    async def _upgrade(self) -> None:
        async with self.engine.begin() as connection:
            if self.dialect == "postgresql":
                await connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            await connection.run_sync(_upgrade_to_head)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
        except (SQLAlchemyError, OSError):
            return False
        return True

    async def write(
        self,
        position_rows: Sequence[Mapping[str, Any]],
        presence_rows: Sequence[Mapping[str, Any]],
        event_rows: Sequence[Mapping[str, Any]] = (),
    ) -> WriteResult:
        """Insert-or-ignore every kind of row in one transaction."""
        stored = presence_stored = events_stored = 0
        async with self.engine.begin() as connection:
            if position_rows:
                stored = await self._insert(
                    connection, self._insert_positions, positions, position_rows
                )
            if presence_rows:
                presence_stored = await self._insert(
                    connection, self._insert_presence, presence_changes, presence_rows
                )
            if event_rows:
                events_stored = await self._insert(
                    connection, self._insert_events, worker_events, event_rows
                )
        return WriteResult(
            positions_stored=stored,
            positions_duplicate=len(position_rows) - stored,
            presence_stored=presence_stored,
            presence_duplicate=len(presence_rows) - presence_stored,
            events_stored=events_stored,
            events_duplicate=len(event_rows) - events_stored,
        )

    async def _insert(
        self,
        connection: AsyncConnection,
        statement: sa.Executable | str,
        table: sa.Table,
        rows: Sequence[Mapping[str, Any]],
    ) -> int:
        names = [column.name for column in _inserted_columns(table)]
        # One C call per row (itemgetter) rather than a Python loop over the columns.
        values = list(map(itemgetter(*names), rows))
        if isinstance(statement, str):
            # Tuples straight to the driver's executemany (see `_insert_or_ignore`).
            result = await connection.exec_driver_sql(statement, values)
        else:
            arrays = dict(zip(names, map(list, zip(*values, strict=True)), strict=True))
            result = await connection.execute(statement, arrays)
        return max(result.rowcount, 0)

    async def track(
        self,
        team: str,
        worker: str,
        since_ms: int,
        until_ms: int,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: PageCursor | None = None,
    ) -> Page[StoredPosition]:
        """One worker's positions in [since, until), by fix time then seq, a page at a time."""
        where = [
            positions.c.team == team,
            positions.c.worker == worker,
            positions.c.ts >= since_ms,
            positions.c.ts < until_ms,
        ]
        if after is not None:
            where.append(_after(positions.c.ts, positions.c.seq, after))
        query = (
            sa.select(*_POSITION_FIELDS)
            .where(*where)
            .order_by(positions.c.ts, positions.c.seq)
            .limit(limit + 1)
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        items = [_stored(row) for row in rows[:limit]]
        more = len(rows) > limit
        next_cursor = PageCursor("track", items[-1].ts, items[-1].seq) if more else None
        return Page(items, next_cursor)

    async def whole_track(
        self, team: str, worker: str, since_ms: int, until_ms: int, max_points: int
    ) -> list[StoredPosition]:
        """Every position of the window (for exports and summaries); `TooManyPoints` beyond."""
        page = await self.track(team, worker, since_ms, until_ms, limit=max_points)
        if page.next is not None:
            raise TooManyPoints(f"more than {max_points} positions in this window")
        return page.items

    async def _time_page(
        self, name: str, table: sa.Table, columns: Sequence[sa.ColumnElement[Any]], team: str,
        window: tuple[int, int], worker: str | None, limit: int, after: PageCursor | None,
    ) -> tuple[list[Any], PageCursor | None]:
        """Rows of `table` for a team (or one worker) in [since, until), by (ts, id), a page
        at a time: the query of every team-wide listing."""
        since_ms, until_ms = window
        where = [table.c.team == team, table.c.ts >= since_ms, table.c.ts < until_ms]
        if worker is not None:
            where.append(table.c.worker == worker)
        if after is not None:
            where.append(_after(table.c.ts, table.c.id, after))
        query = (
            sa.select(*columns, table.c.id)
            .where(*where)
            .order_by(table.c.ts, table.c.id)
            .limit(limit + 1)
        )
        async with self.engine.connect() as connection:
            rows = list((await connection.execute(query)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, PageCursor(name, rows[-1].ts, rows[-1].id) if more else None

    async def team_window(
        self,
        team: str,
        since_ms: int,
        until_ms: int,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: PageCursor | None = None,
    ) -> Page[StoredPosition]:
        """Every worker's positions of a team in [since, until), by fix time, a page at a time."""
        rows, next_cursor = await self._time_page(
            "team", positions, _POSITION_FIELDS, team, (since_ms, until_ms), None, limit, after
        )
        return Page([_stored(row) for row in rows], next_cursor)

    async def presence(
        self,
        team: str,
        since_ms: int,
        until_ms: int,
        *,
        worker: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        after: PageCursor | None = None,
    ) -> Page[PresenceChange]:
        """Online/offline changes of a team (or one worker) in [since, until), oldest first."""
        table = presence_changes
        rows, next_cursor = await self._time_page(
            "presence", table, (table.c.team, table.c.worker, table.c.ts, table.c.status), team,
            (since_ms, until_ms), worker, limit, after,
        )
        changes = [PresenceChange(row.team, row.worker, row.ts, row.status) for row in rows]
        return Page(changes, next_cursor)

    async def events(
        self, team: str, since_ms: int, until_ms: int, *, worker: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE, after: PageCursor | None = None,
    ) -> Page[dict[str, Any]]:
        """Worker events of a team (or one worker) in [since, until), oldest first: each the
        contract's JSON with its `worker`."""
        table = worker_events
        rows, next_cursor = await self._time_page(
            "events", table, (table.c.worker, table.c.ts, table.c.body), team,
            (since_ms, until_ms), worker, limit, after,
        )
        return Page([{"worker": row.worker, **orjson.loads(row.body)} for row in rows],
                    next_cursor)

    async def teams(self) -> list[str]:
        """Teams with stored positions or presence, found by index seeks (not a table scan)."""
        found: set[str] = set()
        async with self.engine.connect() as connection:
            for table in (positions, presence_changes):
                found.update(await _distinct(connection, table.c.team))
        return sorted(found)

    async def last_known(self, team: str) -> tuple[list[StoredPosition], list[PresenceChange]]:
        """Each worker's newest position and newest presence change: what a backend that lost
        its last-known store is given back (`Backend.recover_last_known`). Two index seeks per
        worker, whatever the length of the history."""
        newest_positions: list[StoredPosition] = []
        newest_presence: list[PresenceChange] = []
        async with self.engine.connect() as connection:
            for worker in await _distinct(connection, positions.c.worker, positions.c.team == team):
                row = (await connection.execute(
                    sa.select(*_POSITION_FIELDS)
                    .where(positions.c.team == team, positions.c.worker == worker)
                    .order_by(positions.c.ts.desc(), positions.c.seq.desc())
                    .limit(1)
                )).one()
                newest_positions.append(_stored(row))
            table = presence_changes
            for worker in await _distinct(connection, table.c.worker, table.c.team == team):
                change = (await connection.execute(
                    sa.select(table.c.ts, table.c.status)
                    .where(table.c.team == team, table.c.worker == worker)
                    .order_by(table.c.ts.desc(), table.c.id.desc())
                    .limit(1)
                )).one()
                newest_presence.append(PresenceChange(team, worker, change.ts, change.status))
        return newest_positions, newest_presence

    async def count(self, team: str | None = None) -> tuple[int, int]:
        """(positions, presence changes) stored, of one team or all."""
        counts = []
        async with self.engine.connect() as connection:
            for table in (positions, presence_changes):
                query = sa.select(sa.func.count()).select_from(table)
                if team is not None:
                    query = query.where(table.c.team == team)
                counts.append(int(await connection.scalar(query) or 0))
        return counts[0], counts[1]


__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "BadCursor",
    "HistoryStore",
    "Page",
    "PageCursor",
    "PresenceChange",
    "StoredPosition",
    "TooManyPoints",
    "WriteResult",
    "create_engine",
    "default_database_url",
    "metadata",
    "positions",
    "presence_changes",
    "worker_events",
]
