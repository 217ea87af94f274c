"""Fan-out of one backend subscription to the viewers connected to this instance.

Interest-based routing: the instance's single `TeamSubscription` holds exactly the teams that
have at least one viewer here, so an instance reads nothing it would throw away.

Joining without gaps or duplicates: a viewer is registered before its snapshot is taken, so a
batch that the hub delivers while the snapshot is in flight is already queued for it. Everything
up to the snapshot's cursor is dropped when frames are built, because the snapshot covers it;
everything after it is sent once, because the viewer remembers the newest cursor it sent.

Slow viewers: each viewer has a bounded queue that the hub fills with `put_nowait`. A viewer
whose queue is full is dropped from the fan-out and told to close (code 4008); the hub and the
other viewers never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from dashboard.frames import count_events, events_frame, gap_frame, snapshot_frame
from dashboard.metrics import DashboardMetrics
from teamtrack.backends import Backend, Batch, Gap, TeamSubscription
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

CLOSE_TOO_SLOW: Final = 4008
CLOSE_TOO_SLOW_REASON: Final = "too slow; resync"
MAX_BATCHES_PER_FRAME: Final = 64
MAX_FRAME_BYTES: Final = 512 * 1024
DEFAULT_QUEUE_BATCHES: Final = 256

CursorKey = tuple[int, ...]


class Viewer:
    """One connected viewer of one team: its queue of batches and the frames built from it.

    Created by `TeamHub.join`; the owner calls `next_frame` in a loop and sends what it returns,
    watches `too_slow`, and calls `TeamHub.leave` when done.
    """

    def __init__(self, hub: TeamHub, team: str, queue_batches: int) -> None:
        self.team = team
        self.too_slow = asyncio.Event()
        self._hub = hub
        self._queue: asyncio.Queue[Batch | Gap] = asyncio.Queue(maxsize=queue_batches)
        self._held: Batch | Gap | None = None
        self._ready_frames: deque[str] = deque()
        # Nothing is sent until the snapshot is known; `None` would let a queued batch through.
        self._sent_key: CursorKey | None = None

    def offer(self, item: Batch | Gap) -> bool:
        """Queue without waiting; False (and `too_slow` set) when the queue is full."""
        if self.too_slow.is_set():
            return False
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.too_slow.set()
            return False
        return True

    def start_after_snapshot(self, frame: str, cursor_key: CursorKey) -> None:
        self._ready_frames.append(frame)
        self._sent_key = cursor_key

    async def next_frame(self) -> str:
        """The next text frame for this viewer: the snapshot first, then live frames.

        Waits for the first batch, then takes whatever else is already queued into the same
        frame: an idle viewer gets each batch at once, a busy one gets fewer, larger frames.
        """
        while not self._ready_frames:
            await self._build_frames()
        return self._ready_frames.popleft()

    async def _take(self) -> Batch | Gap:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return await self._queue.get()

    async def _build_frames(self) -> None:
        first = await self._take()
        if isinstance(first, Gap):
            await self._resync(first)
            return
        batches: list[Batch] = []
        size = 0
        item: Batch | Gap | None = first
        while item is not None:
            if isinstance(item, Gap):
                self._held = item  # its own frames come after this batch's
                break
            if self._is_new(item):
                batches.append(item)
                size += len(item.raw)
            if len(batches) >= MAX_BATCHES_PER_FRAME or size >= MAX_FRAME_BYTES:
                break
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                item = None
        if batches:
            self._ready_frames.append(events_frame(self.team, batches))

    def _is_new(self, batch: Batch) -> bool:
        key = self._hub.backend.cursor_key(batch.cursor)
        if self._sent_key is None or key <= self._sent_key:
            return False
        self._sent_key = key
        return True

    async def _resync(self, gap: Gap) -> None:
        """History the viewer needed is gone: say so, then start over from a fresh snapshot."""
        self._ready_frames.append(gap_frame(self.team, gap.requested))
        snapshot = await self._hub.backend.snapshot(self.team)
        self._ready_frames.append(snapshot_frame(snapshot))
        self._sent_key = self._hub.backend.cursor_key(snapshot.cursor)


@dataclass(eq=False)
class _TeamState:
    viewers: set[Viewer] = field(default_factory=set)
    # Serialises subscribe/unsubscribe decisions and snapshots of one team (see `join`).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Where the subscription reads this team from; None while the team is not subscribed.
    cursor: str | None = None


class TeamHub:
    """One backend reader per instance, fanning each team's batches out to its viewers."""

    def __init__(
        self,
        backend: Backend,
        metrics: DashboardMetrics,
        *,
        queue_batches: int = DEFAULT_QUEUE_BATCHES,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self._queue_batches = queue_batches
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

    async def join(self, team: str) -> Viewer:
        """A viewer of `team` whose first frame is a snapshot; raises `BackendError`."""
        state = self._teams.setdefault(team, _TeamState())
        viewer = Viewer(self, team, self._queue_batches)
        # Registered first: batches delivered while the snapshot is taken are already queued.
        state.viewers.add(viewer)
        self._count_viewers(team, state)
        try:
            # Under the team's lock the snapshot is never older than the cursor the team was
            # subscribed at, so every batch after the snapshot reaches this viewer.
            async with state.lock:
                snapshot = await self.backend.snapshot(team)
                if state.cursor is None:
                    await self._subscribe(team, state, snapshot.cursor)
        except BaseException:
            await self.leave(viewer)
            raise
        viewer.start_after_snapshot(
            snapshot_frame(snapshot), self.backend.cursor_key(snapshot.cursor)
        )
        return viewer

    async def _subscribe(self, team: str, state: _TeamState, cursor: str) -> None:
        # Set before `add` returns: a backend may deliver the team's first batches while `add`
        # is still awaiting, and `_route` drops batches of teams without a cursor.
        state.cursor = cursor
        try:
            await self.subscription.add(team, cursor)
        except BaseException:
            state.cursor = None
            with contextlib.suppress(Exception):
                await self.subscription.remove(team)
            raise

    async def leave(self, viewer: Viewer) -> None:
        """Forget `viewer`; the team is unsubscribed when its last viewer here leaves."""
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
        if isinstance(item, Gap):
            self.metrics.backend_gaps.labels(item.team).inc()
            log.warning("history of team %s was trimmed after %s", item.team, item.requested)
        else:
            self.metrics.backend_batches.labels(item.team).inc()
            self.metrics.backend_events.labels(item.team).inc(count_events(item.raw))
            # Batches queued before an unsubscribe may come out after a resubscribe: never
            # move the resume point back.
            if self.backend.cursor_key(item.cursor) > self.backend.cursor_key(state.cursor):
                state.cursor = item.cursor
        slow = [viewer for viewer in state.viewers if not viewer.offer(item)]
        for viewer in slow:
            state.viewers.discard(viewer)
            self.metrics.viewers_disconnected_slow.inc()
        if slow:
            self._count_viewers(item.team, state)
            log.info("dropped %d slow viewer(s) of team %s", len(slow), item.team)
