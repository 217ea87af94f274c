"""A real Redis Cluster on loopback ports, for the tests of `redis+cluster://`.

`start_redis_cluster(folder)` starts 3 primaries and a replica of each (`redis-server
--cluster-enabled yes`), joins them with `redis-cli --cluster create ... --cluster-replicas 1`,
and waits until every node agrees that all 16,384 slots are served and every replica follows
its primary. Throwaway servers like `start_sentinel_group`'s (no persistence).

With `password`, every node requires it (`requirepass`) and replicas use it towards their
primary (`masterauth`); it is written into each node's 0600 configuration file and handed to
`redis-cli` in its environment (`REDISCLI_AUTH`), never on a command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teamtrack.local.servers import (
    LOOPBACK,
    PRIVATE_FILE_MODE,
    ManagedProcess,
    ServerError,
    free_port,
)

SLOTS = 16_384


@dataclass
class RedisClusterGroup:
    """The nodes of a test cluster: `url()` names them all; `kill_node(port)` SIGKILLs one."""

    host: str
    nodes: dict[int, ManagedProcess] = field(default_factory=dict)
    password: str | None = None

    def url(self, *, query: str = "") -> str:
        """The cluster's `redis+cluster://` URL (every node as a seed; the password in it)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"{self.host}:{port}" for port in self.nodes)
        suffix = f"?{query}" if query else ""
        return f"redis+cluster://{auth}{hosts}/{suffix}"

    def node_client(self, port: int) -> Any:
        """A plain synchronous client of one node (no redirections followed)."""
        import redis

        return redis.Redis(host=self.host, port=port, password=self.password,
                           socket_timeout=5.0, socket_connect_timeout=1.0)

    def running_ports(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.running()]

    def primaries(self) -> dict[int, list[tuple[int, int]]]:
        """Port -> the slot ranges it serves, as the first node that answers sees it."""
        import redis

        for port in self.running_ports():
            client = self.node_client(port)
            try:
                shards: Any = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            finally:
                client.close()
            owners: dict[int, list[tuple[int, int]]] = {}
            for entry in shards:
                owners.setdefault(int(entry[2][1]), []).append((int(entry[0]), int(entry[1])))
            return owners
        raise ServerError("no node of the cluster answers")

    def owner_of(self, slot: int) -> int:
        for port, ranges in self.primaries().items():
            if any(first <= slot <= last for first, last in ranges):
                return port
        raise ServerError(f"no primary serves slot {slot}")

    def replicas_of(self, primary: int) -> list[int]:
        """The running nodes that replicate `primary` (ROLE of each)."""
        import redis

        found = []
        for port in self.running_ports():
            client = self.node_client(port)
            try:
                role: Any = client.execute_command("ROLE")
            except redis.RedisError:
                continue
            finally:
                client.close()
            if bytes(role[0]) == b"slave" and int(role[2]) == primary:
                found.append(port)
        return found

    def pause(self, port: int, paused: bool) -> None:
        """SIGSTOP (or SIGCONT) one node: a node that stops answering without closing."""
        node = self.nodes[port]
        if node.process is not None and node.running():
            os.kill(node.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def kill_node(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no last write)."""
        node = self.nodes[port]
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                node.process.send_signal(signal.SIGKILL)
            node.process.wait(5)

    def wait_for_new_owner(self, slot: int, old_port: int, timeout: float = 30.0) -> int:
        """The port of the replica promoted to serve `slot` instead of `old_port`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ServerError):
                port = self.owner_of(slot)
                if port != old_port and self._role(port) == b"master":
                    return port
            time.sleep(0.02)
        raise ServerError(
            f"no node took slot {slot} over from {old_port} within {timeout}s:\n"
            + "\n".join(f"--- {n.name}\n{n.log_tail(6)}" for n in self.nodes.values())
        )

    def _role(self, port: int) -> bytes:
        import redis

        client = self.node_client(port)
        try:
            role: Any = client.execute_command("ROLE")
            return bytes(role[0])
        except redis.RedisError:
            return b""
        finally:
            client.close()

    def wait_ready(self, replicas: int, timeout: float = 30.0) -> None:
        """Until every running node sees all slots served and each primary has `replicas`
        replicas confirming writes (WAIT)."""
        deadline = time.monotonic() + timeout
        waiting_for = "the first check"
        while time.monotonic() < deadline:
            try:
                waiting_for = self._not_ready(replicas)
                if not waiting_for:
                    return
            except Exception as error:  # a node still starting: ask again
                waiting_for = f"{type(error).__name__}: {error}"
            time.sleep(0.1)
        raise ServerError(
            f"redis cluster not ready within {timeout}s ({waiting_for}):\n"
            + "\n".join(f"--- {n.name}\n{n.log_tail(8)}" for n in self.nodes.values())
        )

    def _not_ready(self, replicas: int) -> str:
        for port in self.running_ports():
            client = self.node_client(port)
            try:
                info: Any = client.execute_command("CLUSTER", "INFO")
            finally:
                client.close()
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(
                line.split(":", 1) for line in text.split() if ":" in line
            )
            if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != str(SLOTS):
                return f"node {port}: {fields.get('cluster_state')}, slots ok " \
                       f"{fields.get('cluster_slots_ok')}"
        for port in self.primaries():
            client = self.node_client(port)
            try:
                # A write every replica confirms: after a full sync Redis 7.0 streams writes
                # to a replica only once it acknowledged the sync.
                confirmed: Any = client.execute_command("WAIT", replicas, 100)
            finally:
                client.close()
            if int(confirmed) < replicas:
                return f"primary {port}: {confirmed} of {replicas} replicas confirming"
        return ""

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


def start_redis_cluster(
    data_dir: Path,
    *,
    primaries: int = 3,
    replicas: int = 1,
    password: str | None = None,
    node_timeout_ms: int = 1000,
    host: str = LOOPBACK,
) -> RedisClusterGroup:
    """`primaries` primaries with `replicas` replicas each, joined into one cluster.

    `cluster-node-timeout` is `node_timeout_ms` (Redis' default is 15 s): a primary that does
    not answer for that long is marked failed and its replica is elected in its place.
    `cluster-require-full-coverage no`: while one primary's slots are being failed over, the
    other primaries keep serving theirs (with `yes`, the whole cluster refuses every command).
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    group = RedisClusterGroup(host, password=password)
    try:
        for _ in range(primaries * (1 + replicas)):
            port, bus_port = free_port(host), free_port(host)
            lines = [
                f"port {port}",
                f"bind {host}",
                "protected-mode yes",
                "cluster-enabled yes",
                f"cluster-port {bus_port}",
                f"cluster-config-file nodes-{port}.conf",
                f"cluster-node-timeout {node_timeout_ms}",
                "cluster-require-full-coverage no",
                'save ""',
                "appendonly no",
                f"dir {data_dir}",
                f"dbfilename dump-{port}.rdb",
                # A replica's first full sync at once (the default waits 5 s for others).
                "repl-diskless-sync-delay 0",
            ]
            if password:
                lines += [f"requirepass {password}", f"masterauth {password}"]
            config = data_dir / f"redis-{port}.conf"
            descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                 PRIVATE_FILE_MODE)
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write("\n".join(lines) + "\n")
            node = ManagedProcess(
                f"redis-cluster:{port}", ["redis-server", str(config)],
                data_dir / f"redis-{port}.log",
            ).start()
            group.nodes[port] = node
        for port, node in group.nodes.items():
            node.wait_for_port(host, port)
        environment = dict(os.environ)
        environment.pop("REDISCLI_AUTH", None)
        if password:
            environment["REDISCLI_AUTH"] = password
        created = subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"{host}:{port}" for port in group.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            env=environment, capture_output=True, timeout=60, check=False,
        )
        if created.returncode != 0:
            raise ServerError(
                "redis-cli --cluster create failed:\n"
                + created.stdout.decode(errors="replace")[-2000:]
                + created.stderr.decode(errors="replace")[-2000:]
            )
        group.wait_ready(replicas)
    except BaseException:
        group.stop()
        raise
    return group
