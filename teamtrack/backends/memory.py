"""`memory://` — everything in one process: single-process mode and the demo without Redis.

Each team's log is a bounded deque of batches numbered from 1; a subscription keeps one cursor
per team and reads the deques when woken, so a slow reader never makes the log grow.
Query options: `memory://?history=10000` (batches kept per team and in the group log).

Consumer groups: a batch goes to one member; with acknowledgement on, a member that closes
without acknowledging hands its unacknowledged batches back to its group, which delivers them
to the next member that reads. That is the in-process form of "redelivered after a crash": the
memory backend itself cannot outlive a crash of its process, so nothing else is kept.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

from teamtrack.backends.base import (
    START_OF_LOG,
    Acknowledgeable,
    Backend,
    Batch,
    Cursor,
    Event,
    Gap,
    GroupBatch,
    GroupConsumer,
    GroupStart,
    ReadPace,
    SessionRevocation,
    Snapshot,
    TeamSubscription,
    encode_events,
)
from teamtrack.contract import Kind

DEFAULT_HISTORY = 10_000


class _Log:
    """A bounded, numbered sequence of batches; numbers start at 1 and never repeat."""

    def __init__(self, capacity: int) -> None:
        self.entries: deque[tuple[int, Batch]] = deque(maxlen=capacity)
        self.last_number = 0

    def append(self, team: str, raw: bytes) -> Batch:
        self.last_number += 1
        batch = Batch(team, str(self.last_number), raw)
        self.entries.append((self.last_number, batch))
        return batch

    def oldest_number(self) -> int:
        return self.entries[0][0] if self.entries else self.last_number + 1

    def after(self, number: int) -> list[tuple[int, Batch]]:
        if not self.entries or number >= self.last_number:
            return []
        skip = max(0, number - self.entries[0][0] + 1)
        return list(itertools.islice(self.entries, skip, None))


def _number(cursor: Cursor) -> int:
    return int(cursor) if cursor else 0


class MemoryBackend(Backend):
    def __init__(self, history: int = DEFAULT_HISTORY) -> None:
        self.history = history
        self._team_logs: dict[str, _Log] = defaultdict(lambda: _Log(history))
        self._group_log = _Log(history)
        self._positions: dict[str, dict[str, Event]] = defaultdict(dict)
        self._presence: dict[str, dict[str, Event]] = defaultdict(dict)
        self._group_positions: dict[str, int] = {}
        self._group_returned: dict[str, deque[Batch]] = defaultdict(deque)
        self._appended = asyncio.Condition()
        # (number, revocation), numbered from 1; expired ones are dropped on every write.
        self._revocations: deque[tuple[int, SessionRevocation]] = deque()
        self._revocation_number = 0

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        query = parse_qs(urlsplit(url).query)
        return cls(history=int(query.get("history", [DEFAULT_HISTORY])[0]))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    def cursor_key(self, cursor: Cursor) -> tuple[int, ...]:
        return (_number(cursor),)

    async def revoke_session(self, revocation: SessionRevocation, keep_s: float) -> None:
        now = time.time()
        self._revocations = deque(
            entry for entry in self._revocations if entry[1].expires_at > now
        )
        self._revocation_number += 1
        self._revocations.append((self._revocation_number, revocation))

    async def session_revocations(self, after: str) -> tuple[list[SessionRevocation], str]:
        number = int(after) if after else 0
        found = [
            (seen, revocation) for seen, revocation in self._revocations if seen > number
        ][: self.revocations_per_read]
        if not found:
            return [], str(self._revocation_number)
        return [revocation for _seen, revocation in found], str(found[-1][0])

    async def publish(self, events: Sequence[Event]) -> None:
        by_team: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_team[event.team].append(event)
            if event.kind is Kind.EVENT:
                continue  # logged only: no last-known worker event
            store = self._positions if event.kind is Kind.POSITION else self._presence
            previous = store[event.team].get(event.worker)
            if previous is None or previous.ts <= event.ts:
                store[event.team][event.worker] = event
        for team, team_events in by_team.items():
            batch = self._team_logs[team].append(team, encode_events(team_events))
            self._group_log.append(team, batch.raw)
        async with self._appended:
            self._appended.notify_all()

    async def snapshot(self, team: str) -> Snapshot:
        log = self._team_logs.get(team)
        return Snapshot(
            team=team,
            cursor=str(log.last_number) if log else "0",
            positions=dict(self._positions.get(team, {})),
            presence=dict(self._presence.get(team, {})),
        )

    async def forget_worker(self, team: str, worker: str) -> int:
        return sum(
            store.get(team, {}).pop(worker, None) is not None
            for store in (self._positions, self._presence)
        )

    def subscribe(self) -> TeamSubscription:
        return _MemorySubscription(self)

    def consume(
        self,
        group: str,
        consumer: str,
        *,
        start: GroupStart = "latest",
        acknowledge: bool = True,
        pace_s: float = 0.0,
    ) -> GroupConsumer:
        if group not in self._group_positions:
            self._group_positions[group] = (
                self._group_log.last_number
                if start == "latest"
                else self._group_log.oldest_number() - 1
            )
        return _MemoryGroupConsumer(self, group, acknowledge, pace_s)

    async def wait_for_append(self) -> None:
        async with self._appended:
            await self._appended.wait()


class _MemorySubscription(TeamSubscription):
    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend
        self._positions: dict[str, int] = {}
        self._ready: deque[Batch | Gap] = deque()
        self._closed = False

    @property
    def teams(self) -> frozenset[str]:
        return frozenset(self._positions)

    async def add(self, team: str, after: Cursor) -> None:
        log = self._backend._team_logs[team]
        number = _number(after) if after != START_OF_LOG else log.oldest_number() - 1
        if number < log.oldest_number() - 1:
            self._ready.append(Gap(team, after))
            number = log.oldest_number() - 1
        self._positions[team] = number
        async with self._backend._appended:
            self._backend._appended.notify_all()

    async def remove(self, team: str) -> None:
        self._positions.pop(team, None)

    async def close(self) -> None:
        self._closed = True
        async with self._backend._appended:
            self._backend._appended.notify_all()

    def _collect(self) -> None:
        for team, number in list(self._positions.items()):
            for entry_number, batch in self._backend._team_logs[team].after(number):
                self._ready.append(batch)
                self._positions[team] = entry_number

    async def __anext__(self) -> Batch | Gap:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if not self._ready:
                self._collect()
            if self._ready:
                return self._ready.popleft()
            await self._backend.wait_for_append()


class _NoAck(Acknowledgeable):
    async def ack(self) -> None:
        return None


class _MemberAck(Acknowledgeable):
    def __init__(self, member: _MemoryGroupConsumer, batch: Batch) -> None:
        self._member = member
        self._batch = batch

    async def ack(self) -> None:
        self._member._unacknowledged.pop(id(self._batch), None)


class _MemoryGroupConsumer(GroupConsumer):
    """Members of a group share one position, so each batch goes to exactly one of them."""

    def __init__(
        self, backend: MemoryBackend, group: str, acknowledge: bool, pace_s: float
    ) -> None:
        self._backend = backend
        self._group = group
        self._acknowledge = acknowledge
        # A "read" here is taking the next batch; the one that empties the log is caught up.
        self._pace = ReadPace(pace_s)
        self._unacknowledged: dict[int, Batch] = {}
        self._closed = False

    def set_pace(self, pace_s: float) -> None:
        self._pace.set(pace_s)

    async def backlog(self) -> int | None:
        log = self._backend._group_log
        position = max(self._backend._group_positions[self._group], log.oldest_number() - 1)
        return (len(log.after(position)) + len(self._backend._group_returned[self._group])
                + len(self._unacknowledged))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Delivered but never acknowledged: back to the group, in the order they were given out.
        self._backend._group_returned[self._group].extend(self._unacknowledged.values())
        self._unacknowledged.clear()
        async with self._backend._appended:
            self._backend._appended.notify_all()

    def _hand_out(self, batch: Batch) -> GroupBatch:
        if not self._acknowledge:
            return GroupBatch(batch, _NoAck())
        self._unacknowledged[id(batch)] = batch
        return GroupBatch(batch, _MemberAck(self, batch))

    async def __anext__(self) -> GroupBatch:
        log = self._backend._group_log
        returned = self._backend._group_returned[self._group]
        while True:
            if self._closed:
                raise StopAsyncIteration
            if returned:
                return self._hand_out(returned.popleft())
            await self._pace.wait()
            position = max(self._backend._group_positions[self._group], log.oldest_number() - 1)
            pending = log.after(position)
            if pending:
                number, batch = pending[0]
                self._backend._group_positions[self._group] = number
                self._pace.read(caught_up=len(pending) == 1)
                return self._hand_out(batch)
            await self._backend.wait_for_append()
