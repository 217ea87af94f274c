"""Hands accepted events to the backend in batches, with one publish in flight at a time.

While a publish is in flight, new events gather into the next batch, so the batch size follows
the load: one event when idle (lowest latency), thousands under a burst (fewest round trips).
One publish at a time also keeps the backend's order equal to the order of arrival.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from teamtrack.backends import BackendError, Event
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Event]], Awaitable[None]]
BatchObserver = Callable[[int, float], None]


class Batcher:
    def __init__(
        self,
        publish: Publish,
        *,
        max_batch: int,
        max_pending: int,
        on_batch: BatchObserver | None = None,
        on_backend_error: Callable[[], None] | None = None,
    ) -> None:
        self._publish = publish
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._on_batch = on_batch
        self._on_backend_error = on_backend_error
        self._events: list[Event] = []
        # One future per QoS 1 event (None for QoS 0), resolved once its batch is published.
        self._waiters: list[asyncio.Future[None] | None] = []
        self._has_events = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return len(self._events)

    def offer(self, event: Event) -> bool:
        """Queue an event nobody waits for (QoS 0); False when the buffer is full."""
        if len(self._events) >= self._max_pending:
            return False
        self._append(event, None)
        return True

    async def submit(self, event: Event) -> None:
        """Queue an event and return once the backend holds it (QoS 1: then it may be acked)."""
        while len(self._events) >= self._max_pending:
            self._has_room.clear()
            await self._has_room.wait()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._append(event, done)
        await done

    def _append(self, event: Event, waiter: asyncio.Future[None] | None) -> None:
        self._events.append(event)
        self._waiters.append(waiter)
        self._idle.clear()
        self._has_events.set()

    async def wait_idle(self) -> None:
        """Until everything queued so far has reached the backend."""
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._has_events.wait()
            # Let the messages of the same socket read queue up behind the first one.
            await asyncio.sleep(0)
            while self._events:
                events = self._events[: self._max_batch]
                waiters = self._waiters[: self._max_batch]
                del self._events[: self._max_batch]
                del self._waiters[: self._max_batch]
                self._has_room.set()
                await self._publish_until_accepted(events)
                for waiter in waiters:
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
            self._has_events.clear()
            self._idle.set()

    async def _publish_until_accepted(self, events: list[Event]) -> None:
        backoff = Backoff(maximum=5.0)
        while True:
            started = time.perf_counter()
            try:
                await self._publish(events)
            except BackendError as error:
                if self._on_backend_error is not None:
                    self._on_backend_error()
                delay = backoff.next_delay()
                log.warning(
                    "backend refused a batch of %d events (%s); retrying in %.1fs",
                    len(events), error, delay,
                )
                await asyncio.sleep(delay)
                continue
            if self._on_batch is not None:
                self._on_batch(len(events), time.perf_counter() - started)
            return
