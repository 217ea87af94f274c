"""`kafka://[user:password@]host:port[,host:port]` — Apache Kafka as the cross-instance
broadcast layer. With a user, every client (producer, consumers, admin) authenticates with
SASL/SCRAM-SHA-512 over SASL_PLAINTEXT, as the Kafka that `teamtrack up` starts wants
(`teamtrack.local.kafka_users`); the password is never in an error or a log line.

Topics (names start with `?topic_prefix=`, default `teamtrack`), created by `start()` with
explicit settings (the broker's auto-creation is never relied on):

* `{prefix}.positions`: the log of batches, `?partitions=` partitions (default 12). One record
  per team per `publish`, key = team, value = `encode_events(...)` (the Redis entries' format).
  A team is always in partition murmur2(team) mod partitions, the Java client's default
  partitioner, so its batches keep their order. Time retention `?history_ms=` (default 1 h);
  `?history=N` also keeps only the newest N records per partition (see `_trim`).
* `{prefix}.last`: the last-known store, compacted. Key `team/worker/p` (position) or
  `team/worker/s` (status), value = `Event.to_json()`, header `ts`. Same partition as the team.
* `{prefix}.revoked-sessions`: the dashboards' logouts, one partition, one record per logout
  (`{"s": session id, "e": expiry}`), kept 2 days (longer than any session lives). Every
  dashboard reads what is new every `--revocation-poll-s`; the position is the next offset.

Cursor: `partition:offset` of a batch in the positions topic (`3:1041`). A team lives in one
partition, so the offset alone orders the cursors of a team; the partition is kept so that a
cursor from before a change of the partition count is recognised (it becomes a `Gap`).

Reading: a `TeamSubscription` is a consumer without a group that assigns itself only the
partitions of its teams and skips other teams' records by key, before touching their values.
A `GroupConsumer` is a real consumer group (`{prefix}.{group}`) that commits only the offsets
its members acknowledged. docs/kafka.md has the reasons.

The parts: this module (options, topics, writing), `kafka_readers` (subscriptions, groups),
`kafka_store` (the last-known store and the logouts reader), `kafka_common` (what they share).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.errors import (
    KafkaError,
)
from aiokafka.partitioner import murmur2

from teamtrack.backends.base import (
    Backend,
    BackendError,
    Cursor,
    Event,
    GroupConsumer,
    GroupStart,
    SessionRevocation,
    Snapshot,
    encode_events,
)
from teamtrack.backends.kafka_common import (
    DEFAULT_HISTORY_MS,
    DEFAULT_PARTITIONS,
    DEFAULT_TOPIC_PREFIX,
    MAX_DEFAULT_REPLICATION,
    NOT_ALLOWED_TO_CREATE,
    REVOCATIONS_RETENTION_MS,
    REVOKE_TIMEOUT_S,
    SASL_MECHANISM,
    START_TIMEOUT_S,
    TOPIC_EXISTS,
    confirmed,
    failure,
    outcome_not_wanted,
    parse_cursor,
    stop_producer,
    store_key,
)
from teamtrack.backends.kafka_readers import (
    KafkaGroupConsumer,
    KafkaSubscription,
)
from teamtrack.backends.kafka_store import (
    LastKnownStore,
    RevocationReader,
)
from teamtrack.contract import Kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaOptions:
    bootstrap_servers: tuple[str, ...]
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    partitions: int = DEFAULT_PARTITIONS
    history_ms: int = DEFAULT_HISTORY_MS
    history: int | None = None
    # None: min(3, the brokers the cluster has when the topics are created).
    replication: int | None = None
    # SASL/SCRAM-SHA-512 credentials (None: the cluster takes clients without them).
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> KafkaOptions:
        parts = urlsplit(url)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        username = password = None
        if at:
            name, colon, secret = userinfo.partition(":")
            if not name or not colon or not secret or "@" in userinfo:
                # Never the userinfo itself in the message: it may be a password.
                raise ValueError(
                    "a kafka:// URL with credentials names a user and a password: "
                    "kafka://user:password@host:9092 (an '@' in either is written %40)"
                )
            username, password = unquote(name), unquote(secret)
        servers = tuple(server for server in hosts.split(",") if server)
        if not servers:
            raise ValueError("a kafka:// URL names at least one broker: kafka://host:9092")
        if any("@" in server or not server.strip() for server in servers):
            raise ValueError("a kafka:// URL lists brokers as host:port[,host:port]")
        query = {name: values[0] for name, values in parse_qs(parts.query).items()}
        known = {"topic_prefix", "partitions", "history_ms", "history", "replication"}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ValueError(
                f"unknown kafka:// option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        options = cls(
            bootstrap_servers=servers,
            topic_prefix=query.get("topic_prefix", DEFAULT_TOPIC_PREFIX),
            partitions=int(query.get("partitions", DEFAULT_PARTITIONS)),
            history_ms=int(query.get("history_ms", DEFAULT_HISTORY_MS)),
            history=int(query["history"]) if "history" in query else None,
            replication=int(query["replication"]) if "replication" in query else None,
            username=username,
            password=password,
        )
        replication = 1 if options.replication is None else options.replication
        if options.partitions < 1 or replication < 1 or options.history_ms < 1:
            raise ValueError("kafka:// partitions, replication and history_ms must be positive")
        if options.history is not None and options.history < 1:
            raise ValueError("kafka:// history must be positive")
        return options

    @property
    def bootstrap(self) -> str:
        return ",".join(self.bootstrap_servers)


def min_insync_replicas(replication: int) -> int:
    """With 3+ replicas an acknowledged write is on at least 2 of them, so it survives the
    loss of any one broker; with fewer, requiring 2 in sync would stop all writes whenever
    one broker is down."""
    return 2 if replication >= 3 else 1


class KafkaBackend(Backend):
    def __init__(self, options: KafkaOptions) -> None:
        self.options = options
        self.positions_topic = f"{options.topic_prefix}.positions"
        self.last_topic = f"{options.topic_prefix}.last"
        self.revocations_topic = f"{options.topic_prefix}.revoked-sessions"
        # The topic's real partition count, read at start (an existing topic wins over the URL).
        self.partitions = options.partitions
        # Replicas of the topics this backend creates: the URL's, or min(3, brokers) at start.
        self.replication = options.replication or 1
        self._admin: Any = None
        self._producer: Any = None
        self._producer_lock = asyncio.Lock()
        self._store: LastKnownStore | None = None
        self._revocations: RevocationReader | None = None
        self._retention_warned = False
        # Per partition: the offset below which `_trim` already asked Kafka to delete.
        self._trimmed: dict[int, int] = defaultdict(int)

    @classmethod
    def from_url(cls, url: str) -> KafkaBackend:
        return cls(KafkaOptions.from_url(url))

    def partition_of(self, team: str) -> int:
        """Kafka's default partitioner for key `team`: the same answer as any Java producer."""
        return (int(murmur2(team.encode())) & 0x7FFFFFFF) % self.partitions

    def cursor_key(self, cursor: Cursor) -> tuple[int, ...]:
        if not cursor:
            return (-1,)
        return (parse_cursor(cursor)[1],)

    def client_options(self) -> dict[str, Any]:
        """What every aiokafka client of this backend is given: the brokers and, with
        credentials in the URL, SASL/SCRAM-SHA-512."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.options.bootstrap, "request_timeout_ms": 30_000,
        }
        if self.options.username is not None:
            options.update(
                security_protocol="SASL_PLAINTEXT",
                sasl_mechanism=SASL_MECHANISM,
                sasl_plain_username=self.options.username,
                sasl_plain_password=self.options.password,
            )
        return options

    def admin_client(self) -> Any:
        """The started backend's admin client (for tools that do more than the backend)."""
        if self._admin is None:
            raise BackendError("kafka backend used before start()")
        return self._admin

    # Lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._admin = AIOKafkaAdminClient(
            client_id=f"teamtrack-admin-{uuid.uuid4().hex[:8]}", **self.client_options()
        )
        try:
            await self._admin.start()
        except (KafkaError, OSError) as error:
            await self.close()
            raise BackendError(
                f"kafka at {self.options.bootstrap} is unreachable: {error}"
            ) from error
        try:
            await self._create_topics()
            self.partitions = await self._wait_for_partitions()
            self._store = LastKnownStore(self)
            await self._store.start()
        except (KafkaError, OSError) as error:
            await self.close()
            where = self.options.bootstrap
            raise failure(f"starting the kafka backend on {where}", error) from error
        except BaseException:
            await self.close()
            raise

    def _new_producer(self) -> Any:
        return AIOKafkaProducer(
            client_id=f"teamtrack-producer-{uuid.uuid4().hex[:8]}",
            # A publish returns only once every in-sync replica has the records, and the
            # broker drops the duplicates of retried sends: what the bridge acknowledges to
            # MQTT is in Kafka for good. (aiokafka's defaults are acks=1, no idempotence.)
            acks="all",
            enable_idempotence=True,
            # The bridge batches already; lingering would only add latency to every publish.
            linger_ms=0,
            **self.client_options(),
        )

    async def _create_topics(self) -> None:
        options = self.options
        if options.replication is None:
            cluster = await self._admin.describe_cluster()
            self.replication = max(1, min(MAX_DEFAULT_REPLICATION, len(cluster["brokers"])))
        common = {"min.insync.replicas": str(min_insync_replicas(self.replication))}
        positions = NewTopic(
            self.positions_topic,
            options.partitions,
            self.replication,
            topic_configs={
                **common,
                "cleanup.policy": "delete",
                "retention.ms": str(options.history_ms),
                # Retention drops whole segments: roll them often enough to follow history_ms.
                "segment.ms": str(max(60_000, options.history_ms // 4)),
                "message.timestamp.type": "CreateTime",
            },
        )
        last_known = NewTopic(
            self.last_topic,
            options.partitions,
            self.replication,
            topic_configs={
                **common,
                "cleanup.policy": "compact",
                # Compact early and often: a snapshot reads the team's partition of this topic,
                # which stays close to one record per worker that way. The active segment is
                # never compacted, hence a short segment.ms.
                "min.cleanable.dirty.ratio": "0.1",
                "segment.ms": "600000",
            },
        )
        revocations = NewTopic(
            self.revocations_topic,
            1,
            self.replication,
            topic_configs={
                **common,
                "cleanup.policy": "delete",
                "retention.ms": str(REVOCATIONS_RETENTION_MS),
                "segment.ms": str(REVOCATIONS_RETENTION_MS // 4),
            },
        )
        response = await self._admin.create_topics([positions, last_known, revocations])
        for topic_error in response.topic_errors:
            topic, code = topic_error[0], topic_error[1]
            message = topic_error[2] if len(topic_error) > 2 else ""
            if code in NOT_ALLOWED_TO_CREATE:
                # Not this role's job: the cluster's admin creates them; wait for them.
                log.debug("not allowed to create kafka topic %s: waiting for it", topic)
                continue
            if code not in (0, TOPIC_EXISTS):
                raise BackendError(f"creating kafka topic {topic} failed: {code} {message}")

    async def _wait_for_partitions(self) -> int:
        """Wait until both topics have a leader for every partition; their partition count."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            topics = await self._admin.describe_topics([self.positions_topic, self.last_topic])
            counts: dict[str, int] = {}
            for topic in topics:
                partitions = topic["partitions"]
                if topic["error_code"] == 0 and partitions and all(
                    partition["leader"] >= 0 for partition in partitions
                ):
                    counts[topic["topic"]] = len(partitions)
            if len(counts) == 2:
                break
            if time.monotonic() > deadline:
                raise BackendError(f"kafka topics {self.positions_topic} and {self.last_topic} "
                                   f"have no leaders after {START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.1)
        if counts[self.positions_topic] != counts[self.last_topic]:
            raise BackendError(
                f"kafka topics {self.positions_topic} and {self.last_topic} have "
                f"{counts[self.positions_topic]} and {counts[self.last_topic]} partitions: "
                "they must match, a team's batches and last-known records share a partition"
            )
        found = counts[self.positions_topic]
        if found != self.options.partitions:
            log.warning(
                "kafka topic %s exists with %d partitions, not %d: using %d",
                self.positions_topic, found, self.options.partitions, found,
            )
        return found

    async def close(self) -> None:
        if self._revocations is not None:
            await self._revocations.close()
            self._revocations = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._producer is not None:
            await stop_producer(self._producer)
            self._producer = None
        if self._admin is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._admin.close()
            self._admin = None

    async def ping(self) -> bool:
        """True when any broker of the cluster answers.

        Not the admin client's `describe_cluster`: that asks one broker picked at random from
        metadata it refreshes every 5 minutes, so with one node of three down it failed about
        one call in three (a dashboard's /healthz said 503) although the cluster served
        everything. A consumer's `topics()` asks the known brokers in turn until one answers.
        """
        if self._store is None:
            return False
        try:
            await asyncio.wait_for(self._store.any_broker_answers(), 5)
        except (KafkaError, OSError, TimeoutError):
            return False
        return True

    def _started(self) -> LastKnownStore:
        if self._store is None:
            raise BackendError("kafka backend used before start()")
        return self._store

    async def _writer(self) -> Any:
        """The producer, started on the first write: the bridges publish, the dashboards
        record logouts, the ingest never writes. Kafka lets a user start an idempotent
        producer only where it may write some topic (the ingest's user may not: InitProducerId
        is refused with ClusterAuthorizationFailed)."""
        self._started()
        if self._producer is None:
            async with self._producer_lock:
                if self._producer is None:
                    producer = self._new_producer()
                    try:
                        await producer.start()
                    except (KafkaError, OSError) as error:
                        await stop_producer(producer)
                        raise failure("starting a kafka producer", error) from error
                    self._producer = producer
        return self._producer

    # Writing -----------------------------------------------------------------------------
    async def publish(self, events: Sequence[Event]) -> None:
        """The batches first, then the last-known records naming the offset of their batch.

        Viewers see a batch after one round trip; the store record that follows says which
        batch it comes from, which is what lets `snapshot` give an exact cursor.
        """
        if not events:
            return
        by_team: dict[str, list[Event]] = defaultdict(list)
        newest: dict[bytes, Event] = {}
        for event in events:
            by_team[event.team].append(event)
            if event.kind is Kind.EVENT:
                continue  # logged only: no last-known worker event
            key = store_key(event.team, event.worker, event.kind)
            current = newest.get(key)
            if current is None or current.ts <= event.ts:
                newest[key] = event
        producer = await self._writer()
        try:
            appended = [
                await producer.send(
                    self.positions_topic,
                    encode_events(team_events),
                    key=team.encode(),
                    partition=self.partition_of(team),
                )
                for team, team_events in by_team.items()
            ]
            written = await confirmed(appended)
            batch_offsets = {
                team: int(metadata.offset)
                for team, metadata in zip(by_team, written, strict=True)
            }
            stored = [
                await producer.send(
                    self.last_topic,
                    event.to_json(),
                    key=key,
                    partition=self.partition_of(event.team),
                    headers=[
                        ("ts", str(event.ts).encode()),
                        ("batch", str(batch_offsets[event.team]).encode()),
                    ],
                )
                for key, event in newest.items()
            ]
            await confirmed(stored)
        except KafkaError as error:
            await self._replace_producer(producer)
            raise failure("publish to kafka", error) from error
        if self.options.history is not None:
            await self._trim(written, self.options.history)

    async def _replace_producer(self, failed: Any) -> None:
        """A producer that failed may be stuck (a broken idempotence sequence); start afresh."""
        async with self._producer_lock:
            if self._producer is not failed:
                return
            replacement = self._new_producer()
            try:
                await replacement.start()
            except (KafkaError, OSError) as error:
                log.warning("kafka producer could not be restarted yet: %s", error)
                await stop_producer(replacement)
                return
            self._producer = replacement
        await stop_producer(failed)

    async def _trim(self, written: Iterable[Any], history: int) -> None:
        """Keep the newest `history` records per partition, like the other backends' history.

        Kafka's own retention is by time and whole segments; this is the count-bounded history
        that `?history=` asks for, done with DeleteRecords after a write. For large histories
        it runs once per tenth of the history, not after every write.
        """
        step = max(1, history // 10)
        targets: dict[Any, Any] = {}
        for metadata in written:
            keep_from = int(metadata.offset) + 1 - history
            if keep_from - self._trimmed[metadata.partition] >= step:
                targets[TopicPartition(self.positions_topic, metadata.partition)] = (
                    RecordsToDelete(keep_from)
                )
        if not targets:
            return
        try:
            await self._admin.delete_records(targets)
        except (KafkaError, OSError) as error:
            # The records are written; time retention still bounds the topic.
            log.warning("trimming %s failed: %s", self.positions_topic, error)
            return
        for partition, target in targets.items():
            self._trimmed[partition.partition] = target.before_offset

    # Logouts ------------------------------------------------------------------------------
    async def revoke_session(self, revocation: SessionRevocation, keep_s: float) -> None:
        """One record in the logouts topic, confirmed by every in-sync replica. The topic's
        retention (`REVOCATIONS_RETENTION_MS`) keeps it, whatever `keep_s` says."""
        if keep_s * 1000 > REVOCATIONS_RETENTION_MS and not self._retention_warned:
            self._retention_warned = True
            log.warning(
                "sessions live %.0f h but kafka topic %s keeps logouts %.0f h: a logout older "
                "than that is forgotten by a dashboard that starts afterwards",
                keep_s / 3600, self.revocations_topic, REVOCATIONS_RETENTION_MS / 3_600_000,
            )
        value = orjson.dumps({"s": revocation.session_id, "e": revocation.expires_at})
        producer = await self._writer()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REVOKE_TIMEOUT_S
        try:
            sent = await asyncio.wait_for(
                producer.send(self.revocations_topic, value, partition=0), REVOKE_TIMEOUT_S
            )
            # Not wait_for: cancelling the future would not take the record back.
            done, _pending = await asyncio.wait({sent}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                sent.add_done_callback(outcome_not_wanted)
                raise TimeoutError
            sent.result()
        except TimeoutError:
            raise BackendError(
                f"kafka did not confirm a logout in {self.revocations_topic} within "
                f"{REVOKE_TIMEOUT_S:.0f}s"
            ) from None
        except KafkaError as error:
            await self._replace_producer(producer)
            raise failure(f"recording a logout in {self.revocations_topic}", error) from error

    async def session_revocations(self, after: str) -> tuple[list[SessionRevocation], str]:
        self._started()
        if self._revocations is None:
            self._revocations = RevocationReader(self)
        return await self._revocations.read(after, self.revocations_per_read)

    # Reading -----------------------------------------------------------------------------
    async def snapshot(self, team: str) -> Snapshot:
        store = self._started()
        partition = self.partition_of(team)
        try:
            cursor, positions, presence, unreadable = await store.snapshot_state(partition, team)
        except KafkaError as error:
            raise failure(f"snapshot of {team} from kafka", error) from error
        return Snapshot(team, f"{partition}:{cursor}", positions, presence, unreadable)

    async def forget_worker(self, team: str, worker: str) -> int:
        """See `Backend.forget_worker`: a tombstone for each of the worker's keys in the
        compacted store (compaction then drops the older records from disk). Each tombstone
        names the newest batch of the team's log as it is written, so that a snapshot's
        replay of the log's last seconds does not bring the worker back from batches before
        the erasure."""
        store = self._started()
        partition = self.partition_of(team)
        try:
            _cursor, positions, presence, _ = await store.snapshot_state(partition, team)
            newest_batch = await store.end_offset(
                TopicPartition(self.positions_topic, partition)
            ) - 1
            producer = await self._writer()
            sent = [
                await producer.send(
                    self.last_topic, None, key=store_key(team, worker, kind),
                    partition=partition,
                    headers=[("batch", str(newest_batch).encode())],
                )
                for kind in (Kind.POSITION, Kind.STATUS)
            ]
            await confirmed(sent)
        except KafkaError as error:
            raise failure(f"forgetting a worker of {team} in kafka", error) from error
        return int(worker in positions) + int(worker in presence)

    def subscribe(self) -> KafkaSubscription:
        return KafkaSubscription(self)

    def consume(
        self,
        group: str,
        consumer: str,
        *,
        start: GroupStart = "latest",
        acknowledge: bool = True,
        pace_s: float = 0.0,
    ) -> GroupConsumer:
        return KafkaGroupConsumer(
            self, group, consumer, start=start, acknowledge=acknowledge, pace_s=pace_s
        )
