"""`teamtrack credentials`: one secret of a provisioned folder, printed alone or in a 0600 file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teamtrack.cli import app
from teamtrack.provision import load_credentials, provision
from teamtrack.registry import demo_registry


@pytest.fixture
def state(tmp_path: Path) -> Path:
    provision(demo_registry(2, 2), tmp_path / "state", tls=False)
    return tmp_path / "state"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["credentials", *args])
    return result.exit_code, result.stdout, result.stderr


def test_a_managers_password_token_and_mqtt_login_are_printed_alone(state: Path) -> None:
    credentials = load_credentials(state)
    lead = credentials.manager("alpha-lead")
    printed = run("--state-dir", str(state), "--manager", "alpha-lead")
    assert printed == (0, lead.password + "\n", "")
    assert run("--state-dir", str(state), "--team", "alpha", "--token")[1] == lead.token + "\n"
    assert run("--state-dir", str(state), "--team", "alpha", "--mqtt")[1] == (
        lead.mqtt_password + "\n"
    )


def test_files_are_written_for_the_owner_alone_and_never_overwritten(state: Path) -> None:
    credentials = load_credentials(state)
    header = state / "headers" / "alpha.header"
    code, printed, _ = run("--state-dir", str(state), "--team", "alpha", "--token",
                           "--out", str(header))
    assert code == 0 and printed == ""  # nothing secret on the terminal
    token = credentials.manager("alpha-lead").token
    assert header.read_text() == f"Authorization: Bearer {token}\n"
    assert stat.S_IMODE(header.stat().st_mode) == 0o600
    again = run("--state-dir", str(state), "--team", "alpha", "--token", "--out", str(header))
    assert again[0] == 2
    options = state / "w001" / "mosquitto_pub"
    assert run("--state-dir", str(state), "--device", "alpha/w001", "--out", str(options))[0] == 0
    device = credentials.device("alpha", "w001")
    assert options.read_text() == f"-V mqttv5\n-u {device.username}\n-P {device.password}\n"


def test_an_unknown_or_ambiguous_account_is_a_clear_error(state: Path) -> None:
    code, printed, error = run("--state-dir", str(state), "--manager", "nobody")
    assert code == 2 and printed == "" and "alpha-lead" in error
    assert run("--state-dir", str(state), "--device", "alpha/w999")[0] == 2
    code, _, error = run("--state-dir", str(state), "--observer", "--team", "alpha")
    assert code == 2 and "name one account" in error
