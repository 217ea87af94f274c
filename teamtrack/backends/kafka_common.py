"""What the Kafka backend's parts share: settings, cursors, store keys, and stopping clients
without waiting forever for a broker that is gone."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from teamtrack.backends.base import (
    BackendError,
    Cursor,
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
# A role without the right to create topics (the admin created them: teamtrack.local.kafka_users).
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


def failure(what: str, error: BaseException) -> BackendError:
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


async def confirmed(futures: list[asyncio.Future[Any]]) -> list[Any]:
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


def outcome_not_wanted(future: asyncio.Future[Any]) -> None:
    """Retrieves a send's late result, so that asyncio does not report it as never seen."""
    if not future.cancelled():
        future.exception()


async def stop_producer(producer: Any) -> None:
    # `stop` flushes what is queued and would wait forever for a broker that is gone.
    try:
        await asyncio.wait_for(producer.stop(), 5)
    except (KafkaError, OSError, TimeoutError) as error:
        log.warning("kafka producer did not stop cleanly: %s", error or type(error).__name__)


async def stop_consumer(consumer: Any) -> None:
    try:
        await asyncio.wait_for(consumer.stop(), 5)
    except (KafkaError, OSError, TimeoutError) as error:
        log.warning("kafka consumer did not stop cleanly: %s", error or type(error).__name__)
