"""TeamHub against the memory backend and a real Redis: snapshot + live, no gaps, interest, slow."""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from backend_contract import position, status
from prometheus_client import CollectorRegistry

from dashboard.hub import TeamHub, Viewer, ViewerLimits
from dashboard.metrics import DashboardMetrics
from teamtrack.backends import Backend, BackendError, Batch, Cursor, Gap, TeamSubscription, from_url
from teamtrack.backends.memory import MemoryBackend

WAIT = 5.0

OpenBackend = Callable[..., Awaitable[Backend]]
OpenHub = Callable[..., Awaitable[TeamHub]]


@pytest.fixture(params=["memory", "redis", "kafka"])
def backend_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def open_backend(backend_url: str) -> AsyncIterator[OpenBackend]:
    """Opens backends on the test's server; for memory:// every call shares one process log."""
    opened: list[Backend] = []
    shared: Backend | None = None

    async def open_one() -> Backend:
        nonlocal shared
        if backend_url.startswith("memory"):
            if shared is None:
                shared = from_url(backend_url)
                await shared.start()
                opened.append(shared)
            return shared
        backend = from_url(backend_url)
        await backend.start()
        opened.append(backend)
        return backend

    yield open_one
    for backend in opened:
        await backend.close()


@pytest.fixture
async def open_hub() -> AsyncIterator[OpenHub]:
    hubs: list[TeamHub] = []

    async def open_one(backend: Backend, limits: ViewerLimits | None = None) -> TeamHub:
        hub = TeamHub(backend, DashboardMetrics(CollectorRegistry()), limits=limits)
        await hub.start()
        hubs.append(hub)
        return hub

    yield open_one
    for hub in hubs:
        await hub.stop()


async def next_frame(viewer: Viewer) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(viewer.next_frame(), WAIT))
    return frame


def seqs_by_worker(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for event in events:
        if event["k"] == "p":
            seqs[event["w"]].append(event["p"]["seq"])
    return seqs


def snapshot_seqs(frame: dict[str, Any]) -> dict[str, int]:
    return {
        item["worker"]: item["position"]["seq"] for item in frame["workers"] if item["position"]
    }


async def collect_until(viewer: Viewer, last_seq: int, workers: set[str]) -> list[dict[str, Any]]:
    """Events from `viewer` until each of `workers` has reached `last_seq`."""
    events: list[dict[str, Any]] = []
    newest: dict[str, int] = {}
    while any(newest.get(worker, -1) < last_seq for worker in workers):
        frame = await next_frame(viewer)
        assert frame["type"] == "events", frame
        events += frame["events"]
        for worker, seqs in seqs_by_worker(frame["events"]).items():
            newest[worker] = max(seqs)
    return events


async def test_viewer_gets_snapshot_then_live_batches(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    backend = await open_backend()
    await backend.publish([position("alpha", "w1", 0), status("alpha", "w1", "online")])
    hub = await open_hub(backend)
    viewer = await hub.join("alpha")

    snapshot = await next_frame(viewer)
    assert snapshot["type"] == "snapshot" and snapshot["team"] == "alpha"
    assert [item["worker"] for item in snapshot["workers"]] == ["w1"]
    assert snapshot["workers"][0]["position"]["seq"] == 0
    assert snapshot["workers"][0]["status"] == "online"

    await backend.publish([position("alpha", "w1", 1), position("alpha", "w2", 0)])
    await backend.publish([status("alpha", "w2", "offline")])
    events: list[dict[str, Any]] = []
    while len(events) < 3:
        frame = await next_frame(viewer)
        assert frame["type"] == "events" and frame["team"] == "alpha"
        events += frame["events"]
    assert [(event["w"], event["k"]) for event in events] == [("w1", "p"), ("w2", "p"), ("w2", "s")]
    assert events[2]["p"] == "offline"
    assert backend.cursor_key(frame["cursor"]) > backend.cursor_key(snapshot["cursor"])


async def test_joining_while_batches_flow_misses_nothing_and_repeats_nothing(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    publisher_backend = await open_backend()
    hubs = [await open_hub(await open_backend()), await open_hub(await open_backend())]
    workers = {"w1", "w2", "w3"}
    last_seq = 120

    async def publish_continuously() -> None:
        for seq in range(last_seq + 1):
            await publisher_backend.publish([position("alpha", w, seq) for w in sorted(workers)])
            await asyncio.sleep(0.002)

    publisher = asyncio.create_task(publish_continuously())
    viewers: list[Viewer] = []
    for index in range(6):
        await asyncio.sleep(0.02)
        viewers.append(await hubs[index % 2].join("alpha"))
    await publisher

    for viewer in viewers:
        snapshot = await next_frame(viewer)
        assert snapshot["type"] == "snapshot"
        start = snapshot_seqs(snapshot)
        received = seqs_by_worker(await collect_until(viewer, last_seq, workers))
        for worker in workers:
            expected = list(range(start.get(worker, -1) + 1, last_seq + 1))
            assert received[worker] == expected, (worker, start)


async def test_viewer_joining_while_the_reader_lags_gets_no_duplicates(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    backend = await open_backend()
    hub = await open_hub(backend)
    first = await hub.join("alpha")
    await next_frame(first)
    # The hub has not read these yet when the second viewer's snapshot already includes them
    # (with memory:// deterministically: nothing here yields to the hub's reader).
    for seq in range(5):
        await backend.publish([position("alpha", "w1", seq)])
    second = await hub.join("alpha")
    assert snapshot_seqs(await next_frame(second)) == {"w1": 4}
    await backend.publish([position("alpha", "w1", 5)])
    assert seqs_by_worker(await collect_until(second, 5, {"w1"})) == {"w1": [5]}
    assert seqs_by_worker(await collect_until(first, 5, {"w1"})) == {"w1": list(range(6))}


async def test_instance_reads_only_teams_with_viewers(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    backend = await open_backend()
    hub = await open_hub(backend)
    first = await hub.join("alpha")
    second = await hub.join("alpha")
    assert hub.subscription.teams == {"alpha"}

    await backend.publish([position("bravo", "w1", 0)])
    await backend.publish([position("alpha", "w1", 0)])
    await next_frame(first)
    assert (await next_frame(first))["type"] == "events"
    samples = hub.metrics.registry
    batches = "teamtrack_dashboard_backend_batches_total"
    assert samples.get_sample_value(batches, {"team": "bravo"}) is None
    assert samples.get_sample_value(batches, {"team": "alpha"}) == 1
    assert samples.get_sample_value("teamtrack_dashboard_viewers", {"team": "alpha"}) == 2

    await hub.leave(first)
    assert hub.subscription.teams == {"alpha"}
    await hub.leave(second)
    assert hub.subscription.teams == frozenset()
    assert samples.get_sample_value("teamtrack_dashboard_viewers", {"team": "alpha"}) == 0

    again = await hub.join("alpha")
    assert hub.subscription.teams == {"alpha"}
    assert (await next_frame(again))["workers"][0]["worker"] == "w1"
    await backend.publish([position("alpha", "w1", 1)])
    frame = await next_frame(again)
    assert seqs_by_worker(frame["events"]) == {"w1": [1]}


async def test_two_instances_both_deliver(open_backend: OpenBackend, open_hub: OpenHub) -> None:
    bridge = await open_backend()
    first_hub = await open_hub(await open_backend())
    second_hub = await open_hub(await open_backend())
    on_first = await first_hub.join("alpha")
    on_second = await second_hub.join("alpha")
    for viewer in (on_first, on_second):
        assert (await next_frame(viewer))["type"] == "snapshot"
    for seq in range(3):
        await bridge.publish([position("alpha", "w1", seq)])
    for viewer in (on_first, on_second):
        events = await collect_until(viewer, 2, {"w1"})
        assert seqs_by_worker(events) == {"w1": [0, 1, 2]}


async def test_slow_viewer_gets_latest_state_per_worker_and_others_get_everything(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    backend = await open_backend()
    hub = await open_hub(backend, ViewerLimits(queue_batches=4))
    slow = await hub.join("alpha")  # reads nothing until the burst is over
    normal = await hub.join("alpha")
    await next_frame(normal)
    workers = {"w1", "w2", "w3"}
    last_seq = 30

    reader = asyncio.create_task(collect_until(normal, last_seq, workers))
    for seq in range(last_seq + 1):
        await backend.publish([position("alpha", w, seq) for w in sorted(workers)])
        await asyncio.sleep(0.001)
    await backend.publish([status("alpha", "w2", "offline")])
    events = await asyncio.wait_for(reader, WAIT)
    assert seqs_by_worker(events) == {w: list(range(last_seq + 1)) for w in workers}

    while hub.metrics.registry.get_sample_value("teamtrack_dashboard_backend_batches_total",
                                                {"team": "alpha"}) != last_seq + 2:
        await asyncio.sleep(0.01)
    assert slow.syncing and slow.queued_batches == 0
    assert (await next_frame(slow))["type"] == "snapshot"
    sync = await next_frame(slow)
    assert sync["type"] == "sync" and sync["team"] == "alpha"
    newest = (await backend.snapshot("alpha")).cursor
    assert backend.cursor_key(sync["cursor"]) == backend.cursor_key(newest)
    # One position per worker, the newest, then the presence that changed.
    assert [(e["w"], e["k"], e["p"]["seq"]) for e in sync["events"] if e["k"] == "p"] == [
        (w, "p", last_seq) for w in sorted(workers)
    ]
    assert [(e["w"], e["p"]) for e in sync["events"] if e["k"] == "s"] == [("w2", "offline")]
    assert not slow.syncing

    # Caught up: back to plain event frames, in order, nothing repeated.
    await backend.publish([position("alpha", "w1", last_seq + 1)])
    frame = await next_frame(slow)
    assert frame["type"] == "events" and seqs_by_worker(frame["events"]) == {"w1": [last_seq + 1]}
    registry = hub.metrics.registry
    assert registry.get_sample_value("teamtrack_dashboard_viewer_conflations_total") == 1
    assert registry.get_sample_value("teamtrack_dashboard_sync_frames_total") == 1
    conflated = registry.get_sample_value("teamtrack_dashboard_events_conflated_total")
    assert conflated is not None and conflated >= 3 * (last_seq - 4)
    assert hub.viewer_count("alpha") == 2  # nobody was dropped


async def test_viewer_that_never_reads_holds_bounded_memory(open_hub: OpenHub) -> None:
    workers = [f"w{index:03d}" for index in range(200)]
    # The backend keeps little history, so what grows (if anything) is the viewer's.
    backend = MemoryBackend(history=50)
    hub = await open_hub(backend, ViewerLimits(queue_batches=64, queue_bytes=256 * 1024))
    stuck = await hub.join("alpha")
    reading = await hub.join("alpha")
    await next_frame(reading)
    batches = 400
    delays_ms: list[float] = []

    async def read_everything() -> None:
        received = 0
        while received < batches * len(workers):
            frame = await next_frame(reading)
            now = time.time() * 1000
            delays_ms.extend(now - event["rx"] for event in frame["events"])
            received += len(frame["events"])

    tracemalloc.start()
    try:
        reader = asyncio.create_task(read_everything())
        largest_held = 0
        for seq in range(batches):
            await backend.publish([position("alpha", w, seq) for w in workers])
            await asyncio.sleep(0)
            largest_held = max(largest_held, stuck.held_bytes)
        await asyncio.wait_for(reader, WAIT * 4)
        # What the dashboard's own code allocated and still holds: the viewers' state, and
        # the team's record of positions shown (bounded by its workers, not by the traffic).
        held = {
            statistic.traceback[0].filename.rsplit("/", 1)[-1]: statistic.size
            for statistic in tracemalloc.take_snapshot()
            .filter_traces([tracemalloc.Filter(True, "*/dashboard/*")])
            .statistics("filename")
        }
        held_by_repeats = held.pop("repeats.py", 0)
        held_by_dashboard = sum(held.values())
    finally:
        tracemalloc.stop()

    event_bytes = len(position("alpha", "w000", batches).to_json())
    published = batches * len(workers) * event_bytes
    # About one entry per worker, however much was published (here ~9 MB of events).
    assert stuck.syncing and stuck.queued_batches == 0
    assert largest_held <= 256 * 1024 + len(workers) * (event_bytes + 64) + 4096
    assert held_by_dashboard < published / 20, (held_by_dashboard, published)
    assert held_by_repeats < len(workers) * 1500, held_by_repeats  # 1.3 KiB measured
    delays_ms.sort()
    assert delays_ms[int(len(delays_ms) * 0.99)] < 1000


async def test_resume_on_another_instance_replays_the_missed_batches_once(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    publisher_backend = await open_backend()
    first_hub = await open_hub(await open_backend())
    second_hub = await open_hub(await open_backend())
    workers = {"w1", "w2"}
    last_seq = 150

    async def publish_continuously() -> None:
        for seq in range(last_seq + 1):
            await publisher_backend.publish([position("alpha", w, seq) for w in sorted(workers)])
            await asyncio.sleep(0.003)

    viewer = await first_hub.join("alpha")
    publisher = asyncio.create_task(publish_continuously())
    snapshot = await next_frame(viewer)
    start = snapshot_seqs(snapshot)
    events = await collect_until(viewer, 20, workers)
    resumed_frames = 0
    cursor = ""
    # Drop and resume a few times, alternating instances, while positions keep flowing.
    for round_number in range(4):
        frame = await next_frame(viewer)
        events += frame["events"]
        cursor = frame["cursor"]
        await (first_hub if round_number % 2 == 0 else second_hub).leave(viewer)
        await asyncio.sleep(0.05)  # batches are published meanwhile
        hub = second_hub if round_number % 2 == 0 else first_hub
        viewer = await hub.join("alpha", after=cursor)
        first = await next_frame(viewer)
        assert first == {"type": "resume", "team": "alpha", "cursor": cursor, "now": first["now"]}
        resumed_frames += 1
    await publisher
    events += await collect_until(viewer, last_seq, workers)

    received = seqs_by_worker(events)
    for worker in workers:
        assert received[worker] == list(range(start.get(worker, -1) + 1, last_seq + 1))
    replays = first_hub.metrics.registry.get_sample_value(
        "teamtrack_dashboard_resumes_total", {"outcome": "replayed"}
    ) or 0
    replays += second_hub.metrics.registry.get_sample_value(
        "teamtrack_dashboard_resumes_total", {"outcome": "replayed"}
    ) or 0
    assert replays == resumed_frames == 4


async def test_resume_where_the_team_is_read_already_hands_over_without_duplicates(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    publisher_backend = await open_backend()
    hub = await open_hub(await open_backend())
    steady = await hub.join("alpha")  # keeps the team subscribed on this instance
    await next_frame(steady)
    last_seq = 120

    async def publish_continuously() -> None:
        for seq in range(last_seq + 1):
            await publisher_backend.publish([position("alpha", "w1", seq)])
            await asyncio.sleep(0.003)

    publisher = asyncio.create_task(publish_continuously())
    viewer = await hub.join("alpha")
    start = snapshot_seqs(await next_frame(viewer)).get("w1", -1)
    events = await collect_until(viewer, 30, {"w1"})
    for _ in range(3):
        frame = await next_frame(viewer)
        events += frame["events"]
        await hub.leave(viewer)
        await asyncio.sleep(0.05)
        viewer = await hub.join("alpha", after=frame["cursor"])
        assert (await next_frame(viewer))["type"] == "resume"
    await publisher
    events += await collect_until(viewer, last_seq, {"w1"})
    assert seqs_by_worker(events)["w1"] == list(range(start + 1, last_seq + 1))
    assert seqs_by_worker(await collect_until(steady, last_seq, {"w1"}))["w1"][-1] == last_seq
    replayed = hub.metrics.registry.get_sample_value(
        "teamtrack_dashboard_resumes_total", {"outcome": "replayed"}
    )
    assert replayed is not None and replayed >= 1


async def test_resume_with_the_newest_cursor_sends_only_new_batches(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    backend = await open_backend()
    hub = await open_hub(backend)
    await backend.publish([position("alpha", "w1", 0)])
    cursor = (await backend.snapshot("alpha")).cursor
    viewer = await hub.join("alpha", after=cursor)
    assert (await next_frame(viewer))["type"] == "resume"
    await backend.publish([position("alpha", "w1", 1)])
    assert seqs_by_worker((await next_frame(viewer))["events"]) == {"w1": [1]}
    assert hub.metrics.registry.get_sample_value(
        "teamtrack_dashboard_resumes_total", {"outcome": "current"}
    ) == 1


@pytest.mark.parametrize("cursor", ["not-a-cursor", "99999999999999-0", "x" * 300])
async def test_resume_from_an_unusable_cursor_starts_over(
    open_backend: OpenBackend, open_hub: OpenHub, cursor: str
) -> None:
    backend = await open_backend()
    hub = await open_hub(backend)
    await backend.publish([position("alpha", "w1", 0)])
    viewer = await hub.join("alpha", after=cursor)
    gap, snapshot = await next_frame(viewer), await next_frame(viewer)
    assert gap["type"] == "gap" and snapshot["type"] == "snapshot"
    assert snapshot_seqs(snapshot) == {"w1": 0}
    await backend.publish([position("alpha", "w1", 1)])
    assert seqs_by_worker((await next_frame(viewer))["events"]) == {"w1": [1]}


async def test_resume_after_the_history_was_trimmed_sends_gap_then_snapshot(
    backend_url: str, open_hub: OpenHub
) -> None:
    separator = "&" if "?" in backend_url else "?"
    backend = from_url(f"{backend_url}{separator}history=5")
    await backend.start()
    try:
        hub = await open_hub(backend)
        await backend.publish([position("alpha", "w1", 0)])
        cursor = (await backend.snapshot("alpha")).cursor
        for seq in range(1, 20):
            await backend.publish([position("alpha", "w1", seq)])
        viewer = await hub.join("alpha", after=cursor)
        gap, snapshot = await next_frame(viewer), await next_frame(viewer)
        assert gap == {"type": "gap", "team": "alpha", "cursor": cursor}
        assert snapshot["type"] == "snapshot" and snapshot_seqs(snapshot) == {"w1": 19}
        await backend.publish([position("alpha", "w1", 20)])
        assert seqs_by_worker((await next_frame(viewer))["events"]) == {"w1": [20]}
        assert hub.metrics.registry.get_sample_value(
            "teamtrack_dashboard_resumes_total", {"outcome": "gap"}
        ) == 1
        await hub.stop()
    finally:
        await backend.close()


async def test_instance_reads_a_tenth_when_its_viewers_watch_one_team_of_ten(
    redis_url: str, open_hub: OpenHub
) -> None:
    teams = [f"team{index}" for index in range(10)]
    bridge = from_url(redis_url)
    watching_one, watching_all = from_url(redis_url), from_url(redis_url)
    for backend in (bridge, watching_one, watching_all):
        await backend.start()
    try:
        one_hub = await open_hub(watching_one)
        all_hub = await open_hub(watching_all)
        viewer = await one_hub.join("team3")
        await next_frame(viewer)
        for team in teams:
            await next_frame(await all_hub.join(team))
        rounds, workers = 30, 5
        for seq in range(rounds):
            # One bridge batch holds every team, as a busy bridge's does.
            await bridge.publish(
                [position(team, f"w{w}", seq) for team in teams for w in range(workers)]
            )
        await collect_until(viewer, rounds - 1, {f"w{w}" for w in range(workers)})

        def received(hub: TeamHub) -> dict[str, float]:
            counts = {}
            for team in teams:
                value = hub.metrics.registry.get_sample_value(
                    "teamtrack_dashboard_backend_events_total", {"team": team}
                )
                if value:
                    counts[team] = value
            return counts

        deadline = time.monotonic() + WAIT
        while sum(received(all_hub).values()) < rounds * workers * len(teams):
            assert time.monotonic() < deadline, received(all_hub)
            await asyncio.sleep(0.02)
        one, everything = received(one_hub), received(all_hub)
        assert one == {"team3": rounds * workers}
        assert everything == {team: rounds * workers for team in teams}
        assert sum(one.values()) / sum(everything.values()) == pytest.approx(0.1)
        await one_hub.stop()
        await all_hub.stop()
    finally:
        for backend in (bridge, watching_one, watching_all):
            await backend.close()


class _FlakySubscription(TeamSubscription):
    """Delegates to a real subscription; fails once when its backend says so."""

    def __init__(self, backend: FlakyMemoryBackend, inner: TeamSubscription) -> None:
        self._backend = backend
        self._inner = inner

    async def add(self, team: str, after: Cursor) -> None:
        await self._inner.add(team, after)

    async def remove(self, team: str) -> None:
        await self._inner.remove(team)

    @property
    def teams(self) -> frozenset[str]:
        return self._inner.teams

    async def close(self) -> None:
        await self._inner.close()

    async def __anext__(self) -> Batch | Gap:
        if self._backend.fail_next_read:
            self._backend.fail_next_read = False
            raise BackendError("connection reset (test)")
        return await self._inner.__anext__()


class FlakyMemoryBackend(MemoryBackend):
    fail_next_read = False
    subscriptions = 0

    def subscribe(self) -> TeamSubscription:
        self.subscriptions += 1
        return _FlakySubscription(self, super().subscribe())


async def test_failed_reader_resubscribes_from_the_last_cursor(open_hub: OpenHub) -> None:
    backend = FlakyMemoryBackend()
    hub = await open_hub(backend)
    viewer = await hub.join("alpha")
    await next_frame(viewer)
    backend.fail_next_read = True
    await backend.publish([position("alpha", "w1", 0)])  # read, then the next read fails
    await asyncio.sleep(0.01)
    await backend.publish([position("alpha", "w1", 1)])  # published while the hub backs off
    await backend.publish([position("alpha", "w1", 2)])
    events = await collect_until(viewer, 2, {"w1"})
    assert seqs_by_worker(events) == {"w1": [0, 1, 2]}
    assert backend.subscriptions == 2


async def test_trimmed_history_sends_gap_then_fresh_snapshot(open_hub: OpenHub) -> None:
    backend = FlakyMemoryBackend(history=3)
    hub = await open_hub(backend)
    viewer = await hub.join("alpha")
    await next_frame(viewer)
    backend.fail_next_read = True
    await backend.publish([position("alpha", "w1", 0)])
    await asyncio.sleep(0.01)
    # While the hub backs off, more is published than the history keeps.
    for seq in range(1, 10):
        await backend.publish([position("alpha", "w1", seq)])
    frames = [await next_frame(viewer) for _ in range(3)]
    assert [frame["type"] for frame in frames[:2]] == ["events", "gap"]
    assert seqs_by_worker(frames[0]["events"]) == {"w1": [0]}
    assert frames[1]["cursor"] == frames[0]["cursor"]
    assert frames[2]["type"] == "snapshot" and snapshot_seqs(frames[2]) == {"w1": 9}
    await backend.publish([position("alpha", "w1", 10)])
    frame = await next_frame(viewer)
    assert seqs_by_worker(frame["events"]) == {"w1": [10]}


async def test_a_backlog_arriving_at_once_reaches_a_reading_viewer_in_full(
    redis_url: str, open_hub: OpenHub
) -> None:
    """After an outage the hub reads a backlog of small log entries (an idle bridge publishes
    each message on its own) in one go: a viewer that reads gets all of it, in large frames,
    and is not switched to state-sync (with 256 queued batches as the bound it was, and 960 of
    4,801 positions of a 3 s dashboard stall never reached a viewer)."""
    backend = from_url(redis_url)
    await backend.start()
    hub = await open_hub(backend)
    viewer = await hub.join("alpha")
    await next_frame(viewer)
    backlog = 1000

    def publish_backlog() -> None:
        async def publish() -> None:
            writer = from_url(redis_url)
            await writer.start()
            try:
                for seq in range(backlog):
                    await writer.publish([position("alpha", "w1", seq)])
            finally:
                await writer.close()

        asyncio.run(publish())

    # The hub cannot read while the publishing thread writes the backlog: its loop is blocked.
    writer_thread = threading.Thread(target=publish_backlog)
    writer_thread.start()
    writer_thread.join()
    frames = 0
    seqs: list[int] = []
    while len(seqs) < backlog:
        frame = await next_frame(viewer)
        assert frame["type"] == "events", frame["type"]
        frames += 1
        seqs += [event["p"]["seq"] for event in frame["events"]]
    assert seqs == list(range(backlog))
    assert not viewer.syncing
    assert frames <= 10, frames
    await hub.stop()
    await backend.close()


async def test_a_viewer_that_stops_reading_is_synced_once_it_lags(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    """Far below the queue's bounds, a viewer whose oldest queued batch waited `max_lag_s`
    is switched to state-sync: it is behind, not just handed a burst."""
    backend = await open_backend()
    hub = await open_hub(backend, ViewerLimits(max_lag_s=0.3))
    viewer = await hub.join("alpha")
    await next_frame(viewer)
    await backend.publish([position("alpha", "w1", 0)])
    await asyncio.sleep(0.5)
    await backend.publish([position("alpha", "w1", 1)])
    deadline = time.monotonic() + WAIT
    while not viewer.syncing and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert viewer.syncing
    frame = await next_frame(viewer)
    assert frame["type"] == "sync" and seqs_by_worker(frame["events"]) == {"w1": [1]}
