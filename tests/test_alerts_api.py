"""The zones and alerts API inside the dashboard app: credentials, team isolation, the origin
check of cookie writes, and clear 4xx answers for bad zones."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient
from test_rules_service import DEPOT, authenticator, bearer

from dashboard.app import create_app
from teamtrack.backends.memory import MemoryBackend
from teamtrack.history import HistoryStore
from teamtrack.zones import MAX_ZONE_BYTES


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"

    async def migrate() -> None:
        store = HistoryStore.from_url(url)
        await store.migrate()
        await store.close()

    asyncio.run(migrate())
    app = create_app(MemoryBackend(), authenticator(), instance_id="t",
                     registry=CollectorRegistry(), history_store=HistoryStore.from_url(url))
    with TestClient(app) as test_client:
        yield test_client


def zone(**properties: Any) -> dict[str, Any]:
    return {**DEPOT, "properties": {**DEPOT["properties"], **properties}}


def test_cookie_writes_must_come_from_the_dashboards_own_origin(client: TestClient) -> None:
    signed_in = client.post("/login", data={"username": "alice", "password": "alice-pw-1"},
                            follow_redirects=False)
    assert signed_in.status_code == 303
    evil = client.post("/api/teams/alpha/zones", json=DEPOT,
                       headers={"origin": "https://evil.example"})
    assert evil.status_code == 403
    assert client.get("/api/teams/alpha/zones").json()["features"] == []
    own = client.post("/api/teams/alpha/zones", json=DEPOT,
                      headers={"origin": "http://testserver"})
    assert own.status_code == 201
    zone_id = own.json()["properties"]["id"]
    # A bearer token has no ambient authority: no origin check.
    replaced = client.put(f"/api/teams/alpha/zones/{zone_id}", json=zone(name="Yard"),
                          headers={**bearer("carol"), "origin": "https://tool.example"})
    assert replaced.status_code == 200 and replaced.json()["properties"]["name"] == "Yard"
    assert client.delete(f"/api/teams/alpha/zones/{zone_id}",
                         headers={"origin": "https://evil.example"}).status_code == 403
    assert client.delete(f"/api/teams/alpha/zones/{zone_id}",
                         headers={"origin": "http://testserver"}).status_code == 204
    assert client.delete(f"/api/teams/alpha/zones/{zone_id}",
                         headers={"origin": "http://testserver"}).status_code == 404


def test_bad_requests_get_clear_answers(client: TestClient) -> None:
    headers = bearer("alice")
    assert client.get("/api/teams/alpha/zones").status_code == 401
    assert client.get("/api/teams/bravo/zones", headers=headers).status_code == 403
    assert client.get("/api/teams/alpha/alerts", headers=bearer("bob")).status_code == 403
    assert client.post("/api/teams/alpha/alerts/x/ack", headers=bearer("bob")).status_code == 403
    bad = client.post("/api/teams/alpha/zones", json=zone(radius_m=1), headers=headers)
    assert bad.status_code == 400 and "radius_m" in bad.json()["detail"]
    assert client.post("/api/teams/alpha/zones", content=b"{", headers={
        **headers, "content-type": "application/json"}).status_code == 400
    assert client.post("/api/teams/alpha/zones", content=b"name=x", headers={
        **headers, "content-type": "application/x-www-form-urlencoded"}).status_code == 415
    huge = client.post("/api/teams/alpha/zones", json=zone(name="x" * MAX_ZONE_BYTES),
                       headers=headers)
    assert huge.status_code == 413
    assert client.put("/api/teams/alpha/zones/nope", json=DEPOT,
                      headers=headers).status_code == 404
    assert client.put("/api/teams/alpha/zones/..%2Fx", json=DEPOT,
                      headers=headers).status_code == 404
    assert client.get("/api/teams/alpha/alerts?since=-1", headers=headers).status_code == 422
    assert client.get("/api/teams/alpha/alerts?limit=5000", headers=headers).status_code == 422
    assert client.get("/api/teams/alpha/alerts", headers=headers).json() == {"alerts": []}
    assert client.post("/api/teams/alpha/alerts/nope/ack", headers=headers).status_code == 404
