"""`python -m ingest.bench`: how many positions per second the ingest stores.

The backend is filled first (as bridges would: one batch per team per publish), then an
`IngestService` starts and the clock runs until the database holds every position, so the
figure is the ingest's catch-up rate: decoding, batching, inserting and acknowledging included.

    python -m ingest.bench                       SQLite file in a temporary folder
    python -m ingest.bench --postgres            and a throwaway PostgreSQL (Debian's package)
    python -m ingest.bench --database-url postgresql+asyncpg://user@host/db   an existing one
    python -m ingest.bench --backend-url redis://127.0.0.1:6379/0             through Redis
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry
from pydantic import Field

from ingest.service import IngestConfig, IngestService
from teamtrack.backends import Backend, Event, from_url
from teamtrack.backends.redis_connect import safe_url
from teamtrack.contract import Kind
from teamtrack.history import HistoryStore, default_database_url
from teamtrack.local.history_postgres import start_postgres
from teamtrack.settings import ServiceSettings, load_settings


class IngestBenchSettings(ServiceSettings):
    positions: int = Field(200_000, ge=1, description="positions to store")
    workers: int = Field(1000, ge=1, description="simulated workers, spread over --teams")
    teams: int = Field(10, ge=1, description="teams")
    events_per_batch: int = Field(100, ge=1, description="events per backend batch")
    max_batch_positions: int = Field(5000, ge=1, description="rows per database transaction")
    database_url: str = Field("", description="benchmark this database (default: SQLite)")
    postgres: bool = Field(False, description="also benchmark a throwaway durable PostgreSQL")


@dataclass(frozen=True)
class BenchResult:
    database: str
    positions: int
    seconds: float
    writes: int

    @property
    def rate(self) -> float:
        return self.positions / self.seconds

    def line(self) -> str:
        return (
            f"{self.database:<11} {self.positions:>9,} positions in {self.seconds:6.2f} s = "
            f"{self.rate:>9,.0f} positions/s ({self.writes} transactions, "
            f"{self.positions / max(self.writes, 1):,.0f} rows each)"
        )


def device_batches(settings: IngestBenchSettings) -> list[list[Event]]:
    """Positions of `workers` devices, one fix per second each, cut into per-team batches."""
    now = int(time.time() * 1000)
    per_team: dict[str, list[Event]] = {}
    for index in range(settings.positions):
        worker_number = index % settings.workers
        seq = index // settings.workers
        team = f"team{worker_number % settings.teams:02d}"
        worker = f"w{worker_number:05d}"
        ts = now - 3_600_000 + seq * 1000
        body = orjson.dumps({
            "lat": 52.5 + (worker_number % 100) / 1000 + seq * 1e-5,
            "lon": 13.4 + (worker_number // 100) / 1000,
            "ts": ts, "seq": seq, "acc": 5.0, "speed": 1.4, "heading": 90.0, "battery": 80,
        })
        per_team.setdefault(team, []).append(
            Event(team, worker, Kind.POSITION, body, "b1", ts + 30, ts)
        )
    size = settings.events_per_batch
    return [
        events[start:start + size]
        for events in per_team.values()
        for start in range(0, len(events), size)
    ]


def bench_backend(url: str, batches: int) -> Backend:
    """The backend, sized to hold every batch, in a key space of its own for Redis."""
    if url.startswith("memory://"):
        return from_url(f"memory://?history={batches + 1}")
    separator = "&" if "?" in url else "?"
    return from_url(
        f"{url}{separator}prefix=bench-{uuid.uuid4().hex[:8]}&group_history={batches + 1000}"
        "&group_history_ms=0"
    )


async def run_once(
    settings: IngestBenchSettings, database_url: str, label: str
) -> BenchResult:
    batches = device_batches(settings)
    backend = bench_backend(settings.backend_url, len(batches))
    await backend.start()
    for events in batches:
        await backend.publish(events)
    service = IngestService(
        IngestConfig(max_batch_positions=settings.max_batch_positions),
        backend,
        HistoryStore.from_url(database_url),
        CollectorRegistry(),
    )
    await service.start()  # includes creating the schema
    started = time.perf_counter()
    await service.wait_stored(settings.positions)
    seconds = time.perf_counter() - started
    result = BenchResult(label, settings.positions, seconds, service.counters.writes)
    await service.stop()
    return result


async def run(settings: IngestBenchSettings) -> list[BenchResult]:
    results = []
    if settings.database_url:
        results.append(await run_once(settings, settings.database_url, "given"))
    else:
        with tempfile.TemporaryDirectory(prefix="teamtrack-bench-") as folder:
            results.append(await run_once(settings, default_database_url(Path(folder)), "sqlite"))
    if settings.postgres:
        server = start_postgres(durable=True)
        try:
            url = await server.create_database("bench")
            results.append(await run_once(settings, url, "postgresql"))
        finally:
            server.stop()
    return results


def main() -> None:
    settings = load_settings(IngestBenchSettings, "python -m ingest.bench")
    print(
        f"{settings.positions:,} positions of {settings.workers:,} workers in "
        f"{settings.teams} teams, {settings.events_per_batch} per backend batch, "
        f"at most {settings.max_batch_positions:,} rows per transaction, "
        f"backend {safe_url(settings.backend_url).split('?')[0]}",
        file=sys.stderr,
    )
    for result in asyncio.run(run(settings)):
        print(result.line())


if __name__ == "__main__":
    main()
