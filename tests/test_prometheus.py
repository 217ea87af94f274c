"""deploy/prometheus against a real Prometheus (Debian's package) scraping `teamtrack up`.

promtool checks the shipped rules and configuration and runs the rules' unit tests. Then one
`teamtrack up --no-simulate`, a Prometheus on a free loopback port reading the shipped
configuration (only the target file, the rule file's path and the intervals changed), a viewer on
dashboard 2 and a device publishing on broker 1; the device-to-viewer latency, the bridges' and
the ingest's lag and the supervisor's restart count are read back through Prometheus' HTTP API,
and every expression of the Grafana dashboard is checked to name metrics the services export.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
import yaml
from mqtt_tools import publish_lines
from test_end_to_end import WAIT, RunningCluster, cluster_running

from teamtrack.contract import position_topic
from teamtrack.local.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana" / "teamtrack.json"
# Named by the Grafana dashboard and exported by no process yet (none now: the rules service
# exports teamtrack_rules_alerts_total).
PENDING_METRICS: set[str] = set()
LATENCY_P99 = (
    'histogram_quantile(0.99, sum by (team, le) '
    '(rate(teamtrack_dashboard_latency_seconds_bucket{team="alpha"}[1m])))'
)
LATENCY_P50 = LATENCY_P99.replace("0.99", "0.5", 1)
BRIDGE_LAG_P99 = (
    "histogram_quantile(0.99, sum by (broker, le) "
    '(rate(teamtrack_bridge_lag_seconds_bucket{broker="b1"}[1m])))'
)
INGEST_LAG_P99 = (
    "histogram_quantile(0.99, sum by (le) (rate(teamtrack_ingest_lag_seconds_bucket[1m])))"
)

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (make system-deps installs it)",
)


def test_promtool_accepts_the_rules_and_the_configuration_and_the_rules_pass_their_tests() -> None:
    for command in (
        ["promtool", "check", "rules", "rules.yml"],
        ["promtool", "check", "config", "prometheus.yml"],
        ["promtool", "test", "rules", "rules_test.yml"],
    ):
        result = subprocess.run(command, cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=5)

    def get(self, path: str, **params: str) -> Any:
        response = self.client.get(path, params=params)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr)["result"])

    def wait_for(self, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The query's result once it holds a finite value."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result and all(math.isfinite(float(item["value"][1])) for item in result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no value for {expr} within {timeout}s: {result}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    with cluster_running(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def prometheus(
    running: RunningCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "rules.yml")]
    (job,) = config["scrape_configs"]
    targets = running.state_dir / "prometheus" / "targets.json"
    job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            "prometheus", f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if server.client.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield server
    finally:
        server.client.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _every_target_up(prometheus: Prometheus, running: RunningCluster) -> set[str]:
    groups = json.loads((running.state_dir / "prometheus" / "targets.json").read_text())
    roles = {group["labels"]["role"] for group in groups}
    expected = {"supervisor", "bridge-1", "bridge-2", "wsgate-1", "wsgate-2", "gateway-1",
                "gateway-2", "dashboard-1", "dashboard-2", "ingest", "rules"}
    assert roles == expected
    deadline = time.monotonic() + 20
    while True:
        up = {item["metric"]["role"]: item["value"][1] for item in prometheus.query("up")}
        if set(up) == roles and set(up.values()) == {"1"}:
            return roles
        assert time.monotonic() < deadline, f"targets not all up: {up}"
        time.sleep(0.5)


async def _publish_with_a_viewer(running: RunningCluster, rounds: int, per_round: int) -> int:
    """A device on broker 1 publishes `rounds` bursts; a manager of its team on dashboard 2
    reads them; returns the positions the manager got."""
    headers = {"Authorization": f"Bearer {running.token_of('alpha')}"}
    device = running.credentials.device("alpha", "w001")
    got = 0
    async with websockets.connect(
        running.dashboard_ws(1, "alpha"), additional_headers=headers, open_timeout=WAIT
    ) as socket:
        assert json.loads(await asyncio.wait_for(socket.recv(), WAIT))["type"] == "snapshot"
        await asyncio.sleep(1.5)  # a scrape of the team's histogram at 0 first
        for round_ in range(rounds):
            payloads = [
                orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": int(time.time() * 1000),
                              "seq": round_ * per_round + index})
                for index in range(per_round)
            ]
            result = await publish_lines(
                running.broker_port(0), device.username, device.password,
                position_topic("alpha", "w001"), payloads,
            )
            assert result.returncode == 0, result.stderr
            await asyncio.sleep(0.4)
        deadline = time.monotonic() + WAIT
        while got < rounds * per_round and time.monotonic() < deadline:
            frame = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
            if frame["type"] == "events":
                got += sum(1 for event in frame["events"] if event["k"] == "p")
    return got


def _exported_names(running: RunningCluster) -> set[str]:
    """Every metric name the cluster's /metrics pages declare (series or not yet)."""
    names: set[str] = set()
    groups = json.loads((running.state_dir / "prometheus" / "targets.json").read_text())
    for group in groups:
        text = httpx.get(f"http://{group['targets'][0]}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                suffixes = {"counter": ("", "_total"), "histogram": ("_bucket", "_sum", "_count"),
                            "summary": ("", "_sum", "_count")}.get(kind, ("",))
                names.update(name + suffix for suffix in suffixes)
    return names


_METRIC = re.compile(r"\b((?:teamtrack|process|python)_[a-z0-9_]+|up)\b(?=\s*[{\[)])")


def test_prometheus_reads_latency_lag_and_restarts_from_teamtrack_up(
    running: RunningCluster, prometheus: Prometheus
) -> None:
    roles = _every_target_up(prometheus, running)
    rules = prometheus.get("/api/v1/rules")["groups"]
    assert {group["name"] for group in rules} == {
        "teamtrack-latency", "teamtrack-lag", "teamtrack-loss", "teamtrack-brokers",
        "teamtrack-supervisor",
    }
    assert all(rule["health"] == "ok" for group in rules for rule in group["rules"])

    shown = asyncio.run(_publish_with_a_viewer(running, rounds=6, per_round=20))
    assert shown == 120

    p99 = float(prometheus.wait_for(LATENCY_P99)[0]["value"][1])
    p50 = float(prometheus.wait_for(LATENCY_P50)[0]["value"][1])
    frames = prometheus.wait_for('teamtrack_dashboard_latency_seconds_count{team="alpha"} > 0')
    bridge_lag = prometheus.wait_for(BRIDGE_LAG_P99)
    ingest_lag = float(prometheus.wait_for(INGEST_LAG_P99)[0]["value"][1])
    assert 0 < p50 <= p99 < 5
    assert [item["metric"]["role"] for item in frames] == ["dashboard-2"]
    assert 0 < float(bridge_lag[0]["value"][1]) < 5
    assert 0 < ingest_lag < 10
    print(
        f"through Prometheus: device-to-viewer p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms;"
        f" bridge b1 lag p99 {float(bridge_lag[0]['value'][1]) * 1000:.1f} ms;"
        f" ingest lag p99 {ingest_lag * 1000:.1f} ms"
    )

    # A child killed: the supervisor restarts it and counts it.
    pids = json.loads((running.state_dir / "processes.json").read_text())
    os.kill(pids["wsgate-2"], signal.SIGKILL)
    prometheus.wait_for('teamtrack_supervisor_restarts_total{child="wsgate-2"} == 1')

    # Every metric the Grafana dashboard and the rules name is exported by some service.
    dashboard = json.loads(GRAFANA.read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(expressions) > 20
    known = _exported_names(running) | {
        item for item in prometheus.get("/api/v1/label/__name__/values")
    }
    named = {name for expr in expressions for name in _METRIC.findall(expr)}
    assert named - known == PENDING_METRICS, named - known
    rule_names = {
        name
        for group in rules
        for rule in group["rules"]
        for name in _METRIC.findall(rule["query"])
    }
    assert rule_names - known == set(), rule_names - known
    assert roles  # every process was scraped
