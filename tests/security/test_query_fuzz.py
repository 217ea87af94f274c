"""A bounded fuzz pass over what a manager's client sends the dashboard: query parameters of
every history endpoint and the live socket's resume cursor. Whatever comes, the answer is a
clear 4xx (or the data), never a 500, and the dashboard keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote, urlencode

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dashboard_api import Dashboard, auth_file, authenticator, bearer, open_dashboard
from test_history_api import ALPHA, ALPHA_TOKEN, BRAVO_TOKEN, manager_record, position

from dashboard.auth import Authenticator, ManagerDirectory
from dashboard.history_api import history_router
from teamtrack.history import HistoryStore

pytestmark = pytest.mark.security
__all__ = ["auth_file", "authenticator"]  # fixtures, shared

T0 = 1_795_000_000_000
# Anything a hostile client may put into a query string: text of every kind, numbers at and
# beyond the edges, cursors of other queries, nothing at all.
VALUES = st.one_of(
    st.text(max_size=80),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["", "0", "-1", "1e999", "NaN", "nan", "inf", "2026-11-18T11:06:40Z",
                     "2026-13-45T99:99:99", "track:1:2", "team:x:y", "%00", "\x00", "☃" * 30,
                     "9" * 400, "json", "gpx", "geojson", "csv", "kml", "1-0", "0-0"]),
)
# The fixtures are the servers under test, shared on purpose by every example.
FIXTURES = [HealthCheck.function_scoped_fixture]
PATHS = (
    "/api/teams/alpha/workers/{worker}/track",
    "/api/teams/alpha/workers/{worker}/track/summary",
    "/api/teams/alpha/history",
    "/api/teams/alpha/presence",
)


@pytest.fixture(scope="module")
def history_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    import asyncio

    path = tmp_path_factory.mktemp("fuzz") / "history.sqlite3"
    store = HistoryStore.from_url(f"sqlite+aiosqlite:///{path}")

    async def fill() -> None:
        await store.migrate()
        await store.write([position("alpha", "w001", seq, T0 + seq * 1000) for seq in range(5)],
                          [])

    asyncio.run(fill())
    app = FastAPI()
    app.state.authenticator = Authenticator(
        ManagerDirectory.from_records([
            manager_record("alpha-lead", "alpha", ALPHA_TOKEN),
            manager_record("bravo-lead", "bravo", BRAVO_TOKEN),
        ]),
        "test-session-secret",
        3600,
    )
    app.include_router(history_router(store, max_export_points=100))
    yield app


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(
    path=st.sampled_from(PATHS),
    worker=st.one_of(st.just("w001"), st.text(min_size=1, max_size=70)),
    query=st.dictionaries(
        st.sampled_from(["since", "until", "limit", "after", "format", "worker", "x"]),
        VALUES, max_size=5,
    ),
)
async def test_history_queries_never_fail_with_a_500(
    history_app: FastAPI, path: str, worker: str, query: dict[str, str]
) -> None:
    url = path.format(worker=quote(worker, safe=""))
    transport = httpx.ASGITransport(app=history_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
        response = await client.get(f"{url}?{urlencode(query)}", headers=ALPHA)
    assert response.status_code < 500, (url, query, response.status_code, response.text[:200])


@pytest.fixture
def dashboard(authenticator: Authenticator) -> Iterator[Dashboard]:
    yield from open_dashboard(authenticator)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(cursor=VALUES)
def test_any_resume_cursor_gets_a_first_frame(dashboard: Dashboard, cursor: str) -> None:
    """A cursor the backend cannot read is answered `gap` + `snapshot`, never an error."""
    with dashboard.client.websocket_connect(
        f"/ws/teams/alpha?{urlencode({'after': cursor})}", headers=bearer()
    ) as socket:
        first = socket.receive_json()
    assert first["type"] in ("snapshot", "resume", "gap"), first
    response = dashboard.client.get("/api/teams/alpha/positions", headers=bearer())
    assert response.status_code == 200
