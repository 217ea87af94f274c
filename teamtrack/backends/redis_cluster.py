"""`redis+cluster://`: the Redis backend on a Redis Cluster.

    redis+cluster://[user:password@]host:port[,host:port...][/]?options

The hosts are seed nodes (any nodes of the cluster, port 6379 when left out): the client asks
them for the slot map (CLUSTER SLOTS) and then talks to every primary directly, following
MOVED redirections and failovers. Redis Cluster has one database, so the path is empty or `/`.
The credentials are those of every node. Every `redis://` option works the same, plus
`?shards=N` (default 12; how teams are grouped into hash slots, `redis_layout`) and
`?wait_replicas=N&wait_timeout_ms=T` (a publish returns once N replicas of the primary that
took it confirm it; `redis_connect.ReplicaWait`). TLS (`rediss+cluster://`) is not supported yet.

What goes where:

* the shared client is redis-py's `RedisCluster` (a command goes to the primary of its key's
  slot; connection errors refresh the slot map and are retried, MOVED is followed);
* a publish is one script call per shard, on the primary of that shard's slot; with
  `wait_replicas`, the script and `WAIT` go out together on one connection of that primary
  (WAIT counts the replicas of the connection's own writes), and an error asks the client for
  a fresh slot map before the publish fails (the bridge retries it);
* a blocking reader (a subscription's, a group member's) is a plain connection to the primary
  serving its shard, looked up in the shared client's slot map when it connects; after an
  error it asks for a fresh map, and reconnects (with backoff) wherever the shard is now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection

CLUSTER_SCHEME = "redis+cluster"
DEFAULT_NODE_PORT = 6379
# After an error, a fresh slot map at most this often (redis-py's default: 1 s). A failover
# shows in the map as soon as the promoted replica has taken the slots; a second between
# refreshes added up to a second to every failover's pause.
TOPOLOGY_REFRESH_S = 0.2
USAGE = "redis+cluster://[user:password@]host:port[,host:port...][/]"


@dataclass(frozen=True)
class ClusterTarget:
    """A parsed `redis+cluster://` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> ClusterTarget:
        parts = urlsplit(url)
        if parts.scheme != CLUSTER_SCHEME:
            raise ValueError(f"not a {CLUSTER_SCHEME}:// URL; use {USAGE}")
        if parts.fragment:
            raise ValueError(f"{CLUSTER_SCHEME}:// URLs take no #fragment; use {USAGE}")
        if parts.path not in ("", "/"):
            raise ValueError(
                f"{CLUSTER_SCHEME}:// takes no database (a cluster has only db 0); use {USAGE}"
            )
        userinfo, at, hosts = parts.netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            if not colon or not secret:
                # Never echo userinfo: it may be a password written without its colon.
                raise ValueError(
                    f"{CLUSTER_SCHEME}:// credentials are user:password@ or :password@; "
                    f"use {USAGE}"
                )
            username, password = unquote(user) or None, unquote(secret)
        nodes = tuple(_node_address(entry) for entry in hosts.split(","))
        return cls(nodes, username, password)


def host_port(
    entry: str, usage: str, *, scheme: str, what: str, default_port: int
) -> tuple[str, int]:
    """`host[:port]` or `[IPv6][:port]` of a URL listing several servers (Sentinels, cluster
    nodes), with a clear error naming `usage` otherwise."""
    if not entry:
        raise ValueError(f"{scheme}:// has an empty {what} address; use {usage}")
    if entry.startswith("["):  # [IPv6]:port
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad {what} address {entry!r}; use {usage}")
        port_text = rest[1:] if rest else ""
    else:
        host, _colon, port_text = entry.partition(":")
    if not host:
        raise ValueError(f"bad {what} address {entry!r}; use {usage}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad {what} port in {entry!r}; use {usage}")
    return host, int(port_text)


def _node_address(entry: str) -> tuple[str, int]:
    return host_port(entry, USAGE, scheme=CLUSTER_SCHEME, what="node",
                     default_port=DEFAULT_NODE_PORT)


class ClusterConnector:
    """The clients of a cluster backend: the shared `RedisCluster`, and per-node connections
    for blocking readers and for publishes that wait for replicas."""

    def __init__(self, target: ClusterTarget) -> None:
        self.target = target
        self._shared: RedisCluster | None = None

    def shared_client(self, *, max_connections: int, **options: Any) -> RedisCluster:
        options.pop("timeout", None)  # a blocking pool's wait: RedisCluster has none
        self._shared = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self.target.nodes],
            username=self.target.username,
            password=self.target.password,
            max_connections=max_connections,
            topology_refresh_min_interval=TOPOLOGY_REFRESH_S,
            **options,
        )
        return self._shared

    def _cluster(self) -> RedisCluster:
        if self._shared is None:
            raise RuntimeError("the cluster backend is used before start()")
        return self._shared

    async def node_of(self, key: str) -> ClusterNode:
        """The primary serving `key`'s slot, as the shared client's slot map has it now."""
        cluster = self._cluster()
        await cluster.initialize()  # a no-op unless a refresh was asked for and is due
        node = cluster.get_node_from_key(key)
        if node is None:  # only asked for replicas; never for a primary
            raise RuntimeError(f"no node serves {key!r}")
        return node

    async def reader_client(self, key: str, **options: Any) -> aioredis.Redis:
        """A connection of its own to the primary serving `key` (a blocking reader's)."""
        node = await self.node_of(key)
        return aioredis.Redis(
            host=node.host, port=int(node.port), username=self.target.username,
            password=self.target.password, **options,
        )

    def refresh_soon(self, node: ClusterNode | None = None) -> None:
        """Ask for a fresh slot map after an error (the next command, or `node_of`, fetches
        it; at most once a second). redis-py has no public call for this: it asks for one
        itself only after errors of the commands it sent."""
        cluster = self._cluster()
        cluster._request_refresh(last_failed_node_name=node.name if node else None)

    async def aclose(self) -> None:
        self._shared = None


class NodePool:
    """One cluster node's connections, with the interface of a connection pool that
    `redis_common.execute_packed` and `ReplicaWait.execute_on` use."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    async def get_connection(self) -> Connection:
        return self.node.acquire_connection()

    async def release(self, connection: Connection) -> None:
        self.node.release(connection)
