"""The dashboard in-process (TestClient) and as a real `python -m dashboard` with Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from backend_contract import position, status
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient, WebSocketDenialResponse

from dashboard.app import create_app
from dashboard.auth import Authenticator, ManagerDirectory
from dashboard.hub import ViewerLimits
from dashboard.page import PageConfig
from dashboard.settings import DashboardSettings
from teamtrack.backends import Backend, BackendError, Event, Snapshot, from_url
from teamtrack.backends.memory import MemoryBackend
from teamtrack.local.servers import LOOPBACK, free_port, port_is_open
from teamtrack.passwords import hash_password, token_digest
from teamtrack.settings import load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "alice-password-1"
TOKEN = "alice-token-0123456789abcdef"
WAIT = 5.0


def bearer() -> dict[str, str]:
    # A fresh dict each time: TestClient.websocket_connect adds its own headers to the one given.
    return {"Authorization": f"Bearer {TOKEN}"}


def write_auth_file(path: Path) -> Path:
    manager = {
        "username": "alice",
        "team": "alpha",
        "password_hash": hash_password(PASSWORD),
        "token_sha256": token_digest(TOKEN),
    }
    path.write_bytes(orjson.dumps({"managers": [manager]}))
    return path


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_auth_file(tmp_path_factory.mktemp("auth") / "dashboard-auth.json")


@pytest.fixture(scope="module")
def authenticator(auth_file: Path) -> Authenticator:
    return Authenticator(ManagerDirectory.load(auth_file), "test-secret", 3600)


class Dashboard:
    """An app on the memory backend, and a way to publish into it from the test thread."""

    def __init__(self, client: TestClient, backend: Backend) -> None:
        self.client = client
        self.backend = backend

    def publish(self, *events: Event) -> None:
        # The backend lives on the app's event loop, which runs in the TestClient's thread.
        self.client.portal.call(self.backend.publish, list(events))  # type: ignore[union-attr]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        registry: CollectorRegistry = self.client.app.state.metrics.registry  # type: ignore[attr-defined]
        return registry.get_sample_value(name, labels or {})


def open_dashboard(
    authenticator: Authenticator, backend: Backend | None = None, queue_batches: int = 256
) -> Iterator[Dashboard]:
    backend = backend if backend is not None else from_url("memory://")
    app = create_app(
        backend,
        authenticator,
        instance_id="test-instance",
        registry=CollectorRegistry(),
        viewer_limits=ViewerLimits(queue_batches=queue_batches),
    )
    with TestClient(app) as client:
        yield Dashboard(client, backend)


@pytest.fixture
def dashboard(authenticator: Authenticator) -> Iterator[Dashboard]:
    yield from open_dashboard(authenticator)


def test_snapshot_api_lists_workers_sorted_with_position_and_presence(dashboard: Dashboard) -> None:
    w2 = position("alpha", "w2", 3)
    w1 = position("alpha", "w1", 7)
    online = status("alpha", "w1", "online")
    dashboard.publish(w2, w1, online, status("alpha", "w3", "offline"))
    dashboard.publish(position("bravo", "w9", 0))

    response = dashboard.client.get("/api/teams/alpha/positions", headers=bearer())
    assert response.status_code == 200
    body = response.json()
    assert body["team"] == "alpha" and body["cursor"] == "1"
    assert [item["worker"] for item in body["workers"]] == ["w1", "w2", "w3"]
    first, second, third = body["workers"]
    assert first == {
        "worker": "w1",
        "position": orjson.loads(w1.body),
        "received_ms": w1.received_ms,
        "origin": "b1",
        "status": "online",
        "status_ms": online.received_ms,
    }
    assert second["position"]["seq"] == 3 and second["status"] is None
    assert third["position"] is None and third["status"] == "offline"


def test_websocket_sends_snapshot_then_events(dashboard: Dashboard) -> None:
    dashboard.publish(position("alpha", "w1", 0))
    with dashboard.client.websocket_connect("/ws/teams/alpha", headers=bearer()) as socket:
        snapshot = socket.receive_json()
        assert snapshot["type"] == "snapshot"
        assert [item["position"]["seq"] for item in snapshot["workers"]] == [0]

        sent = [position("alpha", "w1", 1), status("alpha", "w2", "online")]
        dashboard.publish(*sent)
        dashboard.publish(position("bravo", "w1", 1))
        dashboard.publish(position("alpha", "w1", 2))
        events: list[dict[str, Any]] = []
        while len(events) < 3:
            frame = socket.receive_json()
            assert frame["type"] == "events" and frame["team"] == "alpha"
            events += frame["events"]
        # Each event is the backend's event JSON, untouched.
        assert events[:2] == [orjson.loads(event.to_json()) for event in sent]
        assert events[2]["p"]["seq"] == 2
        assert frame["cursor"] == "3"

        socket.send_text('{"type":"ping"}')
        assert socket.receive_json() == {"type": "pong"}
    assert dashboard.metric("teamtrack_dashboard_frames_sent_total") >= 2  # type: ignore[operator]


async def publish_burst(backend: Backend) -> None:
    # memory:// publishes without yielding to the event loop: no viewer drains in between.
    for seq in range(20):
        await backend.publish([position("alpha", "w1", seq), position("alpha", "w2", seq)])


def test_viewer_that_falls_behind_gets_one_sync_frame(authenticator: Authenticator) -> None:
    for dashboard in open_dashboard(authenticator, queue_batches=2):
        with dashboard.client.websocket_connect("/ws/teams/alpha", headers=bearer()) as socket:
            assert socket.receive_json()["type"] == "snapshot"
            dashboard.client.portal.call(publish_burst, dashboard.backend)  # type: ignore[union-attr]
            sync = socket.receive_json()
            assert sync["type"] == "sync" and sync["cursor"] == "20"
            assert [(event["w"], event["p"]["seq"]) for event in sync["events"]] == [
                ("w1", 19),
                ("w2", 19),
            ]
            dashboard.publish(position("alpha", "w1", 20))
            frame = socket.receive_json()
            assert frame["type"] == "events" and frame["events"][0]["p"]["seq"] == 20
        assert dashboard.metric("teamtrack_dashboard_viewer_conflations_total") == 1
        assert dashboard.metric("teamtrack_dashboard_sync_frames_total") == 1
        assert dashboard.metric("teamtrack_dashboard_viewers_disconnected_slow_total") == 0


def test_websocket_resumes_after_the_cursor_of_the_last_frame(dashboard: Dashboard) -> None:
    dashboard.publish(position("alpha", "w1", 0))
    with dashboard.client.websocket_connect("/ws/teams/alpha", headers=bearer()) as socket:
        assert socket.receive_json()["type"] == "snapshot"
        dashboard.publish(position("alpha", "w1", 1))
        cursor = socket.receive_json()["cursor"]
    # Missed while disconnected:
    dashboard.publish(position("alpha", "w1", 2), status("alpha", "w1", "offline"))
    dashboard.publish(position("alpha", "w1", 3))
    url = f"/ws/teams/alpha?after={cursor}"
    with dashboard.client.websocket_connect(url, headers=bearer()) as socket:
        assert socket.receive_json() == {
            "type": "resume",
            "team": "alpha",
            "cursor": cursor,
            "now": pytest.approx(time.time() * 1000, abs=60_000),
        }
        events: list[dict[str, Any]] = []
        while len(events) < 3:
            frame = socket.receive_json()
            assert frame["type"] == "events"
            events += frame["events"]
        assert [(event["k"], event["p"]) for event in events][1] == ("s", "offline")
        assert [event["p"]["seq"] for event in events if event["k"] == "p"] == [2, 3]
        dashboard.publish(position("alpha", "w1", 4))
        assert socket.receive_json()["events"][0]["p"]["seq"] == 4
    assert dashboard.metric("teamtrack_dashboard_resumes_total", {"outcome": "replayed"}) == 1


class UnreachableBackend(MemoryBackend):
    async def ping(self) -> bool:
        return False


class SnapshotlessBackend(MemoryBackend):
    async def snapshot(self, team: str) -> Snapshot:
        raise BackendError("redis at 127.0.0.1:1 is unreachable (test)")


def test_backend_failure_is_503_not_a_crash(authenticator: Authenticator) -> None:
    for dashboard in open_dashboard(authenticator, backend=SnapshotlessBackend()):
        client = dashboard.client
        response = client.get("/api/teams/alpha/positions", headers=bearer())
        assert response.status_code == 503
        with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect(
            "/ws/teams/alpha", headers=bearer()
        ):
            pass
        assert refused.value.status_code == 503
        # The failed viewer is not left behind in the hub.
        assert dashboard.metric("teamtrack_dashboard_viewers", {"team": "alpha"}) == 0


def test_healthz(dashboard: Dashboard, authenticator: Authenticator) -> None:
    response = dashboard.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "instance": "test-instance", "backend": True}
    for broken in open_dashboard(authenticator, backend=UnreachableBackend()):
        response = broken.client.get("/healthz")
        assert response.status_code == 503 and response.json()["backend"] is False


def test_metrics_are_public_and_hold_counters(dashboard: Dashboard) -> None:
    with dashboard.client.websocket_connect("/ws/teams/alpha", headers=bearer()) as socket:
        socket.receive_json()
        dashboard.publish(position("alpha", "w1", 0), position("alpha", "w2", 0))
        socket.receive_json()
    dashboard.client.get("/api/me")  # refused: counted nowhere secret
    text = dashboard.client.get("/metrics").text
    for line in (
        'teamtrack_dashboard_backend_batches_total{team="alpha"} 1.0',
        'teamtrack_dashboard_backend_events_total{team="alpha"} 2.0',
        "teamtrack_dashboard_frames_sent_total 2.0",
        "teamtrack_dashboard_viewers_disconnected_slow_total 0.0",
    ):
        assert line in text
    assert "TYPE teamtrack_dashboard_ws_denied_total counter" in text
    assert TOKEN not in text and "test-secret" not in text


def test_page_settings_need_credentials(dashboard: Dashboard) -> None:
    assert dashboard.client.get("/api/config").status_code == 401
    response = dashboard.client.get("/api/config", headers=bearer())
    assert response.json() == {
        "stale_after_s": 30.0,
        "trail_points": 20,
        "tile_url": "https://tile.openstreetmap.org/{z}/{x}/{y}.png",
        "tile_attribution": "© OpenStreetMap contributors",
        "history": False,
    }


def test_content_security_policy_allows_images_from_the_tile_host_only(
    authenticator: Authenticator,
) -> None:
    tiles = "https://{s}.tiles.example.org:8443/base/{z}/{x}/{y}.png"
    for tile_url, image_sources in [
        (tiles, "img-src 'self' data: https://*.tiles.example.org:8443;"),
        ("", "img-src 'self' data:;"),
    ]:
        app = create_app(
            MemoryBackend(),
            authenticator,
            instance_id="test-instance",
            registry=CollectorRegistry(),
            page_config=PageConfig(tile_url=tile_url),
        )
        with TestClient(app) as client:
            policy = client.get("/login").headers["content-security-policy"]
        assert image_sources in policy
        assert "default-src 'self'; connect-src 'self';" in policy


@pytest.mark.parametrize(
    "tile_url",
    [
        "ftp://tiles.example.org/{z}/{x}/{y}.png",
        "https://tiles.example.org/{z}/{x}.png",
        "https://tiles.example.org; script-src *;/{z}/{x}/{y}",
        "https://{z}.example.org/{z}/{x}/{y}.png",
    ],
)
def test_unusable_tile_urls_are_refused(tile_url: str) -> None:
    with pytest.raises(ValueError):
        PageConfig(tile_url=tile_url)


def test_page_needs_login_and_is_served_after(dashboard: Dashboard) -> None:
    client = dashboard.client
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert 'action="/login"' in client.get("/login").text
    client.post("/login", data={"username": "alice", "password": PASSWORD})
    page = client.get("/", follow_redirects=False)
    assert page.status_code == 200
    assert '<script src="/static/app.js"' in page.text
    assert '<script src="/static/vendor/leaflet/leaflet.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200


# The real server -------------------------------------------------------------------------------
def dashboard_process(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dashboard"],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def test_real_server_over_redis(redis_url: str, auth_file: Path, tmp_path: Path) -> None:
    port = free_port()
    server = dashboard_process(
        {
            "TEAMTRACK_BACKEND_URL": redis_url,
            "TEAMTRACK_AUTH_FILE": str(auth_file),
            "TEAMTRACK_PORT": str(port),
            "TEAMTRACK_SESSION_SECRET": "shared-by-all-instances",
            "TEAMTRACK_LOG_LEVEL": "INFO",
        }
    )
    bridge = from_url(redis_url)
    await bridge.start()
    try:
        deadline = time.monotonic() + 15
        while not port_is_open(LOOPBACK, port):
            assert server.poll() is None, server.communicate()[0].decode()
            assert time.monotonic() < deadline, "dashboard did not start listening"
            await asyncio.sleep(0.05)
        await bridge.publish([position("alpha", "w1", 0)])
        url = f"ws://{LOOPBACK}:{port}/ws/teams/alpha"

        # uvicorn's WebSocket implementation must carry the HTTP denial response.
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, open_timeout=WAIT)
        assert refused.value.response.status_code == 401

        async with websockets.connect(
            url, additional_headers=bearer(), open_timeout=WAIT
        ) as socket:
            snapshot = orjson.loads(await asyncio.wait_for(socket.recv(), WAIT))
            assert snapshot["type"] == "snapshot"
            assert snapshot["workers"][0]["position"]["seq"] == 0
            await bridge.publish([position("alpha", "w1", 1)])
            frame = orjson.loads(await asyncio.wait_for(socket.recv(), WAIT))
            assert frame["type"] == "events"
            assert [event["p"]["seq"] for event in frame["events"]] == [1]
    finally:
        await bridge.close()
        server.terminate()
        output = server.communicate(timeout=WAIT)[0].decode()
    assert "Traceback" not in output and "ERROR" not in output, output


def test_missing_auth_file_is_a_one_line_error(tmp_path: Path) -> None:
    server = dashboard_process(
        {
            "TEAMTRACK_AUTH_FILE": str(tmp_path / "nowhere.json"),
            "TEAMTRACK_PORT": str(free_port()),
        }
    )
    output = server.communicate(timeout=15)[0].decode()
    assert server.returncode != 0
    assert output.count("\n") == 1, output
    assert "nowhere.json does not exist" in output


def test_unreachable_backend_is_a_one_line_error(auth_file: Path) -> None:
    server = dashboard_process(
        {
            "TEAMTRACK_AUTH_FILE": str(auth_file),
            "TEAMTRACK_BACKEND_URL": f"redis://{LOOPBACK}:{free_port()}/0",
            "TEAMTRACK_PORT": str(free_port()),
        }
    )
    output = server.communicate(timeout=15)[0].decode()
    assert server.returncode != 0
    assert output.count("\n") == 1, output
    assert "unreachable" in output


def test_compression_is_offered_unless_turned_off(auth_file: Path) -> None:
    def load(*flags: str) -> DashboardSettings:
        return load_settings(
            DashboardSettings, "python -m dashboard", ["--auth-file", str(auth_file), *flags]
        )

    assert load().ws_compression
    assert not load("--no-ws-compression").ws_compression
