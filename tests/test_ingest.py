"""The ingest against real backends (Redis, Kafka, memory) and databases (SQLite, PostgreSQL):
exactly once through crashes and restarts.

A crash is the ingest's writer dying at its Nth write, either before the transaction or right
after its commit (before any acknowledgement), and the process going away without flushing;
then a new ingest starts, under the same consumer name or another one. Whatever happened, the
stored rows must be exactly what the devices sent, once each. The last test does the same with
a real `python -m ingest` process killed with SIGKILL while positions stream in.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from ingest.service import IngestConfig, IngestService
from ingest.settings import IngestSettings
from teamtrack.backends import Backend, BackendError, Event, from_url
from teamtrack.contract import Kind
from teamtrack.history import HistoryStore, WriteResult, create_engine, positions
from teamtrack.local.servers import free_port, start_redis
from teamtrack.metrics import scrape_totals
from teamtrack.settings import load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEAMS = ("alpha", "bravo", "charlie")
WORKERS = ("w001", "w002", "w003", "w004")
Row = tuple[str, str, int, int]  # team, worker, ts, seq


class StoreThatCrashes(HistoryStore):
    """A real store in a process that dies at its `crash_on`-th write: before the transaction
    starts, or right after it commits (so that the batches are stored but never acknowledged)."""

    def __init__(self, url: str, crash_on: int, after_commit: bool) -> None:
        super().__init__(create_engine(url))
        self.crash_on = crash_on
        self.after_commit = after_commit
        self.writes = 0
        self.crashed = asyncio.Event()

    async def write(
        self,
        position_rows: Sequence[Mapping[str, Any]],
        presence_rows: Sequence[Mapping[str, Any]],
        event_rows: Sequence[Mapping[str, Any]] = (),
    ) -> WriteResult:
        self.writes += 1
        if self.writes == self.crash_on and not self.after_commit:
            self.crashed.set()
            raise asyncio.CancelledError
        result = await super().write(position_rows, presence_rows, event_rows)
        if self.writes == self.crash_on:
            self.crashed.set()
            raise asyncio.CancelledError
        return result


def device_traffic(now_ms: int) -> tuple[list[list[Event]], set[Row], int]:
    """Publishes as bridges would make them, the positions they carry, and how many
    positions the repeated publishes carry again.

    Every worker sends 30 fixes, restarts (seq back to 0, later fix times) and sends 15 more;
    presence changes go along; some publishes are repeated (a bridge's QoS 1 redelivery); one
    position that no bridge would accept rides along and must be skipped.
    """
    sent: set[Row] = set()
    events: list[Event] = []
    for team in TEAMS:
        for worker in WORKERS:
            events.append(status_event(team, worker, "online", now_ms))
            for run_start, count in ((now_ms - 600_000, 30), (now_ms - 300_000, 15)):
                for seq in range(count):
                    ts = run_start + seq * 1000
                    events.append(position_event(team, worker, seq, ts))
                    sent.add((team, worker, ts, seq))
            events.append(status_event(team, worker, "offline", now_ms + 1))
    odd = Event("alpha", "w001", Kind.POSITION, b'{"lat":91,"lon":0,"ts":1,"seq":0}', "b1",
                now_ms, now_ms)
    events.insert(100, odd)
    publishes = [events[index:index + 25] for index in range(0, len(events), 25)]
    repeated = [publishes[3], publishes[7]]  # sent twice upstream
    publishes += repeated
    repeated_positions = sum(e.kind is Kind.POSITION for events in repeated for e in events)
    return publishes, sent, repeated_positions


def position_event(team: str, worker: str, seq: int, ts: int) -> Event:
    body = orjson.dumps({"lat": 52.5 + seq / 1e4, "lon": 13.4, "ts": ts, "seq": seq,
                         "speed": 1.25})
    return Event(team, worker, Kind.POSITION, body, "b1", ts + 20, ts, qos=1)


def status_event(team: str, worker: str, word: str, received_ms: int) -> Event:
    return Event(team, worker, Kind.STATUS, word.encode(), "b1", received_ms, received_ms, 1)


async def stored_rows(url: str) -> list[Row]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            query = sa.select(positions.c.team, positions.c.worker, positions.c.ts,
                              positions.c.seq)
            return [tuple(row) for row in (await connection.execute(query)).all()]  # type: ignore[misc]
    finally:
        await engine.dispose()


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


BackendFactory = Callable[[], Backend]


@pytest.fixture(params=["redis", "kafka", "memory"])
def make_backend(request: pytest.FixtureRequest) -> BackendFactory:
    """A new backend object per process for Redis and Kafka; the same one for memory."""
    if request.param == "memory":
        shared = from_url("memory://")
        return lambda: shared
    if request.param == "kafka":
        kafka_url = request.getfixturevalue("kafka_url")
        return lambda: from_url(kafka_url)
    url = request.getfixturevalue("redis_url")
    return lambda: from_url(f"{url}&claim_idle_ms=300")


@pytest.mark.parametrize(
    ("after_commit", "same_name"),
    [(True, True), (False, False)],
    ids=["crash-after-commit-restart-same-name", "crash-before-commit-another-member"],
)
async def test_exactly_once_through_a_crash_and_a_restart(
    make_backend: BackendFactory, history_url: str, after_commit: bool, same_name: bool
) -> None:
    # Bounded, so that anything stuck fails with a traceback of where it waited.
    scenario = crash_and_restart(make_backend, history_url, after_commit, same_name)
    await asyncio.wait_for(scenario, 60)


async def crash_and_restart(
    make_backend: BackendFactory, history_url: str, after_commit: bool, same_name: bool
) -> None:
    publishes, sent, repeated_positions = device_traffic(int(time.time() * 1000))
    publisher = make_backend()
    await publisher.start()
    config = IngestConfig(consumer="ingest-1", max_batch_positions=100, max_pending_batches=4)

    crashing = StoreThatCrashes(history_url, crash_on=3, after_commit=after_commit)
    first = IngestService(config, make_backend(), crashing, CollectorRegistry())
    await first.start()
    for events in publishes:
        await publisher.publish(events)
    await asyncio.wait_for(crashing.crashed.wait(), 10)
    stored_before_crash = len(await stored_rows(history_url))
    await first.stop(flush_timeout=0)  # gone: nothing flushed, nothing more acknowledged
    assert 0 < stored_before_crash < len(sent)

    restarted_config = IngestConfig(consumer="ingest-1" if same_name else "ingest-2")
    second = IngestService(
        restarted_config, make_backend(), HistoryStore.from_url(history_url), CollectorRegistry()
    )
    await second.start()

    async def everything_stored() -> bool:
        return len(await stored_rows(history_url)) >= len(sent)

    await wait_for(everything_stored)
    await asyncio.sleep(0.5)  # anything extra would land now
    rows = await stored_rows(history_url)
    assert sorted(rows) == sorted(sent)  # every position, once; restarts' seq 0 kept
    both = (first.counters, second.counters)
    assert sum(counters.skipped["bad_position"] for counters in both) >= 1
    duplicates = sum(counters.positions_duplicate for counters in both)
    # What was committed but never acknowledged came again, and was ignored as well.
    assert duplicates > repeated_positions if after_commit else duplicates >= repeated_positions
    presence = (await second.store.presence("alpha", 0, 2**62)).items
    assert sorted(change.status for change in presence) == ["offline"] * 4 + ["online"] * 4
    await second.stop()
    await publisher.close()


async def test_retention_follows_each_teams_registry_entry_while_ingesting(
    tmp_path: Path, history_url: str
) -> None:
    """alpha keeps 1 day (its registry entry), bravo the ingest's default (30 days): the
    ingest's sweeps delete alpha's 3-day-old rows, keep bravo's, and keep storing meanwhile."""
    registry = tmp_path / "registry.yaml"
    registry.write_text("teams:\n  - id: alpha\n    workers: [w001]\n    retention_days: 1\n"
                        "  - id: bravo\n    workers: [w001]\n")
    now = int(time.time() * 1000)
    backend = from_url("memory://")
    service = IngestService(
        IngestConfig(retention_days=30, registry_path=registry, retention_interval_s=0.1,
                     retention_chunk=2, recover_interval_s=0),
        backend, HistoryStore.from_url(history_url), CollectorRegistry(),
    )
    await backend.start()
    await service.start()
    old = now - 3 * 86_400_000
    await backend.publish([position_event(team, "w001", seq, old + seq)
                           for team in ("alpha", "bravo") for seq in range(5)])
    await backend.publish([position_event(team, "w001", 10, now - 60_000)
                           for team in ("alpha", "bravo")])

    async def alphas_old_rows_gone() -> bool:
        stored = await stored_rows(history_url)
        return sorted((team, seq) for team, _worker, _ts, seq in stored) == [
            ("alpha", 10), *(("bravo", seq) for seq in (0, 1, 2, 3, 4, 10))]

    await wait_for(alphas_old_rows_gone, timeout=10)

    async def counted() -> bool:  # once the pass that deleted them is over
        return service.counters.retention_deleted == 5

    await wait_for(counted, timeout=5)
    # Inserts go on between sweeps.
    await backend.publish([position_event("alpha", "w001", 11, now)])
    await service.wait_stored(13)
    await service.stop()


def test_settings_default_to_a_sqlite_file_in_the_state_folder(tmp_path: Path) -> None:
    settings = load_settings(IngestSettings, "python -m ingest", ["--state-dir", str(tmp_path)])
    assert settings.history_url() == f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    explicit = load_settings(
        IngestSettings, "python -m ingest", ["--database-url", "postgresql+asyncpg://h/db"]
    )
    assert explicit.history_url() == "postgresql+asyncpg://h/db"


async def test_killed_ingest_process_restarts_and_stores_everything_once(
    redis_url: str, tmp_path: Path
) -> None:
    """`python -m ingest`, SIGKILLed while positions stream in, then started again."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    backend_url = f"{redis_url}&claim_idle_ms=500"
    env = {key: value for key, value in os.environ.items() if not key.startswith("TEAMTRACK_")}
    argv = [
        sys.executable, "-m", "ingest", "--backend-url", backend_url,
        "--database-url", database_url, "--metrics-port", "0", "--retention-days", "0",
        "--max-batch-positions", "200",
    ]
    log_path = tmp_path / "ingest.log"

    def start_ingest() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=PROJECT_ROOT)

    publisher = from_url(redis_url)
    await publisher.start()
    now = int(time.time() * 1000)
    sent: set[Row] = set()

    async def stream_positions() -> None:
        for step in range(120):
            events = []
            for worker in WORKERS:
                ts = now - 600_000 + step * 1000
                events.append(position_event("alpha", worker, step, ts))
                sent.add(("alpha", worker, ts, step))
            await publisher.publish(events)
            await asyncio.sleep(0.02)

    process = start_ingest()
    try:
        streaming = asyncio.create_task(stream_positions())

        async def some_stored() -> bool:
            try:
                return bool(await stored_rows(database_url))
            except sa.exc.OperationalError:  # no file or no table yet: still starting
                return False

        await wait_for(some_stored)
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        killed_with = len(await stored_rows(database_url))
        process = start_ingest()
        await streaming

        async def everything_stored() -> bool:
            return len(await stored_rows(database_url)) >= len(sent)

        await wait_for(everything_stored)
        assert killed_with < len(sent)
        assert sorted(await stored_rows(database_url)) == sorted(sent)
        metrics_url = re.findall(r"metrics on (http://\S+/metrics)", log_path.read_text())[-1]
        assert scrape_totals(metrics_url, timeout=5).get("python_gc_frozen_objects", 0) > 10_000
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        await publisher.close()


async def test_a_redis_that_lost_its_data_gets_its_last_known_back_from_the_history(
    tmp_path: Path,
) -> None:
    """Redis restarted without its data: the managers' snapshot listed only the workers heard
    from since (every other last-known position gone, while the history had them). The ingest
    notices and gives each worker's newest position and presence back; a fix a bridge wrote
    after the loss is newer and stays."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    port = free_port()
    server = start_redis(port, tmp_path / "before")
    backend_url = f"redis://127.0.0.1:{port}/0"
    publisher = from_url(backend_url)
    service = IngestService(
        IngestConfig(recover_interval_s=0.2), from_url(backend_url), HistoryStore.from_url(url),
        CollectorRegistry(),
    )
    now = int(time.time() * 1000)
    try:
        await publisher.start()
        await service.start()
        await publisher.publish([
            position_event("alpha", "w001", 0, now - 3000),
            position_event("alpha", "w001", 1, now - 2000),
            position_event("alpha", "w002", 0, now - 2500),
            position_event("bravo", "w001", 5, now - 1000),
            status_event("alpha", "w002", "offline", now - 1500),
        ])
        await service.wait_stored(4)
        before = await publisher.snapshot("alpha")
        # The first recovery (of the new, empty Redis) may have run after the rows were stored
        recovered_before = service.counters.last_known_recovered

        server.stop()
        server = start_redis(port, tmp_path / "after")  # the same server, its data gone
        fresher = position_event("alpha", "w002", 1, now)

        async def published() -> bool:
            try:
                await publisher.publish([fresher])
            except BackendError:
                return False
            return True

        await wait_for(published, timeout=10)

        async def recovered() -> bool:
            return service.counters.last_known_recovered > recovered_before

        await wait_for(recovered, timeout=10)
        after = await publisher.snapshot("alpha")
        assert set(after.positions) == {"w001", "w002"}
        assert after.positions["w001"].body == before.positions["w001"].body
        assert after.positions["w002"].body == fresher.body  # newer than the history's
        assert after.presence["w002"].body == b"offline"
        assert set((await publisher.snapshot("bravo")).positions) == {"w001"}
    finally:
        await service.stop()
        await publisher.close()
        server.stop()


def test_reads_are_paced_longer_while_positions_arrive_slowly(tmp_path: Path) -> None:
    """Below `quiet_rows_per_s` rows gather for `quiet_write_interval_s` (fewer transactions
    at low rates); above it, or with the quiet interval off, for `write_interval_s`."""
    store = HistoryStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'history.db'}")
    config = IngestConfig(write_interval_s=0.05, quiet_write_interval_s=0.25,
                          quiet_rows_per_s=400.0)
    service = IngestService(config, from_url("memory://"), store, CollectorRegistry())
    assert service._pace_for(10, 0.05) == 0.25  # 200 positions/s
    assert service._pace_for(50, 0.25) == 0.25  # still 200/s, now measured over 0.25 s
    assert service._pace_for(500, 0.05) == 0.05  # 10,000/s
    assert service._pace_for(150, 0.25) == 0.05  # 600/s
    off = IngestService(IngestConfig(quiet_write_interval_s=0.0), from_url("memory://"), store,
                        CollectorRegistry())
    assert off._pace_for(1, 1.0) == off.config.write_interval_s


async def test_the_consumer_group_lag_in_entries_counts_what_is_not_acknowledged(
    make_backend: BackendFactory,
) -> None:
    """`GroupConsumer.backlog`, what `teamtrack_ingest_backlog_entries` shows: five batches
    read and not acknowledged are five; acknowledged (Kafka: committed at the next read) and
    one more read, one."""
    backend = make_backend()
    await backend.start()
    now = int(time.time() * 1000)
    consumer = backend.consume("lag", "lag-1", start="earliest", acknowledge=True)
    try:
        for seq in range(5):
            await backend.publish([position_event("alpha", "w001", seq, now + seq)])
        read = [await asyncio.wait_for(anext(consumer), 10) for _ in range(5)]
        assert await consumer.backlog() == 5
        await consumer.acknowledge(read)
        await backend.publish([position_event("alpha", "w001", 5, now + 5)])
        await asyncio.wait_for(anext(consumer), 10)
        assert await consumer.backlog() == 1
    finally:
        await consumer.close()
        await backend.close()
