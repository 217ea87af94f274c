"""Child processes of real servers (Mosquitto, Redis, our own services) on loopback ports.

Used by `teamtrack up` and by the test fixtures, so that both run the same servers the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1
# What the servers we start create (Redis' AOF, Mosquitto's database, Kafka's logs, the
# ingest's SQLite history) and their logs are readable by their owner only.
PRIVATE_UMASK = 0o077
PRIVATE_FILE_MODE = 0o600


class ServerError(RuntimeError):
    """A child server failed to start; the message ends with the tail of its log."""


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the parent dies, so a killed supervisor leaves no orphans.

    Linux sends it when the *thread* that started the child ends, not only the process: start
    children (and restart them) from a thread that lives as long as they should, such as the
    main thread or an event loop's.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Ports handed out by `free_port`, never handed out twice by one process.
_GIVEN: set[int] = set()
# Below the kernel's ephemeral range, above `teamtrack up`'s default ports (18830 ...).
_FREE_PORTS_FROM = 20_000


def _ephemeral_start() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now, for a server started a moment later.

    Not one the kernel hands out to outgoing connections (its ephemeral range): a port taken
    with `bind(0)` is such a port, and between this probe and the server's own bind any client
    socket of the machine (a test's Redis client, a bridge's connection) could get it as its
    source port, which made servers fail with "Address already in use" in busy test runs.
    Picked at random below that range, and never twice by one process."""
    ephemeral = _ephemeral_start()
    if ephemeral > _FREE_PORTS_FROM + 1000:
        for _ in range(200):
            port = random.randrange(_FREE_PORTS_FROM, ephemeral)
            if port in _GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    continue
            _GIVEN.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    _GIVEN.add(port)
    return port


def port_is_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


@dataclass
class ManagedProcess:
    """A child process whose output goes to a log file, stopped with SIGTERM then SIGKILL.

    The log is created 0600 and the child runs under `umask` (0o077: whatever it creates is
    its owner's alone)."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    umask: int = PRIVATE_UMASK
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(
            self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE
        )
        with os.fdopen(descriptor, "ab") as log:
            self.process = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                # A process group of its own: Ctrl-C in the terminal reaches the supervisor,
                # which then stops children in order instead of all at once.
                start_new_session=True,
                umask=self.umask,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ServerError(f"{self.name} exited early:\n{self.log_tail()}")
            if port_is_open(host, port):
                return
            time.sleep(0.05)
        raise ServerError(
            f"{self.name} did not open {host}:{port} in {timeout}s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


# Redis' append-only file, written before each reply and fsynced once a second: a Redis process
# that is killed loses nothing it acknowledged (the kernel has it); a host that loses power loses
# at most the last second or two. "always" fsyncs before every reply (docs/architecture.md has
# what each costs, measured).
APPENDFSYNC_POLICIES = ("everysec", "always", "no")


def redis_argv(
    port: int,
    data_dir: Path,
    host: str = LOOPBACK,
    *,
    appendfsync: str = "everysec",
    aclfile: Path | None = None,
) -> list[str]:
    """A loopback Redis whose data survives a crash of its process (AOF in `data_dir`); with
    `aclfile`, its users (`teamtrack.local.redis_users`) instead of an open default user."""
    if appendfsync not in APPENDFSYNC_POLICIES:
        raise ValueError(f"appendfsync must be one of {', '.join(APPENDFSYNC_POLICIES)}")
    users = ["--aclfile", str(aclfile)] if aclfile is not None else []
    return [
        "redis-server",
        "--port", str(port),
        "--bind", host,
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--dir", str(data_dir),
        "--protected-mode", "yes",
        *users,
    ]


def start_redis(
    port: int,
    data_dir: Path,
    host: str = LOOPBACK,
    *,
    appendfsync: str = "everysec",
    aclfile: Path | None = None,
) -> ManagedProcess:
    """A Redis on loopback with its append-only file in `data_dir`; started again on the same
    folder, it comes back with everything it had acknowledged."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = redis_argv(port, data_dir, host, appendfsync=appendfsync, aclfile=aclfile)
    server = ManagedProcess("redis", argv, data_dir / "redis.log").start()
    server.wait_for_port(host, port)
    return server


def start_mosquitto(config_path: Path, port: int, host: str = LOOPBACK) -> ManagedProcess:
    server = ManagedProcess(
        f"mosquitto:{port}", ["mosquitto", "-c", str(config_path)], config_path.with_suffix(".log")
    ).start()
    server.wait_for_port(host, port)
    return server


@dataclass
class SentinelGroup:
    """A Redis primary, its replicas and three Sentinels on loopback, for failover tests.

    `url()` is the `redis+sentinel://` URL of the group; `kill_primary()` SIGKILLs whichever
    server is primary now and `wait_for_new_primary()` returns the port of the one the
    Sentinels promote.
    """

    service: str
    host: str
    servers: dict[int, ManagedProcess]
    sentinels: dict[int, ManagedProcess]
    password: str | None = None

    def url(self, db: int = 0, *, query: str = "") -> str:
        """The group's `redis+sentinel://` URL (the password in it, for the tests)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"{self.host}:{port}" for port in self.sentinels)
        suffix = f"?{query}" if query else ""
        return f"redis+sentinel://{auth}{hosts}/{self.service}/{db}{suffix}"

    def primary_port(self) -> int:
        """The primary's port as the first Sentinel that answers reports it."""
        import redis

        for port in self.sentinels:
            client = redis.Redis(host=self.host, port=port, password=self.password,
                                 socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                address: Any = client.sentinel_get_master_addr_by_name(self.service)
                return int(address[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise ServerError(f"no sentinel of {self.service} answers")

    def server_client(self, port: int) -> Any:
        """A plain synchronous client of one data server (not through the Sentinels)."""
        import redis

        return redis.Redis(host=self.host, port=port, password=self.password,
                           socket_timeout=5.0, socket_connect_timeout=1.0)

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown, no last write); its port."""
        port = self.primary_port()
        server = self.servers[port]
        if server.process is not None:
            with contextlib.suppress(ProcessLookupError):
                server.process.send_signal(signal.SIGKILL)
            server.process.wait(5)
        return port

    def wait_for_new_primary(self, old_port: int, timeout: float = 30.0) -> int:
        """The port of the server promoted in place of `old_port`, once it serves writes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ServerError):
                port = self.primary_port()
                if port != old_port and self._is_writable_primary(port):
                    return port
            time.sleep(0.05)
        raise ServerError(
            f"no new primary for {self.service} within {timeout}s:\n"
            + "\n".join(sentinel.log_tail(10) for sentinel in self.sentinels.values())
        )

    def _is_writable_primary(self, port: int) -> bool:
        import redis

        client = self.server_client(port)
        try:
            role: Any = client.execute_command("ROLE")
            return bytes(role[0]) == b"master"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until the replica is in sync and every Sentinel knows its two peers and the replica."""
        import redis

        deadline = time.monotonic() + timeout
        waiting_for = "the first check"
        while time.monotonic() < deadline:
            try:
                waiting_for = self._not_ready()
                if not waiting_for:
                    return
            except (redis.RedisError, ServerError) as error:
                waiting_for = f"{type(error).__name__}: {error}"
            time.sleep(0.05)
        processes = [*self.servers.values(), *self.sentinels.values()]
        raise ServerError(
            f"sentinel group {self.service} not ready within {timeout}s ({waiting_for}):\n"
            + "\n".join(f"--- {process.name}\n{process.log_tail(8)}" for process in processes)
        )

    def _not_ready(self) -> str:
        """What the group still waits for; empty once ready."""
        import redis

        primary = self.primary_port()
        replicas = len(self.servers) - 1
        client = self.server_client(primary)
        try:
            # A write every replica confirms: after a full sync Redis 7.0 streams writes to a
            # replica only once it has acknowledged the sync (its once-a-second REPLCONF ACK),
            # so "online" alone does not mean that WAIT would succeed yet.
            client.set("sentinel-group:probe", b"1")
            client.delete("sentinel-group:probe")
            confirmed: Any = client.execute_command("WAIT", replicas, 100)
        finally:
            client.close()
        if int(confirmed) < replicas:
            return f"{confirmed} of {replicas} replicas confirming writes"
        for port in self.sentinels:
            sentinel = redis.Redis(host=self.host, port=port, password=self.password,
                                   socket_timeout=1.0)
            try:
                state: Any = sentinel.sentinel_master(self.service)
            finally:
                sentinel.close()
            if (state["num-other-sentinels"] < len(self.sentinels) - 1
                    or state["num-slaves"] < replicas):
                return f"sentinel {port} knowing its peers and replicas"
        return ""

    def stop(self) -> None:
        for process in [*self.sentinels.values(), *self.servers.values()]:
            process.stop()


def start_sentinel_group(
    data_dir: Path,
    *,
    service: str = "teamtrack",
    replicas: int = 1,
    password: str | None = None,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    host: str = LOOPBACK,
) -> SentinelGroup:
    """A primary, `replicas` replicas and three Sentinels (quorum 2) on free loopback ports.

    Throwaway servers like `start_redis` (no persistence). Each Sentinel is told its peers and
    the replica in its configuration, so the group can fail over as soon as it is ready rather
    than after the Sentinels' discovery (hello messages every 2 s). With `password`, the data
    servers and the Sentinels all require it.
    """
    import secrets

    data_dir.mkdir(parents=True, exist_ok=True)
    primary_port = free_port(host)
    replica_ports = [free_port(host) for _ in range(replicas)]
    sentinel_ports = [free_port(host) for _ in range(3)]
    sentinel_ids = {port: secrets.token_hex(20) for port in sentinel_ports}
    group = SentinelGroup(service, host, {}, {}, password)
    try:
        for port in (primary_port, *replica_ports):
            argv = [
                "redis-server",
                "--port", str(port),
                "--bind", host,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(data_dir),
                "--dbfilename", f"dump-{port}.rdb",
                "--protected-mode", "yes",
                # The replica's first full sync at once (the default waits 5 s for others).
                "--repl-diskless-sync-delay", "0",
            ]
            if password:
                argv += ["--requirepass", password, "--masterauth", password]
            if port != primary_port:
                argv += ["--replicaof", host, str(primary_port)]
            server = ManagedProcess(f"redis:{port}", argv, data_dir / f"redis-{port}.log").start()
            group.servers[port] = server
            server.wait_for_port(host, port)
        for port in sentinel_ports:
            lines = [
                f"port {port}",
                f"bind {host}",
                f"dir {data_dir}",
                f"sentinel myid {sentinel_ids[port]}",
                f"sentinel monitor {service} {host} {primary_port} 2",
                f"sentinel down-after-milliseconds {service} {down_after_ms}",
                f"sentinel failover-timeout {service} {failover_timeout_ms}",
                f"sentinel parallel-syncs {service} 1",
            ]
            lines += [f"sentinel known-replica {service} {host} {replica}"
                      for replica in replica_ports]
            lines += [
                f"sentinel known-sentinel {service} {host} {peer} {sentinel_ids[peer]}"
                for peer in sentinel_ports
                if peer != port
            ]
            if password:
                lines += [f"sentinel auth-pass {service} {password}", f"requirepass {password}"]
            config = data_dir / f"sentinel-{port}.conf"
            # Sentinel rewrites its configuration file as the group changes: a file of its own.
            config.write_text("\n".join(lines) + "\n")
            sentinel = ManagedProcess(
                f"sentinel:{port}", ["redis-server", str(config), "--sentinel"],
                data_dir / f"sentinel-{port}.log",
            ).start()
            group.sentinels[port] = sentinel
            sentinel.wait_for_port(host, port)
        group.wait_ready()
    except BaseException:
        group.stop()
        raise
    return group
