"""Where the Redis backend connects, its URL options, and the publish that waits for replicas.

Three kinds of URL:

    redis://[user:password@]host:port/db?options          one server (rediss:// for TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]?options
    redis+cluster://[user:password@]host:port[,host:port...][/]?options   (`redis_cluster`)

A `redis+sentinel://` URL names Redis Sentinels (port 26379 when left out) and the service
(`sentinel monitor <service> ...`) whose primary the backend uses; `db` defaults to 0. The
credentials are those of the Redis servers (the primary and its replicas); the Sentinels are
asked without any unless `?sentinel_auth=same` (then with the same ones).

Every connection of the backend asks the Sentinels for the primary when it connects: the shared
pool's, each blocking reader's. After a failover the connections to the old primary fail (or
answer READONLY, which redis-py turns into a connection error), are dropped, and the next one
goes to the primary the Sentinels name then.

`?wait_replicas=N&wait_timeout_ms=T` (either kind of URL) makes a publish return only once N
replicas confirmed they hold it: the publish script and `WAIT N T` go out in one write, so the
cost is one round trip plus the replicas' acknowledgement. Fewer than N within T: the publish
raises (`ReplicasBehindError`, a `BackendError` for the caller) and the bridge acknowledges
nothing and publishes the batch again; the first attempt may have reached the primary all the
same, so a batch may then be stored twice (at least once; readers dedupe by worker and seq).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError, ResponseError

from teamtrack.backends.redis_cluster import (
    CLUSTER_SCHEME,
    ClusterConnector,
    ClusterTarget,
    host_port,
)

SENTINEL_SCHEME = "redis+sentinel"
SERVER_SCHEMES = ("redis", "rediss")
DEFAULT_SENTINEL_PORT = 26379
# Asking one Sentinel: a Sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUT_S = 1.0
DEFAULT_WAIT_TIMEOUT_MS = 500
# A WAIT blocks the connection; it must end well before the socket timeout (15 s) would.
MAX_WAIT_TIMEOUT_MS = 10_000

# The URL's query options: name -> type of the value.
OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "history": int,
    "group_history": int,
    "history_ms": int,
    "group_history_ms": int,
    "claim_idle_ms": int,
    "wait_replicas": int,
    "wait_timeout_ms": int,
    "sentinel_auth": str,
    "shards": int,
}
SENTINEL_AUTH = {"none": False, "same": True}


class ReplicasBehindError(RedisError):
    """Fewer replicas than asked confirmed a write within the wait timeout."""


def safe_url(url: str) -> str:
    """The URL without its password, for logs and errors (any scheme, several hosts too)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return url
    return urlunsplit((parts.scheme, f"{user}:***@{hosts}", parts.path, parts.query, ""))


def parse_backend_url(url: str) -> tuple[str, dict[str, Any]]:
    """The server part of a backend URL (no query) and its options, checked strictly.

    Unknown, repeated or empty options are refused with their name, so that a misspelt
    `wait_replicas` cannot silently turn the replica wait off.
    """
    try:
        parts = urlsplit(url)
    except ValueError as error:  # e.g. an unclosed [IPv6 address
        raise ValueError(f"redis URL does not parse: {error}") from None
    if parts.scheme not in (*SERVER_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise ValueError(f"not a redis URL: {parts.scheme}://")
    query = parse_qs(parts.query, keep_blank_values=True)
    options: dict[str, Any] = {}
    for name, values in query.items():
        convert = OPTIONS.get(name)
        if convert is None:
            raise ValueError(
                f"unknown redis URL option {name!r}; known: {', '.join(OPTIONS)}"
            )
        if len(values) != 1 or not values[0]:
            raise ValueError(f"redis URL option {name} needs exactly one value")
        try:
            options[name] = convert(values[0])
        except ValueError:
            raise ValueError(
                f"redis URL option {name} must be an integer, not {values[0]!r}"
            ) from None
    if "sentinel_auth" in options:
        word = options["sentinel_auth"]
        if word not in SENTINEL_AUTH:
            raise ValueError(
                f"redis URL option sentinel_auth is one of {', '.join(SENTINEL_AUTH)}, "
                f"not {word!r}"
            )
        options["sentinel_auth"] = SENTINEL_AUTH[word]
    server_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return server_url, options


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        usage = (
            "redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]"
        )
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL; use {usage}")
        if parts.fragment:
            raise ValueError(f"{SENTINEL_SCHEME}:// URLs take no #fragment; use {usage}")
        userinfo, at, hosts = parts.netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            if not colon or not secret:
                # Never echo userinfo: it may be a password written without its colon.
                raise ValueError(
                    f"{SENTINEL_SCHEME}:// credentials are user:password@ or :password@; "
                    f"use {usage}"
                )
            username, password = unquote(user) or None, unquote(secret)
        sentinels = tuple(
            host_port(entry, usage, scheme=SENTINEL_SCHEME, what="Sentinel",
                      default_port=DEFAULT_SENTINEL_PORT)
            for entry in hosts.split(",")
        )
        segments = parts.path.split("/")[1:] if parts.path else []
        if not segments or not segments[0] or len(segments) > 2:
            raise ValueError(
                f"{SENTINEL_SCHEME}:// needs the Sentinel service name as its path "
                f"(and optionally the db number after it); use {usage}"
            )
        service = unquote(segments[0])
        db = 0
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise ValueError(
                    f"{SENTINEL_SCHEME}:// db must be a number, not {segments[1]!r}; use {usage}"
                )
            db = int(segments[1])
        return cls(sentinels, service, db, username, password)




class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection instead of refusing one.

    Method resolution: the Sentinel pool's master discovery and connection class, the
    blocking pool's `get_connection` and `release`.
    """


class RedisConnector:
    """Makes the backend's clients: of one server, of a Sentinel service's current primary,
    or (`cluster`) of a Redis Cluster's nodes."""

    def __init__(self, url: str, *, sentinel_auth: bool = False) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        scheme = urlsplit(url).scheme
        self.target: SentinelTarget | None = None
        self.cluster: ClusterConnector | None = None
        if scheme == SENTINEL_SCHEME:
            self.target = SentinelTarget.parse(url)
        elif scheme == CLUSTER_SCHEME:
            self.cluster = ClusterConnector(ClusterTarget.parse(url))
            if sentinel_auth:
                raise ValueError(f"sentinel_auth applies to {SENTINEL_SCHEME}:// URLs only")
        elif scheme not in SERVER_SCHEMES:
            raise ValueError(f"not a redis URL: {scheme}://")
        elif sentinel_auth:
            raise ValueError(f"sentinel_auth applies to {SENTINEL_SCHEME}:// URLs only")
        self._sentinel_auth = sentinel_auth
        self._manager: Sentinel | None = None

    def client(self, **options: Any) -> aioredis.Redis:
        """A client with a pool of its own (a blocking reader's)."""
        if self.target is None:
            return aioredis.Redis.from_url(self.url, **options)
        redis_client: aioredis.Redis = self._sentinels().master_for(
            self.target.service, **options
        )
        return redis_client

    def pooled_client(
        self, *, max_connections: int, timeout: float, **options: Any
    ) -> aioredis.Redis | RedisCluster:
        """A client whose commands wait (up to `timeout`) for one of `max_connections`; on a
        cluster, a `RedisCluster` with up to `max_connections` per node (`redis_cluster`)."""
        if self.cluster is not None:
            return self.cluster.shared_client(max_connections=max_connections, **options)
        if self.target is None:
            pool = BlockingConnectionPool.from_url(
                self.url, max_connections=max_connections, timeout=timeout, **options
            )
            return aioredis.Redis(connection_pool=pool)
        redis_client: aioredis.Redis = self._sentinels().master_for(
            self.target.service,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=max_connections,
            timeout=timeout,
            **options,
        )
        return redis_client

    def _sentinels(self) -> Sentinel:
        """One Sentinel client per backend, shared by its pool and its readers."""
        target = self.target
        assert target is not None
        if self._manager is None:
            sentinel_options: dict[str, Any] = {
                "socket_timeout": SENTINEL_TIMEOUT_S,
                "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            }
            if self._sentinel_auth:
                sentinel_options.update(username=target.username, password=target.password)
            self._manager = Sentinel(
                list(target.sentinels),
                sentinel_kwargs=sentinel_options,
                db=target.db,
                username=target.username,
                password=target.password,
            )
        return self._manager

    async def aclose(self) -> None:
        """Close the connections to the Sentinels (a later client opens them again)."""
        if self._manager is not None:
            await self._manager.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()


class ReplicaWait:
    """Runs a write and `WAIT replicas timeout` in one round trip; fails when replicas lag."""

    def __init__(self, replicas: int, timeout_ms: int) -> None:
        if replicas < 1:
            raise ValueError("wait_replicas must be at least 1 to wait for replicas")
        if not 1 <= timeout_ms <= MAX_WAIT_TIMEOUT_MS:
            raise ValueError(
                f"wait_timeout_ms must be from 1 to {MAX_WAIT_TIMEOUT_MS} (WAIT 0 waits forever)"
            )
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        arguments = [b"WAIT", b"%d" % replicas, b"%d" % timeout_ms]
        self._wait_command = b"*3\r\n" + b"".join(
            b"$%d\r\n%s\r\n" % (len(argument), argument) for argument in arguments
        )

    async def execute(self, client: aioredis.Redis, command: bytes) -> Any:
        """Send a packed command and WAIT together; the command's reply once enough replicas
        hold it. An error reply of the command is raised after WAIT's reply was read (the
        connection stays clean); too few replicas raise `ReplicasBehindError`."""
        return await self.execute_on(client.connection_pool, command)

    async def execute_on(self, pool: Any, command: bytes) -> Any:
        """`execute` on a connection of `pool` (a client's pool, or a cluster node's)."""
        connection = await pool.get_connection()
        failure: ResponseError | None = None
        try:
            await connection.send_packed_command(command + self._wait_command, check_health=False)
            raise_if_cancelled()
            try:
                reply = await connection.read_response()
            except ResponseError as error:  # an error reply: WAIT's reply still follows
                failure = error
            confirmed = await connection.read_response()
        except ResponseError:
            raise  # WAIT's own error reply: the connection is in a clean state
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        if failure is not None:
            raise failure
        if int(confirmed) < self.replicas:
            raise ReplicasBehindError(
                f"{int(confirmed)} of {self.replicas} replica(s) confirmed the write within "
                f"{self.timeout_ms} ms; it is not acknowledged (a retry may store it twice)"
            )
        return reply


def replica_wait(replicas: int, timeout_ms: int | None) -> ReplicaWait | None:
    """The backend's replica wait from its options; None without `wait_replicas`."""
    if replicas < 0:
        raise ValueError("wait_replicas must be 0 (no wait) or positive")
    if replicas == 0:
        if timeout_ms is not None:
            raise ValueError("wait_timeout_ms needs wait_replicas (1 or more)")
        return None
    return ReplicaWait(replicas, DEFAULT_WAIT_TIMEOUT_MS if timeout_ms is None else timeout_ms)


def raise_if_cancelled() -> None:
    """Raise the cancellation that Python 3.11's `asyncio.wait_for` can lose.

    redis-py sends every command through `asyncio.wait_for` when a socket timeout is set; on
    Python 3.11 a cancellation that arrives just as the send completes is swallowed (the task
    still counts it: `cancelling()`), and a reader loop would then go on reading forever, so
    whoever cancelled it and waits for it (a dashboard's shutdown) waits forever too.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
