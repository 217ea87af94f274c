"""Zones and alerts on the manager's page in a real headless Chromium: two managers of one team
on two dashboard instances (real uvicorn servers over Redis), the rules service in-process.

A zone with a hostile name is added through the page (the form, then a click on the map); it
appears on both maps; a simulated worker crossing it raises enter then exit on both pages,
once each; one manager acknowledges, both see who did. The hostile names never become HTML.
Screenshots are saved under test-output/.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, async_playwright
from test_map_browser import CHROMIUM_FLAGS, chromium  # noqa: F401 (a fixture)
from test_rules_service import HOSTILE, dashboard, fix, rules_service

from teamtrack.backends import from_url
from teamtrack.local.servers import LOOPBACK

WAIT_S = 15.0
CROSSING = (52.49, 52.5, 52.5002, 52.49)


async def _browser(path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=path, headless=True,
                                                    args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


async def signed_in(browser: Browser, port: int, username: str, errors: list[str]) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    url = f"http://{LOOPBACK}:{port}"
    await page.goto(url + "/")
    await page.fill("input[name=username]", username)
    await page.fill("input[name=password]", f"{username}-pw-1")
    await page.click("button[type=submit]")
    await page.wait_for_url(url + "/")
    await until(page, "window.teamtrack && window.teamtrack.state().connection", "live")
    await until(page, "Boolean(document.getElementById('alerts-panel'))", True)
    return page


async def until(page: Page, expression: str, expected: Any | Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        value = await page.evaluate(expression)
        if (expected(value) if callable(expected) else value == expected):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{expression} stayed {json.dumps(value)[:2000]}")
        await asyncio.sleep(0.1)


ALERTS = "window.teamtrackAlerts.alerts().map(a => [a.kind, a.zone_name, a.worker, a.acked_by])"


async def test_zone_drawn_on_the_page_alerts_both_managers_once_and_shows_the_ack(
    chromium: str, redis_url: str, tmp_path: Path, output_dir: Path  # noqa: F811
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    backend = from_url(redis_url)
    await backend.start()
    errors: list[str] = []
    async with rules_service(redis_url, database), dashboard(redis_url, database) as port_a, \
            dashboard(redis_url, database) as port_b:
        async for browser in _browser(chromium):
            alice = await signed_in(browser, port_a, "alice", errors)
            carol = await signed_in(browser, port_b, "carol", errors)
            # alice draws a circle zone: name, radius, then a click on the map's centre.
            await alice.evaluate("window.teamtrack.map.setView([52.5, 13.4], 15)")
            await carol.evaluate("window.teamtrack.map.setView([52.5, 13.4], 15)")
            await alice.fill("#zone-form input[name=name]", HOSTILE)
            await alice.fill("#zone-form input[name=radius]", "100")
            await alice.click("#zone-form button[type=submit]")
            box = await alice.locator("#map").bounding_box()
            assert box is not None
            point = await alice.evaluate(
                "(() => { const p = window.teamtrack.map.latLngToContainerPoint([52.5, 13.4]);"
                " return [p.x, p.y]; })()")
            await alice.mouse.click(box["x"] + point[0], box["y"] + point[1])
            for page in (alice, carol):
                zones = await until(page, "window.teamtrackAlerts.zones()", lambda z: len(z) == 1)
                assert zones[0]["name"] == HOSTILE
                label = page.locator(".zone-label")
                assert await label.text_content() == HOSTILE
            await asyncio.sleep(0.3)  # the rules service polls zones every 0.1 s
            t0 = int(time.time() * 1000) - 30_000
            for seq, lat in enumerate(CROSSING):
                await backend.publish([fix("alpha", "w001", seq, lat, t0)])
            expected = [["zone_exit", HOSTILE, "w001", None], ["zone_enter", HOSTILE, "w001", None]]
            for page in (alice, carol):
                assert await until(page, ALERTS, lambda a: len(a) >= 2) == expected
                assert await page.locator("#alerts-list li.unacked").count() == 2
                # The time as the workers' list writes it (24 h), not the locale's "12:44:35 PM".
                times = await page.locator("#alerts-list .alert-time").all_text_contents()
                assert all(re.fullmatch(r"\d{2}:\d{2}:\d{2}", text) for text in times), times
                assert await page.locator(".alert-toast").count() >= 1
            await alice.screenshot(path=output_dir / "1-alerts-alice.png")
            await carol.locator("#alerts-list li[data-kind=zone_enter] .alert-ack").click()
            for page in (alice, carol):
                await until(page, ALERTS, lambda a: a[1][3] == "carol")
                acked = page.locator("#alerts-list li[data-kind=zone_enter] .alert-acked")
                assert await acked.text_content() == "acked by carol"
                assert await page.evaluate(
                    "Array.from(window.teamtrackAlerts.unacknowledged())") == ["w001"]
            await asyncio.sleep(0.5)
            for page in (alice, carol):
                assert len(await page.evaluate(ALERTS)) == 2  # once each, no repeats
                # Hostile strings stayed text: no element came out of them.
                assert await page.locator("#alerts-panel img, .leaflet-pane img[src=x]"
                                          ).count() == 0
                assert await page.evaluate("window.pwned === undefined")
                frames = await page.evaluate("window.teamtrack.state().frames")
                assert isinstance(frames, dict)
            # carol draws a polygon: three corners, then Finish.
            await carol.fill("#zone-form input[name=name]", "Yard </b><script>x</script>")
            await carol.select_option("#zone-form select[name=shape]", "polygon")
            await carol.evaluate("window.teamtrack.map.setView([52.5025, 13.4], 16)")
            await carol.click("#zone-form button[type=submit]")
            box = await carol.locator("#map").bounding_box()
            assert box is not None
            for lat, lon in ((52.502, 13.398), (52.502, 13.402), (52.5035, 13.400)):
                point = await carol.evaluate(
                    "(() => { const p = window.teamtrack.map.latLngToContainerPoint("
                    f"[{lat}, {lon}]); return [p.x, p.y]; }})()")
                assert 0 < point[0] < box["width"] and 0 < point[1] < box["height"], point
                await carol.mouse.click(box["x"] + point[0], box["y"] + point[1])
            await carol.click("#zone-form .zone-finish")
            for page in (alice, carol):
                zones = await until(page, "window.teamtrackAlerts.zones()", lambda z: len(z) == 2)
                assert sorted(zone["name"] for zone in zones) == sorted(
                    [HOSTILE, "Yard </b><script>x</script>"])
                assert await page.locator(".zone-label").count() == 2
            # alice draws a smaller circle on the first one's centre: the two names are stacked,
            # not drawn over each other (they were).
            await alice.evaluate("window.teamtrack.map.setView([52.5, 13.4], 15)")
            await alice.fill("#zone-form input[name=name]", "Gate")
            await alice.fill("#zone-form input[name=radius]", "40")
            await alice.click("#zone-form button[type=submit]")
            box = await alice.locator("#map").bounding_box()
            assert box is not None
            point = await alice.evaluate(
                "(() => { const p = window.teamtrack.map.latLngToContainerPoint([52.5, 13.4]);"
                " return [p.x, p.y]; })()")
            x, y = box["x"] + point[0], box["y"] + point[1]
            await alice.mouse.click(x, y)
            await until(alice, "window.teamtrackAlerts.zones()", lambda z: len(z) == 3)
            labels = alice.locator(".zone-label")
            assert await labels.count() == 3
            boxes = {await label.text_content(): await label.bounding_box()
                     for label in await labels.all()}
            first, gate = boxes[HOSTILE], boxes["Gate"]
            assert first is not None and gate is not None
            assert (first["y"] + first["height"] <= gate["y"]
                    or gate["y"] + gate["height"] <= first["y"]), (first, gate)
            await alice.screenshot(path=output_dir / "2-zones-sharing-a-centre-alice.png")
            await carol.screenshot(path=output_dir / "2-acknowledged-carol.png")
            # The panel folds to its heading and count (leaving the map free), and unfolds.
            await carol.click("#alerts-panel .alerts-fold")
            assert not await carol.locator("#alerts-list").is_visible()
            assert await carol.locator("#alerts-count").is_visible()
            assert await carol.get_attribute("#alerts-panel .alerts-fold",
                                             "aria-expanded") == "false"
            await carol.screenshot(path=output_dir / "3-folded-carol.png")
            await carol.click("#alerts-panel .alerts-fold")
            assert await carol.locator("#alerts-list").is_visible()
    await backend.close()
    assert errors == []
