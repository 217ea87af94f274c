"""Any one process of a cluster on a 3-node Kafka killed under QoS 1 load (`make faults`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from teamtrack.bench.faults import Fault, run_fault
from teamtrack.local.cluster import LocalCluster

from .conftest import LOAD, assert_nothing_lost, start_cluster

pytestmark = [pytest.mark.faults, pytest.mark.extended]

SCENARIOS = [
    Fault("kafka-1"),
    Fault("kafka-3"),
    Fault("broker-1"),
    Fault("bridge-2"),
    Fault("dashboard-2"),
]


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_cluster(
        tmp_path_factory.mktemp("faults-kafka"), backend="kafka", kafka_nodes=3
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("fault", SCENARIOS, ids=[fault.name for fault in SCENARIOS])
async def test_a_single_fault_loses_nothing(kafka_cluster: LocalCluster, fault: Fault) -> None:
    assert_nothing_lost(await run_fault(kafka_cluster, fault, LOAD))
