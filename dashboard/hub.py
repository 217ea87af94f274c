"""Fan-out of one backend subscription to the viewers connected to this instance.

Interest-based routing: the instance's single `TeamSubscription` holds exactly the teams that
have at least one viewer here, so an instance reads nothing it would throw away.

Joining without gaps or duplicates: a viewer is registered before its snapshot is taken, so a
batch that the hub delivers while the snapshot is in flight is already queued for it. Everything
up to the snapshot's cursor is dropped when frames are built, because the snapshot covers it;
everything after it is sent once, because the viewer remembers the newest cursor it sent.

Resuming on any instance: a viewer that comes back with the cursor of the last frame it got is
registered the same way, but instead of a snapshot it is sent the batches between its cursor
and the newest one the shared subscription had routed when it was registered, read again from
the backend's history by a subscription of its own that ends there; everything later comes from
the shared subscription, and cursor order drops what both deliver. The cursor is the only thing
a viewer brings, so the instance it lands on does not matter.

Slow viewers: the hub fills each viewer's bounded queue without waiting. A viewer that falls
behind (the oldest batch queued for it has waited `max_lag_s`) or whose queue overflows (in
bytes or batches) is switched to state-sync: from then on it keeps only the newest position and
the newest presence of each worker (at most two entries per worker of the team, whatever the
traffic), and gets them as one `sync` frame when its socket takes the next frame. The hub and
the other viewers never wait for it. A backlog that arrives at once (the hub catching up after
the backend or this process was away) is not a slow viewer: it is queued up to the byte bound
and sent in large frames, and a viewer that reads them is never switched to state-sync for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

import orjson

from dashboard.checks import checked_snapshot
from dashboard.frames import (
    count_events,
    gap_frame,
    live_frames,
    resume_frame,
    snapshot_frame,
    sync_frame,
)
from dashboard.latency import first_device_ts
from dashboard.metrics import DashboardMetrics, TeamCounts
from dashboard.repeats import RepeatFilter
from teamtrack.backends import Backend, Batch, Cursor, Gap, Snapshot, TeamSubscription
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

# A frame takes up to this many queued log entries (and bytes): after an outage a backlog of
# small entries (an idle bridge publishes each message on its own) goes out in a few frames.
MAX_BATCHES_PER_FRAME: Final = 1024
MAX_FRAME_BYTES: Final = 512 * 1024
# A viewer is behind when the oldest batch queued for it has waited this long.
DEFAULT_MAX_LAG_S: Final = 2.0
DEFAULT_QUEUE_BATCHES: Final = 16384
DEFAULT_QUEUE_BYTES: Final = 4 * 1024 * 1024
# What one queued entry costs besides the batch's bytes (the tuple and the deque's slot), so
# that the byte bound also bounds a queue of many small batches.
QUEUED_ENTRY_BYTES: Final = 72
MAX_CURSOR_CHARS: Final = 256
# How long a resume waits for the replay's first item before answering: a `Gap` (trimmed
# history) is known at once, and is better sent instead of a `resume` than right after it.
REPLAY_FIRST_ITEM_WAIT_S: Final = 0.5
# Replayed batches that arrive within this long of each other share a frame.
REPLAY_GATHER_WAIT_S: Final = 0.005

CursorKey = tuple[int, ...]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class ViewerLimits:
    """How far behind, and how much, one viewer may be before it is switched to state-sync."""

    queue_batches: int = DEFAULT_QUEUE_BATCHES
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    max_lag_s: float = DEFAULT_MAX_LAG_S


class _LatestPerWorker:
    """What a viewer that fell behind still needs: each worker's newest position and presence
    (worker events it missed meanwhile are in the history, `/api/teams/{team}/events`).

    Entries are the events' JSON, tagged with the cursor of the batch they came in, so that the
    sync frame can leave out what the viewer already has.
    """

    def __init__(self) -> None:
        self.positions: dict[str, tuple[CursorKey, str]] = {}
        self.presence: dict[str, tuple[CursorKey, str]] = {}
        self.cursor: Cursor | None = None
        self.key: CursorKey = ()
        self.gap: Gap | None = None
        self.held_bytes = 0

    def absorb(self, item: Batch | Gap, key: CursorKey | None) -> int:
        """Take in a batch (or a gap); returns how many events were replaced by newer ones."""
        if isinstance(item, Gap):
            # The fresh snapshot that a gap calls for covers everything absorbed so far.
            superseded = len(self.positions) + len(self.presence)
            self.positions.clear()
            self.presence.clear()
            self.held_bytes = 0
            self.gap = item
            return superseded
        assert key is not None
        superseded = 0
        for event in orjson.loads(item.raw):
            kind = event["k"]
            if kind == "e":
                continue  # a worker event is news, not state: the history keeps it
            store = self.positions if kind == "p" else self.presence
            # As str: orjson's bytes keep their oversized write buffer (~4 KiB each).
            encoded = orjson.dumps(event).decode()
            previous = store.get(event["w"])
            if previous is not None:
                superseded += 1
                self.held_bytes -= len(previous[1])
            store[event["w"]] = (key, encoded)
            self.held_bytes += len(encoded)
        if key > self.key:
            self.key, self.cursor = key, item.cursor
        return superseded

    def events_after(self, key: CursorKey) -> list[str]:
        """Positions first, then presence (a later `offline` must win over an earlier fix)."""
        return [
            encoded
            for store in (self.positions, self.presence)
            for _, (entry_key, encoded) in sorted(store.items())
            if entry_key > key
        ]


class _Replay:
    """A resuming viewer's own subscription, read from its cursor until it meets the shared one.

    `until` is the newest cursor the shared subscription had routed when the viewer was
    registered: everything after it reaches the viewer's queue anyway. The replay ends at the
    first batch at or after it. Until that batch exists (a quiet team), the replay simply has
    nothing to send, and waits like a live subscription would.

    Reads run as a task that outlives a caller's timeout, so no read is ever abandoned halfway.
    """

    def __init__(
        self, subscription: TeamSubscription, until: CursorKey, rejected: Counter[str]
    ) -> None:
        self.subscription = subscription
        self.until = until
        # Repeats within the replayed batches (the team's filter has seen them all already),
        # and events a bridge could not have written, counted with the team's.
        self.repeats = RepeatFilter(rejected)
        self._read: asyncio.Task[Batch | Gap] | None = None

    def _reading(self) -> asyncio.Task[Batch | Gap]:
        if self._read is None:
            self._read = asyncio.ensure_future(anext(self.subscription))
        return self._read

    async def peek(self, wait_s: float | None) -> Batch | Gap | None:
        """The next item if it comes within `wait_s` (None: no limit); it stays next."""
        reading = self._reading()
        await asyncio.wait({reading}, timeout=wait_s)
        return reading.result() if reading.done() else None

    async def next(self) -> Batch | Gap:
        item = await self._reading()
        self._read = None
        return item

    async def close(self) -> None:
        if self._read is not None:
            self._read.cancel()
            with contextlib.suppress(BaseException):
                await self._read
            self._read = None
        with contextlib.suppress(Exception):
            await self.subscription.close()


class Viewer:
    """One connected viewer of one team: what is queued for it and the frames built from it.

    Created by `TeamHub.join`; the owner calls `next_frame` in a loop, sends what it returns,
    and calls `TeamHub.leave` when done.
    """

    def __init__(self, hub: TeamHub, team: str, limits: ViewerLimits) -> None:
        self.team = team
        self._hub = hub
        self._limits = limits
        # Each batch with its cursor's sort key (parsed once by the hub for all its viewers) and
        # the loop time it was queued at.
        self._queue: deque[tuple[Batch, CursorKey, float] | Gap] = deque()
        self._queued_bytes = 0
        # Lag is counted from here at the earliest: the end of a replay, during which the live
        # batches wait by design.
        self._lag_from = 0.0
        # A bare future rather than an `asyncio.Event`: one wait per frame, and `Event.wait`
        # looks the loop up (a getpid in Python 3.11) and keeps a waiter list each time.
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._latest: _LatestPerWorker | None = None
        self._replay: _Replay | None = None
        self._ready_frames: deque[str] = deque()
        # The newest live events frame and its oldest event's device time (dashboard.latency);
        # `device_ts` is the one of the frame `next_frame` returned last (None: no sample).
        self._sampled: tuple[str, int] | None = None
        self.device_ts: int | None = None
        # Nothing is sent until the first frame is decided; `None` would let a queued batch through.
        self._sent_key: CursorKey | None = None

    @property
    def syncing(self) -> bool:
        """True while the viewer is behind and keeps only the latest state per worker."""
        return self._latest is not None

    @property
    def held_bytes(self) -> int:
        """Bytes held for this viewer alone (batches themselves are shared by all viewers)."""
        latest = self._latest.held_bytes if self._latest is not None else 0
        return self._queued_bytes + latest + sum(len(frame) for frame in self._ready_frames)

    @property
    def queued_batches(self) -> int:
        return len(self._queue)

    def offer(self, item: Batch | Gap, key: CursorKey | None, now: float | None = None) -> None:
        """Queue without waiting; past the limits, switch to keeping the latest per worker.

        `key`: the batch's `cursor_key`, parsed once by the hub for every viewer (None for a gap);
        `now`: the loop's time, read once by the hub for every viewer.
        """
        if now is None:
            now = self._loop.time()
        entry: tuple[Batch, CursorKey, float] | Gap
        if isinstance(item, Batch):
            assert key is not None, "the hub parses each batch's cursor"
            size = len(item.raw) + QUEUED_ENTRY_BYTES
            entry = (item, key, now)
        else:
            size = 0
            entry = item
        if self._latest is not None:
            self._absorb(entry)
        elif self._queue and (
            len(self._queue) >= self._limits.queue_batches
            or self._queued_bytes + size > self._limits.queue_bytes
            or self._lag(now) > self._limits.max_lag_s
        ):
            self._start_syncing()
            self._absorb(entry)
        else:
            self._queue.append(entry)
            self._queued_bytes += size
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # cancelled with its frame's sender
                waiter.set_result(None)

    def _lag(self, now: float) -> float:
        """How long the oldest queued batch has waited (0 during a replay, which holds them)."""
        head = self._queue[0]
        if self._replay is not None or isinstance(head, Gap):
            return 0.0
        return now - max(head[2], self._lag_from)

    def _start_syncing(self) -> None:
        self._hub.metrics.viewer_conflations.inc()
        log.info("a viewer of team %s fell behind; switching it to state-sync", self.team)
        self._latest = _LatestPerWorker()
        queued, self._queue = self._queue, deque()
        self._queued_bytes = 0
        for entry in queued:
            self._absorb(entry)

    def _absorb(self, entry: tuple[Batch, CursorKey, float] | Gap) -> None:
        assert self._latest is not None
        if isinstance(entry, Gap):
            superseded = self._latest.absorb(entry, None)
        else:
            superseded = self._latest.absorb(entry[0], entry[1])
        if superseded:
            self._hub.metrics.events_conflated.inc(superseded)

    def start_with_snapshot(self, snapshot: Snapshot) -> None:
        self._ready_frames.append(snapshot_frame(snapshot, now_ms()))
        self._sent_key = self._hub.backend.cursor_key(snapshot.cursor)

    async def start_resuming(self, after: Cursor, snapshot: Snapshot, routed: Cursor) -> str:
        """Continue after `after`; returns the outcome, for metrics.

        `routed` is where the shared subscription stood when this viewer was registered:
        batches after it reach the viewer's queue, the ones before it are replayed here.
        """
        backend = self._hub.backend
        requested = self._hub.parse_cursor(after)
        if requested is None or requested > backend.cursor_key(snapshot.cursor):
            # Not a cursor of this team's log as it is now (a reset backend, another team's,
            # or not a cursor at all): nothing can be proven about what was missed.
            self._start_over(Gap(self.team, after), snapshot)
            return "unusable"
        self._sent_key = requested
        until = backend.cursor_key(routed)
        if requested >= until:
            self._ready_frames.append(resume_frame(self.team, after, now_ms()))
            return "current"
        subscription = backend.subscribe()
        replay = _Replay(
            subscription, until, self._hub.metrics.team_counts(self.team).rejected
        )
        try:
            await subscription.add(self.team, after)
            first = await replay.peek(REPLAY_FIRST_ITEM_WAIT_S)
        except BaseException:
            await replay.close()
            raise
        if isinstance(first, Gap):
            await replay.close()
            self._start_over(first, snapshot)
            return "gap"
        self._ready_frames.append(resume_frame(self.team, after, now_ms()))
        self._replay = replay
        return "replayed"

    def _start_over(self, gap: Gap, snapshot: Snapshot) -> None:
        self._ready_frames.append(gap_frame(self.team, gap.requested))
        self.start_with_snapshot(snapshot)

    async def close(self) -> None:
        replay, self._replay = self._replay, None
        if replay is not None:
            self._lag_from = self._loop.time()
            await replay.close()

    async def next_frame(self) -> str:
        """The next text frame for this viewer: the first one, then live frames.

        Takes whatever is already queued into the same frame: an idle viewer gets each batch at
        once, a busy one gets fewer, larger frames, and one that fell behind gets a `sync`.
        """
        while not self._ready_frames:
            await self._build_frames()
        frame = self._ready_frames.popleft()
        sampled, self.device_ts = self._sampled, None
        if sampled is not None and sampled[0] is frame:
            self._sampled, self.device_ts = None, sampled[1]  # the frame is not held here
        return frame

    async def _build_frames(self) -> None:
        if self._replay is not None:
            await self._build_replay_frames(self._replay)
        elif self._latest is not None:
            await self._build_sync_frame()
        elif not self._queue:
            self._waiter = self._loop.create_future()
            await self._waiter
        elif isinstance(self._queue[0], Gap):
            gap = self._queue.popleft()
            assert isinstance(gap, Gap)
            await self._resync(gap)
        else:
            self._build_events_frame()

    def _build_events_frame(self) -> None:
        batches: list[Batch] = []
        size = 0
        while self._queue and len(batches) < MAX_BATCHES_PER_FRAME and size < MAX_FRAME_BYTES:
            entry = self._queue[0]
            if isinstance(entry, Gap):
                break  # its own frames come after this batch's
            self._queue.popleft()
            item, key, _queued_at = entry
            self._queued_bytes -= len(item.raw) + QUEUED_ENTRY_BYTES
            if self._is_new(key):
                batches.append(item)
                size += len(item.raw)
        if batches:
            frames = live_frames(self.team, batches)
            self._ready_frames.extend(frames)
            ts = first_device_ts(batches[0].raw)
            first = frames[0]
            self._sampled = (
                (first, ts) if ts is not None and first.startswith('{"type":"events"') else None
            )

    async def _build_replay_frames(self, replay: _Replay) -> None:
        batches: list[Batch] = []
        size = 0
        item: Batch | Gap | None = await replay.peek(None)
        while item is not None:
            await replay.next()  # the item peeked at
            if isinstance(item, Gap):
                # Trimmed while being read: send what was read, then start over.
                await self.close()
                if batches:
                    self._ready_frames.extend(live_frames(self.team, batches))
                await self._resync(item)
                return
            self._hub.metrics.replayed_batches.inc()
            key = self._hub.backend.cursor_key(item.cursor)
            if self._is_new(key):
                filtered = replay.repeats.filter(item)
                if filtered is not None:
                    batches.append(filtered)
                    size += len(filtered.raw)
            if key >= replay.until:
                await self.close()  # the shared subscription's batches take over from here
                break
            if len(batches) >= MAX_BATCHES_PER_FRAME or size >= MAX_FRAME_BYTES:
                break
            item = await replay.peek(REPLAY_GATHER_WAIT_S)
        if batches:
            self._ready_frames.extend(live_frames(self.team, batches))

    async def _build_sync_frame(self) -> None:
        latest, self._latest = self._latest, None
        assert latest is not None and self._sent_key is not None
        if latest.gap is not None:
            await self._resync(latest.gap)
            return
        events = latest.events_after(self._sent_key)
        if events and latest.cursor is not None:
            self._ready_frames.append(sync_frame(self.team, latest.cursor, events, now_ms()))
            self._hub.metrics.sync_frames.inc()
            self._sent_key = max(self._sent_key, latest.key)

    def _is_new(self, key: CursorKey) -> bool:
        if self._sent_key is None or key <= self._sent_key:
            return False
        self._sent_key = key
        return True

    async def _resync(self, gap: Gap) -> None:
        """History the viewer needed is gone: say so, then start over from a fresh snapshot."""
        snapshot = await self._hub.snapshot(self.team)
        self._start_over(gap, snapshot)


@dataclass(eq=False)
class _TeamState:
    counts: TeamCounts
    viewers: set[Viewer] = field(default_factory=set)
    # Serialises subscribe/unsubscribe decisions and snapshots of one team (see `join`).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Where the subscription reads this team from; None while the team is not subscribed.
    cursor: str | None = None
    # `cursor`'s sort key, so that each batch's cursor is parsed once.
    key: CursorKey = ()
    # Where the current subscription of the team started.
    subscribed_at: str = ""
    # Positions shown already (at-least-once delivery repeats some), while subscribed.
    repeats: RepeatFilter = field(default_factory=RepeatFilter)


class TeamHub:
    """One backend reader per instance, fanning each team's batches out to its viewers."""

    def __init__(
        self,
        backend: Backend,
        metrics: DashboardMetrics,
        *,
        limits: ViewerLimits | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self._limits = limits if limits is not None else ViewerLimits()
        # States are kept after their last viewer leaves: a lock must outlive every waiter, and
        # only teams a manager was allowed to open ever get one.
        self._teams: dict[str, _TeamState] = {}
        self._subscription: TeamSubscription | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def subscription(self) -> TeamSubscription:
        if self._subscription is None:
            raise RuntimeError("TeamHub used before start()")
        return self._subscription

    def viewer_count(self, team: str) -> int:
        state = self._teams.get(team)
        return len(state.viewers) if state is not None else 0

    def viewers(self, team: str) -> frozenset[Viewer]:
        state = self._teams.get(team)
        return frozenset(state.viewers) if state is not None else frozenset()

    def parse_cursor(self, cursor: Cursor) -> CursorKey | None:
        """The sort key of a cursor a client sent, or None if the backend cannot read it."""
        if not cursor or len(cursor) > MAX_CURSOR_CHARS:
            return None
        try:
            return self.backend.cursor_key(cursor)
        except Exception:
            # Cursors are opaque and each backend parses its own; any failure means "not ours".
            return None

    async def start(self) -> None:
        self._subscription = self.backend.subscribe()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="dashboard-hub-dispatch")

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None

    async def snapshot(self, team: str) -> Snapshot:
        """The backend's snapshot of `team` without what a bridge could not have written."""
        snapshot = await self.backend.snapshot(team)
        return checked_snapshot(snapshot, self.metrics.team_counts(team).rejected)

    async def join(self, team: str, after: Cursor | None = None) -> Viewer:
        """A viewer of `team`: from a snapshot, or resuming after `after`; raises `BackendError`."""
        state = self._teams.get(team)
        if state is None:
            state = self._teams[team] = _TeamState(self.metrics.team_counts(team))
        viewer = Viewer(self, team, self._limits)
        # Registered first: batches delivered while the snapshot is taken are already queued.
        state.viewers.add(viewer)
        # Every batch after this reaches the viewer's queue. (None: the team is not read yet;
        # then it is every batch after where the team's reading starts, `subscribed_at`.)
        routed = state.cursor
        self._count_viewers(team, state)
        try:
            # Under the team's lock the snapshot is never older than the cursor the team was
            # subscribed at, so every batch after the snapshot reaches this viewer.
            async with state.lock:
                snapshot = await self.snapshot(team)
                if state.cursor is None:
                    await self._subscribe(team, state, snapshot.cursor)
                # The team cannot be dropped while this viewer is registered, so this is
                # still the subscription that started after the viewer was registered.
                routed = routed if routed is not None else state.subscribed_at
            if after is None:
                viewer.start_with_snapshot(snapshot)
            else:
                outcome = await viewer.start_resuming(after, snapshot, routed)
                self.metrics.resumes.labels(outcome).inc()
        except BaseException:
            await self.leave(viewer)
            raise
        return viewer

    async def _subscribe(self, team: str, state: _TeamState, cursor: str) -> None:
        # Set before `add` returns: a backend may deliver the team's first batches while `add`
        # is still awaiting, and `_route` drops batches of teams without a cursor.
        state.cursor = state.subscribed_at = cursor
        state.key = self.backend.cursor_key(cursor)
        state.repeats = RepeatFilter(state.counts.rejected)
        try:
            await self.subscription.add(team, cursor)
        except BaseException:
            state.cursor = None
            with contextlib.suppress(Exception):
                await self.subscription.remove(team)
            raise

    async def leave(self, viewer: Viewer) -> None:
        """Forget `viewer`; the team is unsubscribed when its last viewer here leaves."""
        await viewer.close()
        state = self._teams.get(viewer.team)
        if state is None:
            return
        state.viewers.discard(viewer)
        self._count_viewers(viewer.team, state)
        async with state.lock:
            if not state.viewers and state.cursor is not None:
                state.cursor = None
                if self._subscription is not None:
                    try:
                        await self._subscription.remove(viewer.team)
                    except Exception as error:
                        # The team is out of the subscription's set already; at worst its
                        # reader wakes late. Leaving must not fail a viewer's clean-up.
                        log.warning("unsubscribing team %s: %s", viewer.team, error)

    def _count_viewers(self, team: str, state: _TeamState) -> None:
        self.metrics.viewers.labels(team).set(len(state.viewers))

    async def _dispatch(self) -> None:
        backoff = Backoff()
        resubscribe = False
        while True:
            try:
                if resubscribe:
                    await self._resubscribe()
                    resubscribe = False
                async for item in self.subscription:
                    self._route(item)
                    backoff.reset()
                return
            except Exception as error:
                self.metrics.dispatch_failures.inc()
                delay = backoff.next_delay()
                log.warning(
                    "reading the backend failed (%s: %s); resubscribing in %.1fs",
                    type(error).__name__, error, delay,
                )
                resubscribe = True
                await asyncio.sleep(delay)

    async def _resubscribe(self) -> None:
        """A new subscription with every team where the failed one stopped delivering it."""
        failed = self._subscription
        self._subscription = self.backend.subscribe()
        if failed is not None:
            with contextlib.suppress(Exception):
                await failed.close()
        for team, state in list(self._teams.items()):
            async with state.lock:
                if state.cursor is not None:
                    await self.subscription.add(team, state.cursor)

    def _route(self, item: Batch | Gap) -> None:
        state = self._teams.get(item.team)
        if state is None or state.cursor is None:
            return  # unsubscribed meanwhile: "batches already queued may still come out"
        key: CursorKey | None = None
        if isinstance(item, Gap):
            self.metrics.backend_gaps.labels(item.team).inc()
            log.warning("history of team %s was trimmed after %s", item.team, item.requested)
        else:
            state.counts.batches += 1
            state.counts.events += count_events(item.raw)
            key = self.backend.cursor_key(item.cursor)
            # Batches queued before an unsubscribe may come out after a resubscribe: never
            # move the resume point back.
            if key > state.key:
                state.cursor, state.key = item.cursor, key
            dropped = state.repeats.dropped
            filtered = state.repeats.filter(item)
            state.counts.repeats += state.repeats.dropped - dropped
            if filtered is None:
                return  # nothing but repeats: the viewers' cursors skip it, as a replay does
            item = filtered
        now = asyncio.get_running_loop().time()
        for viewer in state.viewers:
            viewer.offer(item, key, now)
