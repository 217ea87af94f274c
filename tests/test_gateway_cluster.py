"""The device gateway in `teamtrack up` (issue 14, items 2 and 3): the OwnTracks app's recorded
payloads posted over HTTP (httpx, as the app posts them: Basic auth, X-Limit-U/D), an NDJSON
stream, MQTT observers on both brokers, a manager on a dashboard and the history; logins that
are not the device's own; `teamtrack provision revoke` ending an open stream.

One `teamtrack up --no-simulate` for the module, as tests/test_owntracks_mqtt.py.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from gateway_tools import NdjsonStream, basic
from mqtt_tools import MosquittoSub
from owntracks_payloads import recorded, valid_locations
from prometheus_client.parser import text_string_to_metric_families
from test_end_to_end import RunningCluster, cluster_running
from test_owntracks_mqtt import collect, history_events, history_track
from typer.testing import CliRunner

from teamtrack.cli import app

WAIT = 15.0


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    with cluster_running(tmp_path_factory.mktemp("gateway")) as cluster:
        yield cluster


def gateway_metric(running: RunningCluster, name: str, label: str) -> Counter[str]:
    """A `teamtrack_gateway_*` counter of every gateway, summed by one label."""
    totals: Counter[str] = Counter()
    for url in running.endpoints["gateway_metrics"]:
        with urllib.request.urlopen(url, timeout=WAIT) as response:  # noqa: S310 - loopback
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    totals[sample.labels[label]] += int(sample.value)
    return totals


def post(url: str, payload: bytes, username: str, password: str,
         **headers: str) -> httpx.Response:
    return httpx.post(url, content=payload, timeout=WAIT, headers={
        "Authorization": basic(username, password), "Content-Type": "application/json",
        **headers,
    })


def test_endpoints_list_a_device_gateway_per_dashboard(running: RunningCluster) -> None:
    gateways = running.endpoints["device_http"]
    assert len(gateways) == len(running.endpoints["dashboards"]) == 2
    for gateway in gateways:
        assert gateway["owntracks"].startswith("http://127.0.0.1:")
        assert gateway["owntracks"].endswith("/v1/owntracks")
        assert gateway["ndjson"] == gateway["owntracks"].replace("/v1/owntracks", "/v1/positions")
    assert len(running.endpoints["gateway_metrics"]) == 2


async def test_the_apps_payloads_over_http_reach_the_manager_and_the_history_once(
    running: RunningCluster,
) -> None:
    now_s = int(time.time())
    items = recorded(now_s)
    expected = sorted(orjson.loads(item.payload)["tst"] * 1000 for item in valid_locations(now_s))
    phone = running.credentials.device("alpha", "w001")
    url = running.endpoints["device_http"][0]["owntracks"]

    def phone_positions(events: list[dict[str, Any]]) -> list[int]:
        return [e["p"]["ts"] for e in events if e["w"] == "w001" and e["k"] == "p"]

    def done(events: list[dict[str, Any]]) -> bool:
        return any(e["w"] == "w001" and e["k"] == "s" and e["p"] == "offline" for e in events)

    rejected_before = gateway_metric(running, "teamtrack_gateway_rejected_total", "reason")
    listening = asyncio.create_task(collect(
        running.dashboard_ws(1, "alpha"), running.token_of("alpha"), done, WAIT * 2
    ))
    await asyncio.sleep(0.5)
    for item in items:
        response = await asyncio.to_thread(
            post, url, item.payload, phone.username, phone.password,
            **{"X-Limit-U": phone.username, "X-Limit-D": "phone"},
        )
        # Malformed and unused objects too: the app would send them again forever otherwise.
        assert (response.status_code, response.json()) == (200, []), item.name
        assert response.headers["content-type"] == "application/json"
    events = await listening

    assert sorted(phone_positions(events)) == expected  # each once, the resend not again
    presence = [e["p"] for e in events if e["w"] == "w001" and e["k"] == "s"]
    assert presence[0] == "online" and presence[-1] == "offline"
    shown = next(e for e in events if e["w"] == "w001" and e["k"] == "p")
    assert shown["o"] == "g1"  # came in through the first gateway
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
    assert [(event["event"], event["desc"]) for event in kept] == [("enter", "Depot")]

    rejected = gateway_metric(running, "teamtrack_gateway_rejected_total", "reason")
    wanted = Counter(item.outcome.split(":", 1)[1] for item in items
                     if item.outcome.startswith("rejected:"))
    assert {reason: rejected[reason] - rejected_before[reason] for reason in wanted} == wanted
    ignored = gateway_metric(running, "teamtrack_gateway_owntracks_ignored_total", "type")
    assert {kind: ignored[kind] for kind in ("waypoint", "card", "status")} == {
        "waypoint": 1, "card": 1, "status": 1}


async def test_a_position_sent_over_http_is_mirrored_into_every_broker(
    running: RunningCluster,
) -> None:
    observer = running.credentials.observer
    assert observer is not None
    watchers = [
        await MosquittoSub.start(running.broker_port(index), observer.username,
                                 observer.password, "teams/bravo/workers/w001/position")
        for index in (0, 1)
    ]
    device = running.credentials.device("bravo", "w001")
    line = orjson.dumps({"lat": 48.85, "lon": 2.35, "ts": int(time.time() * 1000), "seq": 7})
    try:
        stream = await NdjsonStream.open(
            running.endpoints["device_http"][1]["ndjson"], device.username, device.password
        )
        stream.send_lines([line])
        stream.finish()
        answers = await stream.read_all()
        assert answers[-1] == {"ack": 7, "lines": 1, "end": "complete"}
        await stream.close()
        for watcher in watchers:
            seen = await watcher.wait_for(1, WAIT)
            assert seen == [("teams/bravo/workers/w001/position", line.decode())]
    finally:
        for watcher in watchers:
            watcher.stop()


def test_logins_other_than_the_devices_own_are_refused(running: RunningCluster) -> None:
    url = running.endpoints["device_http"][0]["owntracks"]
    device = running.credentials.device("alpha", "w002")
    other = running.credentials.device("alpha", "w003")
    manager = running.credentials.managers_of("alpha")[0]
    body = orjson.dumps({"_type": "location", "lat": 1.0, "lon": 2.0, "tst": int(time.time())})

    no_login = httpx.post(url, content=body, timeout=WAIT)
    assert no_login.status_code == 401
    assert no_login.headers["www-authenticate"].startswith('Basic realm="teamtrack"')
    assert post(url, body, device.username, device.password + "x").status_code == 401
    assert post(url, body, device.username, other.password).status_code == 401
    # A manager's own MQTT password opens no device's way in; it is not even checked.
    assert post(url, body, manager.username, manager.mqtt_password).status_code == 401
    spoof = post(url, body, device.username, device.password, **{"X-Limit-U": other.username})
    assert spoof.status_code == 403
    failures = gateway_metric(running, "teamtrack_gateway_auth_failures_total", "reason")
    assert failures["bad_credentials"] >= 2 and failures["not_device"] >= 1
    assert failures["user_mismatch"] >= 1
    points = history_track(running, "w003", int(time.time() * 1000) - 60_000)
    assert all(point["lat"] != 1.0 for point in points)


async def test_a_revoked_devices_stream_is_ended_and_refused(running: RunningCluster) -> None:
    device = running.credentials.device("bravo", "w003")
    url = running.endpoints["device_http"][0]["ndjson"]
    stream = await NdjsonStream.open(url, device.username, device.password)
    now = int(time.time() * 1000)
    stream.send_lines([orjson.dumps({"lat": 1.0, "lon": 2.0, "ts": now, "seq": 1})])
    await stream.drain()
    assert await stream.read_line() == {"ack": 1, "lines": 1}
    started = time.monotonic()
    result = await asyncio.to_thread(
        CliRunner().invoke, app,
        ["provision", "revoke", device.username, "--out", str(running.state_dir)],
    )
    assert result.exit_code == 0, result.output
    assert await stream.read_all(timeout=5.0) == [{"ack": 1, "lines": 1, "end": "revoked"}]
    print(f"stream of a revoked device ended {time.monotonic() - started:.2f} s after the "
          "command")
    await stream.close()
    again = await NdjsonStream.open(url, device.username, device.password)
    assert again.status == 401
    await again.close()
