"""docker-compose.yml cannot be run here (no Docker engine): what can be checked without one is
that it runs every service and only sets variables that its service's settings read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from bridge.settings import BridgeSettings
from dashboard.settings import DashboardSettings
from gateway.settings import GatewaySettings as DeviceGatewaySettings
from ingest.settings import IngestSettings
from teamtrack.cli import app
from teamtrack.settings import ENV_PREFIX, ServiceSettings
from wsgate.settings import GatewaySettings

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "bridge": BridgeSettings,
    "dashboard": DashboardSettings,
    "gateway": DeviceGatewaySettings,
    "ingest": IngestSettings,
    "wsgate": GatewaySettings,
}


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def _module(service: dict[str, Any]) -> str | None:
    command = " ".join(service.get("command") or [])
    match = re.search(r"python -m (\w+)", command)
    return match.group(1) if match else None


def test_every_service_of_the_cluster_runs() -> None:
    modules = sorted(
        module for service in _services().values() if (module := _module(service)) is not None
    )
    assert modules == [
        "bridge", "bridge", "dashboard", "dashboard", "gateway", "ingest", "wsgate", "wsgate"
    ]
    assert {"redis", "mosquitto-1", "mosquitto-2"} <= set(_services())


def test_mqtt_over_websockets_is_published_by_the_gateways_not_the_brokers() -> None:
    services = _services()
    for index in (1, 2):
        broker, gateway = services[f"mosquitto-{index}"], services[f"wsgate-{index}"]
        assert [port.split(":")[-1] for port in broker["ports"]] == ["1883"]
        assert gateway["environment"]["TEAMTRACK_BROKER_URL"] == f"mqtt://mosquitto-{index}:1883"
        assert gateway["ports"] == [f"127.0.0.1:900{index}:9001"]


def test_the_device_gateway_reads_the_brokers_password_file_and_publishes_on_loopback() -> None:
    gateway = _services()["gateway"]
    environment = gateway["environment"]
    assert environment["TEAMTRACK_PASSWORD_FILE"] == "/state/mosquitto.passwd"
    assert "credentials.json" not in str(gateway)  # devices' hashes only, never a plaintext
    assert gateway["ports"] == ["127.0.0.1:8080:8080"]


def test_every_variable_is_a_setting_of_its_service() -> None:
    for name, service in _services().items():
        module = _module(service)
        if module is None:
            continue
        fields = SETTINGS[module].model_fields
        for variable in service["environment"]:
            # Read by the start script, not by the settings.
            if variable == f"{ENV_PREFIX}MQTT_PASSWORD" or not variable.startswith(ENV_PREFIX):
                continue
            setting = variable.removeprefix(ENV_PREFIX).lower()
            assert setting in fields, f"{name}: {variable} is not a setting of {module}"


def test_the_ingest_and_the_dashboards_share_the_history() -> None:
    services = _services()
    urls = {
        name: services[name]["environment"]["TEAMTRACK_DATABASE_URL"]
        for name in ("ingest", "dashboard-1", "dashboard-2")
    }
    assert len(set(urls.values())) == 1
    for name in urls:
        assert "./state/history:/history" in services[name]["volumes"]


def test_provisioning_for_compose_makes_the_history_folder(tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    runner = CliRunner()
    made = runner.invoke(app, ["registry", "--out", str(registry), "--teams", "1"])
    assert made.exit_code == 0, made.output
    out = tmp_path / "state"
    result = runner.invoke(
        app, ["provision", "--registry", str(registry), "--out", str(out), "--compose"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "history").is_dir()
    assert (out / "compose" / "mosquitto-1.conf").is_file()
