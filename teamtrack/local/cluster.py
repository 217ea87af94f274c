"""`teamtrack up`: a whole local cluster as child processes, supervised, stopped cleanly.

Order of start: identities, Redis (or Kafka), brokers, their WebSockets gateways, bridges,
device gateways (HTTP), dashboards, ingest, simulator.
Order of stop: the reverse, so devices say `offline` while bridges still forward it and nothing is
left behind; the ingest goes after the bridges, the backend last.

Every child, the backend server included, is supervised: one that dies is restarted with backoff
and counted. The backoff starts again from its first step once a child has run for
`HEALTHY_AFTER_S`, so a process that is killed now and then is back within a second each time,
while one that cannot start waits longer and longer (up to 10 s) between tries. A backend given
by URL (`--backend-url`) is not ours to restart: it is probed, and an outage is logged when it
starts, every `OUTAGE_REMINDER_S` while it lasts, and when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console, Group
from rich.live import Live

from teamtrack.files import hold_supervisor_lock, write_json_atomically
from teamtrack.history import default_database_url
from teamtrack.local.cluster_metrics import start_supervisor_metrics, write_targets
from teamtrack.local.cluster_support import (
    PROCESSES_FILE,
    backend_answers,
    make_private,
    reload_brokers,
    without_password,
)
from teamtrack.local.cluster_view import endpoints_of, status_of
from teamtrack.local.kafka_server import (
    KafkaCluster,
    start_kafka,
    start_kafka_cluster,
)
from teamtrack.local.kafka_users import ROLES as KAFKA_ROLES
from teamtrack.local.kafka_users import load_or_create_users as load_kafka_users
from teamtrack.local.kafka_users import prepare_backend as prepare_kafka_backend
from teamtrack.local.kafka_users import sasl_config as kafka_sasl_config
from teamtrack.local.mosquitto_config import MqttsListener, render_broker_config
from teamtrack.local.ports import MAX_BRIDGES_PER_BROKER, PortPlan, bridge_role
from teamtrack.local.redis_users import load_or_create_users, write_acl_file
from teamtrack.local.servers import (
    LOOPBACK,
    PRIVATE_UMASK,
    ManagedProcess,
    ServerError,
    port_is_open,
    start_redis,
)
from teamtrack.metrics import MetricsServer, scrape_totals
from teamtrack.mqtt import bridge_username
from teamtrack.passwords import generate_secret
from teamtrack.provision import ProvisionResult, provision
from teamtrack.registry import bridge_usernames, demo_registry, dump_registry, load_registry
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)

# A child that has run this long is healthy again: its next restart starts the backoff afresh.
HEALTHY_AFTER_S = 5.0
# An external backend is probed at most this often, and an outage is logged again this often.
BACKEND_PROBE_INTERVAL_S = 2.0
OUTAGE_REMINDER_S = 30.0
BACKEND_ROLES = ("redis", "kafka")
BACKEND_RANK = 2


@dataclass(frozen=True)
class ClusterOptions:
    state_dir: Path
    brokers: int = 2
    dashboards: int = 2
    teams: int = 3
    workers: int = 50
    base_port: int = 18830
    backend_url: str | None = None
    # The server started when no backend_url is given: "redis" or "kafka".
    backend: str = "redis"
    # Nodes of the Kafka started for --backend kafka: 3 gives every topic 3 replicas.
    kafka_nodes: int = 1
    # Bridge processes per broker, in one shared subscription: each its own MQTT account and
    # client id (bridge-b{i}-{n}) and /metrics port. 1 keeps a plain subscription with No Local.
    bridges_per_broker: int = 1
    # What the bridges mirror of the other brokers' traffic: "all", "off", or "on-demand"
    # (positions only into a broker that has a subscriber besides its bridges).
    mirror: str = "on-demand"
    simulate: bool = True
    interval: float = 1.0
    qos: int = 0
    duration: float = 0.0
    # The bridges' per-device rate limit (messages a second; 0: none; None: the bridge's
    # default). Load and fault runs, whose workers send faster than people move, turn it off.
    device_rate_per_s: float | None = None
    # A local certificate authority and server certificate (state/tls/), an MQTT over TLS
    # listener on every broker, and the simulator publishing through it with the CA verified.
    tls: bool = True
    # Dashboards serve HTTPS with that certificate (off: plain HTTP, on loopback only).
    https: bool = False
    # Names and addresses besides localhost, 127.0.0.1 and ::1 the certificate must carry.
    tls_hosts: tuple[str, ...] = ()
    # Where the mqtts listeners listen: loopback by default; "0.0.0.0" (or "") for every
    # interface, so that devices on the network can connect. Plain listeners stay on loopback.
    mqtts_host: str = LOOPBACK
    # The device gateways' connection caps, in all and per address (None: the gateway's
    # defaults, 1,000 and 50); load runs hold every worker's stream from loopback.
    gateway_max_connections: int | None = None
    # The dashboards' map tiles (--tile-url, a {z}/{x}/{y} template; "" for none) and their
    # credit (--tile-attribution); None keeps the dashboard's defaults (OpenStreetMap).
    tile_url: str | None = None
    tile_attribution: str | None = None


@dataclass
class Child:
    """A supervised child: its role, how to start it again, and how often it was restarted."""

    role: str
    process: ManagedProcess
    ready_port: int | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=10.0))
    next_restart_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def stop_rank(self) -> int:
        """Stopped in reverse order of start, except the ingest after the other services (it
        stores what the bridges forwarded until they stopped) and the backend after it."""
        if self.role in BACKEND_ROLES or self.role.startswith("kafka-"):
            return BACKEND_RANK
        return 1 if self.role in ("ingest", "rules") else 0


class ClusterError(RuntimeError):
    """The cluster could not start; the message says what to change."""


def _python(module: str) -> list[str]:
    return [sys.executable, "-m", module]


class LocalCluster:
    def __init__(self, options: ClusterOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console()
        self.state_dir = options.state_dir.resolve()
        self.logs_dir = self.state_dir / "logs"
        self.ports = PortPlan.build(
            options.base_port, options.brokers, options.dashboards, options.kafka_nodes,
            max(options.bridges_per_broker, 1),
        )
        self.children: list[Child] = []
        # What runs now: the options' counts until `teamtrack scale` changes them.
        self.brokers = options.brokers
        self.dashboards = options.dashboards
        self.bridges_per_broker = max(options.bridges_per_broker, 1)
        # Bridges share their broker in a share group (several per broker, or once scaled).
        self.shared_subscriptions = options.bridges_per_broker > 1
        self.redis: ManagedProcess | None = None
        self.kafka: ManagedProcess | None = None
        # --kafka-nodes 2+: the nodes, listed and stopped with the backend
        self.kafka_cluster: KafkaCluster | None = None
        kafka_servers = ",".join(f"{LOOPBACK}:{port}" for port, _ in self.ports.kafka_nodes)
        started_url = (
            f"kafka://{kafka_servers}"
            if options.backend == "kafka"
            else f"redis://{LOOPBACK}:{self.ports.redis}/0"
        )
        self.backend_url = options.backend_url or started_url
        # Each role's URL, when the cluster starts a Redis with a user per role.
        self._role_urls: dict[str, str] = {}
        self._session_secret = generate_secret(32)
        # What the ingest writes and the dashboards read (their history API and replay).
        self.database_url = default_database_url(self.state_dir)
        self._stop_requested = threading.Event()
        self.provisioned: ProvisionResult | None = None
        # The external backend's state as last probed (None: not probed yet).
        self.backend_up: bool | None = None
        self._backend_probed_at = -math.inf
        self._backend_down_since = 0.0
        self._outage_logged_at = 0.0
        # Held while this supervisor runs (`teamtrack scale` and `endpoints` look for it).
        self._lock: IO[bytes] | None = None
        # The supervisor's own /metrics: its children's restarts (teamtrack.local.cluster_metrics).
        self._metrics: MetricsServer | None = None

    # Start -------------------------------------------------------------------------------
    def check_options(self) -> None:
        options = self.options
        if options.brokers < 1 or options.dashboards < 1:
            raise ClusterError("--brokers and --dashboards must be at least 1")
        if options.backend not in ("redis", "kafka"):
            raise ClusterError("--backend must be redis or kafka")
        if options.kafka_nodes < 1:
            raise ClusterError("--kafka-nodes must be at least 1")
        if options.bridges_per_broker < 1:
            raise ClusterError("--bridges-per-broker must be at least 1")
        if options.base_port and options.bridges_per_broker > MAX_BRIDGES_PER_BROKER:
            raise ClusterError(
                f"--bridges-per-broker must be at most {MAX_BRIDGES_PER_BROKER} with a fixed "
                "--base-port (their ports would collide); --base-port 0 takes free ports"
            )
        if options.https and not options.tls:
            raise ClusterError("--https needs the certificates of --tls")
        if options.backend_url is not None and not options.backend_url.startswith(
            ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://", "kafka://")
        ):
            raise ClusterError(
                "--backend-url must be a redis://, redis+sentinel://, redis+cluster:// or "
                "kafka:// URL: the cluster's processes share the backend (memory:// lives "
                "inside one process)"
            )
        planned = list(self.ports.all_ports())
        if options.backend_url is not None or options.backend != "redis":
            planned.remove(self.ports.redis)
        if options.backend_url is not None or options.backend != "kafka":
            for port, controller_port in self.ports.kafka_nodes:
                planned.remove(port)
                planned.remove(controller_port)
        busy = [port for port in planned if port_is_open(LOOPBACK, port)]
        if busy:
            raise ClusterError(
                f"port(s) {', '.join(map(str, busy))} already in use; "
                "stop what uses them or pick another --base-port (0 takes free ports)"
            )

    def start(self) -> None:
        """Start everything; the state folder and all in it are made the owner's alone (0700
        folders, 0600 files): it holds every team's track, the logs and the secrets."""
        self.check_options()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = hold_supervisor_lock(self.state_dir)
        if self._lock is None:
            raise ClusterError(
                f"another teamtrack up is running with the state folder {self.state_dir}"
            )
        # What an older run left with wider modes, then what this process writes meanwhile.
        make_private(self.state_dir)
        previous = os.umask(PRIVATE_UMASK)
        try:
            self._start()
        finally:
            os.umask(previous)
        make_private(self.state_dir)

    def _start(self) -> None:
        self._metrics = start_supervisor_metrics(self)
        # One account per bridge process: each holds its own session (client id).
        registry = demo_registry(
            self.options.teams, self.options.workers, brokers=self.options.brokers,
            bridges_per_broker=self.options.bridges_per_broker,
        )
        dump_registry(registry, self.state_dir / "registry.yaml")
        self.provisioned = provision(
            registry, self.state_dir, tls=self.options.tls, tls_hosts=self._tls_hosts()
        )
        if self.options.backend_url is None and self.options.backend == "kafka":
            self._start_kafka()
        elif self.options.backend_url is None:
            self.redis = self._start_redis()
            self.children.append(Child("redis", self.redis, self.ports.redis))
        for index in range(self.options.brokers):
            self.start_broker(index)
        for index in range(self.options.brokers):
            self.start_wsgate(index)
        for index, instance, port in self.active_bridges():
            self.start_bridge(index, instance, port)
        for index in range(self.options.dashboards):
            self.start_gateway(index)
        for index in range(self.options.dashboards):
            self.start_dashboard(index)
        self._start_ingest()
        self._start_rules()
        for child in self.children:
            if child.ready_port is not None:
                child.process.wait_for_port(LOOPBACK, child.ready_port, timeout=30)
        self.save_bridge_sessions(range(self.brokers))
        if self.options.simulate:
            self._start_simulator()
        self.write_endpoints()

    def grow_ports(self, brokers: int, dashboards: int, bridges_per_broker: int) -> None:
        """Room in the port plan for this many (`teamtrack scale`); planned ports stay."""
        self.ports = self.ports.grown(
            self.options.base_port, brokers, dashboards, bridges_per_broker
        )

    def provision_bridges(self, brokers: int, bridges_per_broker: int) -> None:
        """Accounts for exactly the bridges of `brokers` brokers with `bridges_per_broker`
        each (the registry's other entries and every secret stay); the running brokers read
        the password file and the ACL again (SIGHUP)."""
        path = self.state_dir / "registry.yaml"
        registry = load_registry(path).model_copy(
            update={"bridges": bridge_usernames(brokers, bridges_per_broker)}
        )
        dump_registry(registry, path)
        self.provisioned = provision(
            registry, self.state_dir, tls=self.options.tls, tls_hosts=self._tls_hosts()
        )
        for child in self.children:
            if child.role.startswith("broker-") and child.process.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGHUP)

    def _tls_hosts(self) -> tuple[str, ...]:
        """The configured names, and the mqtts listeners' own address when it is one."""
        host = self.options.mqtts_host
        bound = () if host in ("", "0.0.0.0", "::") else (host,)
        return (*self.options.tls_hosts, *bound)

    def mqtts_client_host(self) -> str:
        """The address local clients (the simulator) reach the mqtts listeners at."""
        host = self.options.mqtts_host
        return LOOPBACK if host in ("", "0.0.0.0", "::") else host

    def _start_redis(self) -> ManagedProcess:
        """A fresh Redis for this run, with an append-only file: restarted after a crash, it
        comes back with everything it had acknowledged. Its users are the roles of
        `teamtrack.local.redis_users`: each service gets its own, allowed what it does and no more;
        `backend_url` becomes the operators' (`tt-admin`)."""
        data_dir = self.state_dir / "redis"
        shutil.rmtree(data_dir, ignore_errors=True)
        users = load_or_create_users(self.state_dir)
        aclfile = write_acl_file(users, data_dir)
        port = self.ports.redis
        self.backend_url = users["admin"].url(LOOPBACK, port)
        self._role_urls = {role: user.url(LOOPBACK, port) for role, user in users.items()}
        return start_redis(port, data_dir, aclfile=aclfile)

    def save_bridge_sessions(self, brokers: Iterable[int], timeout: float = 30.0) -> None:
        """Once every bridge's subscription is granted, have every broker save its database.

        Mosquitto's persistence is a snapshot (every `autosave_interval`, and on SIGUSR1). A
        broker that crashed before its first snapshot came back without the bridge's session,
        and devices that reconnected before the bridge were answered `0x10` (no matching
        subscribers, a success code) for positions it then threw away. From this snapshot on,
        every snapshot holds the bridges' sessions, so a restarted broker queues the devices'
        positions for its bridges whoever reconnects first.
        """
        deadline = time.monotonic() + timeout
        indices = set(brokers)
        for index, _, port in self.active_bridges():
            if index in indices:
                self.wait_subscribed(port, deadline)
        roles = {f"broker-{index + 1}" for index in indices}
        for child in [child for child in self.children if child.role in roles]:
            database = self.state_dir / "brokers" / child.role / "mosquitto.db"
            saved_before = database.stat().st_mtime_ns if database.exists() else 0
            os.kill(child.process.pid, signal.SIGUSR1)
            while not database.exists() or database.stat().st_mtime_ns == saved_before:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{child.role} did not save {database} in {timeout:.0f}s")
                time.sleep(0.02)

    def wait_subscribed(self, metrics_port: int, deadline: float) -> None:
        """Until the bridge serving /metrics on `metrics_port` holds its subscription."""
        url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        while scrape_totals(url).get("teamtrack_bridge_subscribed", 0.0) < 1:
            if time.monotonic() > deadline:
                raise ClusterError(f"the bridge at {url} did not subscribe in time")
            time.sleep(0.05)

    def active_bridges(self) -> list[tuple[int, int, int]]:
        """(broker index, instance, /metrics port) of the bridges that run now."""
        return [
            (index, instance, port) for index, instance, port in self.ports.bridges()
            if index < self.brokers and instance <= self.bridges_per_broker
        ]

    def _start_kafka(self) -> None:
        """A fresh Kafka of `kafka_nodes` nodes: like the cluster's Redis, it keeps nothing from
        a last run. Its nodes are supervised children like any other. Clients authenticate
        (SASL/SCRAM-SHA-512) as the roles of `teamtrack.local.kafka_users`, each allowed by ACLs
        what it does and no more; `backend_url` becomes the operators' (`tt-admin`), who
        creates the topics and grants the ACLs before any service starts."""
        data_dir = self.state_dir / "kafka"
        shutil.rmtree(data_dir, ignore_errors=True)
        users = load_kafka_users(self.state_dir)
        sasl = kafka_sasl_config(users)
        if self.options.kafka_nodes == 1:
            self.kafka = start_kafka(
                self.ports.kafka, self.ports.kafka_controller, data_dir, sasl=sasl
            )
            self.children.append(Child("kafka", self.kafka, self.ports.kafka))
        else:
            self.kafka_cluster = start_kafka_cluster(
                self.options.kafka_nodes, data_dir, ports=self.ports.kafka_nodes, sasl=sasl
            )
            ports = [port for port, _controller in self.ports.kafka_nodes]
            for (name, process), port in zip(
                self.kafka_cluster.processes().items(), ports, strict=True
            ):
                self.children.append(Child(name, process, port))
        bootstrap = ",".join(f"{LOOPBACK}:{port}" for port, _ in self.ports.kafka_nodes)
        self.backend_url = users["admin"].url(bootstrap)
        self._role_urls = {role: users[role].url(bootstrap) for role in KAFKA_ROLES}
        # In a thread of its own: whoever starts the cluster may be inside an event loop.
        with ThreadPoolExecutor(1) as executor:
            executor.submit(asyncio.run, prepare_kafka_backend(self.backend_url)).result()

    def _add(
        self, role: str, argv: list[str], env: dict[str, str] | None, port: int | None
    ) -> Child:
        process = ManagedProcess(role, argv, self.logs_dir / f"{role}.log", env=env)
        process.start()
        child = Child(role, process, port)
        self.children.append(child)
        return child

    def retire(self, role: str) -> Child | None:
        """Take `role` off the supervised children (it is not restarted any more); the caller
        stops it."""
        for child in self.children:
            if child.role == role:
                self.children.remove(child)
                return child
        return None

    def start_broker(self, index: int, drain_port: int | None = None) -> Child:
        """Broker `index`; with `drain_port`, the same broker (its saved sessions) on that
        port alone, no TLS listener: no device knows it, its bridges empty their sessions."""
        assert self.provisioned is not None
        tls = self.provisioned.tls
        mqtts = None
        if tls is not None and drain_port is None:
            mqtts = MqttsListener(
                port=self.ports.broker_mqtts[index],
                certfile=tls.server_cert,
                keyfile=tls.server_key,
                cafile=tls.ca_cert,
                host=self.options.mqtts_host,
            )
        port = drain_port or self.ports.broker_mqtt[index]
        config = render_broker_config(
            mqtt_port=port,
            state_dir=self.state_dir / "brokers",
            password_file=self.provisioned.password_file,
            acl_file=self.provisioned.acl_file,
            broker_name=f"broker-{index + 1}",
            mqtts=mqtts,
        )
        return self._add(f"broker-{index + 1}", ["mosquitto", "-c", str(config)], None, port)

    def start_wsgate(self, index: int) -> None:
        """Broker i's MQTT over WebSockets (the brokers have no WebSockets listener), on
        loopback like everything else `teamtrack up` starts; it holds no secret."""
        argv = [
            *_python("wsgate"),
            "--broker-url", f"mqtt://{LOOPBACK}:{self.ports.broker_mqtt[index]}",
            "--host", LOOPBACK,
            "--port", str(self.ports.broker_ws[index]),
            "--metrics-port", str(self.ports.wsgate_metrics[index]),
        ]
        tls = self.provisioned.tls if self.provisioned is not None else None
        if self.options.https and tls is not None:
            # With --https, managers' browsers reach MQTT over WebSockets as wss:// too.
            argv += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
        port = self.ports.broker_ws[index]
        self._add(f"wsgate-{index + 1}", argv, self._service_env(None), port)

    def _service_env(self, role: str | None, **secrets: str) -> dict[str, str]:
        """A child's environment: without the caller's TEAMTRACK_* variables, with the backend
        URL of its `role` (its own Redis user when the cluster started Redis; none for None)
        and its secrets: never on a command line."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("TEAMTRACK_")}
        if role is not None:
            env["TEAMTRACK_BACKEND_URL"] = self._role_urls.get(role, self.backend_url)
        env.update(secrets)
        return env

    def start_bridge(
        self, index: int, instance: int, metrics_port: int, broker_port: int | None = None
    ) -> Child:
        """Bridge `instance` of broker `index`: `bridge-{i}` for the first (the name it had
        when a broker had one bridge), `bridge-{i}-{n}` for the others; `broker_port` when
        its broker is not where the plan puts it (draining, `teamtrack scale`)."""
        assert self.provisioned is not None
        bridge = self.provisioned.credentials.bridge(bridge_username(f"b{index + 1}", instance))
        broker_port = broker_port or self.ports.broker_mqtt[index]
        argv = [
            *_python("bridge"),
            "--broker-url", f"mqtt://{LOOPBACK}:{broker_port}",
            "--broker-id", f"b{index + 1}",
            "--instance", str(instance),
            "--mqtt-username", bridge.username,
            "--metrics-port", str(metrics_port),
            "--mirror", self.options.mirror,
            "--broker-bridges", str(self.bridges_per_broker),
        ]
        if not self.shared_subscriptions:
            # The broker's only bridge: no share group, and its mirrored messages (No Local)
            # never come back to it. Several split the broker in the share group and drop
            # their mirrored messages as echoes (bridge/service.py).
            argv.append("--no-shared-subscription")
        if self.options.device_rate_per_s is not None:
            argv += ["--device-rate-per-s", str(self.options.device_rate_per_s)]
        if self.provisioned.duty_file is not None:
            argv += ["--duty-file", str(self.provisioned.duty_file)]
        env = self._service_env("bridge", TEAMTRACK_MQTT_PASSWORD=bridge.password)
        return self._add(bridge_role(index, instance), argv, env, metrics_port)

    def _gateway_host(self) -> tuple[str, str]:
        """Where the device gateways listen, and the host in their URLs: with --https where
        the mqtts listeners do (devices' way in over the network), else loopback (plain HTTP
        would carry devices' passwords in the clear)."""
        if self.options.https and self.options.tls:
            host = self.mqtts_client_host()
            return self.options.mqtts_host, f"[{host}]" if ":" in host else host
        return LOOPBACK, LOOPBACK

    def start_gateway(self, index: int) -> None:
        """Device gateway j (OwnTracks over HTTP, NDJSON streams): it checks devices' logins
        against the brokers' password file and publishes with the bridges' backend user."""
        assert self.provisioned is not None
        argv = [
            *_python("gateway"),
            "--password-file", str(self.provisioned.password_file),
            "--gateway-id", f"g{index + 1}",
            "--host", self._gateway_host()[0],
            "--port", str(self.ports.gateways[index]),
            "--metrics-port", str(self.ports.gateway_metrics[index]),
        ]
        if self.provisioned.duty_file is not None:
            argv += ["--duty-file", str(self.provisioned.duty_file)]
        tls = self.provisioned.tls
        if self.options.https and tls is not None:
            argv += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
        if self.options.device_rate_per_s is not None:
            argv += ["--device-rate-per-s", str(self.options.device_rate_per_s)]
        if self.options.gateway_max_connections is not None:
            cap = str(self.options.gateway_max_connections)
            argv += ["--max-connections", cap, "--max-connections-per-address", cap]
        self._add(f"gateway-{index + 1}", argv, self._service_env("bridge"),
                  self.ports.gateway_metrics[index])

    def start_dashboard(self, index: int) -> None:
        assert self.provisioned is not None
        argv = [
            *_python("dashboard"),
            "--host", LOOPBACK,
            "--port", str(self.ports.dashboards[index]),
            "--auth-file", str(self.provisioned.dashboard_auth_path),
            "--instance-id", f"dashboard-{index + 1}",
            "--database-url", self.database_url,
        ]
        if self.options.tile_url is not None:
            argv += ["--tile-url", self.options.tile_url]
        if self.options.tile_attribution is not None:
            argv += ["--tile-attribution", self.options.tile_attribution]
        tls = self.provisioned.tls
        if self.options.https and tls is not None:
            argv += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
        env = self._service_env("dashboard", TEAMTRACK_SESSION_SECRET=self._session_secret)
        self._add(f"dashboard-{index + 1}", argv, env, self.ports.dashboards[index])

    def _start_ingest(self) -> None:
        """One ingest: positions and presence into the SQLite history in the state folder."""
        argv = [
            *_python("ingest"),
            "--database-url", self.database_url,
            "--registry", str(self.state_dir / "registry.yaml"),
            "--metrics-port", str(self.ports.ingest_metrics),
        ]
        self._add("ingest", argv, self._service_env("ingest"), None)

    def _start_rules(self) -> None:
        """The rules service: positions and presence into alerts, in the same database."""
        argv = [
            *_python("rules"),
            "--database-url", self.database_url,
            "--registry", str(self.state_dir / "registry.yaml"),
            "--metrics-port", str(self.ports.rules_metrics),
        ]
        self._add("rules", argv, self._service_env("rules"), None)

    def _start_simulator(self) -> None:
        assert self.provisioned is not None
        argv = [
            *_python("devices"),
            "--credentials", str(self.provisioned.credentials_path),
            "--teams", str(self.options.teams),
            "--workers", str(self.options.workers),
            "--interval", str(self.options.interval),
            "--qos", str(self.options.qos),
            "--no-progress",
        ]
        tls = self.provisioned.tls
        if tls is not None:
            # The devices' path over the network: MQTT over TLS, the broker's certificate
            # verified against the cluster's authority (and its host name against the SANs).
            host = self.mqtts_client_host()
            host = f"[{host}]" if ":" in host else host
            argv += ["--ca-file", str(tls.ca_cert)]
            for port in self.ports.broker_mqtts[: self.brokers]:
                argv += ["--broker-url", f"mqtts://{host}:{port}"]
        else:
            for port in self.ports.broker_mqtt[: self.brokers]:
                argv += ["--broker-url", f"mqtt://{LOOPBACK}:{port}"]
        if self.options.duration:
            argv += ["--duration", str(self.options.duration)]
        self._add("simulator", argv, self._service_env(None), None)

    def endpoints(self) -> dict[str, object]:
        """What `endpoints.json` lists (`teamtrack.local.cluster_view.endpoints_of`)."""
        return endpoints_of(self)

    def processes(self) -> dict[str, int]:
        """role -> pid of every child."""
        return {child.role: child.process.pid for child in self.children}

    def gateway_urls(self) -> list[str]:
        """The device gateways' base URLs (https with --https)."""
        tls = self.provisioned.tls if self.provisioned is not None else None
        scheme = "https" if self.options.https and tls is not None else "http"
        host = self._gateway_host()[1]
        return [f"{scheme}://{host}:{port}" for port in self.ports.gateways[: self.dashboards]]

    def write_endpoints(self) -> None:
        """`endpoints.json` and `processes.json` (role -> pid, for operators and the test
        that checks for orphans), each replaced in one step: a reader sees the old or the new;
        Prometheus' target files first (`teamtrack.local.cluster_metrics`)."""
        write_targets(self)
        write_json_atomically(self.state_dir / "endpoints.json", self.endpoints())
        write_json_atomically(self.state_dir / PROCESSES_FILE, self.processes())

    # Run ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop_requested.set()

    def supervise_once(self) -> None:
        """Restart children that died (the simulator only if it did not finish on its own)."""
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process.running():
                if now - child.started_at >= HEALTHY_AFTER_S:
                    child.backoff.reset()
                continue
            finished = process.process is not None and process.process.returncode == 0
            if child.role == "simulator" and finished:
                continue
            if child.next_restart_at == 0.0:
                delay = child.backoff.next_delay()
                child.next_restart_at = now + delay
                log.warning("%s exited (code %s); restarting in %.1fs (log: %s)",
                            child.role, _exit_code(process), delay, process.log_path)
            elif now >= child.next_restart_at:
                child.restarts += 1
                child.next_restart_at = 0.0
                child.started_at = now
                process.start()
                self.write_endpoints()
        if self.options.backend_url is not None:
            self._watch_backend(now)

    def _watch_backend(self, now: float) -> None:
        """Probe the external backend; log when an outage starts, while it lasts, and ends."""
        if now - self._backend_probed_at < BACKEND_PROBE_INTERVAL_S:
            return
        self._backend_probed_at = now
        up = backend_answers(self.backend_url)
        safe_url = without_password(self.backend_url)
        if up:
            if self.backend_up is False:
                log.warning("backend %s is back after %.0fs", safe_url,
                            now - self._backend_down_since)
        elif self.backend_up is not False:
            self._backend_down_since = self._outage_logged_at = now
            log.error("backend %s does not answer: positions wait in the bridges (QoS 1) or "
                      "are dropped and counted (QoS 0) until it is back", safe_url)
        elif now - self._outage_logged_at >= OUTAGE_REMINDER_S:
            self._outage_logged_at = now
            log.error("backend %s still does not answer (for %.0fs)", safe_url,
                      now - self._backend_down_since)
        self.backend_up = up

    def run_until_stopped(
        self, show_status: bool = True, tick: Callable[[], None] | None = None
    ) -> None:
        """Supervise until stopped; `tick` runs between rounds (`teamtrack scale` requests)."""
        previous = {
            signum: signal.signal(signum, lambda *_: self.request_stop())
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            if show_status:
                with Live(self.status(), console=self.console, refresh_per_second=1) as live:
                    while not self._stop_requested.wait(0.5):
                        self.supervise_once()
                        if tick is not None:
                            tick()
                        live.update(self.status())
            else:
                while not self._stop_requested.wait(0.5):
                    self.supervise_once()
                    if tick is not None:
                        tick()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self) -> list[tuple[str, int | None]]:
        """Stop everything in reverse order of start, except the ingest, which goes after
        the other services so that it stores what the bridges forwarded until they stopped,
        and the backend, which goes last (the nodes of a Kafka cluster all at once: a node
        stopping alone after the others would wait for a controller quorum that is gone);
        returns each child's exit code."""
        ordered = sorted(reversed(self.children), key=lambda child: child.stop_rank)
        results = [
            (child.role, child.process.stop())
            for child in ordered
            if self.kafka_cluster is None or child.stop_rank < BACKEND_RANK
        ]
        if self.kafka_cluster is not None:
            results += self.kafka_cluster.stop()
        if self._metrics is not None:
            self._metrics.stop()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        return results

    # Status ------------------------------------------------------------------------------
    def status(self) -> Group:
        return status_of(self)


def _exit_code(process: ManagedProcess) -> int | None:
    return process.process.returncode if process.process is not None else None


__all__ = [
    "ClusterError", "ClusterOptions", "LocalCluster", "PortPlan", "ServerError", "bridge_role",
    "reload_brokers",
]
