"""`teamtrack up --backend kafka`: the whole product on a real Kafka broker it starts itself.

A worker publishes on broker 1; the manager on dashboard 2 and an observer on broker 2 get
every position once, in order, across instances that share nothing but Kafka.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from test_end_to_end import (
    RunningCluster,
    _alive,
    assert_delivered_across_instances_once_in_order,
    start_cluster,
    stop_cluster,
    wait_until_up,
)

from teamtrack.provision import load_credentials


async def test_kafka_cluster_delivers_across_instances_once_in_order_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    process = start_cluster(tmp_path, "--no-simulate", "--backend", "kafka")
    pids: dict[str, int] = {}
    try:
        endpoints = await asyncio.to_thread(wait_until_up, process, tmp_path)
        running = RunningCluster(
            process, tmp_path, endpoints, load_credentials(tmp_path / "credentials.json")
        )
        assert endpoints["backend"].startswith("kafka://")
        pids = json.loads((tmp_path / "processes.json").read_text())
        assert "kafka" in pids and "redis" not in pids

        await assert_delivered_across_instances_once_in_order(running, 30)
    finally:
        code, output = await asyncio.to_thread(stop_cluster, process)
    assert code == 0, output
    assert "all cleanly" in output, output
    for role, pid in pids.items():
        assert not _alive(pid), f"{role} (pid {pid}) survived teamtrack up"


def test_kafka_nodes_get_ports_and_all_of_them_are_the_backend_url(tmp_path: Path) -> None:
    """`teamtrack up --backend kafka --kafka-nodes 3`: three nodes planned from the base port,
    every one of them in the services' bootstrap list and in endpoints.json."""
    from teamtrack.local.cluster import ClusterOptions, LocalCluster

    options = ClusterOptions(
        state_dir=tmp_path, base_port=21000, backend="kafka", kafka_nodes=3, simulate=False
    )
    cluster = LocalCluster(options)
    assert cluster.ports.kafka_nodes == [(21101, 21102), (21103, 21104), (21105, 21106)]
    bootstrap = "127.0.0.1:21101,127.0.0.1:21103,127.0.0.1:21105"
    assert cluster.backend_url == f"kafka://{bootstrap}"
    assert cluster.endpoints()["backend"] == f"kafka://{bootstrap}"
    planned = list(cluster.ports.all_ports())
    assert len(planned) == len(set(planned))
    assert {21101, 21102, 21103, 21104, 21105, 21106} <= set(planned)
