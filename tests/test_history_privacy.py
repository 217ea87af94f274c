"""Retention and erasure over the history, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from teamtrack.history import HistoryStore
from teamtrack.history_privacy import (
    DAY_MS,
    Erasure,
    erase_worker,
    erasure_log,
    erasures_after,
    last_erasure_id,
    person_counts,
    record_erasure,
    sweep,
)

NOW = int(time.time() * 1000)


def rows(team: str, worker: str, ts: int, seq: int = 0) -> dict[str, list[dict[str, Any]]]:
    """One position, presence change and worker event of the worker at `ts`."""
    event = {"type": "transition", "event": "enter", "ts": ts, "desc": "Depot"}
    return {
        "positions": [{
            "team": team, "worker": worker, "ts": ts, "seq": seq, "lat": 52.5, "lon": 13.4,
            "acc": None, "speed": None, "heading": None, "battery": None, "origin": "b1",
            "received_ms": ts,
        }],
        "presence": [{"team": team, "worker": worker, "ts": ts, "status": "online",
                      "origin": "b1"}],
        "events": [{"team": team, "worker": worker, "ts": ts, "type": "transition",
                    "event": "enter", "region": "Depot", "body": orjson.dumps(event).decode(),
                    "origin": "b1", "received_ms": ts}],
    }


async def write_all(store: HistoryStore, *parts: dict[str, list[dict[str, Any]]]) -> None:
    positions = [row for part in parts for row in part["positions"]]
    presence = [row for part in parts for row in part["presence"]]
    events = [row for part in parts for row in part["events"]]
    await store.write(positions, presence, events)


@pytest.fixture
async def store(history_url: str) -> AsyncIterator[HistoryStore]:
    store = HistoryStore.from_url(history_url)
    await store.migrate()
    yield store
    await store.close()


async def test_retention_is_per_team_and_covers_every_table(store: HistoryStore) -> None:
    ages_days = (0.01, 2, 10, 40)
    await write_all(store, *(
        rows(team, worker, NOW - int(age * DAY_MS), seq)
        for team in ("short", "long", "default", "forever")
        for worker in ("w1", "w2")
        for seq, age in enumerate(ages_days)
    ))
    retention = {"short": 1.0, "long": 30.0, "forever": 0.0}
    # Small statements, to go through the batching; default 5 days for "default".
    deleted = await sweep(store, retention, default_days=5, chunk=3, pause_s=0)
    kept = {team: await person_counts(store, team, "w1")
            for team in ("short", "long", "default", "forever")}
    assert kept["short"] == {"positions": 1, "presence": 1, "events": 1}
    assert kept["default"] == {"positions": 2, "presence": 2, "events": 2}
    assert kept["long"] == {"positions": 3, "presence": 3, "events": 3}
    assert kept["forever"] == {"positions": 4, "presence": 4, "events": 4}
    # short: 3 ages x 2 workers x 3 tables; default: 2 x 2 x 3; long: 1 x 2 x 3.
    assert deleted.by_team == {"short": 18, "default": 12, "long": 6}
    assert deleted.total == 36
    assert deleted.statements > 3 * 3  # several statements per table of a team
    assert (await sweep(store, retention, default_days=5)).total == 0


async def test_erase_removes_one_worker_everywhere_and_logs_no_data(store: HistoryStore) -> None:
    await write_all(store, *(
        rows(team, worker, NOW - age * 1000, age)
        for team, worker in (("alpha", "w1"), ("alpha", "w2"), ("bravo", "w1"))
        for age in range(10)
    ))
    # Only what is older than 5 s first, then everything.
    partial = await erase_worker(store, "alpha", "w1", before_ms=NOW - 4500, chunk=2)
    assert (partial.positions, partial.presence, partial.events) == (5, 5, 5)
    assert await person_counts(store, "alpha", "w1") == {
        "positions": 5, "presence": 5, "events": 5}
    rest = await erase_worker(store, "alpha", "w1", chunk=2)
    assert rest.total == 15
    assert await person_counts(store, "alpha", "w1") == {"positions": 0, "presence": 0,
                                                         "events": 0}
    assert (await store.track("alpha", "w1", 0, 2**62)).items == []
    assert (await store.presence("alpha", 0, 2**62, worker="w1")).items == []
    assert (await store.events("alpha", 0, 2**62, worker="w1")).items == []
    # Everyone else stays.
    for team, worker in (("alpha", "w2"), ("bravo", "w1")):
        assert await person_counts(store, team, worker) == {
            "positions": 10, "presence": 10, "events": 10}
    newest, _presence = await store.last_known("alpha")
    assert [position.worker for position in newest] == ["w2"]

    assert await last_erasure_id(store) == 0
    erasure = await record_erasure(store, operator="dpo@example", team="alpha", worker="w1",
                                   before_ms=None, deleted=partial, last_known=2)
    # What a running rules service reads (it drops the worker's state).
    assert await erasures_after(store, 0) == [Erasure(erasure, "alpha", "w1", None)]
    assert await erasures_after(store, erasure) == []
    assert await last_erasure_id(store) == erasure
    # The totals, once the second pass is over: the same row.
    await record_erasure(store, operator="dpo@example", team="alpha", worker="w1",
                         before_ms=None, deleted=rest, last_known=2, erasure_id=erasure)
    (entry,) = await erasure_log(store)
    assert entry["operator"] == "dpo@example"
    assert (entry["team"], entry["worker"], entry["positions"], entry["last_known"]) == (
        "alpha", "w1", 5, 2)
    assert not {"lat", "lon", "body"} & set(entry)


async def test_a_sweep_does_not_hold_up_inserts(store: HistoryStore) -> None:
    """While a sweep deletes 30,000 old rows, writes of new ones keep going: none waits for
    the whole sweep (the longest write stays far below the sweep's own time)."""
    old = NOW - 100 * DAY_MS
    for start in range(0, 30_000, 10_000):
        await store.write([rows("alpha", f"w{seq % 50}", old + seq, seq)["positions"][0]
                           for seq in range(start, start + 10_000)], [])
    sweeping = asyncio.create_task(sweep(store, {}, default_days=90, chunk=1000, pause_s=0.01))
    latencies = []
    seq = 0
    while not sweeping.done():
        started = time.perf_counter()
        await store.write([rows("alpha", "live", NOW + seq, seq)["positions"][0]], [])
        latencies.append(time.perf_counter() - started)
        seq += 1
        await asyncio.sleep(0.005)
    deleted = await sweeping
    assert deleted.positions == 30_000
    assert deleted.statements >= 30
    assert len(latencies) >= 5
    assert max(latencies) < max(0.5, deleted.seconds / 3), (max(latencies), deleted.seconds)
    assert (await person_counts(store, "alpha", "live"))["positions"] == seq
