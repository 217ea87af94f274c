"""Attacks on a real `python -m dashboard` from the open internet, each shown refused while a
legitimate manager keeps working (issue 13, items 7, 11 and 12; docs/security.md).

The attackers are real clients (httpx, raw sockets, websockets) from other loopback addresses
(127.0.0.2 and up: every 127/8 address is this host's), so that per-address limits and the
trusted-proxy list see different clients. Counts are bounded to keep the suite short; each
test says why its count stands for the larger attack of the issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from teamtrack.local.servers import LOOPBACK, free_port, port_is_open
from teamtrack.passwords import hash_password, token_digest

pytestmark = pytest.mark.security

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-1", "carol": "carol-password-1"}
TOKENS = {name: f"{name}-token-0123456789abcdef" for name in PASSWORDS}
TEAMS = {"alice": "alpha", "bob": "bravo", "carol": "charlie"}
METRICS_TOKEN = "metrics-token-0123456789abcdef"
HEADER_TIMEOUT_S = 2.0
WAIT_S = 15.0
HAS_PROC = Path("/proc/self/status").exists()


def write_auth_file(path: Path) -> Path:
    managers = [
        {
            "username": name,
            "team": TEAMS[name],
            "password_hash": hash_password(password),
            "token_sha256": token_digest(TOKENS[name]),
        }
        for name, password in PASSWORDS.items()
    ]
    path.write_bytes(orjson.dumps({"managers": managers}))
    return path


@dataclass
class Dashboard:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_dashboard(folder: Path, **settings: str) -> Dashboard:
    port = free_port()
    log_path = folder / "dashboard.log"
    environment = {
        **os.environ,
        "TEAMTRACK_AUTH_FILE": str(write_auth_file(folder / "dashboard-auth.json")),
        "TEAMTRACK_PORT": str(port),
        "TEAMTRACK_SESSION_SECRET": "attack-test-secret",
        "TEAMTRACK_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        **{f"TEAMTRACK_{name.upper()}": value for name, value in settings.items()},
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "dashboard"],
            cwd=PROJECT_ROOT,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    dashboard = Dashboard(process, port, log_path)
    deadline = time.monotonic() + WAIT_S
    while not port_is_open(LOOPBACK, port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"dashboard did not start:\n{dashboard.log()}")
        time.sleep(0.05)
    return dashboard


def stop_dashboard(dashboard: Dashboard) -> None:
    if dashboard.process.poll() is None:
        dashboard.process.terminate()
        try:
            dashboard.process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            dashboard.process.kill()
    assert "Traceback" not in dashboard.log(), dashboard.log()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """One instance behind a 'TLS proxy' at 127.0.0.1; attackers come from other addresses."""
    running = start_dashboard(
        tmp_path_factory.mktemp("dashboard"), trusted_proxies="127.0.0.1"
    )
    try:
        yield running
    finally:
        stop_dashboard(running)


def client_from(dashboard: Dashboard, address: str = LOOPBACK) -> httpx.AsyncClient:
    """An HTTP client whose connections come from `address`."""
    return httpx.AsyncClient(
        base_url=dashboard.url,
        transport=httpx.AsyncHTTPTransport(local_address=address),
        timeout=WAIT_S,
    )


def bearer(name: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


async def manager_still_works(dashboard: Dashboard, name: str = "alice") -> None:
    async with client_from(dashboard) as manager:
        response = await manager.get("/api/me", headers=bearer(name))
    assert response.status_code == 200, response.text
    assert response.json()["username"] == name


# 7. Login abuse ------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_PROC, reason="reads the process's RSS from /proc")
async def test_login_flood_keeps_memory_flat_and_healthz_fast(tmp_path: Path) -> None:
    """200 parallel bad logins (from 20 addresses, 200 usernames, so that no rate limit spares
    the password check): before, the process grew by hundreds of MB (about 16 MB of scrypt
    memory per check in flight, up to 40 threads) and /healthz waited seconds."""
    # A queue as long as the flood: every attempt reaches the password check, the worst case.
    dashboard = start_dashboard(tmp_path, login_queue="256")
    try:
        async with client_from(dashboard) as warm_up:
            assert (await warm_up.get("/healthz")).status_code == 200
        await asyncio.sleep(0.5)
        rss_before = dashboard.rss_mb()
        health_latencies: list[float] = []
        peak_rss = rss_before
        answers: set[tuple[int, int]] = set()  # (/healthz, the manager's /api/me)
        flooding = threading.Event()
        flooding.set()

        def watch() -> None:
            """On a thread of its own, so that the attackers' event loop does not delay it."""
            nonlocal peak_rss
            with httpx.Client(base_url=dashboard.url, timeout=WAIT_S) as operator:
                while flooding.is_set():
                    started = time.perf_counter()
                    response = operator.get("/healthz")
                    health_latencies.append(time.perf_counter() - started)
                    peak_rss = max(peak_rss, dashboard.rss_mb())
                    me = operator.get("/api/me", headers=bearer())
                    answers.add((response.status_code, me.status_code))
                    time.sleep(0.05)

        async def attacker(index: int) -> list[int]:
            async with client_from(dashboard, f"127.0.0.{2 + index}") as client:
                answers = await asyncio.gather(
                    *(
                        client.post(
                            "/login",
                            data={"username": f"guess-{index}-{attempt}", "password": "x"},
                        )
                        for attempt in range(10)
                    )
                )
            return [answer.status_code for answer in answers]

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.perf_counter()
        statuses = [code for codes in await asyncio.gather(
            *(attacker(index) for index in range(20))) for code in codes]
        flood_s = time.perf_counter() - started
        flooding.clear()
        await asyncio.to_thread(watcher.join)
        await asyncio.sleep(0.5)
        rss_after = dashboard.rss_mb()
        async with client_from(dashboard) as manager:
            login = await manager.post(
                "/login", data={"username": "alice", "password": PASSWORDS["alice"]}
            )
        print(
            f"\nlogin flood: 200 bad logins in {flood_s:.1f} s; RSS {rss_before:.0f} MB before, "
            f"peak {peak_rss:.0f} MB, {rss_after:.0f} MB after; /healthz max "
            f"{max(health_latencies) * 1000:.0f} ms (median "
            f"{sorted(health_latencies)[len(health_latencies) // 2] * 1000:.0f} ms) over "
            f"{len(health_latencies)} probes"
        )
        assert statuses == [401] * 200
        assert answers == {(200, 200)}, answers
        assert rss_after - rss_before < 64, (rss_before, rss_after)
        assert peak_rss - rss_before < 64, (rss_before, peak_rss)
        assert max(health_latencies) < 1.0, health_latencies
        assert login.status_code == 303
    finally:
        stop_dashboard(dashboard)


async def test_password_guessing_is_rate_limited_per_address(dashboard: Dashboard) -> None:
    async with client_from(dashboard, "127.0.1.2") as attacker:
        answers = [
            await attacker.post("/login", data={"username": f"nobody-{n}", "password": "guess"})
            for n in range(12)
        ]
        # Spoofed forwarding headers from an address that is not a trusted proxy change nothing.
        spoofed = await attacker.post(
            "/login",
            data={"username": "carol", "password": "guess"},
            headers={"X-Forwarded-For": "203.0.113.9"},
        )
    codes = [answer.status_code for answer in answers]
    assert codes == [401] * 10 + [429] * 2, codes
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert spoofed.status_code == 429
    # Meanwhile the real manager, from her own address, signs in.
    async with client_from(dashboard) as manager:
        login = await manager.post(
            "/login", data={"username": "alice", "password": PASSWORDS["alice"]},
            follow_redirects=False,
        )
    assert login.status_code == 303


async def test_password_guessing_is_rate_limited_per_account(dashboard: Dashboard) -> None:
    """A botnet: each address guesses twice, so only the account's own limit can stop it."""
    codes: list[int] = []
    retry_after = ""
    for index in range(8):
        async with client_from(dashboard, f"127.0.2.{2 + index}") as attacker:
            for attempt in range(2):
                answer = await attacker.post(
                    "/login", data={"username": "carol", "password": f"guess-{index}-{attempt}"}
                )
                codes.append(answer.status_code)
                retry_after = answer.headers.get("retry-after", retry_after)
    assert codes[:5] == [401] * 5, codes
    assert codes[5:] == [429] * 11, codes
    assert 1 <= int(retry_after) <= 60
    # Carol keeps her token (and any session she holds); other managers are untouched.
    await manager_still_works(dashboard, "carol")
    await manager_still_works(dashboard, "alice")


async def test_cross_site_login_and_logout_are_refused(dashboard: Dashboard) -> None:
    form = {"username": "alice", "password": PASSWORDS["alice"]}
    async with client_from(dashboard, "127.0.3.2") as browser:
        for headers in (
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
            {"Referer": "https://evil.example/login-csrf.html"},
        ):
            answer = await browser.post(
                "/login", data=form, headers=headers, follow_redirects=False
            )
            assert answer.status_code == 403, (headers, answer.status_code)
            assert "tt_session" not in answer.headers.get("set-cookie", "")
        signed_in = await browser.post(
            "/login", data=form, headers={"Origin": dashboard.url}, follow_redirects=False
        )
        assert signed_in.status_code == 303
        logout = await browser.post(
            "/logout", headers={"Origin": "https://evil.example"}, follow_redirects=False
        )
        assert logout.status_code == 403
        assert "tt_session" not in logout.headers.get("set-cookie", "")
        assert (await browser.get("/api/me")).status_code == 200


async def test_oversized_login_body_is_refused(dashboard: Dashboard) -> None:
    async with client_from(dashboard, "127.0.3.3") as attacker:
        answer = await attacker.post(
            "/login", content=b"username=alice&password=" + b"x" * 2_000_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 413
    await manager_still_works(dashboard)


# 11. Connection exhaustion -------------------------------------------------------------------
def open_sockets(dashboard: Dashboard, count: int, address: str) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        connection = socket.create_connection(
            (LOOPBACK, dashboard.port), timeout=WAIT_S, source_address=(address, 0)
        )
        sockets.append(connection)
    return sockets


def is_closed_by_server(connection: socket.socket) -> bool:
    connection.setblocking(False)
    try:
        data = connection.recv(65536)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        connection.setblocking(True)
    # EOF, or a last answer (a 408/503) followed by EOF.
    return data == b"" or data.startswith(b"HTTP/1.1")


async def wait_until_closed(sockets: list[socket.socket], limit_s: float) -> float:
    started = time.monotonic()
    remaining = list(sockets)
    while remaining and time.monotonic() - started < limit_s:
        remaining = [connection for connection in remaining if not is_closed_by_server(connection)]
        await asyncio.sleep(0.1)
    assert not remaining, f"{len(remaining)} of {len(sockets)} still open after {limit_s} s"
    return time.monotonic() - started


async def test_idle_connections_are_closed(dashboard: Dashboard) -> None:
    """300 connections that never send a byte. Each is closed by its own timer, so 2,000 take
    the same time as 300; what 2,000 add is file descriptors, which the connection cap bounds
    (next tests)."""
    idle = open_sockets(dashboard, 300, "127.0.4.2")
    try:
        await manager_still_works(dashboard)
        closed_after = await wait_until_closed(idle, HEADER_TIMEOUT_S + 3)
        print(f"\n300 idle connections closed within {closed_after:.1f} s")
    finally:
        for connection in idle:
            connection.close()


async def test_slowloris_connections_are_closed(dashboard: Dashboard) -> None:
    """50 clients sending a request's headers one byte every 0.25 s (the issue's 50)."""
    slow = open_sockets(dashboard, 50, "127.0.4.3")
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 1000
    started = time.monotonic()
    closed_after = 0.0
    try:
        for offset in range(len(request)):
            if time.monotonic() - started > HEADER_TIMEOUT_S + 3:
                break
            for connection in slow:
                with contextlib.suppress(OSError):
                    connection.send(request[offset : offset + 1])
            await manager_still_works(dashboard)
            if all(is_closed_by_server(connection) for connection in slow):
                closed_after = time.monotonic() - started
                break
            await asyncio.sleep(0.25)
        assert closed_after, "the slowloris connections were still open"
        print(f"\n50 slowloris connections closed within {closed_after:.1f} s")
    finally:
        for connection in slow:
            connection.close()


async def test_connections_over_the_cap_get_503(tmp_path: Path) -> None:
    """A cap of 100 and 150 idle connections: the same as 2,000 against the default cap of
    1,000, at a fifteenth of the file descriptors."""
    dashboard = start_dashboard(tmp_path, max_connections="100")
    idle: list[socket.socket] = []
    try:
        idle = open_sockets(dashboard, 150, "127.0.5.2")
        await asyncio.sleep(0.3)
        async with client_from(dashboard, "127.0.5.3") as late:
            try:
                refused = (await late.get("/healthz")).status_code
            except httpx.TransportError:
                refused = 0
        assert refused == 503, refused
        # The idle ones are gone after the header timeout, and the manager is served again.
        await wait_until_closed(idle, HEADER_TIMEOUT_S + 3)
        await manager_still_works(dashboard)
    finally:
        for connection in idle:
            connection.close()
        stop_dashboard(dashboard)


# 12. Hosts, metrics, origins, headers, proxies, logs ----------------------------------------
async def test_foreign_host_headers_are_refused(dashboard: Dashboard) -> None:
    """DNS rebinding: a page on rebind.evil.example reaching this instance through a name
    that resolves to it."""
    async with client_from(dashboard, "127.0.6.2") as attacker:
        for path in ("/healthz", "/metrics", "/login", "/api/me"):
            answer = await attacker.get(path, headers={"Host": "rebind.evil.example"})
            assert answer.status_code == 400, (path, answer.status_code)
    # A WebSocket handshake by hand: client libraries insist on the real Host.
    handshake = (
        "GET /ws/teams/alpha HTTP/1.1\r\nHost: rebind.evil.example\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {TOKENS['alice']}"
        "\r\n\r\n"
    ).encode()
    with socket.create_connection((LOOPBACK, dashboard.port), timeout=WAIT_S) as connection:
        connection.sendall(handshake)
        status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"400", status_line
    async with client_from(dashboard) as operator:
        assert (await operator.get("/healthz")).status_code == 200


async def test_metrics_are_not_public(dashboard: Dashboard, tmp_path: Path) -> None:
    # Without a metrics token: loopback only, and not through a proxy.
    async with client_from(dashboard) as local:
        assert (await local.get("/metrics")).status_code == 200
        proxied = await local.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        assert proxied.status_code == 404
    # With one: the token, from anywhere.
    guarded = start_dashboard(tmp_path, metrics_token=METRICS_TOKEN)
    try:
        async with client_from(guarded, "127.0.6.3") as scraper:
            assert (await scraper.get("/metrics")).status_code == 404
            wrong = await scraper.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 404
            right = await scraper.get(
                "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            )
            assert right.status_code == 200
            assert "teamtrack_dashboard_logins_total" in right.text
    finally:
        stop_dashboard(guarded)


async def session_cookie(dashboard: Dashboard, headers: dict[str, str]) -> str:
    async with client_from(dashboard) as browser:
        answer = await browser.post(
            "/login", data={"username": "alice", "password": PASSWORDS["alice"]},
            headers=headers, follow_redirects=False,
        )
    assert answer.status_code == 303
    return answer.headers["set-cookie"]


async def test_session_cookie_is_secure_behind_the_tls_proxy(dashboard: Dashboard) -> None:
    behind_proxy = await session_cookie(dashboard, {"X-Forwarded-Proto": "https"})
    assert "secure" in [part.strip().lower() for part in behind_proxy.split(";")]


async def test_cross_scheme_websocket_origin_is_refused(dashboard: Dashboard) -> None:
    """The site is https (behind the proxy); a page of http://same-host (a network attacker
    can serve one) must not open the manager's socket with her cookie."""
    cookie = (await session_cookie(dashboard, {"X-Forwarded-Proto": "https"})).split(";")[0]
    url = f"ws://{LOOPBACK}:{dashboard.port}/ws/teams/alpha"
    headers = {"Cookie": cookie, "X-Forwarded-Proto": "https"}
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            url, additional_headers=headers, origin=f"http://{LOOPBACK}:{dashboard.port}",
            open_timeout=WAIT_S,
        )
    assert refused.value.response.status_code == 403
    async with websockets.connect(
        url, additional_headers=headers, origin=f"https://{LOOPBACK}:{dashboard.port}",
        open_timeout=WAIT_S,
    ) as manager:
        assert orjson.loads(await asyncio.wait_for(manager.recv(), WAIT_S))["type"] == "snapshot"


async def test_responses_carry_security_headers(dashboard: Dashboard) -> None:
    async with client_from(dashboard) as client:
        api = await client.get("/api/me", headers=bearer())
        page = await client.get("/login")
        missing = await client.get("/api/nothing-here")
    for answer in (api, page, missing):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"]
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert "default-src 'none'" in api.headers["content-security-policy"]
    assert "default-src 'self'" in page.headers["content-security-policy"]


async def test_access_log_holds_no_query_secrets(dashboard: Dashboard) -> None:
    secret = "leaked-secret-in-a-url-0123456789"
    async with client_from(dashboard, "127.0.6.4") as careless:
        await careless.get(f"/api/me?token={secret}")
        await careless.get(f"/healthz?access_token={secret}")
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(
            f"ws://{LOOPBACK}:{dashboard.port}/ws/teams/alpha?token={secret}",
            open_timeout=WAIT_S,
        )
    await asyncio.sleep(0.3)
    log = dashboard.log()
    assert "/api/me" in log and "/healthz" in log
    assert secret not in log
