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
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from teamtrack.servers import LOOPBACK, ManagedProcess, ServerError, free_port

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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
    port: int, controller_port: int, log_dir: Path, host: str = LOOPBACK
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
) -> str:
    min_insync = str(_min_insync(replication))
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.bootstrap.servers": quorum,
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
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
    return "".join(f"{key}={value}\n" for key, value in settings.items())


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
) -> ManagedProcess:
    """A one-node Kafka on `host:port`, ready for requests when this returns.

    A `data_dir` formatted by an earlier call is started as it is, with its topics and
    offsets (that is how a test restarts a broker); an empty one is formatted first.
    """
    libs = libs_dir if libs_dir is not None else ensure_kafka_jars()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "log"
    properties = data_dir / "server.properties"
    properties.write_text(render_server_properties(port, controller_port, log_dir, host))
    started = time.monotonic()
    if not (log_dir / "meta.properties").exists():
        _format_storage(libs, properties, new_cluster_id(), ["--standalone"])
    server = _run_node(f"kafka:{port}", libs, heap, data_dir)
    try:
        server.wait_for_port(host, port, timeout=timeout)
        _wait_for_metadata(server, host, port, started + timeout)
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
    startup_s: float = field(default=0.0, init=False)

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
        while node.node_id not in live_brokers(self.host, node.port, 1.0):
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
            if broker_count(self.host, node.port, 1.0) >= len(self.nodes) and \
                    broker_serves_groups(self.host, node.port, 1.0):
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
) -> KafkaCluster:
    """`nodes` Kafka nodes (node ids 1..N), each a broker and a controller, ready when this
    returns: every node lists every broker as live and a group coordinator answers.

    `ports` gives each node's (port, controller port); free ones are taken otherwise. Topics
    get min(3, N) replicas by default, internal ones too, with `min.insync.replicas=2` from 3
    replicas up; unclean leader election stays off. Node i keeps its data in
    `data_dir/node-i`; a `data_dir` formatted by an earlier call starts as it is.
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
        (node.data_dir / "server.properties").write_text(_render_properties(
            node_id=node.node_id, port=node.port, controller_port=node.controller_port,
            log_dir=node.data_dir / "log", quorum=quorum, replication=replication, host=host,
        ))
    started = time.monotonic()
    formatted = [(node.data_dir / "log" / "meta.properties").exists() for node in members]
    if not any(formatted):
        _format_cluster(libs, members, host)
        log.info("formatted %d kafka nodes in %.1fs", nodes, time.monotonic() - started)
    elif not all(formatted):
        raise ServerError(
            f"{data_dir} holds a partly formatted Kafka cluster: remove it to start afresh"
        )
    cluster = KafkaCluster(members, host, libs, heap, timeout).start()
    cluster.startup_s = time.monotonic() - started
    log.info("kafka cluster of %d nodes on %s answered after %.1fs",
             nodes, cluster.bootstrap, cluster.startup_s)
    return cluster


def _format_cluster(libs_dir: Path, nodes: Sequence[KafkaNode], host: str) -> None:
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
    runs = [
        subprocess.Popen(
            _format_argv(libs_dir, node.data_dir / "server.properties", cluster_id, quorum),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        for node in nodes
    ]
    failures = []
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
        raise ServerError("formatting Kafka storage failed: " + "\n".join(failures))


def _format_argv(
    libs_dir: Path, properties: Path, cluster_id: str, quorum: Sequence[str]
) -> list[str]:
    return _java_argv(
        libs_dir, "256m", "kafka.tools.StorageTool",
        "format", "--cluster-id", cluster_id, "--config", str(properties), *quorum,
        quick_start=True,
    )


def _format_storage(
    libs_dir: Path, properties: Path, cluster_id: str, quorum: Sequence[str]
) -> None:
    argv = _format_argv(libs_dir, properties, cluster_id, quorum)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise ServerError(f"formatting Kafka storage failed (exit {result.returncode}):\n{output}")


def _wait_for_metadata(
    server: ManagedProcess, host: str, port: int, deadline: float, brokers: int = 1
) -> None:
    while time.monotonic() < deadline:
        if not server.running():
            raise ServerError(f"{server.name} exited early:\n{server.log_tail()}")
        if broker_count(host, port) >= brokers and broker_serves_groups(host, port):
            return
        time.sleep(0.1)
    raise ServerError(f"{server.name} opened its port but never answered:\n{server.log_tail()}")


METADATA_API_KEY = 3
METADATA_VERSION = 4  # the oldest version Kafka 4 still serves
FIND_COORDINATOR_API_KEY = 10
FIND_COORDINATOR_VERSION = 1
PROBE_GROUP = b"teamtrack-probe"


def _request(host: str, port: int, api_key: int, version: int, body: bytes,
             timeout: float) -> bytes | None:
    """One request on a fresh connection; the response after its correlation id, or None."""
    client_id = b"teamtrack-probe"
    correlation_id = 1
    request = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    request += body
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            connection.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _receive_exactly(connection, 4))
            response = _receive_exactly(connection, size)
    except (OSError, struct.error):
        return None
    if len(response) < 4 or struct.unpack_from(">i", response)[0] != correlation_id:
        return None
    return response[4:]


def broker_answers_metadata(host: str, port: int, timeout: float = 2.0) -> bool:
    """True once the broker serves a Metadata request that lists at least one live broker.

    Spoken on the wire rather than through a client library, so that plain synchronous code
    (the launcher, `teamtrack up`) can wait for readiness without an event loop.
    """
    return broker_count(host, port, timeout) > 0


def broker_count(host: str, port: int, timeout: float = 2.0) -> int:
    """How many live (registered, unfenced) brokers the broker at host:port knows; 0 when it
    does not answer."""
    return len(live_brokers(host, port, timeout))


def live_brokers(host: str, port: int, timeout: float = 2.0) -> set[int]:
    """The node ids of the live brokers that the broker at host:port lists; empty when it
    does not answer."""
    # No topics, and never create any.
    response = _request(host, port, METADATA_API_KEY, METADATA_VERSION,
                        struct.pack(">ib", 0, 0), timeout)
    if response is None or len(response) < 8:
        return set()
    # Metadata v4: throttle_time_ms, then [node_id, host, port, rack] per broker.
    try:
        (count,) = struct.unpack_from(">i", response, 4)
        at = 8
        ids = set()
        for _ in range(count):
            node_id, host_length = struct.unpack_from(">ih", response, at)
            at += 6 + host_length + 4
            (rack_length,) = struct.unpack_from(">h", response, at)
            at += 2 + max(0, rack_length)
            ids.add(node_id)
    except struct.error:
        return set()
    return ids


def broker_serves_groups(host: str, port: int, timeout: float = 2.0) -> bool:
    """True once a group coordinator answers. The first such request makes the broker create
    its group offsets topic, which takes a moment: better here than in a service's first join.
    """
    body = struct.pack(">h", len(PROBE_GROUP)) + PROBE_GROUP + struct.pack(">b", 0)
    response = _request(host, port, FIND_COORDINATOR_API_KEY, FIND_COORDINATOR_VERSION,
                        body, timeout)
    if response is None or len(response) < 6:
        return False
    _throttle_ms, error_code = struct.unpack_from(">ih", response)
    return bool(error_code == 0)


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = connection.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        chunks += chunk
    return bytes(chunks)


def main() -> int:
    """`python -m teamtrack.kafka_server`: fetch the broker's jars unless they are there."""
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
