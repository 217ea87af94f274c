"""What the Redis backend's parts share: its settings, the publish script (Lua), packed
commands sent without redis-py's per-command work, and reading raw stream replies."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from teamtrack.backends.base import (
    Cursor,
)
from teamtrack.backends.redis_connect import (
    raise_if_cancelled,
)

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
# was trimmed past its group (`RedisGroupConsumer._count_missed`).
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
PUBLISH_SCRIPT = """
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
# KEYS: the shard's recovery key, then per kind its values and their ts. ARGV: the recovery's
# token, then per kind a count u and u triples (worker, ts, event JSON). Writes nothing (-1)
# when the recovery key no longer holds the token: Redis lost its data again since the
# recovery began (or another recovery took over). Only a strictly newer value replaces what a
# bridge may have written since the loss.
RESTORE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local a = 2
for k = 2, #KEYS, 2 do
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
# Ends a recovery (`RedisBackend.recover_last_known`): marks the shard's store whole (KEYS[2])
# if the recovery key (KEYS[1]) still holds this recovery's token (ARGV[1]); 0 if it does not.
RESTORED_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], '1')
redis.call('DEL', KEYS[1])
return 1
"""
# Redis names a script by its SHA-1 (EVALSHA); nothing here depends on SHA-1 being secure.
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode(), usedforsecurity=False).hexdigest().encode()
# Teams per script call: `unpack` of the all-teams entry's fields stays far below Lua's stack
# limit (8,000). A publish of more teams than this (a batch of over a thousand teams) is written
# as several all-teams entries; each team still gets one log entry.
MAX_TEAMS_PER_CALL = 1000


def packed_command(args: list[bytes]) -> bytes:
    """One Redis command in RESP, ready for the socket."""
    parts = [b"*%d\r\n" % len(args)]
    parts += [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]
    return b"".join(parts)


async def execute_packed(client: aioredis.Redis, command: bytes) -> Any:
    """Send one packed command (`packed_command`) on a pooled connection; the parser's raw reply.

    The hot paths (publish, blocking reads) use this instead of redis-py's `execute_command`:
    the packing is one join, without per-argument encoding in Python, and the reply is not run
    through redis-py's per-command conversions. Replies come as the connection's protocol
    gives them (RESP3 maps with redis-py 8, arrays with RESP2); readers accept both.
    """
    return await execute_on_pool(client.connection_pool, command)


async def execute_on_pool(pool: Any, command: bytes) -> Any:
    """`execute_packed` on a connection of `pool` (a client's pool, or a cluster node's)."""
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


def stream_entries(reply: Any) -> StreamEntries:
    """The streams of a raw XREAD / XREADGROUP reply, RESP3 (a map) or RESP2 (pairs)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(key, entries) for key, entries in pairs]


def entry_field(flat: list[Any] | None, name: bytes) -> Any:
    """The value of `name` in an entry's flat field list."""
    if flat:
        for index in range(0, len(flat) - 1, 2):
            if flat[index] == name:
                return flat[index + 1]
    return None


def entry_pairs(flat: list[Any] | None) -> dict[bytes, bytes]:
    """An entry's flat field list as a dict (empty for an entry deleted meanwhile)."""
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=True))


def stream_id(cursor: Cursor) -> tuple[int, int]:
    millis, _, sequence = cursor.partition("-")
    return int(millis), int(sequence or 0)


def broken_chain(cursor: Cursor, predecessor: bytes | None) -> bool:
    """Whether an entry read after `cursor` does not follow it: the entry names another
    predecessor. Newer: the entries in between were trimmed. Older (or none, `0-0`): the log
    was started again (a Redis restarted without its data, a flushed database), and what the
    reader had before `cursor` is not in it. Reading from the start (`0-0`) takes whatever is
    there, so nothing is missing then."""
    if predecessor is None or cursor == "0-0":
        return False
    text = predecessor.decode()
    return text != cursor and stream_id(text) != stream_id(cursor)

