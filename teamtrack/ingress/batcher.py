"""Hands accepted events to the backend in batches, with one publish in flight at a time.

While a publish is in flight, new events gather into the next batch, so the batch size follows
the load: one event when idle (lowest latency), thousands under a burst (fewest round trips).
One publish at a time also keeps the backend's order equal to the order of arrival.

Publishes start at most once per `min_interval` on average: when the round trip is shorter
than that (a fast backend under a steady load), the next batch waits and takes in what arrives
meanwhile, so the per-batch cost (a round trip, the backend's work per entry, one wake-up of
every reader) stays bounded whatever the rate. The pace is a token bucket of `BURST` publishes:
at low rates (two devices' messages a millisecond apart, a few hundred a second) nothing waits;
under a steady load it is one publish per `min_interval`, as before. A full batch never waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry, Histogram

from teamtrack.backends import BackendError, Event
from teamtrack.metrics import LAG_BUCKETS
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

# Publishes that may start back to back before the pace of `min_interval` applies.
BURST = 2.0

Publish = Callable[[Sequence[Event]], Awaitable[None]]
# Called once per accepted publish with its events and the backend's round trip in seconds.
BatchObserver = Callable[[Sequence[Event], float], None]


class Batcher:
    def __init__(
        self,
        publish: Publish,
        *,
        max_batch: int,
        max_pending: int,
        on_batch: BatchObserver | None = None,
        on_backend_error: Callable[[], None] | None = None,
        min_interval: float = 0.0,
    ) -> None:
        self._publish = publish
        self._max_batch = max_batch
        self._min_interval = min_interval
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
        # Resolved early when a full batch is waiting out the interval.
        self._full: asyncio.Future[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._events)

    @property
    def idle(self) -> bool:
        """True when everything queued so far has reached the backend."""
        return self._idle.is_set()

    def offer(self, event: Event) -> bool:
        """Queue an event nobody waits for (QoS 0); False when the buffer is full."""
        if len(self._events) >= self._max_pending:
            return False
        self._append(event, None)
        return True

    async def submit(self, event: Event) -> None:
        """Queue an event and return once the backend holds it (QoS 1: then it may be acked)."""
        await self.wait_for_room()
        await self.submit_nowait(event)

    async def wait_for_room(self) -> None:
        """Until fewer than `max_pending` events wait for the backend (a reader that can hold
        its sender back, an HTTP stream, stops reading meanwhile)."""
        while len(self._events) >= self._max_pending:
            self._has_room.clear()
            await self._has_room.wait()

    def submit_nowait(self, event: Event) -> asyncio.Future[None]:
        """Queue an event whatever the bound; the future is done once the backend holds it.

        For messages whose sender holds them until then (QoS 1 awaiting its PUBACK): the
        sender's window (the MQTT receive maximum) bounds how many of these there are.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._append(event, done)
        return done

    def _append(self, event: Event, waiter: asyncio.Future[None] | None) -> None:
        self._events.append(event)
        self._waiters.append(waiter)
        self._idle.clear()
        self._has_events.set()
        full = self._full
        if full is not None and len(self._events) >= self._max_batch and not full.done():
            full.set_result(None)

    async def wait_idle(self) -> None:
        """Until everything queued so far has reached the backend."""
        await self._idle.wait()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._min_interval
        tokens, refilled = BURST, loop.time()
        while True:
            await self._has_events.wait()
            # Let the messages of the same socket read queue up behind the first one.
            await asyncio.sleep(0)
            while self._events:
                if interval > 0:
                    now = loop.time()
                    tokens = min(BURST, tokens + (now - refilled) / interval)
                    refilled = now
                    if tokens < 1 and len(self._events) < self._max_batch:
                        await self._gather_for((1 - tokens) * interval)
                        now = loop.time()
                        tokens = min(BURST, tokens + (now - refilled) / interval)
                        refilled = now
                    tokens = max(tokens - 1, 0.0)
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

    async def _gather_for(self, seconds: float) -> None:
        """Let events gather for `seconds`, or until a full batch is waiting."""
        loop = asyncio.get_running_loop()
        full: asyncio.Future[None] = loop.create_future()
        self._full = full
        timer = loop.call_later(seconds, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None

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
                self._on_batch(events, time.perf_counter() - started)
            return


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class BatchMetrics:
    """What a way in's publishes look like: events per publish, the backend's round trip and
    the lag, as `{prefix}_batch_size`, `{prefix}_publish_seconds` and `{prefix}_lag_seconds`
    labelled `label=value`; pass `observe` as a Batcher's `on_batch`.

    The lag is one sample per publish: from the receipt of its oldest event (the batch's first,
    `Event.received_ms`, this process's clock) to the backend accepting the batch. It covers the
    wait in the batcher's queue and the publish; a backend that slows down shows here first.
    """

    def __init__(
        self, registry: CollectorRegistry, prefix: str, label: str, value: str
    ) -> None:
        self._sizes = Histogram(
            f"{prefix}_batch_size", "Events per backend publish", [label],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=registry,
        ).labels(value)
        self._seconds = Histogram(
            f"{prefix}_publish_seconds", "Backend publish round trip", [label],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
            registry=registry,
        ).labels(value)
        self._lag = Histogram(
            f"{prefix}_lag_seconds",
            "Receipt of a batch's oldest event to the backend accepting the batch (one sample"
            " per publish)", [label],
            buckets=LAG_BUCKETS,
            registry=registry,
        ).labels(value)

    def observe(self, events: Sequence[Event], seconds: float) -> None:
        self._sizes.observe(len(events))
        self._seconds.observe(seconds)
        if events:
            # Same host, same clock; a clock stepped back reads as 0, not as a negative lag.
            self._lag.observe(max(time.time() - events[0].received_ms / 1000, 0.0))
