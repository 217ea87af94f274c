"""What `teamtrack up` shows of itself: `endpoints.json` and the live status table."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table

from teamtrack.local.cluster_support import without_password
from teamtrack.local.ports import bridge_role
from teamtrack.local.servers import LOOPBACK
from teamtrack.metrics import scrape_totals

if TYPE_CHECKING:
    from teamtrack.local.cluster import LocalCluster


def endpoints_of(cluster: LocalCluster) -> dict[str, object]:
    """What `endpoints.json` lists: with TLS, each broker's `mqtts` URL and the authority
    (`ca`) that clients verify it (and the dashboards' `https://` URLs) against."""
    tls = cluster.provisioned.tls if cluster.provisioned is not None else None
    brokers: list[dict[str, str]] = []
    for index, (mqtt, ws) in enumerate(
        zip(cluster.ports.broker_mqtt[: cluster.brokers], cluster.ports.broker_ws, strict=False)
    ):
        ws_scheme = "wss" if cluster.options.https and tls is not None else "ws"
        broker = {"mqtt": f"mqtt://{LOOPBACK}:{mqtt}", "ws": f"{ws_scheme}://{LOOPBACK}:{ws}"}
        if tls is not None:
            host = cluster.mqtts_client_host()
            host = f"[{host}]" if ":" in host else host
            broker["mqtts"] = f"mqtts://{host}:{cluster.ports.broker_mqtts[index]}"
        brokers.append(broker)
    scheme = "https" if cluster.options.https and tls is not None else "http"
    endpoints: dict[str, object] = {
        "brokers": brokers,
        "dashboards": [
            f"{scheme}://{LOOPBACK}:{port}"
            for port in cluster.ports.dashboards[: cluster.dashboards]
        ],
        "backend": without_password(cluster.backend_url),
        "bridge_metrics": [
            f"http://{LOOPBACK}:{port}/metrics" for _, _, port in cluster.active_bridges()
        ],
        "wsgate_metrics": [
            f"http://{LOOPBACK}:{port}/metrics"
            for port in cluster.ports.wsgate_metrics[: cluster.brokers]
        ],
        "device_http": [
            {"owntracks": f"{base}/v1/owntracks", "ndjson": f"{base}/v1/positions"}
            for base in cluster.gateway_urls()
        ],
        "gateway_metrics": [
            f"http://{LOOPBACK}:{port}/metrics"
            for port in cluster.ports.gateway_metrics[: cluster.dashboards]
        ],
        "ingest_metrics": f"http://{LOOPBACK}:{cluster.ports.ingest_metrics}/metrics",
        "rules_metrics": f"http://{LOOPBACK}:{cluster.ports.rules_metrics}/metrics",
        "supervisor_metrics": f"http://{LOOPBACK}:{cluster.ports.supervisor_metrics}/metrics",
        "scale": {
            "brokers": cluster.brokers,
            "bridges_per_broker": cluster.bridges_per_broker,
            "dashboards": cluster.dashboards,
        },
        # The supervisor (`teamtrack up`, which `teamtrack scale` talks to) and every child.
        "supervisor": os.getpid(),
        "processes": cluster.processes(),
    }
    if tls is not None:
        endpoints["ca"] = str(tls.ca_cert)
    return endpoints


def status_of(cluster: LocalCluster) -> Group:
    table = Table(title="teamtrack cluster", expand=False)
    table.add_column("process")
    table.add_column("state")
    table.add_column("restarts", justify="right")
    table.add_column("forwarded", justify="right")
    table.add_column("rejected", justify="right")
    metrics_by_role = {
        bridge_role(index, instance): ("bridge", port)
        for index, instance, port in cluster.ports.bridges()
    } | {
        f"gateway-{index + 1}": ("gateway", port)
        for index, port in enumerate(cluster.ports.gateway_metrics)
    }
    for child in cluster.children:
        state = "[green]running" if child.process.running() else "[red]stopped"
        forwarded = rejected = ""
        service, port = metrics_by_role.get(child.role, ("", 0))
        if port and child.process.running():
            counters = scrape_totals(f"http://{LOOPBACK}:{port}/metrics")
            forwarded = _count(counters, f"teamtrack_{service}_forwarded_total")
            rejected = _count(counters, f"teamtrack_{service}_rejected_total")
        table.add_row(child.role, state, str(child.restarts), forwarded, rejected)
    if cluster.options.backend_url is not None:
        probed = {None: "[yellow]probing", True: "[green]answering", False: "[red]down"}
        table.add_row("backend (external)", probed[cluster.backend_up], "-", "", "")
    return Group(table, f"logs: {cluster.logs_dir}   stop: Ctrl-C")


def _count(counters: dict[str, float], name: str) -> str:
    return f"{int(counters[name]):,}" if name in counters else "-"
