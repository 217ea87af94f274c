"""The Redis backend's stream readers: blocking connections of their own, team subscriptions
(XREAD over the teams' logs) and consumer group members (XREADGROUP on `tt:all`).

Each reads one shard (`redis_layout`): on one server the only one; on a cluster,
`redis_shards` runs one per shard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from teamtrack.backends.base import (
    START_OF_LOG,
    Acknowledgeable,
    BackendError,
    Batch,
    Cursor,
    Gap,
    GroupBatch,
    GroupConsumer,
    GroupStart,
    ReadPace,
    TeamSubscription,
)
from teamtrack.backends.redis_common import (
    BLOCK_MS,
    GROUP_READ_COUNT,
    MISSED_CHECK_AFTER_S,
    READ_COUNT,
    broken_chain,
    entry_field,
    entry_pairs,
    execute_packed,
    packed_command,
    stream_entries,
    stream_id,
)
from teamtrack.backends.redis_connect import (
    raise_if_cancelled,
)
from teamtrack.retry import Backoff

if TYPE_CHECKING:
    from teamtrack.backends.redis import RedisBackend

log = logging.getLogger(__name__)


class BlockingReader:
    """A connection of its own for blocking reads, dropped and re-opened with backoff on errors."""

    def __init__(self, backend: RedisBackend, what: str, shard: int = 0) -> None:
        self.backend = backend
        self.what = what
        self.shard = shard
        self.connection: aioredis.Redis | None = None
        self._backoff = Backoff()

    async def open(self) -> tuple[aioredis.Redis, bool]:
        """The connection, and whether it was just opened."""
        if self.connection is not None:
            return self.connection, False
        self.connection = await self.backend.reader_client(self.shard)
        return self.connection, True

    async def read_until(
        self, read: Callable[[], Awaitable[None]], has_items: Callable[[], bool],
        closed: Callable[[], bool],
    ) -> None:
        """Call `read` until it produced items; raise StopAsyncIteration once closed."""
        while not has_items():
            if closed():
                raise StopAsyncIteration
            raise_if_cancelled()
            try:
                await read()
                self._backoff.reset()
            except (RedisError, BackendError) as error:
                delay = self._backoff.next_delay()
                log.warning("redis %s failed (%s); retrying in %.1fs", self.what, error, delay)
                await self.close()
                self.backend.reader_failed()
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(RedisError):
                await self.connection.aclose()
            self.connection = None


class RedisSubscription(TeamSubscription):
    """One blocking XREAD over all the teams of interest, woken when that set changes."""

    def __init__(self, backend: RedisBackend, shard: int) -> None:
        self._backend = backend
        self._cursors: dict[str, Cursor] = {}
        self._wake_key = backend.layout.wake_key(shard, uuid.uuid4().hex)
        self._wake_cursor = "$"
        self._ready: deque[Batch | Gap] = deque()
        self._reader = BlockingReader(backend, "read", shard)
        self._closed = False

    @property
    def teams(self) -> frozenset[str]:
        return frozenset(self._cursors)

    async def add(self, team: str, after: Cursor) -> None:
        if after == START_OF_LOG:
            after = "0-0"
        elif await self._backend.trimmed_after(team, after):
            self._ready.append(Gap(team, after))
            # Every entry still there is after the cursor: read them all, and the gap is told.
            after = "0-0"
        self._cursors[team] = after
        await self._wake()

    async def remove(self, team: str) -> None:
        if self._cursors.pop(team, None) is not None:
            await self._wake()

    async def _wake(self) -> None:
        if self._reader.connection is None:
            return
        pipe = self._backend.client.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"w": b"1"}, maxlen=1, approximate=False)
        pipe.expire(self._wake_key, 3600)
        try:
            await pipe.execute()
        except RedisError as error:
            # The reader is then failing too; it re-reads the new team set when it recovers.
            raise BackendError(f"waking the redis reader failed: {error}") from error

    async def close(self) -> None:
        self._closed = True
        if self._reader.connection is not None:
            with contextlib.suppress(RedisError):
                await self._backend.client.delete(self._wake_key)
        await self._reader.close()

    async def _read(self) -> None:
        connection, fresh = await self._reader.open()
        if fresh or self._wake_cursor == "$":
            # Resolve '$' once so that a wake-up written between two reads is not missed.
            newest: Any = await connection.xrevrange(self._wake_key, count=1)
            self._wake_cursor = newest[0][0].decode() if newest else "0-0"
        wake_key = self._wake_key.encode()
        keys = [wake_key]
        cursors = [self._wake_cursor.encode()]
        keys_to_team: dict[bytes, str] = {}
        for team, cursor in self._cursors.items():
            key = self._backend.log_key_bytes(team)
            keys.append(key)
            cursors.append(cursor.encode())
            keys_to_team[key] = team
        reply = await execute_packed(
            connection,
            packed_command([b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"BLOCK", b"%d" % BLOCK_MS,
                      b"STREAMS", *keys, *cursors]),
        )
        for key, entries in stream_entries(reply):
            if key == wake_key:
                self._wake_cursor = entries[-1][0].decode()
                continue
            team = keys_to_team[key]
            if team not in self._cursors:
                continue
            for entry_id, fields in entries:
                cursor = entry_id.decode()
                previous = self._cursors[team]
                self._cursors[team] = cursor
                if broken_chain(previous, entry_field(fields, b"p")):
                    self._ready.append(Gap(team, previous))
                raw = entry_field(fields, b"b")
                if raw is not None:
                    self._ready.append(Batch(team, cursor, raw))

    async def __anext__(self) -> Batch | Gap:
        await self._reader.read_until(self._read, lambda: bool(self._ready), lambda: self._closed)
        return self._ready.popleft()


class _EntryAcknowledger(Acknowledgeable):
    """XACKs a `tt:all` entry once every team batch cut from it has been acknowledged."""

    def __init__(self, consumer: RedisGroupConsumer, entry_id: bytes, parts: int) -> None:
        self.consumer = consumer
        self._entry_id = entry_id
        self._remaining = parts

    async def ack(self) -> None:
        entry_id = self.settle()
        if entry_id is not None:
            await self.consumer.ack(entry_id)

    def settle(self) -> bytes | None:
        """Count one team batch as done; the entry's id once all of them are."""
        self._remaining -= 1
        return self._entry_id if self._remaining == 0 else None


def entry_acknowledger_consumer(item: GroupBatch) -> RedisGroupConsumer | None:
    """The member that settles `item` (None for a batch consumed without acknowledgement)."""
    acknowledger = item.acknowledger
    return acknowledger.consumer if isinstance(acknowledger, _EntryAcknowledger) else None


class _NoAck(Acknowledgeable):
    async def ack(self) -> None:
        return None


class RedisGroupConsumer(GroupConsumer):
    """XREADGROUP on the all-teams stream; with acknowledgement, pending entries come back.

    Order of reads: first this member's own pending entries (`XREADGROUP ... 0`, once: they
    are what a previous process of the same name received and never acknowledged), then, every
    half `claim_idle_ms`, entries of any member idle longer than that (XAUTOCLAIM), then new
    entries (`>`). An entry may therefore be delivered more than once; consumers that
    acknowledge must be idempotent, which is what at-least-once means.
    """

    def __init__(
        self,
        backend: RedisBackend,
        shard: int,
        group: str,
        consumer: str,
        *,
        start: GroupStart,
        acknowledge: bool,
        pace_s: float = 0.0,
    ) -> None:
        self._backend = backend
        self._feed_key = backend.layout.feed_key(shard)
        self._group = group
        self._pace = ReadPace(pace_s)
        self._consumer = consumer
        self._start_id = "$" if start == "latest" else "0"
        self._acknowledge = acknowledge
        self._reader = BlockingReader(backend, "group read", shard)
        self._ready: deque[GroupBatch] = deque()
        self._closed = False
        self._claim_idle_ms = backend.claim_idle_ms if acknowledge else 0
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0
        # None once this member's own pending entries have all been read again.
        self._own_pending_after: str | None = "0" if acknowledge else None
        # Handed out and not yet acknowledged: a sweep that claims one of these (a slow write
        # let it idle) only refreshes its idle time; it is not handed out a second time.
        self._in_flight: set[bytes] = set()
        # When the group may have fallen out of the history's window: at the first read, after
        # a full read (behind), after a pause (a paced or blocked reader).
        self._last_read_at = -math.inf
        self._behind = True
        self.missed = 0

    def set_pace(self, pace_s: float) -> None:
        self._pace.set(pace_s)

    async def _ensure_group(self, reader: aioredis.Redis) -> None:
        # The group's read count starts at what it skips (everything, or what was trimmed
        # already), so that `_count_missed` can count what is trimmed from under it later.
        # "Latest" is the newest id of that same reply rather than `$`, which keeps the two
        # consistent whatever is published in between.
        start_id, skipped = self._start_id, None
        with contextlib.suppress(ResponseError):  # no stream yet: nothing skipped
            stream: Any = await reader.xinfo_stream(self._feed_key)
            if start_id == "$":
                start_id, skipped = stream["last-generated-id"], stream["entries-added"]
            else:
                skipped = stream["entries-added"] - stream["length"]
        try:
            await reader.xgroup_create(
                self._feed_key, self._group, id=start_id, mkstream=True,
                entries_read=skipped,
            )
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def backlog(self) -> int | None:
        try:
            groups: Any = await self._backend.client.xinfo_groups(self._feed_key)
        except ResponseError:
            return None  # no stream yet
        group = next((g for g in groups if g["name"].decode() == self._group), None)
        if group is None or group.get("lag") is None:
            return None
        return int(group["lag"]) + int(group.get("pending") or 0)

    async def ack(self, entry_id: bytes) -> None:
        self._in_flight.discard(entry_id)
        await self._backend.client.xack(self._feed_key, self._group, entry_id)

    async def acknowledge(self, items: Sequence[GroupBatch]) -> None:
        settled = []
        for item in items:
            acknowledger = item.acknowledger
            if isinstance(acknowledger, _EntryAcknowledger):
                entry_id = acknowledger.settle()
                if entry_id is not None:
                    settled.append(entry_id)
                    self._in_flight.discard(entry_id)
        if settled:
            await self._backend.client.xack(self._feed_key, self._group, *settled)

    async def close(self) -> None:
        self._closed = True
        await self._reader.close()

    async def _read(self) -> None:
        connection, fresh = await self._reader.open()
        if fresh:
            await self._ensure_group(connection)
        if self._own_pending_after is not None:
            await self._read_own_pending(connection, self._own_pending_after)
            return
        if self._claim_idle_ms and time.monotonic() >= self._next_claim_at:
            await self._claim_abandoned(connection)
            if self._ready:
                return
        await self._pace.wait()
        if self._behind or time.monotonic() - self._last_read_at > MISSED_CHECK_AFTER_S:
            await self._count_missed(connection)
        command = [b"XREADGROUP", b"GROUP", self._group.encode(), self._consumer.encode(),
                   b"COUNT", b"%d" % GROUP_READ_COUNT, b"BLOCK", b"%d" % self._block_ms()]
        if not self._acknowledge:
            command.append(b"NOACK")
        command += [b"STREAMS", self._feed_key.encode(), b">"]
        reply = await execute_packed(connection, packed_command(command))
        read = 0
        for _key, entries in stream_entries(reply):
            read += len(entries)
            await self._deliver([(entry_id, entry_pairs(fields)) for entry_id, fields in entries])
        caught_up = read < GROUP_READ_COUNT
        self._pace.read(caught_up=caught_up)
        self._behind = not caught_up
        self._last_read_at = time.monotonic()

    async def _count_missed(self, connection: aioredis.Redis) -> None:
        """Count the entries trimmed before the group read them (the next read skips them).

        If the stream's first entry is newer than the last one delivered to the group, the
        trimming went past the group; how far: entries added, minus read by the group, minus
        what is still in the stream (all of it unread then). Redis keeps the group's read count
        (`entries-read`) from its creation (`_ensure_group` sets it) unless it cannot; then the
        loss cannot be counted. Several members checking at once can each count the same loss.
        """
        all_key = self._feed_key
        pipe = connection.pipeline(transaction=False)
        pipe.xinfo_stream(all_key)
        pipe.xinfo_groups(all_key)
        try:
            stream, groups = await pipe.execute()
        except ResponseError:
            return  # the stream is gone (deleted by hand); the read recreates nothing
        group = next((g for g in groups if g["name"].decode() == self._group), None)
        first = stream.get("first-entry")
        if group is None or not first or group.get("entries-read") is None:
            return
        delivered = group["last-delivered-id"].decode()
        if stream_id(first[0].decode()) <= stream_id(delivered):
            return
        count = stream["entries-added"] - group["entries-read"] - stream["length"]
        if count <= 0:
            return
        self.missed += count
        log.warning(
            "group %s fell out of %s's window: %d entries after %s were trimmed before it read "
            "them; raise group_history_ms (and maxmemory) to ride out longer pauses",
            self._group, all_key, count, delivered,
        )

    def _block_ms(self) -> int:
        if not self._claim_idle_ms:
            return BLOCK_MS
        until_claim = int((self._next_claim_at - time.monotonic()) * 1000)
        return max(1, min(BLOCK_MS, until_claim))

    async def _read_own_pending(self, connection: aioredis.Redis, after: str) -> None:
        reply: Any = await connection.xreadgroup(
            self._group, self._consumer, {self._feed_key: after}, count=GROUP_READ_COUNT
        )
        entries = [entry for _key, key_entries in reply or [] for entry in key_entries]
        if not entries:
            self._own_pending_after = None
            return
        self._own_pending_after = entries[-1][0].decode()
        await self._deliver(entries)

    async def _claim_abandoned(self, connection: aioredis.Redis) -> None:
        """One step of a sweep over the group's pending entries; a sweep ends at `0-0`."""
        reply: Any = await connection.xautoclaim(
            self._feed_key,
            self._group,
            self._consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=GROUP_READ_COUNT,
        )
        self._claim_cursor = reply[0].decode()
        trimmed = reply[2] if len(reply) > 2 else []
        if trimmed:
            log.warning(
                "group %s: %d pending entries were trimmed from %s before being acknowledged",
                self._group, len(trimmed), self._feed_key,
            )
        if self._claim_cursor == "0-0":
            self._next_claim_at = time.monotonic() + self._claim_idle_ms / 2000
        await self._deliver([entry for entry in reply[1] if entry[0] not in self._in_flight])

    async def _deliver(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            if not fields:
                # Pending, but trimmed from the stream: nothing left to deliver, ever.
                log.warning("group %s: pending entry %s was trimmed before being acknowledged",
                            self._group, entry_id.decode())
                await self.ack(entry_id)
                continue
            acknowledger: Acknowledgeable = _NoAck()
            if self._acknowledge:
                acknowledger = _EntryAcknowledger(self, entry_id, len(fields))
                self._in_flight.add(entry_id)
            for team, raw in fields.items():
                batch = Batch(team.decode(), entry_id.decode(), raw)
                self._ready.append(GroupBatch(batch, acknowledger))

    async def __anext__(self) -> GroupBatch:
        await self._reader.read_until(self._read, lambda: bool(self._ready), lambda: self._closed)
        return self._ready.popleft()
