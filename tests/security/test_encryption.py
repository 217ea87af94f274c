"""Issue 13, item 4: links that leave the host are encrypted, and the manager's MQTT login is not
their dashboard password.

Provisioning makes a local certificate authority and the servers' certificate (keys 0600); the
brokers serve MQTT over TLS (mqtts) next to their loopback-only plain listener; the simulator
verifies the broker's certificate and host name; a dashboard given the certificate serves HTTPS.
Everything is played against real servers: Mosquitto, and a whole cluster started in this process
as `teamtrack up` starts it (tests/faults/conftest.py does the same).
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from devices.__main__ import main as simulate_main
from devices.identities import load_device_identities
from devices.simulator import SimulationConfig, run_simulation
from teamtrack.local.cluster import ClusterOptions, LocalCluster
from teamtrack.local.mosquitto_config import MqttsListener, render_broker_config
from teamtrack.local.servers import LOOPBACK, ManagedProcess, free_port, start_mosquitto
from teamtrack.provision import ProvisionError, ProvisionResult, load_credentials, provision
from teamtrack.registry import demo_registry, parse_registry, registry_document
from teamtrack.tls import (
    LOOPBACK_HOSTS,
    SERVER_LIFETIME,
    certificate_hosts,
    client_ssl_context,
    ensure_tls,
)

pytestmark = pytest.mark.security

WAIT_S: Final = 5.0
CONNACK: Final = 0x20


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with a username and password (clean session, keepalive 60)."""
    body = _utf8("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
    body += _utf8("probe") + _utf8(username) + _utf8(password)
    length = len(body)
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x10]) + bytes(encoded) + body


def first_answer(connection: socket.socket | ssl.SSLSocket) -> bytes:
    """Up to 4 bytes the server answers with, b"" if it closes the connection first."""
    connection.settimeout(WAIT_S)
    try:
        return connection.recv(4)
    except (ConnectionResetError, ssl.SSLError):
        return b""


def mqtt_connect_over_tls(
    port: int, username: str, password: str, context: ssl.SSLContext, server_hostname: str
) -> bytes:
    with (
        socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as connection,
    ):
        connection.sendall(connect_packet(username, password))
        return first_answer(connection)


@dataclass
class TlsBroker:
    provisioned: ProvisionResult
    mqtt_port: int
    mqtts_port: int
    process: ManagedProcess
    config: Path

    @property
    def ca(self) -> Path:
        assert self.provisioned.tls is not None
        return self.provisioned.tls.ca_cert


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    state = tmp_path_factory.mktemp("tls-broker")
    provisioned = provision(demo_registry(teams=1, workers=2), state)
    assert provisioned.tls is not None
    mqtt_port, mqtts_port = free_port(), free_port()
    config = render_broker_config(
        mqtt_port=mqtt_port,
        state_dir=state / "brokers",
        password_file=provisioned.password_file,
        acl_file=provisioned.acl_file,
        broker_name="b1",
        mqtts=MqttsListener(
            port=mqtts_port,
            certfile=provisioned.tls.server_cert,
            keyfile=provisioned.tls.server_key,
            cafile=provisioned.tls.ca_cert,
        ),
    )
    process = start_mosquitto(config, mqtt_port)
    try:
        process.wait_for_port(LOOPBACK, mqtts_port)
        yield TlsBroker(provisioned, mqtt_port, mqtts_port, process, config)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An authority of somebody else's, with a certificate for the same names."""
    return ensure_tls(tmp_path_factory.mktemp("other-ca")).ca_cert


# --- the certificates -------------------------------------------------------------------------


def test_provisioning_makes_an_authority_and_a_server_certificate(tmp_path: Path) -> None:
    registry = parse_registry({
        "teams": [{"id": "alpha", "worker_count": 1, "managers": ["alpha-lead"]}],
        "tls_hosts": ["Teamtrack.Example.org"],
    })
    assert registry_document(registry)["tls_hosts"] == ["Teamtrack.Example.org"]
    result = provision(registry, tmp_path, tls_hosts=["203.0.113.7", "mqtt.example.org"])

    tls = result.tls
    assert tls is not None
    assert tls.directory == tmp_path / "tls"
    assert mode_of(tls.directory) == 0o700
    for path in (tls.ca_key, tls.server_key, tls.ca_cert, tls.server_cert):
        assert mode_of(path) == 0o600, path
    assert sorted(path.name for path in tls.directory.iterdir()) == [
        "ca.crt", "ca.key", "server.crt", "server.key"
    ]
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert set(certificate_hosts(server)) == {
        *LOOPBACK_HOSTS, "teamtrack.example.org", "203.0.113.7", "mqtt.example.org"
    }
    public = server.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert tls.issued == ("ca", "server")


def test_reprovisioning_reuses_the_certificates_and_renews_one_close_to_expiry(
    tmp_path: Path,
) -> None:
    registry = demo_registry(teams=1, workers=1)
    first = provision(registry, tmp_path)
    assert first.tls is not None
    ca_before = first.tls.ca_cert.read_bytes()
    server_before = first.tls.server_cert.read_bytes()

    again = provision(registry, tmp_path)
    assert again.tls is not None and again.tls.issued == ()
    assert again.tls.server_cert.read_bytes() == server_before

    # 20 days before the server certificate expires: a new one, from the same authority.
    later = datetime.datetime.now(datetime.UTC) + SERVER_LIFETIME - datetime.timedelta(days=20)
    renewed = ensure_tls(tmp_path / "tls", now=later)
    assert renewed.issued == ("server",)
    assert renewed.ca_cert.read_bytes() == ca_before
    certificate = x509.load_pem_x509_certificate(renewed.server_cert.read_bytes())
    assert certificate.not_valid_after_utc > later + datetime.timedelta(days=300)
    assert mode_of(renewed.server_key) == 0o600

    # A new host name: a new server certificate, still the same authority.
    grown = provision(registry, tmp_path, tls_hosts=["teamtrack.example.org"])
    assert grown.tls is not None and grown.tls.issued == ("server",)
    assert "teamtrack.example.org" in grown.tls.hosts
    assert grown.tls.ca_cert.read_bytes() == ca_before

    rotated = provision(registry, tmp_path, rotate_tls=True)
    assert rotated.tls is not None and rotated.tls.issued == ("ca", "server")
    assert rotated.tls.ca_cert.read_bytes() != ca_before


@pytest.mark.parametrize("host", ["https://x.example", "x.example:8883", "a b", "-x.example"])
def test_a_host_name_no_certificate_can_carry_is_refused_before_anything_is_written(
    tmp_path: Path, host: str
) -> None:
    with pytest.raises(ProvisionError, match="neither a DNS name nor an IP address"):
        provision(demo_registry(teams=1, workers=1), tmp_path, tls_hosts=[host])
    assert list(tmp_path.iterdir()) == []


# --- the brokers ------------------------------------------------------------------------------


def test_the_broker_config_has_a_tls_listener_and_plain_only_on_loopback(
    tls_broker: TlsBroker,
) -> None:
    lines = tls_broker.config.read_text().splitlines()
    assert f"listener {tls_broker.mqtt_port} 127.0.0.1" in lines
    at = lines.index(f"listener {tls_broker.mqtts_port} 127.0.0.1")
    listener = lines[at: at + 12]
    assert "tls_version tlsv1.2" in listener
    assert f"certfile {tls_broker.provisioned.tls.server_cert}" in listener  # type: ignore[union-attr]
    assert "use_username_as_clientid true" in listener


def test_plaintext_mqtt_on_the_tls_listener_gets_no_connack(tls_broker: TlsBroker) -> None:
    observer = tls_broker.provisioned.credentials.observer
    assert observer is not None
    login = connect_packet(observer.username, observer.password)
    with socket.create_connection((LOOPBACK, tls_broker.mqtts_port), timeout=WAIT_S) as plain:
        plain.sendall(login)
        answer = first_answer(plain)
    assert not answer.startswith(bytes([CONNACK])), answer
    # The same login over TLS, verified against the authority, is accepted (CONNACK, rc 0).
    context = client_ssl_context(tls_broker.ca)
    assert mqtt_connect_over_tls(
        tls_broker.mqtts_port, observer.username, observer.password, context, "localhost"
    ) == bytes([CONNACK, 2, 0, 0])


def test_a_client_trusting_another_authority_or_asking_for_another_name_is_refused(
    tls_broker: TlsBroker, other_ca: Path
) -> None:
    observer = tls_broker.provisioned.credentials.observer
    assert observer is not None
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        mqtt_connect_over_tls(
            tls_broker.mqtts_port, observer.username, observer.password,
            client_ssl_context(other_ca), "localhost",
        )
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        mqtt_connect_over_tls(
            tls_broker.mqtts_port, observer.username, observer.password,
            client_ssl_context(tls_broker.ca), "broker.evil.example",
        )


def tls_1_1_context(ca: Path) -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only (this machine's OpenSSL still speaks them to a
    server that accepts them)."""
    context = client_ssl_context(ca)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_below_1_2_is_refused(tls_broker: TlsBroker) -> None:
    context = tls_1_1_context(tls_broker.ca)
    with pytest.raises(ssl.SSLError):
        mqtt_connect_over_tls(tls_broker.mqtts_port, "x", "y", context, "localhost")


def test_a_managers_mqtt_login_is_not_their_dashboard_password(tls_broker: TlsBroker) -> None:
    manager = tls_broker.provisioned.credentials.managers[0]
    assert manager.mqtt_password and manager.mqtt_password != manager.password
    document = json.loads(tls_broker.provisioned.credentials_path.read_text())
    assert document["managers"][0]["mqtt_password"] == manager.mqtt_password
    context = client_ssl_context(tls_broker.ca)
    # CONNACK return code 5: not authorized. The dashboard password opens no broker.
    assert mqtt_connect_over_tls(
        tls_broker.mqtts_port, manager.username, manager.password, context, "127.0.0.1"
    ) == bytes([CONNACK, 2, 0, 5])
    assert mqtt_connect_over_tls(
        tls_broker.mqtts_port, manager.username, manager.mqtt_password, context, "127.0.0.1"
    ) == bytes([CONNACK, 2, 0, 0])


def test_an_older_credentials_file_gets_manager_mqtt_passwords(tmp_path: Path) -> None:
    registry = demo_registry(teams=1, workers=1)
    first = provision(registry, tmp_path)
    document = json.loads(first.credentials_path.read_text())
    for manager in document["managers"]:
        del manager["mqtt_password"]
    first.credentials_path.write_text(json.dumps(document))

    again = provision(registry, tmp_path)
    manager = again.credentials.managers[0]
    assert manager.password == first.credentials.managers[0].password  # login kept
    assert manager.mqtt_password and manager.mqtt_password != manager.password


# --- the simulator ----------------------------------------------------------------------------


async def test_the_simulator_verifies_the_brokers_certificate(
    tls_broker: TlsBroker, other_ca: Path
) -> None:
    identities = load_device_identities(tls_broker.provisioned.credentials_path)
    url = f"mqtts://localhost:{tls_broker.mqtts_port}"

    def config(ca_file: Path, broker_url: str = url) -> SimulationConfig:
        return SimulationConfig(
            broker_urls=(broker_url,), duration=1.5, interval=0.2, show_progress=False,
            ca_file=str(ca_file), connect_timeout=3.0,
        )

    trusted = await run_simulation(config(tls_broker.ca), identities)
    assert trusted.workers_peak == 2 and trusted.messages_sent > 0
    assert trusted.error_count == 0, trusted.errors

    refused = await run_simulation(config(other_ca), identities)
    assert refused.workers_peak == 0 and refused.messages_sent == 0
    assert refused.errors["tls_failed"] >= 2, refused.errors

    # The authority is right, but the name is not one the certificate carries: "127.1" reaches
    # the same listener (127.0.0.1), and is checked as a name, which no SAN matches.
    misnamed = await run_simulation(
        config(tls_broker.ca, f"mqtts://127.1:{tls_broker.mqtts_port}"), identities
    )
    assert misnamed.workers_peak == 0 and misnamed.errors["tls_failed"] >= 2, misnamed.errors


def test_simulate_command_takes_a_ca_file_and_refuses_the_wrong_one(
    tls_broker: TlsBroker, other_ca: Path
) -> None:
    arguments = [
        "--credentials", str(tls_broker.provisioned.credentials_path),
        "--broker-url", f"mqtts://127.0.0.1:{tls_broker.mqtts_port}",
        "--duration", "1", "--interval", "0.2", "--no-progress",
    ]
    assert simulate_main([*arguments, "--ca-file", str(other_ca)]) == 1
    assert simulate_main([*arguments, "--ca-file", str(tls_broker.ca)]) == 0


# --- the whole cluster ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_up_with_https_serves_the_api_and_the_simulator_publishes_over_mqtts(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(ClusterOptions(
        state_dir=tmp_path / "state", brokers=2, dashboards=1, teams=1, workers=3,
        base_port=0, interval=0.2, https=True,
    ))
    try:
        cluster.start()
        endpoints = json.loads((tmp_path / "state" / "endpoints.json").read_text())
        ca = Path(endpoints["ca"])
        assert ca == (tmp_path / "state" / "tls" / "ca.crt").resolve()
        for index, broker in enumerate(endpoints["brokers"]):
            assert broker["mqtts"] == f"mqtts://127.0.0.1:{cluster.ports.broker_mqtts[index]}"
        (dashboard,) = endpoints["dashboards"]
        assert dashboard.startswith("https://127.0.0.1:")
        for name in ("ca.key", "server.key", "ca.crt", "server.crt"):
            assert mode_of(tmp_path / "state" / "tls" / name) == 0o600, name

        # The simulator reaches the brokers over TLS only, with the cluster's authority.
        simulator = next(child for child in cluster.children if child.role == "simulator")
        argv = simulator.process.argv
        assert argv[argv.index("--ca-file") + 1] == str(ca)
        urls = [argv[at + 1] for at, flag in enumerate(argv) if flag == "--broker-url"]
        assert urls == [broker["mqtts"] for broker in endpoints["brokers"]]

        token = load_credentials(tmp_path / "state").managers_of("alpha")[0].token
        workers: list[str] = []
        with httpx.Client(verify=client_ssl_context(ca), timeout=WAIT_S) as client:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(workers) < 3:
                response = client.get(
                    f"{dashboard}/api/teams/alpha/positions",
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert response.status_code == 200, response.text
                workers = [worker["worker"] for worker in response.json()["workers"]]
                time.sleep(0.3)
            assert sorted(workers) == ["w001", "w002", "w003"]
            assert "max-age" in response.headers["strict-transport-security"]
            assert client.get(f"{dashboard}/api/teams/alpha/positions").status_code == 401
        # Plain HTTP on the HTTPS port gets no answer of the API.
        with pytest.raises(httpx.HTTPError):
            httpx.get(dashboard.replace("https://", "http://") + "/healthz", timeout=WAIT_S)
        # Nor TLS 1.1.
        port = int(dashboard.rsplit(":", 1)[1])
        with (
            socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as raw,
            pytest.raises(ssl.SSLError),
        ):
            tls_1_1_context(ca).wrap_socket(raw, server_hostname="127.0.0.1")
        # Nor does a client that trusts another authority.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{dashboard}/healthz", timeout=WAIT_S)

        # Managers' MQTT over WebSockets is wss:// too, through the gateway, with the CA.
        ws_url = endpoints["brokers"][1]["ws"]
        assert ws_url.startswith("wss://127.0.0.1:")
        manager_login = load_credentials(tmp_path / "state").managers_of("alpha")[0]
        received: list[str] = []
        manager = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                              transport="websockets")
        manager.tls_set_context(client_ssl_context(ca))
        manager.ws_set_options(path="/mqtt")
        manager.username_pw_set(manager_login.username, manager_login.mqtt_password)
        manager.on_message = lambda _c, _u, message: received.append(message.topic)
        manager.connect(LOOPBACK, int(ws_url.rsplit(":", 1)[1]))
        manager.loop_start()
        try:
            manager.subscribe("teams/alpha/#", qos=0)
            deadline = time.monotonic() + 10
            while not any(t.endswith("/position") for t in received):
                assert time.monotonic() < deadline, "no position over wss"
                time.sleep(0.1)
        finally:
            manager.loop_stop()
            manager.disconnect()
    finally:
        cluster.stop()
