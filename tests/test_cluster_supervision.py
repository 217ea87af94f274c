"""`teamtrack up`'s supervisor: every child comes back, Redis with what it had acknowledged,
the backoff starts afresh after a healthy run, and an external backend's outage is said."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from teamtrack.backends import Event, from_url
from teamtrack.contract import Kind
from teamtrack.local import cluster as cluster_module
from teamtrack.local import cluster_support
from teamtrack.local.cluster import Child, ClusterOptions, LocalCluster
from teamtrack.local.servers import LOOPBACK, free_port, port_is_open, start_redis

RESTART_WAIT_S = 15.0


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """The smallest whole cluster, in this process's care: the test calls the supervisor."""
    options = ClusterOptions(
        state_dir=tmp_path / "state", brokers=1, dashboards=1, teams=1, workers=2,
        base_port=0, simulate=False,
    )
    cluster = LocalCluster(options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def child(cluster: LocalCluster, role: str) -> Child:
    for supervised in cluster.children:
        if supervised.role == role:
            return supervised
    raise AssertionError(f"{role} is not a supervised child of the cluster")


def kill_and_time_restart(cluster: LocalCluster, role: str) -> float:
    """SIGKILL the child, supervise until it runs again; seconds until it was started again."""
    supervised = child(cluster, role)
    old_pid = supervised.process.pid
    os.kill(old_pid, signal.SIGKILL)
    supervised.process.process.wait(5)  # type: ignore[union-attr]
    killed_at = time.monotonic()
    deadline = killed_at + RESTART_WAIT_S
    while time.monotonic() < deadline:
        cluster.supervise_once()
        if supervised.process.running() and supervised.process.pid != old_pid:
            return time.monotonic() - killed_at
        time.sleep(0.02)
    raise AssertionError(f"{role} was not restarted within {RESTART_WAIT_S}s")


def position(seq: int) -> Event:
    now = int(time.time() * 1000)
    body = b'{"lat":52.5,"lon":13.4,"ts":%d,"seq":%d}' % (now, seq)
    return Event("alpha", "w001", Kind.POSITION, body, "b1", now, now, 1)


async def test_redis_is_supervised_and_keeps_what_it_acknowledged(
    local_cluster: LocalCluster,
) -> None:
    backend = from_url(local_cluster.backend_url)
    await backend.start()
    try:
        for seq in range(20):
            await backend.publish([position(seq)])
        before = await backend.snapshot("alpha")
    finally:
        await backend.close()

    # Restarted from this (the main) thread: a child started from a worker thread would get
    # its parent-death signal when that thread ends.
    delay = kill_and_time_restart(local_cluster, "redis")
    assert delay < 2.0
    redis = child(local_cluster, "redis")
    redis.process.wait_for_port(LOOPBACK, local_cluster.ports.redis, timeout=10)

    backend = from_url(local_cluster.backend_url)
    await backend.start()
    try:
        after = await backend.snapshot("alpha")
    finally:
        await backend.close()
    # The append-only file brought back the log (same newest cursor) and the last-known store.
    assert after.cursor == before.cursor
    assert after.positions["w001"].body == before.positions["w001"].body
    assert redis.restarts == 1


def test_backoff_starts_afresh_after_a_healthy_run(
    local_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed again and again, each time after running a while: back within a second each
    time (the backoff used to grow with every restart: 0.5, 1, 2, 4 s...)."""
    monkeypatch.setattr(cluster_module, "HEALTHY_AFTER_S", 1.0)
    delays = []
    for _ in range(4):
        delays.append(kill_and_time_restart(local_cluster, "broker-1"))
        healthy_until = time.monotonic() + 1.2
        while time.monotonic() < healthy_until:
            local_cluster.supervise_once()
            time.sleep(0.05)
    assert max(delays) < 1.0, delays
    assert child(local_cluster, "broker-1").restarts == 4


@pytest.mark.extended  # with the backoff reset above, in `make test`
def test_a_child_that_keeps_dying_waits_longer_each_time(
    local_cluster: LocalCluster,
) -> None:
    """No restart storm: killed at once after each restart, it is restarted later and later."""
    delays = [kill_and_time_restart(local_cluster, "ingest") for _ in range(3)]
    assert delays[2] > delays[0] * 2, delays


def test_an_external_backend_outage_is_logged_when_it_starts_and_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    redis = start_redis(port, tmp_path / "redis")
    options = ClusterOptions(
        state_dir=tmp_path / "state", brokers=1, dashboards=1, teams=1, workers=1,
        base_port=0, simulate=False, backend_url=f"redis://{LOOPBACK}:{port}/0",
    )
    cluster = LocalCluster(options)
    caplog.set_level(logging.WARNING, logger="teamtrack.local.cluster")
    try:
        cluster.start()
        assert not any(child.role == "redis" for child in cluster.children)
        cluster.supervise_once()
        assert cluster.backend_up is True
        redis.stop()
        assert not port_is_open(LOOPBACK, port)
        time.sleep(cluster_module.BACKEND_PROBE_INTERVAL_S)
        cluster.supervise_once()
        assert cluster.backend_up is False
        assert "does not answer" in caplog.text
        redis = start_redis(port, tmp_path / "redis")
        time.sleep(cluster_module.BACKEND_PROBE_INTERVAL_S)
        cluster.supervise_once()
        assert cluster.backend_up is True
        assert "is back after" in caplog.text
    finally:
        cluster.stop()
        redis.stop()


def test_the_probe_reads_every_kind_of_backend_url(tmp_path: Path) -> None:
    """Any host of the URL that answers will do: Sentinel and Kafka URLs name several."""
    port, closed = free_port(), free_port()
    redis = start_redis(port, tmp_path / "redis")
    try:
        up = f"{LOOPBACK}:{port}"
        down = f"{LOOPBACK}:{closed}"
        assert cluster_support.backend_answers(f"redis://:secret@{up}/0")
        assert cluster_support.backend_answers(f"redis+sentinel://{down},{up}/teamtrack/0")
        assert not cluster_support.backend_answers(f"redis+sentinel://{down}/teamtrack/0")
        assert not cluster_support.backend_answers(f"kafka://{down}")
    finally:
        redis.stop()
