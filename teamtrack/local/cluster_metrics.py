"""What Prometheus needs from `teamtrack up`: the supervisor's own `/metrics` and the list of
every `/metrics` endpoint of the cluster, as a file_sd target file.

The supervisor serves its children's restarts and state on `PortPlan.supervisor_metrics`
(`teamtrack_supervisor_restarts_total{child}`, `teamtrack_supervisor_child_up{child}`, the
child's name in `teamtrack up`; not `role`, which Prometheus gives every target): a process
caught in a restart loop cannot report on itself, so its supervisor does.

`state/prometheus/targets.json` lists every endpoint, one target group per process, labelled
with its `service` (bridge, wsgate, gateway, dashboard, ingest, rules, supervisor) and `role` (the
child's name in `teamtrack up`). It is replaced in one step whenever `endpoints.json` is (start,
restarts, `teamtrack scale`), and Prometheus' file_sd reads it again when it changes
(`deploy/prometheus/prometheus.yml`). Dashboards served over HTTPS (`--https`) are listed in
`targets-https.json` instead, for a job that verifies them against the cluster's authority.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from teamtrack.files import write_json_atomically
from teamtrack.local.ports import bridge_role
from teamtrack.local.servers import LOOPBACK
from teamtrack.metrics import MetricsServer, service_registry

if TYPE_CHECKING:
    from teamtrack.local.cluster import LocalCluster

TARGETS_DIR = "prometheus"
TARGETS_FILE = "targets.json"
HTTPS_TARGETS_FILE = "targets-https.json"


class _SupervisorCollector(Collector):
    def __init__(self, cluster: LocalCluster) -> None:
        self._cluster = cluster

    def collect(self) -> Iterator[Any]:
        restarts = CounterMetricFamily(
            "teamtrack_supervisor_restarts",
            "Times the supervisor restarted a child that had exited, by child", labels=["child"],
        )
        up = GaugeMetricFamily(
            "teamtrack_supervisor_child_up", "1 while the child runs, 0 while it waits for its"
            " restart", labels=["child"],
        )
        uptime = GaugeMetricFamily(
            "teamtrack_supervisor_child_uptime_seconds",
            "Seconds since the child was last started", labels=["child"],
        )
        now = time.monotonic()
        # A copy: the supervisor's thread may add or retire children meanwhile.
        for child in list(self._cluster.children):
            running = child.process.running()
            restarts.add_metric([child.role], child.restarts)
            up.add_metric([child.role], 1 if running else 0)
            uptime.add_metric([child.role], now - child.started_at if running else 0.0)
        yield restarts
        yield up
        yield uptime


def start_supervisor_metrics(cluster: LocalCluster) -> MetricsServer:
    """The supervisor's `/metrics` (its children, and its own process), started."""
    registry = service_registry()
    registry.register(_SupervisorCollector(cluster))
    server = MetricsServer(registry, LOOPBACK, cluster.ports.supervisor_metrics)
    server.start()
    return server


def _group(port: int, service: str, role: str) -> dict[str, object]:
    return {"targets": [f"{LOOPBACK}:{port}"], "labels": {"service": service, "role": role}}


TargetGroups = list[dict[str, object]]


def scrape_targets(cluster: LocalCluster) -> tuple[TargetGroups, TargetGroups]:
    """(plain HTTP target groups, HTTPS ones) of what runs now."""
    ports = cluster.ports
    plain = [_group(ports.supervisor_metrics, "supervisor", "supervisor")]
    plain += [
        _group(port, "bridge", bridge_role(index, instance))
        for index, instance, port in cluster.active_bridges()
    ]
    plain += [
        _group(port, "wsgate", f"wsgate-{index + 1}")
        for index, port in enumerate(ports.wsgate_metrics[: cluster.brokers])
    ]
    plain += [
        _group(port, "gateway", f"gateway-{index + 1}")
        for index, port in enumerate(ports.gateway_metrics[: cluster.dashboards])
    ]
    dashboards = [
        _group(port, "dashboard", f"dashboard-{index + 1}")
        for index, port in enumerate(ports.dashboards[: cluster.dashboards])
    ]
    https = bool(cluster.options.https and cluster.options.tls)
    if any(child.role == "ingest" for child in cluster.children):
        plain.append(_group(ports.ingest_metrics, "ingest", "ingest"))
    if any(child.role == "rules" for child in cluster.children):
        plain.append(_group(ports.rules_metrics, "rules", "rules"))
    return (plain, dashboards) if https else (plain + dashboards, [])


def write_targets(cluster: LocalCluster) -> Path:
    """`state/prometheus/targets.json` (and `targets-https.json`), each replaced in one step;
    returns the folder."""
    folder = cluster.state_dir / TARGETS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    plain, https = scrape_targets(cluster)
    write_json_atomically(folder / TARGETS_FILE, plain)
    write_json_atomically(folder / HTTPS_TARGETS_FILE, https)
    return folder
