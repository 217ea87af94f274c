"""Enrolment of real phones running OwnTracks: the `.otrc` they import, and its QR code read back
with a real decoder (zbarimg, Debian's zbar-tools)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit

import pytest
from typer.testing import CliRunner

from teamtrack.cli import app
from teamtrack.enrolment import (
    ENROL_DIR,
    SHEET_FILE,
    Destination,
    EnrolmentError,
    config_url,
    destination_for,
    enrol_device,
    enrol_team,
    owntracks_configuration,
    read_config_url,
    resolve_destinations,
    tracker_id,
)
from teamtrack.local.mosquitto_config import MqttsListener, render_broker_config
from teamtrack.local.servers import LOOPBACK, free_port, start_mosquitto
from teamtrack.provision import ProvisionResult, provision, revoke_account
from teamtrack.registry import parse_registry
from teamtrack.tls import client_ssl_context

PUBLIC_HOST = "tracks.example.org"
# Every configuration key the OwnTracks booklet (tech/json, `_type=configuration`) documents
# for iOS or Android, plus those the Android app's preferences define: the app ignores others,
# so a misspelt key would silently do nothing.
OWNTRACKS_KEYS = {
    "_type", "adapt", "allowRemoteLocation", "allowinvalidcerts", "auth", "autostartOnBoot",
    "cleanSession", "clientId", "clientpkcs", "cmd", "connectionTimeoutSeconds", "days",
    "debugLog", "deviceId", "downgrade", "encryptionKey", "extendedData", "host", "httpHeaders",
    "ignoreInaccurateLocations", "ignoreStaleLocations", "keepalive", "locatorDisplacement",
    "locatorInterval", "locatorPriority", "locked", "maxHistory", "mode", "monitoring",
    "moveModeLocatorInterval", "mqttProtocolLevel", "notificationLocation", "opencageApiKey",
    "osmCopyright", "osmTemplate", "passphrase", "password", "pegLocatorFastestIntervalToInterval",
    "ping", "port", "positions", "pubQos", "pubRetain", "pubTopicBase", "ranging",
    "remoteConfiguration", "sub", "subQos", "subTopic", "tid", "tls", "url", "username", "ws",
    "waypoints",
}  # fmt: skip
MQTT_MODE = 0
HTTP_MODE = 3


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def zbarimg(png: Path) -> list[str]:
    """Every QR code zbarimg finds in the image, as text."""
    executable = shutil.which("zbarimg")
    assert executable is not None, "zbarimg not found: `make system-deps` installs zbar-tools"
    completed = subprocess.run(
        [executable, "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable", str(png)],
        capture_output=True, check=True, timeout=60,
    )
    return completed.stdout.decode("utf-8").splitlines()


@pytest.fixture
def issued(tmp_path: Path) -> ProvisionResult:
    registry = parse_registry(
        {
            "teams": [
                {"id": "alpha", "worker_count": 3, "managers": ["alpha-lead"]},
                {"id": "bravo", "workers": ["amelie"], "managers": ["bravo-lead"]},
            ],
            "bridges": ["bridge-1"],
            "tls_hosts": [PUBLIC_HOST],
        }
    )
    return provision(registry, tmp_path / "state")


def write_endpoints(state: Path, document: dict[str, Any]) -> None:
    (state / "endpoints.json").write_text(json.dumps(document))


def loopback_endpoints(ports: tuple[int, ...] = (18832, 18842)) -> dict[str, Any]:
    """What `teamtrack up` lists with its mqtts listeners on loopback (the default)."""
    return {
        "brokers": [
            {"mqtt": f"mqtt://127.0.0.1:{port - 2}", "ws": f"ws://127.0.0.1:{port - 1}",
             "mqtts": f"mqtts://127.0.0.1:{port}"}
            for port in ports
        ],
        "ca": "state/tls/ca.crt",
        "device_http": [
            {"owntracks": "https://127.0.0.1:18950/v1/owntracks",
             "ndjson": "https://127.0.0.1:18950/v1/positions"}
        ],
    }


def mqtt_destination(port: int = 8883) -> Destination:
    return Destination(mode="mqtt", host=PUBLIC_HOST, port=port, tls=True)


# The configuration --------------------------------------------------------------------------


def test_otrc_is_an_owntracks_mqtt_configuration(issued: ProvisionResult) -> None:
    device = issued.credentials.device("alpha", "w002")
    enrolled = enrol_device(issued.out_dir, device, mqtt_destination(18832))

    assert enrolled.otrc == issued.out_dir / ENROL_DIR / "alpha" / "w002.otrc"
    config = json.loads(enrolled.otrc.read_text(encoding="utf-8"))
    assert set(config) <= OWNTRACKS_KEYS, set(config) - OWNTRACKS_KEYS
    assert config["_type"] == "configuration"
    assert config["mode"] == MQTT_MODE and type(config["mode"]) is int
    assert config["host"] == PUBLIC_HOST
    assert config["port"] == 18832 and type(config["port"]) is int
    assert config["tls"] is True and config["ws"] is False
    assert config["auth"] is True
    assert config["username"] == "alpha.w002" == device.username
    assert config["password"] == device.password
    # The brokers force client id = username; the app is told the same.
    assert config["clientId"] == device.username
    assert config["deviceId"] == "w002"
    assert config["tid"] == "02"
    # owntracks/{username}/{device}: the topic the brokers accept from this account.
    topic = config["pubTopicBase"].replace("%u", config["username"]).replace(
        "%d", config["deviceId"]
    )
    assert topic == "owntracks/alpha.w002/w002"
    assert config["pubQos"] == 1 and config["pubRetain"] is False
    assert config["cleanSession"] is False
    assert config["mqttProtocolLevel"] in (3, 4)
    assert isinstance(config["keepalive"], int) and 30 <= config["keepalive"] <= 600
    assert config["monitoring"] == 2  # move
    for key in ("locatorInterval", "locatorDisplacement", "moveModeLocatorInterval"):
        assert type(config[key]) is int and config[key] > 0
    # Nothing the phone would take orders from, and no friends to read.
    assert config["cmd"] is False and config["remoteConfiguration"] is False
    assert config["sub"] is False and config["ranging"] is False
    assert config["subTopic"] == f"{topic}/cmd"
    assert "url" not in config


def test_http_mode_configuration(issued: ProvisionResult) -> None:
    device = issued.credentials.device("bravo", "amelie")
    url = f"https://{PUBLIC_HOST}:8443/v1/owntracks"
    destination = Destination(mode="http", host=PUBLIC_HOST, port=8443, tls=True, url=url)

    config = owntracks_configuration(device, destination, monitoring="significant")

    assert set(config) <= OWNTRACKS_KEYS
    assert config["mode"] == HTTP_MODE
    assert config["url"] == url
    assert config["auth"] is True
    assert (config["username"], config["password"]) == (device.username, device.password)
    assert (config["deviceId"], config["tid"]) == ("amelie", "IE")
    assert config["monitoring"] == 1
    # The MQTT settings belong to the other mode: left out, not carried along.
    assert not {"host", "port", "tls", "clientId", "pubTopicBase"} & set(config)


def test_tracker_ids_are_two_letters_or_digits() -> None:
    assert tracker_id("w001") == "01"
    assert tracker_id("amelie") == "IE"
    assert tracker_id("van-7") == "N7"
    assert tracker_id("a_") == "A"
    assert tracker_id("x") == "X"


def test_inline_url_survives_the_android_and_the_ios_decoding() -> None:
    """Android URL-decodes the query (a `+` becomes a space) before its strict base64 decoder
    sees it; iOS percent-decodes only. Standard base64, padded, percent-encoded suits both."""
    for attempt in range(10_000):
        config = {"_type": "configuration", "password": f"p>?~{attempt}", "tid": "ÿ"}
        url = config_url(config)
        encoded = unquote(url.removeprefix("owntracks:///config?inline="))
        if "+" in encoded and "/" in encoded and encoded.endswith("="):
            break
    else:
        raise AssertionError("no sample with +, / and padding")

    assert url.startswith("owntracks:///config?inline=")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("owntracks", "", "/config")
    raw = parts.query.removeprefix("inline=")
    assert re.fullmatch(r"[A-Za-z0-9%]+", raw), raw
    for decode in (unquote_plus, unquote):  # Android, iOS
        payload = base64.b64decode(decode(raw), validate=True)
        assert json.loads(payload) == config
    assert read_config_url(url) == config


def test_read_config_url_rejects_what_the_apps_reject() -> None:
    inline = quote(base64.b64encode(b'{"_type":"configuration"}').decode(), safe="")
    assert read_config_url(f"owntracks:///config?inline={inline}") == {"_type": "configuration"}
    for bad in (
        "https://example.org/config?inline=e30=",
        f"owntracks:///beacon?inline={inline}",
        "owntracks:///config?url=https://example.org/x.otrc",
        "owntracks:///config?inline=e30+",  # a raw + reaches Android's decoder as a space
        "owntracks:///config?inline=WzFd",  # JSON, but no configuration
    ):
        with pytest.raises(EnrolmentError):
            read_config_url(bad)


# The files and the QR codes ------------------------------------------------------------------


def test_qr_code_decodes_back_to_the_configuration(issued: ProvisionResult) -> None:
    device = issued.credentials.device("alpha", "w001")
    enrolled = enrol_device(issued.out_dir, device, mqtt_destination())

    [text] = zbarimg(enrolled.png)

    assert text.startswith("owntracks:///config?inline=")
    otrc = json.loads(enrolled.otrc.read_text(encoding="utf-8"))
    assert read_config_url(text) == otrc
    assert otrc["password"] == device.password


def test_files_are_the_devices_own(issued: ProvisionResult) -> None:
    device = issued.credentials.device("alpha", "w003")
    enrolled = enrol_device(issued.out_dir, device, mqtt_destination())

    assert mode_of(enrolled.otrc) == 0o600
    assert mode_of(enrolled.png) == 0o600
    assert mode_of(enrolled.otrc.parent) == 0o700
    assert mode_of(issued.out_dir / ENROL_DIR) == 0o700
    # Nothing else (no temporary file that held the password) is left behind.
    assert sorted(path.name for path in enrolled.otrc.parent.iterdir()) == [
        "w003.otrc", "w003.png"
    ]
    # Enrolling again (after a password rotation) replaces both, still private.
    again = enrol_device(issued.out_dir, device, mqtt_destination(18842))
    assert json.loads(again.otrc.read_text())["port"] == 18842
    assert mode_of(again.otrc) == 0o600


def test_team_sheet_holds_a_qr_code_per_worker_and_no_password(
    issued: ProvisionResult, tmp_path: Path
) -> None:
    destinations = (mqtt_destination(18832), mqtt_destination(18842))
    team = enrol_team(issued.out_dir, issued.credentials, "alpha", destinations)

    assert [device.worker for device in team.devices] == ["w001", "w002", "w003"]
    assert team.sheet == issued.out_dir / ENROL_DIR / "alpha" / SHEET_FILE
    assert mode_of(team.sheet) == 0o600
    html = team.sheet.read_text(encoding="utf-8")
    passwords = [issued.credentials.device("alpha", w).password for w in ("w001", "w002",
                                                                              "w003")]
    assert not any(password in html for password in passwords)
    # Self-contained: every image inline, nothing fetched from anywhere.
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3
    for worker in ("w001", "w002", "w003"):
        assert worker in html
    decoded = []
    for index, image in enumerate(images):
        png = tmp_path / f"sheet-{index}.png"
        png.write_bytes(base64.b64decode(image))
        [text] = zbarimg(png)
        decoded.append(read_config_url(text))
    assert [config["password"] for config in decoded] == passwords
    assert [config["deviceId"] for config in decoded] == ["w001", "w002", "w003"]
    # Every worker's own files too, each pointing at one of the brokers.
    for device in team.devices:
        config = json.loads(device.otrc.read_text())
        assert config["port"] in (18832, 18842)
        assert config["port"] == destination_for(destinations, config["username"]).port
        assert mode_of(device.png) == 0o600


def test_team_enrolment_removes_files_of_workers_gone(issued: ProvisionResult) -> None:
    folder = issued.out_dir / ENROL_DIR / "alpha"
    folder.mkdir(parents=True)
    (folder / "w099.otrc").write_text("{}")
    (folder / "w099.png").write_bytes(b"")
    (folder / "notes.txt").write_text("kept")

    team = enrol_team(issued.out_dir, issued.credentials, "alpha",
                      (mqtt_destination(),))

    assert team.removed == ("w099",)
    assert not (folder / "w099.otrc").exists() and not (folder / "w099.png").exists()
    assert (folder / "notes.txt").exists()


def test_devices_spread_over_the_brokers_stably() -> None:
    destinations = tuple(mqtt_destination(port) for port in (18832, 18842, 18852))
    chosen = {destination_for(destinations, f"alpha.w{n:03d}").port for n in range(60)}
    assert chosen == {18832, 18842, 18852}
    assert destination_for(destinations, "alpha.w007") == destination_for(
        destinations, "alpha.w007"
    )


# Where the phones connect --------------------------------------------------------------------


def test_loopback_endpoints_need_the_public_host(issued: ProvisionResult) -> None:
    state = issued.out_dir
    write_endpoints(state, loopback_endpoints())

    with pytest.raises(EnrolmentError, match="--host"):
        resolve_destinations(state)
    destinations = resolve_destinations(state, host=PUBLIC_HOST)
    assert destinations == (mqtt_destination(18832), mqtt_destination(18842))


def test_public_endpoints_need_no_host(issued: ProvisionResult) -> None:
    state = issued.out_dir
    write_endpoints(state, {"brokers": [{"mqtts": f"mqtts://{PUBLIC_HOST}:8883"}]})
    assert resolve_destinations(state) == (mqtt_destination(8883),)


def test_host_must_be_named_by_the_servers_certificate(issued: ProvisionResult) -> None:
    with pytest.raises(EnrolmentError, match="tls-hosts"):
        resolve_destinations(issued.out_dir, host="elsewhere.example.org", port=8883)
    assert resolve_destinations(
        issued.out_dir, host="elsewhere.example.org", port=8883, check_certificate=False
    ) == (Destination(mode="mqtt", host="elsewhere.example.org", port=8883, tls=True),)
    for loopback in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        with pytest.raises(EnrolmentError, match="phones"):
            resolve_destinations(issued.out_dir, host=loopback, port=8883)


def test_without_endpoints_the_port_is_needed(issued: ProvisionResult) -> None:
    with pytest.raises(EnrolmentError, match="--port"):
        resolve_destinations(issued.out_dir, host=PUBLIC_HOST)
    with pytest.raises(EnrolmentError, match="--port"):
        resolve_destinations(issued.out_dir, host=PUBLIC_HOST, tls=False)


def test_http_destinations(issued: ProvisionResult) -> None:
    state = issued.out_dir
    with pytest.raises(EnrolmentError, match="--http-url"):
        resolve_destinations(state, mode="http", host=PUBLIC_HOST)
    write_endpoints(state, loopback_endpoints())
    with pytest.raises(EnrolmentError, match="--host"):
        resolve_destinations(state, mode="http")

    [from_endpoints] = resolve_destinations(state, mode="http", host=PUBLIC_HOST)
    assert from_endpoints.url == f"https://{PUBLIC_HOST}:18950/v1/owntracks"
    assert (from_endpoints.host, from_endpoints.port) == (PUBLIC_HOST, 18950)

    url = "https://gateway.example.net/teamtrack/v1/owntracks"
    [explicit] = resolve_destinations(state, mode="http", http_url=url)
    assert (explicit.url, explicit.host, explicit.port) == (url, "gateway.example.net", 443)
    with pytest.raises(EnrolmentError, match="https"):
        resolve_destinations(state, mode="http", http_url="http://gateway.example.net/v1/owntracks")


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def mqtt_311_login(config: dict[str, Any], ca: Path, address: str, port: int) -> int:
    """Log in the way the app does with `config` (MQTT 3.1.1 over TLS, the CA in the phone's
    trust store, the host name checked against the certificate), reaching `config["host"]` at
    `address`; the CONNACK's return code (0: accepted)."""
    flags = 0x80 | 0x40 | (0x02 if config["cleanSession"] else 0)
    variable = _utf8("MQTT") + bytes([config["mqttProtocolLevel"], flags])
    variable += config["keepalive"].to_bytes(2, "big")
    payload = _utf8(config["clientId"]) + _utf8(config["username"]) + _utf8(config["password"])
    remaining = len(variable) + len(payload)
    assert remaining < 128
    context = client_ssl_context(ca)
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=config["host"]) as tls,
    ):
        tls.sendall(bytes([0x10, remaining]) + variable + payload)
        connack = tls.recv(4)
    assert connack[:2] == b"\x20\x02", connack
    return connack[3]


def test_the_configuration_logs_in_to_a_real_broker(issued: ProvisionResult) -> None:
    assert issued.tls is not None
    mqtt_port, mqtts_port = free_port(), free_port()
    config_file = render_broker_config(
        mqtt_port=mqtt_port, state_dir=issued.out_dir / "brokers",
        password_file=issued.password_file, acl_file=issued.acl_file, broker_name="b1",
        mqtts=MqttsListener(port=mqtts_port, certfile=issued.tls.server_cert,
                            keyfile=issued.tls.server_key, cafile=issued.tls.ca_cert),
    )
    broker = start_mosquitto(config_file, mqtt_port)
    try:
        broker.wait_for_port(LOOPBACK, mqtts_port)
        write_endpoints(issued.out_dir, {"brokers": [{"mqtts": f"mqtts://127.0.0.1:{mqtts_port}"}]})
        [destination] = resolve_destinations(issued.out_dir, host=PUBLIC_HOST)
        device = issued.credentials.device("alpha", "w001")
        config = json.loads(enrol_device(issued.out_dir, device, destination).otrc.read_text())

        # The phone resolves tracks.example.org to this machine; here it is 127.0.0.1.
        assert mqtt_311_login(config, issued.tls.ca_cert, LOOPBACK, config["port"]) == 0
        assert mqtt_311_login({**config, "password": "wrong"}, issued.tls.ca_cert, LOOPBACK,
                              config["port"]) != 0
        with pytest.raises(ssl.SSLCertVerificationError):
            mqtt_311_login({**config, "host": "elsewhere.example.org"}, issued.tls.ca_cert,
                           LOOPBACK, config["port"])
    finally:
        broker.stop()


# The command line ------------------------------------------------------------------------------


def test_cli_enrol_writes_the_files_and_prints_no_password(
    issued: ProvisionResult,
) -> None:
    state = issued.out_dir
    write_endpoints(state, loopback_endpoints())

    result = CliRunner().invoke(
        app, ["provision", "enrol", "alpha", "w001", "--out", str(state), "--host", PUBLIC_HOST]
    )

    assert result.exit_code == 0, result.output
    folder = state / ENROL_DIR / "alpha"
    assert str(folder / "w001.otrc") in result.output
    assert str(folder / "w001.png") in result.output
    assert issued.credentials.device("alpha", "w001").password not in result.output
    config = json.loads((folder / "w001.otrc").read_text())
    assert (config["host"], config["port"]) == (
        PUBLIC_HOST, destination_for(resolve_destinations(state, host=PUBLIC_HOST),
                                     "alpha.w001").port,
    )
    [text] = zbarimg(folder / "w001.png")
    assert read_config_url(text) == config


def test_cli_enrol_team_and_http_mode(issued: ProvisionResult) -> None:
    state = issued.out_dir
    url = f"https://{PUBLIC_HOST}/v1/owntracks"

    result = CliRunner().invoke(
        app, ["provision", "enrol-team", "alpha", "--out", str(state), "--mode", "http",
              "--http-url", url],
    )

    assert result.exit_code == 0, result.output
    assert str(state / ENROL_DIR / "alpha" / SHEET_FILE) in result.output
    secrets = [device.password for device in issued.credentials.devices]
    assert not any(secret in result.output for secret in secrets)
    for worker in ("w001", "w002", "w003"):
        config = json.loads((state / ENROL_DIR / "alpha" / f"{worker}.otrc").read_text())
        assert (config["mode"], config["url"]) == (HTTP_MODE, url)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["enrol", "zulu", "w001"], "zulu"),
        (["enrol", "alpha", "w404"], "w404"),
        (["enrol", "alpha", "../w001"], "../w001"),
        (["enrol-team", "zulu"], "zulu"),
        (["enrol", "alpha", "w001", "--mode", "carrier-pigeon"], "mode"),
        (["enrol", "alpha", "w001", "--host", "127.0.0.1", "--port", "8883"], "phones"),
        (["enrol", "alpha", "w001", "--port", "8883"], "--host"),
    ],
)
def test_cli_errors_exit_2(
    issued: ProvisionResult, arguments: list[str], message: str
) -> None:
    state = issued.out_dir
    extra = [] if "--host" in arguments or "--port" in arguments else [
        "--host", PUBLIC_HOST, "--port", "8883"
    ]
    result = CliRunner().invoke(app, ["provision", *arguments, "--out", str(state), *extra])

    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (state / ENROL_DIR / "alpha" / "w001.otrc").exists()


def test_revoked_device_is_not_enrolled(issued: ProvisionResult) -> None:
    state = issued.out_dir
    registry = parse_registry(
        {"teams": [{"id": "alpha", "worker_count": 3, "managers": ["alpha-lead"]},
                   {"id": "bravo", "workers": ["amelie"], "managers": ["bravo-lead"]}],
         "bridges": ["bridge-1"], "tls_hosts": [PUBLIC_HOST]}
    )
    revoke_account(registry, state, "alpha.w002")

    result = CliRunner().invoke(
        app, ["provision", "enrol", "alpha", "w002", "--out", str(state), "--host", PUBLIC_HOST,
              "--port", "8883"],
    )
    assert result.exit_code == 2, result.output
    assert "revoked" in result.output



def test_the_documentation_shows_a_dummy_account() -> None:
    """docs/devices.md's picture: a real QR code of a working configuration, whose password is
    a marked fake one."""
    image = Path(__file__).resolve().parent.parent / "docs" / "images" / (
        "owntracks-enrol-example.png"
    )
    [text] = zbarimg(image)
    config = read_config_url(text)
    assert config["password"] == "FAKE-PASSWORD-example-only"
    assert (config["username"], config["host"]) == ("demo.w001", "tracks.example.org")
