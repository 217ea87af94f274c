"""`redis+sentinel://` against real servers: a primary, a replica and three Sentinels.

The contract suite over Sentinel (with the replica wait on), the URL's strict parsing, the
replica wait refusing a publish the replica did not confirm, and failovers under load: a
publisher, a live subscription and a consumer group member while the primary is SIGKILLed,
counting what was acknowledged, stored, missing and duplicated (figures printed, and written
under test-output/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from backend_contract import BackendContract, position
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool

from teamtrack.backends import START_OF_LOG, Backend, BackendError, Batch, from_url
from teamtrack.backends.redis import RedisBackend
from teamtrack.backends.redis_connect import SentinelTarget, parse_backend_url, safe_url
from teamtrack.ingress.batcher import Batcher
from teamtrack.local.servers import SentinelGroup, free_port, start_sentinel_group

PASSWORD = "sentinel-test-secret"


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """One group for the tests that do not kill anything; password-protected throughout."""
    group = start_sentinel_group(tmp_path_factory.mktemp("sentinel"), password=PASSWORD)
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def fresh_group(tmp_path: Path) -> Iterator[Callable[[int], SentinelGroup]]:
    """Groups of this test's own (`replicas` replicas), for tests that kill or stop servers."""
    groups: list[SentinelGroup] = []

    def start(replicas: int) -> SentinelGroup:
        group = start_sentinel_group(tmp_path / f"sentinel-{len(groups)}", replicas=replicas)
        groups.append(group)
        return group

    try:
        yield start
    finally:
        for group in groups:
            group.stop()


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


class TestRedisSentinelBackend(BackendContract):
    """The whole contract through the Sentinels, each publish confirmed by the replica."""

    @pytest.fixture(autouse=True)
    def _server(self, sentinel_group: SentinelGroup) -> None:
        self.group = sentinel_group
        # One prefix per test: the backends a test opens are instances of one deployment.
        self.prefix = _prefix()

    def make_backend(self, history: int) -> Backend:
        query = (f"prefix={self.prefix}&history={history}&claim_idle_ms=300"
                 "&sentinel_auth=same&wait_replicas=1&wait_timeout_ms=1000")
        return from_url(self.group.url(query=query))


# URL ------------------------------------------------------------------------------------------
def test_a_sentinel_url_names_sentinels_service_and_db() -> None:
    target = SentinelTarget.parse("redis+sentinel://app:p%40ss@s1:26380,[::1]:26381,s3/main/2")
    assert target.sentinels == (("s1", 26380), ("::1", 26381), ("s3", 26379))
    assert (target.service, target.db) == ("main", 2)
    assert (target.username, target.password) == ("app", "p@ss")
    assert SentinelTarget.parse("redis+sentinel://s1/main").db == 0
    server, options = parse_backend_url(
        "redis+sentinel://:pw@s1:26379/main/0?prefix=tt&wait_replicas=1&wait_timeout_ms=250"
        "&sentinel_auth=same"
    )
    assert server == "redis+sentinel://:pw@s1:26379/main/0"
    assert options == {"prefix": "tt", "wait_replicas": 1, "wait_timeout_ms": 250,
                       "sentinel_auth": True}
    backend = from_url(f"{server}?wait_replicas=1")
    assert isinstance(backend, RedisBackend)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "service name"),
        ("redis+sentinel://s1:26379/", "service name"),
        ("redis+sentinel://s1:26379/main/0/extra", "service name"),
        ("redis+sentinel://s1:26379/main/zero", "db must be a number"),
        ("redis+sentinel://s1:26379,,s2/main", "empty Sentinel address"),
        ("redis+sentinel://s1:port/main", "bad Sentinel port"),
        ("redis+sentinel://s1:70000/main", "bad Sentinel port"),
        ("redis+sentinel://[::1/main", "Invalid IPv6 URL"),
        ("redis+sentinel://[::1]x/main", "bad Sentinel address"),
        ("redis+sentinel://s1/main?wait_replica=1", "unknown redis URL option 'wait_replica'"),
        ("redis+sentinel://s1/main?history=ten", "history must be an integer"),
        ("redis+sentinel://s1/main?history=1&history=2", "exactly one value"),
        ("redis+sentinel://s1/main?wait_timeout_ms=100", "needs wait_replicas"),
        ("redis+sentinel://s1/main?wait_replicas=1&wait_timeout_ms=0", "waits forever"),
        ("redis+sentinel://s1/main?wait_replicas=-1", "wait_replicas must be"),
        ("redis+sentinel://s1/main?sentinel_auth=yes", "sentinel_auth is one of"),
        ("redis://127.0.0.1:6379/0?sentinel_auth=same", "redis+sentinel:// URLs only"),
        ("redis://127.0.0.1:6379/0?claim_idle=5", "unknown redis URL option 'claim_idle'"),
    ],
)
def test_a_bad_url_is_refused_with_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        from_url(url)


def test_errors_about_credentials_never_show_the_password() -> None:
    # A password written without its colon would be taken for a user name: refused, unechoed.
    with pytest.raises(ValueError, match="user:password@") as refused:
        from_url("redis+sentinel://hunter2@s1/main")
    assert "hunter2" not in str(refused.value)
    assert safe_url("redis+sentinel://app:hunter2@s1:1,s2:2/main/0?prefix=x") == (
        "redis+sentinel://app:***@s1:1,s2:2/main/0?prefix=x"
    )
    assert safe_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"


async def test_unreachable_sentinels_are_a_clear_error_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis+sentinel://app:{PASSWORD}@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/main"
    backend = from_url(url)
    with pytest.raises(BackendError, match="unreachable") as failed:
        await backend.start()
    await backend.close()
    assert "app:***@" in str(failed.value)
    assert "No master found for 'main'" in str(failed.value)
    assert PASSWORD not in str(failed.value)
    assert PASSWORD not in caplog.text


async def test_the_backend_follows_the_primary_the_sentinels_name(
    sentinel_group: SentinelGroup,
) -> None:
    """The pool and the blocking readers go where the Sentinels say, not to a fixed host."""
    backend = from_url(sentinel_group.url(query=f"prefix={_prefix()}&sentinel_auth=same"))
    await backend.start()
    assert isinstance(backend, RedisBackend)
    pool = backend.client.connection_pool
    # Sentinel-managed, and still a pool where a command waits for a free connection.
    assert isinstance(pool, SentinelConnectionPool)
    assert isinstance(pool, BlockingConnectionPool)
    info: Any = await backend.client.info("server")
    assert int(info["tcp_port"]) == sentinel_group.primary_port()
    reader = backend.new_client()
    assert isinstance(reader.connection_pool, SentinelConnectionPool)
    role: Any = await reader.execute_command("ROLE")
    assert role[0] == b"master"
    await reader.aclose()
    await backend.close()


# The replica wait -----------------------------------------------------------------------------
async def test_a_publish_the_replica_did_not_confirm_fails_and_the_bridge_holds_it(
    fresh_group: Callable[[int], SentinelGroup],
) -> None:
    """WAIT reports 0 of 1 replicas while the replica is stopped: the publish raises, so the
    bridge's batcher keeps the events and retries, and a QoS 1 message's PUBACK waits; once
    the replica is back the retry goes through."""
    group = fresh_group(1)
    prefix = _prefix()
    backend = from_url(group.url(query=f"prefix={prefix}&wait_replicas=1&wait_timeout_ms=200"))
    await backend.start()
    assert isinstance(backend, RedisBackend)
    await backend.publish([position("alpha", "w1", 0)])
    primary = group.primary_port()
    replica = next(port for port in group.servers if port != primary)
    replica_process = group.servers[replica].process
    assert replica_process is not None
    os.kill(replica_process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="0 of 1 replica"):
            await backend.publish([position("alpha", "w1", 1)])
        assert 0.15 < time.monotonic() - started < 2.0
        batcher = Batcher(backend.publish, max_batch=100, max_pending=100)
        running = asyncio.create_task(batcher.run())
        acknowledged = batcher.submit_nowait(position("alpha", "w1", 2))
        await asyncio.sleep(0.6)
        assert not acknowledged.done()  # held: no PUBACK for what the replica lacks
    finally:
        os.kill(replica_process.pid, signal.SIGCONT)
    await asyncio.wait_for(acknowledged, 10)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    # At least once: the refused attempts reached the primary and are stored as well.
    stored = _stored_seqs(group, group.primary_port(), prefix)
    assert set(stored) == {0, 1, 2}
    assert stored.count(2) >= 1
    await backend.close()


async def test_a_waiting_publish_reloads_a_script_redis_forgot(
    sentinel_group: SentinelGroup,
) -> None:
    """NOSCRIPT for the publish script, with WAIT pipelined behind it: WAIT's reply is read
    too (the connection stays usable), the script is loaded again and the publish retried."""
    prefix = _prefix()
    backend = from_url(sentinel_group.url(
        query=f"prefix={prefix}&sentinel_auth=same&wait_replicas=1"))
    await backend.start()
    assert isinstance(backend, RedisBackend)
    await backend.publish([position("alpha", "w1", 0)])
    await backend.client.script_flush()
    await backend.publish([position("alpha", "w1", 1)])
    await backend.publish([position("alpha", "w1", 2)])
    stored = _stored_seqs(sentinel_group, sentinel_group.primary_port(), prefix)
    assert stored == [0, 1, 2]
    await backend.close()


# Failover under load --------------------------------------------------------------------------
@dataclass
class FailoverRun:
    wait: bool
    lagging_replica: bool
    acknowledged: set[int] = field(default_factory=set)
    attempts: int = 0
    failures: int = 0
    seen_live: list[int] = field(default_factory=list)
    seen_group: list[int] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    killed_at: float = 0.0
    promoted_after_s: float = 0.0
    stored: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        stored = Counter(self.stored)
        after_kill = [t for t in self.accepted_at if t > self.killed_at]
        gaps = [b - a for a, b in zip(self.accepted_at, self.accepted_at[1:], strict=False)]
        return {
            "wait_replicas": 1 if self.wait else 0,
            "lagging_replica": self.lagging_replica,
            "acknowledged": len(self.acknowledged),
            "stored": len(stored),
            "missing": len(self.acknowledged - set(stored)),
            "duplicated": sum(count - 1 for count in stored.values()),
            "stored_unacknowledged": len(set(stored) - self.acknowledged),
            "publish_failures": self.failures,
            "failover_servers_s": round(self.promoted_after_s, 2),
            "kill_to_next_accepted_s": round(after_kill[0] - self.killed_at, 2)
            if after_kill else None,
            "longest_publish_pause_s": round(max(gaps), 2) if gaps else None,
            "live_reader_missed": len(set(stored) - set(self.seen_live)),
            "group_missed": len(set(stored) - set(self.seen_group)),
            "seen_but_not_stored": len(set(self.seen_live) - set(stored)),
        }


PUBLISH_INTERVAL_S = 0.02  # ~50 batches/s
RETRY_S = 0.05


async def _failover_run(
    group: SentinelGroup, *, wait: bool, lagging_replica: bool, before_s: float, after_s: float
) -> FailoverRun:
    prefix = _prefix()
    query = f"prefix={prefix}&claim_idle_ms=1000"
    if wait:
        query += "&wait_replicas=1&wait_timeout_ms=500"
    backend = from_url(group.url(query=query))
    await backend.start()
    run = FailoverRun(wait, lagging_replica)
    stop_publishing = asyncio.Event()

    async def publisher() -> None:
        seq = 0
        while not stop_publishing.is_set():
            events = [position("alpha", "w1", seq)]
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
        await subscription.add("alpha", START_OF_LOG)
        try:
            async for item in subscription:
                if isinstance(item, Batch):
                    run.seen_live.extend(_seqs(item.raw))
        finally:
            await subscription.close()

    async def group_member() -> None:
        consumer = backend.consume("ingest", "ingest-1", start="earliest", acknowledge=True)
        try:
            async for item in consumer:
                run.seen_group.extend(_seqs(item.batch.raw))
                with contextlib.suppress(Exception):  # the primary may be gone: redelivered
                    await consumer.acknowledge([item])
        finally:
            await consumer.close()

    tasks = [asyncio.create_task(task()) for task in (publisher, live_reader, group_member)]
    try:
        await asyncio.sleep(before_s)
        old_primary = group.primary_port()
        if lagging_replica:
            await asyncio.to_thread(_cut_replica_link, group, old_primary)
        await asyncio.to_thread(group.kill_primary)
        run.killed_at = time.monotonic()
        if lagging_replica:
            _resume_replicas(group, old_primary)
        new_primary = await asyncio.to_thread(group.wait_for_new_primary, old_primary)
        run.promoted_after_s = time.monotonic() - run.killed_at
        # Keep publishing until well after publishes go through again.
        deadline = time.monotonic() + 20
        while not [t for t in run.accepted_at if t > run.killed_at]:
            assert time.monotonic() < deadline, "no publish accepted after the failover"
            await asyncio.sleep(0.05)
        await asyncio.sleep(after_s)
        stop_publishing.set()
        # A publish caught on a connection whose server stopped answering without closing it
        # (a replica that was stopped, then promoted) waits out the socket timeout (15 s).
        await asyncio.wait_for(tasks[0], 30)
        run.stored = await asyncio.to_thread(_stored_seqs, group, new_primary, prefix)
        # The readers reconnect with backoff: give them time to catch up.
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
        _resume_replicas(group, None)
        await backend.close()
    return run


def _cut_replica_link(group: SentinelGroup, primary: int) -> None:
    """Replicas that fall behind: stopped, their links to the primary closed, for 0.5 s of
    traffic that only the primary gets (and acknowledges, without the replica wait)."""
    for port, server in group.servers.items():
        if port != primary and server.process is not None:
            os.kill(server.process.pid, signal.SIGSTOP)
    client = group.server_client(primary)
    try:
        client.execute_command("CLIENT", "KILL", "TYPE", "replica")
    finally:
        client.close()
    time.sleep(0.5)


def _resume_replicas(group: SentinelGroup, primary: int | None) -> None:
    for port, server in group.servers.items():
        if port != primary and server.running() and server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)


def _seqs(raw: bytes) -> list[int]:
    return [int(item["p"]["seq"]) for item in orjson.loads(raw)]


def _stored_seqs(group: SentinelGroup, port: int, prefix: str) -> list[int]:
    """Every seq in the team log on that server, read directly (duplicates kept)."""
    client = group.server_client(port)
    try:
        entries: Any = client.xrange(f"{prefix}:log:alpha")
        all_entries: Any = client.xrange(f"{prefix}:all")
    finally:
        client.close()
    stored = [seq for _id, fields in entries for seq in _seqs(fields[b"b"])]
    in_all = [seq for _id, fields in all_entries for seq in _seqs(fields[b"alpha"])]
    assert sorted(in_all) == sorted(stored), "the team log and the all-teams stream disagree"
    return stored


@pytest.mark.parametrize(
    ("wait", "lagging_replica", "before_s", "after_s"),
    [
        pytest.param(True, False, 4.0, 3.0, id="wait-kill", marks=pytest.mark.extended),
        pytest.param(False, False, 4.0, 3.0, id="nowait-kill"),
        pytest.param(True, True, 2.0, 2.0, id="wait-lagging-replica"),
        pytest.param(False, True, 2.0, 2.0, id="nowait-lagging-replica",
                     marks=pytest.mark.extended),
    ],
)
async def test_a_failover_under_load(
    fresh_group: Callable[[int], SentinelGroup],
    output_dir: Path,
    wait: bool,
    lagging_replica: bool,
    before_s: float,
    after_s: float,
) -> None:
    """SIGKILL the primary while ~50 batches/s are published and read. With the replica wait
    nothing acknowledged is lost; without it, what was lost is reported (on loopback the
    replica is microseconds behind, so a plain kill usually loses nothing; a replica whose link
    dropped just before loses everything acknowledged meanwhile)."""
    # Two replicas: after the failover the new primary still has one, which confirms writes
    # (with a single replica, a publish that waits for one is refused until the old primary
    # comes back as a replica).
    run = await _failover_run(
        fresh_group(2), wait=wait, lagging_replica=lagging_replica, before_s=before_s,
        after_s=after_s,
    )
    summary = run.summary()
    print(f"\nfailover {summary}")
    (output_dir / "failover.json").write_text(json.dumps(summary, indent=2) + "\n")
    if wait:
        assert summary["missing"] == 0
    assert summary["acknowledged"] > 50
    # Every stored batch reaches a live reader and the consumer group, at least once.
    assert summary["live_reader_missed"] == 0
    assert summary["group_missed"] == 0


async def test_what_the_replica_wait_costs_per_publish(
    sentinel_group: SentinelGroup, output_dir: Path
) -> None:
    """Sequential one-event publishes with and without WAIT, interleaved so that both see the
    same load of the machine; printed, not asserted (timing on a shared machine)."""
    backends = {}
    for name, extra in (("no-wait", ""), ("wait_replicas=1", "&wait_replicas=1")):
        backends[name] = from_url(sentinel_group.url(
            query=f"prefix={_prefix()}&sentinel_auth=same{extra}"))
        await backends[name].start()
    latencies: dict[str, list[float]] = {name: [] for name in backends}
    for seq in range(520):
        for name, backend in backends.items():
            started = time.perf_counter()
            await backend.publish([position("alpha", "w1", seq)])
            if seq >= 20:  # the first ones warm up connections and the script
                latencies[name].append((time.perf_counter() - started) * 1000)
    figures = {}
    for name, backend in backends.items():
        await backend.close()
        cuts = statistics.quantiles(latencies[name], n=100)
        figures[name] = {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3)}
    print(f"\npublish latency {figures}")
    (output_dir / "wait-latency.json").write_text(json.dumps(figures, indent=2) + "\n")
