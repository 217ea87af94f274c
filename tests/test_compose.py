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
from rules.settings import RulesSettings
from teamtrack.cli import app
from teamtrack.settings import ENV_PREFIX, ServiceSettings
from wsgate.settings import GatewaySettings

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "bridge": BridgeSettings,
    "dashboard": DashboardSettings,
    "gateway": DeviceGatewaySettings,
    "ingest": IngestSettings,
    "rules": RulesSettings,
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
        "bridge", "bridge", "dashboard", "dashboard", "gateway", "ingest", "rules", "wsgate",
        "wsgate",
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
        for name in ("ingest", "rules", "dashboard-1", "dashboard-2")
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


SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"
ROOT = COMPOSE_FILE.parent


def test_the_file_is_valid_against_the_compose_specification() -> None:
    import json

    import jsonschema

    # The Compose Specification's own schema (draft 7), from github.com/compose-spec/compose-spec
    # (schema/compose-spec.json, Apache License 2.0).
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    validator.validate(document)
    # The check itself can fail: a misspelt key is refused.
    broken = {**document, "services": {**document["services"], "redis": {"imagee": "redis"}}}
    try:
        validator.validate(broken)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema let a misspelt key through")


def test_every_service_has_a_health_check_on_a_port_it_serves() -> None:
    defaults = {module: settings.model_fields for module, settings in SETTINGS.items()}
    for name, service in _services().items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        module = _module(service)
        if module is None:
            continue
        test = " ".join(check["test"])
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", test).group(1))  # type: ignore[union-attr]
        environment = service.get("environment", {})
        served = {
            int(environment.get("TEAMTRACK_PORT", 0)),
            defaults[module]["metrics_port"].default if "metrics_port" in defaults[module] else 0,
        }
        assert port in served, f"{name} checks port {port}, serves {served}"


def test_every_image_is_pinned_to_a_version() -> None:
    pinned = re.compile(r"^[\w./-]+:\d+\.\d+(\.\d+)?[\w.-]*(@sha256:[0-9a-f]{64})?$")
    images = [service["image"] for service in _services().values()
              if "image" in service and "build" not in service]
    for dockerfile in (ROOT / "Dockerfile", ROOT / "mosquitto" / "Dockerfile"):
        images += re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
    assert images
    for image in images:
        assert pinned.match(image), f"{image} is not pinned to a version"


def test_the_python_dependencies_are_locked_with_hashes() -> None:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for lock, extras in (("requirements.lock", ()), ("requirements-dev.lock", ("dev", "bench"))):
        text = (ROOT / lock).read_text()
        pins = {
            name.lower().replace("_", "-"): version
            for name, version in re.findall(
                r"^([A-Za-z0-9_.-]+)==([^\s;]+)(?: ;[^\\\n]*)? \\", text, re.MULTILINE
            )
        }
        blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text)
        assert all("--hash=sha256:" in block for block in blocks[1:]), f"{lock}: a pin lacks hashes"
        wanted = list(project["dependencies"])
        for extra in extras:
            wanted += project["optional-dependencies"][extra]
        for line in wanted:
            requirement = Requirement(line)
            name = requirement.name.lower().replace("_", "-")
            assert name in pins, f"{lock} does not pin {name} (run `make lock`)"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock} pins {name}=={pins[name]}, pyproject.toml asks {requirement.specifier}"
            )
    assert "--require-hashes -r requirements.lock" in (ROOT / "Dockerfile").read_text()
    # Both of make's installs (test: the dev lock; demo: the services' lock) check the hashes.
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(1)" in makefile
    assert "$(call install-lock,$(LOCK))" in makefile
    assert "$(call install-lock,$(RUN_LOCK))" in makefile
    assert re.search(r"^RUN_LOCK := requirements\.lock$", makefile, re.MULTILINE)
    assert re.search(r"^LOCK := requirements-dev\.lock$", makefile, re.MULTILINE)
