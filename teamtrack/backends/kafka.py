"""`kafka://[user:password@]host:port[,host:port]` — Apache Kafka as the cross-instance
broadcast layer. With a user, every client (producer, consumers, admin) authenticates with
SASL/SCRAM-SHA-512 over SASL_PLAINTEXT, as the Kafka that `teamtrack up` starts wants
(`teamtrack.kafka_users`); the password is never in an error or a log line.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    ConsumerStoppedError,
    KafkaError,
    OffsetOutOfRangeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)
from aiokafka.partitioner import murmur2

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
    decode_events,
    encode_events,
)
from teamtrack.contract import Kind

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 12
DEFAULT_TOPIC_PREFIX = "teamtrack"
DEFAULT_HISTORY_MS = 3_600_000
# Replicas of the topics the backend creates, unless `?replication=` says: one per broker,
# up to this many.
MAX_DEFAULT_REPLICATION = 3
# A fetch waits at most this long on the broker for new records. It bounds how late a team
# added to a subscription starts to flow (the broker answers a connection's requests in order),
# not the latency of live records: those end a waiting fetch at once.
FETCH_MAX_WAIT_MS = 100
READ_TIMEOUT_MS = 1_000
READ_MAX_RECORDS = 500
# Heartbeats this often let a group notice a joining member within half a second, instead of
# the 3 s default; a member is evicted after SESSION_TIMEOUT_MS without them.
HEARTBEAT_INTERVAL_MS = 500
SESSION_TIMEOUT_MS = 10_000
START_TIMEOUT_S = 15.0
CONFIRM_WARNING_S = 10.0
STORE_READ_TIMEOUT_S = 15.0
# How far back a snapshot reads the team's batches from the log, to include those whose
# last-known records are not written yet. Those follow their batch within milliseconds,
# unless the bridge died in between (then the worker's next fix repairs the store).
SNAPSHOT_REPLAY_MS = 5_000
TOPIC_EXISTS = TopicAlreadyExistsError.errno
# A role without the right to create topics (the admin created them: teamtrack.kafka_users).
NOT_ALLOWED_TO_CREATE = (TopicAuthorizationFailedError.errno, ClusterAuthorizationFailedError.errno)
SASL_MECHANISM = "SCRAM-SHA-512"
# Logouts are kept longer than a session lives (`--session-max-age-s`, 12 h by default), so a
# restarted dashboard still refuses every revoked cookie that has not expired.
REVOCATIONS_RETENTION_MS = 2 * 24 * 3_600_000
# A logout is answered only once recorded, or after this long with an error (the dashboard
# that answered refuses it anyway; the record stays queued and may still reach Kafka).
REVOKE_TIMEOUT_S = 5.0
# A read of the logouts waits at most this long; one with nothing new answers at once.
REVOCATIONS_READ_TIMEOUT_S = 5.0
KIND_LETTER = {Kind.POSITION: "p", Kind.STATUS: "s", Kind.EVENT: "e"}


def _failure(what: str, error: BaseException) -> BackendError:
    detail = str(error) or type(error).__name__
    return BackendError(f"{what} failed: {detail}")


def parse_cursor(cursor: Cursor) -> tuple[int, int]:
    """`partition:offset` -> (partition, offset); raises ValueError for anything else."""
    partition, separator, offset = cursor.partition(":")
    if not separator:
        raise ValueError(f"not a kafka cursor (partition:offset): {cursor!r}")
    return int(partition), int(offset)


def store_key(team: str, worker: str, kind: Kind) -> bytes:
    return f"{team}/{worker}/{KIND_LETTER[kind]}".encode()


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
        self._store: _LastKnownStore | None = None
        self._revocations: _RevocationReader | None = None
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
            self._store = _LastKnownStore(self)
            await self._store.start()
        except (KafkaError, OSError) as error:
            await self.close()
            where = self.options.bootstrap
            raise _failure(f"starting the kafka backend on {where}", error) from error
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
            await _stop_producer(self._producer)
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

    def _started(self) -> _LastKnownStore:
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
                        await _stop_producer(producer)
                        raise _failure("starting a kafka producer", error) from error
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
            written = await _confirmed(appended)
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
            await _confirmed(stored)
        except KafkaError as error:
            await self._replace_producer(producer)
            raise _failure("publish to kafka", error) from error
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
                await _stop_producer(replacement)
                return
            self._producer = replacement
        await _stop_producer(failed)

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
                sent.add_done_callback(_outcome_not_wanted)
                raise TimeoutError
            sent.result()
        except TimeoutError:
            raise BackendError(
                f"kafka did not confirm a logout in {self.revocations_topic} within "
                f"{REVOKE_TIMEOUT_S:.0f}s"
            ) from None
        except KafkaError as error:
            await self._replace_producer(producer)
            raise _failure(f"recording a logout in {self.revocations_topic}", error) from error

    async def session_revocations(self, after: str) -> tuple[list[SessionRevocation], str]:
        self._started()
        if self._revocations is None:
            self._revocations = _RevocationReader(self)
        return await self._revocations.read(after, self.revocations_per_read)

    # Reading -----------------------------------------------------------------------------
    async def snapshot(self, team: str) -> Snapshot:
        store = self._started()
        partition = self.partition_of(team)
        try:
            cursor, positions, presence = await store.snapshot_state(partition, team)
        except KafkaError as error:
            raise _failure(f"snapshot of {team} from kafka", error) from error
        return Snapshot(team, f"{partition}:{cursor}", positions, presence)

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
        return _KafkaGroupConsumer(
            self, group, consumer, start=start, acknowledge=acknowledge, pace_s=pace_s
        )


async def _confirmed(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The produce results, waiting as long as it takes: the idempotent producer retries until
    the broker is back, and the caller must not go on before. Says so while it waits."""
    pending: set[asyncio.Future[Any]] = set(futures)
    waited = 0.0
    while pending:
        _done, pending = await asyncio.wait(pending, timeout=CONFIRM_WARNING_S)
        if pending:
            waited += CONFIRM_WARNING_S
            log.warning(
                "kafka has not confirmed %d record(s) for %.0fs; holding them until it does",
                len(pending), waited,
            )
    return [future.result() for future in futures]


def _outcome_not_wanted(future: asyncio.Future[Any]) -> None:
    """Retrieves a send's late result, so that asyncio does not report it as never seen."""
    if not future.cancelled():
        future.exception()


async def _stop_producer(producer: Any) -> None:
    # `stop` flushes what is queued and would wait forever for a broker that is gone.
    try:
        await asyncio.wait_for(producer.stop(), 5)
    except (KafkaError, OSError, TimeoutError) as error:
        log.warning("kafka producer did not stop cleanly: %s", error or type(error).__name__)


async def _stop_consumer(consumer: Any) -> None:
    try:
        await asyncio.wait_for(consumer.stop(), 5)
    except (KafkaError, OSError, TimeoutError) as error:
        log.warning("kafka consumer did not stop cleanly: %s", error or type(error).__name__)


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


def _keep_newest(entries: StoreEntries, key: tuple[str, str], stored: _Stored) -> None:
    current = entries.get(key)
    if current is None or current.ts <= stored.ts:
        entries[key] = stored


class _LastKnownStore:
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
                await _stop_consumer(consumer)
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
    ) -> tuple[int, dict[str, Event], dict[str, Event]]:
        """The team's cursor (an offset of its partition), positions and presence."""
        log_partition = TopicPartition(self._backend.positions_topic, partition)
        async with self._lock:
            newest_batch = await self.end_offset(log_partition) - 1
            view = await self._caught_up(partition)
            entries = dict(view.teams.get(team, {}))
            cursor = max([newest_batch, *(stored.batch for stored in entries.values())])
            replay_from = await self._replay_start(log_partition, newest_batch)
            if replay_from <= cursor:
                await self._replay(log_partition, team, replay_from, cursor, entries)
        positions: dict[str, Event] = {}
        presence: dict[str, Event] = {}
        for (kind, worker), stored in entries.items():
            target = positions if kind == KIND_LETTER[Kind.POSITION] else presence
            target[worker] = decode_event(team, _loads(stored.raw))
        return cursor, positions, presence

    async def _replay_start(self, log_partition: Any, newest_batch: int) -> int:
        since_ms = int(time.time() * 1000) - SNAPSHOT_REPLAY_MS
        found = await self._offsets.offsets_for_times({log_partition: since_ms})
        at = found.get(log_partition)
        # None: nothing that recent; only batches written during this snapshot, if any.
        return int(at.offset) if at is not None else newest_batch + 1

    async def _replay(
        self, log_partition: Any, team: str, start: int, cursor: int, entries: StoreEntries
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
                    for event in decode_events(team, record.value):
                        if event.kind is Kind.EVENT:
                            continue
                        stored = _Stored(event.ts, record.offset, event.to_json())
                        _keep_newest(entries, (KIND_LETTER[event.kind], event.worker), stored)
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
    if record.key is None or record.value is None:
        return
    team, _, rest = record.key.decode().partition("/")
    worker, _, kind = rest.rpartition("/")
    headers = dict(record.headers)
    stored = _Stored(int(headers.get("ts", b"0")), int(headers.get("batch", b"-1")), record.value)
    _keep_newest(view.teams[team], (kind, worker), stored)


class _RevocationReader:
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
                await _stop_consumer(consumer)
                raise _failure("connecting the kafka logouts reader", error) from error
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
                raise _failure(f"reading {topic}", error) from error

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
            await _stop_consumer(self._consumer)
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


def _loads(raw: bytes) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(raw)
    return value


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
                    await _stop_consumer(consumer)
                    raise _failure("connecting a kafka reader", error) from error
                self._consumer = consumer
            return self._consumer

    async def add(self, team: str, after: Cursor) -> None:
        consumer = await self._opened()
        partition = self._backend.partition_of(team)
        topic_partition = self._topic_partition(partition)
        try:
            offsets = await consumer.beginning_offsets([topic_partition])
        except KafkaError as error:
            raise _failure(f"reading where {team}'s log starts", error) from error
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
            await _stop_consumer(self._consumer)

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
                    raise _failure("reading from kafka", lookup_error) from lookup_error
                continue
            except ConsumerStoppedError:
                raise StopAsyncIteration from None
            except KafkaError as error:
                if self._closed:
                    raise StopAsyncIteration from None
                raise _failure("reading from kafka", error) from error
            self._take(fetched)
        return self._ready.popleft()


class _NoAck(Acknowledgeable):
    async def ack(self) -> None:
        return None


class _OffsetAck(Acknowledgeable):
    def __init__(self, member: _KafkaGroupConsumer, partition: Any, offset: int) -> None:
        self._member = member
        self._partition = partition
        self._offset = offset

    async def ack(self) -> None:
        self._member.acknowledged(self._partition, self._offset)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: _KafkaGroupConsumer) -> None:
        self._member = member

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._member.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._member.partitions_assigned(set(assigned))


class _KafkaGroupConsumer(GroupConsumer):
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
            await _stop_consumer(consumer)
            raise _failure(f"joining kafka consumer group {self._group_id}", error) from error
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
            await _stop_consumer(self._consumer)

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
                raise _failure(f"reading kafka group {self._group_id}", error) from error
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
