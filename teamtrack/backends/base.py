"""The broadcast backend: the one interface that memory, Redis and Kafka implement.

Model: every team has an append-only, bounded log of *batches*. A batch holds the events
(positions and presence changes) of one team that one bridge forwarded in one go. Positions
inside a team's log are identified by an opaque `Cursor` that only ever grows.

Delivery guarantees (every backend passes `tests/backend_contract.py`):

* `publish` returns once the backend holds the events (Redis: the publish script's reply; Kafka: the
  produce acknowledgement with acks=all). Until it returns, the caller must not acknowledge the
  source messages: that is what makes the bridge at-least-once.
* A `TeamSubscription` delivers, for each team it was given, every batch appended after the
  cursor it was given, in log order, each once. Teams can be added and removed while it runs;
  only added teams are read from the backend (interest-based routing).
* If the requested cursor is older than the retained history, the subscription delivers a `Gap`
  for that team first, then continues with the oldest batch still retained.
* `snapshot` returns the last-known position and presence of every worker of a team together with
  the cursor of the newest batch they include: subscribing after that cursor misses nothing.
* A `GroupConsumer` delivers every batch of every team (or of a chosen set) to exactly one member
  of a named group, in log order per team. With acknowledgement on, a batch is delivered again to
  the group after a crash unless acknowledged; with it off, a crash loses what was in flight.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import orjson

from teamtrack.contract import Kind

Cursor = str
"""Opaque position in a team's log; compare only with cursors of the same team and backend."""

START_OF_LOG: Cursor = ""
"""Pass to `TeamSubscription.add` to read a team's whole retained history."""


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted device message, as the bridge forwards it.

    `body` is the validated device payload, byte for byte (a JSON object for positions and
    worker events, the status word for presence), so that mirrors republish exactly what the
    device sent and dashboards embed it in frames without decoding it again. `ts` orders the
    events of one worker for the last-known store: the device fix time of a position, the
    bridge's receive time of a status. Worker events (Kind.EVENT) are logged, never kept in
    the last-known store.
    """

    team: str
    worker: str
    kind: Kind
    body: bytes
    origin: str
    received_ms: int
    ts: int
    qos: int = 0

    def to_json(self) -> bytes:
        """Compact JSON without a generic encoder: ids are slugs and `body` is validated JSON."""
        payload = self.body if self.kind is not Kind.STATUS else b'"' + self.body + b'"'
        return b"".join(
            (
                b'{"w":"', self.worker.encode(),
                b'","k":"', self.kind.value[0].encode(),
                b'","o":"', self.origin.encode(),
                b'","rx":', str(self.received_ms).encode(),
                b',"q":', str(self.qos).encode(),
                b',"p":', payload, b"}",
            )
        )


def encode_events(events: Iterable[Event]) -> bytes:
    return b"[" + b",".join(event.to_json() for event in events) + b"]"


_ORIGIN_FIELD = b'"o":"'


def all_from(raw: bytes, origin: str) -> bool:
    """Whether every event of an encoded batch came in at `origin`, without decoding it.

    Exact for what `encode_events` writes: ids are slugs, device payloads hold numbers (or
    the status word) only, and a worker event's strings are JSON-escaped values of keys other
    than `o`, each followed by `,` or `}`: so `"o":"` appears once per event, as its origin.
    """
    return raw.count(_ORIGIN_FIELD) == raw.count(_ORIGIN_FIELD + origin.encode() + b'"')


_KIND_BY_LETTER = {kind.value[0]: kind for kind in Kind}


def decode_event(team: str, item: dict[str, Any]) -> Event:
    payload = item["p"]
    kind = _KIND_BY_LETTER[item["k"]]
    received_ms = int(item["rx"])
    if kind is not Kind.STATUS:
        body, ts = orjson.dumps(payload), int(payload["ts"])
    else:
        body, ts = str(payload).encode(), received_ms
    return Event(
        team=team,
        worker=item["w"],
        kind=kind,
        body=body,
        origin=item["o"],
        received_ms=received_ms,
        ts=ts,
        qos=int(item.get("q", 0)),
    )


def decode_events(team: str, raw: bytes) -> list[Event]:
    return [decode_event(team, item) for item in orjson.loads(raw)]


def decode_stored_events(
    team: str, entries: Iterable[tuple[str, bytes]]
) -> tuple[dict[str, Event], int]:
    """The last-known store's `(worker, encoded event)` entries as events by worker, and how
    many did not decode. Only a bridge writes there, through `Event.to_json`; an entry anything
    else wrote (a hand-made write to the backend, a worker id that breaks the JSON) is left
    out, so that one bad entry costs its own worker, never the team's whole snapshot."""
    events: dict[str, Event] = {}
    unreadable = 0
    for worker, raw in entries:
        try:
            item = orjson.loads(raw)
            events[worker] = decode_event(team, item)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            unreadable += 1
    return events, unreadable


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one team appended to its log as one entry; `raw` is `encode_events(...)`."""

    team: str
    cursor: Cursor
    raw: bytes

    def events(self) -> list[Event]:
        return decode_events(self.team, self.raw)

    def all_from(self, origin: str) -> bool:
        """Whether every event came in at `origin` (see `all_from`); no decoding."""
        return all_from(self.raw, origin)


@dataclass(frozen=True, slots=True)
class Gap:
    """The history after `requested` was trimmed: some batches of `team` are gone for good."""

    team: str
    requested: Cursor


@dataclass(frozen=True, slots=True)
class Snapshot:
    team: str
    cursor: Cursor
    positions: dict[str, Event] = field(default_factory=dict)
    presence: dict[str, Event] = field(default_factory=dict)
    # Entries of the last-known store that did not decode (nothing a bridge writes): left out.
    unreadable: int = 0


@dataclass(frozen=True, slots=True)
class SessionRevocation:
    """A dashboard session ended before its time (a logout): refused until `expires_at`."""

    session_id: str
    expires_at: int  # epoch seconds, when the session would have expired anyway


class Acknowledgeable(abc.ABC):
    @abc.abstractmethod
    async def ack(self) -> None:
        """Tell the group this batch is done with (no-op when acknowledgement is off)."""


@dataclass(frozen=True, slots=True)
class GroupBatch:
    batch: Batch
    acknowledger: Acknowledgeable

    async def ack(self) -> None:
        await self.acknowledger.ack()


class TeamSubscription(abc.ABC):
    """Batches of a changing set of teams; iterate with `async for`."""

    @abc.abstractmethod
    async def add(self, team: str, after: Cursor) -> None:
        """Deliver `team`'s batches appended after `after` (`START_OF_LOG`: all retained)."""

    @abc.abstractmethod
    async def remove(self, team: str) -> None:
        """Stop delivering `team`; batches already queued for it may still come out."""

    @property
    @abc.abstractmethod
    def teams(self) -> frozenset[str]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def __anext__(self) -> Batch | Gap: ...

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class GroupConsumer(abc.ABC):
    """Batches of all (or chosen) teams, shared among the members of a named group."""

    # Entries of the group's log that the history trimmed before the group read them: lost for
    # every member, counted (and logged) by the member that found out. Stays 0 for backends
    # that cannot tell.
    missed: int = 0

    def set_pace(self, pace_s: float) -> None:  # noqa: B027 (optional, not abstract)
        """Change `pace_s` of `Backend.consume` from now on; a read held by a longer pace goes
        ahead at once when the new one is shorter (an on-demand mirror that found a reader).
        Backends that pace their reads (`ReadPace`) override it."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def __anext__(self) -> GroupBatch: ...

    async def backlog(self) -> int | None:
        """The consumer-group lag in entries (backend batches): those of the group's log not
        yet acknowledged, read or not (Redis: the whole group's, `lag` + `pending` of XINFO
        GROUPS; Kafka: this member's partitions, log end minus committed offset; memory: the
        group's unread and returned ones and this member's unacknowledged ones). None where
        the backend cannot tell (Redis before it can count `lag`)."""
        return None

    async def acknowledge(self, items: Sequence[GroupBatch]) -> None:
        """`ack` each of these batches of this consumer; backends that can do it in one call
        (Redis: one XACK for every settled entry) override this."""
        for item in items:
            await item.ack()

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


GroupStart = Literal["latest", "earliest"]


class ReadPace:
    """`Backend.consume(pace_s=...)` for a backend's group consumer: call `wait` before a
    read and `read` after it."""

    def __init__(self, pace_s: float) -> None:
        self._pace_s = pace_s
        self._hold_until = 0.0
        self._sleeping: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if self._pace_s > 0:
            delay = self._hold_until - time.monotonic()
            if delay > 0:
                loop = asyncio.get_running_loop()
                sleeping = self._sleeping = loop.create_future()
                timer = loop.call_later(delay, _wake, sleeping)
                try:
                    await sleeping
                finally:
                    timer.cancel()
                    self._sleeping = None

    def set(self, pace_s: float) -> None:
        """A new pace; a read held longer than it would now be goes ahead at once."""
        self._pace_s = pace_s
        held_until = time.monotonic() + pace_s
        if self._hold_until > held_until:
            self._hold_until = held_until
            if self._sleeping is not None:
                _wake(self._sleeping)

    def read(self, *, caught_up: bool) -> None:
        """A read came back: with less than it may take (`caught_up`), the next one waits."""
        self._hold_until = time.monotonic() + self._pace_s if caught_up else 0.0


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Backend(abc.ABC):
    """Chosen by URL scheme with `teamtrack.backends.from_url`."""

    # The most revocations one call of `session_revocations` returns; a dashboard catching up
    # calls again.
    revocations_per_read: int = 1000

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and create what the backend needs; raises `BackendError` if unreachable."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def publish(self, events: Sequence[Event]) -> None:
        """Append `events` (any teams, any order) as one batch per team; update last-known."""

    @abc.abstractmethod
    async def snapshot(self, team: str) -> Snapshot: ...

    @abc.abstractmethod
    def subscribe(self) -> TeamSubscription: ...

    @abc.abstractmethod
    def consume(
        self,
        group: str,
        consumer: str,
        *,
        start: GroupStart = "latest",
        acknowledge: bool = True,
        pace_s: float = 0.0,
    ) -> GroupConsumer:
        """A member `consumer` of `group`. `pace_s`: once a read found the member caught up,
        the next read waits until `pace_s` after it, so that batches gather and a consumer
        that favours throughput over latency (the ingest) pays its per-read costs (a round
        trip, a commit) a few times a second instead of once per publish."""

    @abc.abstractmethod
    def cursor_key(self, cursor: Cursor) -> tuple[int, ...]:
        """Sort key of a cursor: of two cursors of one team, the larger key is the later one."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers; used by health checks."""

    @abc.abstractmethod
    async def revoke_session(self, revocation: SessionRevocation, keep_s: float) -> None:
        """Record a revocation for every dashboard instance (`session_revocations`). Entries
        recorded more than `keep_s` ago may be dropped: pass the longest session life, after
        which every session they name has expired anyway."""

    @abc.abstractmethod
    async def session_revocations(self, after: str) -> tuple[list[SessionRevocation], str]:
        """Revocations recorded after the opaque position `after` ("": every one still kept),
        at most `revocations_per_read` per call, and the position to pass next time. Answers
        at once when nothing is new: a dashboard asks every `--revocation-poll-s`."""

    @abc.abstractmethod
    async def forget_worker(self, team: str, worker: str) -> int:
        """Remove `worker`'s last-known position and presence from the store (the tracked
        person's data erased: `teamtrack history erase`); how many entries went (0 to 2).

        Snapshots no longer name the worker. The logs are not touched: their batches age out
        with the log's bound (docs/privacy.md). A later publish of the worker stores it again.
        """

    async def recover_last_known(
        self, load: Callable[[], Awaitable[Sequence[Event]]]
    ) -> int:
        """If the last-known store was lost (a Redis restarted without its data), fill it again
        with `load()` (each worker's newest position and presence, from the history), keeping
        whatever newer a bridge wrote meanwhile; the number of events given back (0 when
        nothing was lost). The logs are not touched: what was lost from them stays lost, and
        readers are told so (a gap).

        This default does nothing: memory's store lives and dies with its only users, Kafka's
        is a replicated topic on disk.
        """
        return 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class BackendError(RuntimeError):
    """The backend could not be reached or refused an operation."""
