"""A whole `teamtrack up` cluster per module, for fault scenarios run one after the other.

The cluster is started in this process (like `teamtrack bench` starts it) so that a scenario
can kill, stall or hold down any of its children; the scenario runs the supervisor, which
restarts what was killed, and waits until everything is back before it starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from teamtrack.bench.faults import FaultLoad, FaultOutcome
from teamtrack.local.cluster import ClusterOptions, LocalCluster

WORKERS = 20
# 20 QoS 1 workers, 300 positions a second in all, the fault 5 s into 12 s of load.
LOAD = FaultLoad(workers=WORKERS, rate=300.0, duration_s=12.0)


def start_cluster(path: Path, **options: object) -> LocalCluster:
    cluster = LocalCluster(
        ClusterOptions(
            state_dir=path, brokers=2, dashboards=2, teams=1, workers=WORKERS, base_port=0,
            simulate=False, device_rate_per_s=0.0, **options,  # type: ignore[arg-type]
        )
    )
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("faults-redis"))
    try:
        yield cluster
    finally:
        cluster.stop()


def assert_nothing_lost(outcome: FaultOutcome) -> None:
    """Every acknowledged position stored once and shown once, nothing missed unannounced."""
    print(outcome.summary())
    assert outcome.acknowledged > 0
    assert outcome.unrouted == 0, outcome.summary()
    assert outcome.missing == 0, (outcome.summary(), outcome.examples)
    assert outcome.stored_twice == 0, outcome.summary()
    assert outcome.shown_twice == 0, (outcome.summary(), outcome.examples)
    assert outcome.not_shown == 0, (outcome.summary(), outcome.examples)
    assert outcome.gaps == 0 and outcome.syncs == 0, outcome.summary()
