"""Readers over several shards (a Redis Cluster, `redis_layout`): one blocking reader per shard,
their output merged into one bounded queue.

A blocking XREAD or XREADGROUP reads streams of one hash slot only, so a subscription runs one
`RedisSubscription` per shard that has teams in it (opened when its first team is added), and
a group member one `RedisGroupConsumer` per shard (each shard's part of the all-teams feed has
its own consumer group of the same name). A team lives in one shard, so its batches keep their
order; batches of teams of different shards interleave as they come.

Each shard's reader is drained by a task into a queue of `QUEUE_SIZE` items: a task whose
queue is full waits, and so does its reader (nothing grows without bound). A batch a group
member's task took but the member never handed out is not acknowledged: after a crash it is
delivered again, like any unacknowledged batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from teamtrack.backends.base import (
    Batch,
    Cursor,
    Gap,
    GroupBatch,
    GroupConsumer,
    GroupStart,
    TeamSubscription,
)
from teamtrack.backends.redis_readers import (
    RedisGroupConsumer,
    RedisSubscription,
    entry_acknowledger_consumer,
)

if TYPE_CHECKING:
    from teamtrack.backends.redis import RedisBackend

QUEUE_SIZE = 1000

Item = TypeVar("Item")


class _Merge(Generic[Item]):
    """Tasks draining async iterators into one bounded queue; their errors come out too."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Item | BaseException] = asyncio.Queue(QUEUE_SIZE)
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def drain(self, source: AsyncIterator[Item], name: str) -> None:
        self._tasks.append(asyncio.create_task(self._pump(source), name=name))

    async def _pump(self, source: AsyncIterator[Item]) -> None:
        try:
            async for item in source:
                await self._queue.put(item)
        except Exception as error:
            await self._queue.put(error)

    async def next(self) -> Item:
        if self.closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, StopAsyncIteration):
            self._queue.put_nowait(item)  # for whoever waits next
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """Stop the tasks; whoever waits in `next` gets StopAsyncIteration. What was queued
        is dropped (a group member's: unacknowledged, so delivered again later)."""
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(StopAsyncIteration())


class ShardedSubscription(TeamSubscription):
    """A `TeamSubscription` over every shard its teams are in."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._shards: dict[int, RedisSubscription] = {}
        self._merge: _Merge[Batch | Gap] = _Merge()

    @property
    def teams(self) -> frozenset[str]:
        return frozenset().union(*(shard.teams for shard in self._shards.values()))

    async def add(self, team: str, after: Cursor) -> None:
        shard = self._backend.layout.shard_of(team)
        subscription = self._shards.get(shard)
        if subscription is None:
            subscription = self._shards[shard] = RedisSubscription(self._backend, shard)
            self._merge.drain(subscription, f"redis-read-shard-{shard}")
        await subscription.add(team, after)

    async def remove(self, team: str) -> None:
        subscription = self._shards.get(self._backend.layout.shard_of(team))
        if subscription is not None:
            await subscription.remove(team)

    async def close(self) -> None:
        await self._merge.close()
        for subscription in self._shards.values():
            await subscription.close()

    async def __anext__(self) -> Batch | Gap:
        return await self._merge.next()


class ShardedGroupConsumer(GroupConsumer):
    """A member of a consumer group over every shard of the all-teams feed."""

    def __init__(
        self,
        backend: RedisBackend,
        group: str,
        consumer: str,
        *,
        start: GroupStart,
        acknowledge: bool,
        pace_s: float = 0.0,
    ) -> None:
        self._members = [
            RedisGroupConsumer(backend, shard, group, consumer, start=start,
                               acknowledge=acknowledge, pace_s=pace_s)
            for shard in range(backend.layout.shards)
        ]
        self._merge: _Merge[GroupBatch] = _Merge()
        self._started = False

    @property
    def missed(self) -> int:  # type: ignore[override]  # the members count; read the sum
        return sum(member.missed for member in self._members)

    def set_pace(self, pace_s: float) -> None:
        for member in self._members:
            member.set_pace(pace_s)

    async def backlog(self) -> int | None:
        total = 0
        for member in self._members:
            count = await member.backlog()
            if count is None:
                return None
            total += count
        return total

    async def acknowledge(self, items: Sequence[GroupBatch]) -> None:
        by_member: dict[int, list[GroupBatch]] = {}
        for item in items:
            member = entry_acknowledger_consumer(item)
            if member is not None:
                by_member.setdefault(id(member), []).append(item)
        for member in self._members:
            settled = by_member.get(id(member))
            if settled:
                await member.acknowledge(settled)

    async def close(self) -> None:
        await self._merge.close()
        for member in self._members:
            await member.close()

    async def __anext__(self) -> GroupBatch:
        if not self._started:
            self._started = True
            for shard, member in enumerate(self._members):
                self._merge.drain(member, f"redis-group-read-shard-{shard}")
        return await self._merge.next()
