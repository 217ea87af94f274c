from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from backend_contract import BackendContract, position
from redis.asyncio import Connection

from teamtrack.backends import START_OF_LOG, Backend, BackendError, Batch, Event, Gap, from_url
from teamtrack.backends.redis import RedisBackend
from teamtrack.local.servers import free_port, start_redis


class TestRedisBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str) -> None:
        self.url = redis_url

    def make_backend(self, history: int) -> Backend:
        # A short claim time, so that a crashed member's batches reach another one quickly.
        return from_url(f"{self.url}&history={history}&claim_idle_ms=300")

    async def write_malformed_revocations(self, backend: Backend) -> bool:
        assert isinstance(backend, RedisBackend)
        for fields in ({"x": "y"}, {"s": "session-x", "e": "soon"}):
            await backend.client.xadd(backend.revocations_key, fields)
        return True


async def test_a_member_restarted_under_its_name_gets_its_pending_batches_at_once(
    redis_url: str,
) -> None:
    backend = from_url(f"{redis_url}&claim_idle_ms=60000")
    await backend.start()
    await backend.publish([position("alpha", "w1", seq) for seq in range(3)])
    await backend.publish([position("bravo", "w1", 0)])
    first = backend.consume("ingest", "ingest-1", start="earliest")
    delivered = [await asyncio.wait_for(anext(first), 5) for _ in range(2)]
    assert {item.batch.team for item in delivered} == {"alpha", "bravo"}
    await first.close()
    # Same name, long claim time: its own pending entries come back without waiting for idle.
    started = time.monotonic()
    again = backend.consume("ingest", "ingest-1", start="earliest")
    redelivered = [await asyncio.wait_for(anext(again), 5) for _ in range(2)]
    assert time.monotonic() - started < 2.0
    assert sorted(item.batch.team for item in redelivered) == ["alpha", "bravo"]
    for item in redelivered:
        await item.ack()
    await again.close()
    # An entry is acknowledged once every team batch cut from it is: nothing is pending now.
    last = backend.consume("ingest", "ingest-1", start="earliest")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(last), 1.0)
    await last.close()
    await backend.close()


async def test_unreachable_redis_is_a_clear_error() -> None:
    from teamtrack.local.servers import free_port

    backend = from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(BackendError, match="unreachable"):
        await backend.start()
    await backend.close()


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"memory://, redis://"):
        from_url("mongodb://localhost")


async def test_a_slow_member_is_not_handed_its_own_batches_again(redis_url: str) -> None:
    backend = from_url(f"{redis_url}&claim_idle_ms=200")
    await backend.start()
    await backend.publish([position("alpha", "w1", 0)])
    consumer = backend.consume("ingest", "slow", start="earliest")
    held = await asyncio.wait_for(anext(consumer), 5)
    # Held unacknowledged for longer than the claim time: its own sweeps claim it (keeping
    # other members off it) without delivering it a second time.
    await asyncio.sleep(0.6)
    await backend.publish([position("alpha", "w1", 1)])
    following = await asyncio.wait_for(anext(consumer), 5)
    assert [e.body for e in following.batch.events()] != [e.body for e in held.batch.events()]
    await held.ack()
    await following.ack()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(consumer), 0.6)
    await consumer.close()
    await backend.close()


async def test_publish_reloads_its_script_after_redis_forgot_it(redis_url: str) -> None:
    """A restarted Redis (or SCRIPT FLUSH) has no scripts: the publish loads it again."""
    backend = from_url(redis_url)
    await backend.start()
    assert isinstance(backend, RedisBackend)
    await backend.publish([position("alpha", "w1", 0)])
    await backend.client.script_flush()
    await backend.publish([position("alpha", "w1", 1)])
    subscription = backend.subscribe()
    await subscription.add("alpha", START_OF_LOG)
    seqs = []
    for _ in range(2):
        batch = await asyncio.wait_for(anext(subscription), 5)
        assert isinstance(batch, Batch)
        seqs += [orjson.loads(event.body)["seq"] for event in batch.events()]
    assert seqs == [0, 1]
    await subscription.close()
    await backend.close()


async def test_a_log_without_a_recorded_newest_id_still_chains_its_entries(
    redis_url: str,
) -> None:
    """Logs written before the newest-id hash existed: the next entry names its real predecessor,
    so a cursor into the older part of the log still detects trimming exactly."""
    backend = from_url(f"{redis_url}&history=3")
    await backend.start()
    assert isinstance(backend, RedisBackend)
    await backend.publish([position("alpha", "w1", 0)])
    first = (await backend.snapshot("alpha")).cursor
    await backend.client.delete(f"{backend.prefix}:log-newest")
    await backend.publish([position("alpha", "w1", 1)])
    entries = await backend.client.xrange(backend.log_key("alpha"))
    assert entries[-1][1][b"p"].decode() == first
    assert not await backend.trimmed_after("alpha", first)
    await backend.close()


async def test_logs_are_trimmed_by_age_as_well_as_by_entries(redis_url: str) -> None:
    """An entry is a batch whose size follows the load: only an age cap bounds the memory of a
    steady load. A viewer whose cursor fell out of the window gets a gap, as after any trim."""
    backend = from_url(f"{redis_url}&history_ms=500&group_history_ms=500")
    await backend.start()
    assert isinstance(backend, RedisBackend)
    # More than one radix-tree node (100 entries at most) of old entries: `~` trims whole nodes.
    for seq in range(250):
        await backend.publish([position("alpha", "w1", seq)])
    oldest_cursor = (await backend.client.xrange(backend.log_key("alpha"), count=1))[0][0]
    assert await backend.client.xlen(backend.all_key) == 250
    await asyncio.sleep(0.6)
    await backend.publish([position("alpha", "w1", 250)])
    log_length = await backend.client.xlen(backend.log_key("alpha"))
    all_length = await backend.client.xlen(backend.all_key)
    assert log_length < 101 and all_length < 101
    assert await backend.trimmed_after("alpha", oldest_cursor.decode())
    # The entry cap still applies, the age cap off: nothing young is trimmed.
    kept_url = redis_url.replace("?prefix=", "?prefix=kept-")
    kept = from_url(f"{kept_url}&history_ms=0&group_history_ms=0")
    await kept.start()
    assert isinstance(kept, RedisBackend)
    for seq in range(250):
        await kept.publish([position("alpha", "w1", seq)])
    await asyncio.sleep(0.6)
    await kept.publish([position("alpha", "w1", 250)])
    assert await kept.client.xlen(kept.log_key("alpha")) == 251
    await kept.close()
    await backend.close()


async def test_a_group_counts_what_was_trimmed_before_it_read_it(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = from_url(redis_url)
    await backend.start()
    assert isinstance(backend, RedisBackend)
    # Trimmed before the group existed: not the group's loss.
    for seq in range(5):
        await backend.publish([position("alpha", "w1", seq)])
    await backend.client.xtrim(backend.all_key, maxlen=2, approximate=False)
    consumer = backend.consume("ingest", "ingest-1", start="earliest")
    for _ in range(2):
        await (await asyncio.wait_for(anext(consumer), 5)).ack()
    # A quiet spell: what the group read is trimmed, nothing it had not read.
    await backend.publish([position("alpha", "w1", 5)])
    await backend.client.xtrim(backend.all_key, maxlen=1, approximate=False)
    await asyncio.sleep(1.1)
    await (await asyncio.wait_for(anext(consumer), 5)).ack()
    assert consumer.missed == 0
    # Paused while 10 entries came and 6 of them were trimmed unread.
    for seq in range(6, 16):
        await backend.publish([position("alpha", "w1", seq)])
    await backend.client.xtrim(backend.all_key, maxlen=4, approximate=False)
    await asyncio.sleep(1.1)
    seqs = []
    for _ in range(4):
        item = await asyncio.wait_for(anext(consumer), 5)
        seqs += [orjson.loads(event.body)["seq"] for event in item.batch.events()]
        await item.ack()
    assert seqs == [12, 13, 14, 15]
    assert consumer.missed == 6
    assert "6 entries after" in caplog.text
    await consumer.close()
    await backend.close()


def test_a_negative_cap_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="history_ms"):
        from_url("redis://127.0.0.1:6379/0?history_ms=-1")


async def test_a_reader_stops_when_a_send_loses_its_cancellation(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's asyncio.wait_for, through which redis-py sends, can swallow a cancellation
    that arrives as the send completes; the reader must stop all the same (a dashboard that
    stops waits for its reader)."""
    backend = from_url(redis_url)
    await backend.start()
    subscription = backend.subscribe()
    await subscription.add("alpha", START_OF_LOG)
    original = Connection.send_packed_command
    swallowed = asyncio.Event()

    async def send_losing_a_cancellation(self: Connection, *args: Any, **kwargs: Any) -> None:
        await original(self, *args, **kwargs)
        if swallowed.is_set():
            return
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # lost, as wait_for loses it when the send completes meanwhile

    monkeypatch.setattr(Connection, "send_packed_command", send_losing_a_cancellation)
    reading = asyncio.create_task(anext(subscription))
    while not reading.done() and not swallowed.is_set():
        await asyncio.sleep(0.01)
        if not reading.done() and not swallowed.is_set():
            reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reading, 5)
    assert swallowed.is_set()
    monkeypatch.undo()
    await subscription.close()
    await backend.close()


async def test_more_concurrent_commands_than_the_pool_holds_wait_for_a_connection(
    redis_url: str,
) -> None:
    """200 managers opening the map at once: 200 snapshots in flight, none refused."""
    from teamtrack.backends.redis_common import POOL_CONNECTIONS

    backend = from_url(redis_url)
    await backend.start()
    teams = [f"team-{number}" for number in range(3 * POOL_CONNECTIONS)]
    await backend.publish([position(team, "w1", 1) for team in teams])
    snapshots = await asyncio.gather(*(backend.snapshot(team) for team in teams))
    assert [set(snapshot.positions) for snapshot in snapshots] == [{"w1"}] * len(teams)
    await backend.close()


async def test_a_redis_that_lost_its_data_is_a_gap_for_every_reader(tmp_path: Path) -> None:
    """A Redis restarted without its data (no persistence, or a flushed database): the cursors
    readers hold are not in the new logs, and what they missed is gone. A live reader and a
    reader resuming from an old cursor both get a gap (they got a silent resume: 5
    acknowledged positions skipped after such a restart)."""
    port = free_port()
    server = start_redis(port, tmp_path / "before")
    url = f"redis://127.0.0.1:{port}/0"
    backend = from_url(url)
    await backend.start()
    live = backend.subscribe()
    try:
        for seq in range(3):
            await backend.publish([position("alpha", "w1", seq)])
        cursor = (await backend.snapshot("alpha")).cursor
        await live.add("alpha", cursor)
        server.stop()
        server = start_redis(port, tmp_path / "after")  # the same server, its data gone
        for seq in range(3, 5):
            for _attempt in range(50):
                try:
                    await backend.publish([position("alpha", "w1", seq)])
                    break
                except BackendError:
                    await asyncio.sleep(0.1)
        first = await asyncio.wait_for(anext(live), 10)
        assert first == Gap("alpha", cursor)
        second = await asyncio.wait_for(anext(live), 10)
        assert isinstance(second, Batch)
        assert [orjson.loads(e.body)["seq"] for e in second.events()] == [3]

        resuming = backend.subscribe()
        await resuming.add("alpha", cursor)
        assert await asyncio.wait_for(anext(resuming), 10) == Gap("alpha", cursor)
        await resuming.close()
    finally:
        await live.close()
        await backend.close()
        server.stop()


async def test_a_redis_that_restarts_during_a_recovery_is_recovered_again(tmp_path: Path) -> None:
    """A recovery reads the history, then Redis loses its data before the recovery writes: a
    position the history did not have yet when it was read (its row was committed a moment
    later; Redis had it) was in neither. The new, empty server was marked whole all the same,
    and that worker stayed missing from every snapshot for good. A recovery that spans a loss
    now gives up, and the next one reads the history again."""
    port = free_port()
    servers = [start_redis(port, tmp_path / "first")]
    url = f"redis://127.0.0.1:{port}/0"
    backend = from_url(url)
    await backend.start()
    alpha, bravo = position("alpha", "w1", 1), position("bravo", "w9", 2)

    async def reachable() -> None:
        for _attempt in range(100):
            try:
                await backend.snapshot("alpha")
                return
            except BackendError:
                await asyncio.sleep(0.05)
        raise AssertionError("the restarted redis never answered")

    async def load_across_a_loss() -> list[Event]:
        read = [alpha]  # bravo's row is not committed yet
        servers[0].stop()
        servers[0] = start_redis(port, tmp_path / "second")  # the same server, its data gone
        await reachable()
        return read

    async def load() -> list[Event]:
        return [alpha, bravo]

    try:
        await backend.publish([alpha, bravo])
        with contextlib.suppress(BackendError):
            await backend.recover_last_known(load_across_a_loss)
        await reachable()
        await backend.recover_last_known(load)
        assert set((await backend.snapshot("alpha")).positions) == {"w1"}
        assert set((await backend.snapshot("bravo")).positions) == {"w9"}
        assert await backend.recover_last_known(load) == 0  # whole now
    finally:
        await backend.close()
        servers[0].stop()


async def test_forget_worker_trims_a_quiet_teams_log_to_its_age(redis_url: str) -> None:
    """A team log is trimmed on writes: one that went quiet keeps its entries until the team
    writes again, unless an erasure trims it (to `history_ms`) at once."""

    async with from_url(f"{redis_url}&history_ms=200") as backend:
        await backend.publish([position("alpha", "w1", 1)])
        assert isinstance(backend, RedisBackend)
        assert await backend.client.xlen(backend.log_key("alpha")) == 1
        await asyncio.sleep(0.3)
        await backend.forget_worker("alpha", "w1")
        assert await backend.client.xlen(backend.log_key("alpha")) == 0
