"""The provisioned password file and ACL, enforced by a real mosquitto on loopback ports.

Absence of a message is checked without sleeping: after the message that must not arrive, a
message that must arrive is sent along the same path. Mosquitto handles one client's packets in
order and fans each message out before reading the next, so once the later message is in, the
earlier one would have been too.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
import pytest
from conftest import start_ws_gateway
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from teamtrack.contract import position_topic, status_topic
from teamtrack.local.mosquitto_config import (
    BrokerConfigError,
    render_broker_config,
    render_compose_broker_configs,
)
from teamtrack.local.servers import LOOPBACK, ManagedProcess, free_port, start_mosquitto
from teamtrack.mqtt import BRIDGE_SHARE_GROUP
from teamtrack.provision import Credentials, ProvisionResult, provision
from teamtrack.registry import demo_registry

WAIT_S: Final = 3.0
SILENCE_S: Final = 0.3
NOT_AUTHORIZED: Final = 135
# PUBACK of an accepted publish that nobody is subscribed to.
NO_MATCHING_SUBSCRIBERS: Final = 16
# The account of bridge 1 of broker b1 (one account per bridge process).
BRIDGE: Final = "bridge-b1-1"


ConnectAs = Callable[..., "Probe"]


@dataclass(frozen=True)
class Broker:
    mqtt_port: int
    credentials: Credentials
    # MQTT over WebSockets: the gateway in front of the broker (0: none started).
    ws_port: int = 0


class Probe:
    """A paho MQTT v5 client whose deliveries and acknowledgements can be awaited."""

    def __init__(
        self,
        broker: Broker,
        username: str | None,
        password: str | None,
        *,
        transport: str = "tcp",
        clean_start: bool = True,
        client_id: str = "",
        session_expiry_s: int = 0,
    ) -> None:
        self.broker = broker
        self.transport = transport
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
            transport="websockets" if transport == "websockets" else "tcp",
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connect_result: ReasonCode | None = None
        self._connected = threading.Event()
        self._acks: dict[int, list[int]] = {}
        self._ack_arrived = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connect_result = reason
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, bytes(message.payload)))

    def _record_ack(self, mid: int, codes: list[int]) -> None:
        with self._ack_arrived:
            self._acks[mid] = codes
            self._ack_arrived.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._record_ack(mid, [reason.value])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._record_ack(mid, [reason.value for reason in reasons])

    def _ack(self, mid: int) -> list[int]:
        with self._ack_arrived:
            if not self._ack_arrived.wait_for(lambda: mid in self._acks, WAIT_S):
                raise AssertionError(f"no acknowledgement of packet {mid} within {WAIT_S} s")
            return self._acks.pop(mid)

    def connect(self) -> ReasonCode:
        port = self.broker.ws_port if self.transport == "websockets" else self.broker.mqtt_port
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.session_expiry_s
        self.client.connect(
            LOOPBACK, port, keepalive=30, clean_start=self.clean_start, properties=properties
        )
        self.client.loop_start()
        assert self._connected.wait(WAIT_S), "no CONNACK"
        assert self.connect_result is not None
        return self.connect_result

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[int]:
        result, mid = self.client.subscribe(topic_filter, qos=qos)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        return self._ack(mid)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        return self._ack(info.mid)[0]

    def next_message(self) -> tuple[str, bytes]:
        try:
            return self.messages.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError(f"no message within {WAIT_S} s") from None

    def messages_until(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including the message with this payload."""
        received = []
        while True:
            topic, body = self.next_message()
            received.append((topic, body))
            if body == payload:
                return received

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_broker(state: Path, provisioned: ProvisionResult) -> tuple[ManagedProcess, int]:
    mqtt_port = free_port()
    config = render_broker_config(
        mqtt_port=mqtt_port,
        state_dir=state,
        password_file=provisioned.password_file,
        acl_file=provisioned.acl_file,
        broker_name=f"acl-{mqtt_port}",
    )
    return start_mosquitto(config, mqtt_port), mqtt_port


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> ProvisionResult:
    return provision(demo_registry(teams=2, workers=2), tmp_path_factory.mktemp("acl-state"))


@pytest.fixture(scope="module")
def broker(provisioned: ProvisionResult) -> Iterator[Broker]:
    """One broker, and the WebSockets gateway (`python -m wsgate`) in front of it."""
    server, mqtt_port = start_broker(provisioned.out_dir, provisioned)
    try:
        gateway = start_ws_gateway(mqtt_port, provisioned.out_dir)
    except BaseException:
        server.stop()
        raise
    try:
        yield Broker(mqtt_port, provisioned.credentials, ws_port=gateway.port)
    finally:
        gateway.process.stop()
        server.stop()


@pytest.fixture
def connect(broker: Broker) -> Iterator[ConnectAs]:
    """connect(username, **options) -> a connected Probe; all are closed after the test."""
    probes: list[Probe] = []
    passwords = {
        **{device.username: device.password for device in broker.credentials.devices},
        **{manager.username: manager.mqtt_password for manager in broker.credentials.managers},
        **{service.username: service.password for service in broker.credentials.observers},
        **{service.username: service.password for service in broker.credentials.bridges},
    }

    def connect_as(username: str, **options: Any) -> Probe:
        probe = Probe(broker, username, passwords[username], **options)
        probes.append(probe)
        result = probe.connect()
        assert not result.is_failure, f"{username} refused: {result}"
        return probe

    yield connect_as
    for probe in probes:
        probe.close()


def unique_payload(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex[:8]}".encode()


@pytest.mark.parametrize(
    ("username", "password"),
    [(None, None), ("observer", "not-the-password"), ("alpha.w009", "unregistered")],
)
def test_anonymous_and_wrong_logins_are_refused(
    broker: Broker, username: str | None, password: str | None
) -> None:
    # Mosquitto 2.0 answers "not authorized" for all three rather than "bad username or password".
    refused = Probe(broker, username, password)
    try:
        assert refused.connect().value == NOT_AUTHORIZED
    finally:
        refused.close()


def test_device_position_reaches_observer(connect: ConnectAs) -> None:
    observer = connect("observer")
    assert observer.subscribe("teams/#") == [1]
    device = connect("alpha.w001")

    payload = unique_payload("own")
    assert device.publish(position_topic("alpha", "w001"), payload) == 0

    assert observer.next_message() == (position_topic("alpha", "w001"), payload)


def test_device_cannot_impersonate_another_worker(connect: ConnectAs) -> None:
    observer = connect("observer")
    observer.subscribe("teams/#")
    device = connect("alpha.w001")

    forged = unique_payload("forged")
    assert device.publish(position_topic("alpha", "w002"), forged) == NOT_AUTHORIZED
    assert device.publish(position_topic("bravo", "w001"), forged) == NOT_AUTHORIZED
    assert device.publish("teams/alpha/workers/w001/other", forged) == NOT_AUTHORIZED
    sentinel = unique_payload("sentinel")
    device.publish(status_topic("alpha", "w001"), sentinel)

    assert observer.messages_until(sentinel) == [(status_topic("alpha", "w001"), sentinel)]


def test_device_cannot_read(connect: ConnectAs) -> None:
    device = connect("alpha.w001")
    # Refused by the brokers' subscription check (mosquitto/plugin/); mosquitto 2.0 alone
    # granted them and enforced `read` on each delivery instead.
    assert device.subscribe("teams/alpha/#") == [NOT_AUTHORIZED]
    assert device.subscribe(position_topic("alpha", "w001")) == [NOT_AUTHORIZED]
    bridge = connect(BRIDGE)
    bridge.subscribe("teams/alpha/#")

    payload = unique_payload("for-managers")
    bridge.publish(position_topic("alpha", "w001"), payload)

    # The bridge got its own message back, so the broker has already fanned it out; a device
    # allowed to read would have it in flight now. No later message can serve as a barrier
    # for a client that may receive nothing, hence a short bounded wait.
    assert bridge.messages_until(payload)[-1][1] == payload
    with pytest.raises(queue.Empty):
        device.messages.get(timeout=SILENCE_S)


def test_manager_reads_own_team_only(connect: ConnectAs) -> None:
    manager = connect("alpha-lead")
    assert manager.subscribe("teams/#") == [NOT_AUTHORIZED]
    assert manager.subscribe("teams/bravo/#") == [NOT_AUTHORIZED]
    assert manager.subscribe("teams/alpha/#") == [1]
    bridge = connect(BRIDGE)

    other_team = unique_payload("bravo")
    own_team = unique_payload("alpha")
    bridge.publish(position_topic("bravo", "w001"), other_team)
    bridge.publish(position_topic("alpha", "w002"), own_team)

    assert manager.messages_until(own_team) == [(position_topic("alpha", "w002"), own_team)]


def test_manager_cannot_publish(connect: ConnectAs) -> None:
    observer = connect("observer")
    observer.subscribe("teams/#")
    manager = connect("alpha-lead")

    fake = unique_payload("fake")
    assert manager.publish(position_topic("alpha", "w001"), fake) == NOT_AUTHORIZED
    sentinel = unique_payload("sentinel")
    connect(BRIDGE).publish(position_topic("alpha", "w001"), sentinel)

    assert observer.messages_until(sentinel) == [(position_topic("alpha", "w001"), sentinel)]


def test_observer_cannot_publish(connect: ConnectAs) -> None:
    observer = connect("observer")
    assert observer.publish(position_topic("alpha", "w001"), b"{}") == NOT_AUTHORIZED


def test_bridges_share_a_subscription(connect: ConnectAs) -> None:
    # Several bridges on one broker split the stream with a shared subscription: the ACL lets
    # bridge accounts join the group `teamtrack` (BRIDGE_SHARE_GROUP), and no other group.
    bridge = connect(BRIDGE)
    assert bridge.subscribe("$share/bridges/teams/+/workers/+/+") == [NOT_AUTHORIZED]
    assert bridge.subscribe(f"$share/{BRIDGE_SHARE_GROUP}/teams/+/workers/+/+") == [1]
    device = connect("bravo.w002")

    payload = unique_payload("shared")
    device.publish(position_topic("bravo", "w002"), payload)

    assert bridge.next_message() == (position_topic("bravo", "w002"), payload)


def test_manager_over_websockets(connect: ConnectAs) -> None:
    manager = connect("bravo-lead", transport="websockets")
    manager.subscribe("teams/bravo/#")
    device = connect("bravo.w001")

    payload = unique_payload("ws")
    device.publish(position_topic("bravo", "w001"), payload)

    assert manager.next_message() == (position_topic("bravo", "w001"), payload)


def test_websockets_gateway_refuses_anonymous(broker: Broker) -> None:
    """The gateway only pipes: the broker refuses an anonymous CONNECT that came through it."""
    anonymous = Probe(broker, None, None, transport="websockets")
    try:
        assert anonymous.connect().value == NOT_AUTHORIZED
    finally:
        anonymous.close()


def test_mosquitto_sub_sees_a_team(broker: Broker, connect: ConnectAs) -> None:
    observer = broker.credentials.observer
    assert observer is not None
    command = [
        "mosquitto_sub",
        "-h",
        LOOPBACK,
        "-p",
        str(broker.mqtt_port),
        "-V",
        "mqttv5",
        "-u",
        observer.username,
        "-P",
        observer.password,
        "-t",
        "teams/alpha/#",
        "-C",
        "1",
        "-W",
        str(int(WAIT_S)),
        "-v",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as reader:
        bridge = connect(BRIDGE)
        bridge.subscribe("teams/alpha/#")
        # Publish until mosquitto_sub has subscribed and printed one message (or timed out).
        payload = unique_payload("cli")
        while reader.poll() is None:
            bridge.publish(position_topic("alpha", "w002"), payload)
            bridge.messages_until(payload)
        output = reader.stdout.read().decode() if reader.stdout else ""
    assert reader.returncode == 0, output
    assert output.strip() == f"{position_topic('alpha', 'w002')} {payload.decode()}"


def test_persistent_bridge_session_survives_a_broker_restart(
    provisioned: ProvisionResult, tmp_path: Path
) -> None:
    server, mqtt_port = start_broker(tmp_path, provisioned)
    broker = Broker(mqtt_port, provisioned.credentials)
    bridge_login = provisioned.credentials.bridge()
    device_login = provisioned.credentials.device("alpha", "w001")
    try:
        bridge = Probe(
            broker,
            bridge_login.username,
            bridge_login.password,
            clean_start=False,
            client_id="bridge-b1",
            session_expiry_s=3600,
        )
        bridge.connect()
        bridge.subscribe("teams/+/workers/+/position", qos=1)
        bridge.close()

        device = Probe(broker, device_login.username, device_login.password)
        device.connect()
        queued = unique_payload("queued")
        device.publish(position_topic("alpha", "w001"), queued)
        device.close()

        server.stop()
        server = start_mosquitto(tmp_path / f"acl-{mqtt_port}.conf", mqtt_port)

        resumed = Probe(
            broker,
            bridge_login.username,
            bridge_login.password,
            clean_start=False,
            client_id="bridge-b1",
            session_expiry_s=3600,
        )
        resumed.connect()
        try:
            assert resumed.next_message() == (position_topic("alpha", "w001"), queued)
        finally:
            resumed.close()
    finally:
        server.stop()


def test_rendered_config_has_the_cluster_settings(tmp_path: Path) -> None:
    config = render_broker_config(
        mqtt_port=18830,
        state_dir=tmp_path,
        password_file=tmp_path / "mosquitto.passwd",
        acl_file=tmp_path / "mosquitto.acl",
        broker_name="b1",
    )
    options = [
        line for line in config.read_text().splitlines() if line and not line.startswith("#")
    ]

    assert config == tmp_path.resolve() / "b1.conf"
    assert (tmp_path / "b1").is_dir()
    # Security options come before the listeners they must apply to.
    assert options[:4] == [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {tmp_path.resolve() / 'mosquitto.passwd'}",
        f"acl_file {tmp_path.resolve() / 'mosquitto.acl'}",
    ]
    for expected in [
        "listener 18830 127.0.0.1",
        "protocol mqtt",
        "persistence true",
        f"persistence_location {tmp_path.resolve() / 'b1'}/",
        "max_queued_messages 100000",
        # 64 KiB of payload and 1 KiB of topic and properties, as the WebSockets gateway's.
        "max_packet_size 66560",
        "message_size_limit 65536",
        "set_tcp_nodelay true",
        "log_dest stdout",
        f"plugin_opt_acl_file {tmp_path.resolve() / 'mosquitto.acl'}",
    ]:
        assert expected in options
    assert options[4].startswith("plugin ") and options[4].endswith(".so")
    # A listener option: before the first `listener` it would open a default one on port 1883.
    at = options.index("listener 18830 127.0.0.1")
    assert options[at + 2] == "use_username_as_clientid true"
    assert options.count("use_username_as_clientid true") == 1
    # One listener, plain MQTT: MQTT over WebSockets is the gateway's (python -m wsgate).
    assert [option for option in options if option.startswith("listener")] == [
        "listener 18830 127.0.0.1"
    ]
    assert not [option for option in options if "websockets" in option]
    assert "$" not in config.read_text().replace("$share", "")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"broker_name": "Broker 1"}, "not a slug"),
        ({"host": "0.0.0.0"}, "must stay on loopback"),
        ({"mqtt_port": 70000}, "not a TCP port"),
        ({"acl_file": Path("/tmp/x\nallow_anonymous true")}, "cannot be written"),
    ],
)
def test_render_rejects_values_that_would_break_the_config(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {
        "mqtt_port": 18830,
        "state_dir": tmp_path,
        "password_file": tmp_path / "mosquitto.passwd",
        "acl_file": tmp_path / "mosquitto.acl",
        "broker_name": "b1",
    }
    with pytest.raises(BrokerConfigError, match=message):
        render_broker_config(**{**arguments, **change})
    assert not list(tmp_path.glob("*.conf"))


def test_compose_configs_use_container_paths(tmp_path: Path) -> None:
    written = render_compose_broker_configs(tmp_path)

    assert [path.name for path in written] == ["mosquitto-1.conf", "mosquitto-2.conf"]
    text = written[1].read_text()
    assert "password_file /mosquitto/config/mosquitto.passwd" in text
    assert "listener 1883 0.0.0.0" in text
    assert "persistence_location /mosquitto/data/" in text
    assert "user mosquitto" in text


def test_workers_added_at_a_peak_connect_after_sighup(tmp_path: Path) -> None:
    first = provision(demo_registry(teams=1, workers=1), tmp_path)
    server, mqtt_port = start_broker(tmp_path, first)
    try:
        grown = provision(demo_registry(teams=1, workers=2), tmp_path)
        newcomer = grown.credentials.device("alpha", "w002")
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)

        broker = Broker(mqtt_port, grown.credentials)
        # The reload is asynchronous to the signal; retry briefly until the new login works.
        deadline = time.monotonic() + WAIT_S
        while True:
            probe = Probe(broker, newcomer.username, newcomer.password)
            try:
                result = probe.connect()
            finally:
                probe.close()
            if not result.is_failure or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not result.is_failure, f"new worker refused after SIGHUP: {result}"
        kept = grown.credentials.device("alpha", "w001")
        assert kept == first.credentials.device("alpha", "w001")
        probe = Probe(broker, kept.username, kept.password)
        try:
            assert not probe.connect().is_failure
            accepted = probe.publish(position_topic("alpha", "w001"), b"{}")
            assert accepted == NO_MATCHING_SUBSCRIBERS
        finally:
            probe.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("username", "topic_filter", "granted"),
    [
        ("observer", "teams/#", True),
        ("observer", "teams/alpha/workers/+/status", True),
        ("observer", "#", False),
        ("observer", "$SYS/#", False),
        ("observer", "+/alpha/#", False),
        ("observer", f"$share/{BRIDGE_SHARE_GROUP}/teams/#", False),
        ("alpha-lead", "teams/alpha/workers/w001/position", True),
        ("alpha-lead", "teams/+/workers/+/position", False),
        ("alpha-lead", "$share/mine/teams/alpha/#", False),
        ("alpha.w001", "teams/alpha/workers/w001/status", False),
        ("alpha.w001", "$share/x/teams/alpha/workers/w001/status", False),
        (BRIDGE, "teams/+/workers/+/+", True),
        (BRIDGE, f"$share/{BRIDGE_SHARE_GROUP}/teams/alpha/#", True),
        (BRIDGE, "#", False),
    ],
)
def test_a_subscription_is_granted_only_where_the_acl_lets_the_account_read(
    connect: ConnectAs, username: str, topic_filter: str, granted: bool
) -> None:
    assert connect(username).subscribe(topic_filter) == ([1] if granted else [NOT_AUTHORIZED])


def test_a_team_added_at_a_peak_may_subscribe_after_sighup(tmp_path: Path) -> None:
    """The subscription check reads the ACL again on SIGHUP, like mosquitto does."""
    first = provision(demo_registry(teams=1, workers=1), tmp_path)
    server, mqtt_port = start_broker(tmp_path, first)
    try:
        grown = provision(demo_registry(teams=2, workers=1), tmp_path)
        manager = grown.credentials.manager("bravo-lead")
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        broker = Broker(mqtt_port, grown.credentials)
        deadline = time.monotonic() + WAIT_S
        while True:
            probe = Probe(broker, manager.username, manager.mqtt_password)
            try:
                codes = probe.subscribe("teams/bravo/#") if not probe.connect().is_failure else []
            finally:
                probe.close()
            if codes == [1] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert codes == [1]
    finally:
        server.stop()
