"""Any one process of a Redis cluster killed or stalled under QoS 1 load: nothing acknowledged
is lost, stored twice or shown twice (`teamtrack.bench.faults` counts it).

`make test` runs the scenarios not marked `extended`; `make faults` runs them all.
"""

from __future__ import annotations

import pytest

from teamtrack.bench.faults import Fault, run_fault
from teamtrack.local.cluster import LocalCluster

from .conftest import LOAD, assert_nothing_lost

pytestmark = pytest.mark.faults

SCENARIOS = [
    # Devices reconnect to the restarted broker before its bridge does: its positions wait in
    # the bridge's session, which every snapshot of the broker holds (they were lost with 0x10).
    Fault("broker-1"),
]
EXTENDED = [
    # Between storing a batch and acknowledging it: the broker delivers it again, the history
    # keeps one row, the dashboards show it once (a bridge killed under load, with a second
    # one in its share group: tests/test_bridges_per_broker.py, in `make test`).
    Fault("bridge-1"),
    # Redis comes back from its append-only file with everything it had acknowledged.
    Fault("redis"),
    # A dashboard that could not read for 3 s takes in the backlog at once: a viewer that reads
    # gets all of it (it was pushed into state-sync).
    Fault("dashboard-2", "stall", stall_s=3.0),
    # The viewer's dashboard dies: the viewer resumes on the other one, from its cursor (a
    # dashboard stopped under load: tests/test_scale.py, in `make test`).
    Fault("dashboard-2"),
    Fault("ingest"),
    Fault("bridge-1", "stall", stall_s=10.0),
    Fault("redis", "stall", stall_s=5.0),
    Fault("redis", "down", stall_s=3.0),
    Fault("broker-2"),
    Fault("dashboard-1"),
    Fault("ingest", "stall", stall_s=10.0),
]


@pytest.mark.parametrize("fault", SCENARIOS, ids=[fault.name for fault in SCENARIOS])
async def test_a_single_fault_loses_nothing(redis_cluster: LocalCluster, fault: Fault) -> None:
    assert_nothing_lost(await run_fault(redis_cluster, fault, LOAD))


@pytest.mark.extended
@pytest.mark.parametrize("fault", EXTENDED, ids=[fault.name for fault in EXTENDED])
async def test_more_single_faults_lose_nothing(redis_cluster: LocalCluster, fault: Fault) -> None:
    assert_nothing_lost(await run_fault(redis_cluster, fault, LOAD))


@pytest.mark.extended
async def test_a_broker_crash_while_its_bridge_is_stalled_loses_nothing_held_for_it(
    redis_cluster: LocalCluster,
) -> None:
    """A double fault: bridge-1 stalled, then broker-1 killed. Mosquitto 2.0 keeps what it
    queues for a subscriber in memory between two saves; with 1,000 positions in flight per
    bridge, the rest of what bridge-1 could not take (beyond 1,000) died with its broker (802
    of 6,401 in a 12 s stall at 400 positions/s). Handed to the bridge (up to 20,000 in
    flight), they wait in its socket and outlive the broker."""
    faults = [
        Fault("bridge-1", "stall", at_s=1.0, stall_s=10.0),
        Fault("broker-1", "kill", at_s=10.0),
    ]
    assert_nothing_lost(await run_fault(redis_cluster, faults, LOAD))


@pytest.mark.extended
async def test_a_broker_crash_while_the_backend_is_down_loses_nothing_held_for_it(
    redis_cluster: LocalCluster,
) -> None:
    """Redis held down, then broker-1 killed: the bridge holds what it took in (601 of 6,401
    lost with 1,000 in flight) and stores it once Redis is back."""
    faults = [Fault("redis", "down", at_s=1.0, stall_s=10.0), Fault("broker-1", "kill", at_s=9.0)]
    assert_nothing_lost(await run_fault(redis_cluster, faults, LOAD))
