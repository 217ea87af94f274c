"""The Kafka backend's readers of its small topics: the compacted last-known store (read into
memory per partition, kept up to date on demand) and the dashboards' logouts."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    KafkaError,
)

from teamtrack.backends.base import (
    BackendError,
    Event,
    SessionRevocation,
    decode_events,
    decode_stored_events,
)
from teamtrack.backends.kafka_common import (
    FETCH_MAX_WAIT_MS,
    KIND_LETTER,
    READ_TIMEOUT_MS,
    REVOCATIONS_READ_TIMEOUT_S,
    SNAPSHOT_REPLAY_MS,
    STORE_READ_TIMEOUT_S,
    failure,
    stop_consumer,
)
from teamtrack.contract import Kind

if TYPE_CHECKING:
    from teamtrack.backends.kafka import KafkaBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Stored:
    """One last-known record: its event's `ts`, the offset of the batch it came in, the event."""

    ts: int
    batch: int
    raw: bytes


StoreEntries = dict[tuple[str, str], _Stored]
"""(kind letter, worker) -> newest record, for one team."""


@dataclass
class _PartitionView:
    next_offset: int = 0
    teams: dict[str, StoreEntries] = field(default_factory=lambda: defaultdict(dict))
    # (team, kind letter, worker) -> the newest batch of the log when the worker was erased
    # (a tombstone): the snapshot's replay skips the worker's events up to that batch.
    erased: dict[tuple[str, str, str], int] = field(default_factory=dict)


def _keep_newest(entries: StoreEntries, key: tuple[str, str], stored: _Stored) -> None:
    current = entries.get(key)
    if current is None or current.ts <= stored.ts:
        entries[key] = stored


class LastKnownStore:
    """The compacted topic, read into memory per partition and kept up to date on demand.

    The first snapshot of a team reads its partition of the compacted topic from the start;
    later ones read only what was appended since. Records are compared on their `ts` header,
    so an older fix written after a newer one (a QoS 1 redelivery) never moves a worker back.

    A snapshot's cursor must be exact: the snapshot holds every batch up to it and none after
    it, or a joining viewer misses or repeats positions. Each record names the offset of its
    batch, so the cursor is the newest batch the records include (or the end of the log, if
    later); the team's batches of the last `SNAPSHOT_REPLAY_MS` up to that cursor are then
    read from the log itself, which adds those whose last-known records are still on their
    way (they are written right after their batch).
    """

    def __init__(self, backend: KafkaBackend) -> None:
        self._backend = backend
        self._consumer: Any = None
        self._offsets: Any = None
        self._views: dict[int, _PartitionView] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            client_id=f"teamtrack-store-{uuid.uuid4().hex[:8]}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            **self._backend.client_options(),
        )
        await self._consumer.start()
        # Offsets are looked up by a consumer that is never assigned anything: assigning
        # replaces the topics a client keeps metadata for, and a lookup in a topic without
        # metadata waits for a refresh first.
        self._offsets = AIOKafkaConsumer(
            client_id=f"teamtrack-offsets-{uuid.uuid4().hex[:8]}",
            enable_auto_commit=False,
            **self._backend.client_options(),
        )
        await self._offsets.start()
        backend = self._backend
        await self.end_offsets(
            [TopicPartition(topic, partition)
             for topic in (backend.positions_topic, backend.last_topic)
             for partition in range(backend.partitions)]
        )

    async def close(self) -> None:
        for consumer in (self._consumer, self._offsets):
            if consumer is not None:
                await stop_consumer(consumer)
        self._consumer = self._offsets = None

    async def any_broker_answers(self) -> None:
        await self._offsets.topics()

    async def end_offset(self, partition: Any) -> int:
        offsets = await self.end_offsets([partition])
        return offsets[partition]

    async def end_offsets(self, partitions: list[Any]) -> dict[Any, int]:
        offsets = await self._offsets.end_offsets(partitions)
        return {partition: int(offset) for partition, offset in offsets.items()}

    async def snapshot_state(
        self, partition: int, team: str
    ) -> tuple[int, dict[str, Event], dict[str, Event], int]:
        """The team's cursor (an offset of its partition), positions, presence, and how many
        entries did not decode (left out; see `decode_stored_events`)."""
        log_partition = TopicPartition(self._backend.positions_topic, partition)
        async with self._lock:
            newest_batch = await self.end_offset(log_partition) - 1
            view = await self._caught_up(partition)
            entries = dict(view.teams.get(team, {}))
            cursor = max([newest_batch, *(stored.batch for stored in entries.values())])
            replay_from = await self._replay_start(log_partition, newest_batch)
            if replay_from <= cursor:
                erased = {
                    (kind, worker): batch
                    for (erased_team, kind, worker), batch in view.erased.items()
                    if erased_team == team
                }
                await self._replay(log_partition, team, replay_from, cursor, entries, erased)
        position_letter = KIND_LETTER[Kind.POSITION]
        positions, unreadable = decode_stored_events(team, (
            (worker, stored.raw) for (kind, worker), stored in entries.items()
            if kind == position_letter
        ))
        presence, unreadable_presence = decode_stored_events(team, (
            (worker, stored.raw) for (kind, worker), stored in entries.items()
            if kind != position_letter
        ))
        return cursor, positions, presence, unreadable + unreadable_presence

    async def _replay_start(self, log_partition: Any, newest_batch: int) -> int:
        since_ms = int(time.time() * 1000) - SNAPSHOT_REPLAY_MS
        found = await self._offsets.offsets_for_times({log_partition: since_ms})
        at = found.get(log_partition)
        # None: nothing that recent; only batches written during this snapshot, if any.
        return int(at.offset) if at is not None else newest_batch + 1

    async def _replay(
        self, log_partition: Any, team: str, start: int, cursor: int, entries: StoreEntries,
        erased: dict[tuple[str, str], int],
    ) -> None:
        key = team.encode()
        self._consumer.assign([log_partition])
        self._consumer.seek(log_partition, start)
        deadline = time.monotonic() + STORE_READ_TIMEOUT_S
        position = start
        while position <= cursor:
            if time.monotonic() > deadline:
                raise BackendError(
                    f"reading {self._backend.positions_topic} partition "
                    f"{log_partition.partition} up to {cursor} took longer than "
                    f"{STORE_READ_TIMEOUT_S:.0f}s"
                )
            fetched = await self._consumer.getmany(log_partition, timeout_ms=500)
            for record in fetched.get(log_partition, ()):
                if record.offset > cursor:
                    break
                if record.key == key:
                    try:
                        events = decode_events(team, record.value)
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # nothing a bridge writes; the live path rejects it too
                    for event in events:
                        if event.kind is Kind.EVENT:
                            continue
                        entry = (KIND_LETTER[event.kind], event.worker)
                        if record.offset <= erased.get(entry, -1):
                            continue  # from before the worker's erasure
                        stored = _Stored(event.ts, record.offset, event.to_json())
                        _keep_newest(entries, entry, stored)
            position = int(await self._consumer.position(log_partition))

    async def _caught_up(self, partition: int) -> _PartitionView:
        view = self._views.setdefault(partition, _PartitionView())
        topic_partition = TopicPartition(self._backend.last_topic, partition)
        end = await self.end_offset(topic_partition)
        if view.next_offset >= end:
            return view
        self._consumer.assign([topic_partition])
        self._consumer.seek(topic_partition, view.next_offset)
        deadline = time.monotonic() + STORE_READ_TIMEOUT_S
        while view.next_offset < end:
            if time.monotonic() > deadline:
                raise BackendError(
                    f"reading {self._backend.last_topic} partition {partition} up to {end} "
                    f"took longer than {STORE_READ_TIMEOUT_S:.0f}s"
                )
            fetched = await self._consumer.getmany(topic_partition, timeout_ms=500)
            for record in fetched.get(topic_partition, ()):
                _apply_store_record(view, record)
                view.next_offset = record.offset + 1
            # Compaction leaves holes in the offsets; the consumer's position steps over them.
            position = await self._consumer.position(topic_partition)
            view.next_offset = max(view.next_offset, int(position))
        return view


def _apply_store_record(view: _PartitionView, record: Any) -> None:
    """One record of the compacted store into the view; one no bridge could have written
    (a key or a header that does not parse) is skipped."""
    try:
        if record.key is None:
            return
        team, _, rest = record.key.decode().partition("/")
        worker, _, kind = rest.rpartition("/")
        headers = dict(record.headers)
        batch = int(headers.get("batch", b"-1"))
        ts = int(headers.get("ts", b"0"))
    except (UnicodeDecodeError, ValueError, TypeError):
        return
    if record.value is None:
        # A tombstone (`KafkaBackend.forget_worker`): the worker's entry is erased.
        view.teams[team].pop((kind, worker), None)
        view.erased[(team, kind, worker)] = batch
        return
    _keep_newest(view.teams[team], (kind, worker), _Stored(ts, batch, record.value))


class RevocationReader:
    """The logouts topic's one partition, read by a consumer without a group that stays open
    between reads: a dashboard asks every second, mostly for nothing new, which costs one
    ListOffsets round trip and no fetch. The partition is paused between reads, so the
    consumer does not poll the broker in the background either."""

    def __init__(self, backend: KafkaBackend) -> None:
        self._backend = backend
        self._partition = TopicPartition(backend.revocations_topic, 0)
        self._consumer: Any = None
        # The offset the consumer reads next, while it is known (no seek needed then).
        self._next: int | None = None
        self._lock = asyncio.Lock()

    async def _opened(self) -> Any:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                client_id=f"teamtrack-logouts-{uuid.uuid4().hex[:8]}",
                group_id=None,
                enable_auto_commit=False,
                # A position retention has dropped: from the oldest logout kept (the dropped
                # ones have expired anyway).
                auto_offset_reset="earliest",
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                **self._backend.client_options(),
            )
            try:
                await consumer.start()
            except (KafkaError, OSError) as error:
                await stop_consumer(consumer)
                raise failure("connecting the kafka logouts reader", error) from error
            consumer.assign([self._partition])
            consumer.pause(self._partition)
            self._consumer = consumer
        return self._consumer

    async def read(self, after: str, limit: int) -> tuple[list[SessionRevocation], str]:
        topic = self._backend.revocations_topic
        async with self._lock:
            try:
                return await asyncio.wait_for(
                    self._read(after, limit), REVOCATIONS_READ_TIMEOUT_S
                )
            except TimeoutError:
                self._next = None
                raise BackendError(
                    f"reading {topic} took longer than {REVOCATIONS_READ_TIMEOUT_S:.0f}s"
                ) from None
            except KafkaError as error:
                self._next = None
                raise failure(f"reading {topic}", error) from error

    async def _read(self, after: str, limit: int) -> tuple[list[SessionRevocation], str]:
        consumer = await self._opened()
        partition = self._partition
        end = int((await consumer.end_offsets([partition]))[partition])
        start = int(after) if after.isascii() and after.isdigit() else -1
        if start < 0 or start > end:
            # "" (or not an offset), or past the end (the topic was made again): every logout
            # kept.
            start = int((await consumer.beginning_offsets([partition]))[partition])
        if start >= end:
            return [], after
        if self._next != start:
            consumer.seek(partition, start)
        self._next = None
        consumer.resume(partition)
        try:
            fetched = await consumer.getmany(
                partition, timeout_ms=READ_TIMEOUT_MS, max_records=limit
            )
        finally:
            consumer.pause(partition)
        records = fetched.get(partition, [])
        if not records:
            return [], after
        self._next = int(records[-1].offset) + 1
        found = [revocation for revocation in map(_revocation, records) if revocation]
        return found, str(self._next)

    async def close(self) -> None:
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None


def _revocation(record: Any) -> SessionRevocation | None:
    """The logout a record holds; None for one no dashboard wrote."""
    try:
        fields = orjson.loads(record.value)
        session_id, expires_at = fields["s"], fields["e"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not isinstance(session_id, str) or not session_id:
        return None
    if not isinstance(expires_at, int) or isinstance(expires_at, bool):
        return None
    return SessionRevocation(session_id, expires_at)
