"""A logout holds on every dashboard instance of a `teamtrack up --backend kafka` too.

The Kafka that cluster starts wants a user per role (`teamtrack.local.kafka_users`): the dashboards
record a logout in `teamtrack.revoked-sessions` with their own user, and read the others'
every `--revocation-poll-s`. Before, the Kafka backend shared no logouts: the cookie still
worked on the other instance, and its live socket stayed open.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from teamtrack.local.cluster import ClusterOptions, LocalCluster

from .test_revocation import assert_a_logout_holds_everywhere

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    running = LocalCluster(
        ClusterOptions(
            state_dir=tmp_path_factory.mktemp("revocation-kafka"), brokers=1, dashboards=2,
            teams=1, workers=1, base_port=0, simulate=False, backend="kafka",
        )
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


async def test_a_cookie_after_logout_is_refused_on_the_other_instance_on_kafka(
    cluster: LocalCluster,
) -> None:
    await assert_a_logout_holds_everywhere(cluster, "kafka: ")
    for log in cluster.logs_dir.glob("dashboard*.log"):
        text = log.read_text(errors="replace")
        assert "refused on this instance only" not in text, log.name
