"""Item 6: strings from the network never become HTML on the manager's map.

Two attackers, a real headless Chromium each time (as tests/test_map_browser.py drives it):

* one with write access to Redis, who bypasses the bridges and writes events with a hostile
  worker id and hostile fields into a team's log and last-known store: the dashboards drop
  them before any viewer (snapshot and live), count them, and the legitimate workers next to
  them keep every position;
* one who gets a hostile event onto the page's WebSocket anyway (playwright rewrites a live
  frame): the page shows the id as text, in its list and in the marker's tooltip; no element
  is created from it and no script runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from typing import Any

import orjson
import pytest
from playwright.async_api import Browser, Page, WebSocketRoute
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from test_map_browser import (
    CENTRE,
    Fleet,
    Site,
    browser,
    by_id,
    chromium,
    password_of,
    presence,
    signed_in_page,
    site,
    wait_for_state,
)

from teamtrack.backends import Event
from teamtrack.contract import Kind

pytestmark = pytest.mark.security
__all__ = ["browser", "chromium", "site"]  # fixtures, used by name

HOSTILE_ID = "<img id=pwned src=x onerror=window.pwned=1>"
QUOTED_ID = 'q"},{"w":"w01","k":"p","p":{"lat":0\\'


def position_event(worker: str, seq: int, fields: dict[str, Any] | None = None) -> Event:
    now = int(time.time() * 1000)
    body: dict[str, Any] = {"lat": CENTRE[0] + 0.02, "lon": CENTRE[1], "ts": now, "seq": seq}
    body.update(fields or {})
    return Event("alpha", worker, Kind.POSITION, orjson.dumps(body), "b1", now, now, qos=0)


def hostile_events(seq: int) -> list[Event]:
    now = int(time.time() * 1000)
    return [
        position_event(HOSTILE_ID, seq),
        Event("alpha", HOSTILE_ID, Kind.STATUS, b"online", "b1", now, now, qos=1),
        position_event("w02", 10_000 + seq, {"note": "<b id=pwned2>extra</b>"}),
        position_event("w02", 20_000 + seq, {"lat": 91}),
        position_event("w02", 30_000 + seq, {"seq": "<i id=pwned3>"}),
    ]


def read_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (http on loopback)
        text: str = response.read().decode()
    return text


async def nothing_injected(page: Page) -> None:
    injected = await page.evaluate(
        "[Boolean(window.pwned), document.querySelectorAll('#pwned, #pwned2, #pwned3, img[src=x]')"
        ".length]"
    )
    assert injected == [False, 0]


async def test_hostile_events_written_to_redis_never_reach_the_page(
    site: Site, browser: Browser
) -> None:
    alpha = Fleet("alpha", ["w01", "w02"])
    await site.publish(hostile_events(0))  # into the last-known store: the snapshot
    # An id that breaks the JSON it is written into: its entry and its batch cannot be read
    # (its own batch: a write straight into the backend, not through a bridge).
    await site.publish([position_event(QUOTED_ID, 0)])
    await site.publish(alpha.step())
    await site.publish(presence("alpha", worker, "online") for worker in alpha.workers)
    page = await signed_in_page(browser, site, "alice")
    for round_ in range(1, 6):  # and live, between legitimate positions
        await site.publish([*hostile_events(round_), *alpha.step()])
        await site.publish([position_event(QUOTED_ID, round_)])
    state = await wait_for_state(
        page, lambda s: all(w["seq"] == 5 for w in s["workers"]), "w01 and w02 at seq 5"
    )
    assert [worker["id"] for worker in state["workers"]] == ["w01", "w02"]
    assert all(worker["seqGaps"] == 0 and worker["lat"] < 90 for worker in state["workers"])
    assert by_id(state)["w02"]["trail"] == 6  # every legitimate position, none of the others
    await nothing_injected(page)
    metrics = await asyncio.to_thread(read_metrics, site.url + "/metrics")
    rejected = {
        line.split("reason=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("teamtrack_dashboard_backend_rejected_total{")
    }
    assert rejected.get("bad_worker", 0) >= 10, metrics  # 5 live rounds, a position and a status
    # The id that breaks the JSON it is written into: left out of the snapshot, not the team.
    assert rejected.get("unreadable", 0) >= 1, metrics
    assert {"position_unknown_field", "position_out_of_range", "position_bad_type"} <= set(
        rejected
    ), rejected


async def test_a_hostile_id_on_the_socket_is_shown_as_text(site: Site, browser: Browser) -> None:
    alpha = Fleet("alpha", ["w01"])
    await site.publish(alpha.step())
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    injected: list[str] = []

    def rewrite(frame: str | bytes) -> str | bytes:
        document = json.loads(frame)
        if document.get("type") == "events" and not injected:
            now = int(time.time() * 1000)
            position = {"lat": CENTRE[0] + 0.02, "lon": CENTRE[1], "ts": now, "seq": 0,
                        "note": "<b id=pwned2>extra</b>"}
            document["events"].append(
                {"w": HOSTILE_ID, "k": "p", "o": "b1", "rx": now, "q": 0, "p": position,
                 "x": "<i id=pwned3>"}
            )
            injected.append(HOSTILE_ID)
            return json.dumps(document)
        return frame

    async def handler(route: WebSocketRoute) -> None:
        server = route.connect_to_server()
        server.on_message(lambda frame: route.send(rewrite(frame)))
        route.on_message(lambda frame: server.send(frame))

    await page.route_web_socket("**/ws/teams/**", handler)
    await page.goto(site.url + "/")
    await page.fill("input[name=username]", "alice")
    await page.fill("input[name=password]", password_of("alice"))
    await page.click("button[type=submit]")
    await page.wait_for_url(site.url + "/")
    await wait_for_state(page, lambda s: s["connection"] == "live", "a live connection")
    await site.publish(alpha.step())
    await wait_for_state(
        page, lambda s: HOSTILE_ID in by_id(s) and by_id(s)[HOSTILE_ID]["onMap"],
        "the hostile worker on the map",
    )
    # In the list: as text.
    row = page.locator("#workers li button", has_text="<img id=pwned")
    assert await row.locator(".name").text_content() == HOSTILE_ID
    # On the map: follow it (the map centres on its marker), then hover the marker.
    await row.click()
    await asyncio.sleep(1.0)  # the map's move to it
    box = await page.locator("#map").bounding_box()
    assert box is not None
    centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    # The hover tooltip; the permanent name label beside the marker (shown from zoom 15) is
    # another Leaflet tooltip, checked after.
    tooltip = page.locator(".leaflet-tooltip:not(.worker-label)")
    for _attempt in range(10):  # a busy machine may still be moving the map
        await page.mouse.move(centre_x - 60, centre_y - 60)
        await page.mouse.move(centre_x, centre_y, steps=5)
        with contextlib.suppress(PlaywrightTimeoutError):
            await tooltip.wait_for(timeout=2_000)
            break
    await tooltip.wait_for(timeout=1_000)
    assert (await tooltip.text_content() or "").startswith(HOSTILE_ID)
    for label in await page.locator(".leaflet-tooltip.worker-label").all():
        assert await label.text_content() in {HOSTILE_ID, "w01"}
    await nothing_injected(page)
    assert errors == []
