"""Phones running OwnTracks in MQTT mode, against `teamtrack up`: the app's recorded payloads
(tests/owntracks_payloads.py) published by paho, as the app does (MQTT 3.1.1, QoS 1, a Last
Will), on broker 1; a native device of the same team on broker 2; the manager on the other
dashboard and in the history sees each location once, malformed objects are counted by reason.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
import websockets
from owntracks_payloads import Recorded, recorded, valid_locations
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from test_end_to_end import RunningCluster, cluster_running
from test_enrolment import zbarimg

from teamtrack.contract import position_topic
from teamtrack.enrolment import read_config_url

WAIT = 15.0
# The name phones reach the brokers by (the certificate names it); here it resolves to loopback.
PUBLIC_HOST = "tracks.example.org"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    state_dir = tmp_path_factory.mktemp("owntracks")
    with cluster_running(state_dir, "--tls-hosts", PUBLIC_HOST) as cluster:
        yield cluster


class OwnTracksPhone:
    """paho as the app connects: MQTT 3.1.1, a persistent session, QoS 1, its Last Will."""

    def __init__(self, port: int, username: str, password: str, device: str = "phone") -> None:
        self.topic = f"owntracks/{username}/{device}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username, clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.client.username_pw_set(username, password)
        self.client.will_set(self.topic, orjson.dumps({"_type": "lwt", "tst": int(time.time())}),
                             qos=1)
        self.connected = threading.Event()
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT)

    def publish(self, items: list[Recorded]) -> None:
        infos = [
            self.client.publish(f"{self.topic}/{item.leaf}" if item.leaf else self.topic,
                                item.payload, qos=1)
            for item in items
        ]
        for info in infos:
            info.wait_for_publish(WAIT)

    def vanish(self) -> None:
        """The phone loses its network: the socket closes without a DISCONNECT."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def collect(url: str, token: str, until: Any, seconds: float) -> list[dict[str, Any]]:
    """Every event of the team's live stream until `until(events)` holds or `seconds` pass."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(url, additional_headers=headers, open_timeout=WAIT) as socket:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until(events):
            try:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 0.5))
            except TimeoutError:
                continue
            if frame["type"] == "events":
                events += frame["events"]
    return events


def bridge_rejections(running: RunningCluster) -> Counter[str]:
    rejected: Counter[str] = Counter()
    for url in running.endpoints["bridge_metrics"]:
        with urllib.request.urlopen(url, timeout=WAIT) as response:  # noqa: S310 - loopback
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "teamtrack_bridge_rejected_total":
                    rejected[sample.labels["reason"]] += int(sample.value)
                if sample.name == "teamtrack_bridge_owntracks_ignored_total":
                    rejected["ignored:" + sample.labels["type"]] += int(sample.value)
    return rejected


def history_track(running: RunningCluster, worker: str, since_ms: int) -> list[dict[str, Any]]:
    url = running.endpoints["dashboards"][0] + f"/api/teams/alpha/workers/{worker}/track"
    response = httpx.get(url, params={"since": since_ms},
                         headers={"Authorization": f"Bearer {running.token_of('alpha')}"},
                         timeout=WAIT)
    response.raise_for_status()
    return list(response.json()["points"])


def history_events(running: RunningCluster, worker: str, since_ms: int) -> list[dict[str, Any]]:
    response = httpx.get(
        running.endpoints["dashboards"][1] + "/api/teams/alpha/events",
        params={"since": since_ms, "worker": worker},
        headers={"Authorization": f"Bearer {running.token_of('alpha')}"}, timeout=WAIT,
    )
    response.raise_for_status()
    return list(response.json()["events"])


async def test_a_phone_and_a_native_device_of_one_team_reach_the_manager_and_the_history(
    running: RunningCluster,
) -> None:
    now_s = int(time.time())
    items = recorded(now_s)
    expected = sorted(orjson.loads(item.payload)["tst"] * 1000 for item in valid_locations(now_s))
    phone_account = running.credentials.device("alpha", "w001")
    native = running.credentials.device("alpha", "w002")
    ws_url = running.dashboard_ws(1, "alpha")

    def phone_positions(events: list[dict[str, Any]]) -> list[int]:
        return [e["p"]["ts"] for e in events if e["w"] == "w001" and e["k"] == "p"]

    def done(events: list[dict[str, Any]]) -> bool:
        offline = [e for e in events if e["w"] == "w001" and e["k"] == "s" and e["p"] == "offline"]
        return bool(offline) and any(e["w"] == "w002" for e in events)

    listening = asyncio.create_task(collect(ws_url, running.token_of("alpha"), done, WAIT * 2))
    await asyncio.sleep(0.5)
    phone = await asyncio.to_thread(
        OwnTracksPhone, running.broker_port(0), phone_account.username, phone_account.password
    )
    try:
        await asyncio.to_thread(phone.publish, items)
    finally:
        await asyncio.to_thread(phone.close)
    native_client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=native.username)
    native_client.username_pw_set(native.username, native.password)
    native_client.connect("127.0.0.1", running.broker_port(1))
    native_client.loop_start()
    body = orjson.dumps({"lat": 52.51, "lon": 13.38, "ts": now_s * 1000, "seq": 1})
    native_client.publish(position_topic("alpha", "w002"), body, qos=1).wait_for_publish(WAIT)
    native_client.disconnect()
    native_client.loop_stop()
    events = await listening

    assert sorted(phone_positions(events)) == expected  # each once, the resend not again
    presence = [e["p"] for e in events if e["w"] == "w001" and e["k"] == "s"]
    assert presence[0] == "online" and presence[-1] == "offline"
    shown = next(e["p"] for e in events if e["w"] == "w001" and e["k"] == "p")
    assert set(shown) <= {"lat", "lon", "ts", "seq", "acc", "speed", "heading", "battery"}
    assert [e["p"]["seq"] for e in events if e["w"] == "w002" and e["k"] == "p"] == [1]
    transitions = [e["p"] for e in events if e["w"] == "w001" and e["k"] == "e"]
    assert [(t["event"], t["desc"]) for t in transitions] == [("enter", "Depot")]

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        stored = sorted(point["ts"] for point in history_track(running, "w001", expected[0]))
        if len(stored) >= len(expected):
            break
        await asyncio.sleep(0.5)
    assert stored == expected
    kept = await asyncio.to_thread(history_events, running, "w001", expected[0] - 60_000)
    assert [(event["worker"], event["event"], event["desc"]) for event in kept] == [
        ("w001", "enter", "Depot")]

    counts = bridge_rejections(running)
    for item in items:
        if item.outcome.startswith("rejected:"):
            reason = item.outcome.split(":", 1)[1]
            assert counts[reason] >= 1, (item.name, counts)
    for kind in ("waypoint", "card", "status"):
        assert counts[f"ignored:{kind}"] == 1, counts


async def test_a_phone_that_vanishes_shows_offline_through_its_last_will(
    running: RunningCluster,
) -> None:
    account = running.credentials.device("alpha", "w003")

    def offline(events: list[dict[str, Any]]) -> bool:
        return any(e["w"] == "w003" and e["k"] == "s" and e["p"] == "offline" for e in events)

    listening = asyncio.create_task(
        collect(running.dashboard_ws(0, "alpha"), running.token_of("alpha"), offline, WAIT)
    )
    await asyncio.sleep(0.5)
    phone = await asyncio.to_thread(
        OwnTracksPhone, running.broker_port(1), account.username, account.password
    )
    location = Recorded("location", orjson.dumps(
        {"_type": "location", "lat": 1.5, "lon": 2.5, "tst": int(time.time())}), "location")
    await asyncio.to_thread(phone.publish, [location])
    await asyncio.to_thread(phone.vanish)
    events = await listening
    mine = [(e["k"], e["p"] if e["k"] == "s" else e["p"]["lat"]) for e in events
            if e["w"] == "w003"]
    assert mine == [("s", "online"), ("p", 1.5), ("s", "offline")]


def test_a_device_cannot_publish_as_another_workers_phone(running: RunningCluster) -> None:
    """alpha.w001 writing under owntracks/alpha.w002/: the broker drops it (ACL)."""
    attacker = running.credentials.device("alpha", "w001")
    phone = OwnTracksPhone(running.broker_port(0), attacker.username, attacker.password)
    try:
        phone.topic = "owntracks/alpha.w002/phone"
        before = bridge_rejections(running)
        location = Recorded("spoof", orjson.dumps(
            {"_type": "location", "lat": 10.0, "lon": 10.0, "tst": int(time.time())}), "location")
        phone.publish([location])
    finally:
        phone.close()
    time.sleep(1.0)
    points = history_track(running, "w002", int(time.time() * 1000) - 60_000)
    assert all(point["lat"] != 10.0 for point in points)
    assert bridge_rejections(running) == before  # never reached a bridge at all


def test_a_phone_may_subscribe_to_its_own_command_topic_and_nothing_else(
    running: RunningCluster,
) -> None:
    """What the app subscribes to: its own `.../cmd` (granted, though nobody writes there) and
    other workers' locations (refused: a worker never sees another)."""
    account = running.credentials.device("alpha", "w002")
    phone = OwnTracksPhone(running.broker_port(0), account.username, account.password)
    granted: dict[str, int] = {}
    done = threading.Event()

    def on_subscribe(client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        for topic, code in zip(wanted, codes, strict=True):
            granted[topic] = code.value
        done.set()

    wanted = [f"{phone.topic}/cmd", "owntracks/+/+", "owntracks/alpha.w001/phone/cmd"]
    phone.client.on_subscribe = on_subscribe
    try:
        phone.client.subscribe([(topic, 1) for topic in wanted])
        assert done.wait(WAIT)
    finally:
        phone.close()
    assert granted == {wanted[0]: 1, wanted[1]: 0x80, wanted[2]: 0x80}


async def test_a_phone_configured_only_by_scanning_its_qr_code_reaches_the_manager(
    running: RunningCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`teamtrack provision enrol`, the QR code read back by a real decoder, and a phone that
    uses nothing but what the code holds: host, port, TLS with the CA, account, topic base,
    QoS, keepalive, session; its DNS resolves the public name to this machine."""
    enrolled = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "teamtrack.cli", "provision", "enrol", "bravo", "w001",
         "--out", str(running.state_dir), "--host", PUBLIC_HOST],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    [scanned] = await asyncio.to_thread(
        zbarimg, running.state_dir / "enrol" / "bravo" / "w001.png")
    config = read_config_url(scanned)
    assert config["mode"] == 0 and config["tls"] and config["host"] == PUBLIC_HOST

    real_getaddrinfo = socket.getaddrinfo

    def phone_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo("127.0.0.1" if host == PUBLIC_HOST else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", phone_dns)
    topic = config["pubTopicBase"].replace("%u", config["username"]).replace(
        "%d", config["deviceId"])
    phone = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config["clientId"],
                        clean_session=config["cleanSession"], protocol=mqtt.MQTTv311)
    phone.username_pw_set(config["username"], config["password"])
    phone.tls_set(ca_certs=running.endpoints["ca"])  # the CA the phone was told to trust
    connected = threading.Event()
    phone.on_connect = lambda *args: connected.set()
    now_s = int(time.time())

    def seen(events: list[dict[str, Any]]) -> bool:
        return any(e["w"] == "w001" and e["k"] == "p" for e in events)

    listening = asyncio.create_task(
        collect(running.dashboard_ws(0, "bravo"), running.token_of("bravo"), seen, WAIT))
    await asyncio.sleep(0.5)
    phone.connect(config["host"], config["port"], keepalive=config["keepalive"])
    phone.loop_start()
    try:
        assert await asyncio.to_thread(connected.wait, WAIT)
        location = orjson.dumps({"_type": "location", "lat": 48.85, "lon": 2.35, "tst": now_s,
                                 "tid": config["tid"], "batt": 80})
        info = phone.publish(topic, location, qos=config["pubQos"])
        await asyncio.to_thread(info.wait_for_publish, WAIT)
    finally:
        phone.disconnect()
        phone.loop_stop()
    events = await listening
    shown = [e["p"] for e in events if e["w"] == "w001" and e["k"] == "p"]
    assert shown == [{"lat": 48.85, "lon": 2.35, "ts": now_s * 1000, "seq": now_s,
                      "battery": 80.0}]
