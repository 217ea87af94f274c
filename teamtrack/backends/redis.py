"""`redis://host:port/db` — Redis Streams as the cross-instance broadcast layer.

Keys (prefix `tt`, change with `?prefix=`):

* `tt:log:{team}`   stream, one entry per forwarded batch of the team (field `b`), capped at
  `?history=` entries (approximate trimming). Dashboards XREAD only the teams they serve.
* `tt:all`          stream, one entry per `publish` call (a field per team), capped at
  `?group_history=`; consumer groups (bridge mirrors, ingest) read it.
* `tt:last:{team}` / `tt:last-ts:{team}`          last-known position per worker, and its ts.
* `tt:presence:{team}` / `tt:presence-ts:{team}`  last presence per worker, and its time.

A publish is one MULTI/EXEC round trip whatever the batch size. The last-known hashes are
updated by a Lua script that keeps the newest `ts` per worker, so a redelivered old message
never moves a worker back.

Why streams and not PUBLISH: a stream entry stays readable after it is written, which gives
cursors (stream ids) that a reconnecting viewer resumes from on any instance, and consumer
groups for the mirrors and the ingest.

Consumer groups with acknowledgement deliver again what a member received and never
acknowledged: a member first re-reads its own pending entries (a restart under the same consumer
name), and every member claims entries left pending longer than `?claim_idle_ms=` (XAUTOCLAIM),
which is how the batches of a member that crashed for good reach the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from teamtrack.backends.base import (
    START_OF_LOG,
    Acknowledgeable,
    Backend,
    BackendError,
    Batch,
    Cursor,
    Event,
    Gap,
    GroupBatch,
    GroupConsumer,
    GroupStart,
    Snapshot,
    TeamSubscription,
    decode_event,
    encode_events,
)
from teamtrack.contract import Kind
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 10_000
DEFAULT_GROUP_HISTORY = 100_000
DEFAULT_CLAIM_IDLE_MS = 30_000
READ_COUNT = 500
BLOCK_MS = 5_000

# KEYS: team log. ARGV: max length, batch, "1" for approximate trimming.
# Each entry records the id of the entry before it (`p`), so that a reader resuming from a cursor
# can tell whether the entry right after its cursor was trimmed (a gap) or is still there.
_APPEND = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local previous = '0-0'
if #newest > 0 then previous = newest[1][1] end
if ARGV[3] == '1' then
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'b', ARGV[2], 'p', previous)
end
return redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'b', ARGV[2], 'p', previous)
"""

# KEYS: value hash, order hash. ARGV: worker, order, value, worker, order, value, ...
_KEEP_NEWEST = """
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[2], ARGV[i])
  if (not current) or tonumber(current) <= tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 0
"""


def _stream_id(cursor: Cursor) -> tuple[int, int]:
    millis, _, sequence = cursor.partition("-")
    return int(millis), int(sequence or 0)


class RedisBackend(Backend):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tt",
        history: int = DEFAULT_HISTORY,
        group_history: int = DEFAULT_GROUP_HISTORY,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.history = history
        self.group_history = group_history
        # An unacknowledged group entry idle this long is taken to be abandoned by a crashed
        # member and claimed by another; 0 turns claiming off. Keep it above the longest time
        # a member may hold a batch (its slowest write), or live members lose batches to others.
        self.claim_idle_ms = claim_idle_ms
        self._client: aioredis.Redis | None = None
        self._keep_newest: Any = None
        self._append: Any = None
        # Approximate trimming removes whole radix-tree nodes (~100 entries): cheap, but it
        # would ignore a small history altogether, so small histories are trimmed exactly.
        self._approximate = history >= 1000

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        options: dict[str, Any] = {}
        if "prefix" in query:
            options["prefix"] = query["prefix"][0]
        if "history" in query:
            options["history"] = int(query["history"][0])
        if "group_history" in query:
            options["group_history"] = int(query["group_history"][0])
        if "claim_idle_ms" in query:
            options["claim_idle_ms"] = int(query["claim_idle_ms"][0])
        server_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return cls(server_url, **options)

    # Key names -------------------------------------------------------------------------
    def log_key(self, team: str) -> str:
        return f"{self.prefix}:log:{team}"

    @property
    def all_key(self) -> str:
        return f"{self.prefix}:all"

    def _store_keys(self, kind: Kind, team: str) -> tuple[str, str]:
        name = "last" if kind is Kind.POSITION else "presence"
        return f"{self.prefix}:{name}:{team}", f"{self.prefix}:{name}-ts:{team}"

    # Lifecycle ---------------------------------------------------------------------------
    def new_client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.url,
            decode_responses=False,
            health_check_interval=30,
            socket_connect_timeout=5,
            # A blocked XREAD must outlast its BLOCK time before the socket read gives up.
            socket_timeout=BLOCK_MS / 1000 + 10,
        )

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise BackendError("redis backend used before start()")
        return self._client

    async def start(self) -> None:
        self._client = self.new_client()
        self._keep_newest = self._client.register_script(_KEEP_NEWEST)
        self._append = self._client.register_script(_APPEND)
        try:
            await self._client.ping()
        except RedisError as error:
            raise BackendError(f"redis at {_safe(self.url)} is unreachable: {error}") from error

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False

    def cursor_key(self, cursor: Cursor) -> tuple[int, ...]:
        return _stream_id(cursor) if cursor else (0, 0)

    # Writing -----------------------------------------------------------------------------
    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        by_team: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_team[event.team].append(event)
        pipe = self.client.pipeline(transaction=True)
        all_fields: dict[Any, Any] = {}
        for team, team_events in by_team.items():
            raw = encode_events(team_events)
            all_fields[team] = raw
            await self._append(
                keys=[self.log_key(team)],
                args=[self.history, raw, "1" if self._approximate else "0"],
                client=pipe,
            )
            for kind in Kind:
                arguments: list[Any] = []
                for event in team_events:
                    if event.kind is kind:
                        arguments += (event.worker, event.ts, event.to_json())
                if arguments:
                    keys = self._store_keys(kind, team)
                    await self._keep_newest(keys=keys, args=arguments, client=pipe)
        pipe.xadd(self.all_key, all_fields, maxlen=self.group_history, approximate=True)
        try:
            await pipe.execute()
        except RedisError as error:
            raise BackendError(f"publish to redis failed: {error}") from error

    # Reading -----------------------------------------------------------------------------
    async def snapshot(self, team: str) -> Snapshot:
        positions_key, _ = self._store_keys(Kind.POSITION, team)
        presence_key, _ = self._store_keys(Kind.STATUS, team)
        pipe = self.client.pipeline(transaction=True)
        pipe.xrevrange(self.log_key(team), count=1)
        pipe.hgetall(positions_key)
        pipe.hgetall(presence_key)
        try:
            newest, positions, presence = await pipe.execute()
        except RedisError as error:
            raise BackendError(f"snapshot from redis failed: {error}") from error
        cursor = newest[0][0].decode() if newest else "0-0"
        return Snapshot(
            team=team,
            cursor=cursor,
            positions={w.decode(): _decode_stored(team, raw) for w, raw in positions.items()},
            presence={w.decode(): _decode_stored(team, raw) for w, raw in presence.items()},
        )

    async def trimmed_after(self, team: str, cursor: Cursor) -> bool:
        """True if the entry right after `cursor` in the team's log was trimmed away."""
        try:
            oldest: Any = await self.client.xrange(self.log_key(team), count=1)
        except RedisError as error:
            raise BackendError(f"reading {team}'s log failed: {error}") from error
        if not oldest:
            return False
        oldest_id, fields = oldest[0]
        if _stream_id(cursor) >= _stream_id(oldest_id.decode()):
            return False
        return _stream_id(fields[b"p"].decode()) > _stream_id(cursor)

    def subscribe(self) -> TeamSubscription:
        return _RedisSubscription(self)

    def consume(
        self,
        group: str,
        consumer: str,
        *,
        start: GroupStart = "latest",
        acknowledge: bool = True,
    ) -> GroupConsumer:
        return _RedisGroupConsumer(self, group, consumer, start=start, acknowledge=acknowledge)


def _decode_stored(team: str, raw: bytes) -> Event:
    return decode_event(team, orjson.loads(raw))


def _safe(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, ""))


class _BlockingReader:
    """A connection of its own for blocking reads, dropped and re-opened with backoff on errors."""

    def __init__(self, backend: RedisBackend, what: str) -> None:
        self.backend = backend
        self.what = what
        self.connection: aioredis.Redis | None = None
        self._backoff = Backoff()

    async def open(self) -> tuple[aioredis.Redis, bool]:
        """The connection, and whether it was just opened."""
        if self.connection is not None:
            return self.connection, False
        self.connection = self.backend.new_client()
        return self.connection, True

    async def read_until(
        self, read: Callable[[], Awaitable[None]], has_items: Callable[[], bool],
        closed: Callable[[], bool],
    ) -> None:
        """Call `read` until it produced items; raise StopAsyncIteration once closed."""
        while not has_items():
            if closed():
                raise StopAsyncIteration
            try:
                await read()
                self._backoff.reset()
            except RedisError as error:
                delay = self._backoff.next_delay()
                log.warning("redis %s failed (%s); retrying in %.1fs", self.what, error, delay)
                await self.close()
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(RedisError):
                await self.connection.aclose()
            self.connection = None


class _RedisSubscription(TeamSubscription):
    """One blocking XREAD over all the teams of interest, woken when that set changes."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._cursors: dict[str, Cursor] = {}
        self._wake_key = f"{backend.prefix}:wake:{uuid.uuid4().hex}"
        self._wake_cursor = "$"
        self._ready: deque[Batch | Gap] = deque()
        self._reader = _BlockingReader(backend, "read")
        self._closed = False

    @property
    def teams(self) -> frozenset[str]:
        return frozenset(self._cursors)

    async def add(self, team: str, after: Cursor) -> None:
        if after == START_OF_LOG:
            after = "0-0"
        elif await self._backend.trimmed_after(team, after):
            self._ready.append(Gap(team, after))
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
        streams: dict[Any, Any] = {self._wake_key: self._wake_cursor}
        keys_to_team: dict[bytes, str] = {}
        for team, cursor in self._cursors.items():
            key = self._backend.log_key(team)
            streams[key] = cursor
            keys_to_team[key.encode()] = team
        # redis-py types replies loosely; with decode_responses=False every string is bytes.
        reply: Any = await connection.xread(streams, count=READ_COUNT, block=BLOCK_MS)
        for key, entries in reply or []:
            if key == self._wake_key.encode():
                self._wake_cursor = entries[-1][0].decode()
                continue
            team = keys_to_team[key]
            if team not in self._cursors:
                continue
            for entry_id, fields in entries:
                cursor = entry_id.decode()
                self._cursors[team] = cursor
                self._ready.append(Batch(team, cursor, fields[b"b"]))

    async def __anext__(self) -> Batch | Gap:
        await self._reader.read_until(self._read, lambda: bool(self._ready), lambda: self._closed)
        return self._ready.popleft()


class _EntryAcknowledger(Acknowledgeable):
    """XACKs a `tt:all` entry once every team batch cut from it has been acknowledged."""

    def __init__(self, consumer: _RedisGroupConsumer, entry_id: bytes, parts: int) -> None:
        self._consumer = consumer
        self._entry_id = entry_id
        self._remaining = parts

    async def ack(self) -> None:
        self._remaining -= 1
        if self._remaining == 0:
            await self._consumer.ack(self._entry_id)


class _NoAck(Acknowledgeable):
    async def ack(self) -> None:
        return None


class _RedisGroupConsumer(GroupConsumer):
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
        group: str,
        consumer: str,
        *,
        start: GroupStart,
        acknowledge: bool,
    ) -> None:
        self._backend = backend
        self._group = group
        self._consumer = consumer
        self._start_id = "$" if start == "latest" else "0"
        self._acknowledge = acknowledge
        self._reader = _BlockingReader(backend, "group read")
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

    async def _ensure_group(self, reader: aioredis.Redis) -> None:
        try:
            await reader.xgroup_create(
                self._backend.all_key, self._group, id=self._start_id, mkstream=True
            )
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def ack(self, entry_id: bytes) -> None:
        self._in_flight.discard(entry_id)
        await self._backend.client.xack(self._backend.all_key, self._group, entry_id)

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
        reply: Any = await connection.xreadgroup(
            self._group,
            self._consumer,
            {self._backend.all_key: ">"},
            count=READ_COUNT,
            block=self._block_ms(),
            noack=not self._acknowledge,
        )
        for _key, entries in reply or []:
            await self._deliver(entries)

    def _block_ms(self) -> int:
        if not self._claim_idle_ms:
            return BLOCK_MS
        until_claim = int((self._next_claim_at - time.monotonic()) * 1000)
        return max(1, min(BLOCK_MS, until_claim))

    async def _read_own_pending(self, connection: aioredis.Redis, after: str) -> None:
        reply: Any = await connection.xreadgroup(
            self._group, self._consumer, {self._backend.all_key: after}, count=READ_COUNT
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
            self._backend.all_key,
            self._group,
            self._consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=READ_COUNT,
        )
        self._claim_cursor = reply[0].decode()
        trimmed = reply[2] if len(reply) > 2 else []
        if trimmed:
            log.warning(
                "group %s: %d pending entries were trimmed from %s before being acknowledged",
                self._group, len(trimmed), self._backend.all_key,
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
