"""One help style for `teamtrack` and every `python -m` service: a summary line, lower-case
`<type>` placeholders, `[default: …]` and (for settings) `[env var: TEAMTRACK_…]` notes; and
the `--backend-url` help names every backend scheme."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from bridge.settings import BridgeSettings
from dashboard.settings import DashboardSettings
from devices.__main__ import build_parser
from gateway.settings import GatewaySettings
from ingest.settings import IngestSettings
from rules.settings import RulesSettings
from teamtrack.backends import SCHEMES
from teamtrack.bench.scenarios import FAULTS, SCENARIOS, SPIKE
from teamtrack.cli import app
from teamtrack.settings import ServiceSettings, load_settings
from wsgate.settings import GatewaySettings as WsGatewaySettings

SERVICES: dict[str, type[ServiceSettings]] = {
    "bridge": BridgeSettings, "ingest": IngestSettings, "dashboard": DashboardSettings,
    "wsgate": WsGatewaySettings, "gateway": GatewaySettings, "rules": RulesSettings,
}
# What only the old styles printed: argparse's `(default: x)`, pydantic-settings' type names,
# enum member names, upper-case placeholders.
OLD_STYLE = re.compile(r"\(default|\{Path|SecretStr|ON_DEMAND|--[a-z-]+ (?:str|int|float|[A-Z]+)\b")


def service_help(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        load_settings(SERVICES[name], f"python -m {name}", ["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_prints_the_shared_style(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = service_help(name, capsys)
    usage, _, rest = text.partition("\n\n")
    summary = rest.splitlines()[0]
    assert usage.startswith(f"usage: python -m {name}")
    assert summary and not summary.startswith("options"), "a one-line summary"
    assert "--backend-url <str>" in text and "--log-level <str>" in text
    assert "[default: INFO]" in " ".join(text.split())
    assert "[env var: TEAMTRACK_LOG_LEVEL]" in " ".join(text.split())
    assert not OLD_STYLE.search(text), OLD_STYLE.search(text)


def test_placeholders_say_the_type(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(service_help("bridge", capsys).split())
    for flag in ("--instance <int>", "--batch-interval-ms <float>", "--duty-file <path>",
                 "--mqtt-password <secret>", "--mirror {all,off,on-demand}",
                 "--shared-subscription, --no-shared-subscription"):
        assert flag in text
    assert "[default: 1]" in text  # --instance
    assert "[default: ]" not in text and "[default: null]" not in text


def test_every_secret_shows_as_one(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(service_help("rules", capsys).split())
    assert "--webhook-secret <secret>" in text


def test_bench_help_names_every_scenario() -> None:
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    listed = text.partition("--scenarios")[2].partition("--rates")[0]
    for name in (*SCENARIOS, FAULTS, SPIKE):
        assert name in listed, name
    assert f"[default: {','.join(SCENARIOS)}]" in listed
    assert "(default" not in text, "the shared style: [default: ...]"


def test_the_backend_url_help_names_every_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    text = "".join(service_help("dashboard", capsys).split())
    for scheme in SCHEMES:
        assert f"{scheme}://" in text


def test_the_simulator_and_teamtrack_use_the_same_style() -> None:
    devices = " ".join(build_parser().format_help().split())
    assert "--credentials <path>" in devices and "--teams <int>" in devices
    assert "--interval <float> seconds between fixes [default: 1.0]" in devices
    assert not OLD_STYLE.search(devices)
    runner = CliRunner()
    result = runner.invoke(app, ["up", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<int>" in result.output and "[default:" in result.output
    assert "[env var: TEAMTRACK_" in result.output


def _command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf command of a typer app (a group has `commands`)."""
    commands = getattr(command, "commands", None)
    if isinstance(commands, dict):
        return [found for name, sub in sorted(commands.items())
                for found in _command_paths(sub, (*path, name))]
    return [path]


def test_every_teamtrack_command_writes_defaults_one_way() -> None:
    """`[default: …]` after the description everywhere: `teamtrack up --help` said both
    "(default: plain HTTP, …)" and "[default: no-https]"."""
    paths = _command_paths(typer.main.get_command(app))
    assert ("history", "erase") in paths and ("bench",) in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0, (path, result.output)
        text = " ".join(result.output.replace("│", " ").split())
        assert "(default" not in text, (path, text[text.index("(default") - 80:][:200])
