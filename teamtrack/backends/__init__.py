"""Broadcast backends, chosen by URL scheme; drivers are imported only when their scheme is used.

    memory://                 one process (single-process mode, demos)
    redis://host:port/db      Redis Streams
    redis+sentinel://host:port,host:port/service/db
                              Redis Streams on the primary that Redis Sentinel names
    redis+cluster://host:port,host:port/
                              Redis Streams on a Redis Cluster
    kafka://host:port         Apache Kafka (a partitioned positions topic, a compacted store)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from teamtrack.backends.base import (
    START_OF_LOG,
    Backend,
    BackendError,
    Batch,
    Cursor,
    Event,
    Gap,
    GroupBatch,
    GroupConsumer,
    SessionRevocation,
    Snapshot,
    TeamSubscription,
)

SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster", "kafka")


def from_url(url: str) -> Backend:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from teamtrack.backends.memory import MemoryBackend

        return MemoryBackend.from_url(url)
    if scheme in ("redis", "rediss", "redis+sentinel", "redis+cluster"):
        from teamtrack.backends.redis import RedisBackend

        return RedisBackend.from_url(url)
    if scheme == "kafka":
        from teamtrack.backends.kafka import KafkaBackend

        return KafkaBackend.from_url(url)
    raise ValueError(
        f"unknown backend URL scheme {scheme!r} in backend URL; use one of: "
        + ", ".join(f"{name}://" for name in SCHEMES)
    )


__all__ = [
    "START_OF_LOG",
    "Backend",
    "BackendError",
    "Batch",
    "Cursor",
    "Event",
    "Gap",
    "GroupBatch",
    "GroupConsumer",
    "SessionRevocation",
    "Snapshot",
    "TeamSubscription",
    "from_url",
]
