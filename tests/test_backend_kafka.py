"""The Kafka backend against a real Apache Kafka broker: the shared contract, then Kafka's own."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import orjson
import pytest
from backend_contract import WAIT, BackendContract, logout, position

from teamtrack.backends import Backend, BackendError, Batch, from_url
from teamtrack.backends import kafka_store as kafka_module
from teamtrack.backends.kafka import KafkaBackend, KafkaSubscription, parse_cursor


class TestKafkaBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _server(self, kafka_url: str) -> None:
        self.url = kafka_url

    def make_backend(self, history: int) -> Backend:
        return from_url(f"{self.url}&history={history}")

    async def write_malformed_revocations(self, backend: Backend) -> bool:
        from aiokafka import AIOKafkaProducer

        assert isinstance(backend, KafkaBackend)
        producer = AIOKafkaProducer(bootstrap_servers=backend.options.bootstrap)
        await producer.start()
        try:
            for value in (b"not json", b'["s", "e"]', b'{"s": "session-x", "e": "soon"}',
                          b'{"e": 1}', None):
                await producer.send_and_wait(
                    backend.revocations_topic, value, key=b"x", partition=0
                )
        finally:
            await producer.stop()
        return True


async def test_unreachable_kafka_is_a_clear_error() -> None:
    from teamtrack.local.servers import free_port

    backend = from_url(f"kafka://127.0.0.1:{free_port()}")
    with pytest.raises(BackendError, match="unreachable"):
        await backend.start()
    await backend.close()


def test_url_options_are_checked() -> None:
    backend = from_url("kafka://a:9092,b:9092?partitions=6&topic_prefix=fleet&history_ms=60000")
    assert isinstance(backend, KafkaBackend)
    assert backend.options.bootstrap == "a:9092,b:9092"
    assert backend.positions_topic == "fleet.positions"
    assert backend.last_topic == "fleet.last"
    assert backend.revocations_topic == "fleet.revoked-sessions"
    assert backend.options.partitions == 6
    # Replicas: min(3, brokers) when the topics are created, unless the URL says.
    assert backend.options.replication is None
    assert KafkaBackend.from_url("kafka://a:9092?replication=2").options.replication == 2
    with pytest.raises(ValueError, match="unknown kafka:// option"):
        from_url("kafka://a:9092?partition=6")
    with pytest.raises(ValueError, match="at least one broker"):
        from_url("kafka://?partitions=6")


def test_url_credentials_reach_every_client_and_never_an_error() -> None:
    """`kafka://user:password@host,host`: SASL/SCRAM-SHA-512 for the producer, consumers and
    admin (they all take `client_options()`); the password in no repr and no error."""
    backend = from_url("kafka://tt-bridge:s%40cr3t-pw@a:9092,b:9092?topic_prefix=fleet")
    assert isinstance(backend, KafkaBackend)
    assert backend.options.bootstrap == "a:9092,b:9092"
    assert (backend.options.username, backend.options.password) == ("tt-bridge", "s@cr3t-pw")
    assert "s@cr3t" not in repr(backend.options)
    options = backend.client_options()
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "tt-bridge"
    assert options["sasl_plain_password"] == "s@cr3t-pw"
    assert "security_protocol" not in KafkaBackend.from_url("kafka://a:9092").client_options()
    for wrong in ("kafka://tt-bridge@a:9092", "kafka://:hunter2x@a:9092",
                  "kafka://tt-bridge:@a:9092", "kafka://u:hunter2x@a:9092,x@b:9092"):
        with pytest.raises(ValueError) as error:
            from_url(wrong)
        assert "hunter2x" not in str(error.value)


async def test_topics_are_created_with_explicit_settings(kafka_url: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    backend = from_url(f"{kafka_url}&history_ms=120000")
    assert isinstance(backend, KafkaBackend)
    await backend.start()
    await backend.close()
    # Started twice: creating what exists is not an error.
    await backend.start()
    await backend.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=backend.options.bootstrap)
    await admin.start()
    try:
        names = [backend.positions_topic, backend.last_topic, backend.revocations_topic]
        topics = {
            topic["topic"]: len(topic["partitions"])
            for topic in await admin.describe_topics(names)
        }
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    finally:
        await admin.close()
    assert topics == {backend.positions_topic: 12, backend.last_topic: 12,
                      backend.revocations_topic: 1}
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            configs[resource[3]] = {entry[0]: entry[1] for entry in resource[4]}
    assert configs[backend.positions_topic]["cleanup.policy"] == "delete"
    assert configs[backend.positions_topic]["retention.ms"] == "120000"
    assert configs[backend.last_topic]["cleanup.policy"] == "compact"
    assert configs[backend.last_topic]["min.insync.replicas"] == "1"
    # Logouts outlive any session (12 h by default): two days.
    revocations = configs[backend.revocations_topic]
    assert revocations["cleanup.policy"] == "delete"
    assert revocations["retention.ms"] == str(2 * 24 * 3600 * 1000)
    assert revocations["min.insync.replicas"] == "1"


async def test_a_team_lives_in_one_partition_and_cursors_name_it(kafka_url: str) -> None:
    backend = from_url(kafka_url)
    assert isinstance(backend, KafkaBackend)
    await backend.start()
    try:
        subscription = backend.subscribe()
        await subscription.add("alpha", (await backend.snapshot("alpha")).cursor)
        for seq in range(3):
            await backend.publish([position("alpha", "w1", seq)])
        partitions = set()
        offsets = []
        for _ in range(3):
            batch = await asyncio.wait_for(anext(subscription), WAIT)
            assert isinstance(batch, Batch)
            partition, offset = parse_cursor(batch.cursor)
            partitions.add(partition)
            offsets.append(offset)
        assert partitions == {backend.partition_of("alpha")}
        assert offsets == sorted(offsets)
        await subscription.close()
    finally:
        await backend.close()


async def test_each_worker_keeps_its_order_with_concurrent_publishers(kafka_url: str) -> None:
    """Two bridges publishing one team's workers at once: each worker's fixes stay in order."""
    reader, *bridges = [from_url(kafka_url) for _ in range(3)]
    for backend in (reader, *bridges):
        await backend.start()
    try:
        subscription = reader.subscribe()
        await subscription.add("alpha", (await reader.snapshot("alpha")).cursor)

        async def publish_worker(bridge: Backend, worker: str) -> None:
            for seq in range(0, 150, 3):
                await bridge.publish(
                    [position("alpha", worker, s) for s in range(seq, seq + 3)]
                )

        await asyncio.gather(
            publish_worker(bridges[0], "w1"),
            publish_worker(bridges[1], "w2"),
            publish_worker(bridges[0], "w3"),
        )
        seqs: dict[str, list[int]] = defaultdict(list)
        while sum(len(values) for values in seqs.values()) < 450:
            batch = await asyncio.wait_for(anext(subscription), WAIT)
            assert isinstance(batch, Batch)
            for event in batch.events():
                seqs[event.worker].append(orjson.loads(event.body)["seq"])
        assert seqs == {worker: list(range(150)) for worker in ("w1", "w2", "w3")}
        await subscription.close()
    finally:
        for backend in (reader, *bridges):
            await backend.close()


async def test_a_subscription_reads_only_the_partitions_of_its_teams(kafka_url: str) -> None:
    backend = from_url(kafka_url)
    assert isinstance(backend, KafkaBackend)
    await backend.start()
    try:
        teams = [f"team-{index:02d}" for index in range(24)]
        watched = "team-00"
        watched_partition = backend.partition_of(watched)
        neighbours = [
            team for team in teams[1:] if backend.partition_of(team) == watched_partition
        ]
        subscription = backend.subscribe()
        assert isinstance(subscription, KafkaSubscription)
        await subscription.add(watched, (await backend.snapshot(watched)).cursor)
        for seq in range(5):
            await backend.publish([position(team, "w1", seq) for team in teams])
        seqs = []
        while len(seqs) < 5:
            batch = await asyncio.wait_for(anext(subscription), WAIT)
            assert isinstance(batch, Batch) and batch.team == watched
            seqs += [orjson.loads(event.body)["seq"] for event in batch.events()]
        assert seqs == list(range(5))
        assert subscription.partitions == {watched_partition}
        assert set(subscription.records_read) == {watched_partition}
        # The other teams of that partition were read and skipped by key; nobody else's were.
        assert subscription.records_read[watched_partition] == 5 * (1 + len(neighbours))
        assert subscription.records_skipped == 5 * len(neighbours)
        await subscription.close()
    finally:
        await backend.close()


async def test_removing_the_last_team_of_a_partition_unassigns_it(kafka_url: str) -> None:
    backend = from_url(kafka_url)
    assert isinstance(backend, KafkaBackend)
    await backend.start()
    try:
        subscription = backend.subscribe()
        assert isinstance(subscription, KafkaSubscription)
        for team in ("alpha", "bravo"):
            await subscription.add(team, (await backend.snapshot(team)).cursor)
        await backend.publish([position("alpha", "w1", 0), position("bravo", "w1", 0)])
        for _ in range(2):
            await asyncio.wait_for(anext(subscription), WAIT)
        assert subscription.partitions == {
            backend.partition_of("alpha"), backend.partition_of("bravo")
        }
        await subscription.remove("bravo")
        await backend.publish([position("alpha", "w1", 1), position("bravo", "w1", 1)])
        batch = await asyncio.wait_for(anext(subscription), WAIT)
        assert isinstance(batch, Batch) and batch.team == "alpha"
        assert subscription.partitions == {backend.partition_of("alpha")}
        await subscription.close()
    finally:
        await backend.close()


async def test_revocations_are_read_through_one_reader_kept_open(
    kafka_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dashboard asks every second: one consumer, assigned the topic's one partition, serves
    every read; closing the backend closes it."""
    writer, reader = KafkaBackend.from_url(kafka_url), KafkaBackend.from_url(kafka_url)
    await writer.start()
    await reader.start()
    opened: list[object] = []

    class Counted(kafka_module.AIOKafkaConsumer):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            opened.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", Counted)
    try:
        position = ""
        for number in range(3):
            await writer.revoke_session(logout(number), 3600)
            found, position = await reader.session_revocations(position)
            assert found == [logout(number)]
            started = asyncio.get_running_loop().time()
            assert (await reader.session_revocations(position))[0] == []
            assert asyncio.get_running_loop().time() - started < 0.5
        assert len(opened) == 1
    finally:
        await writer.close()
        await reader.close()
    assert opened[0]._closed  # type: ignore[attr-defined]


async def test_a_revocation_position_outside_the_kept_log_reads_what_is_kept(
    kafka_url: str,
) -> None:
    """Retention dropped the revocations before the position (they have expired anyway), or
    the topic was made again and the position is past its end: read from the oldest kept."""
    from aiokafka import TopicPartition
    from aiokafka.admin import RecordsToDelete

    backend = KafkaBackend.from_url(kafka_url)
    await backend.start()
    try:
        for number in range(4):
            await backend.revoke_session(logout(number), 3600)
        partition = TopicPartition(backend.revocations_topic, 0)
        await backend.admin_client().delete_records({partition: RecordsToDelete(2)})
        found, position = await backend.session_revocations("1")
        assert (found, position) == ([logout(2), logout(3)], "4")
        assert (await backend.session_revocations("99"))[0] == [logout(2), logout(3)]
    finally:
        await backend.close()

