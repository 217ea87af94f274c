"""The servers a scenario runs on: started by the harness on free ports, or a running cluster.

* A lone broker: one Mosquitto with the provisioned password file and ACL, nothing else.
* A local cluster: `teamtrack.local.cluster.LocalCluster` (what `teamtrack up` starts) on free
  ports, without the simulator: 2 brokers, their bridges, the backend, 2 dashboard instances.
* A running cluster: its `endpoints.json`, and the state folder next to it for the credentials
  (`credentials.json`) and, if present, the pids of its processes (`processes.json`).

Every deployment lists its processes by role, so the harness can sample their CPU and memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from teamtrack.bench.config import BenchError
from teamtrack.bench.scenarios import DeploymentKind, DeploymentSpec
from teamtrack.local.cluster import ClusterError, ClusterOptions, LocalCluster
from teamtrack.local.mosquitto_config import render_broker_config
from teamtrack.local.servers import LOOPBACK, ServerError, free_port, start_mosquitto
from teamtrack.provision import (
    ACL_FILE,
    PASSWORD_FILE,
    Credentials,
    ProvisionError,
    load_credentials,
)

CLUSTER_BROKERS = 2
CLUSTER_DASHBOARDS = 2
# The backends a local cluster (`teamtrack up --backend ...`) starts by itself.
LOCAL_BACKENDS = ("redis", "kafka")
# Streams a device gateway of a bench cluster takes, all from loopback (the `many` shape's).
BENCH_GATEWAY_CONNECTIONS = 20_000


@dataclass
class Deployment:
    label: str
    broker_urls: list[str]
    dashboard_urls: list[str]
    credentials: Credentials
    processes: dict[str, int]
    # The bridges' /metrics pages: what they dropped on purpose (a bounded queue) is counted there.
    bridge_metrics_urls: list[str] = field(default_factory=list)
    # The device gateways' NDJSON stream URLs (`http` scenario).
    stream_urls: list[str] = field(default_factory=list)
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def broker_url(self, index: int) -> str:
        """The broker at `index`, or the last one when there are fewer."""
        return self.broker_urls[min(index, len(self.broker_urls) - 1)]

    def stream_url(self, index: int) -> str:
        if not self.stream_urls:
            raise BenchError(f"{self.label} has no device gateway")
        return self.stream_urls[min(index, len(self.stream_urls) - 1)]

    def dashboard_url(self, index: int) -> str:
        if not self.dashboard_urls:
            raise BenchError(f"{self.label} has no dashboard instance")
        return self.dashboard_urls[min(index, len(self.dashboard_urls) - 1)]

    def stop(self) -> None:
        self._stop()


def start_lone_broker(state_dir: Path, work_dir: Path) -> Deployment:
    """One Mosquitto using the password file and ACL provisioned in `state_dir`; its config,
    log and persistence go into `work_dir`."""
    credentials = load_credentials(state_dir)
    mqtt_port = free_port()
    config = render_broker_config(
        mqtt_port=mqtt_port,
        state_dir=work_dir,
        password_file=state_dir / PASSWORD_FILE,
        acl_file=state_dir / ACL_FILE,
        broker_name="bench-broker",
    )
    try:
        broker = start_mosquitto(config, mqtt_port)
    except ServerError as error:
        raise BenchError(f"the lone broker did not start: {error}") from None

    def stop() -> None:
        broker.stop()

    return Deployment(
        label="lone broker",
        broker_urls=[f"mqtt://{LOOPBACK}:{mqtt_port}"],
        dashboard_urls=[],
        credentials=credentials,
        processes={"broker": broker.pid},
        _stop=stop,
    )


def cluster_options(
    spec: DeploymentSpec, state_dir: Path, teams: int, workers_per_team: int,
    bridges_per_broker: int = 1,
    mirror: str = "on-demand",
) -> ClusterOptions:
    """The `teamtrack up` options of a cluster deployment (free ports, no simulator)."""
    if spec.backend not in LOCAL_BACKENDS:
        raise BenchError(
            f"the local cluster cannot start a {spec.backend!r} backend; "
            "run that cluster yourself and pass its --endpoints"
        )
    return ClusterOptions(
        state_dir=state_dir,
        backend=spec.backend,
        brokers=CLUSTER_BROKERS,
        bridges_per_broker=bridges_per_broker,
        mirror=mirror,
        dashboards=CLUSTER_DASHBOARDS,
        teams=teams,
        workers=workers_per_team,
        base_port=0,
        simulate=False,
        # A load test offers thousands of messages a second per connection, on purpose.
        device_rate_per_s=0.0,
        # ... and holds every worker's stream to a device gateway from one address.
        gateway_max_connections=BENCH_GATEWAY_CONNECTIONS,
    )


def start_local_cluster(
    spec: DeploymentSpec, state_dir: Path, teams: int, workers_per_team: int,
    bridges_per_broker: int = 1,
    mirror: str = "on-demand",
) -> Deployment:
    """What `teamtrack up --base-port 0 --no-simulate` starts, in this process's care."""
    options = cluster_options(
        spec, state_dir, teams, workers_per_team, bridges_per_broker, mirror
    )
    cluster = LocalCluster(options)
    try:
        cluster.start()
    except (ClusterError, ServerError, ProvisionError) as error:
        cluster.stop()
        raise BenchError(f"the {spec.label} did not start: {error}") from None
    assert cluster.provisioned is not None
    processes = {child.role: child.process.pid for child in cluster.children}

    def stop() -> None:
        cluster.stop()

    return Deployment(
        label=f"local {spec.label}",
        broker_urls=[f"mqtt://{LOOPBACK}:{port}" for port in cluster.ports.broker_mqtt],
        dashboard_urls=[f"http://{LOOPBACK}:{port}" for port in cluster.ports.dashboards],
        credentials=cluster.provisioned.credentials,
        processes=processes,
        bridge_metrics_urls=[
            f"http://{LOOPBACK}:{port}/metrics" for _, _, port in cluster.ports.bridges()
        ],
        stream_urls=[f"{base}/v1/positions" for base in cluster.gateway_urls()],
        _stop=stop,
    )


def backend_of(endpoints: dict[str, object]) -> str:
    """The backend kind of a running cluster, from its endpoints: "redis", "kafka", ..."""
    scheme = urlsplit(str(endpoints.get("backend", ""))).scheme
    return "redis" if scheme in ("rediss", "redis+sentinel") else scheme


def read_endpoints(path: Path) -> dict[str, object]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BenchError(f"{path}: cannot read the endpoints ({error})") from None
    if not isinstance(document, dict) or not document.get("brokers"):
        raise BenchError(f"{path}: not an endpoints.json of `teamtrack up` (no brokers)")
    return document


def running_cluster(spec: DeploymentSpec, endpoints_path: Path, state_dir: Path) -> Deployment:
    """A cluster someone else started; the harness never stops it."""
    endpoints = read_endpoints(endpoints_path)
    backend = backend_of(endpoints)
    if spec.kind is DeploymentKind.CLUSTER and spec.backend != backend:
        raise BenchError(
            f"{endpoints_path} is a cluster with a {backend!r} backend, not {spec.backend!r}"
        )
    try:
        credentials = load_credentials(state_dir)
    except ProvisionError as error:
        raise BenchError(str(error)) from None
    processes: dict[str, int] = {}
    processes_file = state_dir / "processes.json"
    if processes_file.exists():
        processes = {
            str(role): int(pid) for role, pid in json.loads(processes_file.read_text()).items()
        }
    brokers = endpoints["brokers"]
    dashboards = endpoints.get("dashboards") or []
    bridge_metrics = endpoints.get("bridge_metrics") or []
    gateways = endpoints.get("device_http") or []
    assert isinstance(brokers, list) and isinstance(dashboards, list)
    assert isinstance(bridge_metrics, list) and isinstance(gateways, list)
    return Deployment(
        label=f"running cluster ({backend}) of {endpoints_path}",
        broker_urls=[str(broker["mqtt"]) for broker in brokers],
        dashboard_urls=[str(url) for url in dashboards],
        credentials=credentials,
        processes={role: pid for role, pid in processes.items() if role != "simulator"},
        bridge_metrics_urls=[str(url) for url in bridge_metrics],
        stream_urls=[str(gateway["ndjson"]) for gateway in gateways],
    )
