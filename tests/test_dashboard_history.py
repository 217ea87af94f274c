"""The history API inside the dashboard app (`create_app(..., history_store=...)`), as served.

`tests/test_history_api.py` covers the router on its own; this covers the wiring: the app's own
credentials (bearer and the session cookie of a real login), team isolation, time filters and
pages through the app, the store closed with the app, the dashboard without a history database,
and `python -m dashboard --database-url`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gpxpy
import orjson
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from dashboard.app import create_app
from dashboard.auth import Authenticator, ManagerDirectory
from dashboard.history_api import HISTORY_PATHS
from teamtrack.backends.memory import MemoryBackend
from teamtrack.history import HistoryStore
from teamtrack.local.servers import free_port
from teamtrack.passwords import hash_password, token_digest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
T0 = 1_795_000_000_000  # 2026-11-18T11:06:40Z
MANAGERS = {"alice": ("alpha", "alice-token-0123456789"), "bob": ("bravo", "bob-token-0123456789")}


def password_of(username: str) -> str:
    return f"{username}-password-1"


def bearer(username: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {MANAGERS[username][1]}"}


def auth_records() -> list[dict[str, str]]:
    return [
        {
            "username": username,
            "team": team,
            "password_hash": hash_password(password_of(username)),
            "token_sha256": token_digest(token),
        }
        for username, (team, token) in MANAGERS.items()
    ]


@pytest.fixture(scope="module")
def authenticator() -> Authenticator:
    return Authenticator(ManagerDirectory.from_records(auth_records()), "test-secret", 3600)


def row(team: str, worker: str, seq: int, ts: int) -> dict[str, Any]:
    return {
        "team": team, "worker": worker, "ts": ts, "seq": seq, "lat": 52.5 + seq / 1e3,
        "lon": 13.4, "acc": 5.0, "speed": 1.5, "heading": None, "battery": 90.0,
        "origin": "b1", "received_ms": ts,
    }


async def fill(url: str) -> None:
    """What an ingest would have stored: alpha's w001 and w002 every 10 s, bravo's x001."""
    store = HistoryStore.from_url(url)
    await store.migrate()
    rows = [row("alpha", worker, seq, T0 + seq * 10_000) for worker in ("w001", "w002")
            for seq in range(12)]
    rows += [row("bravo", "x001", seq, T0 + seq * 10_000) for seq in range(12)]
    presence = [{"team": "alpha", "worker": "w001", "ts": T0, "status": "online", "origin": "b1"}]
    await store.write(rows, presence)
    await store.close()


@pytest.fixture
def database_file(tmp_path: Path) -> Path:
    path = tmp_path / "history.sqlite3"
    asyncio.run(fill(f"sqlite+aiosqlite:///{path}"))
    return path


def open_app(
    authenticator: Authenticator, history_store: HistoryStore | None
) -> TestClient:
    app = create_app(
        MemoryBackend(),
        authenticator,
        instance_id="test-instance",
        registry=CollectorRegistry(),
        history_store=history_store,
    )
    return TestClient(app)


@pytest.fixture
def client(authenticator: Authenticator, database_file: Path) -> Iterator[TestClient]:
    store = HistoryStore.from_url(f"sqlite+aiosqlite:///{database_file}")
    with open_app(authenticator, store) as client:
        yield client


WINDOW = {"since": str(T0), "until": str(T0 + 120_000)}
ENDPOINTS = (
    "/api/teams/{team}/workers/w001/track",
    "/api/teams/{team}/workers/w001/track?format=csv",
    "/api/teams/{team}/workers/w001/track/summary",
    "/api/teams/{team}/history",
    "/api/teams/{team}/presence",
)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_history_through_the_app_is_team_scoped(client: TestClient, endpoint: str) -> None:
    own, other = endpoint.format(team="alpha"), endpoint.format(team="bravo")
    assert client.get(own, params=WINDOW).status_code == 401
    assert client.get(own, params=WINDOW, headers={"Authorization": "Bearer wrong"}
                      ).status_code == 401
    assert client.get(other, params=WINDOW, headers=bearer("alice")).status_code == 403
    assert client.get(endpoint.format(team="nobody"), headers=bearer("alice")).status_code == 403
    assert client.get(own, params=WINDOW, headers=bearer("alice")).status_code == 200
    # The browser's way in: the session cookie of a real login.
    client.post("/login", data={"username": "bob", "password": password_of("bob")})
    assert client.get(other, params=WINDOW).status_code == 200
    assert client.get(own, params=WINDOW).status_code == 403


def test_team_window_filters_by_time_and_pages_through_the_app(client: TestClient) -> None:
    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat()

    params: dict[str, Any] = {"since": iso(T0 + 20_000), "until": iso(T0 + 90_000), "limit": 5}
    seen: list[tuple[str, int]] = []
    pages = 0
    while True:
        response = client.get("/api/teams/alpha/history", params=params, headers=bearer("alice"))
        assert response.status_code == 200
        document = response.json()
        assert (document["since"], document["until"]) == (T0 + 20_000, T0 + 90_000)
        seen += [(point["worker"], point["seq"]) for point in document["positions"]]
        pages += 1
        if document["next"] is None:
            break
        params["after"] = document["next"]
    # seq 2..8 of both workers ([since, until): 90 s excluded), none of bravo's, each once.
    assert sorted(seen) == sorted((w, seq) for w in ("w001", "w002") for seq in range(2, 9))
    assert pages == 3
    track = client.get("/api/teams/alpha/workers/w002/track", headers=bearer("alice"),
                       params={"since": T0 + 100_000, "until": T0 + 500_000}).json()
    assert [point["seq"] for point in track["points"]] == [10, 11]
    bad = client.get("/api/teams/alpha/history", headers=bearer("alice"),
                     params={"since": "noon"})
    assert bad.status_code == 400


def test_exports_through_the_app_parse(client: TestClient) -> None:
    url = "/api/teams/alpha/workers/w001/track"
    gpx = client.get(url, params={**WINDOW, "format": "gpx"}, headers=bearer("alice"))
    assert len(gpxpy.parse(gpx.text).tracks[0].segments[0].points) == 12
    geojson = json.loads(
        client.get(url, params={**WINDOW, "format": "geojson"}, headers=bearer("alice")).content
    )
    assert geojson["features"][0]["geometry"]["type"] == "LineString"
    rows = list(csv.DictReader(io.StringIO(
        client.get(url, params={**WINDOW, "format": "csv"}, headers=bearer("alice")).text
    )))
    assert [int(item["seq"]) for item in rows] == list(range(12))
    summary = client.get(url + "/summary", params=WINDOW, headers=bearer("alice")).json()
    assert summary["points"] == 12 and summary["duration_s"] == 110.0


def test_page_is_told_whether_there_is_a_history(
    client: TestClient, authenticator: Authenticator
) -> None:
    assert client.get("/api/config", headers=bearer("alice")).json()["history"] is True
    with open_app(authenticator, None) as without:
        assert without.get("/api/config", headers=bearer("alice")).json()["history"] is False


def test_the_app_closes_its_store_when_it_stops(
    authenticator: Authenticator, database_file: Path
) -> None:
    store = HistoryStore.from_url(f"sqlite+aiosqlite:///{database_file}")
    with open_app(authenticator, store) as client:
        response = client.get("/api/teams/alpha/history", params=WINDOW, headers=bearer("alice"))
        assert len(response.json()["positions"]) == 24
        # A reader holds the database open in WAL mode...
        assert database_file.with_name("history.sqlite3-wal").exists()
    # ...and the last connection to close checkpoints and removes the write-ahead log.
    assert not database_file.with_name("history.sqlite3-wal").exists()


@pytest.mark.parametrize("path", HISTORY_PATHS)
def test_without_a_database_the_history_answers_503_not_configured(
    authenticator: Authenticator, path: str
) -> None:
    with open_app(authenticator, None) as client:
        own = path.format(team="alpha", worker="w001")
        assert client.get(own).status_code == 401
        other = client.get(path.format(team="bravo", worker="w001"), headers=bearer("alice"))
        assert other.status_code == 403
        response = client.get(own, headers=bearer("alice"))
        assert response.status_code == 503
        assert response.json() == {"detail": "history not configured"}


def test_an_unusable_database_url_is_a_one_line_error(tmp_path: Path) -> None:
    auth_file = tmp_path / "dashboard-auth.json"
    auth_file.write_bytes(orjson.dumps({"managers": auth_records()}))
    server = subprocess.run(
        [sys.executable, "-m", "dashboard"],
        cwd=PROJECT_ROOT,
        env={
            **os.environ,
            "TEAMTRACK_AUTH_FILE": str(auth_file),
            "TEAMTRACK_PORT": str(free_port()),
            "TEAMTRACK_DATABASE_URL": "mysql://history@localhost/teamtrack",
        },
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (server.stdout + server.stderr).decode()
    assert server.returncode != 0
    assert output.count("\n") == 1, output
    assert "--database-url: unsupported history database 'mysql'" in output
