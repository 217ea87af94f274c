"""The contract every broadcast backend passes; subclassed once per backend.

A subclass provides `make_backend(history)`; every test here runs against it, against the real
server of that backend.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from teamtrack.backends import (
    START_OF_LOG,
    Backend,
    Batch,
    Event,
    Gap,
    GroupBatch,
    SessionRevocation,
    TeamSubscription,
)
from teamtrack.contract import Kind

WAIT = 5.0


def position(team: str, worker: str, seq: int, ts: int | None = None, origin: str = "b1") -> Event:
    now = int(time.time() * 1000)
    fix_time = ts if ts is not None else now
    body = orjson.dumps({"lat": 52.5, "lon": 13.4 + seq / 1e5, "ts": fix_time, "seq": seq})
    return Event(team, worker, Kind.POSITION, body, origin, now, fix_time, qos=1)


def status(team: str, worker: str, word: str, received_ms: int | None = None) -> Event:
    now = received_ms if received_ms is not None else int(time.time() * 1000)
    return Event(team, worker, Kind.STATUS, word.encode(), "b1", now, now, qos=1)


def worker_event(team: str, worker: str, ts: int | None = None) -> Event:
    now = int(time.time() * 1000)
    when = ts if ts is not None else now
    body = orjson.dumps({"type": "transition", "event": "enter", "ts": when, "desc": "Depot"})
    return Event(team, worker, Kind.EVENT, body, "b1", now, when, qos=1)


async def next_item(subscription: TeamSubscription) -> Batch | Gap:
    return await asyncio.wait_for(anext(subscription), WAIT)


async def nothing_within(subscription: TeamSubscription, seconds: float) -> bool:
    try:
        await asyncio.wait_for(anext(subscription), seconds)
    except TimeoutError:
        return True
    return False


# When the revoked test sessions would have expired: 2100-01-01.
EXPIRES_AT = 4_102_444_800


def logout(number: int) -> SessionRevocation:
    return SessionRevocation(f"session-{number:04d}", EXPIRES_AT)


class BackendContract(abc.ABC):
    # Whether two instances of one URL share their data (two dashboards on one server do);
    # memory's live in one process each, so its revocations are read back on the same one.
    instances_share = True

    @abc.abstractmethod
    def make_backend(self, history: int) -> Backend: ...

    async def write_malformed_revocations(self, backend: Backend) -> bool:
        """Append revocation entries that no dashboard wrote (wrong fields, not a number);
        False where the backend has no way in for them."""
        return False

    @pytest.fixture
    async def open_backend(self) -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
        opened: list[Backend] = []

        async def open_one(history: int = 1000) -> Backend:
            backend = self.make_backend(history)
            await backend.start()
            opened.append(backend)
            return backend

        yield open_one
        for backend in opened:
            await backend.close()

    async def test_publish_round_trips_events_byte_for_byte(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        subscription = backend.subscribe()
        await subscription.add("alpha", (await backend.snapshot("alpha")).cursor)
        sent = [
            position("alpha", "w1", 0),
            status("alpha", "w1", "online"),
            position("alpha", "w2", 7),
        ]
        await backend.publish(sent)
        batch = await next_item(subscription)
        assert isinstance(batch, Batch)
        assert batch.team == "alpha"
        assert batch.events() == sent
        await subscription.close()

    async def test_worker_events_are_logged_but_never_last_known(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        subscription = backend.subscribe()
        await subscription.add("alpha", (await backend.snapshot("alpha")).cursor)
        sent = [position("alpha", "w1", 0), worker_event("alpha", "w1"),
                worker_event("alpha", "w2")]
        await backend.publish(sent)
        batch = await next_item(subscription)
        assert isinstance(batch, Batch)
        assert batch.events() == sent
        snapshot = await backend.snapshot("alpha")
        assert set(snapshot.positions) == {"w1"}
        assert snapshot.presence == {}
        await subscription.close()

    async def test_one_batch_per_team_per_publish(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        subscription = backend.subscribe()
        for team in ("alpha", "bravo"):
            await subscription.add(team, (await backend.snapshot(team)).cursor)
        await backend.publish(
            [position("alpha", "w1", 0), position("bravo", "w1", 0), position("alpha", "w2", 0)]
        )
        received = {}
        for _ in range(2):
            batch = await next_item(subscription)
            assert isinstance(batch, Batch)
            received[batch.team] = [event.worker for event in batch.events()]
        assert received == {"alpha": ["w1", "w2"], "bravo": ["w1"]}
        assert await nothing_within(subscription, 0.3)
        await subscription.close()

    async def test_snapshot_keeps_newest_position_and_presence(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        now = int(time.time() * 1000)
        await backend.publish([position("alpha", "w1", 5, ts=now), status("alpha", "w1", "online")])
        # An older fix arriving late (a QoS 1 redelivery) must not move the worker back.
        await backend.publish([position("alpha", "w1", 4, ts=now - 1000)])
        await backend.publish([position("alpha", "w2", 1, ts=now)])
        snapshot = await backend.snapshot("alpha")
        assert set(snapshot.positions) == {"w1", "w2"}
        assert orjson.loads(snapshot.positions["w1"].body)["seq"] == 5
        assert snapshot.presence["w1"].body == b"online"
        assert (await backend.snapshot("nobody")).positions == {}

    async def test_forget_worker_removes_only_that_worker(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        await backend.snapshot("alpha")  # a store already read before the erasure, too
        await backend.publish([
            position("alpha", "w1", 1), status("alpha", "w1", "online"),
            position("alpha", "w2", 1), status("alpha", "w2", "online"),
            position("bravo", "w1", 1),
        ])
        assert await backend.forget_worker("alpha", "w1") == 2
        assert await backend.forget_worker("alpha", "w1") == 0
        readers = [backend]
        if self.instances_share:
            readers.append(await open_backend())  # one that reads the store afresh
        for reader in readers:
            snapshot = await reader.snapshot("alpha")
            assert set(snapshot.positions) == {"w2"}
            assert set(snapshot.presence) == {"w2"}
            assert set((await reader.snapshot("bravo")).positions) == {"w1"}
        # The worker comes back with its next message, like any other.
        await backend.publish([position("alpha", "w1", 2)])
        assert set((await backend.snapshot("alpha")).positions) == {"w1", "w2"}

    async def test_snapshot_cursor_then_live_misses_nothing(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        await backend.publish([position("alpha", "w1", 0)])
        snapshot = await backend.snapshot("alpha")
        await backend.publish([position("alpha", "w1", 1)])
        await backend.publish([position("alpha", "w1", 2)])
        subscription = backend.subscribe()
        await subscription.add("alpha", snapshot.cursor)
        seqs = []
        for _ in range(2):
            batch = await next_item(subscription)
            assert isinstance(batch, Batch)
            seqs += [orjson.loads(event.body)["seq"] for event in batch.events()]
        assert seqs == [1, 2]
        assert await nothing_within(subscription, 0.3)
        await subscription.close()

    async def test_cursors_resume_on_another_subscription(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        first = backend.subscribe()
        await first.add("alpha", (await backend.snapshot("alpha")).cursor)
        for seq in range(3):
            await backend.publish([position("alpha", "w1", seq)])
        batch = await next_item(first)
        assert isinstance(batch, Batch)
        await first.close()
        # A second reader (another dashboard instance) resumes after the first batch.
        second = backend.subscribe()
        await second.add("alpha", batch.cursor)
        seqs = []
        cursors = []
        for _ in range(2):
            resumed = await next_item(second)
            assert isinstance(resumed, Batch)
            cursors.append(backend.cursor_key(resumed.cursor))
            seqs += [orjson.loads(event.body)["seq"] for event in resumed.events()]
        assert seqs == [1, 2]
        assert backend.cursor_key(batch.cursor) < cursors[0] < cursors[1]
        await second.close()

    async def test_only_added_teams_are_delivered(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        subscription = backend.subscribe()
        await subscription.add("alpha", (await backend.snapshot("alpha")).cursor)
        await backend.publish([position("bravo", "w1", 0)])
        await backend.publish([position("alpha", "w1", 0)])
        batch = await next_item(subscription)
        assert isinstance(batch, Batch) and batch.team == "alpha"
        await subscription.remove("alpha")
        assert subscription.teams == frozenset()
        await backend.publish([position("alpha", "w1", 1)])
        assert await nothing_within(subscription, 0.3)
        await subscription.close()

    async def test_team_added_while_waiting_is_read_promptly(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        subscription = backend.subscribe()
        await subscription.add("alpha", (await backend.snapshot("alpha")).cursor)
        waiting = asyncio.create_task(next_item(subscription))
        await asyncio.sleep(0.2)  # the reader is now blocked on alpha only
        await subscription.add("bravo", (await backend.snapshot("bravo")).cursor)
        started = time.monotonic()
        await backend.publish([position("bravo", "w1", 0)])
        batch = await waiting
        assert isinstance(batch, Batch) and batch.team == "bravo"
        # Well under the backend's blocking-read timeout: the reader was woken, not polled.
        assert time.monotonic() - started < 1.0
        await subscription.close()

    async def test_start_of_log_reads_retained_history(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        for seq in range(3):
            await backend.publish([position("alpha", "w1", seq)])
        subscription = backend.subscribe()
        await subscription.add("alpha", START_OF_LOG)
        seqs = []
        for _ in range(3):
            batch = await next_item(subscription)
            assert isinstance(batch, Batch)
            seqs += [orjson.loads(event.body)["seq"] for event in batch.events()]
        assert seqs == [0, 1, 2]
        await subscription.close()

    async def test_gap_when_history_was_trimmed(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend(history=5)
        await backend.publish([position("alpha", "w1", 0)])
        old_cursor = (await backend.snapshot("alpha")).cursor
        for seq in range(1, 20):
            await backend.publish([position("alpha", "w1", seq)])
        subscription = backend.subscribe()
        await subscription.add("alpha", old_cursor)
        first = await next_item(subscription)
        assert first == Gap("alpha", old_cursor)
        seqs = []
        for _ in range(5):
            batch = await next_item(subscription)
            assert isinstance(batch, Batch)
            seqs += [orjson.loads(event.body)["seq"] for event in batch.events()]
        assert seqs == [15, 16, 17, 18, 19]
        await subscription.close()

    async def test_no_gap_when_history_is_intact(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend(history=50)
        await backend.publish([position("alpha", "w1", 0)])
        cursor = (await backend.snapshot("alpha")).cursor
        for seq in range(1, 20):
            await backend.publish([position("alpha", "w1", seq)])
        subscription = backend.subscribe()
        await subscription.add("alpha", cursor)
        first = await next_item(subscription)
        assert isinstance(first, Batch)
        assert orjson.loads(first.events()[0].body)["seq"] == 1
        await subscription.close()

    async def test_group_members_share_and_groups_each_get_all(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        # From the earliest entry: a member that starts at "latest" only sees what is published
        # after its group exists, a moment this contract does not expose (the cluster creates
        # one group per shard, 36 connections here); waiting a fixed time for it was flaky.
        for seq in range(10):
            await backend.publish([position("alpha", "w1", seq), position("bravo", "w1", seq)])
        member_a = backend.consume("mirror-x", "a", start="earliest")
        member_b = backend.consume("mirror-x", "b", start="earliest")
        other_group = backend.consume("ingest", "only", start="earliest", acknowledge=True)
        expected = {(team, seq) for team in ("alpha", "bravo") for seq in range(10)}
        shared, other = await asyncio.gather(
            _collect(len(expected), member_a, member_b), _collect(len(expected), other_group))
        assert sorted(shared) == sorted(expected)  # each batch to exactly one member
        assert sorted(other) == sorted(expected)
        for consumer in (member_a, member_b, other_group):
            await consumer.close()

    async def test_unacked_batches_reach_another_member_after_a_crash(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        for seq in range(6):
            await backend.publish([position("alpha", "w1", seq)])
        crashed = backend.consume("ingest-x", "first", start="earliest", acknowledge=True)
        delivered = [await asyncio.wait_for(anext(crashed), WAIT) for _ in range(6)]
        for item in delivered[:3]:
            await item.ack()
        # The member dies holding the other three: never acknowledged, never lost.
        await crashed.close()
        successor = backend.consume("ingest-x", "second", start="earliest", acknowledge=True)
        redelivered = await _drain(successor, 0.5)
        assert sorted(seq for _team, seq in redelivered) == [3, 4, 5]
        await successor.close()
        # Acknowledged by the successor: a third member gets nothing more.
        third = backend.consume("ingest-x", "third", start="earliest", acknowledge=True)
        assert await _drain(third, 0.5) == []
        await third.close()

    async def test_acknowledging_many_at_once_settles_exactly_those(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        for seq in range(4):
            await backend.publish([position("alpha", "w1", seq), position("bravo", "w1", seq)])
        crashed = backend.consume("ingest-y", "first", start="earliest", acknowledge=True)
        delivered = [await asyncio.wait_for(anext(crashed), WAIT) for _ in range(8)]
        settled = [
            item for item in delivered
            if orjson.loads(item.batch.events()[0].body)["seq"] < 2 or item.batch.team == "alpha"
        ]
        await crashed.acknowledge(settled)
        await crashed.close()
        successor = backend.consume("ingest-y", "second", start="earliest", acknowledge=True)
        redelivered = set(await _drain(successor, 0.5))
        await successor.close()
        # At least once: bravo 2 and 3 come again; alpha's part of the same publish may too
        # (a backend may keep both teams of one publish in one entry), nothing older does.
        assert {("bravo", 2), ("bravo", 3)} <= redelivered <= {
            ("bravo", 2), ("bravo", 3), ("alpha", 2), ("alpha", 3)
        }

    async def test_a_paced_member_gets_everything_and_reads_less_often(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        backend = await open_backend()
        pace = 0.6
        member = backend.consume("ingest-z", "paced", start="earliest", pace_s=pace)
        await backend.publish([position("alpha", "w1", 0)])
        first = await asyncio.wait_for(anext(member), WAIT)
        read_at = time.monotonic()
        for seq in range(1, 4):
            await backend.publish([position("alpha", "w1", seq)])
        rest = [await asyncio.wait_for(anext(member), WAIT) for _ in range(3)]
        waited = time.monotonic() - read_at
        await member.close()
        seqs = [orjson.loads(item.batch.events()[0].body)["seq"] for item in [first, *rest]]
        assert seqs == [0, 1, 2, 3]
        # The three were published right after the first read: they wait out the pace.
        assert waited >= pace * 0.9

    async def test_a_member_whose_pace_is_shortened_reads_at_once(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        """`set_pace(0)` (an on-demand mirror that found a reader) ends a wait for a long pace."""
        backend = await open_backend()
        member = backend.consume("mirror-z", "paced", start="earliest", pace_s=3600.0)
        await backend.publish([position("alpha", "w1", 0)])
        await asyncio.wait_for(anext(member), WAIT)
        await backend.publish([position("alpha", "w1", 1)])
        reading = asyncio.ensure_future(anext(member))
        await asyncio.sleep(0.2)  # now held by the pace
        member.set_pace(0.0)
        second = await asyncio.wait_for(reading, WAIT)
        await member.close()
        assert orjson.loads(second.batch.events()[0].body)["seq"] == 1

    async def test_revocations_reach_another_instance_in_order(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        writer = await open_backend()
        reader = await open_backend() if self.instances_share else writer
        found, position = await reader.session_revocations("")
        assert found == []
        revoked = [logout(number) for number in range(3)]
        for revocation in revoked:
            await writer.revoke_session(revocation, 3600)
        found, position = await reader.session_revocations(position)
        assert found == revoked
        # Nothing new: an empty answer at once (a dashboard asks every second), same position.
        started = time.monotonic()
        assert await reader.session_revocations(position) == ([], position)
        assert time.monotonic() - started < 0.5
        # A later one is all that is read after the position; "" reads every one kept.
        await writer.revoke_session(logout(3), 3600)
        assert (await reader.session_revocations(position))[0] == [logout(3)]
        assert (await reader.session_revocations(""))[0] == [*revoked, logout(3)]

    async def test_revocations_are_read_in_bounded_pages(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        writer = await open_backend()
        reader = await open_backend() if self.instances_share else writer
        reader.revocations_per_read = 2
        revoked = [logout(number) for number in range(5)]
        for revocation in revoked:
            await writer.revoke_session(revocation, 3600)
        pages: list[list[SessionRevocation]] = []
        position = ""
        while len(pages) < 10:
            found, position = await reader.session_revocations(position)
            if not found:
                break
            pages.append(found)
        assert all(len(page) <= 2 for page in pages)
        assert [revocation for page in pages for revocation in page] == revoked

    async def test_revocations_no_dashboard_wrote_are_skipped(self, open_backend) -> None:  # type: ignore[no-untyped-def]
        writer = await open_backend()
        reader = await open_backend() if self.instances_share else writer
        await writer.revoke_session(logout(0), 3600)
        if not await self.write_malformed_revocations(writer):
            pytest.skip("this backend takes revocations through revoke_session only")
        await writer.revoke_session(logout(1), 3600)
        found, position = await reader.session_revocations("")
        assert found == [logout(0), logout(1)]
        assert await reader.session_revocations(position) == ([], position)


async def _collect(count: int, *members: AsyncIterator[GroupBatch]) -> list[tuple[str, int]]:
    """What the `members` of one group receive together: until `count` arrived (within WAIT
    seconds), then whatever more comes within half a second (a duplicate would)."""
    seen: list[tuple[str, int]] = []

    async def read(member: AsyncIterator[GroupBatch]) -> None:
        async for item in member:
            for event in item.batch.events():
                seen.append((item.batch.team, orjson.loads(event.body)["seq"]))
            await item.ack()

    readers = [asyncio.create_task(read(member)) for member in members]
    try:
        deadline = time.monotonic() + WAIT
        while len(seen) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return seen


async def _drain(consumer: AsyncIterator[GroupBatch], quiet: float) -> list[tuple[str, int]]:
    """Everything a group member receives until nothing more comes for `quiet` seconds."""
    seen: list[tuple[str, int]] = []
    while True:
        try:
            item = await asyncio.wait_for(anext(consumer), quiet + 1.0 if not seen else quiet)
        except TimeoutError:
            return seen
        for event in item.batch.events():
            seen.append((item.batch.team, orjson.loads(event.body)["seq"]))
        await item.ack()
