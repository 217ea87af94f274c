"""The history router in a small FastAPI app of the test's own, over a real SQLite history."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gpxpy
import httpx
import pytest
from fastapi import FastAPI

from dashboard.auth import Authenticator, ManagerDirectory
from dashboard.history_api import history_router
from teamtrack.history import HistoryStore
from teamtrack.passwords import hash_password, token_digest

T0 = 1_795_000_000_000  # 2026-11-18T11:06:40Z
ALPHA_TOKEN = "alpha-lead-token-0123456789"
BRAVO_TOKEN = "bravo-lead-token-0123456789"


def manager_record(username: str, team: str, token: str) -> dict[str, str]:
    return {
        "username": username,
        "team": team,
        "password_hash": hash_password("unused-password"),
        "token_sha256": token_digest(token),
    }


def as_manager(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ALPHA = as_manager(ALPHA_TOKEN)


def position(team: str, worker: str, seq: int, ts: int, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "team": team, "worker": worker, "ts": ts, "seq": seq, "lat": 52.5 + seq / 1e3,
        "lon": 13.4, "acc": 5.0, "speed": 1.5, "heading": None, "battery": 90.0,
        "origin": "b1", "received_ms": ts,
    }
    row.update(fields)
    return row


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    store = HistoryStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}")
    await store.migrate()
    rows = [position("alpha", "w001", seq, T0 + seq * 10_000) for seq in range(10)]
    rows += [position("alpha", "w001", seq, T0 + 200_000 + seq * 10_000) for seq in range(3)]
    rows += [position("alpha", "w002", seq, T0 + seq * 10_000) for seq in range(10)]
    rows += [position("alpha", "w003", seq, T0 + 500_000 + seq * 1000) for seq in range(14)]
    rows += [position("bravo", "w001", seq, T0 + seq * 10_000) for seq in range(10)]
    presence = [
        {"team": "alpha", "worker": "w001", "ts": T0, "status": "online", "origin": "b1"},
        {"team": "alpha", "worker": "w002", "ts": T0 + 1, "status": "online", "origin": "b1"},
        {"team": "alpha", "worker": "w001", "ts": T0 + 95_000, "status": "offline",
         "origin": "b1"},
        {"team": "bravo", "worker": "w001", "ts": T0, "status": "online", "origin": "b1"},
    ]
    await store.write(rows, presence)
    app = FastAPI()
    app.state.authenticator = Authenticator(
        ManagerDirectory.from_records([
            manager_record("alpha-lead", "alpha", ALPHA_TOKEN),
            manager_record("bravo-lead", "bravo", BRAVO_TOKEN),
        ]),
        "test-session-secret",
        3600,
    )
    app.include_router(history_router(store, max_export_points=13))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
        yield client
    await store.close()


WINDOW = {"since": str(T0), "until": str(T0 + 100_000)}
ENDPOINTS = (
    "/api/teams/{team}/workers/w001/track",
    "/api/teams/{team}/workers/w001/track?format=gpx",
    "/api/teams/{team}/workers/w001/track/summary",
    "/api/teams/{team}/history",
    "/api/teams/{team}/presence",
)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_every_endpoint_is_team_scoped(client: httpx.AsyncClient, endpoint: str) -> None:
    assert (await client.get(endpoint.format(team="alpha"))).status_code == 401
    refused = await client.get(endpoint.format(team="bravo"), headers=ALPHA)
    assert refused.status_code == 403
    assert (await client.get(endpoint.format(team="nobody"), headers=ALPHA)).status_code == 403
    allowed = await client.get(endpoint.format(team="bravo"), headers=as_manager(BRAVO_TOKEN),
                               params=WINDOW)
    assert allowed.status_code == 200


async def test_track_time_filters_accept_iso_and_epoch_ms(client: httpx.AsyncClient) -> None:
    url = "/api/teams/alpha/workers/w001/track"
    by_ms = await client.get(url, headers=ALPHA,
                             params={"since": T0 + 20_000, "until": T0 + 50_000})
    assert by_ms.status_code == 200
    document = by_ms.json()
    assert [point["seq"] for point in document["points"]] == [2, 3, 4]  # until excluded
    assert document["next"] is None
    assert {point["worker"] for point in document["points"]} == {"w001"}
    iso = {
        "since": datetime.fromtimestamp((T0 + 20_000) / 1000, UTC).isoformat(),
        "until": "2026-11-18T11:07:30Z",
    }
    assert (await client.get(url, headers=ALPHA, params=iso)).json() == document
    zone_less = {"since": "2026-11-18T11:07:00", "until": "2026-11-18T13:07:30+02:00"}
    assert (await client.get(url, headers=ALPHA, params=zone_less)).json() == document
    for bad in ({"since": "yesterday"}, {"since": T0 + 1, "until": T0}, {"until": "10:40"}):
        response = await client.get(url, headers=ALPHA, params=bad)
        assert response.status_code == 400, bad
    assert (await client.get("/api/teams/alpha/workers/Not%20a%20slug/track",
                             headers=ALPHA)).status_code == 400


async def test_track_pages_follow_the_next_cursor(client: httpx.AsyncClient) -> None:
    url = "/api/teams/alpha/workers/w001/track"
    params: dict[str, Any] = {"since": T0, "until": T0 + 300_000, "limit": 4}
    seqs: list[int] = []
    pages = 0
    while True:
        document = (await client.get(url, headers=ALPHA, params=params)).json()
        seqs += [point["seq"] for point in document["points"]]
        pages += 1
        if document["next"] is None:
            break
        params["after"] = document["next"]
    assert seqs == [*range(10), 0, 1, 2]
    assert pages == 4
    team_page = (await client.get("/api/teams/alpha/history", headers=ALPHA,
                                  params={**WINDOW, "limit": 3})).json()
    for bad_cursor in ("garbage", team_page["next"]):  # another query's cursor is refused too
        response = await client.get(url, headers=ALPHA, params={**params, "after": bad_cursor})
        assert response.status_code == 400
    too_many = await client.get(url, headers=ALPHA, params={"limit": 10_001})
    assert too_many.status_code == 422


async def test_team_history_has_every_worker_of_the_team_only(client: httpx.AsyncClient) -> None:
    params: dict[str, Any] = {**WINDOW, "limit": 7}
    seen: list[tuple[str, int]] = []
    while True:
        document = (await client.get("/api/teams/alpha/history", headers=ALPHA,
                                     params=params)).json()
        seen += [(point["worker"], point["ts"]) for point in document["positions"]]
        if document["next"] is None:
            break
        params["after"] = document["next"]
    expected = {(worker, T0 + seq * 10_000) for worker in ("w001", "w002") for seq in range(10)}
    assert sorted(seen) == sorted(expected)
    assert [ts for _worker, ts in seen] == sorted(ts for _worker, ts in seen)


async def test_presence_changes_say_when_a_worker_went_offline(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/api/teams/alpha/presence", headers=ALPHA,
                                 params={**WINDOW, "worker": "w001"})).json()
    assert document["changes"] == [
        {"worker": "w001", "ts": T0, "status": "online"},
        {"worker": "w001", "ts": T0 + 95_000, "status": "offline"},
    ]


async def test_exports_parse_with_real_parsers(client: httpx.AsyncClient) -> None:
    url = "/api/teams/alpha/workers/w001/track"
    window = {"since": T0, "until": T0 + 300_000}

    gpx = await client.get(url, headers=ALPHA, params={**window, "format": "gpx"})
    assert gpx.headers["content-type"] == "application/gpx+xml", gpx.text
    assert gpx.headers["content-disposition"] == (
        'attachment; filename="alpha-w001-20261118T110640Z.gpx"'
    )
    parsed = gpxpy.parse(gpx.text)
    assert [len(segment.points) for segment in parsed.tracks[0].segments] == [10, 3]

    geojson = await client.get(url, headers=ALPHA, params={**window, "format": "geojson"})
    assert geojson.headers["content-type"] == "application/geo+json"
    features = json.loads(geojson.content)["features"]
    assert features[0]["geometry"]["type"] == "LineString"
    assert len(features[0]["geometry"]["coordinates"]) == 13
    assert features[0]["properties"]["runs"] == 2

    exported = await client.get(url, headers=ALPHA, params={**window, "format": "csv"})
    assert exported.headers["content-type"] == "text/csv; charset=utf-8"
    assert exported.headers["content-disposition"].endswith('.csv"')
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(row["seq"], row["run"]) for row in rows[9:]] == [("9", "0"), ("0", "1"),
                                                              ("1", "1"), ("2", "1")]

    # Over the export limit (13 here): refused with a reason, not truncated silently.
    wide = {"since": T0, "until": T0 + 1_000_000, "format": "csv"}
    over = await client.get("/api/teams/alpha/workers/w003/track", headers=ALPHA, params=wide)
    assert over.status_code == 422
    assert "narrow since/until" in over.json()["detail"]
    bad_format = await client.get(url, headers=ALPHA, params={"format": "kml"})
    assert bad_format.status_code == 422


async def test_summary_of_a_track(client: httpx.AsyncClient) -> None:
    document = (await client.get("/api/teams/alpha/workers/w001/track/summary", headers=ALPHA,
                                 params={"since": T0, "until": T0 + 90_001})).json()
    assert document["points"] == 10
    assert document["runs"] == 1
    assert document["duration_s"] == 90.0
    assert document["max_speed_mps"] == 1.5
    assert document["distance_m"] == pytest.approx(9 * 111.195, rel=1e-3)


async def test_a_history_without_its_schema_is_503_not_a_crash(tmp_path: Path) -> None:
    store = HistoryStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'empty.sqlite3'}")
    app = FastAPI()
    app.state.authenticator = Authenticator(
        ManagerDirectory.from_records([manager_record("alpha-lead", "alpha", ALPHA_TOKEN)]),
        "test-session-secret",
        3600,
    )
    app.include_router(history_router(store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
        for endpoint in ENDPOINTS:
            response = await client.get(endpoint.format(team="alpha"), headers=ALPHA)
            assert response.status_code == 503, endpoint
            assert response.json() == {"detail": "history unavailable"}
    await store.close()
