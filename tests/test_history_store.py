"""The history store against real databases: SQLite files and a PostgreSQL server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from teamtrack.history import (
    BadCursor,
    HistoryStore,
    PageCursor,
    TooManyPoints,
)
from teamtrack.history_decode import decode_batch
from teamtrack.history_export import runs

T0 = 1_795_000_000_000


def position_row(
    worker: str, seq: int, ts: int, team: str = "alpha", **fields: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "team": team, "worker": worker, "ts": ts, "seq": seq, "lat": 52.5 + seq / 1e4,
        "lon": 13.4, "acc": None, "speed": None, "heading": None, "battery": None,
        "origin": "b1", "received_ms": ts + 5,
    }
    row.update(fields)
    return row


def presence_row(worker: str, status: str, ts: int, team: str = "alpha") -> dict[str, Any]:
    return {"team": team, "worker": worker, "ts": ts, "status": status, "origin": "b1"}


@pytest.fixture
async def store(history_url: str) -> AsyncIterator[HistoryStore]:
    store = HistoryStore.from_url(history_url)
    await store.migrate()
    yield store
    await store.close()


async def test_migrations_create_the_schema_and_rerun_harmlessly(store: HistoryStore) -> None:
    await store.migrate()
    async with store.engine.connect() as connection:
        tables = await connection.run_sync(
            lambda sync: set(sa.inspect(sync).get_table_names())
        )
        version = await connection.scalar(sa.text("SELECT version_num FROM alembic_version"))
    assert {"positions", "presence_changes", "worker_events", "erasures",
            "alembic_version"} <= tables
    assert version == "0004_zones_alerts"
    assert await store.ping()


async def test_a_message_delivered_twice_is_stored_once(store: HistoryStore) -> None:
    rows = [position_row("w1", seq, T0 + seq * 1000) for seq in range(5)]
    first = await store.write(rows, [presence_row("w1", "online", T0)])
    assert (first.positions_stored, first.positions_duplicate) == (5, 0)
    assert (first.presence_stored, first.presence_duplicate) == (1, 0)
    # Redelivered, with a copy inside the same write as well.
    again = await store.write([*rows, rows[0]], [presence_row("w1", "online", T0)])
    assert (again.positions_stored, again.positions_duplicate) == (0, 6)
    assert (again.presence_stored, again.presence_duplicate) == (0, 1)
    assert await store.count() == (5, 1)


async def test_a_restarted_device_reusing_seq_numbers_is_not_deduplicated(
    store: HistoryStore,
) -> None:
    first_run = [position_row("w1", seq, T0 + seq * 1000) for seq in range(5)]
    # The device restarts a minute later and counts from 0 again.
    second_run = [position_row("w1", seq, T0 + 60_000 + seq * 1000) for seq in range(5)]
    result = await store.write(first_run + second_run, [])
    assert result.positions_stored == 10
    await store.write(second_run + first_run, [])  # redelivered in another order
    page = await store.track("alpha", "w1", T0, T0 + 120_000)
    assert [point.seq for point in page.items] == [0, 1, 2, 3, 4] * 2
    assert runs(page.items) == [0] * 5 + [1] * 5


async def test_track_filters_by_time_worker_and_team(store: HistoryStore) -> None:
    rows = [position_row("w1", seq, T0 + seq * 1000) for seq in range(10)]
    rows += [position_row("w2", seq, T0 + seq * 1000) for seq in range(10)]
    rows += [position_row("w1", seq, T0 + seq * 1000, team="bravo") for seq in range(10)]
    await store.write(rows, [])
    page = await store.track("alpha", "w1", T0 + 2000, T0 + 5000)
    assert [point.seq for point in page.items] == [2, 3, 4]  # since included, until not
    assert {(point.team, point.worker) for point in page.items} == {("alpha", "w1")}
    assert page.next is None
    assert (await store.track("alpha", "w9", T0, T0 + 10_000)).items == []


async def test_track_pages_cover_the_window_once_in_order(store: HistoryStore) -> None:
    # Two fixes share a millisecond: the page boundary must not lose or repeat either.
    rows = [position_row("w1", seq, T0 + (seq // 2) * 1000) for seq in range(11)]
    await store.write(rows, [])
    seen: list[int] = []
    after: PageCursor | None = None
    pages = 0
    while True:
        page = await store.track("alpha", "w1", T0, T0 + 60_000, limit=3, after=after)
        seen += [point.seq for point in page.items]
        pages += 1
        if page.next is None:
            break
        after = PageCursor.decode(page.next.encode(), "track")
    assert seen == list(range(11))
    assert pages == 4


async def test_team_window_pages_through_ties_across_workers(store: HistoryStore) -> None:
    rows = [
        position_row(f"w{worker}", seq, T0 + seq * 1000)
        for seq in range(4)
        for worker in range(5)
    ]
    rows.append(position_row("w1", 0, T0, team="bravo"))
    await store.write(rows, [])
    seen: list[tuple[str, int]] = []
    after: PageCursor | None = None
    while True:
        page = await store.team_window("alpha", T0, T0 + 3000, limit=4, after=after)
        seen += [(point.worker, point.ts) for point in page.items]
        if page.next is None:
            break
        after = page.next
    assert sorted(seen) == sorted((f"w{worker}", T0 + seq * 1000)
                                  for seq in range(3) for worker in range(5))
    assert len(seen) == len(set(seen)) == 15
    assert [ts for _worker, ts in seen] == sorted(ts for _worker, ts in seen)


async def test_presence_changes_by_team_and_worker(store: HistoryStore) -> None:
    await store.write([], [
        presence_row("w1", "online", T0),
        presence_row("w2", "online", T0 + 1),
        presence_row("w1", "offline", T0 + 5000),
        presence_row("w1", "offline", T0 + 5000, team="bravo"),
    ])
    page = await store.presence("alpha", T0, T0 + 10_000)
    assert [(c.worker, c.status) for c in page.items] == [
        ("w1", "online"), ("w2", "online"), ("w1", "offline")
    ]
    only_w1 = await store.presence("alpha", T0, T0 + 10_000, worker="w1", limit=1)
    assert [c.status for c in only_w1.items] == ["online"]
    assert only_w1.next is not None
    rest = await store.presence("alpha", T0, T0 + 10_000, worker="w1", after=only_w1.next)
    assert [c.status for c in rest.items] == ["offline"]


async def test_whole_track_refuses_more_than_its_limit(store: HistoryStore) -> None:
    await store.write([position_row("w1", seq, T0 + seq) for seq in range(10)], [])
    assert len(await store.whole_track("alpha", "w1", T0, T0 + 100, max_points=10)) == 10
    with pytest.raises(TooManyPoints):
        await store.whole_track("alpha", "w1", T0, T0 + 100, max_points=9)


def test_cursors_are_opaque_and_bound_to_their_query() -> None:
    cursor = PageCursor("track", T0, 7)
    assert PageCursor.decode(cursor.encode(), "track") == cursor
    with pytest.raises(BadCursor):
        PageCursor.decode(cursor.encode(), "team")
    for garbage in ("", "not-base64!", "dHJhY2s6eDp5"):
        with pytest.raises(BadCursor):
            PageCursor.decode(garbage, "track")


def test_odd_events_are_counted_and_skipped_never_raised() -> None:
    good = {"w": "w1", "k": "p", "o": "b1", "rx": T0, "q": 0,
            "p": {"lat": 52.5, "lon": 13.4, "ts": T0, "seq": 3, "speed": 1.5}}
    status = {"w": "w1", "k": "s", "o": "b1", "rx": T0, "q": 1, "p": "offline"}
    odd = [
        {**good, "w": "Not A Slug"},
        {**good, "k": "x"},
        {**good, "p": {"lat": 91.0, "lon": 13.4, "ts": T0, "seq": 1}},
        {**good, "p": {"lat": 52.5, "lon": 13.4, "ts": T0, "seq": -1}},
        {**good, "p": {"lat": 52.5, "lon": 13.4, "ts": True, "seq": 1}},
        {**good, "p": {"lat": "52.5", "lon": 13.4, "ts": T0, "seq": 1}},
        {**good, "p": {"lon": 13.4, "ts": T0, "seq": 1}},
        {**good, "p": {"lat": 52.5, "lon": 13.4, "ts": T0, "seq": 1, "battery": 101}},
        {**good, "p": {"lat": True, "lon": 13.4, "ts": T0, "seq": 1}},
        {**good, "p": {"lat": 52.5, "lon": 13.4, "ts": T0, "seq": 1, "heading": 360.5}},
        {**good, "rx": "yesterday"},
        {**status, "p": "asleep"},
        "not an object",
        None,
    ]
    decoded = decode_batch("alpha", orjson.dumps([good, *odd, status]))
    assert [row["seq"] for row in decoded.positions] == [3]
    assert decoded.positions[0]["speed"] == 1.5 and decoded.positions[0]["acc"] is None
    assert [row["status"] for row in decoded.presence] == ["offline"]
    assert sum(decoded.skipped.values()) == len(odd)
    assert decoded.skipped["bad_position"] == 8
    assert decode_batch("alpha", b"{not json").skipped == {"not_json": 1}
    assert decode_batch("alpha", b'{"w": 1}').skipped == {"bad_batch": 1}
    assert decode_batch("Bad Team", orjson.dumps([good])).skipped == {"bad_team": 1}


async def test_last_known_is_each_workers_newest_position_and_presence(
    store: HistoryStore,
) -> None:
    await store.write(
        [
            position_row("w1", 3, T0 + 3000),
            position_row("w1", 9, T0 + 9000),
            position_row("w1", 4, T0 + 9000),  # same fix time: the higher seq is newer
            position_row("w2", 1, T0 + 1000),
            position_row("w3", 1, T0 + 5000, team="bravo"),
        ],
        [
            presence_row("w1", "online", T0),
            presence_row("w1", "offline", T0 + 8000),
            presence_row("w4", "online", T0 + 100),
        ],
    )
    newest_positions, newest_presence = await store.last_known("alpha")
    assert [(p.worker, p.ts, p.seq) for p in newest_positions] == [
        ("w1", T0 + 9000, 9), ("w2", T0 + 1000, 1)
    ]
    assert [(c.worker, c.ts, c.status) for c in newest_presence] == [
        ("w1", T0 + 8000, "offline"), ("w4", T0 + 100, "online")
    ]
    assert await store.last_known("nobody") == ([], [])


async def test_worker_events_are_stored_once_and_read_by_team_and_worker(
    store: HistoryStore,
) -> None:
    def item(worker: str, ts: int, event: str, region: str) -> dict[str, Any]:
        return {"w": worker, "k": "e", "o": "b1", "rx": ts + 5, "q": 1,
                "p": {"type": "transition", "event": event, "ts": ts, "desc": region}}

    sent = [item("w1", T0, "enter", "Depot"), item("w1", T0, "enter", "Gate"),
            item("w2", T0 + 10, "leave", "Depot")]
    odd = {**item("w1", T0, "enter", "Depot"), "p": {"type": "transition", "event": "dance",
                                                      "ts": T0}}
    decoded = decode_batch("alpha", orjson.dumps([*sent, odd]))
    assert decoded.skipped == {"bad_worker_event": 1}
    first = await store.write([], [], decoded.events)
    again = await store.write([], [], decode_batch("alpha", orjson.dumps(sent[:1])).events)
    assert (first.events_stored, again.events_stored, again.events_duplicate) == (3, 0, 1)
    page = await store.events("alpha", T0, T0 + 100)
    assert [(event["worker"], event["event"], event["desc"]) for event in page.items] == [
        ("w1", "enter", "Depot"), ("w1", "enter", "Gate"), ("w2", "leave", "Depot")]
    only_w2 = await store.events("alpha", T0, T0 + 100, worker="w2")
    assert [event["worker"] for event in only_w2.items] == ["w2"]
    assert (await store.events("bravo", T0, T0 + 100)).items == []
    paged = await store.events("alpha", T0, T0 + 100, limit=2)
    assert paged.next is not None
    rest = await store.events("alpha", T0, T0 + 100, limit=2, after=paged.next)
    assert [event["desc"] for event in rest.items] == ["Depot"]


async def test_processes_migrating_one_new_database_at_once_all_succeed(history_url: str) -> None:
    """`teamtrack up` starts the ingest and the rules service together on one new database:
    each migrates it at start. Three processes (not tasks: each its own driver and lock) race
    on the same empty database, three rounds; every one must finish at the newest revision
    instead of failing on "table already exists" or "database is locked"."""
    import asyncio
    import sys
    import time

    code = (
        "import asyncio, sys, time\n"
        "import alembic.command, alembic.config  # imported before the start, as the race is\n"
        "from teamtrack.history import HistoryStore\n"
        "async def main():\n"
        "    store = HistoryStore.from_url(sys.argv[1])\n"
        "    await asyncio.sleep(max(float(sys.argv[2]) - time.time(), 0))\n"
        "    try:\n"
        "        await store.migrate()\n"
        "    finally:\n"
        "        await store.close()\n"
        "asyncio.run(main())\n"
    )
    for _round in range(2):
        start_at = str(time.time() + 2.0)  # after every process has imported: a tight race
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, history_url, start_at,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            for _ in range(3)
        ]
        outputs = await asyncio.wait_for(
            asyncio.gather(*(process.communicate() for process in processes)), 60
        )
        failures = [out[-400:].decode()
                    for process, (out, _) in zip(processes, outputs, strict=True)
                    if process.returncode != 0]
        assert not failures, failures
    store = HistoryStore.from_url(history_url)
    try:
        async with store.engine.connect() as connection:
            version = await connection.scalar(sa.text("SELECT version_num FROM alembic_version"))
    finally:
        await store.close()
    assert version == "0004_zones_alerts"
