"""The manager's map in a real headless Chromium, against real dashboards over Redis.

Two `python -m dashboard` instances sit behind a small fail-over TCP proxy, as they would
behind a load balancer: the page talks to the proxy, and when the instance it was on is killed,
its next connection lands on the other one. Positions are published into Redis the way a bridge
does; for the replay, a real ingest (`IngestService`, in-process) stores them into the SQLite
history the dashboards read. The page exposes `window.teamtrack.state()`, what it believes, so
that the test reads worker states instead of pixels; screenshots are saved for people to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from playwright.async_api import Browser, Page, async_playwright

from ingest.service import IngestConfig, IngestService
from teamtrack.backends import Backend, Event, from_url
from teamtrack.contract import Kind
from teamtrack.history import HistoryStore
from teamtrack.local.servers import LOOPBACK, free_port, port_is_open
from teamtrack.metrics import CollectorRegistry
from teamtrack.passwords import hash_password, token_digest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LEAFLET = PROJECT_ROOT / "dashboard" / "static" / "vendor" / "leaflet" / "leaflet.js"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps calling home, which on a closed network only adds noise.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STALE_AFTER_S = 2
WAIT_S = 15.0
MANAGERS = {"alice": "alpha", "bob": "bravo", "carol": "charlie"}
CENTRE = (52.52, 13.405)


def password_of(username: str) -> str:
    return f"{username}-password-1"


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    assert LEAFLET.exists(), "Leaflet is missing from dashboard/static/vendor: run `make assets`"
    return path


def fix(
    team: str, worker: str, seq: int, lat: float, lon: float, at_ms: int | None = None
) -> Event:
    """A position received now; its fix time is `at_ms` (a device's backlog) or now."""
    now = int(time.time() * 1000)
    ts = now if at_ms is None else at_ms
    body = orjson.dumps(
        {"lat": round(lat, 6), "lon": round(lon, 6), "ts": ts, "seq": seq, "battery": 80}
    )
    return Event(team, worker, Kind.POSITION, body, "b1", now, ts, qos=0)


def presence(team: str, worker: str, word: str) -> Event:
    now = int(time.time() * 1000)
    return Event(team, worker, Kind.STATUS, word.encode(), "b1", now, now, qos=1)


class Fleet:
    """A team's simulated devices: each on its own circle around the centre, with its own seq."""

    def __init__(self, team: str, workers: list[str], radius: float = 0.01) -> None:
        self.team = team
        self.workers = workers
        self.radius = radius
        self.seqs = dict.fromkeys(workers, -1)

    def step(
        self, workers: Iterable[str] | None = None, skip: int = 0, at_ms: int | None = None
    ) -> list[Event]:
        """The next fix of each of `workers` (all by default); `skip` seqs the device never sent;
        `at_ms` a fix time in the past."""
        events = []
        for worker in self.workers if workers is None else workers:
            seq = self.seqs[worker] = self.seqs[worker] + 1 + skip
            index = self.workers.index(worker) if len(self.workers) < 100 else int(worker[1:])
            angle = 2 * math.pi * index / len(self.workers) + seq * 0.02
            distance = self.radius * (0.3 + 0.7 * ((index * 7919) % 100) / 100)
            lat = CENTRE[0] + distance * math.sin(angle)
            lon = CENTRE[1] + 1.6 * distance * math.cos(angle)
            events.append(fix(self.team, worker, seq, lat, lon, at_ms))
        return events


class FailoverProxy:
    """Hands each new connection to the first instance that accepts it, like a load balancer."""

    def __init__(self, upstream_ports: list[int]) -> None:
        self.upstream_ports = upstream_ports
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            for port in self.upstream_ports:
                try:
                    upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, port)
                    break
                except OSError:
                    continue
            else:
                writer.close()
                return
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        finally:
            self._connections.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


@dataclass
class Site:
    url: str
    bridge: Backend
    instances: list[subprocess.Popen[bytes]]
    logs: list[Path]
    proxy: FailoverProxy
    backend_url: str
    database_url: str
    publishers: list[asyncio.Task[None]] = field(default_factory=list)

    async def publish(self, events: Iterable[Event]) -> None:
        await self.bridge.publish(list(events))

    def kill_instance(self, index: int) -> None:
        self.instances[index].send_signal(signal.SIGKILL)
        self.instances[index].wait(timeout=WAIT_S)


def write_auth_file(path: Path) -> Path:
    managers = [
        {
            "username": username,
            "team": team,
            "password_hash": hash_password(password_of(username)),
            "token_sha256": token_digest(f"{username}-token-0123456789"),
        }
        for username, team in MANAGERS.items()
    ]
    path.write_bytes(orjson.dumps({"managers": managers}))
    return path


@pytest.fixture
async def site(
    redis_server_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Site]:
    # Settings a test asks for with @pytest.mark.parametrize("site", [{...}], indirect=True).
    overrides: dict[str, str] = getattr(request, "param", {})
    backend_url = f"{redis_server_url}?prefix=map-{uuid.uuid4().hex[:12]}"
    auth_file = write_auth_file(tmp_path / "dashboard-auth.json")
    # Empty until a test runs an ingest; the history API answers 503 meanwhile.
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    ports = [free_port(), free_port()]
    instances: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    for index, port in enumerate(ports):
        log_path = tmp_path / f"dashboard-{index + 1}.log"
        environment = {
            **os.environ,
            "TEAMTRACK_BACKEND_URL": backend_url,
            "TEAMTRACK_AUTH_FILE": str(auth_file),
            "TEAMTRACK_SESSION_SECRET": "shared-by-both-instances",
            "TEAMTRACK_PORT": str(port),
            "TEAMTRACK_INSTANCE_ID": f"dashboard-{index + 1}",
            "TEAMTRACK_STALE_AFTER_S": str(STALE_AFTER_S),
            "TEAMTRACK_TRAIL_POINTS": "15",
            # The tests run offline: a plain background instead of tiles that never come.
            "TEAMTRACK_TILE_URL": "",
            "TEAMTRACK_DATABASE_URL": database_url,
            **overrides,
        }
        with log_path.open("wb") as log_file:
            instances.append(
                subprocess.Popen(  # noqa: ASYNC220 (returns at once; the test waits on the port)
                    [sys.executable, "-m", "dashboard"],
                    cwd=PROJECT_ROOT,
                    env=environment,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log_path)
    bridge = from_url(backend_url)
    await bridge.start()
    proxy = FailoverProxy(ports)
    await proxy.start()
    site = Site(
        f"http://{LOOPBACK}:{proxy.port}", bridge, instances, logs, proxy,
        backend_url=backend_url, database_url=database_url,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        for instance, port, log_path in zip(instances, ports, logs, strict=True):
            while not port_is_open(LOOPBACK, port):
                assert instance.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "a dashboard did not start listening"
                await asyncio.sleep(0.05)
        yield site
    finally:
        for task in site.publishers:
            task.cancel()
        await asyncio.gather(*site.publishers, return_exceptions=True)
        await proxy.stop()
        await bridge.close()
        for instance in instances:
            if instance.poll() is None:
                instance.terminate()
                instance.wait(timeout=WAIT_S)
    for log_path in logs:
        assert "Traceback" not in log_path.read_text(), log_path.read_text()


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def signed_in_page(browser: Browser, site: Site, username: str) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(site.url + "/")
    assert page.url.endswith("/login")
    await page.fill("input[name=username]", username)
    await page.fill("input[name=password]", password_of(username))
    await page.click("button[type=submit]")
    await page.wait_for_url(site.url + "/")
    # Polled from here: the page's CSP (rightly) forbids the eval that wait_for_function uses.
    await wait_for_state(page, lambda s: s["connection"] == "live", "a live connection")
    assert errors == []
    return page


async def page_state(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate(
        "window.teamtrack ? window.teamtrack.state() : {connection: 'loading', workers: []}"
    )
    return state


async def wait_for_state(
    page: Page, condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        state = await page_state(page)
        if condition(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}: {json.dumps(state)[:2000]}")
        await asyncio.sleep(0.1)


def by_id(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {worker["id"]: worker for worker in state["workers"]}


def keep_publishing(
    site: Site, fleet: Fleet, workers: list[str], interval_s: float
) -> Callable[[], Awaitable[None]]:
    """Publishes every `interval_s` in the background; the call returned stops it."""
    stopping = asyncio.Event()

    async def run() -> None:
        while not stopping.is_set():
            await site.publish(fleet.step(workers))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)

    task = asyncio.create_task(run())
    site.publishers.append(task)

    async def stop() -> None:
        stopping.set()
        await task

    return stop


async def test_manager_sees_own_team_move_go_stale_and_offline_and_resume_elsewhere(
    site: Site, browser: Browser, output_dir: Path
) -> None:
    alpha = Fleet("alpha", [f"w{index:02d}" for index in range(1, 9)])
    bravo = Fleet("bravo", [f"x{index:02d}" for index in range(1, 4)])
    await site.publish([*alpha.step(), *bravo.step()])
    await site.publish(presence("alpha", worker, "online") for worker in alpha.workers)

    page = await signed_in_page(browser, site, "alice")
    state = await wait_for_state(
        page, lambda s: s["markersOnMap"] == len(alpha.workers), "a marker per alpha worker"
    )
    assert state["team"] == "alpha" and state["frames"]["snapshot"] == 1
    assert [worker["id"] for worker in state["workers"]] == alpha.workers  # none of bravo's
    assert all(worker["onMap"] for worker in state["workers"])
    start = by_id(state)

    # Moving.
    for _ in range(5):
        await site.publish([*alpha.step(), *bravo.step()])
    state = await wait_for_state(
        page, lambda s: all(w["seq"] == 5 for w in s["workers"]), "every worker at seq 5"
    )
    moved = by_id(state)
    for worker in alpha.workers:
        assert (moved[worker]["lat"], moved[worker]["lon"]) != (
            start[worker]["lat"],
            start[worker]["lon"],
        )
        assert moved[worker]["trail"] == 6 and moved[worker]["state"] == "online"
    assert [worker["id"] for worker in state["workers"]] == alpha.workers
    await page.screenshot(path=output_dir / "1-live.png")

    # w08 stops reporting and goes stale; w07's device drops and its Last Will says offline.
    reporting = alpha.workers[:6]
    stop = keep_publishing(site, alpha, reporting, 0.4)
    await site.publish([presence("alpha", "w07", "offline")])
    state = await wait_for_state(
        page,
        lambda s: by_id(s)["w08"]["state"] == "stale" and by_id(s)["w07"]["state"] == "offline",
        "w08 stale and w07 offline",
    )
    assert all(by_id(state)[w]["state"] == "online" for w in reporting)
    row = page.locator("#workers li[data-worker=w07]")
    assert await row.get_attribute("data-state") == "offline"
    assert await page.locator("#count-stale").text_content() == "1"
    assert await page.locator("#count-offline").text_content() == "1"
    await page.screenshot(path=output_dir / "2-stale-and-offline.png")
    await stop()

    # Both come back on their next position; w06's device skips three messages.
    await site.publish(
        [*alpha.step(["w01", "w02", "w03", "w04", "w05", "w07", "w08"]), *alpha.step(["w06"], 3)]
    )
    state = await wait_for_state(
        page,
        lambda s: all(w["state"] == "online" for w in s["workers"]) and s["seqGaps"] == 3,
        "everyone online again and w06's skipped seqs counted",
    )
    assert by_id(state)["w06"]["seqGaps"] == 3
    assert await page.locator("#workers li[data-worker=w06] .gaps").text_content() == "⚠ 3 skipped"

    # The instance behind the page dies while positions keep flowing; the page resumes on the
    # other instance from its last cursor: nothing missed (no new seq gaps), nothing twice.
    stop = keep_publishing(site, alpha, alpha.workers, 0.05)
    await asyncio.sleep(0.5)
    site.kill_instance(0)
    await wait_for_state(page, lambda s: s["frames"]["resume"] >= 1, "a resumed connection")
    await asyncio.sleep(0.5)
    await stop()
    state = await wait_for_state(
        page,
        lambda s: all(w["seq"] == alpha.seqs[w["id"]] for w in s["workers"]),
        "the last positions",
    )
    assert state["connection"] == "live"
    assert state["frames"]["snapshot"] == 1 and state["frames"]["gap"] == 0
    assert state["seqGaps"] == 3, "a batch was lost across the resume"
    assert state["duplicates"] == 0, "a batch was delivered twice across the resume"
    assert state["connections"] >= 2
    await page.screenshot(path=output_dir / "3-resumed-on-the-other-instance.png")

    # A phone-sized window: the list goes under the map.
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.screenshot(path=output_dir / "4-phone.png")


async def test_two_thousand_moving_workers_stay_smooth(
    site: Site, browser: Browser, output_dir: Path
) -> None:
    charlie = Fleet("charlie", [f"c{index:04d}" for index in range(2000)], radius=0.05)
    workers = charlie.workers
    await site.publish(charlie.step())
    page = await signed_in_page(browser, site, "carol")
    await wait_for_state(page, lambda s: s["markersOnMap"] == len(workers), "2,000 markers")

    # Every worker reports once a second, spread over ten batches, for five seconds; meanwhile
    # the page counts its animation frames.
    await page.evaluate(
        """() => {
        window.frameTimes = [];
        const started = performance.now();
        const tick = (time) => {
          window.frameTimes.push(time);
          if (time - started < 5000) requestAnimationFrame(tick);
        };
        requestAnimationFrame(tick);
      }"""
    )
    slice_size = len(workers) // 10
    started = time.monotonic()
    for step in range(50):
        part = workers[(step % 10) * slice_size : (step % 10 + 1) * slice_size]
        await site.publish(charlie.step(part))
        await asyncio.sleep(max(0.0, started + (step + 1) * 0.1 - time.monotonic()))
    await asyncio.sleep(0.3)
    frame_times: list[float] = await page.evaluate("window.frameTimes")
    render = await page.evaluate("window.teamtrack.renderStats()")
    state = await page_state(page)
    intervals = sorted(later - earlier for earlier, later in itertools.pairwise(frame_times))
    seconds = (frame_times[-1] - frame_times[0]) / 1000
    measured = {
        "markers": state["markersOnMap"],
        "frames_per_second": round((len(frame_times) - 1) / seconds, 1),
        "frame_interval_median_ms": round(intervals[len(intervals) // 2], 1),
        "frame_interval_p95_ms": round(intervals[int(len(intervals) * 0.95)], 1),
        "page_update_median_ms": round(render["medianMs"], 2),
        "page_update_p95_ms": round(render["p95Ms"], 2),
    }
    (output_dir / "measured.json").write_text(json.dumps(measured, indent=2) + "\n")
    await page.screenshot(path=output_dir / "2000-workers.png")
    assert state["markersOnMap"] == len(workers)
    assert all(worker["seq"] == 5 for worker in state["workers"])
    # The figures are for people (measured.json, docs/protocol.md): headless Chromium
    # rasterises in software on a shared 2-core machine, and a timed bar would fail on load,
    # not on the page. Only a page that froze (as before the canvas renderer) fails here.
    assert measured["frames_per_second"] >= 3, measured

    # Dense at the fitted zoom: the workers are drawn as counted clusters, every one counted
    # once; a click on a cluster zooms into it, where fewer are clustered.
    # (The page's state and its circles read in one go: the clusters change twice a second.)
    state, counts = await page.evaluate(
        "[window.teamtrack.state(), "
        "Array.from(document.querySelectorAll('.cluster-count')).map((n) => +n.textContent)]"
    )
    assert state["clusters"] > 0 and state["clustered"] > len(workers) // 2, measured
    assert len(counts) == state["clusters"] and sum(counts) == state["clustered"]
    assert state["clustered"] + sum(
        1 for worker in state["workers"] if worker["onMap"] and not worker["clustered"]
    ) == len(workers)
    zoom = await page.evaluate("window.teamtrack.map.getZoom()")
    # By keyboard, as a manager without a mouse would: Tab reaches it, Enter zooms in.
    icon = page.locator(".cluster-icon").first
    assert "workers here" in (await icon.get_attribute("aria-label") or "")
    await icon.focus()
    await page.keyboard.press("Enter")
    await page.wait_for_function(f"window.teamtrack.map.getZoom() > {zoom}")
    zoomed = await wait_for_state(
        page, lambda s: s["clustered"] < state["clustered"], "fewer clustered after a click"
    )
    assert zoomed["markersOnMap"] == len(workers)
    await page.screenshot(path=output_dir / "2000-workers-zoomed.png")


async def start_ingest(site: Site) -> IngestService:
    """A real ingest into the site's history, as `python -m ingest` runs it (same consumer name
    each time, so a restarted one carries on where the last one acknowledged)."""
    ingest = IngestService(
        IngestConfig(consumer="ingest-1"),
        from_url(site.backend_url),
        HistoryStore.from_url(site.database_url),
        CollectorRegistry(),
    )
    await ingest.start()
    return ingest


async def test_replay_plays_the_history_and_joins_live_without_a_gap(
    site: Site, browser: Browser, output_dir: Path
) -> None:
    alpha = Fleet("alpha", [f"w{index:02d}" for index in range(1, 7)])
    ingest = await start_ingest(site)
    try:
        # The last four minutes as the devices reported them, a fix every 2 s, then live.
        earlier_from = int(time.time() * 1000) - 240_000
        for step in range(120):
            await site.publish(alpha.step(at_ms=earlier_from + step * 2000))
        await asyncio.wait_for(ingest.wait_stored(120 * len(alpha.workers)), WAIT_S)
        stop_publishing = keep_publishing(site, alpha, alpha.workers, 0.1)
        page = await signed_in_page(browser, site, "alice")
        await wait_for_state(page, lambda s: len(s["workers"]) == 6, "the team, live")

        # The ingest stops for a while: the history falls behind the live stream, as it does
        # (less) all the time. The seam has to wait for it.
        await ingest.stop()
        await asyncio.sleep(1.0)
        await page.click("#replay-toggle")
        await page.select_option("#replay-speed", "60")
        await page.select_option("#replay-range", "300000")  # the last 5 minutes, from the start
        state = await wait_for_state(
            page,
            lambda s: s["mode"] == "replay" and s["replay"]["played"] >= 300,
            "the replay playing the history",
        )
        assert state["replay"]["speed"] == 60
        replayed = by_id(state)
        assert all(replayed[w]["seq"] < 120 for w in alpha.workers), "not from the history"
        await page.screenshot(path=output_dir / "1-replaying.png")

        # Past the stored history, the page waits for it at the seam instead of jumping.
        await wait_for_state(page, lambda s: s["replay"]["phase"] == "waiting", "the seam")
        await asyncio.sleep(1.0)
        state = await page_state(page)
        assert state["mode"] == "replay" and state["replay"]["phase"] == "waiting"
        await page.screenshot(path=output_dir / "2-waiting-for-the-history.png")
        ingest = await start_ingest(site)
        state = await wait_for_state(page, lambda s: s["mode"] == "live", "live again")
        assert state["replay"]["joins"] == 1
        assert state["replay"]["seamPolls"] > 0 and state["replay"]["seamUncovered"] == 0
        assert state["replay"]["played"] >= 120 * len(alpha.workers)

        # Live frames go straight to the map again; every worker got every seq exactly once,
        # from its first fix in the history through the seam into the live stream.
        await asyncio.sleep(0.5)
        await stop_publishing()
        state = await wait_for_state(
            page,
            lambda s: all(w["seq"] == alpha.seqs[w["id"]] for w in s["workers"]),
            "the last positions, live",
        )
        assert state["seqGaps"] == 0, "a position was lost across the seam"
        assert state["duplicates"] == 0, "a position was shown twice across the seam"
        assert all(w["seqGaps"] == 0 and w["state"] == "online" for w in state["workers"])
        assert state["frames"]["gap"] == 0 and state["connection"] == "live"
        await page.screenshot(path=output_dir / "3-live-again.png")

        # A manager may leave a replay at any moment: a fresh snapshot replaces it.
        await page.click("#replay-toggle")
        await wait_for_state(page, lambda s: s["mode"] == "replay", "a second replay")
        await page.click("#replay-live")
        state = await wait_for_state(
            page,
            lambda s: s["mode"] == "live" and s["frames"]["snapshot"] == 2
            and all(w["seq"] == alpha.seqs[w["id"]] for w in s["workers"]),
            "live again at once, from a new snapshot",
        )
        assert state["replay"]["joins"] == 1 and state["replay"]["phase"] == "idle"
    finally:
        await ingest.stop()


async def test_replay_without_a_stored_history_says_so_and_stays_live(
    site: Site, browser: Browser
) -> None:
    # No ingest ever ran: the dashboards' database has no tables, the history API answers 503.
    alpha = Fleet("alpha", [f"w{index:02d}" for index in range(1, 4)])
    await site.publish(alpha.step())
    page = await signed_in_page(browser, site, "alice")
    await wait_for_state(page, lambda s: len(s["workers"]) == 3, "the team, live")
    await page.click("#replay-toggle")
    state = await wait_for_state(
        page,
        lambda s: s["mode"] == "live" and s["frames"]["snapshot"] == 2,
        "the page back to live after the history failed",
    )
    assert [w["seq"] for w in state["workers"]] == [0, 0, 0]
    notice = await page.locator("#notice").text_content()
    assert notice == "The history is unavailable (HTTP 503); back to live."


async def test_list_puts_who_needs_attention_first_and_counts_filter_it(
    site: Site, browser: Browser, output_dir: Path
) -> None:
    alpha = Fleet("alpha", ["a01", "a02", "a03", "a04", "a05", "a06"])
    await site.publish(alpha.step())
    await site.publish(presence("alpha", worker, "online") for worker in alpha.workers)
    page = await signed_in_page(browser, site, "alice")
    await page.set_viewport_size({"width": 1400, "height": 900})
    await wait_for_state(page, lambda s: s["markersOnMap"] == 6, "six markers")

    # a05 goes offline (its Last Will), a04 stops reporting (stale); the rest keep moving.
    # (Off duty reaches the page once the dashboards pass the `off_duty` presence on.)
    stop = keep_publishing(site, alpha, ["a01", "a02", "a03", "a06"], 0.4)
    await site.publish([presence("alpha", "a05", "offline")])
    await wait_for_state(
        page,
        lambda s: [by_id(s)[w]["state"] for w in ("a04", "a05")] == ["stale", "offline"],
        "a05 offline and a04 stale",
    )
    state = await page_state(page)
    assert state["listOrder"] == ["a05", "a04", "a01", "a02", "a03", "a06"]
    assert [w["id"] for w in state["workers"]] == sorted(alpha.workers)  # the map's own order
    assert await page.locator("#count-offline").text_content() == "1"
    seen = await page.locator("#workers li[data-worker=a05] .seen").text_content()
    assert seen is not None, "a05's row has no last-seen text"
    assert re.fullmatch(r"offline · \d\d:\d\d:\d\d \((.+ ago|just now)\)", seen), seen
    detail = await page.locator("#workers li[data-worker=a01] .detail").text_content()
    assert detail is not None and "battery 80%" in detail, detail
    await page.screenshot(path=output_dir / "1-attention-first.png")

    # A count is a filter (by keyboard too); clicked again, it clears.
    await page.click("#counts button[data-filter=stale]")
    state = await wait_for_state(page, lambda s: s["listOrder"] == ["a04"], "only the stale")
    assert state["filter"] == "stale"
    assert await page.get_attribute("#counts button[data-filter=stale]", "aria-pressed") == "true"
    await page.screenshot(path=output_dir / "2-filter-stale.png")
    await page.focus("#counts button[data-filter=stale]")
    await page.keyboard.press("Enter")
    await wait_for_state(page, lambda s: s["filter"] is None and len(s["listOrder"]) == 6, "all")

    # The alerts module's unacknowledged workers sort as alerting, after offline and stale.
    await page.evaluate(
        """() => {
        window.teamtrackAlerts = {unacknowledged: () => new Set(["a02"])};
        window.dispatchEvent(new CustomEvent("teamtrack:alerts-changed"));
      }"""
    )
    state = await wait_for_state(
        page, lambda s: s["listOrder"][:3] == ["a05", "a04", "a02"], "a02 alerting after the stale"
    )
    assert await page.locator("#workers li[data-worker=a02] .alert-mark").is_visible()
    label = await page.get_attribute("#workers li[data-worker=a02] button", "aria-label")
    assert label is not None and "unacknowledged alert" in label

    # Following a worker (by keyboard): its panel, its label on the map, its track export.
    now = int(time.time() * 1000)
    body = {"lat": 52.5205, "lon": 13.4051, "ts": now, "seq": 500, "acc": 12.0, "speed": 2.5,
            "heading": 92.0, "battery": 41}
    await stop()
    await site.publish([Event("alpha", "a02", Kind.POSITION, orjson.dumps(body), "b1", now, now)])
    await wait_for_state(page, lambda s: by_id(s)["a02"]["seq"] == 500, "a02's fix with details")
    await page.focus("#workers li[data-worker=a02] button")
    await page.keyboard.press("Enter")
    panel = page.locator("#follow-panel")
    await panel.wait_for(state="visible")
    text = await panel.text_content() or ""
    for expected in ("± 12 m", "9.0 km/h", "92° E", "41%", "native (MQTT)"):
        assert expected in text, (expected, text)
    links = await panel.locator("a").evaluate_all("links => links.map(a => a.href)")
    assert any("/api/teams/alpha/workers/a02/track?since=" in link and link.endswith("format=gpx")
               for link in links), links
    state = await wait_for_state(page, lambda s: by_id(s)["a02"]["labelled"], "a02 labelled")
    label = page.locator(".worker-label", has_text="a02")
    assert await label.count() == 1
    await page.screenshot(path=output_dir / "3-followed.png")
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.screenshot(path=output_dir / "4-phone.png")


async def test_header_says_delayed_while_the_server_is_stopped_and_live_after(
    site: Site, browser: Browser, output_dir: Path
) -> None:
    alpha = Fleet("alpha", ["d01", "d02", "d03"])
    await site.publish(alpha.step())
    page = await signed_in_page(browser, site, "alice")
    stop = keep_publishing(site, alpha, alpha.workers, 0.3)
    # Which instance serves the page: the proxy hands connections to the first that accepts.
    await wait_for_state(page, lambda s: all(w["seq"] >= 3 for w in s["workers"]), "moving")
    instance = site.instances[0]
    instance.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        state = await wait_for_state(page, lambda s: s["connection"] == "delayed", "delayed")
        took = time.monotonic() - stopped
        assert took < 6.0, f"delayed only after {took:.1f} s"
        # Ages stop with the last frame: a stalled server is not the team going stale.
        await asyncio.sleep(3.5)
        state = await page_state(page)
        assert state["connection"] == "delayed"
        assert all(w["state"] == "online" for w in state["workers"]), state["workers"]
        await page.screenshot(path=output_dir / "1-delayed.png")
        remaining = 8.0 - (time.monotonic() - stopped)
        await asyncio.sleep(max(0.0, remaining))
    finally:
        instance.send_signal(signal.SIGCONT)
    state = await wait_for_state(page, lambda s: s["connection"] == "live", "live again")
    seqs = {w["id"]: w["seq"] for w in state["workers"]}
    await wait_for_state(
        page, lambda s: all(w["seq"] > seqs[w["id"]] for w in s["workers"]), "moving again"
    )
    await page.screenshot(path=output_dir / "2-live-again.png")
    await stop()


# A tile server that is down: its port accepts nothing.
DEAD_TILES = f"http://{LOOPBACK}:{free_port()}/{{z}}/{{x}}/{{y}}.png"


@pytest.mark.parametrize(
    "site",
    [{"TEAMTRACK_TILE_URL": DEAD_TILES, "TEAMTRACK_TILE_ATTRIBUTION": "Tiles by Example Maps"}],
    indirect=True,
)
async def test_map_without_tiles_says_so_and_shows_a_coordinate_grid_and_scale(
    site: Site, browser: Browser, output_dir: Path
) -> None:
    alpha = Fleet("alpha", ["t01", "t02", "t03"])
    await site.publish(alpha.step())
    page = await signed_in_page(browser, site, "alice")
    await page.set_viewport_size({"width": 1400, "height": 900})
    await wait_for_state(page, lambda s: s["tiles"] == "down", "the tiles reported down")
    assert await page.locator("#tiles-notice").is_visible()
    assert "unavailable" in (await page.locator("#tiles-notice").text_content() or "")
    # No credit for tiles that are not shown; a scale bar for distances.
    attribution = await page.locator(".leaflet-control-attribution").text_content() or ""
    assert "Example Maps" not in attribution, attribution
    assert await page.locator(".leaflet-control-scale-line").count() == 1
    await page.screenshot(path=output_dir / "1-no-tiles.png")
    # The branded sign-in page, for people to look at.
    login = await browser.new_page(viewport={"width": 1400, "height": 900})
    await login.goto(site.url + "/login")
    assert await login.locator("h1").text_content() == "teamtrack"
    await login.screenshot(path=output_dir / "2-sign-in.png")
    await login.set_viewport_size({"width": 390, "height": 844})
    await login.screenshot(path=output_dir / "3-sign-in-phone.png")


async def test_replay_on_a_fresh_cluster_starts_at_the_data_and_replays_presence(
    site: Site, browser: Browser, output_dir: Path
) -> None:
    # A new cluster: two minutes of history only, while the replay asks for the last hour.
    alpha = Fleet("alpha", ["r01", "r02", "r03"])
    ingest = await start_ingest(site)
    try:
        first_ms = int(time.time() * 1000) - 120_000
        for step in range(30):
            movers = alpha.workers if step < 15 else ["r01", "r02"]
            await site.publish(alpha.step(movers, at_ms=first_ms + step * 4000))
        gone_ms = first_ms + 62_000
        went_offline = Event("alpha", "r03", Kind.STATUS, b"offline", "b1", gone_ms, gone_ms)
        await site.publish([went_offline])
        await asyncio.wait_for(ingest.wait_stored(15 * 3 + 15 * 2), WAIT_S)
        page = await signed_in_page(browser, site, "alice")
        await page.set_viewport_size({"width": 1400, "height": 900})
        await wait_for_state(page, lambda s: len(s["workers"]) == 3, "the team, live")
        await page.click("#replay-toggle")  # the last hour, at 10x
        state = await wait_for_state(
            page, lambda s: s["replay"]["seekedTo"] is not None, "the play head at the data"
        )
        assert state["replay"]["seekedTo"] == first_ms - 1000, (state["replay"], first_ms)
        clock = await page.locator("#replay-clock").text_content() or ""
        assert "min ago" in clock and "59 min" not in clock, clock
        await page.screenshot(path=output_dir / "1-replay-starts-at-the-data.png")
        await page.select_option("#replay-speed", "60")
        state = await wait_for_state(
            page,
            lambda s: s["mode"] == "replay" and s["replay"]["presencePlayed"] >= 1
            and by_id(s)["r03"]["state"] == "offline",
            "r03's offline replayed",
        )
        assert await page.locator("#count-offline").text_content() == "1"
        listed = await page.locator("#workers li").count()
        assert listed == len(state["workers"]) == int(
            await page.locator("#count").text_content() or "0"
        )
        await page.screenshot(path=output_dir / "2-presence-replayed.png")
    finally:
        await ingest.stop()


# A 1x1 PNG, what a tile server answers here for every tile.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cff01f0005fe02fea7d6a4a30000000049454e44ae426082"
)
TILE_PORT = free_port()
HOSTILE_CREDIT = '<img src=x onerror="window.pwned=1">Tiles & co'


@pytest.fixture
async def tile_server() -> AsyncIterator[int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n"
                + f"Content-Length: {len(PNG_1X1)}\r\n\r\n".encode() + PNG_1X1
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, LOOPBACK, TILE_PORT)
    try:
        yield TILE_PORT
    finally:
        server.close()


@pytest.mark.parametrize(
    "site",
    [{
        "TEAMTRACK_TILE_URL": f"http://{LOOPBACK}:{TILE_PORT}/{{z}}/{{x}}/{{y}}.png",
        "TEAMTRACK_TILE_ATTRIBUTION": HOSTILE_CREDIT,
    }],
    indirect=True,
)
async def test_tiles_of_the_configured_server_load_with_their_credit_as_plain_text(
    tile_server: int, site: Site, browser: Browser
) -> None:
    await site.publish(Fleet("alpha", ["p01"]).step())
    page = await signed_in_page(browser, site, "alice")
    await wait_for_state(page, lambda s: s["tiles"] == "up", "tiles loaded (the CSP allows them)")
    assert not await page.locator("#tiles-notice").is_visible()
    credit = page.locator(".leaflet-control-attribution")
    assert HOSTILE_CREDIT in (await credit.text_content() or "")
    assert await credit.locator("img").count() == 0
    assert await page.evaluate("window.pwned === undefined")
