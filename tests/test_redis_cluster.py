"""`redis+cluster://` against a real Redis Cluster: 3 primaries, a replica of each.

The contract suite over the cluster, the URL, the all-teams feed spread over the primaries,
and (`-m faults`) a primary SIGKILLed while batches are published and read, counting what was
acknowledged, stored, missing and duplicated (figures printed and written under test-output/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from backend_contract import BackendContract, position
from redis.crc import key_slot

from teamtrack.backends import START_OF_LOG, Backend, BackendError, Batch, Event, from_url
from teamtrack.backends.redis import RedisBackend
from teamtrack.backends.redis_cluster import ClusterTarget
from teamtrack.local.redis_cluster_servers import RedisClusterGroup, start_redis_cluster

PASSWORD = "cluster-test-secret"


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterGroup]:
    """One cluster for the tests that kill nothing; password-protected."""
    group = start_redis_cluster(tmp_path_factory.mktemp("rcluster"), password=PASSWORD)
    try:
        yield group
    finally:
        group.stop()


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


class TestRedisClusterBackend(BackendContract):
    """The whole contract on the cluster, teams spread over its shards."""

    @pytest.fixture(autouse=True)
    def _server(self, redis_cluster: RedisClusterGroup) -> None:
        self.group = redis_cluster
        self.prefix = _prefix()

    def make_backend(self, history: int) -> Backend:
        return from_url(self.group.url(
            query=f"prefix={self.prefix}&history={history}&claim_idle_ms=300"))

    async def write_malformed_revocations(self, backend: Backend) -> bool:
        assert isinstance(backend, RedisBackend)
        for fields in ({"x": "y"}, {"s": "session-x", "e": "soon"}):
            await backend.client.xadd(backend.revocations_key, fields)
        return True


# URL ------------------------------------------------------------------------------------------
def test_a_cluster_url_names_seed_nodes_and_options() -> None:
    target = ClusterTarget.parse("redis+cluster://app:p%40ss@n1:7000,[::1]:7001,n3/")
    assert target.nodes == (("n1", 7000), ("::1", 7001), ("n3", 6379))
    assert (target.username, target.password) == ("app", "p@ss")
    assert ClusterTarget.parse("redis+cluster://n1:7000").nodes == (("n1", 7000),)
    backend = from_url("redis+cluster://n1:7000/?prefix=x&shards=6&wait_replicas=1")
    assert isinstance(backend, RedisBackend)
    assert backend.layout.shards == 6


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://n1:7000/0", "takes no database"),
        ("redis+cluster://n1:7000,,n2/", "empty node address"),
        ("redis+cluster://n1:port/", "bad node port"),
        ("redis+cluster://n1/?shards=0", "shards must be from 1"),
        ("redis+cluster://n1/?sentinel_auth=same", "redis+sentinel:// URLs only"),
        ("redis://127.0.0.1:6379/0?shards=4", "redis+cluster:// URLs only"),
    ],
)
def test_a_bad_cluster_url_is_refused_with_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        from_url(url)


def test_errors_about_cluster_credentials_never_show_the_password() -> None:
    with pytest.raises(ValueError, match="user:password@") as refused:
        from_url("redis+cluster://hunter2@n1/")
    assert "hunter2" not in str(refused.value)


# Layout ---------------------------------------------------------------------------------------
def test_every_key_of_a_team_and_its_feed_shard_share_one_slot() -> None:
    backend = from_url("redis+cluster://n1:7000/?prefix=tt&shards=12")
    assert isinstance(backend, RedisBackend)
    layout = backend.layout
    for team in ("alpha", "bravo", "team-7"):
        shard = layout.shard_of(team)
        keys = [layout.log_key(team), *layout.store_keys(team), layout.feed_key(shard),
                layout.newest_key(shard), layout.marker_key(shard), layout.recovery_key(shard),
                layout.wake_key(shard, "x")]
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
    # The shards' slots spread evenly over the slot space, so over the primaries.
    for shard in range(12):
        slot = key_slot(layout.feed_key(shard).encode())
        assert shard * 16384 // 12 <= slot < (shard + 1) * 16384 // 12


def test_a_single_server_keeps_its_key_layout() -> None:
    backend = from_url("redis://127.0.0.1:6379/0?prefix=tt")
    assert isinstance(backend, RedisBackend)
    layout = backend.layout
    assert layout.shards == 1
    assert layout.log_key("alpha") == "tt:log:alpha"
    assert layout.store_keys("alpha") == ("tt:last:alpha", "tt:last-ts:alpha",
                                          "tt:presence:alpha", "tt:presence-ts:alpha")
    assert (layout.feed_key(0), layout.newest_key(0), layout.marker_key(0)) == (
        "tt:all", "tt:log-newest", "tt:last-known")


async def test_each_shard_of_a_cluster_gets_its_last_known_back_once(
    redis_cluster: RedisClusterGroup,
) -> None:
    """A new prefix is a cluster whose every shard lost its last-known store: one recovery
    gives each team back through its own shard's node (one script per team, its keys in one
    slot), then marks every shard whole."""
    backend = from_url(redis_cluster.url(query=f"prefix={_prefix()}&shards=6"))
    assert isinstance(backend, RedisBackend)
    teams = [f"team-{n}" for n in range(12)]
    assert len({backend.layout.shard_of(team) for team in teams}) > 1
    events = [position(team, "w1", 1) for team in teams]

    async def load() -> list[Event]:
        return events

    await backend.start()
    try:
        assert await backend.recover_last_known(load) == len(events)
        for team in teams:
            assert set((await backend.snapshot(team)).positions) == {"w1"}
        assert await backend.recover_last_known(load) == 0
    finally:
        await backend.close()


async def test_the_all_teams_feed_is_spread_over_every_primary(
    redis_cluster: RedisClusterGroup, output_dir: Path
) -> None:
    prefix = _prefix()
    backend = from_url(redis_cluster.url(query=f"prefix={prefix}"))
    await backend.start()
    assert isinstance(backend, RedisBackend)
    teams = [f"team-{number:03d}" for number in range(120)]
    for seq in range(5):
        await backend.publish([position(team, "w1", seq) for team in teams])
    await backend.close()
    per_node: dict[int, dict[str, int]] = {}
    for port, ranges in redis_cluster.primaries().items():
        client = redis_cluster.node_client(port)
        try:
            feeds = entries = teams_there = 0
            for shard in range(backend.layout.shards):
                key = backend.layout.feed_key(shard)
                slot = key_slot(key.encode())
                if any(first <= slot <= last for first, last in ranges):
                    feeds += 1
                    entries += int(client.xlen(key))
            for team in teams:
                slot = key_slot(backend.layout.log_key(team).encode())
                if any(first <= slot <= last for first, last in ranges):
                    teams_there += 1
        finally:
            client.close()
        per_node[port] = {"feed_shards": feeds, "feed_entries": entries, "teams": teams_there}
    print(f"\nper primary {per_node}")
    (output_dir / "spread.json").write_text(json.dumps(
        {str(port): counts for port, counts in per_node.items()}, indent=2) + "\n")
    assert len(per_node) == 3
    assert sum(counts["teams"] for counts in per_node.values()) == len(teams)
    for counts in per_node.values():
        assert counts["feed_shards"] == backend.layout.shards // 3
        # Each publish of 120 teams is one feed entry per shard it touched: 5 per shard.
        assert counts["feed_entries"] >= 5 * (counts["feed_shards"] - 1)
        assert counts["teams"] >= 20


# A primary killed under load ------------------------------------------------------------------
@dataclass
class ClusterFailoverRun:
    wait: bool
    acknowledged: set[int] = field(default_factory=set)
    attempts: int = 0
    failures: int = 0
    seen_live: list[tuple[str, int]] = field(default_factory=list)
    seen_group: list[tuple[str, int]] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    killed_at: float = 0.0
    promoted_after_s: float = 0.0
    stored: list[tuple[str, int]] = field(default_factory=list)
    teams: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        expected = {(team, seq) for team in self.teams for seq in self.acknowledged}
        stored = Counter(self.stored)
        after_kill = [t for t in self.accepted_at if t > self.killed_at]
        gaps = [b - a for a, b in zip(self.accepted_at, self.accepted_at[1:], strict=False)]
        return {
            "wait_replicas": 1 if self.wait else 0,
            "acknowledged_batches": len(self.acknowledged),
            "acknowledged_positions": len(expected),
            "stored_positions": len(stored),
            "missing": len(expected - set(stored)),
            "duplicated": sum(count - 1 for count in stored.values()),
            "publish_failures": self.failures,
            "failover_servers_s": round(self.promoted_after_s, 2),
            "kill_to_next_accepted_s": round(after_kill[0] - self.killed_at, 2)
            if after_kill else None,
            "longest_publish_pause_s": round(max(gaps), 2) if gaps else None,
            "live_reader_missed": len(set(stored) - set(self.seen_live)),
            "group_missed": len(set(stored) - set(self.seen_group)),
        }


PUBLISH_INTERVAL_S = 0.02
RETRY_S = 0.05
TEAMS = [f"team-{number:02d}" for number in range(12)]


async def _cluster_failover_run(
    group: RedisClusterGroup, *, wait: bool, lagging: bool, before_s: float, after_s: float
) -> ClusterFailoverRun:
    prefix = _prefix()
    query = f"prefix={prefix}&claim_idle_ms=1000"
    if wait:
        query += "&wait_replicas=1&wait_timeout_ms=500"
    backend = from_url(group.url(query=query))
    await backend.start()
    assert isinstance(backend, RedisBackend)
    run = ClusterFailoverRun(wait, teams=TEAMS)
    stop_publishing = asyncio.Event()

    async def publisher() -> None:
        seq = 0
        while not stop_publishing.is_set():
            events = [position(team, "w1", seq) for team in TEAMS]
            while True:  # like the bridge: a refused batch is published again, never dropped
                run.attempts += 1
                try:
                    await backend.publish(events)
                    break
                except BackendError:
                    run.failures += 1
                    await asyncio.sleep(RETRY_S)
            run.acknowledged.add(seq)
            run.accepted_at.append(time.monotonic())
            seq += 1
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def live_reader() -> None:
        subscription = backend.subscribe()
        for team in TEAMS:
            await subscription.add(team, START_OF_LOG)
        try:
            async for item in subscription:
                if isinstance(item, Batch):
                    run.seen_live.extend((item.team, seq) for seq in _seqs(item.raw))
        finally:
            await subscription.close()

    async def group_member() -> None:
        consumer = backend.consume("ingest", "ingest-1", start="earliest", acknowledge=True)
        try:
            async for item in consumer:
                run.seen_group.extend((item.batch.team, seq) for seq in _seqs(item.batch.raw))
                with contextlib.suppress(Exception):  # the primary may be gone: redelivered
                    await consumer.acknowledge([item])
        finally:
            await consumer.close()

    tasks = [asyncio.create_task(task()) for task in (publisher, live_reader, group_member)]
    try:
        await asyncio.sleep(before_s)
        slot = key_slot(backend.layout.log_key(TEAMS[0]).encode())
        old_primary = await asyncio.to_thread(group.owner_of, slot)
        replicas = await asyncio.to_thread(group.replicas_of, old_primary)
        if lagging:
            await asyncio.to_thread(_cut_replica_links, group, old_primary, replicas)
        await asyncio.to_thread(group.kill_node, old_primary)
        run.killed_at = time.monotonic()
        for port in replicas:
            group.pause(port, False)
        await asyncio.to_thread(group.wait_for_new_owner, slot, old_primary)
        run.promoted_after_s = time.monotonic() - run.killed_at
        deadline = time.monotonic() + 30
        while not [t for t in run.accepted_at if t > run.killed_at]:
            assert time.monotonic() < deadline, "no publish accepted after the failover"
            await asyncio.sleep(0.05)
        await asyncio.sleep(after_s)
        stop_publishing.set()
        await asyncio.wait_for(tasks[0], 30)
        run.stored = await asyncio.to_thread(_stored, group, backend)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
            set(run.stored) <= set(run.seen_live) and set(run.stored) <= set(run.seen_group)
        ):
            await asyncio.sleep(0.1)
    finally:
        stop_publishing.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.close()
    return run


def _cut_replica_links(group: RedisClusterGroup, primary: int, replicas: list[int]) -> None:
    """Replicas that fall behind: stopped, their links to the primary closed, for 0.5 s of
    traffic that only the primary gets (and acknowledges, without the replica wait)."""
    for port in replicas:
        group.pause(port, True)
    client = group.node_client(primary)
    try:
        client.execute_command("CLIENT", "KILL", "TYPE", "replica")
    finally:
        client.close()
    time.sleep(0.5)


def _seqs(raw: bytes) -> list[int]:
    return [int(item["p"]["seq"]) for item in orjson.loads(raw)]


def _stored(group: RedisClusterGroup, backend: RedisBackend) -> list[tuple[str, int]]:
    """Every (team, seq) in the team logs, read from the node serving each (duplicates kept);
    the feed shards hold the same."""
    layout = backend.layout
    stored: list[tuple[str, int]] = []
    in_feed: list[tuple[str, int]] = []
    for team in TEAMS:
        client = group.node_client(group.owner_of(key_slot(layout.log_key(team).encode())))
        try:
            entries: Any = client.xrange(layout.log_key(team))
        finally:
            client.close()
        stored += [(team, seq) for _id, fields in entries for seq in _seqs(fields[b"b"])]
    for shard in range(layout.shards):
        key = layout.feed_key(shard)
        client = group.node_client(group.owner_of(key_slot(key.encode())))
        try:
            entries = client.xrange(key)
        finally:
            client.close()
        for _id, fields in entries:
            for team, raw in fields.items():
                in_feed += [(team.decode(), seq) for seq in _seqs(raw)]
    assert sorted(in_feed) == sorted(stored), "the team logs and the feed disagree"
    return stored


# About a minute for the four: `make faults` (and `-m faults`) runs them, `make test` does not.
@pytest.mark.faults
@pytest.mark.extended
@pytest.mark.parametrize(
    ("wait", "replicas", "lagging"),
    [
        pytest.param(True, 2, False, id="wait-kill"),
        pytest.param(False, 1, False, id="nowait-kill"),
        pytest.param(True, 2, True, id="wait-lagging-replicas"),
        pytest.param(False, 1, True, id="nowait-lagging-replica"),
    ],
)
async def test_a_primary_killed_under_load(
    tmp_path: Path, output_dir: Path, wait: bool, replicas: int, lagging: bool
) -> None:
    """SIGKILL the primary serving a team's shard while ~50 batches/s of 12 teams are
    published and read; a replica takes over (cluster-node-timeout 1 s). With the replica
    wait nothing acknowledged is lost; without it, what was lost is reported (on loopback a
    plain kill usually loses nothing; replicas whose links dropped 0.5 s before the kill lose
    what the primary acknowledged meanwhile).

    With the wait, each primary has two replicas: the promoted one must still have a replica
    to confirm its writes (with one replica per primary, every publish to that shard is
    refused until the old primary is back as a replica, as under Sentinel)."""
    group = start_redis_cluster(tmp_path / "rcluster", password=PASSWORD, replicas=replicas)
    try:
        run = await _cluster_failover_run(
            group, wait=wait, lagging=lagging, before_s=3.0, after_s=3.0
        )
    finally:
        group.stop()
    summary = {"replicas_per_primary": replicas, "lagging_replicas": lagging, **run.summary()}
    print(f"\ncluster failover {summary}")
    (output_dir / "cluster-failover.json").write_text(json.dumps(summary, indent=2) + "\n")
    if wait:
        assert summary["missing"] == 0
    assert summary["acknowledged_batches"] > 50
    assert summary["live_reader_missed"] == 0
    assert summary["group_missed"] == 0
