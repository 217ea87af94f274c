"""Alerts in the history database (SQLite and PostgreSQL): inserted once per id, acknowledged
once, and kept, erased and exported with the rest of a worker's history."""

from __future__ import annotations

import time
from pathlib import Path

from teamtrack.alerts import Alert, AlertStore
from teamtrack.history import HistoryStore
from teamtrack.history_privacy import erase_worker, sweep
from teamtrack.person_export import read_archive, write_person_archive

DAY_MS = 86_400_000


def alert(number: int, worker: str, at: int, team: str = "alpha") -> Alert:
    return Alert(f"a{number:031d}", team, worker, "zone_enter", "z1", "Depot, \"north\"", at,
                 at + 5, "entered Depot")


async def test_alerts_are_stored_once_acked_once_aged_erased_and_exported(
    history_url: str, tmp_path: Path
) -> None:
    history = HistoryStore.from_url(history_url)
    await history.migrate()
    store = AlertStore(history.engine)
    now = int(time.time() * 1000)
    old, recent = now - 40 * DAY_MS, now - DAY_MS
    batch = [alert(1, "w001", old), alert(2, "w001", recent), alert(3, "w002", recent),
             alert(4, "x001", old, team="bravo")]
    assert await store.apply(batch, {("alpha", "w001"): {"inside": ["z1"]}}, {"alpha": "7"}) == 4
    assert await store.apply(batch, {}, {}) == 0  # delivered again: nothing new
    states, cursors = await store.load_state()
    assert states == {("alpha", "w001"): {"inside": ["z1"]}} and cursors == {"alpha": "7"}
    # Many states and cursors in one statement each: new ones inserted, known ones replaced.
    await store.apply([], {("alpha", "w001"): {"inside": []}, ("alpha", "w002"): {"n": 2},
                           ("bravo", "x001"): {"n": 3}}, {"alpha": "9", "bravo": "4"})
    states, cursors = await store.load_state()
    assert states == {("alpha", "w001"): {"inside": []}, ("alpha", "w002"): {"n": 2},
                      ("bravo", "x001"): {"n": 3}}
    assert cursors == {"alpha": "9", "bravo": "4"}
    # Newest first (ties by id).
    assert [found.id for found in await store.alerts("alpha")] == [
        batch[1].id, batch[2].id, batch[0].id
    ]
    assert [found.id for found in await store.alerts("alpha", since_ms=recent)] == [
        batch[1].id, batch[2].id
    ]
    first = await store.ack("alpha", batch[1].id, "alice")
    second = await store.ack("alpha", batch[1].id, "carol")
    assert first.acked_by == second.acked_by == "alice" and first.acked_ms == second.acked_ms
    new, acked = await store.unpublished()
    assert len(new) == 4 and [found.id for found in acked] == [batch[1].id]

    # Retention: alpha keeps 30 days, bravo forever.
    deleted = await sweep(history, {"alpha": 30, "bravo": 0}, 90, now_ms=now)
    assert deleted.alerts == 1
    assert {found.id for found in await store.alerts("alpha")} == {batch[1].id, batch[2].id}
    assert len(await store.alerts("bravo")) == 1

    out = tmp_path / "w001.zip"
    await write_person_archive(out, history, "alpha", "w001", snapshot=None,
                               exported_at_ms=now, retention={})
    rows = read_archive(out)["alerts.csv"].decode().splitlines()
    assert len(rows) == 2 and "alice" in rows[1] and '"Depot, ""north"""' in rows[1]

    erased = await erase_worker(history, "alpha", "w001")
    assert erased.alerts == 1
    assert [found.worker for found in await store.alerts("alpha")] == ["w002"]
    assert await store.load_state() == (  # the erased worker's state only
        {("alpha", "w002"): {"n": 2}, ("bravo", "x001"): {"n": 3}}, {"alpha": "9", "bravo": "4"})
    await history.close()
