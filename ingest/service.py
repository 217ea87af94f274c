"""The ingest: the backend's all-teams feed into the SQL history, each position stored once.

At-least-once in, exactly-once stored. The ingest reads the backend through a consumer group
with acknowledgement (`Backend.consume(..., acknowledge=True)`): Redis Streams XREADGROUP, with
pending entries re-read or reclaimed after a crash; Kafka, offsets committed on acknowledgement.
It acknowledges a batch only after the database transaction holding its rows has committed, so
a crash at any point makes the backend deliver the batch again, and the insert-or-ignore on
each position's key (`teamtrack.history`) turns the second delivery into nothing.

Two tasks and a bounded queue between them: the reader takes batches off the backend and
decodes them while the writer writes the previous ones, and the writer merges whatever is
queued (up to `max_batch_positions` rows) into one transaction. A third task applies retention.
Odd events (that a bridge should never have let through) are counted and skipped; a database
that fails is retried with backoff, holding the batches unacknowledged, never skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from teamtrack.backends import Backend, BackendError, Event, GroupBatch, GroupConsumer
from teamtrack.contract import Kind
from teamtrack.history import HistoryStore, StoredPosition, WriteResult
from teamtrack.history_decode import DecodedBatch, decode_batch
from teamtrack.history_privacy import DEFAULT_RETENTION_DAYS, Deleted, sweep
from teamtrack.logs import RateLimitedLog
from teamtrack.metrics import LAG_BUCKETS
from teamtrack.registry import RegistryError, load_registry
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

# The origin of what the history gives back to a backend's last-known store.
RECOVERED_ORIGIN = "history"


def position_event(position: StoredPosition) -> Event:
    """A stored position as the event a bridge would have forwarded (its payload rebuilt)."""
    payload = {
        name: value for name, value in (
            ("lat", position.lat), ("lon", position.lon), ("ts", position.ts),
            ("seq", position.seq), ("acc", position.acc), ("speed", position.speed),
            ("heading", position.heading), ("battery", position.battery),
        ) if value is not None
    }
    return Event(position.team, position.worker, Kind.POSITION, orjson.dumps(payload),
                 RECOVERED_ORIGIN, position.ts, position.ts, 1)


@dataclass(frozen=True)
class IngestConfig:
    group: str = "ingest"
    consumer: str = "ingest-1"
    max_batch_positions: int = 5000
    max_pending_batches: int = 1000
    # The backend is read with this pace (`Backend.consume(pace_s=...)`), so that what a
    # transaction writes gathers this long: a read, a commit and an acknowledgement per backend
    # batch (every few milliseconds at any rate) would cost more than the rows themselves.
    write_interval_s: float = 0.05
    # Below `quiet_rows_per_s` (what the last write took, per second since the one before) the
    # reads are paced at `quiet_write_interval_s` instead: a transaction, a read and an
    # acknowledgement cost about as much for a handful of rows as for hundreds, and the bursts
    # that a longer interval makes are small at such rates (0: always `write_interval_s`).
    quiet_write_interval_s: float = 0.25
    quiet_rows_per_s: float = 400.0
    # Days of history kept (0: all), per team where the registry says (`retention_teams`,
    # re-read from `registry_path` before each sweep when one is given).
    retention_days: float = DEFAULT_RETENTION_DAYS
    retention_teams: Mapping[str, float] = field(default_factory=dict)
    registry_path: Path | None = None
    retention_interval_s: float = 600.0
    retention_chunk: int = 2000
    retention_pause_s: float = 0.02
    # How often to check whether the backend lost its last-known store (a Redis restarted
    # without its data) and give it back from the history; 0: never.
    recover_interval_s: float = 5.0
    # How often the consumer-group lag in entries is asked of the backend (0: never).
    backlog_interval_s: float = 2.0


@dataclass
class IngestCounters:
    """Plain integers bumped per write (cheap); turned into Prometheus metrics on scrape."""

    batches: int = 0
    writes: int = 0
    positions_stored: int = 0
    positions_duplicate: int = 0
    presence_stored: int = 0
    presence_duplicate: int = 0
    events_stored: int = 0
    events_duplicate: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    database_errors: int = 0
    ack_errors: int = 0
    retention_deleted: int = 0
    retention_sweeps: int = 0
    queued_batches: int = 0
    # The consumer-group lag in entries (`GroupConsumer.backlog`), checked every
    # `backlog_interval_s`; None: not known (yet).
    backlog_entries: int | None = None
    log_entries_missed: int = 0
    last_known_recovered: int = 0

    def add(self, result: WriteResult) -> None:
        self.writes += 1
        self.positions_stored += result.positions_stored
        self.positions_duplicate += result.positions_duplicate
        self.presence_stored += result.presence_stored
        self.presence_duplicate += result.presence_duplicate
        self.events_stored += result.events_stored
        self.events_duplicate += result.events_duplicate


class _CountersCollector(Collector):
    def __init__(self, counters: IngestCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Any]:
        counters = self._counters
        for name, help_text, value in (
            ("batches", "Backend batches written and acknowledged", counters.batches),
            ("writes", "Database transactions committed", counters.writes),
            ("positions_stored", "Positions inserted", counters.positions_stored),
            ("positions_duplicate", "Positions delivered again and ignored",
             counters.positions_duplicate),
            ("presence_stored", "Presence changes inserted", counters.presence_stored),
            ("presence_duplicate", "Presence changes delivered again and ignored",
             counters.presence_duplicate),
            ("events_stored", "Worker events inserted", counters.events_stored),
            ("events_duplicate", "Worker events delivered again and ignored",
             counters.events_duplicate),
            ("database_errors", "Failed database writes (retried)", counters.database_errors),
            ("ack_errors", "Failed acknowledgements (the batch comes again)",
             counters.ack_errors),
            ("retention_deleted", "Rows deleted by retention", counters.retention_deleted),
            ("retention_sweeps", "Retention passes completed", counters.retention_sweeps),
            ("log_entries_missed",
             "Backend log entries trimmed before the ingest read them (lost for the history)",
             counters.log_entries_missed),
            ("last_known_recovered",
             "Last-known positions and presence given back to a backend that lost them",
             counters.last_known_recovered),
        ):
            family = CounterMetricFamily(f"teamtrack_ingest_{name}", help_text)
            family.add_metric([], value)
            yield family
        skipped = CounterMetricFamily(
            "teamtrack_ingest_skipped", "Odd events counted and skipped", labels=["reason"]
        )
        for reason, count in counters.skipped.items():
            skipped.add_metric([reason], count)
        yield skipped
        queued = GaugeMetricFamily(
            "teamtrack_ingest_queued_batches", "Batches read and not yet written"
        )
        queued.add_metric([], counters.queued_batches)
        yield queued
        if counters.backlog_entries is not None:
            backlog = GaugeMetricFamily(
                "teamtrack_ingest_backlog_entries",
                "Consumer-group lag in entries: backend log entries (batches) the ingest group "
                "has not acknowledged yet, read or not (Redis: the group's; Kafka: this "
                "member's partitions)",
            )
            backlog.add_metric([], counters.backlog_entries)
            yield backlog


_Queued = tuple[GroupBatch, DecodedBatch]


def first_received_ms(rows: DecodedBatch) -> int | None:
    """When the first event of a backend batch came in (a presence row's `ts` is its receipt)."""
    if rows.positions:
        return int(rows.positions[0]["received_ms"])
    if rows.presence:
        return int(rows.presence[0]["ts"])
    if rows.events:
        return int(rows.events[0]["received_ms"])
    return None


class IngestService:
    def __init__(
        self,
        config: IngestConfig,
        backend: Backend,
        store: HistoryStore,
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.backend = backend
        self.store = store
        self.counters = IngestCounters()
        registry.register(_CountersCollector(self.counters))
        self._write_seconds = Histogram(
            "teamtrack_ingest_write_seconds", "Database transaction of one write",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0),
            registry=registry,
        )
        self._write_rows = Histogram(
            "teamtrack_ingest_write_rows", "Rows per database transaction",
            buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000),
            registry=registry,
        )
        self._retention_seconds = Histogram(
            "teamtrack_ingest_retention_seconds", "One retention pass over every team",
            buckets=(0.01, 0.1, 1.0, 10.0, 60.0, 600.0), registry=registry,
        )
        self._retention_teams: Mapping[str, float] = dict(config.retention_teams)
        self._lag = Histogram(
            "teamtrack_ingest_lag_seconds",
            "A way in's receipt of a backend batch's first event to the commit holding it (one"
            " sample per backend batch)",
            buckets=LAG_BUCKETS, registry=registry,
        )
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(config.max_pending_batches)
        self._tasks: list[asyncio.Task[None]] = []
        self._written = asyncio.Condition()
        self._pace_s = config.write_interval_s
        self._odd_log = RateLimitedLog(log)
        self._database_log = RateLimitedLog(log)

    # Lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the backend, bring the schema to the newest revision, start reading."""
        await self.backend.start()
        await self.store.migrate()
        consumer = self.backend.consume(
            self.config.group, self.config.consumer, start="earliest", acknowledge=True,
            pace_s=self.config.write_interval_s,
        )
        self._tasks.append(asyncio.create_task(self._read(consumer), name="ingest-reader"))
        self._tasks.append(asyncio.create_task(self._write(consumer), name="ingest-writer"))
        if self.config.backlog_interval_s > 0:
            self._tasks.append(
                asyncio.create_task(self._watch_backlog(consumer), name="ingest-backlog"))
        if self.config.retention_days > 0 or any(self.config.retention_teams.values()) or (
            self.config.registry_path is not None
        ):
            self._tasks.append(asyncio.create_task(self._retain(), name="ingest-retention"))
        if self.config.recover_interval_s > 0:
            self._tasks.append(
                asyncio.create_task(self._recover_last_known(), name="ingest-last-known")
            )

    async def wait(self) -> None:
        """Return when a task of the service ended; raise its error if it failed."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def wait_stored(self, positions: int) -> None:
        """Return once this service has stored (not counting duplicates) `positions`."""
        async with self._written:
            await self._written.wait_for(lambda: self.counters.positions_stored >= positions)

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Take what the backend holds now, write and acknowledge what was read (for up to
        `flush_timeout`), then close. What is still unwritten is unacknowledged: the backend
        delivers it again to the next ingest of the group."""
        reader = self._tasks[0] if self._tasks else None
        if reader is not None and not reader.done():
            # The reader reads at most every `write_interval_s` (or quiet one): one more of its
            # reads takes the tail (the last moments before a cluster stops) instead of leaving
            # it unread.
            await asyncio.sleep(2 * self._pace_s)
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), flush_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.backend.close()
        await self.store.close()

    # Reading -------------------------------------------------------------------------------
    async def _read(self, consumer: GroupConsumer) -> None:
        async with consumer:
            async for item in consumer:
                decoded = decode_batch(item.batch.team, item.batch.raw)
                if decoded.skipped:
                    self._count_skipped(item, decoded)
                await self._queue.put((item, decoded))
                self.counters.queued_batches = self._queue.qsize()
                self.counters.log_entries_missed = consumer.missed

    def _count_skipped(self, item: GroupBatch, decoded: DecodedBatch) -> None:
        self.counters.skipped.update(decoded.skipped)
        for reason, count in decoded.skipped.items():
            self._odd_log.warning(
                reason, "skipped %d odd event(s) (%s) in a batch of team %r at %s",
                count, reason, item.batch.team[:64], item.batch.cursor,
            )

    # Writing -------------------------------------------------------------------------------
    def _pace_for(self, rows: int, seconds: float) -> float:
        """The read pace after a write of `rows` that came `seconds` after the previous one."""
        config = self.config
        quiet = config.quiet_write_interval_s
        if quiet <= config.write_interval_s or rows >= config.quiet_rows_per_s * seconds:
            return config.write_interval_s
        return quiet

    async def _write(self, consumer: GroupConsumer) -> None:
        last_write = time.monotonic()
        while True:
            items = [await self._queue.get()]
            rows = DecodedBatch()
            rows.extend(items[0][1])
            while not self._queue.empty() and len(rows.positions) < self.config.max_batch_positions:
                item = self._queue.get_nowait()
                items.append(item)
                rows.extend(item[1])
            self.counters.queued_batches = self._queue.qsize()
            if rows.positions or rows.presence or rows.events:
                self.counters.add(await self._write_until_done(rows))
            now = time.monotonic()
            pace = self._pace_for(len(rows.positions), now - last_write)
            last_write = now
            if pace != self._pace_s:
                self._pace_s = pace
                consumer.set_pace(pace)
            await self._acknowledge(consumer, [group_batch for group_batch, _rows in items])
            for _item in items:
                self._queue.task_done()
            self.counters.batches += len(items)
            self._observe_lag(items)
            async with self._written:
                self._written.notify_all()

    async def _watch_backlog(self, consumer: GroupConsumer) -> None:
        """`teamtrack_ingest_backlog_entries`: the group's lag in entries, now and then."""
        while True:
            try:
                self.counters.backlog_entries = await consumer.backlog()
            except Exception as error:  # a backend away: the reader reports it; keep watching
                log.debug("backlog not known: %s", error)
                self.counters.backlog_entries = None
            await asyncio.sleep(self.config.backlog_interval_s)

    def _observe_lag(self, items: list[_Queued]) -> None:
        """One sample per backend batch, from its first event's receipt (`rx`, stamped by the
        bridge or gateway on this host's clock) to now, after the commit and acknowledgement."""
        now_ms = time.time() * 1000
        for _item, rows in items:
            received_ms = first_received_ms(rows)
            if received_ms is not None:
                self._lag.observe(max(now_ms - received_ms, 0.0) / 1000)

    async def _write_until_done(self, rows: DecodedBatch) -> WriteResult:
        backoff = Backoff(initial=0.2, maximum=10.0)
        while True:
            started = time.perf_counter()
            try:
                result = await self.store.write(rows.positions, rows.presence, rows.events)
            except (SQLAlchemyError, OSError) as error:
                self.counters.database_errors += 1
                delay = backoff.next_delay()
                self._database_log.warning(
                    "write", "history write failed (%s: %s); retrying in %.1fs",
                    type(error).__name__, str(error).splitlines()[0][:200], delay,
                )
                await asyncio.sleep(delay)
                continue
            self._write_seconds.observe(time.perf_counter() - started)
            self._write_rows.observe(len(rows.positions) + len(rows.presence) + len(rows.events))
            return result

    async def _acknowledge(self, consumer: GroupConsumer, items: list[GroupBatch]) -> None:
        try:
            await consumer.acknowledge(items)
        except Exception as error:
            # Any driver's error: the rows are committed, so a batch that comes again because
            # its acknowledgement was lost is stored as nothing. Count it and go on.
            self.counters.ack_errors += 1
            self._database_log.warning(
                "ack", "acknowledging batches failed (%s: %s); they will come again",
                type(error).__name__, error,
            )

    # Retention -----------------------------------------------------------------------------
    async def _recover_last_known(self) -> None:
        """Give a backend that lost its last-known store (managers' snapshots would list only
        the workers heard from since) each worker's newest position and presence from the
        history, within `recover_interval_s` of the loss."""
        while True:
            try:
                recovered = await self.backend.recover_last_known(self._last_known_events)
            except (BackendError, SQLAlchemyError, OSError) as error:
                self._database_log.warning("last-known", "recovering last-known failed: %s", error)
            else:
                if recovered:
                    self.counters.last_known_recovered += recovered
                    log.warning("the backend had lost its last-known positions: gave back %d "
                                "positions and presence changes from the history", recovered)
            await asyncio.sleep(self.config.recover_interval_s)

    async def _last_known_events(self) -> list[Event]:
        events = []
        for team in await self.store.teams():
            newest_positions, newest_presence = await self.store.last_known(team)
            events += [position_event(position) for position in newest_positions]
            events += [
                Event(team, change.worker, Kind.STATUS, change.status.encode(), RECOVERED_ORIGIN,
                      change.ts, change.ts, 1)
                for change in newest_presence
            ]
        return events

    def _team_retention(self) -> Mapping[str, float]:
        """The registry's per-team retention, read again (an operator may have edited it);
        the last good one if it cannot be read now."""
        path = self.config.registry_path
        if path is None:
            return self._retention_teams
        try:
            registry = load_registry(path)
        except RegistryError as error:
            self._database_log.warning(
                "registry", "retention: registry unreadable, keeping the last one (%s)", error
            )
        else:
            self._retention_teams = {
                team.id: team.retention_days for team in registry.teams
                if team.retention_days is not None
            }
        return self._retention_teams

    async def retain_once(self) -> Deleted:
        """One retention pass (the background task runs one every `retention_interval_s`)."""
        deleted = await sweep(
            self.store, self._team_retention(), self.config.retention_days,
            chunk=self.config.retention_chunk, pause_s=self.config.retention_pause_s,
        )
        self.counters.retention_deleted += deleted.total
        self.counters.retention_sweeps += 1
        self._retention_seconds.observe(deleted.seconds)
        if deleted.total:
            log.info(
                "retention: deleted %d positions, %d presence changes, %d events of %d "
                "team(s) in %d statements, %.2fs", deleted.positions, deleted.presence,
                deleted.events, len(deleted.by_team), deleted.statements, deleted.seconds,
            )
        return deleted

    async def _retain(self) -> None:
        while True:
            try:
                await self.retain_once()
            except (SQLAlchemyError, OSError) as error:
                self.counters.database_errors += 1
                log.warning("retention failed (%s); next try in %.0fs",
                            error, self.config.retention_interval_s)
            await asyncio.sleep(self.config.retention_interval_s)
