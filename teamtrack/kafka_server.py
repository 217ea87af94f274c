"""A local Apache Kafka broker: jars from Maven Central, one KRaft node (broker and controller).

No Kafka broker is packaged for Debian or PyPI, but Maven Central serves Apache Kafka's jars
with all their dependencies, and the broker runs on any Java 17+. `ensure_kafka_jars` resolves
`kafka/pom.xml` with Maven into a git-ignored folder once and reuses it afterwards;
`start_kafka` formats a data folder (`--standalone`: this one node is the whole controller
quorum, no ZooKeeper) and runs `kafka.Kafka` on loopback ports, the way `start_redis` runs
Redis. Used by the test fixtures and by `teamtrack up --backend kafka`.
"""

from __future__ import annotations

import base64
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
from pathlib import Path

from teamtrack.servers import LOOPBACK, ManagedProcess, ServerError

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
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        # Topics are created by the services, with explicit settings, never by a typo.
        "auto.create.topics.enable": "false",
        # One node: every internal topic has one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # The group offsets topic is created on the first group's first commit; 50 partitions
        # (the default) take seconds to create on a small machine, 4 are plenty for one node.
        "offsets.topic.num.partitions": "4",
        # A new group's first member starts at once instead of waiting 3 s for company.
        "group.initial.rebalance.delay.ms": "0",
        # Apply time retention within a minute rather than five.
        "log.retention.check.interval.ms": "60000",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _java_argv(libs_dir: Path, heap: str, main_class: str, *arguments: str) -> list[str]:
    return [
        java_command(),
        f"-Xmx{heap}",
        "-XX:+UseSerialGC",
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
        _format_storage(libs, properties, new_cluster_id())
    server = ManagedProcess(
        f"kafka:{port}",
        _java_argv(libs, heap, "kafka.Kafka", str(properties)),
        data_dir / "kafka.log",
        cwd=data_dir,
    ).start()
    try:
        server.wait_for_port(host, port, timeout=timeout)
        _wait_for_metadata(server, host, port, started + timeout)
    except BaseException:
        server.stop()
        raise
    log.info("kafka on %s:%d answered after %.1fs", host, port, time.monotonic() - started)
    return server


def _format_storage(libs_dir: Path, properties: Path, cluster_id: str) -> None:
    argv = _java_argv(
        libs_dir, "256m", "kafka.tools.StorageTool",
        "format", "--cluster-id", cluster_id, "--config", str(properties), "--standalone",
    )
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise ServerError(f"formatting Kafka storage failed (exit {result.returncode}):\n{output}")


def _wait_for_metadata(server: ManagedProcess, host: str, port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not server.running():
            raise ServerError(f"{server.name} exited early:\n{server.log_tail()}")
        if broker_answers_metadata(host, port) and broker_serves_groups(host, port):
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
    # No topics, and never create any.
    response = _request(host, port, METADATA_API_KEY, METADATA_VERSION,
                        struct.pack(">ib", 0, 0), timeout)
    if response is None or len(response) < 8:
        return False
    _throttle_ms, broker_count = struct.unpack_from(">ii", response)
    return bool(broker_count > 0)


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
