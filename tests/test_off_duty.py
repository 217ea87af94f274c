"""Off duty through the real path: devices on a real Mosquitto, the bridge and the dashboard
in-process over a real Redis, a manager's WebSocket, and the ingest into the history (SQLite
and PostgreSQL); OwnTracks' quiet mode through the device gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from asgi_tools import serving
from conftest import Cluster
from gateway_tools import basic
from mqtt_tools import publish_lines
from prometheus_client import CollectorRegistry
from test_bridge import collect_events
from test_dashboard_api import bearer, write_auth_file

from bridge.service import BridgeConfig, BridgeService
from dashboard.app import create_app
from dashboard.auth import Authenticator, ManagerDirectory
from gateway.service import GatewayConfig, GatewayService
from ingest.service import IngestConfig, IngestService
from teamtrack.backends import from_url
from teamtrack.contract import position_topic, status_topic
from teamtrack.history import HistoryStore
from teamtrack.ingress.duty import DAYS
from teamtrack.local.servers import LOOPBACK
from teamtrack.mqtt import BrokerAddress, bridge_username
from teamtrack.provision import ProvisionResult

WAIT = 10.0


def not_now() -> dict[str, Any]:
    """A shift that is certainly not now: an hour on the day after tomorrow (UTC)."""
    day = DAYS[(datetime.now(UTC).weekday() + 2) % 7]
    return {"tz": "UTC", "windows": [f"{day} 10:00-11:00"]}


ALWAYS_WINDOW = {"tz": "UTC", "windows": ["daily 00:00-24:00"]}


def write_duty(path: Path, w001: dict[str, Any]) -> None:
    """alpha's workers are off duty now (the team's shift), but w001 per `w001`; w003 is
    always on duty."""
    document = {"teams": {"alpha": {"shifts": not_now(),
                                    "workers": {"w001": w001, "w003": "always"}}}}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document))
    temporary.replace(path)


def positions(first: int, count: int) -> list[bytes]:
    now = int(time.time() * 1000)
    return [orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": now + seq, "seq": seq})
            for seq in range(first, first + count)]


class Viewer:
    """A manager's WebSocket: what it was shown of each worker."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self.socket = socket
        self.seqs: dict[str, list[int]] = {}
        self.statuses: dict[str, list[str]] = {}

    async def read_until(self, done: Any) -> None:
        async with asyncio.timeout(WAIT):
            while not done():
                frame = json.loads(await self.socket.recv())
                if frame["type"] not in ("events", "sync"):
                    continue
                for event in frame["events"]:
                    if event["k"] == "p":
                        self.seqs.setdefault(event["w"], []).append(event["p"]["seq"])
                    elif event["k"] == "s":
                        self.statuses.setdefault(event["w"], []).append(event["p"])


@pytest.fixture
async def dashboard_port(redis_url: str, tmp_path: Path) -> AsyncIterator[int]:
    authenticator = Authenticator(
        ManagerDirectory.load(write_auth_file(tmp_path / "auth.json")), "secret", 3600
    )
    app = create_app(from_url(redis_url), authenticator, instance_id="off-duty",
                     registry=CollectorRegistry())
    async with serving(app) as port:
        yield port


async def test_off_duty_and_paused_workers_are_neither_shown_nor_stored(
    cluster: Cluster, redis_url: str, history_url: str, dashboard_port: int, tmp_path: Path
) -> None:
    duty_file = tmp_path / "duty.json"
    write_duty(duty_file, ALWAYS_WINDOW)
    broker = cluster.brokers[0]
    account = cluster.credentials.bridge(bridge_username(broker.name, 1))
    metrics = CollectorRegistry()
    bridge = BridgeService(BridgeConfig(
        broker=BrokerAddress.parse(broker.url), broker_id=broker.name,
        client_id=account.username, username=account.username, password=account.password,
        duty_file=str(duty_file), duty_check_s=0.2,
    ), from_url(redis_url), metrics)
    ingest = IngestService(IngestConfig(consumer="off-duty", recover_interval_s=0,
                                        backlog_interval_s=0.1),
                           from_url(redis_url), HistoryStore.from_url(history_url),
                           CollectorRegistry())

    def dropped(reason: str) -> float:
        return metrics.get_sample_value("teamtrack_bridge_off_duty_dropped_total",
                                        {"broker": broker.name, "reason": reason}) or 0.0

    async def publish(worker: str, topic: str, payloads: list[bytes]) -> None:
        device = cluster.device("alpha", worker)
        result = await publish_lines(broker.mqtt_port, device.username, device.password, topic,
                                     payloads)
        assert result.returncode == 0, result.stderr

    await bridge.start()
    await ingest.start()
    try:
        await asyncio.wait_for(bridge.wait_subscribed(), WAIT)
        async with websockets.connect(
            f"ws://{LOOPBACK}:{dashboard_port}/ws/teams/alpha", additional_headers=bearer(),
            open_timeout=WAIT,
        ) as socket:
            assert json.loads(await socket.recv())["type"] == "snapshot"
            viewer = Viewer(socket)
            # w002 is outside its shift: online and five positions; w001 (on duty) after it.
            await publish("w002", status_topic("alpha", "w002"), [b"online"])
            await publish("w002", position_topic("alpha", "w002"), positions(0, 5))
            await publish("w001", position_topic("alpha", "w001"), positions(0, 5))
            await viewer.read_until(lambda: len(viewer.seqs.get("w001", [])) == 5)
            assert "w002" not in viewer.seqs
            assert viewer.statuses.get("w002") == ["off_duty"]
            assert dropped("off_duty") == 5

            # w001 pauses, sends three positions anyway, resumes, sends three more.
            await publish("w001", status_topic("alpha", "w001"), [b"paused"])
            await publish("w001", position_topic("alpha", "w001"), positions(5, 3))
            await publish("w001", status_topic("alpha", "w001"), [b"online"])
            await publish("w001", position_topic("alpha", "w001"), positions(8, 3))
            await viewer.read_until(lambda: len(viewer.seqs.get("w001", [])) == 8)
            assert viewer.seqs["w001"] == [0, 1, 2, 3, 4, 8, 9, 10]
            assert viewer.statuses["w001"] == ["off_duty", "online"]
            assert dropped("paused") == 3

            # w003 (always on duty) has OwnTracks over MQTT in quiet mode: paused at once, its
            # location dropped.
            await publish("w003", "owntracks/alpha.w003/phone", [orjson.dumps(
                {"_type": "location", "lat": 52.5, "lon": 13.4, "tst": int(time.time()),
                 "m": -1})])
            await viewer.read_until(lambda: "w003" in viewer.statuses)
            assert viewer.statuses["w003"] == ["off_duty"]
            assert dropped("paused") == 4

            # w001's shift ends (duty.json rewritten): off duty without another message.
            write_duty(duty_file, not_now())
            await viewer.read_until(lambda: len(viewer.statuses["w001"]) == 3)
            assert viewer.statuses["w001"][-1] == "off_duty"
            assert viewer.seqs["w001"] == [0, 1, 2, 3, 4, 8, 9, 10]
            assert "w002" not in viewer.seqs and "w003" not in viewer.seqs

        # The managers' snapshot says off duty, and the history holds none of it.
        backend = from_url(redis_url)
        await backend.start()
        snapshot = await backend.snapshot("alpha")
        await backend.close()
        assert {worker: event.body for worker, event in snapshot.presence.items()} == {
            "w001": b"off_duty", "w002": b"off_duty", "w003": b"off_duty"}
        assert "w002" not in snapshot.positions
        await asyncio.wait_for(ingest.wait_stored(8), WAIT)
        async with asyncio.timeout(WAIT):  # the group's lag in entries, once all is stored
            while ingest.counters.backlog_entries != 0:
                await asyncio.sleep(0.05)
        store = HistoryStore.from_url(history_url)
        try:
            stored = (await store.team_window("alpha", 0, 2**62, limit=100)).items
            assert sorted((row.worker, row.seq) for row in stored) == [
                ("w001", seq) for seq in (0, 1, 2, 3, 4, 8, 9, 10)]

            async def presence_stored() -> list[tuple[str, str]]:
                page = await store.presence("alpha", 0, 2**62, limit=100)
                return [(change.worker, change.status) for change in page.items]

            async with asyncio.timeout(WAIT):
                while len(await presence_stored()) < 5:
                    await asyncio.sleep(0.1)
            assert await presence_stored() == [
                ("w002", "off_duty"), ("w001", "off_duty"), ("w001", "online"),
                ("w003", "off_duty"), ("w001", "off_duty")]
        finally:
            await store.close()
    finally:
        await ingest.stop()
        await bridge.stop()


async def test_owntracks_quiet_mode_through_the_gateway_pauses_the_worker(
    provisioned: ProvisionResult, redis_url: str
) -> None:
    device = provisioned.credentials.device("alpha", "w003")
    metrics = CollectorRegistry()
    service = GatewayService(
        GatewayConfig(password_file=provisioned.password_file, device_rate_per_s=0),
        from_url(redis_url), metrics,
    )
    await service.start()
    backend = from_url(redis_url)
    await backend.start()
    headers = {"Authorization": basic(device.username, device.password)}

    def location(tst: int, mode: int) -> bytes:
        return orjson.dumps({"_type": "location", "lat": 52.5, "lon": 13.4, "tst": tst,
                             "m": mode})

    try:
        collecting = asyncio.create_task(collect_events(backend, "alpha", 3, timeout=WAIT))
        await asyncio.sleep(0.3)
        now = int(time.time())
        async with httpx.AsyncClient(base_url=service.url, headers=headers) as http:
            for body in (orjson.dumps({"_type": "status", "m": -1}),  # quiet
                         location(now - 3, -1),
                         location(now - 2, 0),                        # manual: still paused
                         location(now - 1, 2)):                       # move: resumes
                response = await http.post("/v1/owntracks", content=body)
                assert (response.status_code, response.json()) == (200, [])
        received = await collecting
        # The first location came with "online" (OwnTracks has no online message): it does
        # not end the pause; only the position of the moving mode passes, saying online.
        assert [(event["kind"], event["body"]) for event in received] == [
            ("status", b"off_duty"), ("status", b"online"),
            ("position", orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": (now - 1) * 1000,
                                       "seq": now - 1}))]
        assert metrics.get_sample_value("teamtrack_gateway_off_duty_dropped_total",
                                        {"gateway": "g1", "reason": "paused"}) == 2
    finally:
        await backend.close()
        await service.stop()
