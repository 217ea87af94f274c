"""The rules service against real Redis and SQLite, with two dashboard instances on real
uvicorn servers: zones by the API, alerts on two managers' sockets exactly once each, the
acknowledgement on both; and a rules service that dies mid-stream loses and repeats nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
import pytest
import websockets
from asgi_tools import serving
from prometheus_client import CollectorRegistry

from dashboard.app import create_app
from dashboard.auth import Authenticator, ManagerDirectory
from rules.engine import TeamRules
from rules.service import RulesConfig, RulesService
from rules.webhooks import signature, team_key
from teamtrack.alerts import Alert, AlertStore
from teamtrack.backends import START_OF_LOG, Backend, Batch, Event, from_url
from teamtrack.contract import NOTICE_ORIGIN, Kind
from teamtrack.history import HistoryStore
from teamtrack.history_cli import Targets, erase_everywhere
from teamtrack.local.servers import LOOPBACK, free_port
from teamtrack.passwords import hash_password, token_digest
from teamtrack.zones import parse_zone

WAIT = 10.0
MANAGERS = {"alice": "alpha", "carol": "alpha", "bob": "bravo"}
HOSTILE = '<img src=x onerror="window.pwned=1">'
DEPOT = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [13.4, 52.5]},
         "properties": {"name": HOSTILE, "radius_m": 100}}


def token(username: str) -> str:
    return f"{username}-token-0123456789abcdef"


def bearer(username: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(username)}"}


def authenticator() -> Authenticator:
    records = [{"username": name, "team": team, "password_hash": hash_password(f"{name}-pw-1"),
                "token_sha256": token_digest(token(name))} for name, team in MANAGERS.items()]
    return Authenticator(ManagerDirectory.from_records(records), "secret", 3600)


def fix(team: str, worker: str, seq: int, lat: float, t0: int) -> Event:
    ts = t0 + seq * 1000
    body = orjson.dumps({"lat": lat, "lon": 13.4, "ts": ts, "seq": seq})
    return Event(team, worker, Kind.POSITION, body, "b1", int(time.time() * 1000), ts, 1)


CROSSING = (52.49, 52.5, 52.5002, 52.49)  # outside, in, in, out (1 km south of the depot)


@asynccontextmanager
async def dashboard(redis_url: str, database: str) -> AsyncIterator[int]:
    app = create_app(from_url(redis_url), authenticator(), instance_id=f"d{free_port()}",
                     registry=CollectorRegistry(), history_store=HistoryStore.from_url(database))
    async with serving(app) as port:
        yield port


def rules_config(**changes: Any) -> RulesConfig:
    values: dict[str, Any] = {"tick_s": 0.1, "zone_poll_s": 0.1, "start": "earliest",
                              "default_rules": TeamRules(offline_after_s=0, idle_after_s=0)}
    values.update(changes)
    return RulesConfig(**values)


@asynccontextmanager
async def rules_service(redis_url: str, database: str, alerts: AlertStore | None = None,
                        **changes: Any) -> AsyncIterator[RulesService]:
    history = HistoryStore.from_url(database)
    service = RulesService(rules_config(**changes), from_url(redis_url), history,
                           CollectorRegistry(), alerts)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


class Frames:
    """A manager's live socket: every frame it got, by type."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self.socket = socket
        self.frames: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.socket:
                frame = orjson.loads(message)
                frame["_received"] = time.monotonic()
                self.frames.append(frame)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["type"] == kind]

    async def wait(self, kind: str, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT
        while len(self.of(kind)) < count:
            assert time.monotonic() < deadline, f"{count} {kind} frames: {self.frames}"
            await asyncio.sleep(0.02)
        return self.of(kind)

    async def close(self) -> None:
        await self.socket.close()
        self._reader.cancel()


async def viewer(port: int, username: str) -> Frames:
    socket = await websockets.connect(f"ws://{LOOPBACK}:{port}/ws/teams/alpha",
                                      additional_headers=bearer(username), open_timeout=WAIT)
    frames = Frames(socket)
    await frames.wait("snapshot", 1)
    return frames


async def test_zone_crossing_alerts_two_managers_on_two_instances_once_and_the_ack_on_both(
    redis_url: str, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    backend = from_url(redis_url)
    await backend.start()
    # Batches that raise nothing wait up to `commit_interval_s` for their commit; an alert
    # never does (the delay asserted below is far shorter).
    async with rules_service(redis_url, database, commit_interval_s=30.0) as service, \
            dashboard(redis_url, database) as port_a, dashboard(redis_url, database) as port_b:
        alice, carol = await viewer(port_a, "alice"), await viewer(port_b, "carol")
        async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port_a}") as http_a, \
                httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port_b}") as http_b:
            # Another team's manager can neither read nor write alpha's zones.
            assert (await http_a.get("/api/teams/alpha/zones", headers=bearer("bob"))
                    ).status_code == 403
            assert (await http_a.post("/api/teams/alpha/zones", headers=bearer("bob"),
                                      json=DEPOT)).status_code == 403
            created = await http_a.post("/api/teams/alpha/zones", headers=bearer("alice"),
                                        json=DEPOT)
            assert created.status_code == 201, created.text
            zone = created.json()["properties"]["id"]
            await alice.wait("zones", 1)
            await carol.wait("zones", 1)
            listed = (await http_b.get("/api/teams/alpha/zones", headers=bearer("carol"))).json()
            assert [feature["properties"] for feature in listed["features"]] == [
                {"id": zone, "name": HOSTILE, "radius_m": 100.0}
            ]
            await asyncio.sleep(0.3)  # the rules service has the zone (polled every 0.1 s)
            t0 = int(time.time() * 1000) - 60_000
            published = []
            for seq, lat in enumerate(CROSSING):
                await backend.publish([fix("alpha", "w001", seq, lat, t0)])
                published.append(time.monotonic())
            for frames in (alice, carol):
                alerts = await frames.wait("alert", 2)
                # From the publish of the fix that entered to the frame on the manager's socket.
                delay = alerts[0]["_received"] - published[1]
                print(f"enter alert on a manager's socket {delay * 1000:.0f} ms after the fix")
                assert delay < 2.0
                assert [(frame["alert"]["kind"], frame["alert"]["zone"],
                         frame["alert"]["zone_name"], frame["alert"]["worker"])
                        for frame in alerts] == [
                    ("zone_enter", zone, HOSTILE, "w001"), ("zone_exit", zone, HOSTILE, "w001")
                ]
                assert alerts[0]["alert"]["at"] == t0 + 1000
            enter_id = alice.of("alert")[0]["alert"]["id"]
            assert carol.of("alert")[0]["alert"]["id"] == enter_id
            acked = await http_b.post(f"/api/teams/alpha/alerts/{enter_id}/ack",
                                      headers=bearer("carol"))
            assert acked.status_code == 200 and acked.json()["acked_by"] == "carol"
            acked_at = time.monotonic()
            for frames in (alice, carol):
                (ack,) = await frames.wait("alert_ack", 1)
                assert (ack["id"], ack["by"]) == (enter_id, "carol")
                print(f"ack on a manager's socket {(ack['_received'] - acked_at) * 1000:.0f} ms"
                      " after the POST answered")
            stored = (await http_a.get("/api/teams/alpha/alerts", headers=bearer("alice"))
                      ).json()["alerts"]
            assert [(alert["kind"], alert["acked_by"]) for alert in stored] == [
                ("zone_exit", None), ("zone_enter", "carol")  # newest first
            ]
            assert (await http_a.post("/api/teams/alpha/alerts/nope/ack",
                                      headers=bearer("alice"))).status_code == 404
            await asyncio.sleep(0.5)  # nothing more comes: each alert once
            for frames in (alice, carol):
                assert len(frames.of("alert")) == 2 and len(frames.of("alert_ack")) == 1
        await alice.close()
        await carol.close()
        assert service.counters.alerts == Counter({("alpha", "zone_enter"): 1,
                                                   ("alpha", "zone_exit"): 1})
    await backend.close()


class StoreThatCrashes(AlertStore):
    """The service's process dying at its `crash_on`-th commit, before or after it."""

    def __init__(self, store: AlertStore, crash_on: int, after_commit: bool) -> None:
        super().__init__(store.engine)
        self.crash_on, self.after_commit = crash_on, after_commit
        self.commits = 0
        self.crashed = asyncio.Event()

    async def apply(self, new_alerts: Any, states: Mapping[tuple[str, str], Any],
                    cursors: Mapping[str, str]) -> int:
        self.commits += 1
        if self.commits == self.crash_on and not self.after_commit:
            self.crashed.set()
            raise asyncio.CancelledError
        inserted = await super().apply(new_alerts, states, cursors)
        if self.commits == self.crash_on:
            self.crashed.set()
            raise asyncio.CancelledError
        return inserted


async def notices(backend: Backend, team: str) -> list[dict[str, Any]]:
    """Every alert notice in the team's log (what dashboards turn into frames)."""
    found: list[dict[str, Any]] = []
    subscription = backend.subscribe()
    await subscription.add(team, START_OF_LOG)
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(subscription), 0.5)
            except TimeoutError:
                return found
            if isinstance(item, Batch) and item.all_from(NOTICE_ORIGIN):
                found += [event["p"] for event in orjson.loads(item.raw)
                          if event["p"]["type"] == "alert"]
    finally:
        await subscription.close()


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
async def test_a_rules_service_killed_mid_stream_loses_and_repeats_no_alert(
    redis_url: str, tmp_path: Path, after_commit: bool
) -> None:
    await killed_mid_stream(redis_url, tmp_path, after_commit)


@pytest.mark.faults
@pytest.mark.extended
@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
async def test_a_rules_service_killed_mid_stream_on_kafka_loses_and_repeats_no_alert(
    kafka_url: str, tmp_path: Path, after_commit: bool
) -> None:
    await killed_mid_stream(kafka_url, tmp_path, after_commit)


async def killed_mid_stream(backend_url: str, tmp_path: Path, after_commit: bool) -> None:
    redis_url = backend_url  # the helpers' parameter name; any backend
    database = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    team = f"crash{int(after_commit)}"
    history = HistoryStore.from_url(database)
    await history.migrate()
    store = AlertStore(history.engine)
    await store.put_zone(team, parse_zone(DEPOT, "zdepot"), "alice", create=True)
    backend = from_url(redis_url)
    await backend.start()
    workers = [f"w{index:03d}" for index in range(8)]
    t0 = int(time.time() * 1000) - 120_000
    crashing = StoreThatCrashes(store, crash_on=2, after_commit=after_commit)
    async with rules_service(redis_url, database, crashing, group=f"rules-{team}"):
        for seq, lat in enumerate(CROSSING[:2]):
            await backend.publish([fix(team, worker, seq, lat, t0) for worker in workers])
            await asyncio.sleep(0.15)
        await asyncio.wait_for(crashing.crashed.wait(), WAIT)
        # The process is gone: what it read and did not acknowledge stays pending.
    for seq, lat in enumerate(CROSSING[2:], start=2):
        await backend.publish([fix(team, worker, seq, lat, t0) for worker in workers])
    async with rules_service(redis_url, database, group=f"rules-{team}") as service:
        deadline = time.monotonic() + WAIT
        while len(await store.alerts(team)) < 2 * len(workers) or (
            (await store.unpublished())[0]
        ):
            assert time.monotonic() < deadline, await store.alerts(team)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stored: list[Alert] = await store.alerts(team)
        assert service.counters.batches >= 1
    assert Counter((alert.worker, alert.kind) for alert in stored) == Counter(
        {(worker, kind): 1 for worker in workers for kind in ("zone_enter", "zone_exit")}
    )
    announced = Counter(notice["alert"]["id"] for notice in await notices(backend, team))
    assert announced == Counter({alert.id: 1 for alert in stored})
    await backend.close()
    await history.close()


def presence(team: str, worker: str, word: str, at_ms: int) -> Event:
    return Event(team, worker, Kind.STATUS, word.encode(), "b1", at_ms, at_ms, 1)


async def test_offline_survives_restarts_once_and_never_for_off_duty(
    redis_url: str, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    backend = from_url(redis_url)
    await backend.start()
    rules = TeamRules(offline_after_s=1.0, idle_after_s=0)
    now = int(time.time() * 1000)
    async with rules_service(redis_url, database, default_rules=rules) as service:
        await backend.publish([presence("alpha", "w001", "offline", now),
                               presence("alpha", "w002", "off_duty", now)])
        await asyncio.wait_for(service.wait_applied(1), WAIT)
    # Down while the threshold passes: the alert comes after the restart, from the saved state.
    await asyncio.sleep(1.2)
    for _restart in range(2):
        async with rules_service(redis_url, database, default_rules=rules) as service:
            store = service.store
            deadline = time.monotonic() + WAIT
            while not await store.alerts("alpha") or (await store.unpublished())[0]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a few more ticks
            found = await store.alerts("alpha")
            assert [(alert.kind, alert.worker, alert.at) for alert in found] == [
                ("offline", "w001", now)
            ]
    assert Counter(notice["alert"]["kind"] for notice in await notices(backend, "alpha")) == (
        Counter({"offline": 1})
    )
    await backend.close()


async def test_an_erased_worker_is_not_written_back_by_a_running_rules_service(
    redis_url: str, tmp_path: Path
) -> None:
    """`teamtrack history erase` deleted the worker's rule state and alerts, but the running
    rules service still held the state in memory (its last movement point among it): the
    offline alert it raised from it later stored that state again, and an alert about the
    erased worker. Another worker's alert shows the clock rules still run."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    backend = from_url(redis_url)
    await backend.start()
    rules = TeamRules(offline_after_s=4.0, idle_after_s=0)
    now = int(time.time() * 1000)
    async with rules_service(redis_url, database, default_rules=rules) as service:
        store = service.store
        await backend.publish([fix("alpha", "w001", 0, 52.5, now - 1000),
                               presence("alpha", "w001", "offline", now),
                               presence("alpha", "w002", "offline", now)])
        deadline = time.monotonic() + WAIT
        while len((await store.load_state())[0]) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await erase_everywhere(Targets(database, redis_url), "alpha", "w001", None,
                               "test", settle_s=0.5)
        assert time.time() * 1000 < now + 4000, "erased too late for this test"
        while not await store.alerts("alpha"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # more ticks
        await service.wait_applied(1)
        found = await store.alerts("alpha")
        states, _cursors = await store.load_state()
    assert [(alert.kind, alert.worker) for alert in found] == [("offline", "w002")]
    assert set(states) == {("alpha", "w002")}
    await backend.close()


class Receiver(http.server.BaseHTTPRequestHandler):
    """A team's webhook: refuses the first `refuse` calls with 503, then accepts."""

    refuse = 2
    calls: ClassVar[list[tuple[dict[str, str], bytes, int]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 503 if len(type(self).calls) < type(self).refuse else 200
        type(self).calls.append((dict(self.headers), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_alerts_reach_the_teams_webhook_signed_after_retries(
    redis_url: str, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    Receiver.calls = []
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{server.server_address[1]}/hook"
    backend = from_url(redis_url)
    await backend.start()
    history = HistoryStore.from_url(database)
    await history.migrate()
    await AlertStore(history.engine).put_zone("alpha", parse_zone(DEPOT, "zdepot"), "alice",
                                              create=True)
    try:
        async with rules_service(redis_url, database, team_hooks={"alpha": url},
                                 webhook_secret="s3cret", webhook_poll_s=0.05,
                                 webhook_first_backoff_s=0.1) as service:
            t0 = int(time.time() * 1000) - 60_000
            for seq, lat in enumerate(CROSSING):
                await backend.publish([fix("alpha", "w001", seq, lat, t0)])
            deadline = time.monotonic() + WAIT
            while service.webhooks.counters.delivered < 2:
                assert time.monotonic() < deadline, Receiver.calls
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert service.webhooks.counters.failed == 2
        accepted = [(headers, body) for headers, body, status in Receiver.calls
                    if status == 200]
        assert [orjson.loads(body)["alert"]["kind"] for _headers, body in accepted] == [
            "zone_enter", "zone_exit"
        ]
        key = team_key("s3cret", "alpha")
        for headers, body in accepted:
            stamp = int(headers["X-Teamtrack-Timestamp"])
            assert headers["X-Teamtrack-Signature"] == signature(key, stamp, body)
            assert headers["X-Teamtrack-Alert-Id"] == orjson.loads(body)["alert"]["id"]
            assert headers["X-Teamtrack-Signature"] != signature(team_key("s3cret", "bravo"),
                                                                 stamp, body)
        # The two refusals were the first alert, retried; nothing was delivered twice.
        assert len({orjson.loads(body)["alert"]["id"] for _h, body, _s in Receiver.calls}) == 2
    finally:
        server.shutdown()
        await backend.close()
        await history.close()
