"""`redis://host:port/db` — Redis Streams as the cross-instance broadcast layer.

Also `redis+sentinel://sentinel:26379,.../service/db` (the primary of a Sentinel service) and
`?wait_replicas=` (a publish waits for replicas): see `redis_connect`.

Keys (prefix `tt`, change with `?prefix=`):

* `tt:log:{team}`   stream, one entry per forwarded batch of the team (field `b`), capped at
  `?history=` entries (approximate trimming) and `?history_ms=` of age (default 2 min).
  Dashboards XREAD only the teams they serve.
* `tt:all`          stream, one entry per `publish` call (a field per team), capped at
  `?group_history=` entries and `?group_history_ms=` of age (default 5 min); consumer groups
  (bridge mirrors, ingest) read it.
* `tt:last:{team}` / `tt:last-ts:{team}`          last-known position per worker, and its ts.
* `tt:presence:{team}` / `tt:presence-ts:{team}`  last presence per worker, and its time.
* `tt:log-newest`   hash, team -> id of the newest entry of its log (each entry names the one
  before it).
* `tt:revoked-sessions`  stream, one entry per dashboard logout (fields `s` session id, `e`
  its expiry), trimmed to the longest session life; every dashboard reads it (XRANGE after the
  last id it saw) every `--revocation-poll-s`.

A publish is one EVALSHA of one Lua script (`_PUBLISH`), whatever the batch size and the number
of teams in it: one command, one round trip, atomic without MULTI/EXEC. The script keeps the
newest `ts` per worker in the last-known hashes, so a redelivered old message never moves a
worker back. The script is loaded at `start()`; after a Redis restart (NOSCRIPT) it is loaded
again and the publish retried once.

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
import hashlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

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
    ReadPace,
    SessionRevocation,
    Snapshot,
    TeamSubscription,
    decode_event,
)
from teamtrack.backends.redis_connect import (
    RedisConnector,
    parse_backend_url,
    raise_if_cancelled,
    replica_wait,
)
from teamtrack.contract import Kind
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 10_000
# The shared client's pool: commands beyond this many at once wait (up to POOL_WAIT_S) for a
# connection instead of failing.
POOL_CONNECTIONS = 64
POOL_WAIT_S = 10.0
DEFAULT_GROUP_HISTORY = 100_000
# Age caps, on top of the entry caps: an entry is a batch, whose size grows with the load, so only
# an age bounds the memory of a steady load: rate x age x (about 180 bytes per position in a
# team log, 210 in `tt:all`, measured).
# A team log serves viewers that resume after a reconnect (older: a gap, then the snapshot);
# `tt:all` is what lets the ingest catch up after an outage of its database.
DEFAULT_HISTORY_MS = 120_000
DEFAULT_GROUP_HISTORY_MS = 300_000
DEFAULT_CLAIM_IDLE_MS = 30_000
READ_COUNT = 500
# Entries per group read. A `tt:all` entry is a whole publish (up to 2,000 events under load), and
# Redis serves nobody else while it builds a reply: a paced member (the ingest, a write interval
# of traffic per read) reading 500 entries at once held Redis for 3 to 6 ms at a time, which every
# live position behind it waited out. Smaller reads let other commands in between.
GROUP_READ_COUNT = 50
KEY_CACHE_SIZE = 10_000
BLOCK_MS = 5_000
# A group member that has not read for this long checks, before reading, whether the history
# was trimmed past its group (`_RedisGroupConsumer._count_missed`).
MISSED_CHECK_AFTER_S = 1.0

# The whole publish, in one script: one command, one round trip, atomic without MULTI/EXEC.
#
# KEYS: the all-teams stream, the hash of each log's newest entry id, then five keys per team:
# its log, last-known positions and their ts, last presence and its time.
# ARGV: log length cap, "1" for approximate trimming, all-teams length cap, log age cap and
# all-teams age cap in ms (0: none), the number of teams T, the T teams, then per team: its batch
# (the events' JSON array), then for positions and for presence: an update count u and u triples
# (worker, ts, event JSON), at most one per worker.
#
# The age caps trim with `XTRIM MINID ~`, the cut computed from the id just added (Redis' clock,
# in ms), so no clock of the caller is trusted; `~` drops whole radix-tree nodes, so an entry may
# outlive its age by up to one node (about a hundred entries).
#
# Each log entry records the id of the entry before it (`p`), so that a reader resuming from a
# cursor can tell whether the entry right after its cursor was trimmed (a gap) or is still there;
# the newest id of each log is kept in a hash, which saves reading the newest entry back.
# A last-known value is replaced only by one with the same or a newer `ts`, so a redelivered old
# fix never moves a worker back.
_PUBLISH = """
local CHUNK = 1000
local approximate = ARGV[2] == '1'
local log_age, all_age = tonumber(ARGV[4]), tonumber(ARGV[5])
local team_count = tonumber(ARGV[6])
local a = 7 + team_count
local function trim_by_age(key, id, age)
  if age > 0 then
    local newest_ms = tonumber(string.match(id, '^%d+'))
    redis.call('XTRIM', key, 'MINID', '~', string.format('%d', newest_ms - age))
  end
end
local function keep_newest(values_key, stamps_key, u)
  for from = 0, u - 1, CHUNK do
    local to = math.min(u, from + CHUNK) - 1
    local workers = {}
    for j = from, to do workers[#workers + 1] = ARGV[a + 3 * j] end
    local stored = redis.call('HMGET', stamps_key, unpack(workers))
    local values, stamps = {}, {}
    for j = from, to do
      local worker, ts = ARGV[a + 3 * j], ARGV[a + 3 * j + 1]
      local current = stored[j - from + 1]
      if (not current) or tonumber(current) <= tonumber(ts) then
        values[#values + 1] = worker
        values[#values + 1] = ARGV[a + 3 * j + 2]
        stamps[#stamps + 1] = worker
        stamps[#stamps + 1] = ts
      end
    end
    if #values > 0 then
      redis.call('HSET', values_key, unpack(values))
      redis.call('HSET', stamps_key, unpack(stamps))
    end
  end
  a = a + 3 * u
end
local previous_ids = redis.call('HMGET', KEYS[2], unpack(ARGV, 7, 6 + team_count))
local all_fields, newest_ids = {}, {}
for t = 1, team_count do
  local log_key, team, batch = KEYS[3 + 5 * (t - 1)], ARGV[6 + t], ARGV[a]
  a = a + 1
  local previous = previous_ids[t]
  if not previous then
    -- A log written before the newest-id hash existed (or none at all).
    local newest = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', 1)
    previous = '0-0'
    if #newest > 0 then previous = newest[1][1] end
  end
  local id
  if approximate then
    id = redis.call('XADD', log_key, 'MAXLEN', '~', ARGV[1], '*', 'b', batch, 'p', previous)
  else
    id = redis.call('XADD', log_key, 'MAXLEN', ARGV[1], '*', 'b', batch, 'p', previous)
  end
  trim_by_age(log_key, id, log_age)
  newest_ids[#newest_ids + 1] = team
  newest_ids[#newest_ids + 1] = id
  all_fields[#all_fields + 1] = team
  all_fields[#all_fields + 1] = batch
  for kind = 0, 1 do
    local u = tonumber(ARGV[a])
    a = a + 1
    if u > 0 then
      keep_newest(KEYS[4 + 5 * (t - 1) + 2 * kind], KEYS[5 + 5 * (t - 1) + 2 * kind], u)
    end
  end
end
redis.call('HSET', KEYS[2], unpack(newest_ids))
local all_id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(all_fields))
trim_by_age(KEYS[1], all_id, all_age)
return team_count
"""
# Gives a lost last-known store back (`RedisBackend.recover_last_known`): rare, so plain.
# KEYS: per team its positions and their ts, its presence and its time. ARGV: per team, for
# positions then presence, a count u and u triples (worker, ts, event JSON). Only a strictly
# newer value replaces what a bridge may have written since the loss.
_RESTORE = """
local a = 1
for k = 1, #KEYS, 2 do
  local values_key, stamps_key = KEYS[k], KEYS[k + 1]
  local u = tonumber(ARGV[a])
  a = a + 1
  for j = 1, u do
    local worker, ts = ARGV[a], ARGV[a + 1]
    local current = redis.call('HGET', stamps_key, worker)
    if (not current) or tonumber(current) < tonumber(ts) then
      redis.call('HSET', values_key, worker, ARGV[a + 2])
      redis.call('HSET', stamps_key, worker, ts)
    end
    a = a + 3
  end
end
return a
"""
# Redis names a script by its SHA-1 (EVALSHA); nothing here depends on SHA-1 being secure.
_PUBLISH_SHA = hashlib.sha1(_PUBLISH.encode(), usedforsecurity=False).hexdigest().encode()
# Teams per script call: `unpack` of the all-teams entry's fields stays far below Lua's stack
# limit (8,000). A publish of more teams than this (a batch of over a thousand teams) is written
# as several all-teams entries; each team still gets one log entry.
MAX_TEAMS_PER_CALL = 1000


def _command(args: list[bytes]) -> bytes:
    """One Redis command in RESP, ready for the socket."""
    parts = [b"*%d\r\n" % len(args)]
    parts += [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]
    return b"".join(parts)


async def _execute(client: aioredis.Redis, command: bytes) -> Any:
    """Send one packed command (`_command`) on a pooled connection; the parser's raw reply.

    The hot paths (publish, blocking reads) use this instead of redis-py's `execute_command`:
    the packing is one join, without per-argument encoding in Python, and the reply is not run
    through redis-py's per-command conversions. Replies come as the connection's protocol
    gives them (RESP3 maps with redis-py 8, arrays with RESP2); readers accept both.
    """
    pool: Any = client.connection_pool
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(command, check_health=False)
        # The send is where redis-py's wait_for may have lost a cancellation: this one, or one
        # of an earlier redis-py command of the same task.
        raise_if_cancelled()
        return await connection.read_response()
    except ResponseError:
        raise  # an error reply: the connection is in a clean state
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


StreamEntries = list[tuple[bytes, list[Any]]]
"""(stream key, [[entry id, [field, value, field, value, ...] or None], ...])"""


def _streams(reply: Any) -> StreamEntries:
    """The streams of a raw XREAD / XREADGROUP reply, RESP3 (a map) or RESP2 (pairs)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(key, entries) for key, entries in pairs]


def _field(flat: list[Any] | None, name: bytes) -> Any:
    """The value of `name` in an entry's flat field list."""
    if flat:
        for index in range(0, len(flat) - 1, 2):
            if flat[index] == name:
                return flat[index + 1]
    return None


def _pairs(flat: list[Any] | None) -> dict[bytes, bytes]:
    """An entry's flat field list as a dict (empty for an entry deleted meanwhile)."""
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=True))


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
        history_ms: int = DEFAULT_HISTORY_MS,
        group_history_ms: int = DEFAULT_GROUP_HISTORY_MS,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        wait_replicas: int = 0,
        wait_timeout_ms: int | None = None,
        sentinel_auth: bool = False,
    ) -> None:
        if min(history, group_history) < 1 or min(history_ms, group_history_ms) < 0:
            raise ValueError(
                "redis:// history and group_history must be positive, "
                "history_ms and group_history_ms zero (no age cap) or positive"
            )
        self.url = url
        # Where connections go (one server, or a Sentinel service's primary), and whether a
        # publish waits for replicas (`?wait_replicas=`).
        self._connector = RedisConnector(url, sentinel_auth=sentinel_auth)
        self._wait = replica_wait(wait_replicas, wait_timeout_ms)
        self.prefix = prefix
        self.history = history
        self.group_history = group_history
        self.history_ms = history_ms
        self.group_history_ms = group_history_ms
        # An unacknowledged group entry idle this long is taken to be abandoned by a crashed
        # member and claimed by another; 0 turns claiming off. Keep it above the longest time
        # a member may hold a batch (its slowest write), or live members lose batches to others.
        self.claim_idle_ms = claim_idle_ms
        self._client: aioredis.Redis | None = None
        # Approximate trimming removes whole radix-tree nodes (~100 entries): cheap, but it
        # would ignore a small history altogether, so small histories are trimmed exactly.
        self._approximate = history >= 1000
        self._history_bytes = b"%d" % history
        self._group_history_bytes = b"%d" % group_history
        self._history_ms_bytes = b"%d" % history_ms
        self._group_history_ms_bytes = b"%d" % group_history_ms
        self._approximate_bytes = b"1" if self._approximate else b"0"
        self._all_key_bytes = self.all_key.encode()
        self._newest_key_bytes = f"{prefix}:log-newest".encode()
        self._key_cache: dict[str, tuple[bytes, ...]] = {}

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        server_url, options = parse_backend_url(url)
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
    def new_client(self, *, shared: bool = False) -> aioredis.Redis:
        """A client of its own (one connection, for a blocking reader), or with `shared` the
        backend's client for everything else: a bounded pool where a command waits for a free
        connection. redis-py's default pool refuses the 101st concurrent command instead
        ("Too many connections"), which 200 managers opening the map at once reach."""
        options: dict[str, Any] = {
            "decode_responses": False,
            "health_check_interval": 30,
            "socket_connect_timeout": 5,
            # A blocked XREAD must outlast its BLOCK time before the socket read gives up.
            "socket_timeout": BLOCK_MS / 1000 + 10,
        }
        if not shared:
            return self._connector.client(**options)
        return self._connector.pooled_client(
            max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_S, **options
        )

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise BackendError("redis backend used before start()")
        return self._client

    async def start(self) -> None:
        self._client = self.new_client(shared=True)
        try:
            await self._load_script()
        except RedisError as error:
            raise BackendError(
                f"redis at {self._connector.safe_url} is unreachable: {error}"
            ) from error

    async def _load_script(self) -> None:
        loaded: Any = await self.client.script_load(_PUBLISH)
        if str(loaded) != _PUBLISH_SHA.decode():
            raise BackendError(f"redis loaded the publish script as {loaded!r}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self._connector.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False

    def cursor_key(self, cursor: Cursor) -> tuple[int, ...]:
        return _stream_id(cursor) if cursor else (0, 0)

    @property
    def revocations_key(self) -> str:
        return f"{self.prefix}:revoked-sessions"

    async def revoke_session(self, revocation: SessionRevocation, keep_s: float) -> None:
        # Entries are ids of Redis' clock; trimmed once older than any session can live.
        oldest_ms = max(0, int((time.time() - keep_s) * 1000))
        try:
            await self.client.xadd(
                self.revocations_key,
                {"s": revocation.session_id, "e": str(revocation.expires_at)},
                minid=oldest_ms,
                approximate=True,
            )
        except RedisError as error:
            raise BackendError(f"redis: recording a revocation failed: {error}") from error

    async def session_revocations(self, after: str) -> tuple[list[SessionRevocation], str]:
        try:
            entries: Any = await self.client.xrange(
                self.revocations_key, min=f"({after}" if after else "-", max="+",
                count=self.revocations_per_read,
            )
        except RedisError as error:
            raise BackendError(f"redis: reading revocations failed: {error}") from error
        found = []
        for entry_id, fields in entries:
            after = entry_id.decode()
            try:
                found.append(
                    SessionRevocation(fields[b"s"].decode(), int(fields[b"e"].decode()))
                )
            except (KeyError, ValueError, UnicodeDecodeError):
                continue  # not written by a dashboard: nothing to revoke
        return found, after

    async def recover_last_known(self, load: Callable[[], Awaitable[Sequence[Event]]]) -> int:
        """See `Backend.recover_last_known`. The store is known to be whole while the key
        `{prefix}:last-known` exists: written once it was filled, gone with everything else
        when Redis lost its data."""
        marker = f"{self.prefix}:last-known"
        try:
            if await self.client.exists(marker):
                return 0
            events = await load()
            by_team: dict[str, list[Event]] = {}
            for event in events:
                by_team.setdefault(event.team, []).append(event)
            restore = self.client.register_script(_RESTORE)
            for team, team_events in by_team.items():
                keys: list[str] = []
                args: list[bytes | int] = []
                for kind in (Kind.POSITION, Kind.STATUS):
                    keys += self._store_keys(kind, team)
                    chosen = [event for event in team_events if event.kind is kind]
                    args.append(len(chosen))
                    for event in chosen:
                        args += [event.worker.encode(), event.ts, event.to_json()]
                await restore(keys=keys, args=args)
            await self.client.set(marker, b"1")
        except RedisError as error:
            raise BackendError(f"recovering the last-known store failed: {error}") from error
        return len(events)

    # Writing -----------------------------------------------------------------------------
    async def publish(self, events: Sequence[Event]) -> None:
        """One EVALSHA of the publish script for the whole batch (see `_PUBLISH`)."""
        if not events:
            return
        by_team: dict[str, list[Event]] = {}
        for event in events:
            team_events = by_team.get(event.team)
            if team_events is None:
                by_team[event.team] = [event]
            else:
                team_events.append(event)
        teams = list(by_team.items())
        for start in range(0, len(teams), MAX_TEAMS_PER_CALL):
            await self._run_publish(self._publish_command(teams[start:start + MAX_TEAMS_PER_CALL]))

    def _publish_command(self, teams: list[tuple[str, list[Event]]]) -> bytes:
        keys = [self._all_key_bytes, self._newest_key_bytes]
        args = [self._history_bytes, self._approximate_bytes, self._group_history_bytes,
                self._history_ms_bytes, self._group_history_ms_bytes, b"%d" % len(teams)]
        args += [team.encode() for team, _events in teams]
        for team, team_events in teams:
            keys += self._team_keys(team)
            encoded = [event.to_json() for event in team_events]
            args.append(b"[" + b",".join(encoded) + b"]")
            # Each worker's newest position and presence in the batch (of equal ts the later,
            # as appending them one by one would keep); the script compares them with Redis'.
            positions: dict[str, int] = {}
            presence: dict[str, int] = {}
            for number, event in enumerate(team_events):
                if event.kind is Kind.EVENT:
                    continue  # logged only: no last-known worker event
                newest = positions if event.kind is Kind.POSITION else presence
                current = newest.get(event.worker)
                if current is None or team_events[current].ts <= event.ts:
                    newest[event.worker] = number
            for newest in (positions, presence):
                args.append(b"%d" % len(newest))
                for worker, number in newest.items():
                    args += (worker.encode(), b"%d" % team_events[number].ts, encoded[number])
        return _command([b"EVALSHA", _PUBLISH_SHA, b"%d" % len(keys), *keys, *args])

    async def _run_publish(self, command: bytes) -> None:
        try:
            try:
                await self._execute_packed(command)
            except NoScriptError:
                # Redis restarted, or SCRIPT FLUSH: load the script again and retry once.
                await self._load_script()
                await self._execute_packed(command)
        except RedisError as error:
            raise BackendError(f"publish to redis failed: {error}") from error

    async def _execute_packed(self, command: bytes) -> Any:
        if self._wait is not None:
            return await self._wait.execute(self.client, command)
        return await _execute(self.client, command)

    def log_key_bytes(self, team: str) -> bytes:
        return self._team_keys(team)[0]

    def _team_keys(self, team: str) -> tuple[bytes, ...]:
        keys = self._key_cache.get(team)
        if keys is None:
            if len(self._key_cache) >= KEY_CACHE_SIZE:
                self._key_cache.clear()
            positions, position_stamps = self._store_keys(Kind.POSITION, team)
            presence, presence_stamps = self._store_keys(Kind.STATUS, team)
            keys = tuple(
                key.encode()
                for key in (
                    self.log_key(team), positions, position_stamps, presence, presence_stamps
                )
            )
            self._key_cache[team] = keys
        return keys

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
        """True if the entry right after `cursor` in the team's log is gone: trimmed away, or
        the log was started again since (see `_broken_chain`)."""
        try:
            oldest: Any = await self.client.xrange(self.log_key(team), count=1)
        except RedisError as error:
            raise BackendError(f"reading {team}'s log failed: {error}") from error
        if not oldest:
            return False
        oldest_id, fields = oldest[0]
        if _stream_id(cursor) >= _stream_id(oldest_id.decode()):
            return False
        return _broken_chain(cursor, fields.get(b"p"))

    def subscribe(self) -> TeamSubscription:
        return _RedisSubscription(self)

    def consume(
        self,
        group: str,
        consumer: str,
        *,
        start: GroupStart = "latest",
        acknowledge: bool = True,
        pace_s: float = 0.0,
    ) -> GroupConsumer:
        return _RedisGroupConsumer(
            self, group, consumer, start=start, acknowledge=acknowledge, pace_s=pace_s
        )


def _broken_chain(cursor: Cursor, predecessor: bytes | None) -> bool:
    """Whether an entry read after `cursor` does not follow it: the entry names another
    predecessor. Newer: the entries in between were trimmed. Older (or none, `0-0`): the log
    was started again (a Redis restarted without its data, a flushed database), and what the
    reader had before `cursor` is not in it. Reading from the start (`0-0`) takes whatever is
    there, so nothing is missing then."""
    if predecessor is None or cursor == "0-0":
        return False
    text = predecessor.decode()
    return text != cursor and _stream_id(text) != _stream_id(cursor)


def _decode_stored(team: str, raw: bytes) -> Event:
    return decode_event(team, orjson.loads(raw))


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
            raise_if_cancelled()
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
        reply = await _execute(
            connection,
            _command([b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"BLOCK", b"%d" % BLOCK_MS,
                      b"STREAMS", *keys, *cursors]),
        )
        for key, entries in _streams(reply):
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
                if _broken_chain(previous, _field(fields, b"p")):
                    self._ready.append(Gap(team, previous))
                raw = _field(fields, b"b")
                if raw is not None:
                    self._ready.append(Batch(team, cursor, raw))

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
        entry_id = self.settle()
        if entry_id is not None:
            await self._consumer.ack(entry_id)

    def settle(self) -> bytes | None:
        """Count one team batch as done; the entry's id once all of them are."""
        self._remaining -= 1
        return self._entry_id if self._remaining == 0 else None


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
        pace_s: float = 0.0,
    ) -> None:
        self._backend = backend
        self._group = group
        self._pace = ReadPace(pace_s)
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
        # When the group may have fallen out of the history's window: at the first read, after
        # a full read (behind), after a pause (a paced or blocked reader).
        self._last_read_at = -math.inf
        self._behind = True
        self.missed = 0

    async def _ensure_group(self, reader: aioredis.Redis) -> None:
        # The group's read count starts at what it skips (everything, or what was trimmed
        # already), so that `_count_missed` can count what is trimmed from under it later.
        # "Latest" is the newest id of that same reply rather than `$`, which keeps the two
        # consistent whatever is published in between.
        start_id, skipped = self._start_id, None
        with contextlib.suppress(ResponseError):  # no stream yet: nothing skipped
            stream: Any = await reader.xinfo_stream(self._backend.all_key)
            if start_id == "$":
                start_id, skipped = stream["last-generated-id"], stream["entries-added"]
            else:
                skipped = stream["entries-added"] - stream["length"]
        try:
            await reader.xgroup_create(
                self._backend.all_key, self._group, id=start_id, mkstream=True,
                entries_read=skipped,
            )
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def ack(self, entry_id: bytes) -> None:
        self._in_flight.discard(entry_id)
        await self._backend.client.xack(self._backend.all_key, self._group, entry_id)

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
            await self._backend.client.xack(self._backend.all_key, self._group, *settled)

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
        command += [b"STREAMS", self._backend.all_key.encode(), b">"]
        reply = await _execute(connection, _command(command))
        read = 0
        for _key, entries in _streams(reply):
            read += len(entries)
            await self._deliver([(entry_id, _pairs(fields)) for entry_id, fields in entries])
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
        all_key = self._backend.all_key
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
        if _stream_id(first[0].decode()) <= _stream_id(delivered):
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
            self._group, self._consumer, {self._backend.all_key: after}, count=GROUP_READ_COUNT
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
            count=GROUP_READ_COUNT,
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
