"""A local Apache Kafka: jars from Maven Central, one KRaft node or a cluster of N.

No Kafka broker is packaged for Debian or PyPI, but Maven Central serves Apache Kafka's jars
with all their dependencies, and the broker runs on any Java 17+. `ensure_kafka_jars` resolves
`kafka/pom.xml` with Maven into a git-ignored folder once and reuses it afterwards;
`start_kafka` formats a data folder (`--standalone`: this one node is the whole controller
quorum, no ZooKeeper) and runs `kafka.Kafka` on loopback ports, the way `start_redis` runs
Redis. `start_kafka_cluster` runs N such nodes, each a broker and a voter of one controller
quorum (`--initial-controllers`), with 3 replicas of every topic and `min.insync.replicas=2`;
a test can SIGKILL a node and restart it from its data folder. Used by the test fixtures and
by `teamtrack up --backend kafka [--kafka-nodes 3]`.

With `sasl=KafkaSasl(...)` (what `teamtrack up` passes, `teamtrack.local.kafka_users`) a node serves
clients only after SASL/SCRAM-SHA-512, and `StandardAuthorizer` refuses what no ACL allows:
the client listener is SASL_PLAINTEXT (brokers replicate over it as the internal user), the
controller listener SASL_PLAINTEXT with PLAIN (SCRAM credentials live in the metadata log the
controllers serve, so they cannot authenticate the controllers themselves). The SCRAM users are
written into the metadata log when the storage is formatted (`--add-scram`), through a Java
argument file (0600, removed after): no password is ever on a command line. The readiness
probes authenticate as the internal user.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from teamtrack.local.kafka_probe import (
    SCRAM_MECHANISM,
    SaslUser,
    broker_count,
    broker_serves_groups,
    jaas_value,
    live_brokers,
)
from teamtrack.local.servers import LOOPBACK, ManagedProcess, ServerError, free_port

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KAFKA_DIR = PROJECT_ROOT / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG_CONFIG = KAFKA_DIR / "log4j2.properties"
DEFAULT_LIBS_DIR = PROJECT_ROOT / "var" / "kafka-libs"
# Written last, holding the pom's digest: a folder without it (an interrupted fetch) or with
# another digest (the pom changed) is fetched again.
COMPLETE_MARKER = ".complete"
DEFAULT_HEAP = "512m"
START_TIMEOUT = 90.0
FETCH_TIMEOUT = 900.0
# The heap of each node of a cluster: three JVMs share a small machine.
CLUSTER_NODE_HEAP = "384m"
# How soon the controller quorum declares a node that stopped heartbeating dead (Kafka's
# defaults: a heartbeat every 2 s, fenced after 9 s). Until then the partitions that a killed
# node led have no working leader, and acks=all writes to partitions it followed wait for it:
# this is most of the pause a node crash costs (docs/kafka.md has the measured figures).
CLUSTER_FAILOVER = {
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "3000",
}


STANDARD_AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"


@dataclass(frozen=True)
class KafkaSasl:
    """Who may talk to the nodes: `internal` (the nodes to each other: replication over SCRAM,
    the controller quorum over PLAIN; a super user), the SCRAM users created at format, and
    which of them are super users besides `internal` (every other user gets only its ACLs)."""

    internal: SaslUser
    users: tuple[SaslUser, ...] = ()
    super_users: tuple[str, ...] = ()

    def secrets(self) -> list[str]:
        return [self.internal.password, *(user.password for user in self.users)]


class KafkaSetupError(ServerError):
    """The broker's jars are missing and cannot be fetched; the message says what to install."""


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def kafka_jars_present(libs_dir: Path = DEFAULT_LIBS_DIR) -> bool:
    marker = libs_dir / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == _pom_digest()


def java_command() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise KafkaSetupError(
            "the Kafka broker needs Java 17 or newer and `java` is not on PATH "
            "(Debian: apt-get install openjdk-17-jre-headless)"
        )
    return found


def ensure_kafka_jars(libs_dir: Path = DEFAULT_LIBS_DIR) -> Path:
    """The folder of the broker's jars, fetched with Maven unless a complete copy is there."""
    if kafka_jars_present(libs_dir):
        return libs_dir
    if not POM.is_file():
        raise KafkaSetupError(f"{POM} is missing: run from a checkout of the project")
    java_command()
    maven = shutil.which("mvn")
    if maven is None:
        raise KafkaSetupError(
            "the Kafka broker's jars are fetched from Maven Central with Maven, and `mvn` is not "
            "on PATH (Debian: apt-get install maven)"
        )
    libs_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = libs_dir.with_name(libs_dir.name + ".lock")
    with lock_path.open("w") as lock:
        # `make` and a test session may both fetch; the second one waits and then reuses.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kafka_jars_present(libs_dir):
            return libs_dir
        partial = libs_dir.with_name(libs_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        started = time.monotonic()
        log.info("fetching the Kafka broker's jars from Maven Central into %s", libs_dir)
        argv = [
            maven, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
        ]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=FETCH_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise KafkaSetupError(f"mvn did not finish in {FETCH_TIMEOUT:.0f}s") from error
        if result.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
            output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise KafkaSetupError(
                f"fetching the Kafka jars failed (mvn exit {result.returncode}):\n{output}"
            )
        (partial / COMPLETE_MARKER).write_text(_pom_digest() + "\n")
        shutil.rmtree(libs_dir, ignore_errors=True)
        partial.rename(libs_dir)
        log.info("fetched the Kafka jars in %.1fs", time.monotonic() - started)
    return libs_dir


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, as Kafka's Uuid."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        # Kafka never hands out ids starting with '-': the command line would take them for flags.
        if not text.startswith("-"):
            return text


def render_server_properties(
    port: int,
    controller_port: int,
    log_dir: Path,
    host: str = LOOPBACK,
    sasl: KafkaSasl | None = None,
) -> str:
    """A one-node Kafka: node 1, its own whole controller quorum, one replica of everything."""
    return _render_properties(
        node_id=1,
        port=port,
        controller_port=controller_port,
        log_dir=log_dir,
        quorum=f"{host}:{controller_port}",
        replication=1,
        host=host,
        sasl=sasl,
    )


def _min_insync(replication: int) -> int:
    # With 3+ replicas a write survives one broker loss; with fewer, requiring 2 in sync
    # would stop all writes whenever one broker is down.
    return 2 if replication >= 3 else 1


def _render_properties(
    *,
    node_id: int,
    port: int,
    controller_port: int,
    log_dir: Path,
    quorum: str,
    replication: int,
    host: str,
    sasl: KafkaSasl | None = None,
) -> str:
    min_insync = str(_min_insync(replication))
    client = "PLAINTEXT" if sasl is None else "CLIENT"
    protocol = "PLAINTEXT" if sasl is None else "SASL_PLAINTEXT"
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.bootstrap.servers": quorum,
        "listeners": f"{client}://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"{client}://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": client,
        "listener.security.protocol.map": f"{client}:{protocol},CONTROLLER:{protocol}",
        "log.dirs": str(log_dir),
        # Topics are created by the services, with explicit settings, never by a typo.
        "auto.create.topics.enable": "false",
        # Topics created without settings (and the internal ones) get every node's copy, up
        # to 3; with 3 replicas a write is acknowledged once 2 of them have it (acks=all).
        "default.replication.factor": str(replication),
        "min.insync.replicas": min_insync,
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": min_insync,
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": min_insync,
        # A replica that was not in sync never becomes leader: it could lack acknowledged
        # records (Kafka's default, stated because the promise depends on it).
        "unclean.leader.election.enable": "false",
        # The group offsets topic is created on the first group's first commit; 50 partitions
        # (the default) take seconds to create on a small machine, 4 are plenty here.
        "offsets.topic.num.partitions": "4",
        # A new group's first member starts at once instead of waiting 3 s for company.
        "group.initial.rebalance.delay.ms": "0",
        # Apply time retention within a minute rather than five.
        "log.retention.check.interval.ms": "60000",
    }
    if replication > 1:
        settings.update(CLUSTER_FAILOVER)
    if sasl is not None:
        settings.update(_sasl_settings(sasl))
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _sasl_settings(sasl: KafkaSasl) -> dict[str, str]:
    """Clients: SCRAM-SHA-512 on the client listener, which the nodes also replicate over (as
    `internal`). Controllers: PLAIN with `internal` as their only user (SCRAM credentials are
    in the metadata log, which the controllers serve). StandardAuthorizer: ACLs in the metadata
    log, nothing allowed without one, super users as listed."""
    internal = sasl.internal
    name, password = jaas_value(internal.name), jaas_value(internal.password)
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
    supers = dict.fromkeys([internal.name, *sasl.super_users])
    return {
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
        "listener.name.client.sasl.enabled.mechanisms": SCRAM_MECHANISM,
        f"listener.name.client.{SCRAM_MECHANISM.lower()}.sasl.jaas.config":
            f"{scram} required username={name} password={password};",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config":
            f"{plain} required username={name} password={password}"
            f" user_{internal.name}={password};",
        "authorizer.class.name": STANDARD_AUTHORIZER,
        "allow.everyone.if.no.acl.found": "false",
        "super.users": ";".join(f"User:{user}" for user in supers),
    }


def _write_private(path: Path, text: str) -> None:
    """`text` into `path`, readable by its owner only (it may hold the nodes' password)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)


def _java_argv(
    libs_dir: Path, heap: str, main_class: str, *arguments: str, quick_start: bool = False
) -> list[str]:
    return [
        java_command(),
        f"-Xmx{heap}",
        "-XX:+UseSerialGC",
        # Only the quick JIT compiler: no second round of compilation competing for the CPU
        # while several JVMs start on a small machine (a 3-node cluster starts in about half
        # the time; steady-state code is somewhat slower, which a local cluster can afford).
        *(["-XX:TieredStopAtLevel=1"] if quick_start else []),
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG_CONFIG}",
        "-cp", f"{libs_dir}/*",
        main_class,
        *arguments,
    ]


def start_kafka(
    port: int,
    controller_port: int,
    data_dir: Path,
    *,
    host: str = LOOPBACK,
    libs_dir: Path | None = None,
    heap: str = DEFAULT_HEAP,
    timeout: float = START_TIMEOUT,
    sasl: KafkaSasl | None = None,
) -> ManagedProcess:
    """A one-node Kafka on `host:port`, ready for requests when this returns.

    A `data_dir` formatted by an earlier call is started as it is, with its topics and
    offsets (that is how a test restarts a broker); an empty one is formatted first, with the
    SCRAM users of `sasl` (module doc).
    """
    libs = libs_dir if libs_dir is not None else ensure_kafka_jars()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "log"
    properties = data_dir / "server.properties"
    _write_private(
        properties, render_server_properties(port, controller_port, log_dir, host, sasl)
    )
    started = time.monotonic()
    if not (log_dir / "meta.properties").exists():
        _format_storage(libs, properties, new_cluster_id(), ["--standalone"], sasl)
    server = _run_node(f"kafka:{port}", libs, heap, data_dir)
    probe = sasl.internal if sasl is not None else None
    try:
        server.wait_for_port(host, port, timeout=timeout)
        _wait_for_metadata(server, host, port, started + timeout, user=probe)
    except BaseException:
        server.stop()
        raise
    log.info("kafka on %s:%d answered after %.1fs", host, port, time.monotonic() - started)
    return server


def _run_node(
    name: str, libs_dir: Path, heap: str, data_dir: Path, *, quick_start: bool = False
) -> ManagedProcess:
    argv = _java_argv(
        libs_dir, heap, "kafka.Kafka", str(data_dir / "server.properties"),
        quick_start=quick_start,
    )
    return ManagedProcess(
        name,
        argv,
        data_dir / "kafka.log",
        cwd=data_dir,
    ).start()


@dataclass
class KafkaNode:
    """One node of a local Kafka cluster: a broker and a controller in one JVM."""

    node_id: int
    port: int
    controller_port: int
    data_dir: Path
    process: ManagedProcess | None = None

    @property
    def name(self) -> str:
        return f"kafka-{self.node_id}"

    def running(self) -> bool:
        return self.process is not None and self.process.running()


@dataclass
class KafkaCluster:
    """N Kafka nodes on loopback, each a broker and a voter of the controller quorum.

    Node ids are 1..N, the same ids the brokers report in metadata (a partition's leader),
    so a test can find a partition's leader and `kill` it. A killed node is started again
    from its data folder by `restart`.
    """

    nodes: list[KafkaNode]
    host: str
    libs_dir: Path
    heap: str
    timeout: float = START_TIMEOUT
    sasl: KafkaSasl | None = None
    startup_s: float = field(default=0.0, init=False)

    @property
    def probe_user(self) -> SaslUser | None:
        """Whom the readiness probes authenticate as (None: the nodes take anybody)."""
        return self.sasl.internal if self.sasl is not None else None

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{self.host}:{node.port}" for node in self.nodes)

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    @property
    def replication(self) -> int:
        return min(3, len(self.nodes))

    def node(self, node_id: int) -> KafkaNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no kafka node {node_id} (nodes are 1..{len(self.nodes)})")

    def processes(self) -> dict[str, ManagedProcess]:
        """The running nodes by name (`kafka-1`...), for a supervisor's process list."""
        return {
            node.name: node.process for node in self.nodes if node.process is not None
        }

    def kill(self, node_id: int) -> None:
        """SIGKILL, as a crash: no controlled shutdown, nothing flushed."""
        node = self.node(node_id)
        if node.process is None or node.process.process is None:
            return
        if node.process.running():
            node.process.process.kill()
        node.process.process.wait(10)

    def restart(self, node_id: int) -> float:
        """Start a stopped or killed node again from its data folder; the seconds until it
        lists itself as a live broker (registered with the controller quorum, unfenced)."""
        node = self.node(node_id)
        if node.running():
            raise ServerError(f"{node.name} is running; kill or stop it first")
        started = time.monotonic()
        node.process = _run_node(
            node.name, self.libs_dir, self.heap, node.data_dir, quick_start=True
        )
        deadline = started + self.timeout
        while node.node_id not in live_brokers(self.host, node.port, 1.0, self.probe_user):
            if not node.process.running():
                raise ServerError(f"{node.name} exited early:\n{node.process.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{node.name} was not a live broker after {self.timeout:.0f}s:\n"
                    f"{node.process.log_tail()}"
                )
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self, timeout: float = 15.0) -> list[tuple[str, int | None]]:
        """Stop every node (SIGTERM to all at once: a node stopping alone after the others
        would wait for a controller quorum that is gone); each node's exit code."""
        for node in self.nodes:
            if node.running():
                assert node.process is not None and node.process.process is not None
                with contextlib.suppress(ProcessLookupError):
                    node.process.process.terminate()
        return [
            (node.name, node.process.stop(timeout) if node.process is not None else None)
            for node in self.nodes
        ]

    def start(self) -> KafkaCluster:
        started = time.monotonic()
        for node in self.nodes:
            node.process = _run_node(
                node.name, self.libs_dir, self.heap, node.data_dir, quick_start=True
            )
        try:
            self._wait_ready(self.nodes, started + self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, waiting: list[KafkaNode], deadline: float) -> None:
        """Until each of `waiting` lists all N brokers as live and a group coordinator answers.

        Every node must be running meanwhile: a node that exits makes this fail at once,
        with its log, rather than at the deadline.
        """
        pending = list(waiting)
        while pending:
            for node in waiting:
                if node.process is not None and not node.running():
                    raise ServerError(f"{node.name} exited early:\n{node.process.log_tail()}")
            node = pending[0]
            user = self.probe_user
            if broker_count(self.host, node.port, 1.0, user) >= len(self.nodes) and \
                    broker_serves_groups(self.host, node.port, 1.0, user):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                assert node.process is not None
                raise ServerError(
                    f"{node.name} did not see {len(self.nodes)} live brokers in time:\n"
                    f"{node.process.log_tail()}"
                )
            time.sleep(0.1)


def start_kafka_cluster(
    nodes: int,
    data_dir: Path,
    *,
    ports: Sequence[tuple[int, int]] | None = None,
    host: str = LOOPBACK,
    libs_dir: Path | None = None,
    heap: str = CLUSTER_NODE_HEAP,
    timeout: float = START_TIMEOUT,
    sasl: KafkaSasl | None = None,
) -> KafkaCluster:
    """`nodes` Kafka nodes (node ids 1..N), each a broker and a controller, ready when this
    returns: every node lists every broker as live and a group coordinator answers.

    `ports` gives each node's (port, controller port); free ones are taken otherwise. Topics
    get min(3, N) replicas by default, internal ones too, with `min.insync.replicas=2` from 3
    replicas up; unclean leader election stays off. Node i keeps its data in
    `data_dir/node-i`; a `data_dir` formatted by an earlier call starts as it is. With
    `sasl`, every node as the module doc says.
    """
    if nodes < 1:
        raise ValueError("a Kafka cluster has at least one node")
    if ports is None:
        ports = [(free_port(), free_port()) for _ in range(nodes)]
    if len(ports) != nodes:
        raise ValueError(f"{nodes} Kafka nodes need {nodes} (port, controller port) pairs")
    libs = libs_dir if libs_dir is not None else ensure_kafka_jars()
    members = [
        KafkaNode(index + 1, port, controller_port, data_dir / f"node-{index + 1}")
        for index, (port, controller_port) in enumerate(ports)
    ]
    quorum = ",".join(f"{host}:{node.controller_port}" for node in members)
    replication = min(3, nodes)
    for node in members:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        _write_private(node.data_dir / "server.properties", _render_properties(
            node_id=node.node_id, port=node.port, controller_port=node.controller_port,
            log_dir=node.data_dir / "log", quorum=quorum, replication=replication, host=host,
            sasl=sasl,
        ))
    started = time.monotonic()
    formatted = [(node.data_dir / "log" / "meta.properties").exists() for node in members]
    if not any(formatted):
        _format_cluster(libs, members, host, sasl)
        log.info("formatted %d kafka nodes in %.1fs", nodes, time.monotonic() - started)
    elif not all(formatted):
        raise ServerError(
            f"{data_dir} holds a partly formatted Kafka cluster: remove it to start afresh"
        )
    cluster = KafkaCluster(members, host, libs, heap, timeout, sasl).start()
    cluster.startup_s = time.monotonic() - started
    log.info("kafka cluster of %d nodes on %s answered after %.1fs",
             nodes, cluster.bootstrap, cluster.startup_s)
    return cluster


def _format_cluster(
    libs_dir: Path, nodes: Sequence[KafkaNode], host: str, sasl: KafkaSasl | None = None
) -> None:
    """Format every node's storage with one cluster id and the whole quorum as its initial
    voters (`--initial-controllers id@host:port:directory-id,...`, the same on every node:
    KIP-853's dynamic quorum), one JVM per node, all at once."""
    cluster_id = new_cluster_id()
    if len(nodes) == 1:
        quorum = ["--standalone"]
    else:
        voters = ",".join(
            f"{node.node_id}@{host}:{node.controller_port}:{new_cluster_id()}" for node in nodes
        )
        quorum = ["--initial-controllers", voters]
    failures = []
    with contextlib.ExitStack() as argument_files:
        runs = [
            subprocess.Popen(
                argument_files.enter_context(_format_command(
                    libs_dir, node.data_dir / "server.properties", cluster_id, quorum, sasl
                )),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            for node in nodes
        ]
        for node, run in zip(nodes, runs, strict=True):
            try:
                output, _ = run.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                run.kill()
                output, _ = run.communicate()
            if run.returncode != 0:
                tail = "\n".join(output.decode(errors="replace").splitlines()[-30:])
                failures.append(f"{node.name} (exit {run.returncode}):\n{tail}")
    if failures:
        raise ServerError(
            "formatting Kafka storage failed: " + _redacted("\n".join(failures), sasl)
        )


def _format_argv(
    libs_dir: Path,
    properties: Path,
    cluster_id: str,
    quorum: Sequence[str],
    sasl: KafkaSasl | None = None,
) -> list[str]:
    scram: list[str] = []
    if sasl is not None:
        for user in (sasl.internal, *sasl.users):
            name, password = jaas_value(user.name), jaas_value(user.password)
            scram += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name[1:-1]},"
                                     f"password={password[1:-1]}]"]
    return _java_argv(
        libs_dir, "256m", "kafka.tools.StorageTool",
        "format", "--cluster-id", cluster_id, "--config", str(properties), *quorum, *scram,
        quick_start=True,
    )


@contextlib.contextmanager
def _format_command(
    libs_dir: Path,
    properties: Path,
    cluster_id: str,
    quorum: Sequence[str],
    sasl: KafkaSasl | None,
) -> Iterator[list[str]]:
    """The StorageTool's command line. With SCRAM users, `java @file`: the Java launcher reads
    the rest of the command (and the passwords in it) from the file, 0600 and removed once the
    tool is done, so `/proc/<pid>/cmdline` shows only the file's name."""
    argv = _format_argv(libs_dir, properties, cluster_id, quorum, sasl)
    if sasl is None:
        yield argv
        return
    path = properties.with_name("format.args")
    _write_private(path, "".join(_argument_file_line(argument) for argument in argv[1:]))
    try:
        yield [argv[0], f"@{path}"]
    finally:
        path.unlink(missing_ok=True)


def _argument_file_line(argument: str) -> str:
    """One argument of a Java `@argfile`, quoted when it holds white space or a '#'."""
    if any(character in argument for character in '"\'\\'):
        raise ValueError(f"cannot pass {argument!r} through a Java argument file")
    if argument and not any(character.isspace() or character == "#" for character in argument):
        return argument + "\n"
    return f'"{argument}"\n'


def _redacted(text: str, sasl: KafkaSasl | None) -> str:
    for secret in sasl.secrets() if sasl is not None else ():
        text = text.replace(secret, "***")
    return text


def _format_storage(
    libs_dir: Path,
    properties: Path,
    cluster_id: str,
    quorum: Sequence[str],
    sasl: KafkaSasl | None = None,
) -> None:
    with _format_command(libs_dir, properties, cluster_id, quorum, sasl) as argv:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise ServerError(f"formatting Kafka storage failed (exit {result.returncode}):\n"
                          f"{_redacted(output, sasl)}")


def _wait_for_metadata(
    server: ManagedProcess,
    host: str,
    port: int,
    deadline: float,
    brokers: int = 1,
    user: SaslUser | None = None,
) -> None:
    while time.monotonic() < deadline:
        if not server.running():
            raise ServerError(f"{server.name} exited early:\n{server.log_tail()}")
        if broker_count(host, port, user=user) >= brokers and \
                broker_serves_groups(host, port, user=user):
            return
        time.sleep(0.1)
    raise ServerError(f"{server.name} opened its port but never answered:\n{server.log_tail()}")


def main() -> int:
    """`python -m teamtrack.local.kafka_server`: fetch the broker's jars unless they are there."""
    logging.basicConfig(level=logging.INFO, format="kafka-jars: %(message)s")
    present = kafka_jars_present()
    try:
        libs_dir = ensure_kafka_jars()
    except KafkaSetupError as error:
        log.error("%s", error)
        return 2
    if present:
        log.info("present in %s, nothing to fetch", libs_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
