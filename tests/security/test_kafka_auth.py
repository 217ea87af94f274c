"""The Kafka a cluster starts is not open to whoever reaches its ports.

Found: the Kafka of `teamtrack up --backend kafka` listened with PLAINTEXT and no authorizer;
a local user's producer with no credentials at all appended a fake worker to
`teamtrack.positions` (accepted, acks=all) and could have deleted the topics. Now clients
authenticate with SASL/SCRAM-SHA-512 and each service has its own user, allowed by ACLs only
what it does (`teamtrack.local.kafka_users`): the dashboards' (the most exposed) reads, and produces
to the logouts topic only (shared revocations), but cannot produce a position or a presence,
create or delete a topic; the bridges' produces.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from teamtrack.backends import BackendError, Event, SessionRevocation, from_url
from teamtrack.contract import Kind
from teamtrack.local.cluster import ClusterOptions, LocalCluster
from teamtrack.local.kafka_probe import live_brokers
from teamtrack.local.servers import LOOPBACK

pytestmark = pytest.mark.security

USERS_FILE = "kafka-users.json"
POSITIONS = "teamtrack.positions"
LAST = "teamtrack.last"
REVOCATIONS = "teamtrack.revoked-sessions"
TOPIC_AUTHORIZATION_FAILED = TopicAuthorizationFailedError.errno


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(ClusterOptions(
        state_dir=tmp_path_factory.mktemp("kafka-auth"), brokers=1, dashboards=1, teams=1,
        workers=2, base_port=0, simulate=False, backend="kafka",
    ))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def bootstrap(cluster: LocalCluster) -> str:
    return f"{LOOPBACK}:{cluster.ports.kafka}"


def passwords(cluster: LocalCluster) -> dict[str, str]:
    stored: dict[str, str] = json.loads((cluster.state_dir / USERS_FILE).read_text())
    return stored


def sasl(cluster: LocalCluster, role: str | None) -> dict[str, Any]:
    """aiokafka options for `role`'s user (None: no credentials, as before)."""
    if role is None:
        return {"bootstrap_servers": bootstrap(cluster), "request_timeout_ms": 5_000}
    return {
        "bootstrap_servers": bootstrap(cluster),
        "request_timeout_ms": 5_000,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": f"tt-{role}",
        "sasl_plain_password": passwords(cluster)[role],
    }


def ghost(seq: int = 1) -> Event:
    now = int(time.time() * 1000)
    payload = b'{"lat":52.5,"lon":13.4,"ts":%d,"seq":%d}' % (now, seq)
    return Event("alpha", "ghost", Kind.POSITION, payload, "b1", now, now, seq)


async def produce(options: dict[str, Any], topic: str = POSITIONS) -> None:
    """One record into `topic`, as a plain (non-idempotent) producer."""
    producer = AIOKafkaProducer(acks=1, **options)
    try:
        await asyncio.wait_for(producer.start(), 15)
        await asyncio.wait_for(
            producer.send_and_wait(topic, b'[{"w":"ghost","k":"p"}]', key=b"alpha"), 15
        )
    finally:
        await producer.stop()


async def test_a_client_without_credentials_is_refused(cluster: LocalCluster) -> None:
    """A local user's producer with no password: refused at the handshake (it used to append
    a fake worker to the positions topic, acknowledged). Same with a wrong password, and on
    the controller port."""
    with pytest.raises((KafkaError, TimeoutError)):
        await produce(sasl(cluster, None))
    wrong = {**sasl(cluster, "bridge"), "sasl_plain_password": "not-the-password"}
    with pytest.raises((KafkaError, TimeoutError)):
        await produce(wrong)
    # The wire itself: a Metadata request without SASL gets no answer, on either port.
    assert live_brokers(LOOPBACK, cluster.ports.kafka) == set()
    assert live_brokers(LOOPBACK, cluster.ports.kafka_controller) == set()


async def test_the_dashboards_user_reads_but_cannot_produce_or_delete_topics(
    cluster: LocalCluster,
) -> None:
    urls = {role: f"kafka://tt-{role}:{password}@{bootstrap(cluster)}"
            for role, password in passwords(cluster).items()}
    # The bridge's user publishes, through the backend as the bridge does.
    async with from_url(urls["bridge"]) as bridge:
        await bridge.publish([ghost()])
    # The dashboard's reads every team, as a dashboard must, and shares its logouts: the one
    # topic it may write, which is also what lets it start an idempotent producer.
    logout = SessionRevocation("session-of-the-test", int(time.time()) + 60)
    async with from_url(urls["dashboard"]) as dashboard:
        snapshot = await dashboard.snapshot("alpha")
        assert "ghost" in snapshot.positions
        await dashboard.revoke_session(logout, 3600)
        assert logout in (await dashboard.session_revocations(""))[0]
        with pytest.raises(BackendError, match="TopicAuthorizationFailed"):
            await dashboard.publish([ghost(2)])
    # ... but cannot write a position or a presence even without idempotence.
    for topic in (POSITIONS, LAST):
        with pytest.raises(TopicAuthorizationFailedError):
            await produce(sasl(cluster, "dashboard"), topic)
    admin = AIOKafkaAdminClient(**sasl(cluster, "dashboard"))
    await admin.start()
    try:
        deleted = await admin.delete_topics([POSITIONS, LAST, REVOCATIONS])
        assert {code for _topic, code, *_rest in deleted.topic_error_codes} == {
            TOPIC_AUTHORIZATION_FAILED
        }
        created = await admin.create_topics([NewTopic("teamtrack.ghost", 1, 1)])
        assert all(error[1] != 0 for error in created.topic_errors)
    finally:
        await admin.close()
    # The ingest's user may not produce either, not even a logout.
    for topic in (POSITIONS, REVOCATIONS):
        with pytest.raises(TopicAuthorizationFailedError):
            await produce(sasl(cluster, "ingest"), topic)
    async with from_url(urls["ingest"]) as ingest:
        with pytest.raises(BackendError) as refused:
            await ingest.revoke_session(logout, 3600)
        assert logout.session_id not in str(refused.value)
    async with from_url(urls["admin"]) as admin_backend:
        assert set(await admin_backend.admin_client().list_topics()) >= {
            POSITIONS, LAST, REVOCATIONS
        }


def test_the_passwords_are_in_private_files_and_on_no_command_line(
    cluster: LocalCluster,
) -> None:
    users = cluster.state_dir / USERS_FILE
    assert users.stat().st_mode & 0o777 == 0o600
    secrets = list(passwords(cluster).values())
    assert len(secrets) == 6  # admin, bridge, dashboard, ingest, rules and the nodes' own
    for role, pid in json.loads((cluster.state_dir / "processes.json").read_text()).items():
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        environment = Path(f"/proc/{pid}/environ").read_bytes()
        assert not any(secret.encode() in command_line for secret in secrets), role
        if role.startswith(("bridge", "dashboard", "ingest", "rules")):
            # Each service has its own role's password in its environment, and only that.
            own = passwords(cluster)[role.split("-")[0]]
            assert own.encode() in environment, role
            others = [secret for secret in secrets if secret != own]
            assert not any(secret.encode() in environment for secret in others), role
    data = cluster.state_dir / "kafka"
    properties = data / "server.properties"
    assert properties.stat().st_mode & 0o777 == 0o600  # it holds the nodes' password
    assert not (data / "format.args").exists()  # the format's arguments, removed after use
    logs = [*cluster.logs_dir.glob("*.log"), data / "kafka.log"]
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(secret in text for secret in secrets), log.name
    assert "kafka://" in cluster.backend_url and "tt-admin" in cluster.backend_url
    endpoints = (cluster.state_dir / "endpoints.json").read_text()
    assert not any(secret in endpoints for secret in secrets)


def test_the_storage_format_reads_the_scram_passwords_from_a_private_file(
    tmp_path: Path,
) -> None:
    """`kafka-storage format --add-scram 'SCRAM-SHA-512=[name=...,password=...]'` would show
    every role's password in `ps` while the JVM formats: the tool is run as `java @file`
    instead, the file 0600 and removed afterwards."""
    from teamtrack.local.kafka_probe import SaslUser
    from teamtrack.local.kafka_server import KafkaSasl, _format_command

    sasl = KafkaSasl(SaslUser("tt-broker", "nodes-secret"), (SaslUser("tt-bridge", "b-secret"),))
    properties = tmp_path / "server.properties"
    with _format_command(tmp_path, properties, "cluster-id", ["--standalone"], sasl) as argv:
        assert len(argv) == 2 and argv[1].startswith("@")
        assert not any("secret" in argument for argument in argv)
        argument_file = Path(argv[1][1:])
        assert argument_file.stat().st_mode & 0o777 == 0o600
        lines = argument_file.read_text().splitlines()
        assert "SCRAM-SHA-512=[name=tt-bridge,password=b-secret]" in lines
        assert lines[lines.index("--config") + 1] == str(properties)
    assert not argument_file.exists()
