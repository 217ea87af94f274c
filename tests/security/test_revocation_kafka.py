"""A logout holds on every dashboard instance of a `teamtrack up --backend kafka` too.

The Kafka that cluster starts wants a user per role (`teamtrack.kafka_users`): the dashboards
record a logout in `teamtrack.revoked-sessions` with their own user, and read the others'
every `--revocation-poll-s`. Before, the Kafka backend shared no logouts: the cookie still
worked on the other instance, and its live socket stayed open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets

from teamtrack.cluster import ClusterOptions, LocalCluster

from .test_revocation import (
    CLOSE_REVOKED,
    close_code_of,
    credentials,
    dashboard_url,
    log_in,
    status_of,
    until,
    ws_url,
)

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
    manager = credentials(cluster).managers_of("alpha")[0]
    cookie = log_in(cluster, 0, manager.username, manager.password)
    headers = {"Cookie": f"tt_session={cookie}"}
    assert status_of(cluster, 1, headers) == 200
    other = await websockets.connect(ws_url(cluster, 1, "alpha"), additional_headers=headers)
    same = await websockets.connect(ws_url(cluster, 0, "alpha"), additional_headers=headers)
    started = time.monotonic()
    response = await asyncio.to_thread(
        httpx.post, f"{dashboard_url(cluster, 0)}/logout", headers=headers
    )
    assert response.status_code == 303
    assert await asyncio.to_thread(status_of, cluster, 0, headers) == 401
    refused = await asyncio.to_thread(
        until, lambda: status_of(cluster, 1, headers) == 401, "refused on the other instance"
    )
    print(f"\nkafka: logout -> cookie refused on the other instance: {refused - started:.2f} s")
    assert await close_code_of(same) == CLOSE_REVOKED
    assert await close_code_of(other) == CLOSE_REVOKED
    print(f"kafka: logout -> its socket on the other instance closed: "
          f"{time.monotonic() - started:.2f} s")
    fresh = log_in(cluster, 1, manager.username, manager.password)
    assert status_of(cluster, 0, {"Cookie": f"tt_session={fresh}"}) == 200
    for log in cluster.logs_dir.glob("dashboard*.log"):
        text = log.read_text(errors="replace")
        assert "shares no logouts" not in text, log.name
        assert "refused on this instance only" not in text, log.name
