"""TeamHub against the memory backend and a real Redis: snapshot + live, no gaps, interest, slow."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from backend_contract import position, status
from prometheus_client import CollectorRegistry

from dashboard.hub import TeamHub, Viewer
from dashboard.metrics import DashboardMetrics
from teamtrack.backends import Backend, BackendError, Batch, Cursor, Gap, TeamSubscription, from_url
from teamtrack.backends.memory import MemoryBackend

WAIT = 5.0

OpenBackend = Callable[..., Awaitable[Backend]]
OpenHub = Callable[..., Awaitable[TeamHub]]


@pytest.fixture(params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
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

    async def open_one(backend: Backend, queue_batches: int = 256) -> TeamHub:
        hub = TeamHub(backend, DashboardMetrics(CollectorRegistry()), queue_batches=queue_batches)
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


async def test_slow_viewer_is_dropped_and_others_get_everything(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    backend = await open_backend()
    hub = await open_hub(backend, queue_batches=4)
    slow = await hub.join("alpha")
    normal = await hub.join("alpha")
    await next_frame(normal)
    last_seq = 30

    async def read_everything() -> list[dict[str, Any]]:
        return await collect_until(normal, last_seq, {"w1"})

    reader = asyncio.create_task(read_everything())
    for seq in range(last_seq + 1):
        await backend.publish([position("alpha", "w1", seq)])
        await asyncio.sleep(0.001)
    events = await asyncio.wait_for(reader, WAIT)

    assert seqs_by_worker(events) == {"w1": list(range(last_seq + 1))}
    await asyncio.wait_for(slow.too_slow.wait(), WAIT)
    assert hub.viewer_count("alpha") == 1
    registry = hub.metrics.registry
    assert registry.get_sample_value("teamtrack_dashboard_viewers_disconnected_slow_total") == 1
    await hub.leave(slow)
    await hub.leave(normal)
    assert hub.subscription.teams == frozenset()


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
