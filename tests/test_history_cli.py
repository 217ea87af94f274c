"""`teamtrack history export-person` and `erase` against a real Redis, the real ingest and
SQLite / PostgreSQL: after an erase the worker is in no store, and everyone else still is."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from ingest.service import IngestConfig, IngestService
from teamtrack.backends import Event, from_url
from teamtrack.cli import app
from teamtrack.contract import Kind
from teamtrack.files import hold_supervisor_lock
from teamtrack.history import HistoryStore
from teamtrack.history_cli import cluster_backend_url
from teamtrack.history_privacy import erasure_log, person_counts
from teamtrack.person_export import read_archive

PEOPLE = (("alpha", "w1"), ("alpha", "w2"), ("bravo", "w1"))
FIXES = 20


def traffic(now: int) -> list[Event]:
    events = []
    for team, worker in PEOPLE:
        events.append(Event(team, worker, Kind.STATUS, b"online", "b1", now - 30_000,
                            now - 30_000, 1))
        for seq in range(FIXES):
            ts = now - 20_000 + seq * 500
            body = orjson.dumps({"lat": 52.5 + seq / 1e4, "lon": 13.4, "ts": ts, "seq": seq})
            events.append(Event(team, worker, Kind.POSITION, body, "b1", ts, ts, 1))
        body = orjson.dumps({"type": "transition", "event": "enter", "ts": now - 1000,
                             "desc": "Depot"})
        events.append(Event(team, worker, Kind.EVENT, body, "b1", now - 1000, now - 1000, 1))
    return events


async def ingest_traffic(backend_url: str, database_url: str) -> None:
    backend = from_url(backend_url)
    service = IngestService(IngestConfig(recover_interval_s=0), from_url(backend_url),
                            HistoryStore.from_url(database_url), CollectorRegistry())
    async with backend:
        await service.start()
        await backend.publish(traffic(int(time.time() * 1000)))
        await asyncio.wait_for(service.wait_stored(FIXES * len(PEOPLE)), 20)
        await service.stop()


async def stored_about(backend_url: str, database_url: str) -> dict[tuple[str, str], object]:
    """Per person: history rows per table, and which last-known entries the backend has."""
    found: dict[tuple[str, str], object] = {}
    store = HistoryStore.from_url(database_url)
    async with from_url(backend_url) as backend:
        for team, worker in PEOPLE:
            snapshot = await backend.snapshot(team)
            found[team, worker] = (
                await person_counts(store, team, worker),
                worker in snapshot.positions, worker in snapshot.presence,
            )
    await store.close()
    return found


def test_export_then_erase_leaves_the_worker_in_no_store(
    redis_url: str, history_url: str, tmp_path: Path
) -> None:
    asyncio.run(ingest_traffic(redis_url, history_url))
    runner = CliRunner()
    env = {"TEAMTRACK_DATABASE_URL": history_url, "TEAMTRACK_BACKEND_URL": redis_url}
    everything = ({"positions": FIXES, "presence": 1, "events": 1}, True, True)
    assert asyncio.run(stored_about(redis_url, history_url)) == dict.fromkeys(PEOPLE, everything)

    archive = tmp_path / "w1.zip"
    exported = runner.invoke(app, ["history", "export-person", "alpha", "w1", "--out",
                                   str(archive)], env=env)
    assert exported.exit_code == 0, exported.output
    assert archive.stat().st_mode & 0o777 == 0o600
    files = read_archive(archive)
    geojson = json.loads(files["positions.geojson"])
    assert len(geojson["features"]) == FIXES
    assert {feature["properties"]["worker"] for feature in geojson["features"]} == {"w1"}
    assert len(files["positions.csv"].splitlines()) == FIXES + 1
    assert files["presence.csv"].splitlines()[1].endswith(b",online")
    assert b"Depot" in files["events.csv"]
    assert json.loads(files["last-known.json"])["position"]["seq"] == FIXES - 1
    assert json.loads(files["manifest.json"])["counts"]["positions"] == FIXES

    refused = runner.invoke(app, ["history", "erase", "alpha", "w1"], env=env, input="n\n")
    assert refused.exit_code == 1
    erased = runner.invoke(app, ["history", "erase", "alpha", "w1", "--yes", "--settle-s",
                                 "0.1", "--operator", "dpo"], env=env)
    assert erased.exit_code == 0, erased.output
    assert f"{FIXES} positions, 1 presence changes, 1 events, 0 alerts; last-known: 2" in (
        erased.output
    )
    assert "52.5" not in erased.output

    after = asyncio.run(stored_about(redis_url, history_url))
    assert after[("alpha", "w1")] == ({"positions": 0, "presence": 0, "events": 0},
                                      False, False)
    assert after[("alpha", "w2")] == everything
    assert after[("bravo", "w1")] == everything

    again = runner.invoke(app, ["history", "export-person", "alpha", "w1", "--out",
                                str(archive)], env=env)
    assert again.exit_code == 0, again.output
    files = read_archive(archive)
    assert json.loads(files["positions.geojson"])["features"] == []
    assert len(files["positions.csv"].splitlines()) == 1
    last_known = json.loads(files["last-known.json"])
    assert (last_known["position"], last_known["presence"]) == (None, None)
    assert b"dpo" in files["erasures.csv"]  # the erasure itself, counts only

    store = HistoryStore.from_url(history_url)
    (entry,) = asyncio.run(erasure_log(store))
    asyncio.run(store.close())
    assert (entry["operator"], entry["positions"], entry["last_known"]) == ("dpo", FIXES, 2)


def test_erase_refuses_without_a_backend_unless_told(tmp_path: Path) -> None:
    (tmp_path / "history.sqlite3").touch()
    runner = CliRunner()
    refused = runner.invoke(app, ["history", "erase", "alpha", "w1", "--yes",
                                  "--state-dir", str(tmp_path)], env={})
    assert refused.exit_code == 2
    assert "no backend known" in refused.output
    done = runner.invoke(app, ["history", "erase", "alpha", "w1", "--yes", "--settle-s", "0",
                               "--history-only", "--state-dir", str(tmp_path)], env={})
    assert done.exit_code == 0, done.output
    assert "last-known: not reached" in done.output


def test_state_dir_gives_the_running_clusters_backend_as_its_admin(tmp_path: Path) -> None:
    (tmp_path / "endpoints.json").write_text(json.dumps({"backend": "redis://127.0.0.1:1/0"}))
    (tmp_path / "redis-users.json").write_text(json.dumps({"admin": "s3cr/t"}))
    assert cluster_backend_url(tmp_path) is None  # nothing runs there
    lock = hold_supervisor_lock(tmp_path)
    assert lock is not None
    try:
        assert cluster_backend_url(tmp_path) == "redis://default:s3cr%2Ft@127.0.0.1:1/0"
    finally:
        lock.close()


@pytest.mark.parametrize("bad", ["Alpha", "a b", "../x"])
def test_ids_are_checked(bad: str) -> None:
    result = CliRunner().invoke(app, ["history", "erase", bad, "w1", "--yes"], env={})
    assert result.exit_code == 2
