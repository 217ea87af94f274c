"""A dashboard instance on Kafka reads only the partitions of the teams its viewers watch."""

from __future__ import annotations

from backend_contract import position
from prometheus_client import CollectorRegistry
from test_dashboard_hub import collect_until, next_frame, seqs_by_worker

from dashboard.hub import TeamHub
from dashboard.metrics import DashboardMetrics
from teamtrack.backends.kafka import KafkaBackend, KafkaSubscription


def teams_in_distinct_partitions(backend: KafkaBackend, count: int) -> list[str]:
    """`count` team slugs that Kafka's partitioner puts into `count` different partitions."""
    chosen: dict[int, str] = {}
    index = 0
    while len(chosen) < count:
        team = f"team-{index:03d}"
        chosen.setdefault(backend.partition_of(team), team)
        index += 1
    return sorted(chosen.values())


async def test_a_dashboard_watching_one_team_of_twelve_reads_only_its_partition(
    kafka_url: str,
) -> None:
    bridge = KafkaBackend.from_url(kafka_url)
    dashboard = KafkaBackend.from_url(kafka_url)
    await bridge.start()
    await dashboard.start()
    registry = CollectorRegistry()
    hub = TeamHub(dashboard, DashboardMetrics(registry))
    await hub.start()
    try:
        teams = teams_in_distinct_partitions(bridge, 12)
        watched = teams[5]
        viewer = await hub.join(watched)
        assert (await next_frame(viewer))["type"] == "snapshot"
        rounds, workers = 20, ("w1", "w2", "w3")
        for seq in range(rounds):
            # One bridge batch holds every team, as a busy bridge's does.
            await bridge.publish(
                [position(team, worker, seq) for team in teams for worker in workers]
            )
        received = seqs_by_worker(await collect_until(viewer, rounds - 1, set(workers)))
        assert received == {worker: list(range(rounds)) for worker in workers}

        subscription = hub.subscription
        assert isinstance(subscription, KafkaSubscription)
        watched_partition = dashboard.partition_of(watched)
        # Assigned one partition of twelve, and fetched nothing from the eleven others.
        assert subscription.partitions == {watched_partition}
        assert dict(subscription.records_read) == {watched_partition: rounds}
        assert subscription.records_skipped == 0
        batches = {
            team: registry.get_sample_value(
                "teamtrack_dashboard_backend_batches_total", {"team": team}
            )
            for team in teams
        }
        assert batches == {team: (rounds if team == watched else None) for team in teams}

        # A second team's viewer adds its partition; when it leaves, the partition goes too.
        other = teams[0]
        other_viewer = await hub.join(other)
        await next_frame(other_viewer)
        await bridge.publish([position(other, "w1", 0)])
        await collect_until(other_viewer, 0, {"w1"})
        assert subscription.partitions == {watched_partition, dashboard.partition_of(other)}
        await hub.leave(other_viewer)
        await bridge.publish([position(watched, "w1", rounds)])
        await collect_until(viewer, rounds, {"w1"})
        assert subscription.partitions == {watched_partition}
    finally:
        await hub.stop()
        await dashboard.close()
        await bridge.close()
