"""Where the Redis backend keeps what: key names, on one server and on a Redis Cluster.

On one server (and under Sentinel) there is one shard, and the keys are those it always had:

    {prefix}:log:{team}  {prefix}:last:{team} ...  {prefix}:all  {prefix}:log-newest

On a Redis Cluster every command, script and MULTI may touch keys of one hash slot only, and a
blocking XREAD / XREADGROUP reads streams of one slot. So teams are grouped into `shards`
(`?shards=`, default 12): a team belongs to shard `crc32(team) % shards`, and every key of a
shard carries the shard's hash tag `{prefix}:{tag}:...`:

    {prefix}:{tag}:log:{team}   {prefix}:{tag}:last:{team} ...   a team's log and last-known
    {prefix}:{tag}:all          the shard's part of the all-teams feed
    {prefix}:{tag}:log-newest   the newest log entry id of each team of the shard
    {prefix}:{tag}:wake:{id}    a reader's wake stream for that shard
    {prefix}:{tag}:last-known   the shard's last-known store is whole

so a team's log, its last-known hashes and the feed entry of a publish are written by one
script on one node, and one blocking read per shard serves any number of its teams. The tags
are chosen so that shard k's slot lies in the k-th of `shards` equal parts of the 16,384 slots:
`redis-cli --cluster create` gives each primary an equal run of slots, so the shards (and the
feed with them) spread evenly over the primaries (4 each of 12 on 3 primaries).
"""

from __future__ import annotations

import zlib
from functools import lru_cache

from redis.crc import key_slot

from teamtrack.contract import Kind

CLUSTER_SLOTS = 16_384
DEFAULT_CLUSTER_SHARDS = 12
MAX_SHARDS = 1024


@lru_cache(maxsize=MAX_SHARDS * 4)
def shard_tag(shard: int, shards: int) -> str:
    """A hash tag whose slot lies in the `shard`-th of `shards` equal parts of the slots."""
    low = shard * CLUSTER_SLOTS // shards
    high = (shard + 1) * CLUSTER_SLOTS // shards
    attempt = 0
    while True:
        tag = f"s{shard}-{attempt}"
        if low <= key_slot(tag.encode()) < high:
            return tag
        attempt += 1


class KeyLayout:
    """The key names of one backend: `shards == 1` and no tags on one server."""

    def __init__(self, prefix: str, shards: int = 1, *, tagged: bool = False) -> None:
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be from 1 to {MAX_SHARDS}")
        self.prefix = prefix
        self.shards = shards
        self.tagged = tagged
        self._shard_prefixes = [
            f"{prefix}:{{{shard_tag(shard, shards)}}}" if tagged else prefix
            for shard in range(shards)
        ]

    def shard_of(self, team: str) -> int:
        if self.shards == 1:
            return 0
        return zlib.crc32(team.encode()) % self.shards

    def _base(self, team: str) -> str:
        return self._shard_prefixes[self.shard_of(team)]

    def log_key(self, team: str) -> str:
        return f"{self._base(team)}:log:{team}"

    def store_keys(self, team: str) -> tuple[str, str, str, str]:
        """Positions, their ts, presence, its time."""
        base = self._base(team)
        return (f"{base}:last:{team}", f"{base}:last-ts:{team}",
                f"{base}:presence:{team}", f"{base}:presence-ts:{team}")

    def kind_keys(self, kind: Kind, team: str) -> tuple[str, str]:
        keys = self.store_keys(team)
        return keys[:2] if kind is Kind.POSITION else keys[2:]

    def feed_key(self, shard: int) -> str:
        return f"{self._shard_prefixes[shard]}:all"

    def newest_key(self, shard: int) -> str:
        return f"{self._shard_prefixes[shard]}:log-newest"

    def marker_key(self, shard: int) -> str:
        return f"{self._shard_prefixes[shard]}:last-known"

    def recovery_key(self, shard: int) -> str:
        return f"{self._shard_prefixes[shard]}:last-known-recovery"

    def wake_key(self, shard: int, reader: str) -> str:
        return f"{self._shard_prefixes[shard]}:wake:{reader}"

    @property
    def revocations_key(self) -> str:
        """One stream for the whole deployment (its own slot on a cluster)."""
        return f"{self.prefix}:revoked-sessions"
