"""Who may see what: passwords, tokens, session cookies, team isolation, WebSocket handshakes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from dashboard.app import create_app
from dashboard.auth import SESSION_COOKIE, Authenticator, AuthFileError, Manager, ManagerDirectory
from teamtrack.backends import from_url
from teamtrack.passwords import hash_password, token_digest

ALICE = Manager("alice", "alpha")
ALICE_PASSWORD = "alice-password-1"
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"
SECRET = "test-session-secret"


def write_auth_file(path: Path) -> Path:
    document = {
        "managers": [
            {
                "username": "alice",
                "team": "alpha",
                "password_hash": hash_password(ALICE_PASSWORD),
                "token_sha256": token_digest(ALICE_TOKEN),
            },
            {
                "username": "bob",
                "team": "bravo",
                "password_hash": hash_password("bob-password-1"),
                "token_sha256": token_digest(BOB_TOKEN),
            },
        ]
    }
    path.write_bytes(orjson.dumps(document))
    return path


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> ManagerDirectory:
    return ManagerDirectory.load(write_auth_file(tmp_path_factory.mktemp("auth") / "auth.json"))


@pytest.fixture
def authenticator(directory: ManagerDirectory) -> Authenticator:
    return Authenticator(directory, SECRET, session_max_age_s=3600)


@pytest.fixture
def client(authenticator: Authenticator) -> Iterator[TestClient]:
    app = create_app(
        from_url("memory://"), authenticator, instance_id="test", registry=CollectorRegistry()
    )
    with TestClient(app) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def log_in(client: TestClient) -> None:
    response = client.post(
        "/login", data={"username": "alice", "password": ALICE_PASSWORD}, follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/"


# Cookies -------------------------------------------------------------------------------------
def test_session_cookie_round_trip(authenticator: Authenticator) -> None:
    assert authenticator.read_session(authenticator.issue_session(ALICE)) == ALICE


def test_session_cookie_expires(authenticator: Authenticator) -> None:
    issued = time.time()
    cookie = authenticator.issue_session(ALICE, now=issued)
    assert authenticator.read_session(cookie, now=issued + 3599) == ALICE
    assert authenticator.read_session(cookie, now=issued + 3601) is None


def test_tampered_or_foreign_cookie_is_refused(
    authenticator: Authenticator, directory: ManagerDirectory
) -> None:
    cookie = authenticator.issue_session(ALICE)
    payload, signature = cookie.split(".")
    forged_payload = Authenticator(directory, SECRET, 3600).issue_session(
        Manager("alice", "bravo")
    ).split(".")[0]
    other_secret = Authenticator(directory, "another-secret", 3600).issue_session(ALICE)
    for value in (
        f"{forged_payload}.{signature}",
        f"{payload}.{signature[:-2]}AA",
        other_secret,
        "",
        ".",
        "a.b.c",
        "!!!.???",
        cookie + "x" * 2000,
    ):
        assert authenticator.read_session(value) is None, value


def test_cookie_of_a_removed_manager_is_refused(authenticator: Authenticator) -> None:
    cookie = authenticator.issue_session(ALICE)
    without_alice = ManagerDirectory.from_records([])
    assert Authenticator(without_alice, SECRET, 3600).read_session(cookie) is None


# Passwords and tokens ------------------------------------------------------------------------
def test_password_authentication(directory: ManagerDirectory) -> None:
    assert directory.authenticate_password("alice", ALICE_PASSWORD) == ALICE
    assert directory.authenticate_password("alice", "wrong") is None
    assert directory.authenticate_password("nobody", ALICE_PASSWORD) is None


def test_token_authentication(directory: ManagerDirectory) -> None:
    assert directory.authenticate_token(ALICE_TOKEN) == ALICE
    assert directory.authenticate_token(BOB_TOKEN) == Manager("bob", "bravo")
    assert directory.authenticate_token("guess") is None


def test_auth_file_problems_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="does not exist"):
        ManagerDirectory.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(AuthFileError, match="not JSON"):
        ManagerDirectory.load(broken)
    bad_team = tmp_path / "bad-team.json"
    bad_team.write_bytes(
        orjson.dumps(
            {"managers": [{"username": "x", "team": "Bad Team", "password_hash": "h",
                           "token_sha256": "0" * 64}]}
        )
    )
    with pytest.raises(AuthFileError, match=r"managers\.0\.team") as raised:
        ManagerDirectory.load(bad_team)
    assert "\n" not in str(raised.value)


# HTTP ----------------------------------------------------------------------------------------
def test_api_requires_credentials(client: TestClient) -> None:
    response = client.get("/api/teams/alpha/positions")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/me").status_code == 401
    assert client.get("/api/me", headers=bearer("wrong")).status_code == 401
    basic = {"Authorization": f"Basic {ALICE_TOKEN}"}
    assert client.get("/api/me", headers=basic).status_code == 401


def test_token_in_query_string_is_not_accepted(client: TestClient) -> None:
    for name in ("token", "access_token", "tt_session"):
        response = client.get(f"/api/teams/alpha/positions?{name}={ALICE_TOKEN}")
        assert response.status_code == 401


def test_manager_sees_only_own_team(client: TestClient) -> None:
    assert client.get("/api/teams/alpha/positions", headers=bearer(ALICE_TOKEN)).status_code == 200
    other = client.get("/api/teams/bravo/positions", headers=bearer(ALICE_TOKEN))
    unknown = client.get("/api/teams/zulu/positions", headers=bearer(ALICE_TOKEN))
    # Same answer for a team that exists and one that does not: team names are not revealed.
    assert other.status_code == unknown.status_code == 403
    assert other.json() == unknown.json()
    not_a_slug = client.get("/api/teams/NOT%20A%20SLUG/positions", headers=bearer(ALICE_TOKEN))
    assert not_a_slug.status_code == 403


def test_login_cookie_opens_the_api(client: TestClient) -> None:
    log_in(client)
    assert client.get("/api/me").json() == {"username": "alice", "team": "alpha"}
    assert client.get("/api/teams/alpha/positions").status_code == 200
    assert client.get("/api/teams/bravo/positions").status_code == 403


def test_session_cookie_attributes(authenticator: Authenticator) -> None:
    app = create_app(
        from_url("memory://"), authenticator, instance_id="test", registry=CollectorRegistry()
    )
    for base_url, secure in (("http://testserver", False), ("https://testserver", True)):
        with TestClient(app, base_url=base_url) as client:
            response = client.post(
                "/login",
                data={"username": "alice", "password": ALICE_PASSWORD},
                follow_redirects=False,
            )
        attributes = [part.strip().lower() for part in response.headers["set-cookie"].split(";")]
        assert attributes[0].startswith(f"{SESSION_COOKIE}=")
        assert {"httponly", "samesite=lax", "path=/"} <= set(attributes)
        assert ("secure" in attributes) is secure


def test_failed_login_shows_the_form_again(client: TestClient) -> None:
    for username in ("alice", "nobody"):
        response = client.post("/login", data={"username": username, "password": "nope"})
        assert response.status_code == 401
        assert "Wrong username or password" in response.text
        assert '<form method="post" action="/login">' in response.text
        assert SESSION_COOKIE not in response.headers.get("set-cookie", "")


def test_logout_clears_the_cookie(client: TestClient) -> None:
    log_in(client)
    response = client.post("/logout", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert client.get("/api/me").status_code == 401


# WebSocket handshakes ------------------------------------------------------------------------
def denial_status(client: TestClient, path: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect(
        path, headers=headers or {}
    ):
        pass
    status_code: int = refused.value.status_code
    return status_code


def test_websocket_refused_before_accept(client: TestClient) -> None:
    assert denial_status(client, "/ws/teams/alpha") == 401
    assert denial_status(client, "/ws/teams/alpha", bearer("wrong")) == 401
    assert denial_status(client, f"/ws/teams/alpha?token={ALICE_TOKEN}") == 401
    assert denial_status(client, "/ws/teams/bravo", bearer(ALICE_TOKEN)) == 403
    assert denial_status(client, "/ws/teams/zulu", bearer(ALICE_TOKEN)) == 403
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    assert registry.get_sample_value("teamtrack_dashboard_ws_denied_total", {"status": "401"}) == 3
    assert registry.get_sample_value("teamtrack_dashboard_ws_denied_total", {"status": "403"}) == 2


def test_websocket_accepts_own_team(client: TestClient) -> None:
    with client.websocket_connect("/ws/teams/alpha", headers=bearer(ALICE_TOKEN)) as socket:
        assert socket.receive_json()["type"] == "snapshot"


def test_cross_site_websocket_with_cookie_is_refused(client: TestClient) -> None:
    log_in(client)
    assert denial_status(client, "/ws/teams/alpha", {"origin": "https://evil.example"}) == 403
    assert denial_status(client, "/ws/teams/alpha", {"origin": "null"}) == 403
    with client.websocket_connect(
        "/ws/teams/alpha", headers={"origin": "http://testserver"}
    ) as socket:
        assert socket.receive_json()["type"] == "snapshot"


def test_bearer_websocket_is_exempt_from_the_origin_check(client: TestClient) -> None:
    headers = {**bearer(ALICE_TOKEN), "origin": "https://tool.example"}
    with client.websocket_connect("/ws/teams/alpha", headers=headers) as socket:
        assert socket.receive_json()["type"] == "snapshot"


# Revocation (dashboard/revocation.py, docs/security.md) ---------------------------------------
def test_a_logged_out_session_is_refused_by_every_app_on_the_backend(
    authenticator: Authenticator, directory: ManagerDirectory
) -> None:
    backend = from_url("memory://")
    other_authenticator = Authenticator(directory, SECRET, session_max_age_s=3600)
    first = create_app(backend, authenticator, instance_id="one", registry=CollectorRegistry())
    second = create_app(
        backend, other_authenticator, instance_id="two", registry=CollectorRegistry()
    )
    with TestClient(first) as one, TestClient(second) as two:
        log_in(one)
        cookie = one.cookies[SESSION_COOKIE]
        two.cookies.set(SESSION_COOKIE, cookie)
        assert two.get("/api/me").status_code == 200
        assert one.post("/logout", follow_redirects=False).status_code == 303
        one.cookies.set(SESSION_COOKIE, cookie)  # a copy kept by whoever stole it
        assert one.get("/api/me").status_code == 401
        two.portal.call(second.state.credential_watch.check_now)  # type: ignore[union-attr]
        assert two.get("/api/me").status_code == 401


def test_rotating_a_manager_ends_their_sessions(tmp_path: Path) -> None:
    path = write_auth_file(tmp_path / "auth.json")
    authenticator = Authenticator(ManagerDirectory.load(path), SECRET, session_max_age_s=3600)
    cookie = authenticator.issue_session(ALICE)
    assert authenticator.read_session(cookie) == ALICE
    document = orjson.loads(path.read_bytes())
    document["managers"][0]["token_sha256"] = token_digest("alice-new-token-0123456789")
    path.write_bytes(orjson.dumps(document))
    authenticator.directory = ManagerDirectory.load(path)
    assert authenticator.read_session(cookie) is None
    assert authenticator.read_session(authenticator.issue_session(ALICE)) == ALICE


def test_the_auth_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = write_auth_file(tmp_path / "auth.json")
    authenticator = Authenticator(ManagerDirectory.load(path), SECRET, session_max_age_s=3600)
    app = create_app(
        from_url("memory://"), authenticator, instance_id="test", registry=CollectorRegistry(),
        auth_file=path,
    )
    with TestClient(app) as client:
        with client.websocket_connect("/ws/teams/alpha", headers=bearer(ALICE_TOKEN)) as socket:
            assert socket.receive_json()["type"] == "snapshot"
            document = orjson.loads(path.read_bytes())
            document["managers"] = document["managers"][1:]  # alice revoked
            replacement = tmp_path / "auth.json.new"
            replacement.write_bytes(orjson.dumps(document))
            replacement.replace(path)
            client.portal.call(app.state.credential_watch.check_now)  # type: ignore[union-attr]
            with pytest.raises(WebSocketDisconnect) as closed:
                socket.receive_json()
            assert closed.value.code == 4401
        assert client.get("/api/me", headers=bearer(ALICE_TOKEN)).status_code == 401
        assert client.get("/api/me", headers=bearer(BOB_TOKEN)).status_code == 200


def test_a_failed_login_keeps_the_username_typed_escaped(client: TestClient) -> None:
    response = client.post("/login", data={"username": "alice", "password": "nope"})
    assert '<input name="username" autocomplete="username" required value="alice">' in (
        response.text
    )
    # The password field gets the focus, the password itself is never echoed.
    assert "nope" not in response.text
    hostile = '"><script>alert(1)</script>'
    response = client.post("/login", data={"username": hostile, "password": "nope"})
    assert "<script>" not in response.text
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in response.text
