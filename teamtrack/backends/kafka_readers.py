"""The Kafka backend's log readers: a team subscription (a consumer without a group, on only
the partitions of its teams) and a consumer group member that commits only what it
acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter, defaultdict, deque
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaError,
    OffsetOutOfRangeError,
)

from teamtrack.backends.base import (
    START_OF_LOG,
    Acknowledgeable,
    Batch,
    Cursor,
    Gap,
    GroupBatch,
    GroupConsumer,
    GroupStart,
    ReadPace,
    TeamSubscription,
)
from teamtrack.backends.kafka_common import (
    FETCH_MAX_WAIT_MS,
    HEARTBEAT_INTERVAL_MS,
    READ_MAX_RECORDS,
    READ_TIMEOUT_MS,
    SESSION_TIMEOUT_MS,
    failure,
    parse_cursor,
    stop_consumer,
)

if TYPE_CHECKING:
    from teamtrack.backends.kafka import KafkaBackend

log = logging.getLogger(__name__)


class KafkaSubscription(TeamSubscription):
    """Batches of a changing set of teams, read from only the partitions that hold them.

    `add` and `remove` record what changed; the reader applies it (partition assignment and
    seeks) between two fetches, so that the offsets it tracks always describe what the consumer
    will return next. A change wakes a reader that is waiting for records.
    """

    def __init__(self, backend: KafkaBackend) -> None:
        self._backend = backend
        self._consumer: Any = None
        self._opening = asyncio.Lock()
        # team -> offset of the newest batch delivered (or of the cursor it was added after)
        self._cursors: dict[str, int] = {}
        self._teams_by_key: dict[bytes, str] = {}
        # partition -> next offset the consumer returns, for the partitions it is assigned
        self._positions: dict[int, int] = {}
        # partition -> earliest offset some newly added team needs, applied by the reader
        self._seeks: dict[int, int] = {}
        self._ready: deque[Batch | Gap] = deque()
        self._changed = asyncio.Event()
        self._closed = False
        self.records_read: Counter[int] = Counter()
        self.records_skipped = 0

    @property
    def teams(self) -> frozenset[str]:
        return frozenset(self._cursors)

    @property
    def partitions(self) -> frozenset[int]:
        """The partitions this subscription's consumer is assigned (after the last read)."""
        return frozenset(self._positions)

    def _topic_partition(self, partition: int) -> Any:
        return TopicPartition(self._backend.positions_topic, partition)

    async def _opened(self) -> Any:
        async with self._opening:
            if self._consumer is None:
                consumer = AIOKafkaConsumer(
                    client_id=f"teamtrack-reader-{uuid.uuid4().hex[:8]}",
                    # No group: this reader picks its partitions itself and keeps its offsets
                    # in the cursors it hands out, so it leaves nothing behind in the broker.
                    group_id=None,
                    enable_auto_commit=False,
                    # Never jump silently: a trimmed offset becomes a Gap.
                    auto_offset_reset="none",
                    fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                    **self._backend.client_options(),
                )
                try:
                    await consumer.start()
                except (KafkaError, OSError) as error:
                    await stop_consumer(consumer)
                    raise failure("connecting a kafka reader", error) from error
                self._consumer = consumer
            return self._consumer

    async def add(self, team: str, after: Cursor) -> None:
        consumer = await self._opened()
        partition = self._backend.partition_of(team)
        topic_partition = self._topic_partition(partition)
        try:
            offsets = await consumer.beginning_offsets([topic_partition])
        except KafkaError as error:
            raise failure(f"reading where {team}'s log starts", error) from error
        oldest = int(offsets[topic_partition])
        if after == START_OF_LOG:
            last_seen = oldest - 1
        else:
            cursor_partition, offset = parse_cursor(after)
            if cursor_partition != partition or offset + 1 < oldest:
                # Trimmed, or written when the topic had another partition count: either way
                # the batches right after the cursor are not there to read.
                self._ready.append(Gap(team, after))
                last_seen = oldest - 1
            else:
                last_seen = offset
        self._cursors[team] = last_seen
        self._teams_by_key[team.encode()] = team
        self._seeks[partition] = min(self._seeks.get(partition, last_seen + 1), last_seen + 1)
        self._changed.set()

    async def remove(self, team: str) -> None:
        if self._cursors.pop(team, None) is None:
            return
        del self._teams_by_key[team.encode()]
        self._ready = deque(
            item for item in self._ready if item.team != team
        )
        self._changed.set()

    async def close(self) -> None:
        self._closed = True
        self._changed.set()
        if self._consumer is not None:
            await stop_consumer(self._consumer)

    def _apply_changes(self) -> None:
        consumer = self._consumer
        wanted = {self._backend.partition_of(team) for team in self._cursors}
        if wanted != set(self._positions):
            for partition in set(self._positions) - wanted:
                del self._positions[partition]
            for partition in wanted - set(self._positions):
                self._positions[partition] = self._seeks.pop(partition)
            # `assign` replaces the assignment and forgets every position: seek them all.
            consumer.assign([self._topic_partition(partition) for partition in sorted(wanted)])
            for partition, offset in self._positions.items():
                consumer.seek(self._topic_partition(partition), offset)
        for partition, offset in self._seeks.items():
            if partition in self._positions and offset < self._positions[partition]:
                self._positions[partition] = offset
                consumer.seek(self._topic_partition(partition), offset)
        self._seeks.clear()

    async def _fetch(self) -> dict[Any, list[Any]]:
        """Records of the assigned partitions; {} when woken by a change of the team set."""
        fetching = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=READ_TIMEOUT_MS, max_records=READ_MAX_RECORDS)
        )
        woken = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({fetching, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not fetching.done():
                # aiokafka hands records out only after its wait ends: none are lost here.
                fetching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetching
        if fetching.cancelled():
            return {}
        fetched: dict[Any, list[Any]] = fetching.result()
        return fetched

    async def _recover_out_of_range(self, error: Any) -> None:
        """The log was trimmed past where this reader stood: a Gap for each team concerned."""
        partitions = list(error.args[0]) if error.args and isinstance(error.args[0], dict) else [
            self._topic_partition(partition) for partition in self._positions
        ]
        offsets = await self._consumer.beginning_offsets(partitions)
        for topic_partition, oldest in offsets.items():
            partition = topic_partition.partition
            if partition not in self._positions:
                continue
            for team, cursor in self._cursors.items():
                if self._backend.partition_of(team) == partition and cursor + 1 < oldest:
                    self._ready.append(Gap(team, f"{partition}:{cursor}"))
                    self._cursors[team] = oldest - 1
            self._positions[partition] = int(oldest)
            self._consumer.seek(topic_partition, int(oldest))

    def _take(self, fetched: dict[Any, list[Any]]) -> None:
        for topic_partition, records in fetched.items():
            partition = topic_partition.partition
            if partition not in self._positions:
                continue
            for record in records:
                self._positions[partition] = record.offset + 1
                self.records_read[partition] += 1
                # The key says whose batch it is: other teams' values are never looked at.
                team = self._teams_by_key.get(record.key)
                if team is None or record.offset <= self._cursors[team]:
                    self.records_skipped += 1
                    continue
                self._cursors[team] = record.offset
                self._ready.append(Batch(team, f"{partition}:{record.offset}", record.value))

    async def __anext__(self) -> Batch | Gap:
        while not self._ready:
            if self._closed:
                raise StopAsyncIteration
            self._changed.clear()
            if self._consumer is None or not self._cursors:
                if self._consumer is not None and self._positions:
                    self._apply_changes()
                await self._changed.wait()
                continue
            self._apply_changes()
            try:
                fetched = await self._fetch()
            except OffsetOutOfRangeError as error:
                try:
                    await self._recover_out_of_range(error)
                except KafkaError as lookup_error:
                    raise failure("reading from kafka", lookup_error) from lookup_error
                continue
            except ConsumerStoppedError:
                raise StopAsyncIteration from None
            except KafkaError as error:
                if self._closed:
                    raise StopAsyncIteration from None
                raise failure("reading from kafka", error) from error
            self._take(fetched)
        return self._ready.popleft()


class _NoAck(Acknowledgeable):
    async def ack(self) -> None:
        return None


class _OffsetAck(Acknowledgeable):
    def __init__(self, member: KafkaGroupConsumer, partition: Any, offset: int) -> None:
        self._member = member
        self._partition = partition
        self._offset = offset

    async def ack(self) -> None:
        self._member.acknowledged(self._partition, self._offset)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: KafkaGroupConsumer) -> None:
        self._member = member

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._member.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._member.partitions_assigned(set(assigned))


class KafkaGroupConsumer(GroupConsumer):
    """A member of Kafka consumer group `{prefix}.{group}` on the positions topic.

    With acknowledgement on, offsets are committed only up to the oldest batch not yet
    acknowledged, per partition (before each read, on a rebalance and on close): a member that
    dies leaves its unacknowledged batches to the next owner of the partition. With it off,
    the consumer auto-commits what it read, as a live mirror wants.
    """

    def __init__(
        self,
        backend: KafkaBackend,
        group: str,
        consumer: str,
        *,
        start: GroupStart,
        acknowledge: bool,
        pace_s: float = 0.0,
    ) -> None:
        self._backend = backend
        self._group_id = f"{backend.options.topic_prefix}.{group}"
        self._pace = ReadPace(pace_s)
        self._member_name = consumer
        self._start = start
        self._acknowledge = acknowledge
        self._consumer: Any = None
        # For start="latest": where the log ended when this member started. A partition the
        # group never committed starts there, not wherever the log ends once the group has
        # formed, so nothing published in between is skipped.
        self._start_offsets: dict[Any, int] = {}
        self._delivered: dict[Any, deque[int]] = defaultdict(deque)
        self._acknowledged: dict[Any, set[int]] = defaultdict(set)
        self._ready: deque[tuple[Any, GroupBatch]] = deque()
        self._closed = False

    def set_pace(self, pace_s: float) -> None:
        self._pace.set(pace_s)

    async def backlog(self) -> int | None:
        consumer = self._consumer
        if consumer is None:
            return None
        total = 0
        try:
            partitions = list(consumer.assignment())
            if not partitions:
                return None  # not in the group yet
            ends = await consumer.end_offsets(partitions)
            for partition in partitions:
                end = int(ends[partition])
                committed = await consumer.committed(partition)
                start = committed if committed is not None else self._start_offsets.get(
                    partition, 0)
                total += max(end - start, 0)
        except KafkaError:
            return None
        return total

    async def _open(self) -> Any:
        consumer = AIOKafkaConsumer(
            client_id=f"teamtrack-{self._member_name}",
            group_id=self._group_id,
            enable_auto_commit=not self._acknowledge,
            auto_commit_interval_ms=1_000,
            auto_offset_reset="earliest" if self._start == "earliest" else "latest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            **self._backend.client_options(),
        )
        try:
            if self._start == "latest":
                # Through the backend's connected reader: one round trip, so the starting
                # point is where the log ended at the first read, not once this member is
                # connected, which takes a while longer.
                store = self._backend._started()
                partitions = [
                    TopicPartition(self._backend.positions_topic, partition)
                    for partition in range(self._backend.partitions)
                ]
                self._start_offsets = await store.end_offsets(partitions)
            await consumer.start()
            consumer.subscribe([self._backend.positions_topic], listener=_Rebalance(self))
        except (KafkaError, OSError) as error:
            await stop_consumer(consumer)
            raise failure(f"joining kafka consumer group {self._group_id}", error) from error
        self._consumer = consumer
        return consumer

    def acknowledged(self, partition: Any, offset: int) -> None:
        if partition in self._delivered:
            self._acknowledged[partition].add(offset)

    def _processed_offsets(self) -> dict[Any, int]:
        """Per partition, the offset to commit: right after the last batch of an unbroken run
        of acknowledged ones, so a batch still in someone's hands is never committed."""
        offsets: dict[Any, int] = {}
        for partition, delivered in self._delivered.items():
            acknowledged = self._acknowledged[partition]
            last = None
            while delivered and delivered[0] in acknowledged:
                last = delivered.popleft()
                acknowledged.discard(last)
            if last is not None:
                offsets[partition] = last + 1
        return offsets

    async def _commit_processed(self) -> None:
        offsets = self._processed_offsets()
        if not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as error:
            # A rebalance took the partitions away: their new owner reads them again.
            log.warning("committing offsets of group %s failed: %s", self._group_id, error)

    async def partitions_revoked(self, revoked: set[Any]) -> None:
        if self._acknowledge:
            await self._commit_processed()
        for partition in revoked:
            self._delivered.pop(partition, None)
            self._acknowledged.pop(partition, None)
        # Read but not handed out: the partition's next owner delivers them.
        self._ready = deque(item for item in self._ready if item[0] not in revoked)

    async def partitions_assigned(self, assigned: set[Any]) -> None:
        for partition in assigned:
            start = self._start_offsets.get(partition)
            if start is not None and await self._consumer.committed(partition) is None:
                self._consumer.seek(partition, start)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._consumer is not None:
            if self._acknowledge:
                await self._commit_processed()
            await stop_consumer(self._consumer)

    async def __anext__(self) -> GroupBatch:
        if self._consumer is None and not self._closed:
            await self._open()
        while not self._ready:
            if self._closed:
                raise StopAsyncIteration
            try:
                await self._pace.wait()
                if self._acknowledge:
                    await self._commit_processed()
                fetched = await self._consumer.getmany(
                    timeout_ms=READ_TIMEOUT_MS, max_records=READ_MAX_RECORDS
                )
                self._pace.read(
                    caught_up=sum(map(len, fetched.values())) < READ_MAX_RECORDS
                )
            except ConsumerStoppedError:
                raise StopAsyncIteration from None
            except KafkaError as error:
                if self._closed:
                    raise StopAsyncIteration from None
                raise failure(f"reading kafka group {self._group_id}", error) from error
            for partition, records in fetched.items():
                for record in records:
                    self._hand_out(partition, record)
        return self._ready.popleft()[1]

    def _hand_out(self, partition: Any, record: Any) -> None:
        if record.key is None:
            return
        batch = Batch(
            record.key.decode(), f"{partition.partition}:{record.offset}", record.value
        )
        acknowledger: Acknowledgeable = _NoAck()
        if self._acknowledge:
            self._delivered[partition].append(record.offset)
            acknowledger = _OffsetAck(self, partition, record.offset)
        self._ready.append((partition, GroupBatch(batch, acknowledger)))
