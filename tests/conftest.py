"""Real servers for the tests, started on free loopback ports and stopped at the end."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from teamtrack.local.history_postgres import PostgresServer, start_postgres
from teamtrack.local.mosquitto_config import render_broker_config
from teamtrack.local.servers import (
    LOOPBACK,
    ManagedProcess,
    ServerError,
    free_port,
    start_mosquitto,
    start_redis,
)
from teamtrack.provision import Credentials, DeviceCredential, ProvisionResult, provision
from teamtrack.registry import demo_registry


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://{LOOPBACK}:{port}/0"
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The shared test Redis, with a key prefix of this test's own."""
    return f"{redis_server_url}?prefix=test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL: initdb into a temporary folder, a free port; started on first use."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
async def history_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty history database of this test's own, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return await server.create_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """A folder under test-output/ for what a test leaves for people to look at."""
    root = Path(__file__).resolve().parents[1] / "test-output"
    folder = root / request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Broker:
    name: str
    mqtt_port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.mqtt_port}"


@dataclass
class Cluster:
    """Provisioned identities (alpha and bravo, 3 workers each) and real brokers using them."""

    state_dir: Path
    provisioned: ProvisionResult
    brokers: list[Broker]

    @property
    def credentials(self) -> Credentials:
        return self.provisioned.credentials

    def device(self, team: str, worker: str) -> DeviceCredential:
        return self.credentials.device(team, worker)


@pytest.fixture(scope="session")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> ProvisionResult:
    # Two bridge accounts per broker: tests run two bridges on one broker (a shared subscription).
    return provision(
        demo_registry(teams=2, workers=3, bridges_per_broker=2),
        tmp_path_factory.mktemp("identities"),
    )


def start_broker(state_dir: Path, provisioned: ProvisionResult, name: str, broker_id: str,
                 attempts: int = 3) -> Broker:
    """A broker on a free port, taken again if another process took it meanwhile."""
    for attempt in range(attempts):
        mqtt_port = free_port()
        config = render_broker_config(
            mqtt_port=mqtt_port,
            state_dir=state_dir,
            password_file=provisioned.password_file,
            acl_file=provisioned.acl_file,
            broker_name=name,
        )
        try:
            process = start_mosquitto(config, mqtt_port)
        except ServerError:
            if attempt == attempts - 1:
                raise
            continue
        return Broker(broker_id, mqtt_port, process)
    raise AssertionError("unreachable")


@dataclass
class WsGateway:
    """A real `python -m wsgate` (MQTT over WebSockets) in front of one broker."""

    port: int
    metrics_port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/mqtt"

    def metrics(self) -> dict[str, float]:
        from teamtrack.metrics import scrape_totals

        return scrape_totals(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=2.0)

    def refused(self, reason: str) -> int:
        """The gateway's `teamtrack_wsgate_refused_total{reason=...}`."""
        from urllib.request import urlopen

        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        with urlopen(url, timeout=2.0) as response:
            text = response.read().decode()
        line = f'teamtrack_wsgate_refused_total{{reason="{reason}"}} '
        for row in text.splitlines():
            if row.startswith(line):
                return int(float(row[len(line):]))
        raise AssertionError(f"no {line!r} on the gateway's /metrics")


def start_ws_gateway(mqtt_port: int, log_dir: Path, *flags: str, attempts: int = 3) -> WsGateway:
    """`python -m wsgate` on free loopback ports, piping to the broker at `mqtt_port`."""
    for attempt in range(attempts):
        port, metrics_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "wsgate",
            "--broker-url", f"mqtt://{LOOPBACK}:{mqtt_port}",
            "--port", str(port), "--metrics-port", str(metrics_port), *flags,
        ]
        process = ManagedProcess(f"wsgate:{port}", argv, log_dir / f"wsgate-{port}.log").start()
        try:
            process.wait_for_port(LOOPBACK, port)
            process.wait_for_port(LOOPBACK, metrics_port)
        except ServerError:
            process.stop()
            if attempt == attempts - 1:
                raise
            continue
        return WsGateway(port, metrics_port, process)
    raise AssertionError("unreachable")


@pytest.fixture
def cluster(tmp_path: Path, provisioned: ProvisionResult) -> Iterator[Cluster]:
    """Two fresh brokers: no session state from another test can route messages away."""
    brokers: list[Broker] = []
    try:
        for index in (1, 2):
            brokers.append(start_broker(tmp_path, provisioned, f"broker-{index}", f"b{index}"))
        yield Cluster(tmp_path, provisioned, brokers)
    finally:
        for broker in brokers:
            broker.process.stop()


@pytest.fixture(scope="session")
def kafka_server_url(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """One real Kafka broker (KRaft, one node) for the session; its log is kept on failures."""
    import shutil

    from teamtrack.local.kafka_server import start_kafka

    port = free_port()
    data_dir = tmp_path_factory.mktemp("kafka")
    server = start_kafka(port, free_port(), data_dir)
    try:
        yield f"kafka://{LOOPBACK}:{port}"
    finally:
        server.stop()
        if request.session.testsfailed:
            kept = Path(__file__).resolve().parents[1] / "test-output" / "kafka-broker.log"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(server.log_path, kept)


@pytest.fixture
async def kafka_url(kafka_server_url: str) -> AsyncIterator[str]:
    """The shared test Kafka, with topics of this test's own (deleted afterwards)."""
    from aiokafka.admin import AIOKafkaAdminClient

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield f"{kafka_server_url}?topic_prefix={prefix}"
    # Deleted so that the session's broker does not carry hundreds of idle partitions.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_server_url.removeprefix("kafka://"))
    await admin.start()
    try:
        await admin.delete_topics(
            [f"{prefix}.positions", f"{prefix}.last", f"{prefix}.revoked-sessions"]
        )
    except Exception:  # noqa: S110 (a test that never started a backend created no topics)
        pass
    finally:
        await admin.close()
